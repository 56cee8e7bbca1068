"""``diff``: how the model weights of two checkpoints differ, tensor by tensor, in bounded memory.

Each side (a step, a component, an HF export, or a tree: its chosen step) is seen as an export
would write it: its model tensors under HF names and in HF layout (:func:`ckptctl.ops.export.hf_tensors`:
FSDP names unwrapped, Megatron through the mcore -> HF mapping). So an FSDP or Megatron checkpoint
compares with its HF export, two steps with each other, a checkpoint with its reshard. Optimizer
state is not compared.

Names, shapes and dtypes come from metadata alone; then each common tensor is read from both
sides (the next pair read while this one is compared), compared in float64 chunks and dropped.
"""

from __future__ import annotations

import math
import re
import time
from contextlib import ExitStack
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator

from ckptctl.errors import CkptctlError, UsageError
from ckptctl.ops.export import (PREFETCH_SLOTS, ExportSummary, HfTensors, _prefetched, hf_tensors,
                                open_component_reader, read_model_config, resolve_component)
from ckptctl.storage import open_store
from ckptctl.tree import HF, MEGATRON, MODEL_COMPONENTS

#: Elements compared at a time: the float64 temporaries of one chunk stay a few tens of MiB.
CHUNK_ELEMENTS = 1 << 22
_LAYER_RE = re.compile(r"^(?P<layer>(?:.+\.)?layers\.\d+)\.(?P<rest>.+)$")
_PARAM_NAMES = ("weight", "bias")


def layer_of(name: str) -> str:
    """The row of the per-layer table a tensor rolls up into: ``model.layers.N`` for a decoder
    layer's tensors, else its module (``model.embed_tokens``, ``model.norm``, ``lm_head``)."""
    match = _LAYER_RE.match(name)
    return match["layer"] if match else _module_path(name)


def module_type_of(name: str) -> str:
    """The row of the per-module-type table: the module inside its layer (``self_attn.q_proj``,
    ``mlp.up_proj``, ``input_layernorm``), else the module's own name (``embed_tokens``, ``norm``)."""
    match = _LAYER_RE.match(name)
    if match:
        return _module_path(match["rest"])
    return _module_path(name).rsplit(".", 1)[-1]


def _module_path(name: str) -> str:
    head, _, last = name.rpartition(".")
    return head if head and last in _PARAM_NAMES else name


def _natural_key(name: str) -> list[tuple]:
    """``model.layers.2`` before ``model.layers.10``."""
    return [(0, int(part), "") if part.isdigit() else (1, 0, part) for part in name.split(".")]


@dataclass
class DiffStats:
    """Differences over a set of common tensors (one tensor, one layer or one module type).

    ``rel_change``: ‖A−B‖/‖A‖ with the set's tensors taken as one vector (Frobenius norms);
    ``max_abs_diff``: the largest |A−B| of any element; ``equal``: every element within the
    tolerances. Sums of squares are kept in float64."""

    name: str
    tensors: int = 0
    numel: int = 0
    max_abs_diff: float = 0.0
    equal: bool = True
    diff_sq: float = 0.0
    a_sq: float = 0.0

    @property
    def rel_change(self) -> float:
        if self.a_sq > 0:
            return math.sqrt(self.diff_sq) / math.sqrt(self.a_sq)
        return 0.0 if self.diff_sq == 0 else math.inf

    def add(self, other: "DiffStats") -> None:
        self.tensors += other.tensors
        self.numel += other.numel
        self.max_abs_diff = max(self.max_abs_diff, other.max_abs_diff)
        self.equal = self.equal and other.equal
        self.diff_sq += other.diff_sq
        self.a_sq += other.a_sq

    def to_dict(self) -> dict:
        return {"name": self.name, "tensors": self.tensors, "numel": self.numel, "max_abs_diff": self.max_abs_diff,
                "rel_change": self.rel_change, "equal": self.equal}


@dataclass
class DiffSide:
    path: str  # the component compared, as the user wrote its location
    backend: str
    component: str
    step: int | None = None

    def to_dict(self) -> dict:
        return dict(self.__dict__)


