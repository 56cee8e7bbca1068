"""From a transformers 5 model's in-memory state dict to what its ``save_pretrained`` writes.

transformers 5 holds the routed experts of MoE classes fused in memory (``mlp.experts.gate_up_proj``
``[E, 2F, H]``: each expert's gate rows then its up rows; ``mlp.experts.down_proj`` ``[E, H, F]``)
and converts them back on save: one tensor per expert under the names serving engines read
(``mlp.experts.{e}.gate_proj.weight``, Mixtral's ``block_sparse_moe.experts.{e}.w1.weight``...),
some modules renamed (Mixtral's ``mlp.gate`` is saved as ``block_sparse_moe.gate``), the state dict
sorted by ``dot_natural_key`` before sharding, and the experts of one projection of one layer kept
in one shard (they share a storage). An FSDP checkpoint of such a model holds the in-memory form;
:func:`saved_layout` says, tensor by tensor, how to write it as ``save_pretrained`` would.

The per-architecture facts (saved names, fused in-memory names, which classes convert on save) are
the Megatron mapping's tables (:mod:`ckptctl.formats.mcore_to_hf`): one table per architecture.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Mapping, Sequence

from ckptctl.formats.mcore_to_hf import ArchSpec, UnsupportedArchitectureError, dot_natural_key, resolve_architecture

_LAYER_RE = re.compile(r"^model\.layers\.(\d+)\.(.+)$")


@dataclass(frozen=True)
class SavedTensor:
    """One tensor as save_pretrained writes it: ``source`` (an in-memory name) read whole, or with
    ``expert`` set only that expert (``rows``: its gate or up half)."""

    name: str
    shape: tuple[int, ...]
    source: str
    expert: int | None = None
    rows: tuple[int, int] | None = None
    shard_group: str | None = None


def _converting_spec(config: Mapping) -> ArchSpec | None:
    """The architecture's table when transformers converts its weights on save, else None."""
    try:
        spec = resolve_architecture(config)
    except UnsupportedArchitectureError:
        return None
    return spec if spec.sorted_save else None


def converts_on_save(config: Mapping) -> bool:
    return _converting_spec(config) is not None


def saved_layout(config: Mapping, tensors: Sequence[tuple[str, tuple[int, ...]]]) -> list[SavedTensor]:
    """The tensors ``save_pretrained`` writes for an in-memory state dict (``(name, shape)`` pairs
    under transformers' names), in its order. Architectures that do not convert on save keep
    their names and order."""
    spec = _converting_spec(config)
    if spec is None:
        return [SavedTensor(name, tuple(shape), name) for name, shape in tensors]
    renames = {memory: hf for rule in spec.layer_rules if rule.memory for memory, hf in zip(rule.memory, rule.hf)}
    fused = {rule.memory: [r for r in spec.experts if r.memory == rule.memory] for rule in spec.experts}
    keyed: list[tuple[tuple, SavedTensor]] = []
    for name, shape in tensors:
        shape = tuple(shape)
        layer = _LAYER_RE.match(name)
        rel = layer.group(2) if layer else None
        order = dot_natural_key(name)
        if rel in fused:
            prefix = f"model.layers.{layer.group(1)}."
            for rule in fused[rel]:
                experts, rows, cols = shape
                span = None if rule.part is None else (rule.part * rows // 2, (rule.part + 1) * rows // 2)
                out_shape = (rows if span is None else span[1] - span[0], cols)
                group = f"{name}:{rule.part or 0}"
                for e in range(experts):
                    keyed.append(((order, rule.part or 0, e),
                                  SavedTensor(prefix + rule.hf.format(e=e), out_shape, name, e, span, group)))
            continue
        saved = f"model.layers.{layer.group(1)}.{renames[rel]}" if rel in renames else name
        keyed.append(((order, 0, 0), SavedTensor(saved, shape, name)))
    keyed.sort(key=lambda item: item[0])
    return [tensor for _, tensor in keyed]
