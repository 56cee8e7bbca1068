"""Megatron-core ``torch_dist`` checkpoints (torch DCP underneath), read through a Store.

Layout of one component (SkyRL ``policy/``; verl nests the same files under ``dist_ckpt/``)::

    metadata.json        {"sharded_backend": "torch_dist", ...}, written last by rank 0
    .metadata            plain pickle of torch DCP ``Metadata``: per key its global shape,
                         dtype and chunks, and per chunk (``MetadataIndex``) a ``_StorageInfo``
                         (file, byte offset, length, transform descriptors)
    __{rank}_{i}.distcp  data files; every tensor chunk is its OWN ``torch.save`` blob (a zip)
                         at (offset, length) -- megatron-core's writer always passes
                         ``SerializationFormat.TORCH_SAVE`` to torch's ``_write_item``; byte
                         entries (ShardedObjects, ``_extra_state``) are torch.save'd bytes too
    common.pt            rank 0's non-sharded state (torch.save): lr_scheduler, optimizer
                         param_groups, rng (SkyRL), ...

Metadata costs one read of ``.metadata`` and NO torch import: the pickle is decoded by
:func:`ckptctl.formats.safe_load.load_pickle` with an allowlist (:data:`METADATA_GLOBALS`)
that maps torch DCP's classes to small record classes defined here, ``torch.Size`` to
``tuple`` and dtypes to their names. Nothing the pickle names is ever imported or called,
apart from those records and plain builtins. A tensor is read with one ranged read per chunk,
whose zip records are CRC-checked (:func:`~ckptctl.formats.torchzip.check_archive`; torch.load
itself never checks) and decoded with :func:`~ckptctl.formats.safe_load.load_pt` (``weights_only``).
"""

from __future__ import annotations

import bisect
import itertools
import math
import re
from collections import Counter, defaultdict
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Iterable, Iterator

from ckptctl.errors import CkptctlError, NotFoundError
from ckptctl.formats.base import (MODEL, OPTIMIZER, OTHER, CheckpointReader, Piece, TensorInfo, dtype_size,
                                  read_json, torch_dtype)
from ckptctl.formats.safe_load import CorruptCheckpointError, load_pickle, load_pt, to_plain
from ckptctl.formats.torchzip import check_archive
from ckptctl.storage import natural_key

if TYPE_CHECKING:  # pragma: no cover
    import torch

    from ckptctl.storage import Store

METADATA_FILE = ".metadata"
METADATA_JSON = "metadata.json"
COMMON_FILE = "common.pt"
VERL_SUBDIR = "dist_ckpt"
DISTCP_RE = re.compile(r"^__(\d+)_(\d+)\.distcp$")
ZIP_MAGIC = b"PK\x03\x04"

_OPT_RE = re.compile(r"^(?:(chained_\d+)\.)?optimizer\.")  # group 1: the chain (None: not chained)
_OPT_STATE_RE = re.compile(r"^(?:chained_\d+\.)?optimizer\.state\.([^.]+)\.(.+)$")
_PER_LAYER_RE = re.compile(r"^decoder\.layers\.(\d+)\.(.+)$")
_STACKED_PREFIX = "decoder.layers."
_SHARD_SUFFIX_RE = re.compile(r"^(.*)/shard_[\d.]+_[\d.]+$")


# -- the .metadata allowlist ------------------------------------------------------------------

class _Record:
    """Stand-in for a torch DCP dataclass: the pickle's state lands in ``__dict__``.

    No ``__setstate__``: pickle's C BUILD copies a dict state straight into ``__dict__`` (fast,
    and nothing runs). Missing fields read as None (older/newer torch may add or drop some).
    """

    _qualname = "?"

    def __init__(self, *args, **kwargs):  # REDUCE-style construction: keep the arguments
        if args:
            self.__dict__["_args"] = args
        if kwargs:
            self.__dict__.update(kwargs)

    def __getattr__(self, name):
        if name.startswith("__"):
            raise AttributeError(name)
        return None

    def __repr__(self) -> str:
        return f"<{self._qualname} {self.__dict__}>"


class _TensorProperties(_Record):
    """``TensorProperties`` pickles its state as a tuple (dtype, layout, requires_grad, ...)."""

    _FIELDS = ("dtype", "layout", "requires_grad", "memory_format", "pin_memory")

    def __setstate__(self, state):
        if isinstance(state, dict):
            self.__dict__.update(state)
        elif isinstance(state, tuple):
            self.__dict__.update(zip(self._FIELDS, state))


def _record(qualname: str, base: type = _Record) -> type:
    return type(qualname.rsplit(".", 1)[-1], (base,), {"_qualname": qualname})


def _passthrough(value=None, *_):
    """For enums and ``torch.serialization._get_layout``: keep the pickled value as data."""
    return value


def _path(*parts):
    return "/".join(str(p) for p in parts)


#: torch dtypes as they may appear in DCP metadata, mapped to ckptctl's dtype names.
TORCH_DTYPES = {
    "float32": "float32", "float": "float32", "float64": "float64", "double": "float64",
    "float16": "float16", "half": "float16", "bfloat16": "bfloat16", "int8": "int8", "int16": "int16",
    "short": "int16", "int32": "int32", "int": "int32", "int64": "int64", "long": "int64", "uint8": "uint8",
    "uint16": "uint16", "uint32": "uint32", "uint64": "uint64", "bool": "bool", "complex64": "complex64",
    "cfloat": "complex64", "complex128": "complex128", "cdouble": "complex128", "complex32": "complex32",
    "float8_e4m3fn": "float8_e4m3fn", "float8_e5m2": "float8_e5m2", "float8_e4m3fnuz": "float8_e4m3fnuz",
    "float8_e5m2fnuz": "float8_e5m2fnuz", "float8_e8m0fnu": "float8_e8m0fnu",
}

_DCP = "torch.distributed.checkpoint"
_RECORDS = (
    f"{_DCP}.metadata.Metadata", f"{_DCP}.metadata.TensorStorageMetadata",
    f"{_DCP}.metadata.BytesStorageMetadata", f"{_DCP}.metadata.ChunkStorageMetadata",
    f"{_DCP}.metadata.MetadataIndex", f"{_DCP}.metadata.StorageMeta", f"{_DCP}.filesystem._StorageInfo",
    f"{_DCP}.planner.SavePlan", f"{_DCP}.planner.WriteItem", f"{_DCP}.planner.TensorWriteData",
    f"{_DCP}.planner.BytesIOWriteData",
    # megatron-core 0.13.1 also pickles each rank's save plan (its ``mcore_data``: the N-D
    # flattened tensors' original shapes, see formats.flattened)
    "megatron.core.dist_checkpointing.strategies.torch.MCoreSavePlan",
)

#: The globals a DCP ``.metadata`` pickle may reference (found by experiment on torch 2.13 +
#: megatron-core 0.16.1 saves), each mapped to harmless data builders.
METADATA_GLOBALS: dict[str, Any] = {
    **{q: _record(q) for q in _RECORDS},
    f"{_DCP}.metadata.TensorProperties": _record(f"{_DCP}.metadata.TensorProperties", _TensorProperties),
    f"{_DCP}.metadata._MEM_FORMAT_ENCODING": _passthrough,
    f"{_DCP}.planner.WriteItemType": _passthrough,
    "torch.serialization._get_layout": _passthrough,
    "torch.Size": tuple,
    "collections.OrderedDict": dict,
    "pathlib.PosixPath": _path, "pathlib.PurePosixPath": _path, "pathlib._local.PosixPath": _path,
    **{f"torch.{name}": canonical for name, canonical in TORCH_DTYPES.items()},
}


# -- data model -------------------------------------------------------------------------------

@dataclass(frozen=True)
class ObjectInfo:
    """A non-tensor entry (``BytesStorageMetadata``): a ShardedObject shard, ``_extra_state``, ..."""

    name: str  # e.g. "rng_state/shard_0.0_2.1"
    key: str  # without the "/shard_..." suffix: "rng_state"
    file: str  # relative to the component directory
    byte_offset: int
    byte_length: int
    rank: int | None

    def to_dict(self) -> dict:
        return dict(self.__dict__)


_SMALL_OBJECT = 64 << 10  # bytes: objects up to this size are kept once read