@dataclass
class Mismatch:
    """A tensor both sides have, with different shapes or dtypes (same shape: still compared)."""

    name: str
    a_shape: list[int]
    b_shape: list[int]
    a_dtype: str
    b_dtype: str

    def to_dict(self) -> dict:
        return dict(self.__dict__)


@dataclass
class DiffReport:
    a: DiffSide
    b: DiffSide
    atol: float
    rtol: float
    equal: bool = True  # every common tensor within tolerance, none missing, no mismatch
    compared: int = 0  # common tensors whose values were compared
    differing: int = 0  # of those, the ones not within tolerance
    only_in_a: list[str] = field(default_factory=list)
    only_in_b: list[str] = field(default_factory=list)
    mismatches: list[Mismatch] = field(default_factory=list)
    total: DiffStats = field(default_factory=lambda: DiffStats("all"))
    layers: list[DiffStats] = field(default_factory=list)
    modules: list[DiffStats] = field(default_factory=list)
    tensors: list[DiffStats] | None = None  # per tensor, when asked for
    notes: list[str] = field(default_factory=list)
    seconds: float = 0.0

    def to_dict(self) -> dict:
        out = {k: v for k, v in self.__dict__.items() if k not in ("a", "b", "mismatches", "total", "layers",
                                                                   "modules", "tensors")}
        out.update(a=self.a.to_dict(), b=self.b.to_dict(), mismatches=[m.to_dict() for m in self.mismatches],
                   total=self.total.to_dict(), layers=[s.to_dict() for s in self.layers],
                   modules=[s.to_dict() for s in self.modules],
                   tensors=None if self.tensors is None else [s.to_dict() for s in self.tensors])
        return out


def compare_tensors(name: str, a, b, *, atol: float = 0.0, rtol: float = 0.0) -> DiffStats:
    """Compare two tensors of the same shape elementwise: equal where |A−B| ≤ atol + rtol·|B|
    (NaN equals NaN and an infinity itself, as ``torch.isclose(equal_nan=True)``); a NaN against a
    number counts as an infinite difference. Works through float64 chunks of ``CHUNK_ELEMENTS``."""
    import torch

    flat_a, flat_b = a.reshape(-1), b.reshape(-1)
    stats = DiffStats(name, tensors=1, numel=flat_a.numel())
    for start in range(0, stats.numel, CHUNK_ELEMENTS):
        x = flat_a[start:start + CHUNK_ELEMENTS].to(torch.float64)
        y = flat_b[start:start + CHUNK_ELEMENTS].to(torch.float64)
        same = (x == y) | (x.isnan() & y.isnan())
        diff = torch.where(same, 0.0, (x - y).abs()).nan_to_num(nan=math.inf)
        stats.max_abs_diff = max(stats.max_abs_diff, float(diff.max()))
        stats.diff_sq += float(diff.square().sum())
        stats.a_sq += float(x.nan_to_num(nan=0.0, posinf=0.0, neginf=0.0).square().sum())
        if stats.equal:
            within = same | (diff.isfinite() & (diff <= atol + rtol * y.abs()))
            stats.equal = bool(within.all())
        del x, y, same, diff
    return stats


@dataclass
class _Side:
    label: str  # "A" or "B"
    info: DiffSide
    parent: Any  # the store rooted at the component's parent
    comp: Any
    summary: ExportSummary  # collects what the HF view leaves out


def _resolve(label: str, path: str, component: str | None, endpoint_url: str | None) -> _Side:
    store = open_store(path, endpoint_url=endpoint_url)
    parent, comp, step, _ = resolve_component(store, component)
    where = parent.url_of(comp.path)
    if not comp.complete:
        raise CkptctlError(f"{where} is incomplete: " + "; ".join(comp.problems))
    info = DiffSide(path=where, backend=comp.backend, component=comp.name, step=step)
    return _Side(label, info, parent, comp, ExportSummary(source=where, component=comp.name, backend=comp.backend,
                                                          destination=""))


def _view(side: _Side, reader) -> HfTensors:
    config = read_model_config(side.parent, side.comp) if side.comp.backend != HF else {}
    return hf_tensors(reader, side.comp, side.parent.child(side.comp.path), config, side.summary)


