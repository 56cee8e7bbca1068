"""PEFT (LoRA) state dicts: how a LoRA-wrapped model's tensors are named, and how to merge them.

A trainer that wraps its HF model with ``peft.get_peft_model`` (SkyRL and verl with LoRA)
saves ``peft_model.state_dict()`` in its FSDP shard files, so the names are PEFT's, not HF's::

    base_model.model.model.layers.0.self_attn.q_proj.base_layer.weight    frozen base weight
    base_model.model.model.layers.0.self_attn.q_proj.lora_A.default.weight  [r, in]
    base_model.model.model.layers.0.self_attn.q_proj.lora_B.default.weight  [out, r]
    base_model.model.model.embed_tokens.lora_embedding_A.default           [r, num_embeddings]
    base_model.model.model.embed_tokens.lora_embedding_B.default           [dim, r]
    base_model.model.lm_head.original_module.weight                       modules_to_save: the
    base_model.model.lm_head.modules_to_save.default.weight               original and the trained copy
    base_model.model.model.norm.weight                                     untouched module

and beside them ``lora_adapter/adapter_config.json`` (``dataclasses.asdict(LoraConfig)``) says
how to scale: ``lora_alpha / r`` (``lora_alpha / sqrt(r)`` with ``use_rslora``), per module
overridable through ``rank_pattern`` / ``alpha_pattern``. Merging is what
``PeftModel.merge_and_unload`` computes: ``W + scaling * (B @ A)`` (transposed for
``fan_in_fan_out`` layers and for embeddings), with ``modules_to_save`` copies replacing their
originals. This module only names and computes; reading tensors is the readers' job.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Iterable

from ckptctl.errors import UsageError
from ckptctl.formats.safe_load import CorruptCheckpointError

if TYPE_CHECKING:  # pragma: no cover
    import torch

PEFT_PREFIX = "base_model.model."
ADAPTER_CONFIG = "adapter_config.json"

# Roles of one tensor of a PEFT state dict.
BASE = "base"  # a weight of the model itself (wrapped layer's base_layer, or an unwrapped module)
ORIGINAL = "original"  # modules_to_save: the untrained original
SAVED = "saved"  # modules_to_save: the adapter's trained copy (replaces the original when merged)
LORA_A, LORA_B = "lora_A", "lora_B"
EMBEDDING_A, EMBEDDING_B = "lora_embedding_A", "lora_embedding_B"
UNSUPPORTED = "unsupported"  # DoRA magnitudes, LoRA biases, other PEFT tuners' tensors

_PATTERNS = [  # (regex on the name without PEFT_PREFIX, role); first match wins
    (re.compile(r"^(?P<module>.+)\.base_layer\.(?P<param>.+)$"), BASE),
    (re.compile(r"^(?P<module>.+)\.original_module\.(?P<param>.+)$"), ORIGINAL),
    (re.compile(r"^(?P<module>.+)\.modules_to_save\.(?P<adapter>[^.]+)\.(?P<param>.+)$"), SAVED),
    (re.compile(r"^(?P<module>.+)\.lora_(?P<ab>[AB])\.(?P<adapter>[^.]+)\.weight$"), "lora"),
    (re.compile(r"^(?P<module>.+)\.lora_embedding_(?P<ab>[AB])\.(?P<adapter>[^.]+)$"), "embedding"),
    (re.compile(r"^(?P<module>.+)\.(?P<what>lora_[A-Za-z_]+|lora_magnitude_vector)\b.*$"), UNSUPPORTED),
]


@dataclass(frozen=True)
class PeftName:
    """One tensor name of a PEFT state dict, taken apart."""

    source: str  # the name as stored
    role: str  # BASE | ORIGINAL | SAVED | LORA_A | LORA_B | EMBEDDING_A | EMBEDDING_B | UNSUPPORTED
    module: str  # the HF module path, e.g. "model.layers.0.self_attn.q_proj"
    param: str = ""  # "weight", "bias" (BASE/ORIGINAL/SAVED)
    adapter: str | None = None

    @property
    def hf_name(self) -> str:
        """The name the tensor has in the plain HF model (BASE, ORIGINAL and SAVED roles)."""
        return f"{self.module}.{self.param}" if self.param else self.module


def is_peft_state(names: Iterable[str]) -> bool:
    """Whether a model state dict was saved from a PEFT-wrapped model."""
    return any(n.startswith(PEFT_PREFIX) for n in names)


def parse_peft_name(name: str) -> PeftName:
    """Take apart one name of a PEFT state dict (``name`` starts with ``base_model.model.``)."""
    rest = name[len(PEFT_PREFIX):] if name.startswith(PEFT_PREFIX) else name
    for pattern, role in _PATTERNS:
        m = pattern.match(rest)
        if m is None:
            continue
        parts = m.groupdict()
        if role == "lora":
            role = LORA_A if parts["ab"] == "A" else LORA_B
        elif role == "embedding":
            role = EMBEDDING_A if parts["ab"] == "A" else EMBEDDING_B
        return PeftName(source=name, role=role, module=parts["module"], param=parts.get("param") or "",
                        adapter=parts.get("adapter"))
    module, _, param = rest.rpartition(".")
    return PeftName(source=name, role=BASE, module=module, param=param)


@dataclass
class LoraConfig:
    """What merging needs from ``adapter_config.json``."""

    r: int
    lora_alpha: float
    use_rslora: bool = False
    rank_pattern: dict[str, int] = field(default_factory=dict)
    alpha_pattern: dict[str, float] = field(default_factory=dict)
    fan_in_fan_out: bool = False
    source: str = ADAPTER_CONFIG

    @staticmethod
    def _pattern_key(patterns: dict, module: str) -> str | None:
        # peft's get_pattern_key: the first key that matches the end of the module path on a
        # "." boundary, tried in the config's order.
        for key in patterns:
            if re.match(rf"(.*\.)?({key})$", module):
                return key
        return None

    def rank_of(self, module: str) -> int:
        key = self._pattern_key(self.rank_pattern, module)
        return int(self.rank_pattern[key]) if key is not None else int(self.r)

    def scaling(self, module: str, rank: int) -> float:
        """``lora_alpha / r`` of ``module`` (``/ sqrt(r)`` with rsLoRA), as peft's LoraLayer."""
        expected = self.rank_of(module)
        if rank != expected:
            raise CorruptCheckpointError(f"{self.source}: {module} has LoRA rank {rank} but the adapter config "
                                         f"says r={expected}; the config does not belong to these weights")
        key = self._pattern_key(self.alpha_pattern, module)
        alpha = float(self.alpha_pattern[key]) if key is not None else float(self.lora_alpha)
        return alpha / math.sqrt(rank) if self.use_rslora else alpha / rank