def _rank_of(file_name: str) -> int | None:
    m = DISTCP_RE.match(file_name.rsplit("/", 1)[-1])
    return int(m.group(1)) if m else None


def _group_of(name: str) -> str:
    if _OPT_RE.match(name):
        return OPTIMIZER
    if name.startswith("rng_state"):
        return OTHER
    return MODEL


def _model_key(name: str) -> str:
    """The model key an optimizer-state key belongs to (itself for model keys)."""
    m = _OPT_STATE_RE.match(name)
    return m.group(2) if m else name


def _layer_axis(name: str) -> bool:
    """True for stacked ``decoder.layers.X`` keys (leading num_layers axis)."""
    key = _model_key(name)
    return key.startswith(_STACKED_PREFIX) and not _PER_LAYER_RE.match(key)


class _PieceIndex:
    """The chunks of one tensor by where they start, so that the chunks near a block are found
    without a pass over all of them: a routed-expert tensor has layers x experts x ... chunks and
    is read expert by expert, so a pass per read made an MoE export quadratic in its experts
    (128 experts of 64 x 64 per layer: 211 s for 32 layers, 13x the 16.5 s of 8 layers)."""

    def __init__(self, pieces: list[Piece]):
        self.pieces = pieces
        self._by_start: dict[tuple[int, ...], list[int]] = defaultdict(list)
        for i, p in enumerate(pieces):
            self._by_start[tuple(p.offsets)].append(i)
        ndim = len(pieces[0].offsets) if pieces else 0
        uniform = all(len(p.offsets) == ndim and len(p.sizes) == ndim for p in pieces)
        self._ndim = ndim if uniform else None
        # per dim: the chunks' distinct starts, sorted, and the largest extent
        self._starts = [sorted({p.offsets[d] for p in pieces}) for d in range(ndim)] if uniform else []
        self._reach = [max(p.sizes[d] for p in pieces) for d in range(ndim)] if uniform else []

    def near(self, offsets: tuple[int, ...], sizes: tuple[int, ...]) -> list[Piece]:
        """The chunks that may overlap block ``[offsets, offsets + sizes)``, in stored order:
        every chunk that does, and perhaps some that do not (the caller checks)."""
        if self._ndim is None or len(offsets) != self._ndim:
            return self.pieces
        candidates = []
        combos = 1
        for starts, reach, o, s in zip(self._starts, self._reach, offsets, sizes):
            # a chunk starting at v overlaps [o, o + s) only if o - reach < v < o + s
            found = starts[bisect.bisect_right(starts, o - reach):bisect.bisect_left(starts, o + s)]
            candidates.append(found)
            combos *= len(found)
            if combos > len(self.pieces):  # an odd partition: a pass over all is cheaper
                return self.pieces
        hits = sorted(i for start in itertools.product(*candidates) for i in self._by_start.get(start, ()))
        return [self.pieces[i] for i in hits]

    def at_index(self, index: int) -> list[Piece]:
        """The chunks holding ``tensor[index]`` along dim 0, in stored order (none of a scalar)."""
        rest = (self._ndim or 1) - 1
        near = self.near((index, *(0,) * rest), (1, *(2**62,) * rest)) if self._ndim else self.pieces
        return [p for p in near if p.offsets and p.offsets[0] <= index < p.offsets[0] + p.sizes[0]]