def _notes(sides: list[_Side], views: list[HfTensors]) -> list[str]:
    notes: list[str] = []
    left_out: dict[tuple[str, str], list[str]] = {}
    for side, view in zip(sides, views):
        for name, why in side.summary.skipped.items():
            left_out.setdefault((name, why), []).append(side.label)
        if side.comp.backend == MEGATRON:
            notes.extend(f"{side.label}: {w}" for w in side.summary.warnings)
        if view.lora is not None:
            notes.append(f"{side.label} is a LoRA model: its base weights are compared, not the adapter")
    for (name, why), labels in left_out.items():
        notes.append(f"not compared ({' and '.join(labels)}): {name}: {why}")
    return notes


def diff(a: str, b: str, *, atol: float = 0.0, rtol: float = 0.0, per_tensor: bool = False,
         component: str | None = None, endpoint_url: str | None = None,
         progress: Callable[[int, int], None] | None = None) -> DiffReport:
    """Compare the model weights of ``a`` and ``b`` (steps, components, HF exports or trees, of
    any backends, local or on object stores) under HF names.

    ``component``: policy or critic (default: policy; a component path is itself).
    ``progress(done, total)`` is called after each compared tensor."""
    started = time.perf_counter()
    if component is not None and component not in MODEL_COMPONENTS:
        raise UsageError(f"--component must be policy or critic, not {component!r}")
    for option, value in (("--atol", atol), ("--rtol", rtol)):
        if not value >= 0 or math.isinf(value):
            raise UsageError(f"{option} must be a finite number >= 0, not {value}")
    sides = [_resolve("A", a, component, endpoint_url), _resolve("B", b, component, endpoint_url)]
    report = DiffReport(a=sides[0].info, b=sides[1].info, atol=atol, rtol=rtol)

    with ExitStack() as stack:
        readers = [stack.enter_context(open_component_reader(s.parent, s.comp)) for s in sides]
        view_a, view_b = views = [_view(s, r) for s, r in zip(sides, readers)]
        report.notes = _notes(sides, views)
        specs_a, specs_b = dict(view_a.specs), dict(view_b.specs)
        report.only_in_a = [n for n in specs_a if n not in specs_b]
        report.only_in_b = [n for n in specs_b if n not in specs_a]
        # Read in the Megatron side's order, if any: its conversion steps then run once each.
        order = view_b.specs if sides[1].comp.backend == MEGATRON and sides[0].comp.backend != MEGATRON \
            else view_a.specs
        names = []
        for name, _ in order:
            if name not in specs_a or name not in specs_b:
                continue
            ia, ib = specs_a[name], specs_b[name]
            same_shape = tuple(ia.shape) == tuple(ib.shape)
            if not same_shape or ia.dtype != ib.dtype:
                report.mismatches.append(Mismatch(name, list(ia.shape), list(ib.shape), ia.dtype, ib.dtype))
            if same_shape:
                names.append(name)

        def pairs() -> Iterator[tuple[str, Any, Any]]:
            for name in names:
                yield name, view_a.read(name), view_b.read(name)

        per_layer: dict[str, DiffStats] = {}
        per_module: dict[str, DiffStats] = {}
        per_name: list[DiffStats] = []
        # Reading the next pair overlaps comparing this one (one reading thread uses both readers).
        compared = _prefetched(pairs(), PREFETCH_SLOTS)
        try:
            for done, (name, ta, tb) in enumerate(compared, start=1):
                stats = compare_tensors(name, ta, tb, atol=atol, rtol=rtol)
                del ta, tb
                for rollup, key in ((per_layer, layer_of(name)), (per_module, module_type_of(name))):
                    rollup.setdefault(key, DiffStats(key)).add(stats)
                report.total.add(stats)
                report.differing += not stats.equal
                if per_tensor:
                    per_name.append(stats)
                if progress:
                    progress(done, len(names))
        finally:
            compared.close()  # stops and joins the reading thread before the readers close

    report.compared = report.total.tensors
    report.layers = [per_layer[k] for k in sorted(per_layer, key=_natural_key)]
    report.modules = [per_module[k] for k in sorted(per_module, key=_natural_key)]
    if per_tensor:
        report.tensors = sorted(per_name, key=lambda s: _natural_key(s.name))
    report.equal = report.total.equal and not (report.only_in_a or report.only_in_b or report.mismatches)
    report.seconds = round(time.perf_counter() - started, 3)
    return report
