"""Writing torch DCP checkpoints (megatron-core ``torch_dist``) file by file, without a
process group, a planner or megatron model code.

What torch DCP's ``FileSystemWriter`` + megatron-core's ``torch_dist`` strategy put on disk,
and what their readers need (checked against torch 2.13 / megatron-core 0.16.1):

``__{rank}_{i}.distcp``
    Items back to back; each tensor chunk is its own ``torch.save`` blob (megatron passes
    ``SerializationFormat.TORCH_SAVE``; torch's ``FileSystemReader.read_data`` always
    ``torch.load``\\ s a tensor item), a non-tensor item (ShardedObject, ``_extra_state``) is
    the ``torch.save``'d bytes megatron hands DCP as ``BytesIO``. A saved chunk must own its
    storage (``torch.save`` of a view writes the whole base storage; DCP clones such views,
    :meth:`DcpFileWriter.add_tensor` does too).
``.metadata``
    ``pickle.dump`` of ``torch.distributed.checkpoint.metadata.Metadata``:
    ``state_dict_metadata`` {key: ``TensorStorageMetadata(TensorProperties(dtype), size,
    [ChunkStorageMetadata(offsets, sizes)])`` | ``BytesStorageMetadata()``},
    ``storage_data`` {``MetadataIndex(key, offsets, index)``: ``_StorageInfo(relative_path,
    offset, length)``} (``offset=None`` for bytes items), ``storage_meta``, ``version``.
    megatron's extra ``all_local_plans`` (used only to reuse save plans) is not written.
``common.pt`` / ``metadata.json``
    megatron-core's non-sharded state (``torch.save``) and
    ``{"sharded_backend": "torch_dist", ...}``, written last by rank 0: its absence means
    "incomplete" to megatron's ``dist_checkpointing.load`` and to ckptctl.

One :class:`DcpFileWriter` per data file (any process); its :attr:`~DcpFileWriter.entries`
(plain tuples, cheap to gather across processes) go to :func:`build_metadata` on the process
that writes ``.metadata``.
"""

from __future__ import annotations

import io
import json
import math
import os
import uuid
from dataclasses import dataclass
from typing import IO, TYPE_CHECKING, Iterable, Mapping, Sequence

from ckptctl.errors import CkptctlError
from ckptctl.storage import open_local_for_writing

if TYPE_CHECKING:  # pragma: no cover
    import torch

METADATA_FILE = ".metadata"
COMMON_FILE = "common.pt"
METADATA_JSON = "metadata.json"
#: What megatron-core 0.16.1's ``dist_checkpointing.save`` writes to metadata.json.
TORCH_DIST_METADATA_JSON = {"sharded_backend": "torch_dist", "sharded_backend_version": 1,
                            "common_backend": "torch", "common_backend_version": 1}
#: torch DCP's ``CURRENT_DCP_VERSION``.
DCP_VERSION = "1.0.0"


def data_file_name(rank: int, index: int = 0) -> str:
    """``__{rank}_{index}.distcp``, the name torch DCP gives the files of a rank."""
    return f"__{rank}_{index}.distcp"


def metadata_json_bytes() -> bytes:
    return json.dumps(TORCH_DIST_METADATA_JSON).encode("utf-8")


@dataclass(frozen=True)
class Entry:
    """One stored item: a tensor chunk (``offsets``/``sizes`` set) or a bytes item (None)."""

    fqn: str
    offsets: tuple[int, ...] | None
    sizes: tuple[int, ...] | None
    file: str  # relative path of the data file
    offset: int
    length: int

    def as_tuple(self) -> tuple:
        return (self.fqn, self.offsets, self.sizes, self.file, self.offset, self.length)

    @classmethod
    def from_tuple(cls, t: Sequence) -> "Entry":
        fqn, offsets, sizes, file, offset, length = t
        return cls(fqn, None if offsets is None else tuple(offsets), None if sizes is None else tuple(sizes),
                   file, int(offset), int(length))


def _own_storage(tensor: "torch.Tensor") -> "torch.Tensor":
    """``tensor`` on the CPU, contiguous and owning exactly its storage (``torch.save`` of a
    view would write the whole base storage)."""
    import torch

    t = tensor.detach()
    if t.device.type != "cpu":
        t = t.cpu()
    if not t.is_contiguous() or t.storage_offset() != 0 or t.untyped_storage().nbytes() != t.numel() * t.element_size():
        t = t.clone(memory_format=torch.contiguous_format)
    return t


