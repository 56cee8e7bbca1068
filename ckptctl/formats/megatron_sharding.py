"""How megatron-core shards GPT / MoE model keys over tensor, pipeline and expert parallel ranks.

The rules behind ``convert-reshard`` (which chunks each target rank saves) and behind mapping
``dp_reshardable`` optimizer buffers back to named parameters (:mod:`ckptctl.formats.distopt`:
which part of each parameter a model-parallel rank holds). Checked against megatron-core's
``sharded_state_dict`` in the tests.
"""

from __future__ import annotations

from ckptctl.errors import UsageError
from ckptctl.formats.base import TensorInfo
from ckptctl.formats.megatron import _PER_LAYER_RE
from ckptctl.formats.megatron import _STACKED_PREFIX as _STACKED

REPLICATED, COLUMN, GATED, ROW = "replicated", "column", "gated", "row"
#: suffix (after ``decoder.layers.[i.]``, or the whole key) -> how megatron splits it over TP
SPLIT_EXACT = {
    "self_attention.linear_qkv.weight": COLUMN, "self_attention.linear_qkv.bias": COLUMN,
    "embedding.word_embeddings.weight": COLUMN, "output_layer.weight": COLUMN, "output_layer.bias": COLUMN,
    "mlp.linear_fc1.weight": GATED, "mlp.linear_fc1.bias": GATED,
    "self_attention.linear_proj.weight": ROW, "mlp.linear_fc2.weight": ROW,
    "self_attention.linear_proj.bias": REPLICATED, "mlp.linear_fc2.bias": REPLICATED,
    "embedding.position_embeddings.weight": REPLICATED,
}
REPLICATED_SUFFIXES = ("layernorm.weight", "layernorm.bias", "layer_norm_weight", "layer_norm_bias",
                       "norm.weight", "norm.bias")
SPLIT_EXACT.update({
    # MoE: the router (and its expert bias) is replicated over TP and EP; shared experts are a TP-split MLP
    "mlp.router.weight": REPLICATED, "mlp.router.expert_bias": REPLICATED,
    "mlp.shared_experts.linear_fc1.weight": GATED, "mlp.shared_experts.linear_fc2.weight": ROW,
    "mlp.shared_experts.gate_weight": REPLICATED,
    # multi-latent attention (DeepSeek-V3 family): up projections split by heads; the down projections
    # are duplicated on every TP rank in the Transformer-Engine spec SkyRL uses
    "self_attention.linear_q_proj.weight": COLUMN, "self_attention.linear_q_up_proj.weight": COLUMN,
    "self_attention.linear_kv_up_proj.weight": COLUMN,
    "self_attention.linear_q_down_proj.weight": REPLICATED, "self_attention.linear_kv_down_proj.weight": REPLICATED,
})
#: routed experts ([E, rows, cols] per layer, after the layer axis of a stacked key): split over EP
#: by whole experts and, within an expert, over ETP like the dense MLP (fc1 gated, fc2 row)
EXPERT_SPLIT = {
    "mlp.experts.experts.linear_fc1.weight": GATED, "mlp.experts.experts.linear_fc2.weight": ROW,
    "mlp.experts.linear_fc1.weight": GATED, "mlp.experts.linear_fc2.weight": ROW,
}
UNSUPPORTED = ("mtp.",)
FIRST_STAGE = ("embedding.",)
LAST_STAGE = ("output_layer.", "decoder.final_layernorm.", "decoder.final_norm.")


def layer_and_suffix(model_key: str) -> tuple[str, int | None, str]:
    """("stacked" | "per_layer" | "other", layer index for per-layer keys, suffix)."""
    m = _PER_LAYER_RE.match(model_key)
    if m:
        return "per_layer", int(m.group(1)), m.group(2)
    if model_key.startswith(_STACKED):
        return "stacked", None, model_key[len(_STACKED):]
    return "other", None, model_key


def split_kind(model_key: str) -> str | None:
    """How megatron-core splits ``model_key`` (a model key) over TP, from its name; None: unknown."""
    _, _, suffix = layer_and_suffix(model_key)
    if any(suffix.startswith(p) or model_key.startswith(p) for p in UNSUPPORTED):
        return None
    if suffix in SPLIT_EXACT:
        return SPLIT_EXACT[suffix]
    if suffix.endswith(REPLICATED_SUFFIXES):
        return REPLICATED
    return None


def tp_blocks(kind: str, shape: tuple[int, ...], tp: int, *, key: str = "") -> list[tuple[int, tuple, tuple]]:
    """``(tp_rank, offsets, sizes)`` of the chunks megatron saves for a (per-layer) tensor of
    ``shape`` split ``kind`` over ``tp`` ranks; replicated tensors are written by TP rank 0."""
    zero = (0,) * len(shape)
    if kind == REPLICATED or not shape:
        return [(0, zero, tuple(shape))]
    dim = 1 if kind == ROW else 0
    if dim >= len(shape):
        raise UsageError(f"{key}: a row-parallel tensor needs 2 dimensions, it has shape {list(shape)}")
    parts = 2 * tp if kind == GATED else tp
    if shape[dim] % parts:
        raise UsageError(f"{key}: dimension {dim} ({shape[dim]}) does not split into {parts} equal parts "
                         f"for TP={tp}")
    step = shape[dim] // parts
    out = []
    for i in range(parts):
        rank = i % tp if kind == GATED else i  # gated: gate_0..gate_{tp-1}, then up_0..up_{tp-1}
        off = list(zero)
        off[dim] = i * step
        size = list(shape)
        size[dim] = step
        out.append((rank, tuple(off), tuple(size)))
    return out


def check_source_split(info: TensorInfo, kind: str, tp_src: int, layered: bool) -> str:
    """The kind that matches how the source is chunked at its TP (GATED vs COLUMN for fc1), or
    raise when the source chunks are not what megatron's sharding at TP=tp_src gives."""
    shape = info.shape[1:] if layered else info.shape
    first = min((p.offsets[0] for p in info.pieces), default=0) if layered else None
    got = sorted((p.offsets[1:], p.sizes[1:]) if layered else (p.offsets, p.sizes)
                 for p in info.pieces if first is None or p.offsets[0] == first)
    candidates = [kind] + ([COLUMN] if kind == GATED else [])
    for cand in candidates:
        try:
            want = sorted((o, s) for _, o, s in tp_blocks(cand, tuple(shape), tp_src, key=info.name))
        except UsageError:
            continue
        if got == want:
            return cand
    raise UsageError(f"{info.name}: stored in chunks {[list(o) for o, _ in got][:8]}, which is not how "
                     f"megatron-core shards a {kind} tensor at TP={tp_src}; cannot reshard it safely")


def stage_of_layer(layer: int, num_layers: int, pp: int) -> int:
    return layer // (num_layers // pp)
