"""``convert-reshard`` for SkyRL FSDP checkpoints: rewrite the per-rank files for a new world size.

SkyRL (like verl) loads an FSDP checkpoint only at the world size that saved it: every rank
``torch.load``\\ s ``{model,optim,extra_state}_world_size_{W}_rank_{R}.pt``. This writes, for a
new world size W, exactly the files FSDP2 ``fully_shard`` at W would have saved.

Source: one FSDP component (``policy/``, ``critic/``), or a step directory (``global_step_N/``:
every component is resharded; ``data.pt`` and any other step files are copied, and
``trainer_state.pt``, the step's completeness marker, is committed last).

What is written, per target rank r of W:

* ``model_world_size_{W}_rank_{r}.pt`` -- the state dict in the source's key order. A sharded
  parameter (a DTensor ``Shard(d)``, ``d`` kept from the source, 0 for FSDP2) becomes a DTensor
  holding rows ``[r*c, min((r+1)*c, n))`` of dim ``d`` with ``c = ceil(n / W)`` (``torch.chunk``
  semantics, what DTensor/FSDP2 use: trailing ranks may hold fewer or ZERO rows, no padding),
  on a 1-D mesh ``("fsdp",)`` of W ranks (device type: see below). An HSDP source ``(Replicate(), Shard(0))`` on a
  ``("ddp", "fsdp")`` mesh also becomes a 1-D mesh of W (resume it with ``fsdp_size: -1``).
  Replicated plain tensors (buffers such as ``rotary_emb.inv_freq``) are rank 0's copy on every
  rank; tied parameters stay one object under both keys (as ``state_dict()`` returns them).
  At W=1 the output keeps the source's kind: DTensors on a 1-rank mesh (what ``fully_shard``
  saves on one GPU) from a sharded source, plain tensors from a plain single-GPU source;
  ``w1_plain`` forces one. A plain source resharded to W>1 gets DTensors ``Shard(0)`` for its
  parameters (found as the reader classifies them), plain copies for its buffers.
* ``optim_world_size_{W}_rank_{r}.pt`` -- ``optimizer.state_dict()``: ``state`` keyed by the
  same integer parameter indices, every DTensor moment (``exp_avg``, ``exp_avg_sq``, ...)
  rechunked like its parameter, plain tensors (``step``) and other values copied,
  ``param_groups`` copied. FSDP1 (``use_orig_params=False``) optimizer state holds shards of
  flattened parameters whose layout depends on the wrapping and W: it cannot be resharded;
  that is an error unless ``drop_optimizer`` (then no optimizer files are written, which SkyRL
  resumes with a fresh optimizer). An empty ``{}`` optimizer file stays ``{}``.
* ``extra_state_world_size_{W}_rank_{r}.pt`` -- :data:`RNG_RULE`: target rank r takes source
  rank ``r mod W_src``'s whole extra state (LR scheduler, RNG streams, client state, ...) with
  its ``world_size`` / ``rank`` fields (where present) set to W and r. The scheduler state is
  the same on every rank and kept as is. With W > W_src several ranks resume the same RNG
  streams (reported as a warning); with W < W_src the streams of ranks >= W are dropped.
* ``fsdp_config.json`` -- the source's, ``world_size`` set to W (SkyRL's ``fsdp_strategy`` or
  verl's ``FSDP_version`` variant kept; absent stays absent); ``huggingface/``,
  ``lora_adapter/`` and every other file are copied.

Not supported (clear errors): the documented single-file layout (``model_state.pt``: no
per-rank files), legacy ``ShardedTensor`` state (FSDP1 without a device mesh), DTensors
sharded on more than one mesh dimension, Megatron components (see ``reshard_megatron``).

Streaming and memory: target ranks are written one at a time, each file built in memory for
``torch.save`` (the trainer loads single pickle files). Every tensor is read as just the rows
the target rank holds, by ranged reads of the source shards that overlap them (a meta tensor
from :class:`~ckptctl.formats.torchzip.TorchZipFile` narrowed to the rows, then
materialised), so peak memory is about one target rank's model (or optimizer) file, and the
source is read about once per target rank's share. Small replicated tensors are read once.
Every byte read is CRC-checked: a shard read in row ranges by several target ranks adds its
parts up, and what no target rank needed (padding) is read before the commit, so a corrupted
source fails the run instead of being re-saved under fresh, valid CRCs. From an object store
those ranged reads are planned from the metadata and read ahead
(:meth:`_ComponentJob.planned_reads`, :class:`ckptctl.ops.transfer.ReadAheadScope`;
``concurrency`` / ``max_memory`` as export-hf's); to one, a rank's files upload while the next
rank is written.

DTensors without a process group: the target mesh is a real
:class:`~torch.distributed.device_mesh.DeviceMesh` built with ``_init_backend=False`` and
``_rank=r`` (no process group is created or needed), with ``_dim_group_names`` of the world
group (``["0"]``), as ``init_device_mesh`` on W ranks pickles it; a DTensor is
``DTensor(local, DTensorSpec(mesh, placements, TensorMeta(global shape, stride, dtype)))``
with a CPU local tensor (SkyRL loads with ``map_location="cpu"`` anyway). The pickled objects
are what FSDP2 saves (checked by the tests against real saves; only the cached ``_hash``
fields, process-specific anyway, are left to be recomputed), load with
``torch.load(weights_only=True)``, and load into a real FSDP2 model at W with ``strict=True``.
The mesh's DEVICE TYPE must be the resuming run's: FSDP2 copies a loaded DTensor into its
parameter only across equal meshes ("cannot run ... across different mesh" otherwise), so
it is taken from the source's mesh (a GPU run's checkpoint says "cuda"), "cuda" for a plain
source, or given (``device_type``).

Output safety is :class:`~ckptctl.output_dir.OutputDir`: a non-empty destination is refused
unless ``overwrite``; never inside the source; locally a temp sibling renamed into place; on
S3/GCS every rank file is uploaded as soon as it is written, and the files that make the
output look complete are uploaded last: each component's rank-0 model file (a component
without it is incomplete for ``ckptctl`` and SkyRL alike), after ``fsdp_config.json``, and
for a step ``trainer_state.pt`` at the very end. A killed run leaves nothing complete-looking,
and a rerun replaces its leftovers.
"""