def tensor_blob(tensor: "torch.Tensor") -> bytes:
    """The ``torch.save`` bytes of one chunk, as DCP stores it."""
    import torch

    buf = io.BytesIO()
    torch.save(_own_storage(tensor), buf)
    return buf.getvalue()


class DcpFileWriter:
    """Appends items to one ``.distcp`` file and records where each landed.

    ``path``: the local file to create; ``relative_path``: its name in the checkpoint
    (``__3_0.distcp``). Use as a context manager or call :meth:`close` (fsyncs).
    """

    def __init__(self, path: str, relative_path: str):
        self.path = path
        self.relative_path = relative_path
        os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
        self._f: IO[bytes] | None = open_local_for_writing(path)
        self._pos = 0
        self.entries: list[Entry] = []

    def _append(self, data: bytes | memoryview) -> tuple[int, int]:
        if self._f is None:
            raise CkptctlError(f"{self.path}: writer is closed")
        start = self._pos
        self._f.write(data)
        self._pos += len(data)
        return start, len(data)

    def add_tensor(self, fqn: str, offsets: Sequence[int], tensor: "torch.Tensor") -> Entry:
        """A chunk of global tensor ``fqn`` at ``offsets`` (its sizes are the tensor's shape),
        ``torch.save``-d straight into the file (a view is cloned first, as DCP does)."""
        import torch

        if self._f is None:
            raise CkptctlError(f"{self.path}: writer is closed")
        t = _own_storage(tensor)
        start = self._pos
        torch.save(t, self._f)
        self._pos = self._f.tell()
        entry = Entry(fqn, tuple(int(o) for o in offsets), tuple(int(s) for s in t.shape), self.relative_path,
                      start, self._pos - start)
        self.entries.append(entry)
        return entry

    def add_blob(self, fqn: str, offsets: Sequence[int], sizes: Sequence[int], blob: bytes) -> Entry:
        """A chunk already serialised by ``torch.save`` (e.g. copied verbatim from a source
        checkpoint whose chunk has the same offsets and sizes)."""
        start, length = self._append(blob)
        entry = Entry(fqn, tuple(int(o) for o in offsets), tuple(int(s) for s in sizes), self.relative_path,
                      start, length)
        self.entries.append(entry)
        return entry

    def add_bytes(self, fqn: str, data: bytes) -> Entry:
        """A non-tensor item (``BytesStorageMetadata``): the bytes megatron's loader
        ``torch.load``\\ s (a ShardedObject)."""
        start, length = self._append(data)
        entry = Entry(fqn, None, None, self.relative_path, start, length)
        self.entries.append(entry)
        return entry

    @property
    def size(self) -> int:
        return self._pos

    def close(self) -> None:
        if self._f is None:
            return
        f, self._f = self._f, None
        try:
            f.flush()
            os.fsync(f.fileno())
        finally:
            f.close()

    def discard(self) -> None:
        if self._f is not None:
            self._f.close()
            self._f = None
        try:
            os.remove(self.path)
        except FileNotFoundError:
            pass

    def __enter__(self) -> "DcpFileWriter":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        else:
            self.discard()


def _torch_dtype(dtype: "str | torch.dtype") -> "torch.dtype":
    import torch

    if isinstance(dtype, torch.dtype):
        return dtype
    value = getattr(torch, str(dtype).replace("torch.", ""), None)
    if not isinstance(value, torch.dtype):
        raise CkptctlError(f"unknown dtype {dtype!r}")
    return value


