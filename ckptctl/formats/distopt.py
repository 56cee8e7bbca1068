"""megatron-core ``dp_reshardable`` distributed-optimizer state mapped back to named parameters.

``dp_reshardable`` (SkyRL's default) saves the DistributedOptimizer's internal buffers: per
optimizer of the chain (``chained_{i}.``; MoE: 0 = dense params, 1 = expert params), per
model-parallel rank ``dp_group_idx_{k}``, per grad buffer ``gbuf_idx_{g}`` (one per
(param dtype, grad dtype)), per bucket ``bucket_idx_{b}``, one flat fp32 tensor per state
(``param`` = fp32 main params, ``exp_avg``, ``exp_avg_sq``), plus the objects
``per_bucket_numel``, ``per_bucket_numel_unpadded`` and ``optimizer`` (param_groups, step).
megatron-core itself reloads it only at the same TP/PP/EP. This module derives, from the
checkpoint alone, which parameter (model key, and which part of its global tensor) each span of
each flat buffer holds -- the rules of megatron-core's ``param_and_grad_buffer.py`` and
``distrib_optimizer.py`` (0.16; the same since param alignment was introduced):

* the params of a buffer are the model chunk's ``named_parameters()`` with ``requires_grad``
  (dense: ``allreduce`` True; experts with EP > 1 go to the expert optimizer) in REVERSE
  registration order: output layer, final norm, last layer ... first layer, embedding;
* each param starts at a multiple of 64 elements from its bucket's start; a bucket closes after
  the param that makes it reach ``bucket_size`` (sizes from the ``per_bucket_numel_unpadded``
  object: the bucket_size itself is not saved); its padded size is a multiple of lcm(DP, 128)
  (``per_bucket_numel``), split in DP equal shards, one per DP rank;
* the saved flat tensor of a bucket has the UNPADDED length; its DCP chunks are each DP rank's
  part of each param, plus the gaps between params (alignment padding), never the bucket's tail;
* ``dp_group_idx`` is the rank in the model-parallel group: ``tp + TP * pp`` for the dense
  optimizer, ``etp + ETP * (ep + EP * pp)`` (megatron's tensor-expert-pipeline group) for the
  expert one;
* a param's local data is its TP part (from the sharding rules of
  :mod:`ckptctl.formats.megatron_sharding`: a gated fc1 holds its gate rows then its up rows),
  flattened row-major.

The registration order inside a transformer layer differs between megatron's module specs: with
Transformer Engine the input norm is fused into ``linear_qkv`` (after ``linear_proj``), with the
local spec it is a module of its own (first); TEGroupedMLP registers all fc1 then all fc2 of the
local experts, SequentialMLP expert by expert. Every variant is tried against the checkpoint's
own chunk structure (each param piece is a DCP chunk: its offset and size must match exactly,
in every bucket of every rank); a layout is used only when exactly one mapping fits. The
megatron-core version that wrote a checkpoint is recorded nowhere in it (``metadata.json`` names
only the storage backends, ``common.pt`` only the sharding type), so the rules are not chosen by
version: they are checked against what the checkpoint holds (chunk structure, bucket padding,
sizes) and the values, and anything else is refused. Reading
the ``param`` state also compares it with the model weights saved next to it (rounded to the
model dtype), so moments are never attached to the wrong parameter: any doubt raises
:class:`~ckptctl.errors.OptimizerLayoutError`, whose message names ``--drop-optimizer``.

:class:`DistOptReader` wraps a :class:`~ckptctl.formats.megatron.MegatronReader` and presents the
state as the per-parameter tensors megatron's ``fully_reshardable`` format holds
(``[chained_i.]optimizer.state.{param,exp_avg,exp_avg_sq}.<model key>``, the model key's global
shape), read region by region from the flat buckets: memory is bounded by one parameter's local
part.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Iterable

from ckptctl.errors import CkptctlError, OptimizerLayoutError
from ckptctl.formats.base import MODEL, OPTIMIZER, TensorInfo
from ckptctl.formats.flattened import FlattenedState, is_flattened_state
from ckptctl.formats.megatron import DP_BUFFER_RE, DP_OBJECT_RE, bucket_numels
from ckptctl.formats.megatron_sharding import (EXPERT_SPLIT, REPLICATED, check_source_split, layer_and_suffix,
                                               split_kind, tp_blocks)

if TYPE_CHECKING:  # pragma: no cover
    import torch

    from ckptctl.formats.megatron import MegatronReader

PARAM_ALIGN = 64  # param starts are padded to 64 elements (128-byte aligned 16-bit params)
#: saved model tensors that are buffers, not parameters (no optimizer state)
NON_PARAM_SUFFIXES = (".expert_bias", ".local_tokens_per_expert")

#: position of a module inside a transformer layer, in registration order (megatron-core 0.16
#: TransformerLayer / SelfAttention / MLA / MoELayer); "ln:" entries: the fused norm keys, whose
#: position depends on the module spec (local: own module first; TE: first param of the linear)
_LAYER_MODULES = (
    ("input_layernorm.", 0), ("self_attention.linear_proj.", 10), ("self_attention.linear_q_proj.", 20),
    ("self_attention.linear_q_down_proj.", 20), ("self_attention.linear_q_up_proj.", 30),
    ("self_attention.linear_kv_down_proj.", 40), ("self_attention.linear_kv_up_proj.", 50),
    ("self_attention.linear_qkv.", 60), ("self_attention.q_layernorm.", 70), ("self_attention.k_layernorm.", 80),
    ("self_attention.kv_layernorm.", 80), ("pre_mlp_layernorm.", 100), ("mlp.router.", 110),
    ("mlp.experts.", 120), ("mlp.shared_experts.linear_fc1.", 130), ("mlp.shared_experts.linear_fc2.", 131),
    ("mlp.shared_experts.gate_weight", 132), ("mlp.linear_fc1.", 140), ("mlp.linear_fc2.", 150),
)
_LOCAL_SPEC_NORMS = {"self_attention.linear_qkv.layer_norm_": 0, "mlp.linear_fc1.layer_norm_": 100}
_PARAM_ORDER = {"layer_norm_weight": 0, "layer_norm_bias": 1, "weight": 2, "bias": 3}
SPECS = ("te", "local")
EXPERT_ORDERS = ("grouped", "sequential")


def _layout_error(where: str, reason: str) -> OptimizerLayoutError:
    """The error for dp_reshardable buffers that cannot be mapped to parameters with certainty."""
    error = OptimizerLayoutError(f"{where}: cannot map the dp_reshardable optimizer state to parameters: {reason}; "
                                 "pass --drop-optimizer to write the model weights only")
    error.reason = reason  # for inspect, which shows why without the advice
    return error


def slot_facts(slot: "ParamSlot") -> dict:
    """What inspect shows of one parameter a bucket holds: its model ``key``, ``layer`` and global
    ``expert`` (None where they do not apply), a readable ``name`` (the per-layer form, an expert
    marked ``[expert e]``), its ``start`` / ``numel`` in the bucket's flat buffer and the global
    ``blocks`` (offsets, sizes) of the model tensor it holds, in buffer order."""
    layout, layer, suffix = layer_and_suffix(slot.key)
    lead = slot.blocks[0][0] if slot.blocks else ()
    if layout == "stacked" and lead:
        layer = lead[0]
    expert = None
    if suffix in EXPERT_SPLIT and lead:
        expert = lead[1] if layout == "stacked" else lead[0]
    name = f"decoder.layers.{layer}.{suffix}" if layer is not None else slot.key
    return {"name": name + (f"[expert {expert}]" if expert is not None else ""), "key": slot.key, "layer": layer,
            "expert": expert, "start": slot.start, "numel": slot.numel,
            "blocks": [[list(o), list(s)] for o, s in slot.blocks]}


def annotate_buckets(reader: "MegatronReader", summary: dict) -> str | None:
    """Add to every ``dp_reshardable`` bucket of ``summary["optimizer"]["chains"]`` (the reader's
    summary) the ``parameters`` it holds (:func:`slot_facts`, in buffer order), from
    :func:`build_layout`. Returns None when done, or why the layout cannot be established (the
    buckets are then left as they are); reads only metadata and the small bucket records."""
    chains = (summary.get("optimizer") or {}).get("chains") or ()
    if not any(c.get("dp_groups") for c in chains):
        return None
    try:
        layout = build_layout(reader, summary)
    except CkptctlError as exc:
        return getattr(exc, "reason", str(exc))
    held = {(b.chain, b.dp_group_idx, b.gbuf, b.dtype, b.bucket): b.params for b in layout.buckets}
    for chain in chains:
        label = f"{chain['chain']}." if chain.get("chain") else ""
        for group in chain.get("dp_groups") or ():
            for buf in group["buffers"]:
                for bucket in buf["buckets"]:
                    params = held.get((label, group["dp_group_idx"], buf["gbuf_idx"], buf["dtype"],
                                       bucket["bucket_idx"]))
                    if params is not None:
                        bucket["parameters"] = [slot_facts(p) for p in params]
    return None


def _record_error(where: str, reason: str) -> OptimizerLayoutError:
    """The error for a common.pt optimizer record that cannot be rewritten for the target."""
    return OptimizerLayoutError(f"{where}: cannot rewrite the optimizer record for the target: {reason}; pass "
                                "--drop-optimizer to write the model weights only")


@dataclass(frozen=True)
class ParamSlot:
    """One parameter's local part inside a bucket's flat tensor."""

    key: str  # the model key
    blocks: tuple[tuple[tuple[int, ...], tuple[int, ...]], ...]  # global (offsets, sizes), in local order
    start: int  # offset in the bucket's flat tensor
    numel: int


@dataclass(frozen=True)
class BucketLayout:
    chain: str  # "" or "chained_{i}."
    dp_group_idx: int
    gbuf: int
    dtype: str  # "(torch.float32, torch.float32)": (param dtype, grad dtype)
    bucket: int
    numel_unpadded: int
    numel: int  # padded: a multiple of the DP size
    dp_size: int
    coords: dict  # the model-parallel rank: tp/pp (dense) or etp/ep/pp (experts)
    params: tuple[ParamSlot, ...]

    def flat_key(self, state: str) -> str:
        return (f"{self.chain}optimizer.distributed.dp_group_idx_{self.dp_group_idx}.gbuf_idx_{self.gbuf}."
                f"dtype_{self.dtype}.bucket_idx_{self.bucket}.{state}")

    def to_dict(self) -> dict:
        return {"chain": self.chain, "dp_group_idx": self.dp_group_idx, "gbuf": self.gbuf, "dtype": self.dtype,
                "bucket": self.bucket, "numel_unpadded": self.numel_unpadded, "numel": self.numel,
                "dp_size": self.dp_size, "coords": dict(self.coords),
                "params": [{"key": p.key, "start": p.start, "numel": p.numel,
                            "blocks": [[list(o), list(s)] for o, s in p.blocks]} for p in self.params]}


@dataclass
class DistOptLayout:
    buckets: list[BucketLayout]
    states: tuple[str, ...]
    variants: dict[str, list[tuple[str, str]]]  # chain -> the (module spec, expert order) that fit
    #: per-parameter tensor (without the state) -> [(offsets, sizes, bucket, flat start)] of its blocks
    owners: dict[str, list[tuple[tuple[int, ...], tuple[int, ...], BucketLayout, int]]]
    shapes: dict[str, tuple[int, ...]]  # per-parameter tensor (without the state) -> global shape
    dtype: str  # of the flat buffers (float32)

    def tensor_name(self, chain: str, state: str, model_key: str) -> str:
        return f"{chain}optimizer.state.{state}.{model_key}"

    def tensor_infos(self) -> dict[str, TensorInfo]:
        out = {}
        for base, shape in self.shapes.items():
            chain, model_key = base.split("|", 1)
            for state in self.states:
                name = self.tensor_name(chain, state, model_key)
                out[name] = TensorInfo(name=name, shape=shape, dtype=self.dtype, group=OPTIMIZER, layout="virtual")
        return out


_STATE_NAME_RE = re.compile(r"^(?P<chain>(?:chained_\d+\.)?)optimizer\.state\.(?P<state>[^.]+)\.(?P<key>.+)$")


def build_layout(reader: "MegatronReader", summary: dict | None = None) -> DistOptLayout:
    """The bucket layout of a ``dp_reshardable`` checkpoint, from its metadata and small objects
    (no tensor data read); :class:`~ckptctl.errors.OptimizerLayoutError` when it cannot be established."""
    where = reader.store.url
    summary = summary if summary is not None else reader.summary(common=False)
    infos = reader.tensor_infos()
    flat: dict[tuple, dict[str, TensorInfo]] = {}
    for name, info in infos.items():
        m = DP_BUFFER_RE.match(name)
        if m:
            flat.setdefault((m["chain"], int(m["dpg"]), int(m["gbuf"]), m["dtype"], int(m["bucket"])),
                            {})[m["state"]] = info
    if not flat:
        raise _layout_error(where, "no dp_reshardable buffers")
    states = {frozenset(v) for v in flat.values()}
    if len(states) != 1:
        raise _layout_error(where, "the buckets do not all hold the same optimizer states")
    state_names = tuple(sorted(next(iter(states))))
    if "param" not in state_names:
        raise _layout_error(where, "no fp32 'param' state to check the mapping against the model weights")
    dtypes = {i.dtype for v in flat.values() for i in v.values()}
    if len(dtypes) != 1 or any(len(i.shape) != 1 for v in flat.values() for i in v.values()):
        raise _layout_error(where, f"flat buffers of dtypes {sorted(dtypes)} / not 1-D")
    par = summary.get("parallel") or {}
    tp, pp, dp = par.get("tp"), par.get("pp"), par.get("dp")
    if not (tp and pp and dp):
        raise _layout_error(where, "the source TP/PP/DP sizes cannot be told from the checkpoint")
    num_layers = (summary.get("model") or {}).get("num_layers")
    if not num_layers or num_layers % pp:
        raise _layout_error(where, f"{num_layers} layers over PP={pp}")
    params = {k: i for k, i in infos.items() if i.group == MODEL and not k.endswith(NON_PARAM_SUFFIXES)}
    model = _ModelParams(where, params, tp=tp, pp=pp, num_layers=num_layers)
    experts_present = any(model.is_expert(k) for k in params)
    ep, etp = (par.get("ep"), par.get("etp")) if experts_present else (1, tp)
    if not (ep and etp):
        raise _layout_error(where, "the source EP/ETP sizes cannot be told from the checkpoint")

    chains = sorted({k[0] for k in flat})
    if chains == ["chained_0.", "chained_1."] and experts_present:
        groups = {"chained_0.": "dense", "chained_1.": "experts"}
    elif len(chains) == 1 and (not experts_present or ep == 1):
        if experts_present and etp != tp:
            raise _layout_error(where, f"experts in the dense optimizer with ETP {etp} != TP {tp}")
        groups = {chains[0]: "all"}
    else:
        raise _layout_error(where, f"optimizer chain {chains} for a {'MoE' if experts_present else 'dense'} "
                            f"model with EP={ep} (only dense+experts chains are known)")

    buckets: list[BucketLayout] = []
    variants: dict[str, list[tuple[str, str]]] = {}
    for chain, which in groups.items():
        n_mp = etp * ep * pp if which == "experts" else tp * pp
        dp_size = (tp * dp) // (etp * ep) if which == "experts" else dp
        dpgs = sorted({k[1] for k in flat if k[0] == chain})
        if dpgs != list(range(n_mp)):
            raise _layout_error(where, f"{chain or ''}dp_group_idx {dpgs}, expected 0..{n_mp - 1} for "
                                f"TP={tp} PP={pp}" + (f" EP={ep} ETP={etp}" if which == "experts" else ""))
        facts = {dpg: _bucket_facts(reader, flat, chain, dpg, dp_size) for dpg in dpgs}
        fits: dict[tuple[str, str], list[BucketLayout]] = {}
        errors: list[str] = []
        for variant in [(s, e) for s in SPECS for e in EXPERT_ORDERS]:
            try:
                fits[variant] = [b for dpg in dpgs for b in _place_rank(
                    flat, facts[dpg], chain, dpg, which, model, variant, tp=tp, ep=ep, etp=etp, dp_size=dp_size)]
            except _Mismatch as exc:
                errors.append(f"{variant[0]} spec, {variant[1]} experts: {exc}")
        if not fits:
            raise _layout_error(where, f"no known parameter order fits the {chain or ''}buffers ({errors[0]})")
        distinct = {tuple(b.params for b in v) for v in fits.values()}
        if len(distinct) != 1:
            raise _layout_error(where, f"several parameter orders fit the {chain or ''}buffers "
                                f"({', '.join('/'.join(v) for v in fits)}): ambiguous")
        variants[chain] = list(fits)
        buckets += next(iter(fits.values()))

    owners, shapes = _owners(where, buckets, params)
    return DistOptLayout(buckets, state_names, variants, owners, shapes, dtypes.pop())


class _Mismatch(Exception):
    pass


class _ModelParams:
    """The model's parameters and how each is split over TP / experts over EP x ETP."""

    def __init__(self, where: str, params: dict[str, TensorInfo], *, tp: int, pp: int, num_layers: int):
        self.where, self.params, self.tp, self.pp, self.num_layers = where, params, tp, pp, num_layers
        self._kinds: dict[str, str] = {}
        # per stage: embedding keys, {layer: [keys]}, final keys
        self.layer_keys: dict[int, list[str]] = {}
        self.first: list[str] = []
        self.last: list[str] = []
        for key in params:
            layout, layer, suffix = layer_and_suffix(key)
            if layout == "stacked":
                if params[key].shape[:1] != (num_layers,):
                    raise _layout_error(where, f"{key}: leading axis {params[key].shape[:1]} != {num_layers}")
                for i in range(num_layers):
                    self.layer_keys.setdefault(i, []).append(key)
            elif layout == "per_layer":
                self.layer_keys.setdefault(layer, []).append(key)
            elif key.startswith("embedding."):
                self.first.append(key)
            elif key.startswith(("decoder.final_layernorm.", "decoder.final_norm.", "output_layer.")):
                self.last.append(key)
            else:
                raise _layout_error(where, f"{key}: no known place in megatron's parameter order")
        self.first.sort(key=lambda k: (0 if "word_embeddings" in k else 1, _param_rank(k)))
        self.last.sort(key=lambda k: (1 if k.startswith("output_layer.") else 0, _param_rank(k)))
        self.tied = "output_layer.weight" not in params and "embedding.word_embeddings.weight" in params

    @staticmethod
    def is_expert(key: str) -> bool:
        return layer_and_suffix(key)[2] in EXPERT_SPLIT

    def kind(self, key: str) -> str:
        if key not in self._kinds:
            info = self.params[key]
            layered = layer_and_suffix(key)[0] == "stacked"
            kind = EXPERT_SPLIT.get(layer_and_suffix(key)[2]) or split_kind(key)
            if kind is None:
                raise _layout_error(self.where, f"{key}: unknown tensor-parallel split")
            if kind != REPLICATED and not self.is_expert(key):
                try:
                    kind = check_source_split(info, kind, self.tp, layered)
                except CkptctlError as exc:
                    raise _layout_error(self.where, str(exc)) from None
            self._kinds[key] = kind
        return self._kinds[key]

    def blocks(self, key: str, layer: int | None, tp_rank: int) -> tuple:
        """The global blocks of ``key`` (at ``layer`` for stacked keys) that TP rank ``tp_rank`` holds."""
        info = self.params[key]
        stacked = layer_and_suffix(key)[0] == "stacked"
        shape = info.shape[1:] if stacked else info.shape
        kind = self.kind(key)
        out = []
        for r, off, size in tp_blocks(kind, tuple(shape), self.tp, key=key):
            if r == tp_rank or kind == REPLICATED:
                out.append(((layer, *off), (1, *size)) if stacked else (off, size))
        return tuple(out)

    def expert_blocks(self, key: str, layer: int | None, expert: int, etp: int, etp_rank: int) -> tuple:
        info = self.params[key]
        stacked = layer_and_suffix(key)[0] == "stacked"
        shape = info.shape[2:] if stacked else info.shape[1:]
        out = []
        for r, off, size in tp_blocks(self.kind(key), tuple(shape), etp, key=key):
            if r == etp_rank:
                out.append(((layer, expert, *off), (1, 1, *size)) if stacked else ((expert, *off), (1, *size)))
        return tuple(out)

    def num_experts(self, key: str) -> int:
        stacked = layer_and_suffix(key)[0] == "stacked"
        return self.params[key].shape[1 if stacked else 0]


