"""Megatron-core GPT checkpoint tensors -> Hugging Face tensors: a table-driven, streamable plan.

The input is what a Megatron reader knows WITHOUT reading tensor data: the HF ``config.json``
dict (SkyRL's ``policy/huggingface/config.json``) and the mcore tensor names with their GLOBAL
shapes (already reassembled from TP/PP chunks).  :func:`build_plan` returns a
:class:`ConversionPlan`: an ordered list of :class:`PlanStep`, each naming the mcore
:class:`Source` tensors it needs, the HF :class:`Output` tensors it produces, and a pure
``transform(*source_tensors) -> tuple_of_output_tensors``.  A caller streams::

    plan = build_plan(config, {name: info.shape for name, info in reader.tensor_infos().items()})
    for step in plan.steps:
        inputs = [read(src) for src in step.sources]   # read ONLY these (one layer slice each)
        for out, tensor in zip(step.outputs, step.transform(*inputs)):
            write(out.name, tensor)
        del inputs                                      # free before the next step

so peak memory stays near the largest single source (a stacked ``decoder.layers.*`` tensor is
never needed whole: its sources carry a layer index, see :class:`Source`).
:meth:`ConversionPlan.iter_tensors` does exactly this loop given a ``read(Source)`` callable.

Megatron layouts handled (stack-notes.md, "megatron-core"):

- stacked keys ``decoder.layers.<name>`` with a leading ``num_layers`` axis, or per-layer keys
  ``decoder.layers.{i}.<name>`` (both may be mixed);
- ``linear_qkv`` interleaved per query group: for each of ``num_kv_heads`` groups,
  ``[q heads of the group; k_g; v_g]`` rows of ``head_dim`` (``config.head_dim``, else
  ``hidden_size // num_attention_heads``; the same for ``linear_qkv.bias``);
- ``linear_fc1`` = ``[gate; up]`` on dim 0 (the global tensor, after the swiglu factory's TP
  pieces are reassembled);
- vocabulary rows padded by Megatron (``embedding.word_embeddings``, ``output_layer``) are cut
  back to ``config.vocab_size``;
- TE-fused norm names (``linear_qkv.layer_norm_weight``, ``linear_fc1.layer_norm_weight``) and the
  non-fused ones (``input_layernorm.weight``, ``pre_mlp_layernorm.weight``);
- ``*._extra_state`` keys are skipped, ``optimizer.*`` / ``rng_state*`` keys are not model weights
  and are ignored.

Mixture of experts (Qwen3-MoE, Mixtral, the DeepSeek-V3 family with multi-latent attention):
routed experts ``mlp.experts.experts.linear_fc{1,2}.weight`` (``[E, 2F, H]`` / ``[E, H, F]`` per
layer, global expert order whatever the EP layout) become one HF tensor per expert, each read alone
(:class:`Source` ``expert``/``rows``: one expert's gate or up half); router, expert bias, shared
experts and MLA projections map one to one; MTP layers are dropped on purpose (the HF classes have
no MTP module). transformers 5 fuses experts in memory and, for these classes, sorts its state
dict before sharding on save: the plan's :attr:`ConversionPlan.outputs` follow that order and
mark the tensors save_pretrained keeps in one shard (:attr:`Output.shard_group`).

Every other model key must be consumed by the plan, or :func:`build_plan` raises a
:class:`MappingError` naming the unmapped keys (MoE keys in a dense architecture's checkpoint,
missing experts, an expert count that differs from config.json).

Tied embeddings follow ``save_pretrained``: with ``tie_word_embeddings`` the export holds no
``lm_head.weight``.  An untied config whose checkpoint has no ``output_layer`` (Megatron shared
the weights) gets ``lm_head.weight`` from the embedding.

Adding an architecture = one :class:`ArchSpec` (a tuple of :class:`LayerRule` rows) passed to
:func:`register_architecture`.  Transforms are module-level functions bound with
``functools.partial`` (picklable: a plan can be shipped to worker processes); they never import
torch here (they only call tensor methods), so importing this module stays cheap.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from functools import partial
from typing import TYPE_CHECKING, Any, Callable, Iterable, Iterator, Mapping, Sequence

from ckptctl.errors import CkptctlError

if TYPE_CHECKING:  # pragma: no cover
    import torch

__all__ = [
    "ArchSpec",
    "ConversionPlan",
    "Geometry",
    "LayerRule",
    "MappingError",
    "Output",
    "PlanStep",
    "Source",
    "UnsupportedArchitectureError",
    "build_plan",
    "convert_state_dict",
    "is_model_key",
    "register_architecture",
    "resolve_architecture",
    "state_dict_reader",
    "supported_architectures",
]

LAYERS = "decoder.layers."
EMBEDDING = "embedding.word_embeddings.weight"
OUTPUT_LAYER = "output_layer.weight"
FINAL_NORM = "decoder.final_layernorm.weight"

# Keys of an mcore dist checkpoint that are not model weights (the plan ignores them).
NON_MODEL_PREFIXES = ("optimizer.", "rng_state", "lr_scheduler", "common.")
_PER_LAYER_RE = re.compile(r"^decoder\.layers\.(\d+)\.(.+)$")
_MOE_RE = re.compile(r"\.mlp\.(experts|router|shared_experts)\.|\.mlp\.experts$")


class UnsupportedArchitectureError(CkptctlError):
    """The HF architecture has no Megatron -> HF mapping (yet)."""


class MappingError(CkptctlError):
    """The checkpoint's tensors do not fit the architecture's mapping (missing, unmapped, shape)."""


# ------------------------------------------------------------------------------------------
# plan data structures
# ------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Source:
    """One mcore tensor a step reads.

    ``key``: the checkpoint key.  ``layer``: ``None`` = the whole global tensor; an int = the slice
    ``tensor[layer]`` of a stacked ``decoder.layers.*`` key along its leading num_layers axis (a
    reader can read just that layer's chunks).  ``shape``: the shape of what the reader must hand
    over (the layer slice's shape when ``layer`` is set)."""

    key: str
    layer: int | None
    shape: tuple[int, ...]
    expert: int | None = None  # then one expert: the slice [expert] along the expert axis (after the layer's)
    rows: tuple[int, int] | None = None  # then only rows [start, stop) of what is left (gate or up of fc1)

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def where(self) -> str:
        """``key[layer, expert, start:stop]`` as far as it is indexed (for messages)."""
        index = [str(i) for i in (self.layer, self.expert) if i is not None]
        if self.rows is not None:
            index.append(f"{self.rows[0]}:{self.rows[1]}")
        return self.key + (f"[{', '.join(index)}]" if index else "")

    def region(self, global_shape: Sequence[int]) -> tuple[tuple[int, ...], tuple[int, ...]]:
        """(offsets, sizes) of this source in the global tensor of ``global_shape``."""
        lead = [i for i in (self.layer, self.expert) if i is not None]
        offsets, sizes = list(lead), [1] * len(lead)
        rest = list(global_shape[len(lead):])
        if self.rows is not None:
            offsets.append(self.rows[0])
            sizes.append(self.rows[1] - self.rows[0])
            rest = rest[1:]
        return tuple(offsets + [0] * len(rest)), tuple(sizes + rest)

    def to_dict(self) -> dict:
        out = {"key": self.key, "layer": self.layer, "shape": list(self.shape)}
        if self.expert is not None:
            out["expert"] = self.expert
        if self.rows is not None:
            out["rows"] = list(self.rows)
        return out


@dataclass(frozen=True)
class Output:
    """One HF tensor a step produces (dtype = the source's dtype: transforms never cast)."""

    name: str
    shape: tuple[int, ...]
    #: Outputs sharing one storage in transformers' own state dict (one expert projection of a layer,
    #: all experts): save_pretrained keeps them in one shard, and so does the writer.
    shard_group: str | None = None
    #: Where save_pretrained puts this tensor in its (sorted) state dict; None: the plan's order.
    order: tuple | None = field(default=None, compare=False)

    def to_dict(self) -> dict:
        return {"name": self.name, "shape": list(self.shape)}


@dataclass(frozen=True)
class PlanStep:
    """Read ``sources``, call ``transform(*tensors)``, get one tensor per entry of ``outputs``.

    ``transform`` is pure: it does not modify its inputs.  Outputs of one step never share storage
    with each other; an output may be the input itself or a view of it (identity copies and vocab
    row cuts), so writing with ``torch.save`` should ``.clone()`` views first (safetensors writes
    only the view's bytes)."""

    rule: str  # the mapping row, e.g. "qkv_split" (for display / debugging)
    sources: tuple[Source, ...]
    outputs: tuple[Output, ...]
    transform: Callable[..., tuple]

    @property
    def source_numel(self) -> int:
        return sum(s.numel for s in self.sources)

    def apply(self, *tensors) -> dict[str, "torch.Tensor"]:
        if len(tensors) != len(self.sources):
            raise ValueError(f"step {self.rule}: expected {len(self.sources)} source tensors, got {len(tensors)}")
        for src, t in zip(self.sources, tensors):
            if tuple(t.shape) != src.shape:
                raise MappingError(f"{src.where}: read shape {list(t.shape)}, planned {list(src.shape)}")
        results = self.transform(*tensors)
        return {out.name: t for out, t in zip(self.outputs, results)}

    def to_dict(self) -> dict:
        return {"rule": self.rule, "sources": [s.to_dict() for s in self.sources],
                "outputs": [o.to_dict() for o in self.outputs]}


@dataclass(frozen=True)
class Geometry:
    """The model dimensions the transforms need (from config.json, checked against the shapes)."""

    num_layers: int
    hidden_size: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate_size: int
    vocab_size: int
    tie_word_embeddings: bool
    num_experts: int = 0  # 0: a dense model
    moe_intermediate_size: int = 0
    shared_intermediate_size: int = 0  # all shared experts together (0: none)
    # multi-latent attention (DeepSeek-V3 family); q_lora_rank 0: no q-LoRA (linear_q_proj)
    q_lora_rank: int = 0
    kv_lora_rank: int = 0
    qk_nope_head_dim: int = 0
    qk_rope_head_dim: int = 0
    v_head_dim: int = 0

    @property
    def q_per_group(self) -> int:
        return self.num_heads // self.num_kv_heads

    @property
    def qkv_rows(self) -> int:
        return (self.num_heads + 2 * self.num_kv_heads) * self.head_dim


@dataclass
class ConversionPlan:
    """The ordered steps of one mcore -> HF conversion, plus what was deliberately left out.

    ``skipped``: model keys not converted, with the reason (``_extra_state``, a tied
    ``output_layer``).  ``ignored``: non-model keys (``optimizer.*``, ...).  ``warnings``: one-line
    notes for the user (e.g. lm_head taken from the embedding)."""

    architecture: str
    geometry: Geometry
    steps: list[PlanStep]
    skipped: dict[str, str] = field(default_factory=dict)
    ignored: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)

    @property
    def outputs(self) -> list[Output]:
        """Every output, in the order an export writes them: save_pretrained's order (the plan's
        step order, or transformers' sorted state dict for the architectures it converts on save)."""
        outputs = [o for s in self.steps for o in s.outputs]
        if any(o.order is not None for o in outputs):
            outputs.sort(key=lambda o: o.order)
        return outputs

    @property
    def hf_names(self) -> list[str]:
        return [o.name for o in self.outputs]

    @property
    def consumed(self) -> set[str]:
        return {src.key for s in self.steps for src in s.sources}

    @property
    def max_step_numel(self) -> int:
        """Elements read by the largest step (times the dtype size = peak input bytes)."""
        return max((s.source_numel for s in self.steps), default=0)

    def reader(self, read: Callable[[Source], "torch.Tensor"]) -> Callable[[str], "torch.Tensor"]:
        """``read_output(hf_name)``: runs the output's step (its sources through ``read``) and keeps
        the step's other outputs until they are asked for, each handed out once. Asked in
        :attr:`outputs` order, what is kept is bounded by one layer's attention or MLP outputs."""
        step_of = {out.name: step for step in self.steps for out in step.outputs}
        pending: dict[str, "torch.Tensor"] = {}

        def read_output(name: str):
            if name in pending:
                return pending.pop(name)
            step = step_of[name]
            inputs = [read(src) for src in step.sources]
            results = step.apply(*inputs)
            del inputs
            tensor = results.pop(name)
            pending.update(results)
            return tensor

        return read_output

    def iter_tensors(self, read: Callable[[Source], "torch.Tensor"]) -> Iterator[tuple[str, "torch.Tensor"]]:
        """Stream the conversion in :attr:`outputs` order: each step's sources are read through
        ``read`` when its first output is due; a step's outputs are kept only until written."""
        read_output = self.reader(read)
        for out in self.outputs:
            yield out.name, read_output(out.name)

    def convert(self, read: Callable[[Source], "torch.Tensor"]) -> dict[str, "torch.Tensor"]:
        """All outputs in one dict (holds the whole model: for tests and small models)."""
        return dict(self.iter_tensors(read))

    def to_dict(self) -> dict:
        g = self.geometry
        return {
            "architecture": self.architecture,
            "geometry": {k: getattr(g, k) for k in g.__dataclass_fields__},
            "steps": [s.to_dict() for s in self.steps],
            "skipped": dict(self.skipped),
            "ignored": list(self.ignored),
            "warnings": list(self.warnings),
        }


# ------------------------------------------------------------------------------------------
# transforms (pure; tensor methods only)
# ------------------------------------------------------------------------------------------


def _identity(t):
    return (t,)


def _cut_vocab(t, *, vocab_size: int):
    """Megatron pads the vocabulary rows (to a multiple of make_vocab_size_divisible_by * TP)."""
    return (t if t.shape[0] == vocab_size else t[:vocab_size],)


def _cut_vocab_copy(t, *, vocab_size: int):
    """As :func:`_cut_vocab`, into new storage (an lm_head taken from the embedding must not alias
    model.embed_tokens.weight in the written file)."""
    return (t[:vocab_size].clone(),)


def _split_qkv(t, *, num_kv_heads: int, q_per_group: int, head_dim: int):
    """``[q heads of g; k_g; v_g]`` per query group g (rows, any trailing dims) -> q, k, v."""
    rest = tuple(t.shape[1:])
    grouped = t.reshape(num_kv_heads, q_per_group + 2, head_dim, *rest)
    q = grouped[:, :q_per_group].reshape(num_kv_heads * q_per_group * head_dim, *rest).clone()
    k = grouped[:, q_per_group].reshape(num_kv_heads * head_dim, *rest).clone()
    v = grouped[:, q_per_group + 1].reshape(num_kv_heads * head_dim, *rest).clone()
    return q, k, v


def _split_gate_up(t):
    """``linear_fc1`` = ``[gate; up]`` on dim 0."""
    half = t.shape[0] // 2
    return t[:half].clone(), t[half:].clone()


# A transform kind: (factory(geometry) -> pure transform, (input shape, geometry) -> output shapes).
_TRANSFORMS: dict[str, tuple[Callable[[Geometry], Callable], Callable[[tuple, Geometry], list[tuple]]]] = {
    "copy": (lambda g: _identity, lambda s, g: [s]),
    "qkv": (
        lambda g: partial(_split_qkv, num_kv_heads=g.num_kv_heads, q_per_group=g.q_per_group, head_dim=g.head_dim),
        lambda s, g: [(g.num_heads * g.head_dim, *s[1:]), (g.num_kv_heads * g.head_dim, *s[1:]),
                      (g.num_kv_heads * g.head_dim, *s[1:])],
    ),
    "gate_up": (lambda g: _split_gate_up, lambda s, g: [(s[0] // 2, *s[1:])] * 2),
    "vocab": (lambda g: partial(_cut_vocab, vocab_size=g.vocab_size), lambda s, g: [(g.vocab_size, *s[1:])]),
    "vocab_copy": (lambda g: partial(_cut_vocab_copy, vocab_size=g.vocab_size),
                   lambda s, g: [(g.vocab_size, *s[1:])]),
}


# ------------------------------------------------------------------------------------------
# the mapping tables
# ------------------------------------------------------------------------------------------


def _always(config: Mapping) -> bool:
    return True


def _every_layer(config: Mapping, layer: int) -> bool:
    return True


def _cfg_flag(name: str) -> Callable[[Mapping], bool]:
    def pred(config: Mapping) -> bool:
        return bool(config.get(name) or False)

    pred.__name__ = f"config.{name}"
    return pred


@dataclass(frozen=True)
class LayerRule:
    """One row of a per-layer mapping table.

    ``mcore``: candidate names relative to the layer (``decoder.layers.[{i}.]``); the first one
    present in the checkpoint is used (the others, if also present, stay unmapped -> error).
    ``hf``: output names relative to ``model.layers.{i}.``.  ``transform``: a key of
    ``_TRANSFORMS``.  ``shape``: the expected per-layer input shape from the geometry.  ``when``:
    whether the rule applies to this config (an inactive rule maps nothing, so a present key
    is reported unmapped; an active rule whose key is missing is an error)."""

    name: str
    mcore: tuple[str, ...]
    hf: tuple[str, ...]
    transform: str
    shape: Callable[[Geometry], tuple]
    when: Callable[[Mapping], bool] = _always
    #: Which layers it applies to (config, layer index): dense-MLP rows only at dense layers of an MoE model.
    at: Callable[[Mapping, int], bool] = _every_layer
    #: transformers' in-memory names (relative to the layer) where they differ from ``hf``: they
    #: decide where save_pretrained puts the tensors of the architectures it converts on save.
    memory: tuple[str, ...] | None = None


@dataclass(frozen=True)
class ExpertRule:
    """The routed experts of one MoE layer: the mcore tensor ``[E, rows, cols]`` (per layer; a
    stacked key adds the layer axis first) gives one HF tensor per expert, read one expert at a time.

    ``hf``: the per-expert name relative to ``model.layers.{i}.`` with ``{e}``.  ``part``: for
    ``linear_fc1`` (``[gate; up]`` rows of each expert) 0 = the gate half, 1 = the up half; None =
    the whole expert (``linear_fc2``).  ``memory``: transformers' fused in-memory tensor these
    come from (save_pretrained's order and shard grouping)."""

    name: str
    mcore: tuple[str, ...]
    hf: str
    part: int | None
    memory: str
    shape: Callable[[Geometry], tuple]  # the per-layer shape [E, rows, cols]
    at: Callable[[Mapping, int], bool] = _every_layer


@dataclass(frozen=True)
class ArchSpec:
    """How one HF architecture maps.  ``head_dim_default``: the config class's ``head_dim`` when
    config.json has no ``head_dim`` key (None: ``hidden_size // num_attention_heads``).
    ``experts``: routed-expert rules (MoE).  ``sorted_save``: transformers 5 converts this class's
    weights on save, which sorts its state dict (``dot_natural_key`` of the in-memory names) before
    sharding: the export writes in that order.  ``skip``: key prefixes left out on purpose, with why."""

    name: str
    model_type: str
    layer_rules: tuple[LayerRule, ...]
    tie_default: bool = False
    head_dim_default: int | None = None
    experts: tuple[ExpertRule, ...] = ()
    sorted_save: bool = False
    skip: tuple[tuple[str, str], ...] = ()
    geometry: Callable[[Mapping], dict] | None = None  # MoE / MLA dimensions from config.json


_H = lambda g: (g.hidden_size,)  # noqa: E731

_QKV_W = LayerRule("qkv_split", ("self_attention.linear_qkv.weight",),
                   ("self_attn.q_proj.weight", "self_attn.k_proj.weight", "self_attn.v_proj.weight"),
                   "qkv", lambda g: (g.qkv_rows, g.hidden_size))


def _qkv_bias(when) -> LayerRule:
    return LayerRule("qkv_bias_split", ("self_attention.linear_qkv.bias",),
                     ("self_attn.q_proj.bias", "self_attn.k_proj.bias", "self_attn.v_proj.bias"),
                     "qkv", lambda g: (g.qkv_rows,), when)


_O_W = LayerRule("o_proj", ("self_attention.linear_proj.weight",), ("self_attn.o_proj.weight",), "copy",
                 lambda g: (g.hidden_size, g.num_heads * g.head_dim))


def _o_bias(when) -> LayerRule:
    return LayerRule("o_proj_bias", ("self_attention.linear_proj.bias",), ("self_attn.o_proj.bias",), "copy", _H,
                     when)


_FC1_W = LayerRule("gate_up_split", ("mlp.linear_fc1.weight",), ("mlp.gate_proj.weight", "mlp.up_proj.weight"),
                   "gate_up", lambda g: (2 * g.intermediate_size, g.hidden_size))
_FC2_W = LayerRule("down_proj", ("mlp.linear_fc2.weight",), ("mlp.down_proj.weight",), "copy",
                   lambda g: (g.hidden_size, g.intermediate_size))


def _mlp_bias(when) -> tuple[LayerRule, ...]:
    return (
        LayerRule("gate_up_bias_split", ("mlp.linear_fc1.bias",), ("mlp.gate_proj.bias", "mlp.up_proj.bias"),
                  "gate_up", lambda g: (2 * g.intermediate_size,), when),
        LayerRule("down_proj_bias", ("mlp.linear_fc2.bias",), ("mlp.down_proj.bias",), "copy", _H, when),
    )


_NORMS = (
    LayerRule("input_layernorm", ("self_attention.linear_qkv.layer_norm_weight", "input_layernorm.weight"),
              ("input_layernorm.weight",), "copy", _H),
    LayerRule("post_attention_layernorm", ("mlp.linear_fc1.layer_norm_weight", "pre_mlp_layernorm.weight"),
              ("post_attention_layernorm.weight",), "copy", _H),
)

_QK_NORM = (
    LayerRule("q_norm", ("self_attention.q_layernorm.weight",), ("self_attn.q_norm.weight",), "copy",
              lambda g: (g.head_dim,)),
    LayerRule("k_norm", ("self_attention.k_layernorm.weight",), ("self_attn.k_norm.weight",), "copy",
              lambda g: (g.head_dim,)),
)

_never = lambda config: False  # noqa: E731
_attn_bias = _cfg_flag("attention_bias")


def _llama_like(*, qkv_bias, o_bias, mlp_bias, qk_norm: bool = False) -> tuple[LayerRule, ...]:
    return (_QKV_W, _qkv_bias(qkv_bias), _O_W, _o_bias(o_bias), *(_QK_NORM if qk_norm else ()),
            _FC1_W, *_mlp_bias(mlp_bias)[:1], _FC2_W, *_mlp_bias(mlp_bias)[1:], *_NORMS)


_ARCHS: dict[str, ArchSpec] = {}


def register_architecture(spec: ArchSpec) -> None:
    """Add (or replace) an architecture's mapping table."""
    _ARCHS[spec.name] = spec


register_architecture(ArchSpec(
    "LlamaForCausalLM", "llama",
    _llama_like(qkv_bias=_attn_bias, o_bias=_attn_bias, mlp_bias=_cfg_flag("mlp_bias"))))
register_architecture(ArchSpec(
    "Qwen2ForCausalLM", "qwen2", _llama_like(qkv_bias=_always, o_bias=_never, mlp_bias=_never)))
register_architecture(ArchSpec(
    "Qwen3ForCausalLM", "qwen3", _llama_like(qkv_bias=_attn_bias, o_bias=_attn_bias, mlp_bias=_never, qk_norm=True),
    head_dim_default=128))
register_architecture(ArchSpec(
    "MistralForCausalLM", "mistral", _llama_like(qkv_bias=_never, o_bias=_never, mlp_bias=_never)))


# -- mixture of experts ----------------------------------------------------------------------
# Megatron keys (megatron-moe-and-optimizer.md): routed experts ``mlp.experts.experts.linear_fc1``
# [E, 2F, H] (each expert's rows: gate then up) and ``linear_fc2`` [E, H, F] per layer, the router
# ``mlp.router.weight`` [E, H] (+ ``expert_bias`` [E]), shared experts ``mlp.shared_experts.*``;
# global expert order = the tensor's expert axis (megatron's EP offsets put it there).

_EXPERT_FC1 = ("mlp.experts.experts.linear_fc1.weight", "mlp.experts.linear_fc1.weight")
_EXPERT_FC2 = ("mlp.experts.experts.linear_fc2.weight", "mlp.experts.linear_fc2.weight")


#: config.json names of the routed-expert count (transformers 5 writes num_local_experts for every
#: class; hub configs of Qwen3-MoE say num_experts, DeepSeek's n_routed_experts)
_EXPERT_COUNT_KEYS = ("num_local_experts", "num_experts", "n_routed_experts")


def _moe_dims(*, ffn: str, shared: str | None = None) -> Callable[[Mapping], dict]:
    def dims(config: Mapping) -> dict:
        moe_ffn = int(config.get(ffn) or config.get("intermediate_size") or 0)
        n_shared = int(config.get(shared) or 0) if shared else 0
        experts = next((int(config[k]) for k in _EXPERT_COUNT_KEYS if config.get(k)), 0)
        return {"num_experts": experts, "moe_intermediate_size": moe_ffn, "shared_intermediate_size": n_shared * moe_ffn}
    return dims


def _moe_layers(config: Mapping, layer: int) -> bool:
    """Which layers are MoE, as each config class says (Qwen3-MoE: ``decoder_sparse_step`` and
    ``mlp_only_layers``; DeepSeek-V3 / GLM: ``first_k_dense_replace`` and ``moe_layer_freq``)."""
    if layer in (config.get("mlp_only_layers") or ()):
        return False
    if "first_k_dense_replace" in config and layer < int(config.get("first_k_dense_replace") or 0):
        return False
    step = int(config.get("decoder_sparse_step") or config.get("moe_layer_freq") or 1)
    return (layer + 1) % step == 0 if "decoder_sparse_step" in config else layer % step == 0


def _dense_layers(config: Mapping, layer: int) -> bool:
    return not _moe_layers(config, layer)


def _dense_mlp() -> tuple[LayerRule, ...]:
    return (LayerRule(_FC1_W.name, _FC1_W.mcore, _FC1_W.hf, _FC1_W.transform, _FC1_W.shape, at=_dense_layers),
            LayerRule(_FC2_W.name, _FC2_W.mcore, _FC2_W.hf, _FC2_W.transform, _FC2_W.shape, at=_dense_layers))


def _experts(hf_prefix: str, gate: str, up: str, down: str) -> tuple[ExpertRule, ...]:
    fc1 = lambda g: (g.num_experts, 2 * g.moe_intermediate_size, g.hidden_size)  # noqa: E731
    fc2 = lambda g: (g.num_experts, g.hidden_size, g.moe_intermediate_size)  # noqa: E731
    return (ExpertRule("expert_gate", _EXPERT_FC1, f"{hf_prefix}.{{e}}.{gate}.weight", 0, "mlp.experts.gate_up_proj",
                       fc1, _moe_layers),
            ExpertRule("expert_up", _EXPERT_FC1, f"{hf_prefix}.{{e}}.{up}.weight", 1, "mlp.experts.gate_up_proj",
                       fc1, _moe_layers),
            ExpertRule("expert_down", _EXPERT_FC2, f"{hf_prefix}.{{e}}.{down}.weight", None, "mlp.experts.down_proj",
                       fc2, _moe_layers))


def _router(hf: str, *, bias: bool = False) -> tuple[LayerRule, ...]:
    rules = (LayerRule("router", ("mlp.router.weight",), (f"{hf}.weight",), "copy",
                       lambda g: (g.num_experts, g.hidden_size), at=_moe_layers, memory=("mlp.gate.weight",)),)
    if bias:
        rules += (LayerRule("router_expert_bias", ("mlp.router.expert_bias",), (f"{hf}.e_score_correction_bias",),
                            "copy", lambda g: (g.num_experts,), at=_moe_layers,
                            memory=("mlp.gate.e_score_correction_bias",)),)
    return rules


_SHARED_EXPERTS = (
    LayerRule("shared_gate_up_split", ("mlp.shared_experts.linear_fc1.weight",),
              ("mlp.shared_experts.gate_proj.weight", "mlp.shared_experts.up_proj.weight"), "gate_up",
              lambda g: (2 * g.shared_intermediate_size, g.hidden_size), at=_moe_layers),
    LayerRule("shared_down_proj", ("mlp.shared_experts.linear_fc2.weight",), ("mlp.shared_experts.down_proj.weight",),
              "copy", lambda g: (g.hidden_size, g.shared_intermediate_size), at=_moe_layers),
)

register_architecture(ArchSpec(
    "Qwen3MoeForCausalLM", "qwen3_moe",
    (_QKV_W, _qkv_bias(_attn_bias), _O_W, _o_bias(_attn_bias), *_QK_NORM, *_dense_mlp(), *_router("mlp.gate"),
     *_NORMS),
    head_dim_default=128, experts=_experts("mlp.experts", "gate_proj", "up_proj", "down_proj"), sorted_save=True,
    geometry=_moe_dims(ffn="moe_intermediate_size")))

register_architecture(ArchSpec(
    "MixtralForCausalLM", "mixtral",
    (_QKV_W, _O_W, *_router("block_sparse_moe.gate"), *_NORMS),
    experts=_experts("block_sparse_moe.experts", "w1", "w3", "w2"), sorted_save=True,
    geometry=_moe_dims(ffn="intermediate_size")))


# -- multi-latent attention (DeepSeek-V3 family) ------------------------------------------------

def _mla_dims(config: Mapping) -> dict:
    return {"q_lora_rank": int(config.get("q_lora_rank") or 0), "kv_lora_rank": int(config.get("kv_lora_rank") or 0),
            "qk_nope_head_dim": int(config.get("qk_nope_head_dim") or 0),
            "qk_rope_head_dim": int(config.get("qk_rope_head_dim") or 0),
            "v_head_dim": int(config.get("v_head_dim") or 0)}


_q_lora = lambda config: bool(config.get("q_lora_rank"))  # noqa: E731
_no_q_lora = lambda config: not config.get("q_lora_rank")  # noqa: E731
_q_rows = lambda g: g.num_heads * (g.qk_nope_head_dim + g.qk_rope_head_dim)  # noqa: E731

_MLA = (
    LayerRule("q_a_proj", ("self_attention.linear_q_down_proj.weight",), ("self_attn.q_a_proj.weight",), "copy",
              lambda g: (g.q_lora_rank, g.hidden_size), _q_lora),
    LayerRule("q_a_layernorm", ("self_attention.linear_q_up_proj.layer_norm_weight",
                                "self_attention.q_layernorm.weight"), ("self_attn.q_a_layernorm.weight",), "copy",
              lambda g: (g.q_lora_rank,), _q_lora),
    LayerRule("q_b_proj", ("self_attention.linear_q_up_proj.weight",), ("self_attn.q_b_proj.weight",), "copy",
              lambda g: (_q_rows(g), g.q_lora_rank), _q_lora),
    LayerRule("q_proj", ("self_attention.linear_q_proj.weight",), ("self_attn.q_proj.weight",), "copy",
              lambda g: (_q_rows(g), g.hidden_size), _no_q_lora),
    LayerRule("kv_a_proj_with_mqa", ("self_attention.linear_kv_down_proj.weight",),
              ("self_attn.kv_a_proj_with_mqa.weight",), "copy",
              lambda g: (g.kv_lora_rank + g.qk_rope_head_dim, g.hidden_size)),
    LayerRule("kv_a_layernorm", ("self_attention.linear_kv_up_proj.layer_norm_weight",
                                 "self_attention.kv_layernorm.weight"), ("self_attn.kv_a_layernorm.weight",), "copy",
              lambda g: (g.kv_lora_rank,)),
    LayerRule("kv_b_proj", ("self_attention.linear_kv_up_proj.weight",), ("self_attn.kv_b_proj.weight",), "copy",
              lambda g: (g.num_heads * (g.qk_nope_head_dim + g.v_head_dim), g.kv_lora_rank)),
    LayerRule("o_proj", ("self_attention.linear_proj.weight",), ("self_attn.o_proj.weight",), "copy",
              lambda g: (g.hidden_size, g.num_heads * g.v_head_dim)),
    LayerRule("input_layernorm", ("input_layernorm.weight", "self_attention.linear_qkv.layer_norm_weight"),
              ("input_layernorm.weight",), "copy", _H),
    _NORMS[1],
)

_MTP_SKIP = (("mtp.", "multi-token-prediction layers: transformers' model class has no MTP module, so they are "
                      "dropped on purpose"),)

def _deepseek_like(name: str, model_type: str, attention: tuple[LayerRule, ...]) -> ArchSpec:
    """DeepSeek-V3's MoE block (leading dense layers, sigmoid router with expert bias, shared
    experts) under the given attention rows."""
    return ArchSpec(
        name, model_type, (*attention, *_dense_mlp(), *_router("mlp.gate", bias=True), *_SHARED_EXPERTS),
        experts=_experts("mlp.experts", "gate_proj", "up_proj", "down_proj"), sorted_save=True, skip=_MTP_SKIP,
        geometry=lambda config: {**_moe_dims(ffn="moe_intermediate_size", shared="n_shared_experts")(config),
                                 **_mla_dims(config)})


register_architecture(_deepseek_like("DeepseekV3ForCausalLM", "deepseek_v3", _MLA))
# GLM-4.7-Flash: DeepSeek-V3's layout under another name
register_architecture(_deepseek_like("Glm4MoeLiteForCausalLM", "glm4_moe_lite", _MLA))
# GLM-4.5 / 4.6: grouped-query attention (QKV bias with attention_bias, q/k norms with use_qk_norm)
register_architecture(_deepseek_like("Glm4MoeForCausalLM", "glm4_moe", (
    _QKV_W, _qkv_bias(_attn_bias), _O_W,
    *(LayerRule(r.name, r.mcore, r.hf, r.transform, r.shape, _cfg_flag("use_qk_norm")) for r in _QK_NORM),
    *_NORMS)))


def supported_architectures() -> tuple[str, ...]:
    return tuple(sorted(_ARCHS))


def resolve_architecture(config: Mapping[str, Any]) -> ArchSpec:
    """The spec for ``config["architectures"]`` (tolerating SkyRL's wrong ``FSDP`` prefix, e.g.
    ``FSDPQwen2ForCausalLM``), else for ``config["model_type"]``."""
    archs = [a for a in (config.get("architectures") or []) if isinstance(a, str)]
    for a in archs:
        if a in _ARCHS:
            return _ARCHS[a]
        if a.startswith("FSDP") and a[4:] in _ARCHS:
            return _ARCHS[a[4:]]
    if not archs:
        for spec in _ARCHS.values():
            if spec.model_type == config.get("model_type"):
                return spec
    what = ", ".join(archs) or f"model_type {config.get('model_type')!r}"
    raise UnsupportedArchitectureError(
        f"Megatron -> HF conversion does not support {what} (supported: {', '.join(supported_architectures())})")


# ------------------------------------------------------------------------------------------
# building the plan
# ------------------------------------------------------------------------------------------


_CHAINED_RE = re.compile(r"^chained_\d+\.")


def is_model_key(key: str) -> bool:
    """False for the non-weight keys of an mcore dist checkpoint (optimizer state, RNG, ...; a
    chained optimizer's, as MoE runs have, carries a ``chained_N.`` prefix)."""
    return not _CHAINED_RE.sub("", key, count=1).startswith(NON_MODEL_PREFIXES)


def _shape_of(v: Any) -> tuple[int, ...]:
    """A shape from a shape tuple, a tensor / TensorInfo (``.shape``), mcore metadata
    (``.global_shape``) or DCP ``TensorStorageMetadata`` (``.size``); ``()`` for entries without
    one (DCP bytes metadata of ShardedObjects such as ``_extra_state``)."""
    for attr in ("shape", "global_shape", "size"):
        shape = getattr(v, attr, None)
        if shape is not None and not callable(shape):
            return tuple(int(d) for d in shape)
    if isinstance(v, (tuple, list)):
        return tuple(int(d) for d in v)
    return ()


def _normalize_tensors(tensors: Mapping[str, Any] | Iterable[Any]) -> dict[str, tuple[int, ...]]:
    """``{name: shape}`` from a mapping of name -> shape / TensorInfo / tensor / metadata, or an
    iterable of objects with ``.name`` and ``.shape`` (TensorInfo)."""
    if isinstance(tensors, Mapping):
        return {str(k): _shape_of(v) for k, v in tensors.items()}
    return {str(t.name): _shape_of(t) for t in tensors}


def _geometry(config: Mapping[str, Any], spec: ArchSpec) -> Geometry:
    def need(key):
        v = config.get(key)
        if v is None:
            raise MappingError(f"config.json has no {key!r} (needed to convert {spec.name})")
        return int(v)

    hidden, heads, layers = need("hidden_size"), need("num_attention_heads"), need("num_hidden_layers")
    kv_heads = int(config.get("num_key_value_heads") or heads)
    if "head_dim" in config:
        head_dim = config["head_dim"] or hidden // heads
    else:
        head_dim = spec.head_dim_default or hidden // heads
    tie = config.get("tie_word_embeddings")
    if heads % kv_heads:
        raise MappingError(f"config.json: num_attention_heads={heads} is not a multiple of "
                           f"num_key_value_heads={kv_heads}")
    return Geometry(
        num_layers=layers, hidden_size=hidden, num_heads=heads, num_kv_heads=kv_heads, head_dim=int(head_dim),
        intermediate_size=need("intermediate_size"), vocab_size=need("vocab_size"),
        tie_word_embeddings=spec.tie_default if tie is None else bool(tie),
        **(spec.geometry(config) if spec.geometry else {}),
    )


def dot_natural_key(name: str) -> list[tuple]:
    """transformers 5's sort key for state-dict names (``core_model_loading.dot_natural_key``):
    dot-separated parts, numbers numerically, a trailing number of a word too."""
    parts: list[tuple] = []
    for part in name.split("."):
        if part.isdigit():
            parts.append((0, int(part)))
            continue
        text = part.rstrip("0123456789")
        parts.append((1, text, int(part[len(text):])) if text != part else (1, text))
    return parts


def _short(items: Sequence[str], n: int = 6) -> str:
    items = list(items)
    more = f" (+{len(items) - n} more)" if len(items) > n else ""
    return ", ".join(items[:n]) + more


class _Planner:
    def __init__(self, spec: ArchSpec, geo: Geometry, shapes: dict[str, tuple[int, ...]]):
        self.spec, self.geo, self.shapes = spec, geo, shapes
        self.steps: list[PlanStep] = []
        self.missing: dict[str, list[int | None]] = {}  # first candidate name -> layers
        self.bad_shapes: list[str] = []

    def find(self, names: Sequence[str], layer: int | None) -> Source | None:
        """The first candidate present: a whole tensor (layer None), a per-layer key, or a slice
        of a stacked key.  None when absent (recorded in ``missing``) or unusable (``bad_shapes``)."""
        for name in names:
            if layer is None:
                if name in self.shapes:
                    return Source(name, None, self.shapes[name])
                continue
            per_layer = f"{LAYERS}{layer}.{name}"
            if per_layer in self.shapes:
                return Source(per_layer, None, self.shapes[per_layer])
            stacked = LAYERS + name
            if stacked in self.shapes:
                shape = self.shapes[stacked]
                if not shape or shape[0] != self.geo.num_layers:
                    msg = (f"{stacked} {list(shape)} (leading layer axis != "
                           f"num_hidden_layers={self.geo.num_layers})")
                    if msg not in self.bad_shapes:
                        self.bad_shapes.append(msg)
                    return None
                return Source(stacked, layer, shape[1:])
        missing = self.missing.setdefault(names[0], [])
        if layer not in missing:  # two rules may read one key (an expert's gate and up halves)
            missing.append(layer)
        return None

    def add_experts(self, rule: ExpertRule, layer: int, prefix: str) -> None:
        """One step per expert (one source region each: an expert's gate or up rows, or its fc2)."""
        src = self.find(rule.mcore, layer)
        if src is None:
            return
        expected = tuple(rule.shape(self.geo))
        if src.shape != expected:
            bad = f"{src.where} {list(src.shape)} (expected {list(expected)}: experts x rows x columns)"
            if bad not in self.bad_shapes:
                self.bad_shapes.append(bad)
            return
        experts, rows, cols = src.shape
        span = None if rule.part is None else (rule.part * rows // 2, (rule.part + 1) * rows // 2)
        shape = (rows if span is None else span[1] - span[0], cols)
        memory = prefix + rule.memory
        group = f"{memory}:{rule.part or 0}"
        order = (dot_natural_key(memory), rule.part or 0)
        for e in range(experts):
            source = Source(src.key, src.layer, shape, expert=e, rows=span)
            out = Output(prefix + rule.hf.format(e=e), shape, shard_group=group,
                         order=(*order, e) if self.spec.sorted_save else None)
            self.steps.append(PlanStep(rule.name, (source,), (out,), _identity))

    def add(self, rule: str, src: Source, transform: str, hf_names: Sequence[str],
            expected: tuple | None, memory: Sequence[str] | None = None) -> None:
        geo, where = self.geo, (src.key if src.layer is None else f"{src.key}[{src.layer}]")
        if transform.startswith("vocab"):  # Megatron pads rows: [>= vocab_size, hidden]
            if len(src.shape) != 2 or src.shape[0] < geo.vocab_size or src.shape[1] != geo.hidden_size:
                self.bad_shapes.append(f"{where} {list(src.shape)} (expected [>={geo.vocab_size}, "
                                       f"{geo.hidden_size}])")
                return
        elif expected is not None and src.shape != tuple(expected):
            self.bad_shapes.append(f"{where} {list(src.shape)} (expected {list(expected)})")
            return
        factory, out_shapes = _TRANSFORMS[transform]
        shapes = out_shapes(src.shape, geo)
        orders = [(dot_natural_key(m), 0, 0) if self.spec.sorted_save else None for m in (memory or hf_names)]
        self.steps.append(PlanStep(rule, (src,), tuple(Output(n, tuple(s), order=o)
                                                       for n, s, o in zip(hf_names, shapes, orders)),
                                   factory(geo)))


def build_plan(config: Mapping[str, Any], tensors: Mapping[str, Any] | Iterable[Any], *,
               architecture: str | None = None) -> ConversionPlan:
    """The conversion plan for an mcore GPT checkpoint.

    ``config``: the HF config.json dict.  ``tensors``: the checkpoint's tensors with GLOBAL shapes
    -- a mapping ``name -> shape`` (or -> anything with ``.shape``: TensorInfo, a tensor, DCP
    metadata), or an iterable of TensorInfo.  Non-model keys (``optimizer.*``, ...) may be
    included; they are ignored.  ``architecture`` overrides ``config["architectures"]``.

    Raises :class:`UnsupportedArchitectureError` for an unknown architecture and
    :class:`MappingError` (one line) when a needed tensor is missing, a shape does not fit the
    config, or a model key would be left unconverted."""
    spec = resolve_architecture({"architectures": [architecture]} if architecture else config)
    geo = _geometry(config, spec)
    all_shapes = _normalize_tensors(tensors)
    ignored = sorted(k for k in all_shapes if not is_model_key(k))
    shapes = {k: v for k, v in all_shapes.items() if is_model_key(k)}
    skipped = {k: "extra state (not a weight)" for k in shapes if "_extra_state" in k}
    for prefix, why in spec.skip:
        skipped.update({k: why for k in shapes if k.startswith(prefix) and k not in skipped})
    warnings = [f"{prefix}* not exported: {why}" for prefix, why in spec.skip
                if any(k.startswith(prefix) for k in skipped)]
    p = _Planner(spec, geo, {k: v for k, v in shapes.items() if k not in skipped})

    def global_rule(rule, names, transform, hf, expected):
        src = p.find(names, None)
        if src is None:
            return None
        p.add(rule, src, transform, hf, expected)
        return src

    global_rule("embed_tokens", (EMBEDDING,), "vocab", ("model.embed_tokens.weight",), None)
    for i in range(geo.num_layers):
        prefix = f"model.layers.{i}."
        for rule in spec.layer_rules:
            if not rule.when(config) or not rule.at(config, i):
                continue
            src = p.find(rule.mcore, i)
            if src is None:
                continue
            p.add(rule.name, src, rule.transform, [prefix + h for h in rule.hf], rule.shape(geo),
                  [prefix + m for m in rule.memory] if rule.memory else None)
        for expert_rule in spec.experts:
            if expert_rule.at(config, i):
                p.add_experts(expert_rule, i, prefix)
    global_rule("norm", (FINAL_NORM,), "copy", ("model.norm.weight",), (geo.hidden_size,))
    if geo.tie_word_embeddings:
        if OUTPUT_LAYER in shapes:
            skipped[OUTPUT_LAYER] = "tie_word_embeddings: HF ties lm_head.weight to model.embed_tokens.weight"
            warnings.append(f"config.json has tie_word_embeddings=true but the checkpoint holds a separate "
                            f"{OUTPUT_LAYER}; it is not exported (HF uses the embedding)")
    elif OUTPUT_LAYER in shapes:
        global_rule("lm_head", (OUTPUT_LAYER,), "vocab", ("lm_head.weight",), None)
    elif EMBEDDING in shapes:
        global_rule("lm_head", (EMBEDDING,), "vocab_copy", ("lm_head.weight",), None)
        warnings.append(f"no {OUTPUT_LAYER} in the checkpoint (Megatron shared it with the embedding): "
                        f"lm_head.weight is a copy of model.embed_tokens.weight")

    consumed = {src.key for s in p.steps for src in s.sources}
    unmapped = sorted(k for k in shapes if k not in consumed and k not in skipped)
    problems = []
    if any(_MOE_RE.search(k) for k in unmapped) and not spec.experts:
        problems.append(f"MoE layers, but {spec.name} is a dense architecture in config.json")
    if p.missing:
        problems.append("missing " + _short([_missing_name(n, layers, geo.num_layers)
                                             for n, layers in p.missing.items()]))
    if p.bad_shapes:
        problems.append("shape mismatch " + _short(p.bad_shapes))
    if unmapped:
        problems.append("unmapped " + _short(_collapse_layers(unmapped)))
    if problems:
        raise MappingError(f"cannot convert this Megatron checkpoint to {spec.name} "
                           f"({_geo_line(geo)}): " + "; ".join(problems))
    return ConversionPlan(spec.name, geo, p.steps, skipped=skipped, ignored=ignored, warnings=warnings)


def _missing_name(name: str, layers: list, num_layers: int) -> str:
    if layers == [None]:
        return name
    if len(layers) == num_layers and num_layers > 1:
        return f"{LAYERS}{name} (or {LAYERS}{{i}}.{name})"
    return f"{LAYERS}{{{','.join(map(str, layers))}}}.{name}"


def _collapse_layers(keys: Sequence[str]) -> list[str]:
    """``decoder.layers.0.x``, ``decoder.layers.1.x`` -> ``decoder.layers.{0,1}.x`` (short errors)."""
    groups: dict[str, list[str]] = {}
    out: list[str] = []
    for k in keys:
        m = _PER_LAYER_RE.match(k)
        if m:
            if m.group(2) not in groups:
                groups[m.group(2)] = []
                out.append("\0" + m.group(2))
            groups[m.group(2)].append(m.group(1))
        else:
            out.append(k)
    res = []
    for k in out:
        if k.startswith("\0"):
            idx = groups[k[1:]]
            res.append(f"{LAYERS}{idx[0] if len(idx) == 1 else '{' + ','.join(idx) + '}'}.{k[1:]}")
        else:
            res.append(k)
    return res


def _geo_line(g: Geometry) -> str:
    return (f"layers={g.num_layers} hidden={g.hidden_size} heads={g.num_heads} kv_heads={g.num_kv_heads} "
            f"head_dim={g.head_dim} ffn={g.intermediate_size} vocab={g.vocab_size}")


# ------------------------------------------------------------------------------------------
# in-memory helpers
# ------------------------------------------------------------------------------------------


def state_dict_reader(tensors: Mapping[str, "torch.Tensor"]) -> Callable[[Source], "torch.Tensor"]:
    """A ``read(Source)`` over full global tensors held in memory (tests, small models)."""

    def read(src: Source):
        t = tensors[src.key]
        offsets, sizes = src.region(tuple(t.shape))
        for dim, (start, size) in enumerate(zip(offsets, sizes)):
            t = t.narrow(dim, start, size)
        return t.reshape(src.shape)

    return read


def convert_state_dict(config: Mapping[str, Any], tensors: Mapping[str, "torch.Tensor"], *,
                       architecture: str | None = None) -> dict[str, "torch.Tensor"]:
    """Plan and run the whole conversion in memory: mcore full tensors -> HF state dict."""
    plan = build_plan(config, tensors, architecture=architecture)
    return plan.convert(state_dict_reader(tensors))
