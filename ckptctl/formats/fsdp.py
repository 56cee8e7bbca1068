"""FSDP ``policy/`` / ``critic/`` components: SkyRL's per-rank files and the documented single files.

Per rank R of W (see shared/spec/checkpoint-layout.md, "FSDP policy/"):
``model_world_size_{W}_rank_{R}.pt`` (``module.state_dict()``), ``optim_world_size_{W}_rank_{R}.pt``
(``optimizer.state_dict()``), ``extra_state_world_size_{W}_rank_{R}.pt`` (LR scheduler, RNG, ...),
``fsdp_config.json``. The documented layout holds ``model_state.pt``, ``optimizer_state.pt`` and
``lr_scheduler_state.pt`` instead (one rank).

Every file is read through :class:`~ckptctl.formats.torchzip.TorchZipFile`: metadata first
(the pickled object tree with meta tensors, a few KiB of ranged reads), tensor bytes on demand,
CRC-checked on the bytes read.
:meth:`FsdpReader.tensors` needs rank 0's model and optimizer files only: a DTensor carries its
global shape, placements and mesh, from which every rank's slice follows (``torch.chunk``
semantics along the sharded dim: trailing ranks may hold smaller or EMPTY shards); a legacy
``ShardedTensor`` carries every shard's offsets and sizes. :meth:`FsdpReader.read_tensor` opens the
rank files that hold pieces of one tensor and reads just those bytes.

How tensors are stored (``TensorInfo.layout``):
- ``dtensor``: a DTensor; pieces from one replica only (HSDP ``(Replicate(), Shard(0))``);
- ``replicated``: a plain tensor on every rank of a sharded run (buffers such as
  ``rotary_emb.inv_freq``, optimizer ``step``): rank 0's copy, never concatenated;
- ``plain``: one copy (a single-rank run);
- ``sharded_tensor``: a legacy ``ShardedTensor`` (FSDP1 without a device mesh);
- ``flat_shards``: FSDP1 optimizer state of flat parameters, a plain 1-D tensor per rank;
  the global tensor is the ranks' pieces concatenated (padding included; not reshardable).

Names: model tensors keep their state-dict keys; optimizer tensors are
``optimizer.state.<parameter name>.<key>`` (``exp_avg``, ``exp_avg_sq``, ``step``), the integer
index mapped through the order of ``module.parameters()`` (the state dict's order, without
buffers and without tied duplicates such as a tied ``lm_head.weight``), or
``optimizer.state.<index>.<key>`` when indices do not map to parameters (FSDP1 flat parameters).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from functools import cached_property
from typing import TYPE_CHECKING, Any, Iterable, Iterator

from ckptctl.errors import CorruptFileError, NotFoundError
from ckptctl.formats import safe_load
from ckptctl.formats.base import MODEL, OPTIMIZER, CheckpointReader, Piece, TensorInfo
from ckptctl.formats.safe_load import CorruptCheckpointError
from ckptctl.formats.torchzip import TorchZipFile
from ckptctl.tree import FSDP_RANK_FILE_RE, FSDP_SINGLE_FILES

if TYPE_CHECKING:  # pragma: no cover
    import torch

    from ckptctl.storage import Store

MODEL_FILE, OPTIM_FILE, EXTRA_FILE = "model", "optim", "extra_state"
CONFIG_FILE = "fsdp_config.json"
OPTIMIZER_PREFIX = "optimizer.state."
SHARDED_TENSOR = "torch.distributed._shard.sharded_tensor.api.ShardedTensor"

#: State-dict names of well-known non-parameter buffers (used only for single-rank files, where
#: parameters and buffers are both plain tensors; checked against the optimizer's shapes).
_BUFFER_SUFFIXES = ("inv_freq", "original_inv_freq", "position_ids", "causal_mask", "masked_bias",
                    "running_mean", "running_var", "num_batches_tracked")
_BUFFER_NAMES = ("mean", "std")  # SkyRL critic's value normalisation buffers


def _dtype_name(dtype) -> str:
    return str(dtype).replace("torch.", "")


def _plain(value: Any) -> Any:
    """JSON-friendly plain data (tuples as lists, stand-ins as dicts, dtypes as names)."""
    value = safe_load.to_plain(value)
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_plain(v) for v in value]
    if isinstance(value, (str, int, float, bool)) or value is None:
        return value
    return str(value)


@dataclass
class _Entry:
    """One global tensor: its TensorInfo plus how to find its pieces in the rank files."""

    info: TensorInfo
    kind: str  # MODEL_FILE | OPTIM_FILE
    path: tuple  # key path into the file's object tree
    is_param: bool = False
    tied_to: str | None = None
    # piece rank -> the piece's global offsets (to find a ShardedTensor's local shard)
    piece_offsets: dict[int, tuple[int, ...]] = field(default_factory=dict)


@dataclass(frozen=True)
class Mesh:
    """A DTensor's device mesh as its pickle records it (no process group)."""

    shape: tuple[int, ...]
    dim_names: tuple[str, ...]
    ranks: tuple[int, ...]  # global ranks, row-major over ``shape``

    @cached_property
    def _positions(self) -> dict[int, int]:
        # rank -> its place in ``ranks``: coords() is asked for every rank of every tensor, and a
        # search of ``ranks`` each time made that W^2 per tensor (W = 512: 262,144 steps)
        return {rank: i for i, rank in enumerate(self.ranks)}

    def holds(self, rank: int) -> bool:
        return rank in self._positions

    def coords(self, rank: int) -> tuple[int, ...]:
        index = self._positions.get(rank)
        if index is None:
            raise ValueError(f"rank {rank} is not in the mesh {list(self.ranks)}")
        out = []
        for size in reversed(self.shape):
            out.append(index % size)
            index //= size
        return tuple(reversed(out))