def _param_rank(key: str) -> int:
    return _PARAM_ORDER.get(key.rsplit(".", 1)[-1], 9)


def _layer_position(suffix: str, spec: str) -> tuple[int, int]:
    if spec == "local":
        for prefix, pos in _LOCAL_SPEC_NORMS.items():
            if suffix.startswith(prefix):
                return pos, _param_rank(suffix)
    best = max(((p, pos) for p, pos in _LAYER_MODULES if suffix.startswith(p)), key=lambda x: len(x[0]),
               default=None)
    if best is None:
        raise _Mismatch(f"layer parameter {suffix!r} has no known place in megatron's parameter order")
    return best[1], _param_rank(suffix)


def _registration_order(model: _ModelParams, which: str, coords: dict, variant: tuple[str, str], *,
                        ep: int, etp: int) -> list[tuple[str, tuple]]:
    """(model key, global blocks) of the params of one model-parallel rank, in registration order."""
    spec, expert_order = variant
    pp_rank = coords["pp"]
    tp_rank = coords.get("tp", 0)
    per_stage = model.num_layers // model.pp
    out: list[tuple[str, tuple]] = []
    dense = which in ("dense", "all")
    if pp_rank == 0 and dense:
        out += [(k, model.blocks(k, None, tp_rank)) for k in model.first]
    for layer in range(pp_rank * per_stage, (pp_rank + 1) * per_stage):
        keys = model.layer_keys.get(layer, [])
        experts = [k for k in keys if model.is_expert(k)]
        entries: list[tuple[tuple[int, int], list]] = []
        for k in keys:
            if model.is_expert(k):
                continue
            if dense:
                stacked = layer_and_suffix(k)[0] == "stacked"
                entries.append((_layer_position(layer_and_suffix(k)[2], spec),
                                [(k, model.blocks(k, layer if stacked else None, tp_rank))]))
        if experts and which in ("experts", "all"):
            ep_rank, etp_rank = coords.get("ep", 0), coords.get("etp", tp_rank)
            fc = sorted(experts, key=lambda k: (0 if "linear_fc1" in k else 1, _param_rank(k)))
            n_local = model.num_experts(fc[0]) // ep
            local = [(j, ep_rank * n_local + j) for j in range(n_local)]

            def one(k, e):
                stacked = layer_and_suffix(k)[0] == "stacked"
                return k, model.expert_blocks(k, layer if stacked else None, e, etp, etp_rank)

            if expert_order == "grouped":
                seq = [one(k, e) for k in fc for _, e in local]
            else:
                seq = [one(k, e) for _, e in local for k in fc]
            entries.append(((120, 0), seq))
        entries.sort(key=lambda x: x[0])
        for _, seq in entries:
            out += seq
    if pp_rank == model.pp - 1 and dense:
        out += [(k, model.blocks(k, None, tp_rank)) for k in model.last]
        if model.tied and model.pp > 1:  # the last stage's own copy of the tied output weight
            out.append(("embedding.word_embeddings.weight", model.blocks("embedding.word_embeddings.weight", None,
                                                                         tp_rank)))
    return out