from __future__ import annotations

import json
import os
import posixpath
import re
import shutil
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, Iterable, Iterator

from ckptctl.errors import CkptctlError, NotACheckpointError, UsageError
from ckptctl.formats.base import MODEL, OPTIMIZER, TensorInfo
from ckptctl.formats import safe_load
from ckptctl.formats.safe_load import CorruptCheckpointError
from ckptctl.formats.side_files import is_checked, read_side_file
from ckptctl.ops.export import STEP, TREE, component_at, locate
from ckptctl.ops.transfer import BackgroundPublish, ReadAheadScope, Transfer
from ckptctl.formats.manifest import ManifestCheck
from ckptctl.output_dir import OUTPUT_MARKER, RESHARD, OutputDir, refuse_overlap
from ckptctl.storage import Store, open_local_for_writing, open_store, write_local_file
from ckptctl.tree import FSDP, FSDP_RANK_FILE_RE, FSDP_SINGLE, UNKNOWN, Component, parse_step_name

if TYPE_CHECKING:  # pragma: no cover
    import torch

    from ckptctl.formats.fsdp import FsdpReader
    from ckptctl.formats.torchzip import TorchZipFile

CONFIG_FILE = "fsdp_config.json"
TRAINER_STATE = "trainer_state.pt"
MESH_DIM_NAME = "fsdp"
#: The process-group name ``init_device_mesh`` records for a 1-D mesh over the whole world.
WORLD_GROUP_NAME = "0"
#: Plain (replicated) tensors up to this size are read once per component, not once per rank,
#: up to CACHE_TOTAL bytes in all.
CACHE_LIMIT = 16 * 1024 * 1024
CACHE_TOTAL = 256 * 1024 * 1024
OPTIMIZER_PREFIX = "optimizer.state."
#: Device type of the target meshes when the source has none (plain tensors): SkyRL trains on GPUs.
DEFAULT_DEVICE_TYPE = "cuda"
#: ``--device-type`` values: the device types a DeviceMesh of a training run can have (CPU/gloo,
#: NVIDIA/AMD GPUs, Intel XPU, Gaudi HPU, Ascend NPU, MTIA).
DEVICE_TYPES = ("cuda", "cpu", "xpu", "hpu", "npu", "mtia")

RNG_RULE = ("target rank r takes the extra state of source rank r mod W_source (RNG streams cpu/numpy/"
            "random/cuda, lr_scheduler, client_state, ...); its world_size and rank fields are set to W and r")

_SHARD_RE = re.compile(r"^Shard\(dim=(-?\d+)\)$")


# ---------------------------------------------------------------------------------------------
# results
# ---------------------------------------------------------------------------------------------
@dataclass
class ComponentReshard:
    """What was done to one component."""

    name: str
    source: str
    source_world_size: int
    world_size: int
    strategy: str | None
    source_mesh: dict | None  # {"shape": [...], "dim_names": [...]} or None (plain tensors)
    target_mesh: dict | None  # None: plain tensors (W=1 without FSDP)
    optimizer: str  # "resharded" | "dropped" | "empty" | "absent"
    model_tensors: int = 0
    optimizer_tensors: int = 0
    tensors_sharded: int = 0  # per target rank file: DTensors rechunked
    tensors_replicated: int = 0  # plain tensors copied to every rank
    files: list[str] = field(default_factory=list)  # relative to the output (step: with the component prefix)
    copied: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        return dict(self.__dict__)


@dataclass
class ReshardSummary:
    source: str
    destination: str
    kind: str  # "component" | "step"
    source_world_size: int
    world_size: int
    step: int | None = None
    components: list[ComponentReshard] = field(default_factory=list)
    optimizer: str = "absent"  # of the components: resharded | dropped | empty | absent | mixed
    rng_rule: str = RNG_RULE
    bytes: int = 0  # tensor data written (all target ranks)
    files: list[str] = field(default_factory=list)
    copied: list[str] = field(default_factory=list)  # files copied unchanged
    warnings: list[str] = field(default_factory=list)
    replaced: str | None = None
    seconds: float = 0.0

    def to_dict(self) -> dict:
        out = dict(self.__dict__)
        out["components"] = [c.to_dict() for c in self.components]
        return out


# ---------------------------------------------------------------------------------------------
# DTensors without a process group
# ---------------------------------------------------------------------------------------------
def target_mesh(world_size: int, rank: int, dim_name: str = MESH_DIM_NAME, device_type: str = "cuda"):
    """The 1-D DeviceMesh ``init_device_mesh(device_type, (W,), mesh_dim_names=(name,))`` builds
    on rank ``rank``, made without a process group (and without the device: a "cuda" mesh is
    only its type name until used). The device type matters: FSDP2 copies a loaded DTensor
    into its parameter only when the two meshes are equal, device type included."""
    import torch
    from torch.distributed.device_mesh import DeviceMesh

    try:
        mesh = DeviceMesh(device_type, torch.arange(world_size), mesh_dim_names=(dim_name,), _init_backend=False,
                          _rank=rank)
    except TypeError as exc:  # a torch whose private constructor changed
        raise CkptctlError(f"this torch ({torch.__version__}) cannot build a DeviceMesh without a process group: "
                           f"{exc}") from exc
    mesh._dim_group_names = [WORLD_GROUP_NAME]
    return mesh