class MegatronReader(CheckpointReader):
    """Reader of a Megatron ``torch_dist`` component (store rooted at ``policy/`` or ``critic/``).

    ``nesting``: ``"dist_ckpt"`` (verl), ``""`` (SkyRL), or None to detect it (tries
    ``.metadata``, then ``dist_ckpt/.metadata``). ``extra_stand_ins``: globals to keep as data
    when ``common.pt`` references them (``--allow-global``).
    """

    backend = "megatron"

    def __init__(self, store: "Store", *, nesting: str | None = None, extra_stand_ins: Iterable[str] = (),
                 max_workers: int = 8):
        super().__init__(store)
        self.extra_stand_ins = tuple(extra_stand_ins)
        self.max_workers = max_workers
        self._nesting = nesting
        self._metadata = None
        self._infos: dict[str, TensorInfo] | None = None
        self._piece_indexes: dict[str, _PieceIndex] = {}  # tensor name -> its chunks by position (recent)
        self._objects: dict[str, ObjectInfo] | None = None
        self._transforms: dict[tuple[str, int], tuple[str, ...]] = {}
        self._metadata_json: tuple[dict | None] | None = None
        # CRC-32 checks of the chunks (file, byte offset): those checked whole, and the record
        # checks that partial reads (read_region) add up, finished by finish_crc_checks()
        self._crc_verified: set[tuple[str, int]] = set()
        self._crc_parts: dict[tuple[str, int], dict] = {}
        # the bytes of small objects read (bucket records, param groups: summary and the bucket
        # layout both read them; one fetch each on object stores)
        self._small_objects: dict[str, bytes] = {}

    # -- locating and parsing .metadata -----------------------------------------------------
    @property
    def prefix(self) -> str:
        self._load_metadata()
        return f"{self._nesting}/" if self._nesting else ""

    @property
    def nesting(self) -> str:
        self._load_metadata()
        return self._nesting or ""

    def _rel(self, name: str) -> str:
        return self.prefix + name

    def _load_metadata(self):
        if self._metadata is not None:
            return self._metadata
        candidates = [self._nesting] if self._nesting is not None else ["", VERL_SUBDIR]
        data = None
        for nest in candidates:
            rel = f"{nest}/{METADATA_FILE}" if nest else METADATA_FILE
            try:
                data = self.store.read_bytes(rel)
            except NotFoundError:
                continue
            self._nesting = nest
            break
        if data is None:
            where = " or ".join(self.store.url_of(f"{n}/{METADATA_FILE}" if n else METADATA_FILE) for n in candidates)
            raise NotFoundError(f"{where}: not found (no torch DCP index: not a Megatron torch_dist checkpoint, "
                                "or the save did not finish)")
        name = self.store.url_of(self._rel_raw(METADATA_FILE))
        if not data:
            raise CorruptCheckpointError(f"cannot read {name}: empty file")
        md = load_pickle(data, METADATA_GLOBALS, name=name)
        sdm = getattr(md, "state_dict_metadata", None) if isinstance(md, _Record) else None
        if not isinstance(sdm, dict) or not isinstance(getattr(md, "storage_data", None), dict):
            raise CorruptCheckpointError(f"cannot read {name}: not a torch DCP Metadata pickle "
                                         f"(got {type(md).__name__})")
        self._metadata = md
        return md

    def _rel_raw(self, name: str) -> str:
        return f"{self._nesting}/{name}" if self._nesting else name

    def _index(self) -> None:
        if self._infos is not None:
            return
        md = self._load_metadata()
        prefix = self.prefix
        by_index: dict[tuple[str, Any], Any] = {}
        for idx, info in md.storage_data.items():
            offset = getattr(idx, "offset", None)
            by_index[(idx.fqn, tuple(offset) if offset is not None else None)] = info
        infos: dict[str, TensorInfo] = {}
        objects: dict[str, ObjectInfo] = {}
        for name, entry in md.state_dict_metadata.items():
            chunks = getattr(entry, "chunks", None)
            if chunks is None:  # BytesStorageMetadata
                si = by_index.get((name, None))
                if si is None:
                    continue
                m = _SHARD_SUFFIX_RE.match(name)
                objects[name] = ObjectInfo(name, m.group(1) if m else name, prefix + si.relative_path,
                                           int(si.offset), int(si.length), _rank_of(si.relative_path))
                continue
            if "._extra_state" in name:
                continue
            props = entry.properties
            dtype = getattr(props, "dtype", None) if props is not None else None
            pieces = []
            for ch in chunks:
                offsets, sizes = tuple(ch.offsets), tuple(ch.sizes)
                si = by_index.get((name, offsets))
                if si is None:
                    raise CorruptCheckpointError(
                        f"cannot read {self.store.url_of(self._rel_raw(METADATA_FILE))}: chunk {list(offsets)} of "
                        f"{name} has no storage entry")
                if si.transform_descriptors:
                    self._transforms[(prefix + si.relative_path, int(si.offset))] = tuple(si.transform_descriptors)
                pieces.append(Piece(prefix + si.relative_path, offsets, sizes, int(si.offset), int(si.length),
                                    _rank_of(si.relative_path)))
            infos[name] = TensorInfo(name=name, shape=tuple(entry.size), dtype=str(dtype) if dtype else "unknown",
                                     group=_group_of(name), layout="dcp", pieces=pieces)
        self._infos = infos
        self._objects = objects

    # -- the reader interface ---------------------------------------------------------------
    def tensors(self) -> Iterator[TensorInfo]:
        self._index()
        return iter(self._infos.values())

    def tensor_infos(self) -> dict[str, TensorInfo]:
        self._index()
        return dict(self._infos)

    def objects(self) -> list[ObjectInfo]:
        """Non-tensor entries (ShardedObjects such as ``rng_state``, ``_extra_state``)."""
        self._index()
        return list(self._objects.values())

    def _info(self, name: str) -> TensorInfo:
        self._index()
        info = self._infos.get(name)
        if info is None:
            raise NotFoundError(f"{self.store.url}: no tensor named {name!r} in this Megatron checkpoint")
        return info

    def _where(self, piece: Piece, name: str) -> str:
        return f"{self.store.url_of(piece.file)} (bytes {piece.byte_offset}+{piece.byte_length}, {name})"

    def read_chunk_bytes(self, piece: Piece, name: str) -> bytes:
        """The ``torch.save`` blob of one chunk of tensor ``name`` (stream transforms undone):
        one ranged read, its zip records CRC-checked on the bytes read (once per chunk)."""
        where = self._where(piece, name)
        blob = self.store.read_range(piece.file, piece.byte_offset, piece.byte_offset + piece.byte_length)
        if len(blob) != piece.byte_length:
            raise CorruptCheckpointError(f"cannot read {where}: truncated ({len(blob)} of {piece.byte_length} bytes)")
        descriptors = self._transforms.get((piece.file, piece.byte_offset))
        if descriptors:
            blob = _untransform(blob, descriptors, where)
        key = (piece.file, piece.byte_offset)
        if key not in self._crc_verified:
            check_archive(blob, where)
            self._crc_verified.add(key)
            self._crc_parts.pop(key, None)  # checked whole: what partial reads added is moot
        return blob

    def finish_crc_checks(self) -> None:
        """Finish the CRC checks that partial chunk reads (:meth:`read_region`) started: read the
        bytes of those records no read covered, and compare. Call it before committing."""
        for key, checks in list(self._crc_parts.items()):
            for check in checks.values():
                check.complete()
            if checks:  # the chunk's tensor data is checked (its data.pkl was, when it was read)
                self._crc_verified.add(key)
            self._crc_parts.pop(key, None)

    def _read_chunks(self, pieces: list[Piece], name: str) -> Iterator[bytes]:
        """:meth:`read_chunk_bytes` of each piece, in order; on object stores several at once
        (the CRC checks run in those threads too: zlib releases the GIL)."""
        if self.store.is_local or len(pieces) < 2 or self.max_workers < 2 \
                or getattr(self.store, "read_ahead", None) is not None:
            # (a read-ahead fetches concurrently already, and serves reads made in its plan's order)
            for piece in pieces:
                yield self.read_chunk_bytes(piece, name)
            return
        from concurrent.futures import ThreadPoolExecutor

        with ThreadPoolExecutor(min(self.max_workers, len(pieces))) as pool:
            yield from pool.map(lambda p: self.read_chunk_bytes(p, name), pieces)

    def _decode(self, blob: bytes, piece: Piece, info: TensorInfo, dtype) -> "torch.Tensor":
        """The chunk tensor in ``blob`` (from :meth:`read_chunk_bytes`)."""
        import torch

        where = self._where(piece, info.name)
        numel = math.prod(piece.sizes)
        if blob[:4] == ZIP_MAGIC:
            t = load_pt(blob, name=where)
        elif len(blob) == numel * dtype_size(info.dtype) and dtype_size(info.dtype):
            t = torch.frombuffer(bytearray(blob), dtype=dtype).reshape(piece.sizes) if numel else \
                torch.empty(piece.sizes, dtype=dtype)
        else:
            raise CorruptCheckpointError(f"cannot read {where}: neither a torch.save blob nor raw tensor bytes")
        if not isinstance(t, torch.Tensor):
            raise CorruptCheckpointError(f"cannot read {where}: holds a {type(t).__name__}, not a tensor")
        if tuple(t.shape) != tuple(piece.sizes):
            raise CorruptCheckpointError(f"cannot read {where}: chunk shape {list(t.shape)}, metadata says "
                                         f"{list(piece.sizes)}")
        if t.dtype != dtype:
            raise CorruptCheckpointError(f"cannot read {where}: chunk dtype {t.dtype}, metadata says {info.dtype}")
        return t

    def read_tensor(self, name: str, index: int | None = None) -> "torch.Tensor":
        """The global tensor, assembled from its chunks (one ranged read per chunk).

        With ``index``, only ``tensor[index]`` (along dim 0), reading only the chunks that hold
        it: a stacked ``decoder.layers.*`` tensor can then be streamed one layer at a time.
        """
        import torch

        info = self._info(name)
        dtype = torch_dtype(info, self.store.url)
        pieces = info.pieces
        shape = info.shape
        if index is not None:
            if not shape or not 0 <= index < shape[0]:
                raise CkptctlError(f"{self.store.url}: {name} has no index {index} along dim 0 (shape {shape})")
            pieces = self._pieces_of(info).at_index(index)
            shape = shape[1:]
        out = torch.empty(shape, dtype=dtype)
        covered = 0
        for piece, blob in zip(pieces, self._read_chunks(pieces, name)):
            chunk = self._decode(blob, piece, info, dtype)
            if index is not None:
                chunk = chunk[index - piece.offsets[0]]
                region = tuple(slice(o, o + s) for o, s in zip(piece.offsets[1:], piece.sizes[1:]))
            else:
                region = tuple(slice(o, o + s) for o, s in zip(piece.offsets, piece.sizes))
            out[region] = chunk
            covered += chunk.numel()
        if covered != out.numel():
            raise CorruptCheckpointError(f"{self.store.url}: the chunks of {name} cover {covered} of {out.numel()} "
                                         "elements")
        return out

    #: :meth:`read_region` reads a chunk the region covers only in part by its byte span alone
    #: when the chunk is at least this large and the span at most this fraction of it.
    REGION_MIN_BYTES = 1 << 20
    REGION_MAX_FRACTION = 0.75

    def read_region(self, name: str, offsets: Iterable[int], sizes: Iterable[int]) -> "torch.Tensor":
        """The block ``[offsets, offsets + sizes)`` of global tensor ``name``, reading only the
        chunks that overlap it. A chunk the block covers only in part is not read whole when
        that saves enough (see ``REGION_*``): its ``torch.save`` blob is opened as a zip through
        ranged reads (:class:`~ckptctl.formats.torchzip.TorchZipFile`: directory, ``data.pkl``)
        and only the bytes between the first and the last element needed are fetched. Such
        partial reads add up to the chunk's CRC check across calls: call
        :meth:`finish_crc_checks` before trusting (committing) the results."""
        import torch

        info = self._info(name)
        dtype = torch_dtype(info, self.store.url)
        offsets, sizes = tuple(int(o) for o in offsets), tuple(int(s) for s in sizes)
        if len(offsets) != len(info.shape) or len(sizes) != len(info.shape) or any(
                o < 0 or s < 0 or o + s > d for o, s, d in zip(offsets, sizes, info.shape)):
            raise CkptctlError(f"{self.store.url}: block {list(offsets)}+{list(sizes)} is not inside {name} "
                               f"{list(info.shape)}")
        out = torch.empty(sizes, dtype=dtype)
        if not out.numel():
            return out
        whole, partial = self._region_pieces(info, offsets, sizes)
        covered = 0
        for p, local, dest in partial:
            block = self._read_part(p, info, local, dtype)
            if block is None:
                whole.append((p, local, dest))
                continue
            out[dest] = block
            covered += block.numel()
        blobs = self._read_chunks([p for p, _, _ in whole], name)
        for (p, local, dest), blob in zip(whole, blobs):
            chunk = self._decode(blob, p, info, dtype)[local]
            out[dest] = chunk
            covered += chunk.numel()
        if covered != out.numel():
            raise CorruptCheckpointError(f"{self.store.url}: the chunks of {name} cover {covered} of {out.numel()} "
                                         f"elements of block {list(offsets)}+{list(sizes)}")
        return out

    #: Chunk indexes kept: more than the stacked tensors of one layer, which an export reads in
    #: turn, layer after layer (an index is rebuilt at most once per layer then).
    PIECE_INDEXES_KEPT = 32

    def _pieces_of(self, info: TensorInfo) -> "_PieceIndex":
        index = self._piece_indexes.pop(info.name, None)
        if index is None or index.pieces is not info.pieces:
            index = _PieceIndex(info.pieces)
        self._piece_indexes[info.name] = index  # the most recently used last
        if len(self._piece_indexes) > self.PIECE_INDEXES_KEPT:  # an index is as large as its tensor's
            del self._piece_indexes[next(iter(self._piece_indexes))]  # chunk list: keep a few only
        return index

    def _region_pieces(self, info: TensorInfo, offsets: tuple[int, ...], sizes: tuple[int, ...]
                       ) -> tuple[list[tuple[Piece, tuple, tuple]], list[tuple[Piece, tuple, tuple]]]:
        """The chunks overlapping block ``[offsets, offsets + sizes)``: (those it covers whole,
        those it covers in part), each as (piece, its slice in the chunk, its slice in the block)."""
        whole, partial = [], []
        for p in self._pieces_of(info).near(offsets, sizes):
            lo = tuple(max(po, o) for po, o in zip(p.offsets, offsets))
            hi = tuple(min(po + ps, o + s) for po, ps, o, s in zip(p.offsets, p.sizes, offsets, sizes))
            if any(a >= b for a, b in zip(lo, hi)):
                continue
            local = tuple(slice(a - po, b - po) for a, b, po in zip(lo, hi, p.offsets))
            dest = tuple(slice(a - o, b - o) for a, b, o in zip(lo, hi, offsets))
            (whole if lo == p.offsets and hi == tuple(po + ps for po, ps in zip(p.offsets, p.sizes))
             else partial).append((p, local, dest))
        return whole, partial

    def _part_worth_reading(self, piece: Piece, info: TensorInfo, local: tuple[slice, ...]) -> bool:
        """Whether :meth:`_read_part` reads ``chunk[local]`` by its byte span rather than the
        whole chunk (a large chunk, a small enough span, no stream transforms)."""
        if (piece.byte_length or 0) < self.REGION_MIN_BYTES or (piece.file, piece.byte_offset) in self._transforms:
            return False
        item = dtype_size(info.dtype)
        strides = [1] * len(piece.sizes)
        for d in range(len(piece.sizes) - 2, -1, -1):
            strides[d] = strides[d + 1] * piece.sizes[d + 1]
        first = sum(s.start * st for s, st in zip(local, strides))
        last = sum((s.stop - 1) * st for s, st in zip(local, strides))
        return bool(item) and (last - first + 1) * item <= self.REGION_MAX_FRACTION * piece.byte_length

    def planned_reads(self, reads: Iterable[Any]) -> list[tuple[str, int, int]]:
        """``(file, start, end)`` of the ranged reads that reading ``reads`` makes, in that order:
        each a tensor name or ``(name, index)`` (:meth:`read_tensor`; index None: whole), or
        ``(name, offsets, sizes)`` (:meth:`read_region`). Each chunk read is planned as its whole
        byte range in its ``.distcp`` (a chunk read in part, by its span, reads inside that range).
        Unknown names are left out. The plan of a read-ahead (:class:`ckptctl.storage.ReadAhead`)."""
        self._index()
        plan = []
        for asked in reads:
            name, *how = (asked,) if isinstance(asked, str) else asked
            info = self._infos.get(name)
            if info is None:
                continue
            if len(how) == 2:  # read_region: the chunks read in part first, then the whole ones
                offsets, sizes = tuple(int(o) for o in how[0]), tuple(int(s) for s in how[1])
                whole, partial = self._region_pieces(info, offsets, sizes)
                by_span = [p for p, local, _ in partial if self._part_worth_reading(p, info, local)]
                pieces = by_span + [p for p, _, _ in whole] + [p for p, _, _ in partial if p not in by_span]
            elif how and how[0] is not None:
                index = how[0]
                pieces = self._pieces_of(info).at_index(index)
            else:
                pieces = info.pieces
            plan.extend((p.file, p.byte_offset, p.byte_offset + p.byte_length) for p in pieces)
        return plan

    def _read_part(self, piece: Piece, info: TensorInfo, local: tuple[slice, ...], dtype):
        """``chunk[local]`` by the byte span it covers in the chunk's blob, or None when reading
        the whole chunk is as good (small chunk, large span, stream transforms, odd layout).
        The result is a read-only view of the bytes read: copy it, never write into it."""
        import sys
        import warnings

        import torch

        from ckptctl.formats.torchzip import TorchZipFile

        if not self._part_worth_reading(piece, info, local):
            return None
        item = dtype_size(info.dtype)
        key = (piece.file, piece.byte_offset)
        checks = {} if key in self._crc_verified else self._crc_parts.setdefault(key, {})
        zf = TorchZipFile(_BlobStore(self.store, piece), "blob", size=piece.byte_length, crc_checks=checks)
        meta = zf.metadata()
        if (not isinstance(meta, torch.Tensor) or zf.legacy or zf.byteorder != sys.byteorder
                or tuple(meta.shape) != tuple(piece.sizes) or meta.dtype != dtype
                or any(st < 0 for st in meta.stride())):
            return None
        loc = zf.location(meta)
        stride = meta.stride()
        lo = loc.storage_offset + sum(s.start * st for s, st in zip(local, stride))
        hi = loc.storage_offset + sum((s.stop - 1) * st for s, st in zip(local, stride)) + 1
        data = zf.read_storage_bytes(loc.storage.key, lo * item, hi * item, tensor=info.name)
        with warnings.catch_warnings():  # not writable: only ever copied into the caller's output
            warnings.simplefilter("ignore", UserWarning)
            flat = torch.frombuffer(data, dtype=dtype)
        return flat.as_strided(tuple(s.stop - s.start for s in local), stride, 0)

    def read_object(self, name: str) -> Any:
        """A non-tensor entry (e.g. ``rng_state/shard_0.0_2.1``), loaded with the safe loader."""
        self._index()
        obj = self._objects.get(name)
        if obj is None:
            raise NotFoundError(f"{self.store.url}: no object named {name!r} in this Megatron checkpoint")
        blob = self._small_objects.get(name)
        if blob is None:
            blob = self.store.read_range(obj.file, obj.byte_offset, obj.byte_offset + obj.byte_length)
            if len(blob) <= _SMALL_OBJECT:
                self._small_objects[name] = blob
        where = f"{self.store.url_of(obj.file)} (bytes {obj.byte_offset}+{obj.byte_length}, {name})"
        if len(blob) != obj.byte_length:
            raise CorruptCheckpointError(f"cannot read {where}: truncated")
        check_archive(blob, where)
        return load_pt(blob, name=where, extra_stand_ins=self.extra_stand_ins)

    # -- summary ------------------------------------------------------------------------------
    def read_metadata_json(self) -> dict | None:
        """``metadata.json`` (read once); None when absent (the save did not finish)."""
        if self._metadata_json is None:
            self._metadata_json = (read_json(self.store, self._rel(METADATA_JSON)),)
        return self._metadata_json[0]

    def read_common(self) -> Any:
        """``common.pt`` (rank 0's non-sharded state) via the safe loader; None when absent."""
        rel = self._rel(COMMON_FILE)
        try:
            local = self.store.local_path(rel)
            if local is not None:
                import os

                if not os.path.exists(local):
                    return None
                source: Any = local
            else:
                source = self.store.read_bytes(rel)
        except NotFoundError:
            return None
        return load_pt(source, name=self.store.url_of(rel), extra_stand_ins=self.extra_stand_ins)

    def layout(self) -> str | None:
        """The parallel layout read from the chunks (``TP2·PP2·EP8``), as :meth:`summary` gives
        it, without the rest of the summary (what ``list`` shows for every step)."""
        self._index()
        infos = list(self._infos.values())
        files = {p.file for t in infos for p in t.pieces} | {o.file for o in self._objects.values()}
        ranks = sorted({r for f in files if (r := _rank_of(f)) is not None})
        return _infer_parallel(infos, ranks).get("layout")

    def summary(self, *, common: bool = True, check_files: bool = True) -> dict[str, Any]:
        """Plain-data facts: metadata.json, tensor statistics, inferred parallel layout,
        optimizer format, and (``common``) lr_scheduler / param_groups / rng from ``common.pt``.
        ``check_files``: one listing to check every chunk lies inside an existing file."""
        self._index()
        md = self._metadata
        problems: list[str] = []
        infos = list(self._infos.values())
        out: dict[str, Any] = {"backend": self.backend, "nesting": self.nesting}
        meta_json = self.read_metadata_json()
        out["metadata_json"] = meta_json
        if meta_json is None:
            problems.append(f"missing {self._rel(METADATA_JSON)} (written last by rank 0: the save did not finish)")
        elif meta_json.get("sharded_backend") not in (None, "torch_dist"):
            problems.append(f"sharded_backend is {meta_json.get('sharded_backend')!r}, not torch_dist")
        out["dcp_version"] = getattr(md, "version", None)
        out["tensors"] = _tensor_stats(infos)
        objs = list(self._objects.values())
        out["objects"] = {"count": len(objs), "keys": sorted({o.key for o in objs})}
        files = sorted({p.file for t in infos for p in t.pieces} | {o.file for o in objs})
        ranks = sorted({r for f in files if (r := _rank_of(f)) is not None})
        out["files"] = {"distcp": len(files), "data_bytes": sum(p.byte_length for t in infos for p in t.pieces)
                        + sum(o.byte_length for o in objs)}
        out["model"] = _model_shape_facts(infos)
        out["parallel"] = _infer_parallel(infos, ranks)
        out["optimizer"] = {"format_from_keys": _optimizer_format_from_keys(infos, objs)}
        out["optimizer"]["format"] = out["optimizer"]["format_from_keys"]
        out["optimizer"]["state_keys"] = sorted({m.group(1) for t in infos if (m := _OPT_STATE_RE.match(t.name))})
        out["optimizer"]["chains"] = optimizer_chains(infos, objs)
        rng_objects = sorted(o.name for o in objs if o.key.startswith("rng_state"))
        out["rng"] = {"present": bool(rng_objects), "where": "sharded objects" if rng_objects else None,
                      "objects": rng_objects}
        if common:
            self._summarise_common(out, problems)
            self._read_bucket_sizes(out["optimizer"], problems)
        _settle_optimizer_format(out["optimizer"], problems)
        if check_files:
            problems += self._check_files(files, infos, objs)
        out["problems"] = problems
        return out

    def _read_bucket_sizes(self, optimizer: dict, problems: list[str]) -> None:
        """Fill each ``dp_reshardable`` bucket's padded and unpadded numel from megatron's own
        ``per_bucket_numel(_unpadded)`` objects (one small read each per dp_group_idx, several
        at once on object stores), and the step / param_groups from each chain's first group's
        ``optimizer`` object when common.pt has none."""
        by_key: dict[str, ObjectInfo] = {}
        for o in self._objects.values():
            by_key.setdefault(o.key, o)
        wanted: list[tuple[dict, dict, str, ObjectInfo]] = []  # (chain, group, what, object)
        for chain in optimizer.get("chains") or ():
            prefix = f"{chain['chain']}." if chain.get("chain") else ""
            for group in chain.get("dp_groups") or ():
                base = f"{prefix}optimizer.distributed.dp_group_idx_{group['dp_group_idx']}"
                whats = ["per_bucket_numel", "per_bucket_numel_unpadded"]
                if group is chain["dp_groups"][0] and "param_groups" not in optimizer:
                    whats.append("optimizer")
                for what in whats:
                    obj = by_key.get(f"{base}.{what}")
                    if obj is not None:
                        wanted.append((chain, group, what, obj))
                    elif what != "optimizer":
                        group.setdefault("missing_objects", []).append(what)

        def load(item):
            try:
                return self.read_object(item[3].name), None
            except CkptctlError as exc:
                return None, exc

        if self.store.is_local or len(wanted) < 2 or self.max_workers < 2:
            loaded = [load(item) for item in wanted]
        else:
            from concurrent.futures import ThreadPoolExecutor

            with ThreadPoolExecutor(min(self.max_workers, len(wanted))) as pool:
                loaded = list(pool.map(load, wanted))
        failed: set[int] = set()
        for (chain, group, what, obj), (data, error) in zip(wanted, loaded):
            try:
                if error is not None:
                    raise error
                if what == "optimizer":
                    groups = [g for g in _find_key(_sharded_object_data(data), "param_groups") or ()
                              if isinstance(g, dict)]
                    chain["param_groups"] = [_summarise_group(g) for g in groups]
                    steps = {g.get("step") for g in groups if g.get("step") is not None}
                    if len(steps) == 1:
                        chain["step"] = _num(steps.pop())
                else:
                    _apply_bucket_numels(group, what, data)
            except (CkptctlError, TypeError, ValueError, AttributeError) as exc:
                problems.append(f"cannot read {obj.name}: {exc}")
                failed.add(id(group))
        for chain in optimizer.get("chains") or ():
            prefix = f"{chain['chain']}." if chain.get("chain") else ""
            for group in chain.get("dp_groups") or ():
                if id(group) not in failed:
                    problems.extend(_bucket_problems(prefix, group))
        chains = [c for c in optimizer.get("chains") or () if c.get("param_groups") is not None]
        if chains and "param_groups" not in optimizer:  # dp_reshardable: in sharded objects, not common.pt
            optimizer["param_groups"] = chains[0]["param_groups"]
        steps = {c["step"] for c in chains if c.get("step") is not None}
        if "step" not in optimizer and len(steps) == 1:
            optimizer["step"] = steps.pop()

    def _summarise_common(self, out: dict, problems: list[str]) -> None:
        try:
            state = self.read_common()
        except CkptctlError as exc:
            out["common"] = {"error": str(exc)}
            problems.append(str(exc))
            return
        if state is None:
            out["common"] = None
            problems.append(f"missing {self._rel(COMMON_FILE)}")
            return
        if not isinstance(state, dict):
            out["common"] = {"type": type(state).__name__}
            return
        out["common"] = {"keys": sorted(map(str, state))}
        if "lr_scheduler" in state:
            out["lr_scheduler"] = _scalars(to_plain(state["lr_scheduler"]))
        opt = state.get("optimizer")
        if opt is not None:
            groups = _find_key(opt, "param_groups")
            o = out["optimizer"]
            o["format_in_common"] = _formats_in_common(opt)
            if isinstance(groups, list):
                o["param_groups"] = [_summarise_group(g) for g in groups if isinstance(g, dict)]
                steps = {g.get("step") for g in groups if isinstance(g, dict) and g.get("step") is not None}
                if len(steps) == 1:
                    o["step"] = _num(steps.pop())
            common_step = _find_key(opt, "common_step")
            if common_step is not None and "step" not in o:
                o["step"] = _num(common_step)
        rng = state.get("rng")
        if rng is not None:
            out["rng"]["present"] = True
            out["rng"]["where"] = "common.pt" if not out["rng"]["objects"] else "common.pt and sharded objects"
            if isinstance(rng, dict):
                out["rng"]["keys"] = sorted(map(str, rng))

    def data_file_extents(self) -> dict[str, int]:
        """Every data file ``.metadata`` names (relative to the component) and the end of its last
        chunk (every ``_StorageInfo``: tensors, objects, ``_extra_state``): the size the file must
        at least have."""
        md = self._load_metadata()
        need: dict[str, int] = defaultdict(int)
        try:
            for si in md.storage_data.values():
                rel = self.prefix + str(si.relative_path)
                need[rel] = max(need[rel], int(si.offset) + int(si.length))
        except (TypeError, ValueError) as exc:
            raise CorruptCheckpointError(f"cannot read {self.store.url_of(self._rel_raw(METADATA_FILE))}: "
                                         f"a storage entry without file, offset or length ({exc})") from exc
        return dict(need)

    def _check_files(self, files: list[str], infos: list[TensorInfo], objs: list[ObjectInfo]) -> list[str]:
        try:
            listing = {f.path: f.size for f in self.store.walk()}
        except CkptctlError as exc:
            return [f"could not list {self.store.url}: {exc}"]
        need = self.data_file_extents()
        problems = []
        missing = sorted((f for f in files if f not in listing), key=natural_key)
        if missing:
            problems.append(f"missing data files named in {self._rel(METADATA_FILE)}: {', '.join(missing[:8])}"
                            + (f" (+{len(missing) - 8} more)" if len(missing) > 8 else ""))
        for f, end in sorted(need.items(), key=lambda item: natural_key(item[0])):
            if f in listing and listing[f] < end:
                problems.append(f"{f} is truncated: {listing[f]} bytes, chunks need {end}")
        return problems