def parse_adapter_config(data: bytes, source: str = ADAPTER_CONFIG) -> LoraConfig:
    """Read ``adapter_config.json``; refuse (one line) what cannot be merged exactly."""
    try:
        doc = json.loads(data)
        if not isinstance(doc, dict):
            raise ValueError("not a JSON object")
    except ValueError as exc:
        raise CorruptCheckpointError(f"cannot read {source}: {exc}") from exc
    peft_type = str(doc.get("peft_type") or "LORA").upper()
    if peft_type != "LORA":
        raise UsageError(f"{source}: peft_type {peft_type}: only LoRA adapters can be merged")
    if doc.get("use_dora"):
        raise UsageError(f"{source}: a DoRA adapter (use_dora) cannot be merged yet; export it without --merge-lora")
    if doc.get("lora_bias"):
        raise UsageError(f"{source}: an adapter with LoRA biases (lora_bias) cannot be merged yet; "
                         "export it without --merge-lora")
    if doc.get("layer_replication"):
        raise UsageError(f"{source}: layer_replication changes the model's layer count and cannot be merged")
    try:
        return LoraConfig(r=int(doc["r"]), lora_alpha=float(doc["lora_alpha"]),
                          use_rslora=bool(doc.get("use_rslora")), rank_pattern=dict(doc.get("rank_pattern") or {}),
                          alpha_pattern=dict(doc.get("alpha_pattern") or {}),
                          fan_in_fan_out=bool(doc.get("fan_in_fan_out")), source=source)
    except (KeyError, TypeError, ValueError) as exc:
        raise CorruptCheckpointError(f"{source}: no valid r / lora_alpha ({exc})") from exc