def _numel(blocks: Iterable[tuple[tuple[int, ...], tuple[int, ...]]]) -> int:
    return sum(math.prod(s) for _, s in blocks)


def _bucket_sizes(reader, chain: str, dpg: int, what: str) -> list[dict[str, list[int]]]:
    name = f"{chain}optimizer.distributed.dp_group_idx_{dpg}.{what}/shard_0_1"
    try:
        return bucket_numels(reader.read_object(name))
    except CkptctlError as exc:
        raise _Mismatch(f"no readable {name} ({exc})") from None
    except ValueError as exc:
        raise _Mismatch(f"{name}: {exc}") from None


def _bucket_facts(reader, flat: dict, chain: str, dpg: int, dp_size: int) -> dict[tuple[int, str], list]:
    """Per grad buffer (index, dtype) of ``dp_group_idx`` ``dpg``: its buckets' (unpadded, padded)
    sizes from the ``per_bucket_numel(_unpadded)`` objects, checked against the saved flat
    tensors and megatron's bucket padding; raises the layout error (whatever the param order)."""
    where = reader.store.url
    try:
        numel = _bucket_sizes(reader, chain, dpg, "per_bucket_numel")
        unpadded = _bucket_sizes(reader, chain, dpg, "per_bucket_numel_unpadded")
    except _Mismatch as exc:
        raise _layout_error(where, str(exc)) from None
    gbufs = sorted({(k[2], k[3]) for k in flat if k[0] == chain and k[1] == dpg})
    if [g for g, _ in gbufs] != list(range(len(gbufs))) or len(numel) != len(gbufs) or len(unpadded) != len(gbufs):
        raise _layout_error(where, f"{chain}dp_group_idx {dpg}: grad buffers {[g for g, _ in gbufs]} saved, "
                            f"per_bucket_numel lists {len(numel)}")
    out = {}
    for g, dtype in gbufs:
        sizes_u, sizes_p = unpadded[g].get(dtype), numel[g].get(dtype)
        if sizes_u is None or sizes_p is None or len(sizes_u) != len(sizes_p):
            raise _layout_error(where, f"{chain}dp_group_idx {dpg}: per_bucket_numel has no {dtype} entry for "
                                f"gbuf {g}")
        saved = sorted(k[4] for k in flat if k[:4] == (chain, dpg, g, dtype))
        if saved != list(range(len(sizes_u))):
            raise _layout_error(where, f"{chain}dp_group_idx {dpg} gbuf {g}: buckets {saved} saved, "
                                f"per_bucket_numel lists {len(sizes_u)}")
        for b, (u, n) in enumerate(zip(sizes_u, sizes_p)):
            for state, info in flat[(chain, dpg, g, dtype, b)].items():
                if info.shape != (u,):
                    raise _layout_error(where, f"{info.name} holds {info.shape[0]} elements, "
                                        f"per_bucket_numel_unpadded says {u}")
            # megatron pads a bucket to lcm(DP, 128) (x 2**16 with pad_buckets_for_high_nccl_busbw)
            padded = {-(-u // m) * m for m in (math.lcm(dp_size, 128), math.lcm(dp_size, 128, 1 << 16))}
            if n not in padded:
                raise _layout_error(where, f"{chain}dp_group_idx {dpg} gbuf {g} bucket {b}: per_bucket_numel "
                                    f"says {n}, megatron pads {u} elements over DP {dp_size} to "
                                    f"{' or '.join(map(str, sorted(padded)))}")
        out[(g, dtype)] = list(zip(sizes_u, sizes_p))
    return out


def _place_rank(flat: dict, facts: dict, chain: str, dpg: int, which: str, model: _ModelParams,
                variant: tuple[str, str], *, tp: int, ep: int, etp: int, dp_size: int) -> list[BucketLayout]:
    """The buckets of ``dp_group_idx`` ``dpg`` under ``variant``; :class:`_Mismatch` when the
    predicted layout is not exactly the checkpoint's chunk structure."""
    if which == "experts":
        coords = {"etp": dpg % etp, "ep": (dpg // etp) % ep, "pp": dpg // (etp * ep)}
    else:
        coords = {"tp": dpg % tp, "pp": dpg // tp}
        if which == "all":
            coords["etp"] = coords["tp"]
    order = _registration_order(model, which, coords, variant, ep=ep, etp=etp)
    # params go to the grad buffer of their dtype (megatron: one buffer per (param, grad) dtype)
    by_dtype: dict[str, list] = {}
    for key, blocks in order:
        by_dtype.setdefault(model.params[key].dtype, []).append((key, blocks))
    out: list[BucketLayout] = []
    for (g, dtype), sizes in facts.items():
        param_dtype = dtype.strip("()").split(",")[0].strip().replace("torch.", "")
        params = by_dtype.pop(param_dtype, [])
        sizes_u, sizes_p = [u for u, _ in sizes], [n for _, n in sizes]
        slots: list[list[ParamSlot]] = [[] for _ in sizes_u]
        b, pos = 0, 0
        for key, blocks in reversed(params):  # reverse registration order, as megatron fills the buffer
            if b >= len(sizes_u):
                raise _Mismatch(f"dp_group_idx {dpg}: more parameters than the buckets hold")
            start = -(-pos // PARAM_ALIGN) * PARAM_ALIGN
            n = _numel(blocks)
            slots[b].append(ParamSlot(key, blocks, start, n))
            pos = start + n
            if pos > sizes_u[b]:
                raise _Mismatch(f"dp_group_idx {dpg} gbuf {g} bucket {b}: {key} ends at {pos}, beyond the bucket's "
                                f"{sizes_u[b]} elements")
            if pos == sizes_u[b]:
                b, pos = b + 1, 0
        if b != len(sizes_u) or pos:
            raise _Mismatch(f"dp_group_idx {dpg} gbuf {g}: the parameters fill {b} of {len(sizes_u)} buckets")
        for i, (u, p) in enumerate(zip(sizes_u, sizes_p)):
            bucket = BucketLayout(chain, dpg, g, dtype, i, u, p, dp_size, coords, tuple(slots[i]))
            _check_chunks(bucket, flat[(chain, dpg, g, dtype, i)])
            out.append(bucket)
    if any(by_dtype.values()):
        raise _Mismatch(f"dp_group_idx {dpg}: parameters of dtype {sorted(by_dtype)} have no grad buffer")
    return out


def _check_chunks(bucket: BucketLayout, states: dict[str, TensorInfo]) -> None:
    """The DCP chunks megatron saves for ``bucket``: each DP rank's part of each param and of each
    gap between params, up to the unpadded size; they must be exactly the saved chunks."""
    if bucket.numel % bucket.dp_size or bucket.numel < bucket.numel_unpadded:
        raise _Mismatch(f"bucket {bucket.flat_key('*')}: padded size {bucket.numel} is not a multiple of "
                        f"DP {bucket.dp_size} at least {bucket.numel_unpadded}")
    shard = bucket.numel // bucket.dp_size
    spans, pos = [], 0
    for p in bucket.params:
        if p.start > pos:
            spans.append((pos, p.start))
        spans.append((p.start, p.start + p.numel))
        pos = p.start + p.numel
    want = set()
    for lo, hi in spans:
        while lo < hi:
            cut = min(hi, (lo // shard + 1) * shard)
            want.add(((lo,), (cut - lo,)))
            lo = cut
    for state, info in states.items():
        if info.shape != (bucket.numel_unpadded,):
            raise _Mismatch(f"{info.name}: {info.shape[0]} elements, per_bucket_numel_unpadded says "
                            f"{bucket.numel_unpadded}")
        got = {(tuple(pc.offsets), tuple(pc.sizes)) for pc in info.pieces}
        if got != want:
            diff = sorted(got ^ want)[:3]
            raise _Mismatch(f"{info.name}: chunks {[(o[0], s[0]) for o, s in diff]} are not where the parameters "
                            "would be")


def _owners(where: str, buckets: list[BucketLayout], params: dict[str, TensorInfo]):
    """For every (chain, model key): which bucket span holds each of its blocks (the copy of the
    lowest dp_group_idx where several model-parallel ranks hold the same block: TP rank 0, as
    megatron's ``fully_reshardable`` saves the main replica)."""
    found: dict[str, dict[tuple, tuple]] = {}
    for b in buckets:
        for p in b.params:
            offset = p.start
            for off, size in p.blocks:
                base = f"{b.chain}|{p.key}"
                cur = found.setdefault(base, {}).get((off, size))
                if cur is None or b.dp_group_idx < cur[2].dp_group_idx:
                    found[base][(off, size)] = (off, size, b, offset)
                offset += math.prod(size)
    owners, shapes = {}, {}
    for base, blocks in found.items():
        key = base.split("|", 1)[1]
        shape = tuple(params[key].shape)
        if sum(math.prod(s) for _, s in blocks) != math.prod(shape):
            raise _layout_error(where, f"the buffers cover {sum(math.prod(s) for _, s in blocks)} of the "
                                f"{math.prod(shape)} elements of {key}")
        owners[base] = sorted(blocks.values(), key=lambda x: x[0])
        shapes[base] = shape
    return owners, shapes


class DistOptReader:
    """A :class:`~ckptctl.formats.megatron.MegatronReader` (everything is delegated to it) that
    can also present its ``dp_reshardable`` optimizer state as per-parameter tensors
    (:meth:`per_parameter_state`), readable by name through :meth:`read_region` /
    :meth:`read_tensor` like stored ones. ``check_params``: reading the ``param`` state compares
    it with the model weights (a mismatch raises :class:`~ckptctl.errors.OptimizerLayoutError`)."""

    def __init__(self, reader: "MegatronReader", *, check_params: bool = True):
        self._reader = reader
        self.check_params = check_params
        self._layout: DistOptLayout | None = None
        self._virtual: dict[str, TensorInfo] = {}
        self._flattened: FlattenedState | None = None  # fully_sharded_model_space state instead of buckets

    def __getattr__(self, name: str) -> Any:
        return getattr(self._reader, name)

    @property
    def base(self) -> "MegatronReader":
        return self._reader

    def layout(self, summary: dict | None = None) -> DistOptLayout:
        if self._layout is None:
            self._layout = build_layout(self._reader, summary)
            self._virtual = self._layout.tensor_infos()
        return self._layout

    def per_parameter_state(self, summary: dict | None = None) -> dict[str, TensorInfo]:
        """``[chained_i.]optimizer.state.<state>.<model key>`` -> its TensorInfo (no pieces: virtual).
        ``dp_reshardable`` buckets are mapped by :meth:`layout`; ``fully_sharded_model_space``'s
        N-D flattened pieces by :class:`~ckptctl.formats.flattened.FlattenedState`."""
        if is_flattened_state(self._reader.tensor_infos()):
            if self._flattened is None:
                self._flattened = FlattenedState(self._reader)
                self._virtual = self._flattened.tensor_infos()
            return dict(self._virtual)
        self.layout(summary)
        return dict(self._virtual)

    def optimizer_objects(self) -> dict[str, Any]:
        """Per chain prefix, the optimizer's non-tensor state (``{'param_groups': [...]}``, with the
        step) that ``dp_reshardable`` saves per model-parallel rank (dp_group_idx 0's copy), and
        the grad scaler's when there is one: what ``fully_reshardable`` keeps in ``common.pt``."""
        out: dict[str, Any] = {}
        for o in self._reader.objects():
            m = DP_OBJECT_RE.match(o.key)
            if m and m["dpg"] == "0" and m["what"] in ("optimizer", "grad_scaler"):
                obj = self._reader.read_object(o.name)
                if isinstance(obj, list) and len(obj) == 1:
                    obj = obj[0]
                out.setdefault(m["chain"], {})[m["what"]] = obj
        return out

    def _bucket_spans(self, chain: str, key: str, state: str, offsets: tuple[int, ...], sizes: tuple[int, ...]):
        """Per bucket overlapping block ``[offsets, offsets + sizes)`` of ``key``'s ``state``: the
        block's corners ``lo``/``hi`` in it, the param's row-major strides, and the flat span
        (flat key, first element, element count) that holds them: one ranged read each."""
        for boff, bsize, bucket, start in self._layout.owners[f"{chain}|{key}"]:
            lo = tuple(max(a, b) for a, b in zip(boff, offsets))
            hi = tuple(min(a + s, b + t) for a, s, b, t in zip(boff, bsize, offsets, sizes))
            if any(a >= b for a, b in zip(lo, hi)):
                continue
            strides = [1] * len(bsize)
            for d in range(len(bsize) - 2, -1, -1):
                strides[d] = strides[d + 1] * bsize[d + 1]
            first = sum((a - o) * st for a, o, st in zip(lo, boff, strides))
            last = sum((b - 1 - o) * st for b, o, st in zip(hi, boff, strides))
            yield boff, lo, hi, tuple(strides), (bucket.flat_key(state), start + first, last - first + 1)

    def _stored_reads(self, name: str, offsets: tuple[int, ...], sizes: tuple[int, ...]) -> list[tuple]:
        """The stored regions ``(name, offsets, sizes)`` that :meth:`read_region` of virtual
        tensor ``name`` reads, in its order (the model weights last, when they are checked)."""
        m = _STATE_NAME_RE.match(name)
        if self._flattened is not None:
            reads = self._flattened.stored_reads(name, offsets, sizes)
        else:
            reads = [(flat, (first,), (count,))
                     for *_, (flat, first, count) in self._bucket_spans(m["chain"], m["key"], m["state"],
                                                                        offsets, sizes)]
        if m["state"] == "param" and self.check_params:
            reads.append((m["key"], offsets, sizes))
        return reads

    def planned_reads(self, reads: Iterable[Any]) -> list[tuple[str, int, int]]:
        """:meth:`MegatronReader.planned_reads`, mapped optimizer state included: a read of a
        virtual tensor is planned as the reads of the buffers (or pieces) that hold it."""
        stored: list[Any] = []
        for asked in reads:
            name, *how = (asked,) if isinstance(asked, str) else asked
            info = self._virtual.get(name)
            if info is None:
                stored.append(asked)
                continue
            if len(how) == 2:
                offsets, sizes = tuple(int(o) for o in how[0]), tuple(int(s) for s in how[1])
            else:
                offsets, sizes = _block(tuple(info.shape), how[0] if how else None)
            stored += self._stored_reads(name, offsets, sizes)
        return self._reader.planned_reads(stored)

    def read_region(self, name: str, offsets: Iterable[int], sizes: Iterable[int]) -> "torch.Tensor":
        if name not in self._virtual:
            return self._reader.read_region(name, offsets, sizes)
        import torch

        offsets, sizes = tuple(int(o) for o in offsets), tuple(int(s) for s in sizes)
        m = _STATE_NAME_RE.match(name)
        chain, state, key = m["chain"], m["state"], m["key"]
        if self._flattened is not None:
            out = self._flattened.read_region(name, offsets, sizes)
            if state == "param" and self.check_params:
                self._check_against_model(name, key, offsets, sizes, out)
            return out
        out = torch.empty(sizes, dtype=getattr(torch, self._layout.dtype))
        covered = 0
        for boff, lo, hi, strides, (flat, first, count) in self._bucket_spans(chain, key, state, offsets, sizes):
            span = self._reader.read_region(flat, (first,), (count,))
            part = span.as_strided(tuple(b - a for a, b in zip(lo, hi)), strides, 0)
            out[tuple(slice(a - o, b - o) for a, b, o in zip(lo, hi, offsets))] = part
            covered += part.numel()
        if covered != out.numel():
            raise _layout_error(self._reader.store.url, f"{name}: the buffers cover {covered} of {out.numel()} "
                                f"elements of block {list(offsets)}+{list(sizes)}")
        if state == "param" and self.check_params:
            self._check_against_model(name, key, offsets, sizes, out)
        return out

    def _check_against_model(self, name, key, offsets, sizes, values) -> None:
        weights = self._reader.read_region(key, offsets, sizes)
        rounded = values.to(weights.dtype)
        same = (rounded == weights) | (rounded.isnan() & weights.isnan())
        if not bool(same.all()):
            bad = int((~same).sum())
            raise _layout_error(self._reader.store.url, f"the 'param' state mapped to {key} differs from the "
                                f"model weights in {bad} of {weights.numel()} elements of block "
                                f"{list(offsets)}+{list(sizes)} (layout rules of another megatron-core version, "
                                f"or state and weights from different steps)")

    def read_tensor(self, name: str, index: int | None = None) -> "torch.Tensor":
        if name not in self._virtual:
            return self._reader.read_tensor(name, index) if index is not None else self._reader.read_tensor(name)
        out = self.read_region(name, *_block(tuple(self._virtual[name].shape), index))
        return out if index is None else out[0]


def _block(shape: tuple[int, ...], index: int | None) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """(offsets, sizes) of a whole tensor of ``shape`` (``index`` None) or of its row ``index``."""
    if index is None:
        return (0,) * len(shape), shape
    return (int(index), *(0,) * (len(shape) - 1)), (1, *shape[1:])


def fully_reshardable_common(reader: "DistOptReader | MegatronReader", *, chained: bool | None = None) -> bytes:
    """The source's ``common.pt`` as megatron's ``fully_reshardable`` save writes it: each
    optimizer's ``param_state_sharding_type`` says ``fully_reshardable`` and carries that optimizer's
    non-tensor state (``{'optimizer': {'param_groups': [...]}}`` with the step, and the grad
    scaler's), which ``dp_reshardable`` keeps as per-rank objects; everything else unchanged.
    ``chained``: the optimizer structure of the target (MoE: megatron-core chains a dense and an
    expert optimizer only when experts are expert-parallel, EP > 1), see :func:`rechain_record`;
    None keeps the source's. ``torch.save`` bytes; refuses a ``common.pt`` holding anything but
    plain data."""
    import io

    import torch

    base = reader.base if isinstance(reader, DistOptReader) else reader
    where = base.store.url_of(base.prefix + "common.pt")
    common = base.read_common()
    if not isinstance(common, dict) or not isinstance(common.get("optimizer"), dict):
        raise _record_error(where, "no optimizer record to rewrite (missing or not a dict)")
    _check_plain(common, where)
    parts = _record_parts(common["optimizer"], where)
    if any(part.get("param_state_sharding_type") == "dp_reshardable" for part in parts.values()):
        objects = DistOptReader(base).optimizer_objects()
        if sorted(parts) != sorted(objects):
            raise _record_error(where, f"optimizer record for {sorted(parts)}, optimizer objects for "
                                f"{sorted(objects)}")
    for chain, part in parts.items():
        fmt = part.get("param_state_sharding_type")
        if fmt in ("fully_reshardable", "fully_sharded_model_space"):
            if not isinstance(part.get("optimizer"), dict):
                raise _record_error(where, f"{chain or 'the'} optimizer's record has no param_groups")
            # fully_sharded_model_space also keeps each param's inner 'step' under its index in
            # param_state, which fully_reshardable does not have (the step is the param groups')
            inner = {repr(_plain_number(v.get("step"))) for v in (part.pop("param_state", None) or {}).values()
                     if isinstance(v, dict) and "step" in v}
            groups = {repr(_plain_number(g.get("step"))) for g in part["optimizer"].get("param_groups") or ()}
            if inner and inner != groups:
                raise _record_error(where, f"per-parameter steps {sorted(inner)} differ from the param groups' "
                                    f"{sorted(groups)}")
            part["param_state_sharding_type"] = "fully_reshardable"
            continue
        if fmt != "dp_reshardable":
            raise _record_error(where, f"{chain or 'the'} optimizer is {fmt!r}")
        state = objects[chain]
        if "optimizer" not in state:
            raise _record_error(where, f"no {chain}optimizer.distributed.dp_group_idx_0.optimizer object")
        _check_plain(state, where)
        part.update(state)
        part["param_state_sharding_type"] = "fully_reshardable"
    if chained is not None:
        common["optimizer"] = rechain_record(parts, chained, where)
    buf = io.BytesIO()
    torch.save(common, buf)
    return buf.getvalue()


def _record_parts(record: dict, where: str) -> dict[str, dict]:
    """common.pt's optimizer record per chain prefix: ``{"": record}`` for one optimizer,
    ``{"chained_{i}.": record[i]}`` for a ChainedOptimizer's ``{0: ..., 1: ...}``."""
    if "param_state_sharding_type" in record:
        return {"": record}
    if record and all(isinstance(k, int) and isinstance(v, dict) for k, v in record.items()):
        return {f"chained_{k}.": v for k, v in sorted(record.items())}
    raise _record_error(where, f"optimizer record with keys {sorted(map(str, record))[:6]}")


#: megatron-core's ``param_group_identifier_keys`` (optimizer.py): how its load matches each of
#: the optimizer's param groups to a saved one (the saved group's hyperparameters are then used)
GROUP_IDENTITY = ("wd_mult", "lr_mult", "is_expert_parallel", "is_decoupled_lr")


def _group_field(group: dict, key: str) -> str:
    """The name ``key`` has in ``group`` (NeMo saves ``pre_lr_mult`` / ``pre_wd_mult``)."""
    return key if key in group or f"pre_{key}" not in group else f"pre_{key}"


def rechain_record(parts: dict[str, dict], chained: bool, where: str) -> dict:
    """The fully_reshardable optimizer record for the target's optimizer structure, from the
    source's ``parts`` (:func:`_record_parts`). megatron-core 0.16 (``get_megatron_optimizer``)
    builds one optimizer for the params with ``allreduce`` True and a second one for the
    expert-parallel ones (EP > 1), a ChainedOptimizer saved as ``{0: dense, 1: experts}``; at
    EP 1 expert params are not expert-parallel and there is ONE optimizer, saved unchained. Its
    load (``DistributedOptimizer.load_state_dict``) takes, for each of its param groups, the
    saved group with the same :data:`GROUP_IDENTITY`, hyperparameters and ``step`` included:

    * chained -> one: each group with ``is_expert_parallel`` False; groups that then have the
      same identity must be identical (else they cannot be represented: refused, naming
      ``--drop-optimizer``), and so must the optimizers' other fields (grad scaler);
    * one -> chained: the dense optimizer keeps the groups, the expert one gets each of them
      with ``is_expert_parallel`` True (which of them holds expert params is not recorded: the
      load uses those it needs).
    """
    import copy

    is_chain = sorted(parts) != [""]
    if chained == is_chain:
        return parts[""] if not is_chain else {int(k[len("chained_"):-1]): v for k, v in parts.items()}
    if chained:
        dense, experts = parts[""], copy.deepcopy(parts[""])
        for group in experts["optimizer"]["param_groups"]:
            group[_group_field(group, "is_expert_parallel")] = True
        return {0: dense, 1: experts}
    if sorted(parts) != ["chained_0.", "chained_1."]:
        raise _record_error(where, f"optimizers {sorted(parts)}, expected a dense and an expert one to merge")
    first, *others = (parts[k] for k in sorted(parts))
    for other in others:
        for key in set(first) | set(other):
            if key != "optimizer" and not _same(first.get(key), other.get(key)):
                raise _record_error(where, f"the dense and the expert optimizers differ in {key!r}, which one "
                                    "optimizer at EP 1 cannot hold")
        for key in set(first["optimizer"]) | set(other["optimizer"]):
            if key != "param_groups" and not _same(first["optimizer"].get(key), other["optimizer"].get(key)):
                raise _record_error(where, f"the dense and the expert optimizers differ in {key!r}, which one "
                                    "optimizer at EP 1 cannot hold")
    merged: dict[tuple, dict] = {}
    for part in (first, *others):
        for group in part["optimizer"]["param_groups"]:
            group = dict(group)
            group[_group_field(group, "is_expert_parallel")] = False
            identity = tuple(group.get(_group_field(group, k)) for k in GROUP_IDENTITY)
            have = merged.setdefault(identity, group)
            if have is not group and not _same(have, group):
                differ = sorted(k for k in set(have) | set(group) if not _same(have.get(k), group.get(k)))
                raise _record_error(where, "at EP 1 the expert params join the dense optimizer's param group "
                                    f"{dict(zip(GROUP_IDENTITY, identity))}, but the expert group differs from "
                                    f"the dense one in {', '.join(differ)}")
    steps = {repr(_plain_number(g.get("step"))) for g in merged.values()}
    if len(steps) > 1:
        raise _record_error(where, f"the optimizers are at different steps {sorted(steps)}")
    out = copy.deepcopy(first)
    out["optimizer"]["param_groups"] = list(merged.values())
    return out


def _plain_number(v: Any) -> Any:
    item = getattr(v, "item", None)
    return item() if callable(item) and getattr(v, "numel", lambda: 0)() == 1 else v


def _same(a: Any, b: Any) -> bool:
    """Equality of plain checkpoint data (tensors compared by value)."""
    import torch

    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        return isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) and a.dtype == b.dtype and \
            a.shape == b.shape and bool(torch.equal(a, b))
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return type(a) is type(b) and len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    numbers = (int, float)
    if isinstance(a, numbers) and isinstance(b, numbers) and not isinstance(a, bool) and not isinstance(b, bool):
        return a == b  # a step saved as 2 by one optimizer and 2.0 by another
    return type(a) is type(b) and a == b


def _check_plain(obj: Any, where: str, depth: int = 0) -> None:
    """Only builtin containers, scalars, strings, dtypes, plain tensors and numpy arrays: what can be re-saved
    without writing ckptctl's stand-ins for objects it keeps as data."""
    import torch

    if depth > 32:
        raise _record_error(where, "nested too deeply to rewrite")
    if isinstance(obj, dict):
        for k, v in obj.items():
            _check_plain(k, where, depth + 1)
            _check_plain(v, where, depth + 1)
    elif isinstance(obj, (list, tuple, set, frozenset)):
        for v in obj:
            _check_plain(v, where, depth + 1)
    elif type(obj) is torch.Tensor or isinstance(obj, torch.dtype) or obj is None or \
            type(obj) in (str, bytes, int, float, bool, complex):
        return
    elif type(obj).__module__ == "numpy" and type(obj).__name__ == "ndarray" and not obj.dtype.hasobject:
        return  # megatron's numpy RNG state (a real array: safe_load rebuilds numpy arrays)
    else:
        raise _record_error(where, f"holds a {type(obj).__module__}.{type(obj).__qualname__}, which ckptctl "
                            "cannot re-save")


__all__ = ["BucketLayout", "DistOptLayout", "DistOptReader", "GROUP_IDENTITY", "ParamSlot", "annotate_buckets",
           "build_layout", "fully_reshardable_common", "rechain_record", "slot_facts"]