class _BlobStore:
    """One DCP item (a ``torch.save`` blob at a byte range of a ``.distcp`` file) seen as a file
    named ``blob``, for :class:`~ckptctl.formats.torchzip.TorchZipFile`."""

    def __init__(self, store: "Store", piece: Piece):
        self._store, self._file = store, piece.file
        self._start, self._length = int(piece.byte_offset), int(piece.byte_length)

    def size(self, rel: str) -> int:
        return self._length

    def url_of(self, rel: str = "") -> str:
        return f"{self._store.url_of(self._file)} (bytes {self._start}+{self._length})"

    def read_range(self, rel: str, start: int, end: int) -> bytes:
        end = min(end, self._length)
        return self._store.read_range(self._file, self._start + start, self._start + end) if end > start else b""

    def read_bytes(self, rel: str) -> bytes:
        return self.read_range(rel, 0, self._length)


# -- helpers for summary ----------------------------------------------------------------------

def _untransform(blob: bytes, descriptors: tuple[str, ...], where: str) -> bytes:
    """Undo DCP stream transforms (e.g. ``stream.zstd/1``) with torch's own extension registry."""
    import io

    try:
        from torch.distributed.checkpoint._extension import ExtensionRegistry, StreamTransformExtension

        stream = io.BytesIO(blob)
        for ext in ExtensionRegistry().from_descriptor_list(list(descriptors)):
            if isinstance(ext, StreamTransformExtension):
                stream = ext.transform_from(stream)
        return stream.read()
    except Exception as exc:  # noqa: BLE001 - unknown descriptor, missing codec, bad data
        raise CkptctlError(f"cannot read {where}: stored with transforms {list(descriptors)} "
                           f"({type(exc).__name__}: {exc})") from exc