def make_dtensor(local: "torch.Tensor", mesh, placements: tuple, shape: tuple[int, ...]) -> "torch.Tensor":
    """A DTensor of global ``shape`` whose piece on ``mesh``'s rank is ``local``."""
    import torch
    from torch.distributed.tensor import DTensor
    from torch.distributed.tensor._dtensor_spec import DTensorSpec, TensorMeta

    stride = torch.empty(shape, dtype=local.dtype, device="meta").stride()
    spec = DTensorSpec(mesh, tuple(placements), TensorMeta(torch.Size(shape), stride, local.dtype))
    return DTensor(local, spec, requires_grad=False)


def chunk_range(n: int, parts: int, index: int) -> tuple[int, int]:
    """Rows ``[start, stop)`` of piece ``index`` when ``n`` rows are split ``torch.chunk``-style
    into ``parts`` (what DTensor ``Shard`` does: trailing pieces may be short or empty)."""
    size = -(-n // parts) if n else 0
    start = min(size * index, n)
    return start, min(start + size, n)


# ---------------------------------------------------------------------------------------------
# reading rows of a global tensor
# ---------------------------------------------------------------------------------------------
class _SourceFiles:
    """The source rank files, metadata-first (one :class:`TorchZipFile` each), and ranged reads
    of any box of a global tensor from the pieces that overlap it."""

    def __init__(self, reader: "FsdpReader", sizes: dict[str, int]):
        self.store = reader.store
        self.sizes = sizes
        self.extra_stand_ins = reader.extra_stand_ins
        # The reader's own cache of open files (FsdpReader has no public accessor for it): the
        # rank-0 files whose metadata it already parsed are not fetched and unpickled again.
        self._zips: dict[str, "TorchZipFile"] = reader._zips

    def zip(self, rel: str) -> "TorchZipFile":
        from ckptctl.formats.torchzip import TorchZipFile

        zf = self._zips.get(rel)
        if zf is None:
            zf = TorchZipFile(self.store, rel, size=self.sizes.get(rel), extra_stand_ins=self.extra_stand_ins)
            self._zips[rel] = zf
        return zf

    def tree(self, rel: str) -> Any:
        return self.zip(rel).metadata()

    def _box_parts(self, info: TensorInfo, path: tuple, box: tuple[tuple[int, int], ...]
                   ) -> Iterator[tuple["TorchZipFile", "torch.Tensor", tuple[slice, ...]]]:
        """For each piece overlapping ``box``: (its file, the meta tensor of its part inside the
        box, where that part goes in the box)."""
        import torch

        dtype = getattr(torch, info.dtype)
        for piece in info.pieces:
            lo = [max(a, o) for (a, _), o in zip(box, piece.offsets)]
            hi = [min(b, o + s) for (_, b), o, s in zip(box, piece.offsets, piece.sizes)]
            if any(h <= l for l, h in zip(lo, hi)) and len(box):
                continue
            zf = self.zip(piece.file)
            value = _lookup(zf.metadata(), path, zf.name, info.name)
            local = value._local_tensor if safe_load.is_dtensor(value) else value
            if not isinstance(local, torch.Tensor) or tuple(local.shape) != tuple(piece.sizes) \
                    or local.dtype != dtype:
                got = ((tuple(local.shape), str(local.dtype)) if isinstance(local, torch.Tensor)
                       else type(local).__name__)
                raise CorruptCheckpointError(f"{zf.name}: {info.name}: holds {got}, expected {tuple(piece.sizes)} "
                                             f"{info.dtype}")
            view = local
            for d, (l, h, o) in enumerate(zip(lo, hi, piece.offsets)):
                if l - o != 0 or h - o != view.shape[d]:
                    view = view.narrow(d, l - o, h - l)
            yield zf, view, tuple(slice(l - a, h - a) for l, h, (a, _) in zip(lo, hi, box))

    def read_box(self, info: TensorInfo, path: tuple, box: tuple[tuple[int, int], ...]) -> "torch.Tensor":
        """``global[box]`` (one (start, stop) per dim) of the tensor ``info`` describes, whose
        local piece sits at ``path`` in each piece's file."""
        import torch

        out = torch.empty(tuple(b - a for a, b in box), dtype=getattr(torch, info.dtype))
        for zf, view, where in self._box_parts(info, path, box):
            # rows of a shard: partial reads whose CRC checks add up across target ranks
            zf.materialize_into(view, out[where], name=info.name, partial=True)
        return out

    def planned_box_reads(self, info: TensorInfo, path: tuple, box: tuple[tuple[int, int], ...],
                          started: set) -> list[tuple[str, int, int]]:
        """``(file, start, end)`` of the ranged reads :meth:`read_box` makes: per part, the bytes
        it spans, from the record's local header on for the first read of a record (which
        checks that header; ``started``: the records planned so far, updated)."""
        plan = []
        for zf, view, _ in self._box_parts(info, path, box):
            if view.device.type != "meta" or not view.numel():
                continue
            loc = zf.location(view)
            record = loc.storage
            if not record.stored or loc.byte_end == loc.byte_start:
                continue
            first = (zf.rel, record.key) not in started
            started.add((zf.rel, record.key))
            start = record.header_offset if first else record.data_offset + loc.byte_start
            plan.append((zf.rel, start, record.data_offset + loc.byte_end))
        return plan

    def finish_crc_checks(self) -> None:
        """Finish the CRC checks of every source record read in parts (reads what no target rank
        needed, e.g. padding): a corrupt source fails here, before the commit."""
        for zf in list(self._zips.values()):
            zf.finish_crc_checks()


def _lookup(tree: Any, path: tuple, file: str, name: str) -> Any:
    obj = tree
    try:
        for key in path:
            obj = obj[key]
    except (KeyError, IndexError, TypeError):
        raise CorruptCheckpointError(f"{file}: no {name}") from None
    return obj


def _plain_data(obj: Any, zf: "TorchZipFile", what: str) -> Any:
    """A copy of non-tensor state (param_groups, plain state values) with meta tensors read;
    refuses objects ckptctl kept as data (re-saving them would not give the original object)."""
    import torch

    from ckptctl.formats import safe_load

    if isinstance(obj, (safe_load.PickledObject, safe_load.TensorStandIn)):
        raise CkptctlError(f"{zf.name}: {what} holds a {obj.qualname}, which ckptctl cannot write back")
    if isinstance(obj, torch.Tensor):
        return zf.materialize(obj, name=what).clone()
    if isinstance(obj, OrderedDict):
        return OrderedDict((k, _plain_data(v, zf, what)) for k, v in obj.items())
    if isinstance(obj, dict):
        return {k: _plain_data(v, zf, what) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_plain_data(v, zf, what) for v in obj]
    if isinstance(obj, tuple):
        return tuple(_plain_data(v, zf, what) for v in obj)
    return obj


def _mesh_device_type(tree: Any) -> str | None:
    """The device type of the first DTensor's mesh in a state dict tree (None: no DTensor)."""
    for value in tree.values() if isinstance(tree, dict) else ():
        if safe_load.is_dtensor(value):
            return str(value.device_mesh.__dict__.get("_device_type") or "") or None
    return None


def _has_stand_ins(obj: Any) -> bool:
    from ckptctl.formats import safe_load

    if isinstance(obj, (safe_load.PickledObject, safe_load.TensorStandIn)):
        return True
    if isinstance(obj, dict):
        return any(_has_stand_ins(k) or _has_stand_ins(v) for k, v in obj.items())
    if isinstance(obj, (list, tuple, set, frozenset)):
        return any(_has_stand_ins(v) for v in obj)
    return False


# ---------------------------------------------------------------------------------------------
# one component: plan, then write rank by rank
# ---------------------------------------------------------------------------------------------
@dataclass
class _Slot:
    """How one tensor of the source becomes the target's."""

    info: TensorInfo
    path: tuple  # key path in the source file tree
    how: str  # "shard" | "replicate_dtensor" | "plain" | "tied"
    dim: int = 0  # the sharded dim ("shard")
    tied_to: str | None = None

    def target_bytes(self, world: int) -> int:
        if self.how == "tied":
            return 0
        return self.info.nbytes if self.how == "shard" else self.info.nbytes * world


def _shard_dim(info: TensorInfo) -> int | None:
    """The tensor dim a DTensor is sharded on (None: replicated on every mesh dim)."""
    dims = []
    for p in info.placements:
        m = _SHARD_RE.match(p)
        if m:
            d = int(m.group(1))
            dims.append(d + len(info.shape) if d < 0 else d)
        elif p != "Replicate()":
            raise UsageError(f"{info.name}: placement {p} cannot be resharded (only Shard(d) and Replicate())")
    if len(dims) > 1:
        raise UsageError(f"{info.name}: sharded on {len(dims)} mesh dimensions {info.placements}; only one "
                         "sharded mesh dimension (FSDP / HSDP) can be resharded")
    return dims[0] if dims else None


class _ComponentJob:
    """Plans (and validates, before anything is written) the reshard of one FSDP component,
    then writes its target files into a staging directory."""

    def __init__(self, comp_store: Store, comp: Component, name: str, world_size: int, *, drop_optimizer: bool,
                 w1_plain: bool | None, device_type: str | None, extra_stand_ins: tuple[str, ...]):
        from ckptctl.formats.fsdp import FsdpReader

        self.store = comp_store
        self.name = name
        self.world = world_size
        self.warnings: list[str] = []
        if comp.backend == FSDP_SINGLE:
            raise UsageError(f"{comp_store.url}: the documented single-file layout (model_state.pt) has no per-rank "
                             "files to reshard")
        if comp.backend != FSDP:
            raise UsageError(f"{comp_store.url}: a {comp.backend} component; convert-reshard --world-size is for "
                             "FSDP checkpoints")
        if not comp.complete:
            raise CkptctlError(f"{comp_store.url} is incomplete: " + "; ".join(comp.problems))
        reader = FsdpReader(comp_store, extra_stand_ins=extra_stand_ins)
        infos = {t.name: t for t in reader.tensors()}
        summary = reader.summary()
        self.source_world = reader.world_size
        self.strategy = summary.get("strategy")
        self.config = summary.get("fsdp_config")
        if isinstance(self.config, dict) and "error" in self.config:
            read_side_file(comp_store, CONFIG_FILE)  # invalid JSON: refused (raises), never dropped or copied
        self.source_mesh = summary.get("mesh")
        self.files = summary.get("files") or {}
        self.src = _SourceFiles(reader, {f.path: f.size for f in comp.files})
        self.copy_files = [f.path for f in comp.files  # (a resharded source's marker is not carried over)
                           if not FSDP_RANK_FILE_RE.match(f.path) and f.path not in (CONFIG_FILE, OUTPUT_MARKER)]

        model = [t for t in infos.values() if t.group == MODEL]
        if any(t.layout == "sharded_tensor" for t in model):
            raise UsageError(f"{comp_store.url}: legacy ShardedTensor state (FSDP1 without a device mesh) cannot be "
                             "resharded: ckptctl writes DTensor state only")
        sharded_source = any(t.layout == "dtensor" for t in model)
        if w1_plain is None:
            w1_plain = not sharded_source
        self.plain_out = world_size == 1 and w1_plain

        # the model file: the source rank 0 tree in order
        model_rel = self._rank_file("model", 0)
        tree = self.src.tree(model_rel)
        if not isinstance(tree, dict):
            raise CorruptCheckpointError(f"{comp_store.url_of(model_rel)}: not a state dict")
        self.model_tree = tree
        self.source_device_type = _mesh_device_type(tree)
        self.device_type = device_type or self.source_device_type or DEFAULT_DEVICE_TYPE
        if not device_type and not self.source_device_type and not self.plain_out:
            self.warnings.append(f"{name}: the source holds plain tensors (no device mesh): the target meshes say "
                                 f"device type '{DEFAULT_DEVICE_TYPE}'; pass the device type of the run that resumes "
                                 "it if it is not a GPU run")
        self.target_mesh = (None if self.plain_out else
                            {"shape": [world_size], "dim_names": [self._dim_name()], "device_type": self.device_type})
        if self.source_mesh and len(self.source_mesh.get("shape") or []) > 1 and not self.plain_out:
            self.warnings.append(f"{name}: the source mesh {tuple(self.source_mesh['shape'])} "
                                 f"{tuple(self.source_mesh['dim_names'])} (HSDP) becomes a 1-D ('{self._dim_name()}',) "
                                 f"mesh of {world_size}: resume with fsdp_size -1 (or >= {world_size})")

        tied = (summary.get("model") or {}).get("tied") or {}
        buffers = set((summary.get("model") or {}).get("buffers") or [])
        self.params = [t.name for t in model if t.name not in tied and t.name not in buffers]
        param_set = set(self.params)

        self.model_slots: dict[Any, _Slot | None] = OrderedDict()
        for key in tree:
            info = infos.get(key) if isinstance(key, str) else None
            if info is None:
                self.model_slots[key] = None  # a non-tensor entry: copied
                continue
            if key in tied:
                self.model_slots[key] = _Slot(info, (key,), "tied", tied_to=tied[key])
            else:
                self.model_slots[key] = self._slot(info, (key,), shard_plain=key in param_set)

        # the optimizer
        self.optimizer = "absent"
        self.optim_slots: dict[tuple, _Slot | None] = {}
        self.optim_tree: Any = None
        optim_infos = {n: t for n, t in infos.items() if t.group == OPTIMIZER}
        if self.files.get("optim"):
            otree = self.src.tree(self._rank_file("optim", 0))
            self.optim_tree = otree
            if not otree:
                self.optimizer = "empty"
            elif drop_optimizer:
                self.optimizer = "dropped"
            else:
                self._plan_optimizer(otree, optim_infos, infos, param_set)
                self.optimizer = "resharded"
        if world_size > self.source_world and self.files.get("extra_state"):
            self.warnings.append(f"{name}: {world_size} ranks resume the RNG streams of {self.source_world} source "
                                 f"ranks: rank r takes rank r mod {self.source_world}'s, so some ranks share streams")

    # -- planning helpers ---------------------------------------------------------------
    def _dim_name(self) -> str:
        names = (self.source_mesh or {}).get("dim_names") or []
        return names[-1] if names else MESH_DIM_NAME

    @property
    def writes_config(self) -> bool:
        """Whether the source's ``fsdp_config.json`` is rewritten (absent or invalid: not)."""
        return isinstance(self.config, dict) and "error" not in self.config

    def _rank_file(self, kind: str, rank: int) -> str:
        return f"{kind}_world_size_{self.source_world}_rank_{rank}.pt"

    def target_file(self, kind: str, rank: int) -> str:
        return f"{kind}_world_size_{self.world}_rank_{rank}.pt"

    def _slot(self, info: TensorInfo, path: tuple, *, shard_plain: bool, like: TensorInfo | None = None) -> _Slot:
        if info.layout == "dtensor":
            dim = _shard_dim(info)
            if self.plain_out:
                return _Slot(info, path, "plain")
            if dim is None:
                return _Slot(info, path, "replicate_dtensor")
            return _Slot(info, path, "shard", dim=dim)
        if info.layout in ("replicated", "plain"):
            if shard_plain and info.layout == "plain" and not self.plain_out:
                # a single-GPU source's parameter (or its moment): FSDP2 shards it on dim 0
                if like is not None and tuple(info.shape) != tuple(like.shape):
                    return _Slot(info, path, "plain")
                return _Slot(info, path, "shard", dim=0) if len(info.shape) else _Slot(info, path, "replicate_dtensor")
            return _Slot(info, path, "plain")
        raise UsageError(f"{self.store.url}: {info.name} is stored as {info.layout!r}, which cannot be resharded")

    def _plan_optimizer(self, otree: Any, optim_infos: dict[str, TensorInfo], infos: dict[str, TensorInfo],
                        param_set: set[str]) -> None:
        import torch

        url = self.store.url
        if any(t.layout == "flat_shards" for t in optim_infos.values()) or self.strategy == "fsdp":
            raise UsageError(f"{url}: FSDP1 optimizer state (flattened-parameter shards) cannot be resharded; pass "
                             "--drop-optimizer to write the model and extra state without it (the trainer then "
                             "starts a fresh optimizer)")
        if not isinstance(otree, dict) or not isinstance(otree.get("state"), dict):
            raise UsageError(f"{url}: the optimizer files do not hold an optimizer.state_dict(); pass "
                             "--drop-optimizer to leave them out")
        for index, per_param in otree["state"].items():
            if not isinstance(per_param, dict):
                continue
            label = self.params[index] if isinstance(index, int) and 0 <= index < len(self.params) else None
            for key, value in per_param.items():
                if not isinstance(value, torch.Tensor):  # a DTensor is one
                    self.optim_slots[(index, key)] = None
                    continue
                candidates = ([f"{OPTIMIZER_PREFIX}{label}.{key}"] if label else []) + \
                    [f"{OPTIMIZER_PREFIX}{index}.{key}"]
                info = next((optim_infos[c] for c in candidates if c in optim_infos), None)
                if info is None:
                    raise CorruptCheckpointError(f"{url}: optimizer state {index}.{key} is not in the reader's "
                                                 "tensor list")
                if info.layout == "plain" and len(info.shape) and label is None:
                    raise UsageError(f"{url}: optimizer state {index}.{key} {info.shape} does not map to a parameter; "
                                     "pass --drop-optimizer")
                like = infos.get(label) if label else None
                self.optim_slots[(index, key)] = self._slot(info, ("state", index, key),
                                                            shard_plain=label in param_set, like=like)

    # -- sizes ---------------------------------------------------------------------------
    def _tensor_slots(self, optimizer: bool = True) -> list[_Slot]:
        """The slots of the tensors written: the model's, and (``optimizer``) the resharded optimizer's."""
        slots = [s for s in self.model_slots.values() if s is not None]
        if optimizer and self.optimizer == "resharded":
            slots += [s for s in self.optim_slots.values() if s is not None]
        return slots

    def total_bytes(self) -> int:
        return sum(s.target_bytes(self.world) for s in self._tensor_slots())

    # -- writing -------------------------------------------------------------------------
    def write(self, staging: str, prefix: str, publish: Callable[[list[str]], None],
              on_bytes: Callable[[int], None], transfer: Transfer | None = None,
              remote_out: bool = False) -> tuple[list[str], list[str]]:
        """Write every target file below ``staging/prefix``; returns (written, copied) paths
        relative to ``staging``. ``publish`` is called with each finished rank file except
        rank 0's model file (committed last). ``transfer``: on an object store, the source's
        tensor data is read ahead (:meth:`planned_reads`) and, with ``remote_out`` (the
        destination is one too), rank files upload while the next rank is written."""
        transfer = transfer or Transfer.make()
        read_budget, _ = transfer.budgets(not self.src.store.is_local, remote_out)
        background = remote_out and transfer.concurrency > 1
        with ReadAheadScope() as read_ahead, BackgroundPublish(publish, background) as published:
            if read_budget and transfer.concurrency > 1 and not self.src.store.is_local:
                read_ahead.start(self.src.store, self.planned_reads(), read_budget, transfer.concurrency)
            return self._write(staging, prefix, published, on_bytes)

    def _write(self, staging: str, prefix: str, publish: Callable[[list[str]], None],
               on_bytes: Callable[[int], None]) -> tuple[list[str], list[str]]:
        import torch

        base = os.path.join(staging, *prefix.split("/")) if prefix else staging
        os.makedirs(base, exist_ok=True)
        written: list[str] = []
        cache: dict[tuple, torch.Tensor] = {}
        for rank in range(self.world):
            mesh = None if self.plain_out else target_mesh(self.world, rank, self._dim_name(), self.device_type)
            files = []
            sd = self._model_state(rank, mesh, cache, on_bytes)
            files.append(self._save(sd, base, self.target_file("model", rank)))
            del sd
            if self.optimizer in ("resharded", "empty"):
                osd = self._optim_state(rank, mesh, cache, on_bytes) if self.optimizer == "resharded" else {}
                files.append(self._save(osd, base, self.target_file("optim", rank)))
                del osd
            if self.files.get("extra_state"):
                files.append(self._extra_state(rank, base))
            rels = [posixpath.join(prefix, f) for f in files]
            written += rels
            publish([r for r in rels if posixpath.basename(r) != self.target_file("model", 0)])
        if isinstance(publish, BackgroundPublish):
            publish.wait()  # the last rank's files are up before anything else is published
        self.src.finish_crc_checks()
        if self.writes_config:
            with open(os.path.join(base, CONFIG_FILE), "w", encoding="utf-8") as f:
                json.dump({**self.config, "world_size": self.world}, f, indent=4)
            written.append(posixpath.join(prefix, CONFIG_FILE))
        for rel in self.copy_files:
            _copy_file(self.store, rel, os.path.join(base, *rel.split("/")), self.src.extra_stand_ins)
        return written, [posixpath.join(prefix, rel) for rel in self.copy_files]

    @staticmethod
    def _save(obj: Any, base: str, name: str) -> str:
        import torch

        # by path, as FSDP checkpoints are saved: torch names the archive inside after the file
        # (saved into a file object it would be "archive"), at the cost of writing in large pieces
        torch.save(obj, os.path.join(base, name))
        return name

    def _tensor(self, slot: _Slot, rank: int, mesh, cache: dict, on_bytes: Callable[[int], None]):
        info = slot.info
        shape = tuple(info.shape)
        if slot.how == "shard":
            start, stop = chunk_range(shape[slot.dim], self.world, rank)
            box = tuple((start, stop) if d == slot.dim else (0, n) for d, n in enumerate(shape))
            local = self.src.read_box(info, slot.path, box)
            on_bytes(local.numel() * local.element_size())
            from torch.distributed.tensor import Shard

            return make_dtensor(local, mesh, (Shard(slot.dim),), shape)
        key = (info.group, info.name)
        full = cache.get(key)
        if full is None:
            full = self.src.read_box(info, slot.path, tuple((0, n) for n in shape))
            if self._cacheable(info, sum(t.numel() * t.element_size() for t in cache.values())):
                cache[key] = full
        on_bytes(info.nbytes)
        if slot.how == "replicate_dtensor":
            from torch.distributed.tensor import Replicate

            return make_dtensor(full.clone(), mesh, (Replicate(),), shape)
        return full

    def _cacheable(self, info: TensorInfo, cached_bytes: int) -> bool:
        """Whether a whole (replicated) tensor read for one target rank is kept for the others."""
        return self.world > 1 and info.nbytes <= CACHE_LIMIT and cached_bytes + info.nbytes <= CACHE_TOTAL

    def _rank_slots(self) -> list[_Slot]:
        """The slots :meth:`_model_state` and :meth:`_optim_state` read, in their order."""
        slots = [s for s in self.model_slots.values() if s is not None and s.how != "tied"]
        if self.optimizer == "resharded":
            for index, per_param in self.optim_tree["state"].items():
                if isinstance(per_param, dict):
                    slots += [self.optim_slots[(index, key)] for key in per_param
                              if self.optim_slots.get((index, key)) is not None]
        return slots

    def planned_reads(self) -> list[tuple[str, int, int]]:
        """``(file, start, end)`` of the ranged reads :meth:`write` makes of the source's tensor
        data, in order (target rank by rank: its rows of each tensor; a replicated tensor once
        while it is kept for the next ranks): the plan of a read-ahead."""
        plan: list[tuple[str, int, int]] = []
        started: set = set()
        cached: dict[tuple, int] = {}
        slots = self._rank_slots()
        for rank in range(self.world):
            for slot in slots:
                info, shape = slot.info, tuple(slot.info.shape)
                if slot.how == "shard":
                    start, stop = chunk_range(shape[slot.dim], self.world, rank)
                    box = tuple((start, stop) if d == slot.dim else (0, n) for d, n in enumerate(shape))
                elif (info.group, info.name) in cached:
                    continue
                else:
                    box = tuple((0, n) for n in shape)
                    if self._cacheable(info, sum(cached.values())):
                        cached[(info.group, info.name)] = info.nbytes
                plan += self.src.planned_box_reads(info, slot.path, box, started)
        return plan

    def _model_state(self, rank: int, mesh, cache: dict, on_bytes) -> "OrderedDict":
        zf = self.src.zip(self._rank_file("model", 0))
        out: OrderedDict = OrderedDict()
        for key, slot in self.model_slots.items():
            if slot is None:
                out[key] = _plain_data(self.model_tree[key], zf, f"state dict entry {key!r}")
            elif slot.how == "tied":
                if slot.tied_to not in out:
                    raise CorruptCheckpointError(f"{self.store.url}: {key} is tied to {slot.tied_to}, which comes "
                                                 "after it")
                out[key] = out[slot.tied_to]
            else:
                out[key] = self._tensor(slot, rank, mesh, cache, on_bytes)
        return out

    def _optim_state(self, rank: int, mesh, cache: dict, on_bytes) -> dict:
        zf = self.src.zip(self._rank_file("optim", 0))
        otree = self.optim_tree
        state: dict = {}
        for index, per_param in otree["state"].items():
            if not isinstance(per_param, dict):
                state[index] = _plain_data(per_param, zf, f"optimizer state {index}")
                continue
            entry = {}
            for key, value in per_param.items():
                slot = self.optim_slots.get((index, key))
                entry[key] = (_plain_data(value, zf, f"optimizer state {index}.{key}") if slot is None
                              else self._tensor(slot, rank, mesh, cache, on_bytes))
            state[index] = entry
        out = {}
        for k, v in otree.items():
            out[k] = state if k == "state" else _plain_data(v, zf, f"optimizer {k}")
        return out

    def _extra_state(self, rank: int, base: str) -> str:
        import torch

        from ckptctl.formats.safe_load import load_pt
        from ckptctl.formats.torchzip import check_archive

        src_rank = rank % self.source_world
        rel = self._rank_file("extra_state", src_rank)
        name = self.target_file("extra_state", rank)
        data = self.store.read_bytes(rel)
        check_archive(data, self.store.url_of(rel))  # rewritten below: its CRCs are checked first
        extra = load_pt(data, name=self.store.url_of(rel), extra_stand_ins=self.src.extra_stand_ins)
        if _has_stand_ins(extra) or not isinstance(extra, dict):
            write_local_file(os.path.join(base, name), data)  # cannot be rewritten faithfully: kept as is
            msg = (f"{self.name}: {rel} holds objects ckptctl keeps as data: copied byte for byte, so its "
                   "world_size/rank fields still name the source")
            if msg not in self.warnings:
                self.warnings.append(msg)
            return name
        if "world_size" in extra:
            extra["world_size"] = self.world
        if "rank" in extra:
            extra["rank"] = rank
        torch.save(extra, os.path.join(base, name))
        return name

    def result(self, files: list[str], copied: list[str]) -> ComponentReshard:
        slots = self._tensor_slots()
        model_tensors = len(self._tensor_slots(optimizer=False))
        return ComponentReshard(
            name=self.name, source=self.store.url, source_world_size=self.source_world, world_size=self.world,
            strategy=self.strategy, source_mesh=self.source_mesh, target_mesh=self.target_mesh,
            optimizer=self.optimizer, model_tensors=model_tensors, optimizer_tensors=len(slots) - model_tensors,
            tensors_sharded=sum(s.how == "shard" for s in slots),
            tensors_replicated=sum(s.how in ("plain", "replicate_dtensor") for s in slots), files=files, copied=copied)


def _copy_file(store: Store, rel: str, dest: str, extra_stand_ins: Iterable[str] = ()) -> None:
    """Copy a side file unchanged; one whose format can be checked (.pt, .json) is checked first
    (:mod:`ckptctl.formats.side_files`): a damaged one fails the run instead of being copied."""
    os.makedirs(os.path.dirname(dest), exist_ok=True)
    if is_checked(rel):
        data = read_side_file(store, rel, extra_stand_ins=extra_stand_ins)
        write_local_file(dest, data)
        return
    with store.open(rel, "rb") as src, open_local_for_writing(dest) as out:
        shutil.copyfileobj(src, out, 8 * 1024 * 1024)


# ---------------------------------------------------------------------------------------------
# the source: a component or a step
# ---------------------------------------------------------------------------------------------
def _resolve(src_store: Store) -> tuple[str, Any, list]:
    """("component", Component, files) or ("step", Step, files) for ``src_store``: a step has a
    model component directory and no FSDP rank files of its own."""
    kind, found, files = locate(src_store)
    if kind == TREE:
        raise UsageError(f"{src_store.url} is a checkpoint tree: pass one step (…/global_step_N) or one component "
                         "(…/global_step_N/policy)")
    if kind == STEP and found.components and not any(FSDP_RANK_FILE_RE.match(f.path) for f in files):
        return "step", found, files
    comp = found if kind != STEP else component_at(src_store, files)
    if comp.backend == UNKNOWN:
        raise NotACheckpointError(f"{src_store.url}: not an FSDP component or step directory")
    return "component", comp, files


def reshard_fsdp(src: str, out: str, *, world_size: int, overwrite: bool = False, drop_optimizer: bool = False,
                 endpoint_url: str | None = None, progress: Callable[[int, int], None] | None = None,
                 w1_plain: bool | None = None, device_type: str | None = None,
                 extra_stand_ins: Iterable[str] = (), verify: bool = True, concurrency: int | None = None,
                 max_memory: int | str | None = None) -> ReshardSummary:
    """Reshard the FSDP component or step at ``src`` for ``world_size`` ranks into ``out``.

    ``drop_optimizer``: leave the optimizer state out (required for FSDP1 flat-parameter
    state). ``w1_plain`` (W=1 only): True writes plain tensors (a run without FSDP), False
    DTensors on a 1-rank mesh (``fully_shard`` on one GPU); None keeps the source's kind.
    ``device_type``: of the target meshes ("cuda", "cpu", ...); None takes the source mesh's
    (a checkpoint saved on GPUs resumes on GPUs), "cuda" for a plain source.
    ``progress(done_bytes, total_bytes)`` is called after each tensor. ``extra_stand_ins``:
    more globals to keep as data when reading (the CLI's ``--allow-global``). ``verify``: where
    the source has a ``ckptctl-manifest.json``, its files' hashes must match before the commit.
    ``concurrency`` / ``max_memory``: on object stores, see :class:`ckptctl.ops.transfer.Transfer`
    (the source's tensor data read ahead, rank files uploaded while the next rank is written)."""
    started = time.perf_counter()
    transfer = Transfer.make(concurrency, max_memory)
    if isinstance(world_size, bool) or not isinstance(world_size, int) or world_size < 1:
        raise UsageError(f"--world-size must be a positive integer, not {world_size!r}")
    if device_type is not None and device_type not in DEVICE_TYPES:
        raise UsageError(f"--device-type must be a DeviceMesh device type ({', '.join(DEVICE_TYPES)}), "
                         f"not {device_type!r}")
    stand_ins = tuple(extra_stand_ins)
    src_store = open_store(src, endpoint_url=endpoint_url)
    dst_store = open_store(out, endpoint_url=endpoint_url)
    refuse_overlap(src_store, dst_store)
    kind, obj, files = _resolve(src_store)

    # plan (and refuse) everything before the destination is touched
    jobs: list[tuple[str, _ComponentJob]] = []  # (prefix in the output, job)
    step_number = None
    step_copies: list[str] = []
    if kind == "component":
        jobs.append(("", _ComponentJob(src_store, obj, obj.name, world_size, drop_optimizer=drop_optimizer,
                                       w1_plain=w1_plain, device_type=device_type, extra_stand_ins=stand_ins)))
        step_number = parse_step_name(src_store.parent().name)
    else:
        step = obj
        if not step.complete:
            raise CkptctlError(f"{src_store.url} is incomplete: " + "; ".join(step.problems))
        step_number = step.step if step.step >= 0 else None
        for name, comp in step.components.items():
            jobs.append((name, _ComponentJob(src_store.child(name), comp, name, world_size,
                                             drop_optimizer=drop_optimizer, w1_plain=w1_plain,
                                             device_type=device_type, extra_stand_ins=stand_ins)))
        step_copies = [f.path for f in files if f.path.split("/", 1)[0] not in step.components
                       and f.path != OUTPUT_MARKER]

    commit_last: list[str] = []
    for prefix, job in jobs:
        if job.writes_config:
            commit_last.append(posixpath.join(prefix, CONFIG_FILE))
        commit_last.append(posixpath.join(prefix, job.target_file("model", 0)))
    if TRAINER_STATE in step_copies:
        commit_last.append(TRAINER_STATE)

    summary = ReshardSummary(source=src_store.url, destination=dst_store.url, kind=kind,
                             source_world_size=jobs[0][1].source_world, world_size=world_size, step=step_number)
    if len({j.source_world for _, j in jobs}) > 1:
        summary.warnings.append("the components were saved at different world sizes: "
                                + ", ".join(f"{j.name} {j.source_world}" for _, j in jobs))
    total = sum(j.total_bytes() for _, j in jobs)
    done = [0]

    def on_bytes(n: int) -> None:
        done[0] += n
        if progress:
            progress(done[0], total)

    with OutputDir(dst_store.url, overwrite=overwrite, commit_last=tuple(commit_last), kind=RESHARD,
                   source=src_store.url, store=dst_store) as outdir:
        outdir.limit_uploads(transfer.budgets(not src_store.is_local, not outdir.is_local)[1], transfer.concurrency)
        check = ManifestCheck.start_at(src_store) if verify else None
        if check is not None:
            outdir.check_before_commit(check)
        copied_all: list[str] = []
        for prefix, job in jobs:
            written, copied = job.write(outdir.staging, prefix, outdir.publish, on_bytes, transfer,
                                        remote_out=not outdir.is_local)
            outdir.publish(copied)
            copied_all += copied
            summary.components.append(job.result(written, copied))
            summary.warnings.extend(job.warnings)
        for rel in step_copies:
            _copy_file(src_store, rel, os.path.join(outdir.staging, *rel.split("/")), stand_ins)
            if rel != TRAINER_STATE:
                outdir.publish([rel])
            copied_all.append(rel)
        if kind == "step" and TRAINER_STATE in step_copies:
            summary.warnings.append(f"{TRAINER_STATE} is copied unchanged: its config still names the source's GPU "
                                    f"counts; resume with a config for {world_size} ranks")
        summary.files = outdir.commit()
        summary.replaced = outdir.replaced
    summary.copied = copied_all
    summary.bytes = total
    optimizers = {c.optimizer for c in summary.components}
    summary.optimizer = optimizers.pop() if len(optimizers) == 1 else "mixed"
    summary.seconds = round(time.perf_counter() - started, 3)
    return summary


__all__ = ["RNG_RULE", "ComponentReshard", "ReshardSummary", "chunk_range", "make_dtensor", "reshard_fsdp",
           "target_mesh"]