@dataclass
class LoraPair:
    """The two LoRA factors of one adapted module."""

    module: str
    embedding: bool
    a: PeftName | None = None
    b: PeftName | None = None


@dataclass
class PeftState:
    """A PEFT model state dict sorted by role: what the base model is, and what the adapter adds."""

    base: dict[str, PeftName]  # HF name -> the stored tensor (BASE and ORIGINAL roles), in stored order
    saved: dict[str, PeftName]  # HF name -> modules_to_save's trained copy
    pairs: dict[str, LoraPair]  # module -> its LoRA factors
    unsupported: list[PeftName]
    adapters: set[str]

    @property
    def lora_names(self) -> list[str]:
        """Stored names of everything that belongs to the adapter, not to the base model."""
        out = [p.source for p in self.saved.values()] + [p.source for p in self.unsupported]
        for pair in self.pairs.values():
            out += [x.source for x in (pair.a, pair.b) if x is not None]
        return out


def split_peft_state(names: Iterable[str]) -> PeftState:
    """Sort the names of a PEFT state dict by role (metadata only)."""
    state = PeftState(base={}, saved={}, pairs={}, unsupported=[], adapters=set())
    for name in names:
        p = parse_peft_name(name)
        if p.adapter is not None:
            state.adapters.add(p.adapter)
        if p.role in (BASE, ORIGINAL):
            if p.hf_name in state.base:
                raise CorruptCheckpointError(f"{p.hf_name} is stored twice ({state.base[p.hf_name].source}, {name})")
            state.base[p.hf_name] = p
        elif p.role == SAVED:
            state.saved[p.hf_name] = p
        elif p.role == UNSUPPORTED:
            state.unsupported.append(p)
        else:
            embedding = p.role in (EMBEDDING_A, EMBEDDING_B)
            pair = state.pairs.setdefault(p.module, LoraPair(p.module, embedding))
            if p.role in (LORA_A, EMBEDDING_A):
                pair.a = p
            else:
                pair.b = p
    return state


def delta_shape(pair: LoraPair, a_shape: tuple[int, ...], b_shape: tuple[int, ...], fan_in_fan_out: bool
                ) -> tuple[int, ...]:
    """Shape of ``scaling * B @ A`` as added to the base weight."""
    if len(a_shape) != 2 or len(b_shape) != 2 or a_shape[0] != b_shape[1]:
        raise CorruptCheckpointError(f"{pair.module}: LoRA factors of shapes {list(a_shape)} and {list(b_shape)} "
                                     "do not multiply (only Linear and Embedding LoRA layers can be merged)")
    shape = (b_shape[0], a_shape[1])
    return shape[::-1] if (pair.embedding or fan_in_fan_out) else shape


def merge_lora_weight(weight: "torch.Tensor", a: "torch.Tensor", b: "torch.Tensor", scaling: float, *,
                      transpose: bool) -> "torch.Tensor":
    """``weight + scaling * (B @ A)`` as peft's merge computes it: the product in float32, cast
    to the factors' dtype, then added into the weight (IN PLACE: the caller hands over a tensor
    it owns, so no second copy of a large weight is made)."""
    import torch

    delta = b.to(torch.float32) @ a.to(torch.float32)
    if transpose:
        delta = delta.T
    delta = delta.mul_(scaling).to(a.dtype)  # in place: no second weight-sized temporary
    weight += delta
    return weight


__all__ = [
    "ADAPTER_CONFIG", "PEFT_PREFIX", "LoraConfig", "LoraPair", "PeftName", "PeftState", "delta_shape",
    "is_peft_state", "merge_lora_weight", "parse_adapter_config", "parse_peft_name", "split_peft_state",
]