def _tensor_stats(infos: list[TensorInfo]) -> dict[str, Any]:
    by_group: dict[str, dict] = {}
    for t in infos:
        g = by_group.setdefault(t.group, {"tensors": 0, "params": 0, "bytes": 0, "chunks": 0, "dtypes": Counter()})
        g["tensors"] += 1
        g["params"] += t.numel
        g["bytes"] += t.nbytes
        g["chunks"] += len(t.pieces)
        g["dtypes"][t.dtype] += 1
    for g in by_group.values():
        g["dtypes"] = dict(g["dtypes"])
    return {"total": len(infos), "by_group": by_group}


def _model_shape_facts(infos: list[TensorInfo]) -> dict[str, Any]:
    model = {t.name: t for t in infos if t.group == MODEL}
    stacked = [t for t in model.values() if _layer_axis(t.name)]
    per_layer = {int(m.group(1)) for n in model if (m := _PER_LAYER_RE.match(n))}
    out: dict[str, Any] = {"layer_keys": "stacked" if stacked else ("per_layer" if per_layer else None)}
    if stacked:
        out["num_layers"] = max(t.shape[0] for t in stacked if t.shape)
    elif per_layer:
        out["num_layers"] = max(per_layer) + 1
    emb = model.get("embedding.word_embeddings.weight")
    if emb is not None and len(emb.shape) == 2:
        out["padded_vocab_size"], out["hidden_size"] = emb.shape
        out["tied_embeddings"] = "output_layer.weight" not in model
    return out