def _mesh_of(dt) -> Mesh:
    """The mesh of an unpickled DTensor, without a process group and without tensor data."""
    import torch

    mesh = dt.device_mesh
    shape = tuple(int(s) for s in mesh.shape)
    names = tuple(mesh.mesh_dim_names or ())
    ranks = None
    state = mesh.__dict__
    try:
        flat = state.get("_flatten_rank_map")
        layout = state.get("_layout")
        if flat is not None and layout is not None:  # torch >= 2.9: layout over a flat rank map
            full = layout.remap_to_tensor(torch.tensor(list(flat), dtype=torch.int64))
            saved_rank = state.get("_rank")
            if full.size(0) > 1 and saved_rank is not None:
                full = full[(full == saved_rank).nonzero()[0, 0]]
            else:
                full = full[0]
            ranks = tuple(int(r) for r in full.flatten().tolist())
        elif isinstance(state.get("mesh"), torch.Tensor) and state["mesh"].device.type != "meta":
            ranks = tuple(int(r) for r in state["mesh"].flatten().tolist())
    except Exception:
        ranks = None
    if ranks is None or len(ranks) != math.prod(shape):
        ranks = tuple(range(math.prod(shape)))  # init_device_mesh's arange
    return Mesh(shape, names, ranks)


def _shard_box(shape: tuple[int, ...], placements, mesh_shape: tuple[int, ...],
               coords: tuple[int, ...], name: str) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """(offsets, sizes) of the local shard at mesh ``coords``: ``torch.chunk`` semantics along
    each Shard placement's dim, mesh dims left to right (what DTensor does)."""
    offsets, sizes = [0] * len(shape), list(shape)
    for mesh_dim, p in enumerate(placements):
        kind = safe_load.placement_kind(p)
        if kind == "Replicate":
            continue
        if kind != "Shard":
            raise CorruptCheckpointError(f"{name}: placement {p} is not supported (only Shard and Replicate)")
        dim = p.dim if p.dim >= 0 else p.dim + len(shape)
        n, c = mesh_shape[mesh_dim], coords[mesh_dim]
        full = sizes[dim]
        chunk = -(-full // n) if full else 0
        start = min(chunk * c, full)
        sizes[dim] = max(0, min(full, start + chunk) - start)
        offsets[dim] += start
    return tuple(offsets), tuple(sizes)


def _is_sharded(value: Any) -> bool:
    """An FSDP2 DTensor or an FSDP1 ShardedTensor (both kept as data by safe_load)."""
    return safe_load.is_dtensor(value) or isinstance(value, safe_load.TensorStandIn)


def _lookup(obj: Any, path: tuple) -> Any:
    for key in path:
        obj = obj[key]
    return obj


def _with_byte_range(piece: Piece, zf: TorchZipFile, t) -> Piece:
    """``piece`` with the file bytes of ``t`` (its meta tensor in ``zf``; the length only when
    contiguous); unchanged for a real (legacy file) or empty tensor."""
    if t.device.type != "meta" or not t.numel():
        return piece
    loc = zf.location(t)
    return dataclasses.replace(piece, byte_offset=loc.file_offset,
                               byte_length=loc.nbytes if t.is_contiguous() else None)


class FsdpReader(CheckpointReader):
    """Reader of one FSDP component directory (``store`` rooted at ``policy/`` or ``critic/``).

    ``single_file``: the documented layout (``model_state.pt`` ...); also chosen automatically
    when there are no per-rank files. ``extra_stand_ins``: more globals to keep as data (the
    CLI's ``--allow-global``).
    """

    backend = "fsdp"

    def __init__(self, store: "Store", single_file: bool = False, extra_stand_ins: Iterable[str] = ()):
        super().__init__(store)
        self.single_file = single_file
        self.extra_stand_ins = tuple(extra_stand_ins)
        self._sizes: dict[str, int] | None = None
        self._rank_files: dict[str, dict[int, str]] = {}
        self._world_size: int | None = None
        self._config: dict | None = None
        self._zips: dict[str, TorchZipFile] = {}
        self._entries: dict[str, _Entry] | None = None
        self._optim_loaded = False
        self._param_names: list[str] | None = None
        self._mesh: Mesh | None = None
        self._placements: set[str] = set()
        self._sharded = False

    # -- files -------------------------------------------------------------------------
    def _discover(self) -> None:
        if self._sizes is not None:
            return
        sizes = {f.path: f.size for f in self.store.walk()}  # one listing
        by_kind: dict[str, dict[int, dict[int, str]]] = {}
        for rel in sizes:
            m = FSDP_RANK_FILE_RE.match(rel)
            if m:
                by_kind.setdefault(m.group(1), {}).setdefault(int(m.group(2)), {})[int(m.group(3))] = rel
        config = None
        if CONFIG_FILE in sizes:
            try:
                config = self.store.read_json(CONFIG_FILE)
            except CorruptFileError:
                config = {"error": f"{CONFIG_FILE} is not valid JSON"}
        self._config = config if isinstance(config, dict) else None
        config_world = self._config.get("world_size") if self._config else None
        if not by_kind and FSDP_SINGLE_FILES["model"] in sizes:
            self.single_file = True
        if self.single_file:
            if FSDP_SINGLE_FILES["model"] not in sizes:
                raise NotFoundError(f"{self.store.url_of(FSDP_SINGLE_FILES['model'])}: not found")
            self._rank_files = {kind: {0: FSDP_SINGLE_FILES[kind]} for kind in (MODEL_FILE, OPTIM_FILE, EXTRA_FILE)
                                if FSDP_SINGLE_FILES[kind] in sizes}
            self._world_size = int(config_world) if isinstance(config_world, int) else 1
        else:
            worlds = sorted(by_kind.get(MODEL_FILE, {}))
            if not worlds:
                raise NotFoundError(f"{self.store.url}: no FSDP model files (model_world_size_W_rank_R.pt)")
            world = config_world if config_world in worlds else worlds[-1]
            self._world_size = world
            self._rank_files = {kind: ranks[world] for kind, ranks in by_kind.items() if world in ranks}
        self._sizes = sizes

    @property
    def world_size(self) -> int:
        self._discover()
        return self._world_size

    def _file(self, kind: str, rank: int) -> TorchZipFile | None:
        self._discover()
        rel = self._rank_files.get(kind, {}).get(rank)
        if rel is None:
            return None
        zf = self._zips.get(rel)
        if zf is None:
            zf = TorchZipFile(self.store, rel, size=self._sizes.get(rel), extra_stand_ins=self.extra_stand_ins)
            self._zips[rel] = zf
        return zf

    def need_file(self, kind: str, rank: int) -> TorchZipFile:
        """Rank ``rank``'s file of ``kind`` (``MODEL_FILE``, ...); missing: CorruptCheckpointError."""
        zf = self._file(kind, rank)
        if zf is None:
            what = (FSDP_SINGLE_FILES[kind] if self.single_file
                    else f"{kind}_world_size_{self._world_size}_rank_{rank}.pt")
            raise CorruptCheckpointError(f"{self.store.url}: missing {what}")
        return zf

    def file_name(self, kind: str, rank: int) -> str:
        """The path of rank ``rank``'s file of ``kind``, relative to the component (listed or expected)."""
        self._discover()
        return self._rank_files.get(kind, {}).get(rank) or (
            FSDP_SINGLE_FILES[kind] if self.single_file else f"{kind}_world_size_{self._world_size}_rank_{rank}.pt")

    @property
    def requests(self) -> int:
        """Ranged reads made so far through the files' metadata and tensor reads."""
        return sum(z.requests for z in self._zips.values())

    @property
    def bytes_fetched(self) -> int:
        return sum(z.bytes_fetched for z in self._zips.values())

    # -- metadata ----------------------------------------------------------------------
    def _load_model(self) -> dict[str, _Entry]:
        if self._entries is not None:
            return self._entries
        import torch

        zf = self.need_file(MODEL_FILE, 0)
        sd = zf.metadata()
        if not isinstance(sd, dict):
            raise CorruptCheckpointError(f"{zf.name}: holds a {type(sd).__name__}, not a state dict")
        entries: dict[str, _Entry] = {}
        seen_storage: dict[tuple, str] = {}
        sharded = any(_is_sharded(v) for v in sd.values())
        for name, value in sd.items():
            if not isinstance(name, str) or not isinstance(value, torch.Tensor):
                continue
            if safe_load.is_dtensor(value):
                entry = self._dtensor_entry(name, (name,), value, MODEL_FILE, MODEL)
                local = value._local_tensor
            elif isinstance(value, safe_load.TensorStandIn):
                if value.qualname != SHARDED_TENSOR:
                    raise CorruptCheckpointError(f"{zf.name}: {name} is a {value.qualname}, which ckptctl cannot read")
                entry = self._sharded_tensor_entry(name, value, zf)
                shards = (value.state or ([],))[0]
                local = shards[0].fields.get("tensor") if shards else None
            else:
                layout = "replicated" if (sharded or (self.world_size > 1 and not self.single_file)) else "plain"
                entry = self._plain_entry(name, (name,), value, MODEL_FILE, MODEL, layout, zf)
                local = value
            if isinstance(local, torch.Tensor) and local.device.type == "meta" and local.numel():
                loc = zf.location(local)  # a tied weight shares its storage with the first one
                ident = (loc.storage.key, loc.storage_offset, loc.shape, loc.stride)
                if ident in seen_storage:
                    entry.tied_to = seen_storage[ident]
                else:
                    seen_storage[ident] = name
            entry.is_param = _is_sharded(value) and entry.tied_to is None
            entries[name] = entry
        if not sharded:  # plain tensors only: a first guess, refined with the optimizer's shapes
            for entry in entries.values():
                entry.is_param = entry.tied_to is None and not self._looks_like_buffer(entry.info.name)
        self._sharded = sharded
        self._entries = entries
        return entries

    def _dtensor_entry(self, name: str, path: tuple, dt, kind: str, group: str) -> _Entry:
        mesh = _mesh_of(dt)
        if self._mesh is None:
            self._mesh = mesh
        shape = tuple(int(s) for s in dt.shape)
        placements = tuple(dt.placements)
        info = TensorInfo(name=name, shape=shape, dtype=_dtype_name(dt.dtype), group=group, layout="dtensor",
                          placements=tuple(repr(p) for p in placements), mesh_shape=mesh.shape,
                          mesh_dim_names=mesh.dim_names)
        self._placements.update(info.placements)
        info.pieces.extend(self.dtensor_pieces(name, shape, placements, mesh, kind))
        return _Entry(info, kind, path)

    def dtensor_pieces(self, name: str, shape: tuple[int, ...], placements: tuple, mesh: Mesh,
                       kind: str) -> list[Piece]:
        """The pieces of a DTensor of global ``shape`` over ``mesh`` in ``kind``'s rank files:
        one replica's shards, empty ones left out; CorruptCheckpointError unless they cover it."""
        replicate_dims = [i for i, p in enumerate(placements) if safe_load.placement_kind(p) == "Replicate"]
        pieces, covered = [], 0
        for rank in mesh.ranks:
            coords = mesh.coords(rank)
            if any(coords[i] != 0 for i in replicate_dims):
                continue  # another replica: identical bytes
            offsets, sizes = _shard_box(shape, placements, mesh.shape, coords, name)
            if math.prod(sizes) == 0:
                continue  # an empty trailing shard
            covered += math.prod(sizes)
            pieces.append(Piece(self.file_name(kind, rank), offsets, sizes, rank=rank))
        if covered != math.prod(shape):
            raise CorruptCheckpointError(f"{self.store.url}: {name}: the shards of {shape} over mesh {mesh.shape} "
                                         f"cover {covered} of {math.prod(shape)} elements")
        return pieces

    def _sharded_tensor_entry(self, name: str, st, zf: TorchZipFile) -> _Entry:
        state = st.state if isinstance(st.state, tuple) else ()
        meta = state[1] if len(state) > 1 and isinstance(state[1], safe_load.PickledObject) else None
        if meta is None:
            raise CorruptCheckpointError(f"{zf.name}: {name}: a ShardedTensor without metadata")
        shape = tuple(int(s) for s in st.shape)
        spec = state[3] if len(state) > 3 and isinstance(state[3], safe_load.PickledObject) else None
        placements: tuple[str, ...] = ()
        if spec is not None:  # ChunkShardingSpec(dim=0), or EnumerableShardingSpec for explicit shards
            kind = spec.qualname.rsplit(".", 1)[-1]
            dim = spec.fields.get("dim")
            placements = (f"{kind}(dim={dim})" if isinstance(dim, int) else kind,)
        info = TensorInfo(name=name, shape=shape, dtype=_dtype_name(st.dtype), group=MODEL, layout="sharded_tensor",
                          placements=placements)
        entry = _Entry(info, MODEL_FILE, (name,))
        covered = 0
        for md in meta.fields.get("shards_metadata") or []:
            f = md.fields
            offsets = tuple(int(o) for o in f.get("shard_offsets") or ())
            sizes = tuple(int(s) for s in f.get("shard_sizes") or ())
            placement = f.get("placement")
            rank = placement.fields.get("_rank") if isinstance(placement, safe_load.PickledObject) else None
            if not isinstance(rank, int) or len(offsets) != len(shape) or len(sizes) != len(shape):
                raise CorruptCheckpointError(f"{zf.name}: {name}: unreadable ShardedTensor shard metadata")
            if math.prod(sizes) == 0:
                continue
            covered += math.prod(sizes)
            info.pieces.append(Piece(self.file_name(MODEL_FILE, rank), offsets, sizes, rank=rank))
            entry.piece_offsets[rank] = offsets
        if covered != math.prod(shape):
            raise CorruptCheckpointError(f"{zf.name}: {name}: shards cover {covered} of {math.prod(shape)} elements")
        return entry

    def _plain_entry(self, name: str, path: tuple, t, kind: str, group: str, layout: str,
                     zf: TorchZipFile) -> _Entry:
        shape = tuple(int(s) for s in t.shape)
        info = TensorInfo(name=name, shape=shape, dtype=_dtype_name(t.dtype), group=group, layout=layout)
        info.pieces.append(_with_byte_range(Piece(self.file_name(kind, 0), (0,) * len(shape), shape, rank=0), zf, t))
        return _Entry(info, kind, path)

    def _fill_byte_offsets(self, entry: _Entry) -> None:
        """Rank 0's pieces: byte offsets are known from rank 0's metadata (free)."""
        info = entry.info
        for i, piece in enumerate(info.pieces):
            if piece.rank != 0 or piece.byte_offset is not None:
                continue
            zf = self._file(entry.kind, 0)
            local = self._local_tensor(entry, zf, 0)
            if local is not None:
                info.pieces[i] = _with_byte_range(piece, zf, local)

    def _load_optimizer(self) -> None:
        if self._optim_loaded:
            return
        import torch

        entries = self._load_model()
        self._optim_loaded = True
        zf = self._file(OPTIM_FILE, 0)
        if zf is None:
            return
        osd = zf.metadata()
        if not isinstance(osd, dict) or not isinstance(osd.get("state"), dict):
            return  # {} (nothing saved) or not an optimizer state dict
        state = osd["state"]
        names = self._map_param_names(entries, state, osd.get("param_groups"))
        flat_ranks = None
        for index in sorted(state, key=lambda k: (not isinstance(k, int), k if isinstance(k, int) else str(k))):
            per_param = state[index]
            if not isinstance(per_param, dict):
                continue
            label = names[index] if names is not None and index in names else str(index)
            for key, value in per_param.items():
                if not isinstance(value, torch.Tensor):
                    continue
                name = f"{OPTIMIZER_PREFIX}{label}.{key}"
                path = ("state", index, key)
                if safe_load.is_dtensor(value):
                    entry = self._dtensor_entry(name, path, value, OPTIM_FILE, OPTIMIZER)
                elif value.dim() == 0 or self.world_size == 1 or self.single_file:
                    layout = "plain" if (self.world_size == 1 or self.single_file) else "replicated"
                    entry = self._plain_entry(name, path, value, OPTIM_FILE, OPTIMIZER, layout, zf)
                else:
                    if flat_ranks is None:
                        flat_ranks = self._flat_shard_ranks()
                    entry = self._flat_entry(name, path, value, flat_ranks)
                entries[name] = entry
        self._param_names = [names[i] for i in sorted(names)] if names else None

    def _flat_shard_ranks(self) -> list[int]:
        """Ranks whose flat optimizer shards make up the global flat tensors: one replica."""
        if self._mesh is not None:
            placements = next((e for e in self._entries.values() if e.info.layout == "dtensor"), None)
            if placements is not None:
                rep = [i for i, p in enumerate(placements.info.placements) if p.startswith("Replicate")]
                return [r for r in self._mesh.ranks if all(self._mesh.coords(r)[i] == 0 for i in rep)]
        return list(range(self.world_size))

    def _flat_entry(self, name: str, path: tuple, t, ranks: list[int]) -> _Entry:
        """FSDP1 flat-parameter optimizer state: a 1-D tensor per rank, concatenated in rank order."""
        sizes = []
        for rank in ranks:  # sizes differ per rank only in exotic setups: read each rank's metadata
            local = _lookup(self.need_file(OPTIM_FILE, rank).metadata(), path)
            if not hasattr(local, "shape") or local.dim() != 1:
                raise CorruptCheckpointError(f"{self.store.url}: {name}: rank {rank} holds no 1-D shard")
            sizes.append(int(local.shape[0]))
        info = TensorInfo(name=name, shape=(sum(sizes),), dtype=_dtype_name(t.dtype), group=OPTIMIZER,
                          layout="flat_shards")
        offset = 0
        for rank, size in zip(ranks, sizes):
            if size:
                info.pieces.append(Piece(self.file_name(OPTIM_FILE, rank), (offset,), (size,), rank=rank))
            offset += size
        return _Entry(info, OPTIM_FILE, path)

    def _map_param_names(self, entries: dict[str, _Entry], state: dict, groups: Any) -> dict[int, str] | None:
        """Optimizer index -> parameter name, or None when the indices are not the model's parameters."""
        import torch

        indices = set()
        for g in groups if isinstance(groups, list) else []:
            if isinstance(g, dict) and isinstance(g.get("params"), list):
                indices.update(i for i in g["params"] if isinstance(i, int))
        indices.update(i for i in state if isinstance(i, int))
        if not indices or sorted(indices) != list(range(len(indices))):
            return None
        n = len(indices)

        def moment_shape(i):  # the global shape of a per-parameter moment (DTensor.shape is global)
            per_param = state.get(i)
            for key in ("exp_avg", "exp_avg_sq", "momentum_buffer", "square_avg", "sum"):
                v = per_param.get(key) if isinstance(per_param, dict) else None
                if isinstance(v, torch.Tensor):
                    return tuple(int(s) for s in v.shape)
            return None

        shapes = [moment_shape(i) for i in range(n)]
        candidates = [e for e in entries.values() if e.info.group == MODEL and e.tied_to is None]
        if self._sharded:
            params = [e for e in candidates if e.is_param]
            if len(params) != n:
                return None
        else:
            params = [e for e in candidates if not self._looks_like_buffer(e.info.name)]
            if len(params) != n or any(s is not None and s != p.info.shape for s, p in zip(shapes, params)):
                params = self._align_by_shape(candidates, shapes)
                if params is None:
                    return None
            chosen = {id(e) for e in params}
            for e in candidates:
                e.is_param = id(e) in chosen
        if any(s is not None and s != p.info.shape for s, p in zip(shapes, params)):
            return None  # e.g. FSDP1 flat parameters: 1-D shards, not parameter shapes
        return {i: p.info.name for i, p in enumerate(params)}

    @staticmethod
    def _looks_like_buffer(name: str) -> bool:
        last = name.rsplit(".", 1)[-1]
        return last in _BUFFER_SUFFIXES or name in _BUFFER_NAMES

    @staticmethod
    def _align_by_shape(candidates: list[_Entry], shapes: list) -> list[_Entry] | None:
        """Parameters as the subsequence of state-dict tensors matching the optimizer's shapes."""
        out, j = [], 0
        for shape in shapes:
            while j < len(candidates) and shape is not None and candidates[j].info.shape != shape:
                j += 1
            if j >= len(candidates):
                return None
            out.append(candidates[j])
            j += 1
        return out

    # -- the reader interface ----------------------------------------------------------
    def tensors(self) -> Iterator[TensorInfo]:
        """Every model tensor, then every optimizer tensor (from rank 0's files only)."""
        self._load_model()
        self._load_optimizer()
        for entry in self._entries.values():
            self._fill_byte_offsets(entry)
            yield entry.info

    def read_tensor(self, name: str) -> "torch.Tensor":
        import torch

        self._load_model()
        if name not in self._entries:
            self._load_optimizer()
        entry = self._entries.get(name)
        if entry is None:
            raise NotFoundError(f"{self.store.url}: no tensor {name!r}")
        info = entry.info
        dtype = getattr(torch, info.dtype)
        out = torch.empty(info.shape, dtype=dtype)
        for piece in info.pieces:
            zf = self.need_file(entry.kind, piece.rank)
            local = self._local_tensor(entry, zf, piece.rank)
            if local is None:
                raise CorruptCheckpointError(f"{zf.name}: no shard of {name} at {piece.offsets}")
            if tuple(local.shape) != piece.sizes or local.dtype != dtype:
                raise CorruptCheckpointError(
                    f"{zf.name}: {name}: rank {piece.rank} holds {tuple(local.shape)} {_dtype_name(local.dtype)}, "
                    f"expected {piece.sizes} {info.dtype}")
            index = tuple(slice(o, o + s) for o, s in zip(piece.offsets, piece.sizes))
            zf.materialize_into(local, out[index], name=name)  # straight into its place, CRC-checked
        return out

    def planned_reads(self, names: Iterable[str]) -> list[tuple[str, int, int]]:
        """``(file, start, end)`` of the ranged reads :meth:`read_tensor` makes for ``names``, in
        that order (each piece's storage record; rank files' metadata is loaded for it): the plan
        of a read-ahead (:class:`ckptctl.storage.ReadAhead`). Unknown names are left out."""
        self._load_model()
        plan = []
        for name in names:
            entry = self._entries.get(name)
            if entry is None:
                continue
            for piece in entry.info.pieces:
                zf = self._file(entry.kind, piece.rank)
                if zf is None:
                    continue
                try:
                    local = self._local_tensor(entry, zf, piece.rank)
                    span = zf.planned_read(local) if local is not None and hasattr(local, "device") else None
                except (CorruptCheckpointError, ValueError):
                    span = None  # read_tensor reports it
                if span is not None:
                    plan.append((zf.rel, *span))
        return plan

    def _local_tensor(self, entry: _Entry, zf: TorchZipFile, rank: int):
        """The piece of ``entry`` that rank ``rank``'s file holds (a meta tensor), or None."""
        import torch

        try:
            value = _lookup(zf.metadata(), entry.path)
        except (KeyError, IndexError, TypeError):
            raise CorruptCheckpointError(f"{zf.name}: no {entry.info.name}") from None
        if safe_load.is_dtensor(value):
            saved = value.device_mesh.__dict__.get("_coordinate_on_dim")
            if saved is not None and self._mesh is not None and self._mesh.holds(rank) \
                    and tuple(saved) != self._mesh.coords(rank):
                raise CorruptCheckpointError(f"{zf.name}: mesh coordinates {tuple(saved)} differ from rank 0's mesh "
                                             f"layout ({self._mesh.coords(rank)})")
            return value._local_tensor
        if isinstance(value, safe_load.TensorStandIn):
            want = entry.piece_offsets.get(rank)
            for shard in (value.state or ([],))[0]:
                md = shard.fields.get("metadata")
                offsets = tuple(md.fields.get("shard_offsets") or ()) if md is not None else ()
                if want is None or offsets == want:
                    return shard.fields.get("tensor")
            return None
        return value if isinstance(value, torch.Tensor) else None

    # -- summary -----------------------------------------------------------------------
    def summary(self) -> dict[str, Any]:
        entries = self._load_model()
        self._load_optimizer()
        model = [e for e in entries.values() if e.info.group == MODEL]
        params = [e for e in model if e.is_param]
        dtypes: dict[str, int] = {}
        layouts: dict[str, int] = {}
        for e in model:
            dtypes[e.info.dtype] = dtypes.get(e.info.dtype, 0) + 1
            layouts[e.info.layout] = layouts.get(e.info.layout, 0) + 1
        unique = [e for e in model if e.tied_to is None]
        out: dict[str, Any] = {
            "backend": "fsdp-single-file" if self.single_file else "fsdp",
            "world_size": self.world_size,
            "strategy": self._strategy(),
            "fsdp_config": self._config,
            "mesh": ({"shape": list(self._mesh.shape), "dim_names": list(self._mesh.dim_names)}
                     if self._mesh is not None else None),
            "placements": sorted(self._placements),
            "files": {kind: [self._rank_files[kind][r] for r in sorted(self._rank_files[kind])]
                      for kind in (MODEL_FILE, OPTIM_FILE, EXTRA_FILE) if kind in self._rank_files},
            "model": {
                "tensors": len(model),
                "parameters": len(params),
                "parameter_numel": sum(e.info.numel for e in params),
                "parameter_bytes": sum(e.info.nbytes for e in params),
                "bytes": sum(e.info.nbytes for e in unique),
                "dtypes": dtypes,
                "layouts": layouts,
                "buffers": [e.info.name for e in model if not e.is_param and e.tied_to is None] if params else None,
                "tied": {e.info.name: e.tied_to for e in model if e.tied_to},
            },
            "optimizer": self._optimizer_summary(),
        }
        out.update(self._extra_summary())
        return out

    def _strategy(self) -> str | None:
        cfg = self._config or {}
        if isinstance(cfg.get("fsdp_strategy"), str):
            return cfg["fsdp_strategy"]
        if cfg.get("FSDP_version") in (1, 2):
            return {1: "fsdp", 2: "fsdp2"}[cfg["FSDP_version"]]
        extra = self._extra_state()
        if isinstance(extra, dict) and isinstance(extra.get("fsdp_strategy"), str):
            return extra["fsdp_strategy"]
        return None

    def _optimizer_summary(self) -> dict[str, Any]:
        zf = self._file(OPTIM_FILE, 0)
        if zf is None:
            return {"present": False}
        osd = zf.metadata()
        if not isinstance(osd, dict) or "state" not in osd:
            return {"present": True, "empty": True, "kind": None}
        state = osd.get("state") or {}
        groups = osd.get("param_groups") or []
        keys = sorted({k for st in state.values() if isinstance(st, dict) for k in st})
        group_dicts = [g for g in groups if isinstance(g, dict)]
        num_params = sum(len(g.get("params") or []) for g in group_dicts)
        out: dict[str, Any] = {
            "present": True,
            "kind": self._optimizer_kind(keys, group_dicts),
            "state_keys": keys,
            "num_params": num_params,
            "param_groups": [{**{k: _plain(v) for k, v in g.items() if k != "params"},
                              "num_params": len(g.get("params") or [])} for g in group_dicts],
            "param_mapping": ("names" if self._param_names else
                              "flat_params" if any(e.info.layout == "flat_shards" for e in self._entries.values())
                              else "indices"),
            "step": None,
        }
        index, first = next(((i, st) for i, st in state.items() if isinstance(st, dict) and "step" in st),
                            (None, None))
        if first is not None:
            step = first["step"]
            if hasattr(step, "device"):
                step = (zf.materialize(step, name=f"optimizer state {index}.step").item() if step.numel() == 1
                        else None)
            if isinstance(step, float) and step.is_integer():
                step = int(step)
            out["step"] = step
        return out

    @staticmethod
    def _optimizer_kind(keys: list[str], groups: list[dict]) -> str | None:
        if "exp_avg" in keys and "exp_avg_sq" in keys:
            decoupled = groups[0].get("decoupled_weight_decay") if groups else None
            return {True: "AdamW", False: "Adam"}.get(decoupled, "Adam/AdamW")
        if "momentum_buffer" in keys or (groups and "momentum" in groups[0] and "dampening" in groups[0]):
            return "SGD"
        return None

    def _extra_state(self) -> Any:
        zf = self._file(EXTRA_FILE, 0)
        return zf.metadata() if zf is not None else None

    def _extra_summary(self) -> dict[str, Any]:
        extra = self._extra_state()
        if extra is None:
            return {"lr_scheduler": None, "rng": None, "extra_state": None}
        if self.single_file:  # lr_scheduler_state.pt: the scheduler's state dict itself
            sched, rest = extra, {}
        else:
            if not isinstance(extra, dict):
                return {"lr_scheduler": None, "rng": None, "extra_state": {"type": type(extra).__name__}}
            sched = extra.get("lr_scheduler")
            rest = extra
        lr = None
        if isinstance(sched, dict):
            lr = {"last_epoch": _plain(sched.get("last_epoch")), "base_lrs": _plain(sched.get("base_lrs")),
                  "last_lr": _plain(sched.get("_last_lr")), "step_count": _plain(sched.get("_step_count")),
                  "keys": sorted(str(k) for k in sched)}
        rng = rest.get("rng") if isinstance(rest, dict) else None
        rng_summary = ({k: k in rng for k in ("cpu", "numpy", "random", "cuda")} if isinstance(rng, dict) else None)
        info = {k: _plain(v) for k, v in rest.items()
                if k not in ("lr_scheduler", "rng") and isinstance(v, (str, int, float, bool, dict, type(None)))}
        return {"lr_scheduler": lr, "rng": rng_summary, "extra_state": info if not self.single_file else None}

    def close(self) -> None:
        self._zips.clear()
        self._entries = None
        self._optim_loaded = False
        self._sizes = None