def build_metadata(tensors: Mapping[str, tuple["str | torch.dtype", Sequence[int]]], objects: Iterable[str],
                   entries: Iterable[Entry | Sequence], *, checkpoint_id: str | None = None,
                   check_coverage: bool = True):
    """The torch DCP ``Metadata`` of a checkpoint made of ``entries``.

    ``tensors``: key -> (dtype, global shape); ``objects``: keys of bytes items. Every tensor's
    chunks must tile it exactly (checked: inside the bounds, no two chunks overlapping, every
    element covered) and every object must have exactly one entry.
    """
    from torch.distributed.checkpoint.filesystem import _StorageInfo
    from torch.distributed.checkpoint.metadata import (BytesStorageMetadata, ChunkStorageMetadata, Metadata,
                                                       MetadataIndex, StorageMeta, TensorProperties,
                                                       TensorStorageMetadata)
    import torch

    chunks: dict[str, list[Entry]] = {k: [] for k in tensors}
    obj_entries: dict[str, list[Entry]] = {k: [] for k in objects}
    for e in entries:
        e = e if isinstance(e, Entry) else Entry.from_tuple(e)
        if e.offsets is None:
            if e.fqn not in obj_entries:
                raise CkptctlError(f"bytes item {e.fqn!r} is not a declared object")
            obj_entries[e.fqn].append(e)
        else:
            if e.fqn not in chunks:
                raise CkptctlError(f"chunk of {e.fqn!r}, which is not a declared tensor")
            chunks[e.fqn].append(e)

    sdm: dict = {}
    storage: dict = {}
    for key, (dtype, shape) in tensors.items():
        shape = tuple(int(d) for d in shape)
        items = sorted(chunks[key], key=lambda e: e.offsets)
        if check_coverage:
            _check_tiling(key, shape, items)
        meta_chunks = []
        for i, e in enumerate(items):
            meta_chunks.append(ChunkStorageMetadata(offsets=torch.Size(e.offsets), sizes=torch.Size(e.sizes)))
            storage[MetadataIndex(key, torch.Size(e.offsets), i)] = _StorageInfo(e.file, e.offset, e.length)
        sdm[key] = TensorStorageMetadata(properties=TensorProperties(dtype=_torch_dtype(dtype)),
                                         size=torch.Size(shape), chunks=meta_chunks)
    for key, items in obj_entries.items():
        if len(items) != 1:
            raise CkptctlError(f"object {key!r} has {len(items)} stored copies (expected 1)")
        sdm[key] = BytesStorageMetadata()
        storage[MetadataIndex(key)] = _StorageInfo(items[0].file, items[0].offset, items[0].length)
    return Metadata(state_dict_metadata=sdm, planner_data=None, storage_data=storage,
                    storage_meta=StorageMeta(checkpoint_id=checkpoint_id, save_id=str(uuid.uuid4())),
                    version=DCP_VERSION)


def metadata_bytes(metadata) -> bytes:
    """``.metadata`` as torch's ``FileSystemWriter.finish`` writes it (a plain pickle)."""
    import pickle

    return pickle.dumps(metadata)


def _check_tiling(key: str, shape: tuple[int, ...], items: list[Entry]) -> None:
    total = math.prod(shape)
    covered = 0
    for e in items:
        if len(e.offsets) != len(shape) or len(e.sizes) != len(shape):
            raise CkptctlError(f"{key}: chunk {list(e.offsets)} has the wrong rank for shape {list(shape)}")
        if any(o < 0 or s < 0 or o + s > d for o, s, d in zip(e.offsets, e.sizes, shape)):
            raise CkptctlError(f"{key}: chunk {list(e.offsets)}+{list(e.sizes)} lies outside {list(shape)}")
        covered += math.prod(e.sizes)
    if covered != total:
        raise CkptctlError(f"{key}: chunks cover {covered} of {total} elements")
    # no overlaps (with full coverage by count, this also proves every element is covered)
    for i, a in enumerate(items):
        for b in items[i + 1:]:
            if b.offsets[0] >= a.offsets[0] + a.sizes[0]:
                break  # sorted by offsets: later chunks start at or past a's end on dim 0
            if all(bo < ao + asz and ao < bo + bsz for ao, asz, bo, bsz in zip(a.offsets, a.sizes, b.offsets, b.sizes)):
                raise CkptctlError(f"{key}: chunks at {list(a.offsets)} and {list(b.offsets)} overlap")


__all__ = ["COMMON_FILE", "DCP_VERSION", "METADATA_FILE", "METADATA_JSON", "TORCH_DIST_METADATA_JSON",
           "DcpFileWriter", "Entry", "build_metadata", "data_file_name", "metadata_bytes", "metadata_json_bytes",
           "tensor_blob"]