def _split_counts(t: TensorInfo, dim: int) -> int:
    """How many distinct chunk offsets along ``dim`` the first layer of ``t`` has."""
    first = min((p.offsets[0] for p in t.pieces), default=0) if _layer_axis(t.name) else None
    return len({p.offsets[dim] for p in t.pieces if first is None or p.offsets[0] == first})


def _infer_parallel(infos: list[TensorInfo], ranks: list[int]) -> dict[str, Any]:
    """TP from chunking, PP from which ranks wrote which layers, world size from file names."""
    model = {t.name: t for t in infos if t.group == MODEL}
    out: dict[str, Any] = {"writer_ranks": len(ranks), "world_size_min": (max(ranks) + 1) if ranks else None}
    evidence: dict[str, Any] = {}

    def find(suffix):
        for n, t in model.items():
            if n.endswith(suffix) and t.pieces and t.shape:
                return t
        return None

    tp = None
    # row-parallel (split on the last dim), column-parallel QKV (split on the output rows)
    for suffix, dim in (("self_attention.linear_proj.weight", -1), ("self_attention.linear_qkv.weight", -2),
                        ("mlp.linear_fc2.weight", -1), ("embedding.word_embeddings.weight", 0)):
        t = find(suffix)
        if t is None:
            continue
        n = _split_counts(t, dim if dim >= 0 else len(t.shape) + dim)
        evidence[t.name] = n
        if tp is None:
            tp = n
    fc1 = find("mlp.linear_fc1.weight")
    if fc1 is not None:
        n = _split_counts(fc1, len(fc1.shape) - 2)
        evidence[fc1.name] = n
        if tp and n == 2 * tp:
            out["swiglu_fc1_chunks"] = n
    out["tp"] = tp
    out["tp_evidence"] = evidence
    pp, pp_note = _infer_pp(infos, ranks, tp)
    out["pp"] = pp
    out["pp_note"] = pp_note
    world = out["world_size_min"]
    out["dp"] = world // (tp * pp) if world and tp and pp and world % (tp * pp) == 0 else None
    experts = _infer_expert_parallel(model, ranks, pp)
    out.update(experts)
    if tp:
        parts = [f"TP{tp}", f"PP{pp or '?'}"]
        if experts:
            parts.append(f"EP{experts['ep'] or '?'}")
            if experts.get("etp") and experts["etp"] != tp:
                parts.append(f"ETP{experts['etp']}")
        out["layout"] = "·".join(parts)
    return out


_EXPERT_FC2_SUFFIXES = ("mlp.experts.experts.linear_fc2.weight", "mlp.experts.linear_fc2.weight")


def _infer_expert_parallel(model: dict[str, TensorInfo], ranks: list[int], pp: int | None) -> dict[str, Any]:
    """EP and ETP of an MoE checkpoint from the chunks of one layer's ``linear_fc2`` experts
    ``[E, H, F]``: ETP = the splits of an expert along F; EP = the largest that puts every
    expert's writers on the EP rank owning its block of E/EP experts, with megatron's expert rank
    order (etp-ep-dp-pp: ep_rank = (rank within the stage // ETP) % EP). {} for a dense model."""
    fc2 = next((t for n, t in sorted(model.items()) if n.endswith(_EXPERT_FC2_SUFFIXES) and t.pieces), None)
    if fc2 is None:
        return {}
    stacked = _layer_axis(fc2.name)
    axis = 1 if stacked else 0
    if len(fc2.shape) != axis + 3:
        return {"ep": None, "etp": None}
    experts = fc2.shape[axis]
    first = min(p.offsets[0] for p in fc2.pieces) if stacked else None
    pieces = [p for p in fc2.pieces if first is None or p.offsets[0] == first]
    splits: dict[int, set[int]] = defaultdict(set)
    writers: dict[int, set[int]] = defaultdict(set)
    for p in pieces:
        for e in range(p.offsets[axis], p.offsets[axis] + p.sizes[axis]):
            splits[e].add(p.offsets[-1])
            if p.rank is not None:
                writers[e].add(p.rank)
    etp = len(splits[0]) if splits else None
    world = (max(ranks) + 1) if ranks else None
    if not world or not etp or not pp or world % (pp * etp) or len(writers) != experts:
        return {"num_experts": experts, "ep": None, "etp": etp}
    per_stage = world // pp
    best = 1
    for ep in range(2, per_stage // etp + 1):
        if experts % ep or (per_stage // etp) % ep:
            continue
        block = experts // ep
        if all(((r % per_stage) // etp) % ep == e // block for e, rs in writers.items() for r in rs):
            best = ep
    return {"num_experts": experts, "ep": best, "etp": etp}


def _layer_of(t: TensorInfo, piece: Piece) -> int | None:
    key = _model_key(t.name)
    m = _PER_LAYER_RE.match(key)
    if m:
        return int(m.group(1))
    if key.startswith(_STACKED_PREFIX) and piece.offsets and piece.sizes and piece.sizes[0] == 1:
        return piece.offsets[0]
    return None


def _infer_pp(infos: list[TensorInfo], ranks: list[int], tp: int | None) -> tuple[int | None, str]:
    """The largest PP for which every decoder layer was written only by ranks of one stage,
    stages own increasing contiguous layer ranges, the embedding by stage 0 and the output
    layer / final norm by the last stage -- with Megatron's default rank order (tp-cp-ep-dp-pp:
    stage = rank // (world / pp))."""
    if not ranks or not tp:
        return None, "no writer ranks or TP unknown"
    world = max(ranks) + 1
    writers: dict[int, set[int]] = defaultdict(set)
    first_stage: set[int] = set()
    last_stage: set[int] = set()
    for t in infos:
        key = _model_key(t.name)
        for p in t.pieces:
            if p.rank is None:
                continue
            layer = _layer_of(t, p)
            if layer is not None:
                writers[layer].add(p.rank)
            elif key.startswith("embedding."):
                first_stage.add(p.rank)
            elif key.startswith("output_layer.") or key.startswith("decoder.final_layernorm."):
                last_stage.add(p.rank)
    if not writers:
        return None, "no decoder layers found"
    layers = sorted(writers)
    if world % tp:
        return None, f"world size {world} (from file names) not divisible by TP {tp}"
    for pp in sorted((d for d in range(2, world // tp + 1) if (world // tp) % d == 0), reverse=True):
        if pp > len(layers):
            continue
        per_stage = world // pp
        stage_of_layer = []
        ok = True
        for layer in layers:
            stages = {r // per_stage for r in writers[layer]}
            if len(stages) != 1:
                ok = False
                break
            stage_of_layer.append(stages.pop())
        if not ok or stage_of_layer != sorted(stage_of_layer) or set(stage_of_layer) != set(range(pp)):
            continue
        if any(r // per_stage != 0 for r in first_stage) or any(r // per_stage != pp - 1 for r in last_stage):
            continue
        return pp, "from the ranks that wrote each decoder layer (default rank order tp-cp-ep-dp-pp assumed)"
    return 1, "every layer's writers are consistent only with PP=1"


def _optimizer_format_from_keys(infos: list[TensorInfo], objs: list[ObjectInfo]) -> str | None:
    states = {m.group(1) for t in infos if (m := _OPT_STATE_RE.match(t.name))}
    if any(".gbuf_idx_" in t.name for t in infos if t.group == OPTIMIZER):
        return "dp_reshardable"
    if any(o.key.endswith(".param_state") and _OPT_RE.match(o.key) for o in objs):
        return "dp_zero_gather_scatter"
    if "fp32_param" in states:
        return "fully_sharded_model_space"
    if "param" in states:
        return "fully_reshardable"
    if states:
        return "non_distributed"
    return None


#: a ``dp_reshardable`` flat buffer: ``[chained_{i}.]optimizer.distributed.dp_group_idx_{k}.gbuf_idx_{g}.``
#: ``dtype_({param dtype}, {grad dtype}).bucket_idx_{b}.{state}`` (chain "" for a single optimizer)
DP_BUFFER_RE = re.compile(r"^(?P<chain>(?:chained_\d+\.)?)optimizer\.distributed\.dp_group_idx_(?P<dpg>\d+)\."
                          r"gbuf_idx_(?P<gbuf>\d+)\.dtype_(?P<dtype>\(.*?\))\.bucket_idx_(?P<bucket>\d+)\."
                          r"(?P<state>[^.]+)$")
#: and its per-dp_group_idx objects: ``per_bucket_numel(_unpadded)``, ``optimizer``, ``grad_scaler``
DP_OBJECT_RE = re.compile(r"^(?P<chain>(?:chained_\d+\.)?)optimizer\.distributed\.dp_group_idx_(?P<dpg>\d+)\."
                          r"(?P<what>[^.]+)$")
_DTYPE_PAIR_RE = re.compile(r"^\(torch\.(\w+), torch\.(\w+)\)$")


def _chain_order(label: str | None) -> int:
    return -1 if label is None else int(label[len("chained_"):])


def optimizer_chains(infos: Iterable[TensorInfo], objs: Iterable[ObjectInfo]) -> list[dict[str, Any]]:
    """One entry per optimizer of the checkpoint's (chained) optimizer, from the key names only
    (no read): ``chain`` (``"chained_0"``..., None for a single optimizer), its format from the
    keys, its tensors and bytes; per-parameter formats add ``parameters`` and per-state figures,
    ``dp_reshardable`` adds ``dp_groups``: per ``dp_group_idx`` (one model-parallel rank group)
    its grad buffers (``gbuf_idx``, dtype pair) and their buckets (elements stored, bytes per
    state; ``numel`` / ``numel_unpadded`` stay None until megatron's own records are read)."""
    members: dict[str | None, tuple[list[TensorInfo], list[ObjectInfo]]] = {}
    for t in infos:
        if m := _OPT_RE.match(t.name):
            members.setdefault(m.group(1), ([], []))[0].append(t)
    for o in objs:
        if m := _OPT_RE.match(o.key):
            members.setdefault(m.group(1), ([], []))[1].append(o)
    chains = []
    for label in sorted(members, key=_chain_order):
        tensors, objects = members[label]
        chain: dict[str, Any] = {"chain": label, "format_from_keys": _optimizer_format_from_keys(tensors, objects),
                                 "tensors": len(tensors), "objects": len(objects),
                                 "bytes": sum(t.nbytes for t in tensors)}
        states: dict[str, dict[str, int]] = {}
        params = set()
        for t in tensors:
            if m := _OPT_STATE_RE.match(t.name):
                params.add(m.group(2))
                figures = states.setdefault(m.group(1), {"tensors": 0, "numel": 0, "bytes": 0})
                figures["tensors"] += 1
                figures["numel"] += t.numel
                figures["bytes"] += t.nbytes
        if states:
            chain["parameters"] = len(params)
            chain["states"] = dict(sorted(states.items()))
        groups = _dp_groups(tensors, objects)
        if groups:
            chain["dp_groups"] = groups
        chains.append(chain)
    return chains


def _dp_groups(tensors: list[TensorInfo], objects: list[ObjectInfo]) -> list[dict[str, Any]]:
    """The flat ``dp_reshardable`` buffers of one optimizer, grouped by dp_group_idx, grad
    buffer and bucket (see :func:`optimizer_chains`)."""
    groups: dict[int, dict[str, Any]] = {}
    for t in tensors:
        m = DP_BUFFER_RE.match(t.name)
        if not m:
            continue
        k, gbuf, dtype, index, state = int(m["dpg"]), int(m["gbuf"]), m["dtype"], int(m["bucket"]), m["state"]
        group = groups.setdefault(k, {"dp_group_idx": k, "writer_ranks": set(), "buffers": []})
        group["writer_ranks"].update(p.rank for p in t.pieces if p.rank is not None)
        bucket = _bucket(_buffer(group, gbuf, dtype), index)
        stored = t.shape[0] if len(t.shape) == 1 else t.numel
        bucket["stored_by_state"][state] = stored
        bucket["bytes"][state] = t.nbytes
    for o in objects:
        m = DP_OBJECT_RE.match(o.key)
        if m and int(m["dpg"]) in groups and o.rank is not None:
            groups[int(m["dpg"])]["writer_ranks"].add(o.rank)
    out = []
    for k in sorted(groups):
        group = groups[k]
        group["writer_ranks"] = sorted(group["writer_ranks"])
        for buf in group["buffers"]:
            for bucket in buf["buckets"]:
                _settle_stored(bucket)
        out.append(group)
    return out


def _buffer(group: dict, gbuf: int, dtype: str) -> dict:
    for buf in group["buffers"]:
        if (buf["gbuf_idx"], buf["dtype"]) == (gbuf, dtype):
            return buf
    m = _DTYPE_PAIR_RE.match(dtype)
    buf = {"gbuf_idx": gbuf, "dtype": dtype, "param_dtype": TORCH_DTYPES.get(m.group(1)) if m else None,
           "grad_dtype": TORCH_DTYPES.get(m.group(2)) if m else None, "buckets": []}
    group["buffers"].append(buf)
    group["buffers"].sort(key=lambda b: (b["gbuf_idx"], b["dtype"]))
    return buf


def _bucket(buf: dict, index: int) -> dict:
    for bucket in buf["buckets"]:
        if bucket["bucket_idx"] == index:
            return bucket
    bucket = {"bucket_idx": index, "numel": None, "numel_unpadded": None, "padding": None, "stored_numel": None,
              "stored_by_state": {}, "bytes": {}}
    buf["buckets"].append(bucket)
    buf["buckets"].sort(key=lambda b: b["bucket_idx"])
    return bucket


def _settle_stored(bucket: dict) -> None:
    """``stored_numel``: the buffers' length (every state's alike; kept per state if not)."""
    lengths = set(bucket["stored_by_state"].values())
    bucket["stored_numel"] = lengths.pop() if len(lengths) == 1 else None
    if bucket["stored_numel"] is not None:
        del bucket["stored_by_state"]


def _sharded_object_data(value: Any) -> Any:
    """megatron's torch_dist strategy saves a ShardedObject as ``torch.save([obj.data])``."""
    return value[0] if isinstance(value, list) and len(value) == 1 else value


def bucket_numels(value: Any) -> list[dict[str, list[int]]]:
    """megatron's ``per_bucket_numel`` / ``per_bucket_numel_unpadded`` object as read (a
    ShardedObject is saved as ``[data]``): per grad buffer, ``{"(param dtype, grad dtype)": [numel
    per bucket]}``, the dtype pair spelt as in the buffer keys; ValueError when it is not that."""
    if isinstance(value, list) and len(value) == 1 and isinstance(value[0], list):
        value = value[0]
    if not isinstance(value, list):
        raise ValueError(f"expected a list per grad buffer, got {type(value).__name__}")
    out = []
    for gbuf, per_dtype in enumerate(value):
        if not isinstance(per_dtype, dict):
            raise ValueError(f"grad buffer {gbuf}: expected a dict per dtype pair, got {type(per_dtype).__name__}")
        entry = {}
        for key, numels in per_dtype.items():
            if not isinstance(numels, (list, tuple)) or not all(
                    isinstance(n, int) and not isinstance(n, bool) and n >= 0 for n in numels):
                raise ValueError(f"grad buffer {gbuf}: bucket sizes {numels!r} are not counts")
            entry[f"({', '.join(str(x) for x in key)})" if isinstance(key, tuple) else str(key)] = list(numels)
        out.append(entry)
    return out


def _apply_bucket_numels(group: dict, what: str, data: Any) -> None:
    """Record megatron's ``per_bucket_numel`` or ``per_bucket_numel_unpadded`` (see
    :func:`bucket_numels`) on ``group``'s buckets."""
    field = "numel" if what == "per_bucket_numel" else "numel_unpadded"
    for gbuf, per_dtype in enumerate(bucket_numels(data)):
        for key, numels in per_dtype.items():
            buf = _buffer(group, gbuf, key)
            for index, numel in enumerate(numels):
                _bucket(buf, index)[field] = numel
    for buf in group["buffers"]:
        for bucket in buf["buckets"]:
            if bucket["numel"] is not None and bucket["numel_unpadded"] is not None:
                bucket["padding"] = bucket["numel"] - bucket["numel_unpadded"]


def _bucket_problems(prefix: str, group: dict) -> list[str]:
    """Buffers that disagree with megatron's records: megatron stores each bucket's UNPADDED
    elements (its trailing padding is not saved), and every bucket it recorded."""
    problems = []
    for buf in group["buffers"]:
        for bucket in buf["buckets"]:
            name = (f"{prefix}optimizer.distributed.dp_group_idx_{group['dp_group_idx']}.gbuf_idx_{buf['gbuf_idx']}."
                    f"dtype_{buf['dtype']}.bucket_idx_{bucket['bucket_idx']}")
            stored, unpadded = bucket["stored_numel"], bucket["numel_unpadded"]
            if not bucket["bytes"]:
                problems.append(f"{name}: recorded in per_bucket_numel but no buffer of it is saved")
            elif stored is None:
                problems.append(f"{name}: its states have different lengths {bucket.get('stored_by_state')}")
            elif unpadded is not None and stored != unpadded:
                problems.append(f"{name}: holds {stored} elements, per_bucket_numel_unpadded says {unpadded}")
            elif not group.get("missing_objects") and (bucket["numel"] is None or unpadded is None):
                problems.append(f"{name}: not recorded in per_bucket_numel")
            if bucket["numel"] is not None and unpadded is not None and unpadded > bucket["numel"]:
                problems.append(f"{name}: per_bucket_numel_unpadded {unpadded} exceeds per_bucket_numel "
                                f"{bucket['numel']}")
    return problems


def _formats_in_common(opt: Any) -> dict[str | None, str]:
    """``param_state_sharding_type`` per optimizer of the chain, as megatron writes it into
    common.pt (a ChainedOptimizer's state is ``{0: ..., 1: ...}``, matching ``chained_{i}.``)."""
    if isinstance(opt, dict) and opt and all(isinstance(k, int) for k in opt):
        parts = {f"chained_{k}": v for k, v in opt.items()}
    elif isinstance(opt, list) and opt and all(isinstance(v, dict) for v in opt):
        parts = {f"chained_{k}": v for k, v in enumerate(opt)}
    else:
        parts = {None: opt}
    out = {}
    for label, part in parts.items():
        fmt = _find_key(part, "param_state_sharding_type")
        if isinstance(fmt, str):
            out[label] = fmt
    return out


def _settle_optimizer_format(optimizer: dict, problems: list[str]) -> None:
    """Each chain's format: what common.pt names (megatron writes it there), else what its keys
    show; a disagreement is a problem. The overall ``format``: the chains' common one ("mixed"
    when they differ), ``format_source`` where it came from."""
    in_common = optimizer.pop("format_in_common", None)
    chains = optimizer.get("chains") or []
    for chain in chains:
        named = (in_common or {}).get(chain["chain"])
        keys = chain["format_from_keys"]
        if in_common is not None:
            chain["format_in_common"] = named
        if named and keys and named != keys:
            where = f"optimizer {chain['chain']}" if chain["chain"] else "optimizer"
            problems.append(f"{where}: common.pt names the format {named!r} but its keys are those of {keys!r}")
        chain["format"] = named or keys
    formats = {c["format"] for c in chains if c["format"]}
    if len(formats) == 1:
        optimizer["format"] = formats.pop()
    elif formats:
        optimizer["format"] = "mixed"
    optimizer["format_source"] = "common.pt" if chains and all(c.get("format_in_common") for c in chains) else "keys"


def _find_key(obj: Any, key: str, depth: int = 0) -> Any:
    """The first value under ``key`` in nested dicts/lists (breadth-limited)."""
    if depth > 4:
        return None
    if isinstance(obj, dict):
        if key in obj:
            return obj[key]
        values = obj.values()
    elif isinstance(obj, (list, tuple)):
        values = obj
    else:
        return None
    for v in values:
        if isinstance(v, (dict, list, tuple)):
            found = _find_key(v, key, depth + 1)
            if found is not None:
                return found
    return None


def _num(v: Any) -> Any:
    try:
        import torch

        if isinstance(v, torch.Tensor) and v.numel() == 1:
            return v.item()
    except ImportError:  # pragma: no cover
        pass
    return int(v) if isinstance(v, float) and v.is_integer() else v


def _scalars(d: Any) -> Any:
    if not isinstance(d, dict):
        return d
    return {str(k): v for k, v in d.items() if isinstance(v, (int, float, str, bool, type(None)))
            or (isinstance(v, (list, tuple)) and all(isinstance(x, (int, float, str, bool)) for x in v))}


def _summarise_group(g: dict) -> dict:
    out = _scalars(to_plain({k: _num(v) for k, v in g.items() if k != "params"}))
    if "params" in g and isinstance(g["params"], (list, tuple)):
        out["num_params"] = len(g["params"])
    return out


__all__ = ["DP_BUFFER_RE", "DP_OBJECT_RE", "MegatronReader", "ObjectInfo", "METADATA_GLOBALS", "bucket_numels",
           "optimizer_chains"]
