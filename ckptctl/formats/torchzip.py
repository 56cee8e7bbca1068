"""Metadata-first reading of ``torch.save`` files through a :class:`~ckptctl.storage.Store`.

A ``torch.save`` file is a zip archive (stored, not compressed): ``<archive>/data.pkl`` (the
pickled object tree), small records (``byteorder``, ``.format_version``,
``.storage_alignment``) and one record ``<archive>/data/<key>`` per storage, its bytes aligned
to ``.storage_alignment`` (64) in the file. :class:`TorchZipFile` reads

1. the zip's central directory (the file's tail: one ranged read, two for very large
   directories),
2. ``data.pkl`` and the small records (one ranged read: torch writes them first, together),

and unpickles ``data.pkl`` with torch's weights-only unpickler under ckptctl's allowlist
(:func:`ckptctl.formats.safe_load.unpickling`), turning every storage into an empty storage
on the ``meta`` device of the right dtype and size. The result is the whole object tree
(dicts, DTensors with their mesh and placements, plain tensors, optimizer state, ints) with
meta tensors, for a few kilobytes of reads whatever the file size. :meth:`TorchZipFile.materialize`
then reads one tensor's bytes with one ranged read of just the bytes it spans.

Nothing in a file can run code: the unpickler only builds allowlisted objects, and refusals
raise :class:`~ckptctl.formats.safe_load.UnsafeCheckpointError` naming the global; a file
that is not a readable archive raises :class:`~ckptctl.formats.safe_load.CorruptCheckpointError`
naming the file. Files from ``torch.save(..., _use_new_zipfile_serialization=False)`` (the
legacy non-zip format) are loaded whole through :func:`~ckptctl.formats.safe_load.load_pt`.
"""

from __future__ import annotations

import bisect
import io
import pickle
import struct
import sys
import zipfile
import zlib
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, Iterable

from ckptctl.errors import CkptctlError
from ckptctl.formats import safe_load
from ckptctl.formats.safe_load import CorruptCheckpointError

if TYPE_CHECKING:  # pragma: no cover
    import torch

    from ckptctl.storage import Store

#: First read of a file: its tail (end-of-central-directory + usually the whole central
#: directory, ~90 bytes a record): 1/32 of the file, between 8 KiB and 64 KiB.
TAIL_MIN, TAIL_MAX = 8 * 1024, 64 * 1024
#: Records closer than this are fetched with one ranged read.
MERGE_GAP = 64 * 1024
#: A storage read starting this close to its record also reads the local header (to check it).
HEADER_SLACK = 4096

_LOCAL_HEADER = struct.Struct("<4sHHHHHIIIHH")
_LOCAL_HEADER_MAGIC = b"PK\x03\x04"
_LEGACY_MAGIC = 0x1950A86A20F9469CFC6C  # torch's pre-zip serialization magic number
_ZIP64_LIMIT = 0xFFFFFFFF


class _RangedFile(io.RawIOBase):
    """A read-only, seekable file over ``read_range(start, end)``, with prefetched segments.

    Reads inside a prefetched (or earlier) segment cost nothing; anything else is one ranged
    read of exactly the bytes asked for (at least ``min_fetch``).
    """

    def __init__(self, read_range: Callable[[int, int], bytes], size: int, min_fetch: int = 512):
        super().__init__()
        self._read_range = read_range
        self._size = size
        self._pos = 0
        self._min_fetch = min_fetch
        self._starts: list[int] = []
        self._segments: list[bytes] = []
        self.requests = 0
        self.bytes_fetched = 0

    # -- cache -------------------------------------------------------------------------
    def fetch(self, start: int, end: int) -> bytes:
        start, end = max(0, start), min(self._size, end)
        if end <= start:
            return b""
        cached = self._cached(start, end)
        if cached is not None:
            return cached
        data = self._read_range(start, end)
        self.requests += 1
        self.bytes_fetched += len(data)
        if len(data) != end - start:
            raise EOFError(f"short read at {start}: {len(data)} of {end - start} bytes")
        i = bisect.bisect_left(self._starts, start)
        self._starts.insert(i, start)
        self._segments.insert(i, data)
        return data

    def _cached(self, start: int, end: int) -> bytes | None:
        for seg_start, seg in zip(self._starts, self._segments):
            if seg_start <= start and end <= seg_start + len(seg):
                return seg[start - seg_start:end - seg_start]
        return None

    # -- io ----------------------------------------------------------------------------
    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self._pos

    def seek(self, offset: int, whence: int = 0) -> int:
        if whence == 0:
            pos = offset
        elif whence == 1:
            pos = self._pos + offset
        elif whence == 2:
            pos = self._size + offset
        else:
            raise ValueError(f"bad whence {whence}")
        if pos < 0:
            raise OSError("negative seek position")
        self._pos = pos
        return pos

    def read(self, n: int = -1) -> bytes:
        if self._pos >= self._size:
            return b""
        end = self._size if n is None or n < 0 else min(self._size, self._pos + n)
        data = self._cached(self._pos, end)
        if data is None:
            data = self.fetch(self._pos, min(self._size, max(end, self._pos + self._min_fetch)))[:end - self._pos]
        self._pos += len(data)
        return data

    def readinto(self, b) -> int:
        data = self.read(len(b))
        b[:len(data)] = data
        return len(data)


@dataclass(frozen=True)
class StorageRecord:
    """Where one storage's bytes are: the ``<archive>/data/<key>`` record."""

    key: str
    dtype: "torch.dtype"
    nbytes: int
    location: str  # the device it was saved from ("cpu", "cuda:0")
    member: str
    header_offset: int  # the record's local header in the file
    data_offset: int  # absolute offset of its first byte (torch's alignment rule; checked on read)
    record_size: int
    crc: int
    stored: bool  # uncompressed (always, for torch.save)


@dataclass(frozen=True)
class TensorLocation:
    """A tensor's place in a file: its storage, and the byte span it covers there."""

    storage: StorageRecord
    storage_offset: int  # in elements
    shape: tuple[int, ...]
    stride: tuple[int, ...]
    byte_start: int  # relative to the storage's first byte
    byte_end: int

    @property
    def file_offset(self) -> int:
        return self.storage.data_offset + self.byte_start

    @property
    def nbytes(self) -> int:
        return self.byte_end - self.byte_start


def _align(offset: int, alignment: int) -> int:
    return offset if offset % alignment == 0 else offset + alignment - offset % alignment


def _predicted_data_offset(header_offset: int, name_len: int, size: int, alignment: int) -> int:
    """First data byte of a record written by torch's zip writer (caffe2 ``getPadding``): the
    local header, the name, a 4-byte ``FB`` extra header (plus zip64 fields), then padding."""
    start = header_offset + 30 + name_len + 4
    if size >= _ZIP64_LIMIT or header_offset >= _ZIP64_LIMIT:
        start += 4
        if size >= _ZIP64_LIMIT:
            start += 16
        if header_offset >= _ZIP64_LIMIT:
            start += 8
    return _align(start, alignment)


def _raw_name(info: zipfile.ZipInfo) -> bytes:
    return info.orig_filename.encode("utf-8" if info.flag_bits & 0x800 else "cp437")


class TorchZipFile:
    """One ``torch.save`` file in a store, read metadata-first (see the module docstring).

    ``rel`` is the path relative to ``store``; ``size`` (e.g. from a listing) saves a request.
    ``metadata()`` returns the object tree with meta tensors; ``location(t)`` and
    ``materialize(t)`` find and read one of its tensors. Request and byte counters
    (``requests``, ``bytes_fetched``) cover everything read through this object.
    """

    def __init__(self, store: "Store", rel: str, *, size: int | None = None,
                 extra_stand_ins: Iterable[str] = ()):
        self.store = store
        self.rel = rel
        self.name = store.url_of(rel)
        self._size = size
        self._extra_stand_ins = tuple(extra_stand_ins)
        self._file: _RangedFile | None = None
        self._zip: zipfile.ZipFile | None = None
        self._prefix = ""
        self._obj: Any = None
        self._loaded = False
        self._legacy = False
        self.storages: dict[str, StorageRecord] = {}
        self._by_cdata: dict[int, str] = {}
        self._typed: dict[str, Any] = {}  # key -> the meta TypedStorage handed to the unpickler
        self.byteorder = "little"
        self.alignment = 64
        self._checked_records: set[str] = set()
        self._extra_requests = 0
        self._extra_bytes = 0

    # -- counters ----------------------------------------------------------------------
    @property
    def requests(self) -> int:
        return (self._file.requests if self._file else 0) + self._extra_requests

    @property
    def bytes_fetched(self) -> int:
        return (self._file.bytes_fetched if self._file else 0) + self._extra_bytes

    @property
    def size(self) -> int:
        if self._size is None:
            self._size = self.store.size(self.rel)
        return self._size

    @property
    def legacy(self) -> bool:
        """True for a pre-zip ``torch.save`` file (loaded whole, real tensors)."""
        self.metadata()
        return self._legacy

    def _read_range(self, start: int, end: int) -> bytes:
        return self.store.read_range(self.rel, start, end)

    def _corrupt(self, what: str, exc: BaseException | None = None) -> CorruptCheckpointError:
        detail = f" ({type(exc).__name__}: {' '.join(str(exc).split())[:160]})" if exc else ""
        return CorruptCheckpointError(f"cannot read {self.name}: {what}{detail}")

    # -- the archive -------------------------------------------------------------------
    def _open(self) -> zipfile.ZipFile:
        if self._zip is not None:
            return self._zip
        size = self.size
        f = _RangedFile(self._read_range, size)
        self._file = f
        if size < 22:
            raise self._corrupt(f"not a torch.save archive or truncated ({size} bytes)")
        try:
            f.fetch(max(0, size - min(TAIL_MAX, max(TAIL_MIN, size // 32))), size)
            zf = zipfile.ZipFile(f)
        except zipfile.BadZipFile as exc:
            if self._is_legacy(f):
                self._legacy = True
                raise _Legacy() from None
            raise self._corrupt("not a torch.save zip archive, or truncated", exc) from exc
        except (EOFError, OSError, ValueError, struct.error) as exc:
            if isinstance(exc, CkptctlError):
                raise
            raise self._corrupt("unreadable zip directory", exc) from exc
        names = zf.namelist()
        pkl = [n for n in names if n.endswith("/data.pkl") or n == "data.pkl"]
        if not pkl:
            if any(n.endswith("constants.pkl") for n in names):
                raise self._corrupt("a TorchScript archive, not a torch.save checkpoint")
            raise self._corrupt("no data.pkl record: not a torch.save archive")
        self._prefix = pkl[0][: -len("data.pkl")]
        self._zip = zf
        return zf

    def _is_legacy(self, f: _RangedFile) -> bool:
        try:
            head = f.fetch(0, min(self.size, 64))
            return any(head.startswith(pickle.dumps(_LEGACY_MAGIC, protocol=p)) for p in (2, 3, 4, 5))
        except Exception:
            return False

    def _info(self, name: str) -> zipfile.ZipInfo | None:
        try:
            return self._zip.getinfo(self._prefix + name)
        except KeyError:
            return None

    def _prefetch(self, names: Iterable[str]) -> None:
        """Fetch the records ``names`` with as few ranged reads as their placement allows."""
        spans = []
        for name in names:
            info = self._info(name)
            if info is None:
                continue
            end = info.header_offset + 30 + len(_raw_name(info)) + 4 + 28 + 128 + info.compress_size
            spans.append((info.header_offset, min(end, self.size)))
        spans.sort()
        merged: list[list[int]] = []
        for start, end in spans:
            if merged and start - merged[-1][1] <= MERGE_GAP:
                merged[-1][1] = max(merged[-1][1], end)
            else:
                merged.append([start, end])
        for start, end in merged:
            self._file.fetch(start, end)

    def _record(self, name: str) -> bytes:
        info = self._info(name)
        if info is None:
            raise KeyError(name)
        try:
            return self._zip.read(info)
        except (zipfile.BadZipFile, EOFError, OSError, ValueError, zlib.error, struct.error) as exc:
            if isinstance(exc, CkptctlError):
                raise
            raise self._corrupt(f"bad record {info.filename}", exc) from exc

    # -- metadata ----------------------------------------------------------------------
    def metadata(self) -> Any:
        """The unpickled object tree; every tensor in it lives on the ``meta`` device."""
        if self._loaded:
            return self._obj
        try:
            self._open()
        except _Legacy:
            self._obj = safe_load.load_pt(self.store.read_bytes(self.rel), name=self.name,
                                          extra_stand_ins=self._extra_stand_ins)
            self._extra_requests += 1
            self._extra_bytes += self.size
            self._loaded = True
            return self._obj
        try:
            self._prefetch(["data.pkl", "byteorder", ".format_version", ".storage_alignment"])
        except EOFError as exc:
            raise self._corrupt("truncated", exc) from exc
        if self._info("byteorder") is not None:
            self.byteorder = self._record("byteorder").decode("ascii", "replace").strip()
            if self.byteorder not in ("little", "big"):
                raise self._corrupt(f"unknown byte order {self.byteorder!r}")
        if self._info(".storage_alignment") is not None:
            try:
                self.alignment = int(self._record(".storage_alignment"))
            except ValueError as exc:
                raise self._corrupt("bad .storage_alignment record", exc) from exc
        data = self._record("data.pkl")
        self._obj = self._unpickle(data)
        self._loaded = True
        return self._obj

    def _unpickle(self, data: bytes) -> Any:
        import torch
        from torch._weights_only_unpickler import Unpickler

        def persistent_load(saved_id):
            return self._meta_storage(saved_id)

        allowed: set[str] = set()
        try:
            with safe_load.unpickling(self._extra_stand_ins) as allowed:
                unpickler = Unpickler(io.BytesIO(data), encoding="utf-8")
                unpickler.persistent_load = persistent_load
                obj = unpickler.load()
            torch._utils._sparse_tensors_to_validate.clear()  # meta tensors: nothing to validate
            return obj
        except CkptctlError:
            raise
        except (pickle.UnpicklingError, RuntimeError, EOFError, ValueError, KeyError, AttributeError,
                TypeError, IndexError, struct.error, OSError, AssertionError, OverflowError) as exc:
            culprits = (safe_load.culprits_in_pickle(data, allowed)
                        if isinstance(exc, pickle.UnpicklingError) else [])
            raise safe_load.explain_load_error(exc, self.name, culprits) from exc

    def _meta_storage(self, saved_id: Any):
        import torch

        if not isinstance(saved_id, tuple) or len(saved_id) != 5:
            raise pickle.UnpicklingError(f"unexpected persistent id {saved_id!r:.80}")
        typename, storage_type, key, location, numel = saved_id
        if isinstance(typename, bytes):
            typename = typename.decode("ascii")
        if typename != "storage":
            raise pickle.UnpicklingError(f"unexpected persistent id type {typename!r:.40}")
        key = key.decode("ascii") if isinstance(key, bytes) else str(key)
        location = location.decode("ascii") if isinstance(location, bytes) else str(location)
        dtype = torch.uint8 if storage_type is torch.UntypedStorage else storage_type.dtype
        record = self.storages.get(key)
        if record is None:
            nbytes = int(numel) * torch._utils._element_size(dtype)
            info = self._info(f"data/{key}")
            if info is None:
                raise self._corrupt(f"missing record data/{key}")
            if info.file_size < nbytes:
                raise self._corrupt(f"record data/{key} holds {info.file_size} bytes, the pickle needs {nbytes}")
            data_offset = _predicted_data_offset(info.header_offset, len(_raw_name(info)), info.file_size,
                                                 self.alignment)
            record = StorageRecord(key, dtype, nbytes, location, info.filename, info.header_offset, data_offset,
                                   info.file_size, info.CRC, info.compress_type == zipfile.ZIP_STORED)
            self.storages[key] = record
        typed = self._typed.get(key)
        if typed is None:  # one storage per key, as torch.load does (tied weights, views)
            storage = torch.UntypedStorage(record.nbytes, device="meta")
            self._by_cdata[storage._cdata] = key
            typed = torch.storage.TypedStorage(wrap_storage=storage, dtype=dtype, _internal=True)
            self._typed[key] = typed  # kept alive: the storage's identity stays valid
        return typed

    # -- tensors -----------------------------------------------------------------------
    def location(self, tensor: "torch.Tensor") -> TensorLocation:
        """Where the bytes of ``tensor`` (a meta tensor from :meth:`metadata`) are."""
        storage = tensor.untyped_storage()
        key = self._by_cdata.get(storage._cdata)
        if key is None:
            raise ValueError(f"tensor is not from {self.name}")
        record = self.storages[key]
        item = tensor.element_size()
        shape, stride = tuple(tensor.shape), tuple(tensor.stride())
        offset = tensor.storage_offset()
        if any(s == 0 for s in shape):
            start = end = offset * item
        else:
            if any(st < 0 for st in stride):
                raise self._corrupt("a tensor with negative strides")
            last = offset + sum((s - 1) * st for s, st in zip(shape, stride))
            start, end = offset * item, (last + 1) * item
        if end > record.nbytes:
            raise self._corrupt(f"a tensor spans bytes {start}..{end} of data/{key}, which holds {record.nbytes}")
        return TensorLocation(record, offset, shape, stride, start, end)

    def read_storage_bytes(self, key: str, start: int = 0, end: int | None = None) -> bytes:
        """Bytes ``[start, end)`` of storage ``key``: one ranged read (two for a record whose
        layout differs from torch's alignment rule)."""
        self.metadata()
        if self._legacy:
            raise ValueError("a legacy-format file has no storage records")
        record = self.storages[key]
        end = record.nbytes if end is None else end
        if not 0 <= start <= end <= record.nbytes:
            raise ValueError(f"bad byte range {start}..{end} of a {record.nbytes}-byte storage")
        if start == end:
            return b""
        if not record.stored:  # someone re-zipped it compressed: read the whole record
            return self._whole_record(record)[start:end]
        try:
            if record.key in self._checked_records:
                data = self._raw(record.data_offset + start, record.data_offset + end)
            elif start <= HEADER_SLACK:  # one read: the local header (checked) and the bytes
                raw = self._raw(record.header_offset, record.data_offset + end)
                actual = self._check_header(record, raw[:record.data_offset - record.header_offset])
                if actual != record.data_offset:  # not torch's alignment rule: use the real layout
                    record = self._relocate(record, actual)
                if actual <= record.header_offset + len(raw) - end:  # usually: the bytes are in raw
                    data = raw[actual - record.header_offset + start:actual - record.header_offset + end]
                else:
                    data = self._raw(actual + start, actual + end)
            else:
                actual = self._check_header(record, self._raw(record.header_offset, record.data_offset))
                if actual != record.data_offset:
                    record = self._relocate(record, actual)
                data = self._raw(record.data_offset + start, record.data_offset + end)
        except EOFError as exc:
            raise self._corrupt(f"truncated: data/{key} ends past the end of the file", exc) from exc
        if start == 0 and end == record.record_size and zlib.crc32(data) != record.crc:
            raise self._corrupt(f"CRC mismatch in data/{key}")
        return data

    def _raw(self, start: int, end: int) -> bytes:
        if end > self.size:
            raise EOFError(f"bytes {start}..{end} of a {self.size}-byte file")
        data = self._read_range(start, end)
        self._extra_requests += 1
        self._extra_bytes += len(data)
        if len(data) != end - start:
            raise EOFError(f"short read at {start}")
        return data

    def _check_header(self, record: StorageRecord, raw: bytes) -> int:
        """Parse the record's local header; returns the real offset of its first data byte."""
        if len(raw) < 30:
            raw = self._raw(record.header_offset, record.header_offset + 30)
        magic, *_rest, name_len, extra_len = _LOCAL_HEADER.unpack(raw[:30])
        if magic != _LOCAL_HEADER_MAGIC:
            raise self._corrupt(f"bad local header for {record.member}")
        self._checked_records.add(record.key)
        return record.header_offset + 30 + name_len + extra_len

    def _relocate(self, record: StorageRecord, data_offset: int) -> StorageRecord:
        new = StorageRecord(**{**record.__dict__, "data_offset": data_offset})
        self.storages[record.key] = new
        return new

    def _whole_record(self, record: StorageRecord) -> bytes:
        try:
            return self._zip.read(record.member)
        except (zipfile.BadZipFile, EOFError, OSError, zlib.error) as exc:
            raise self._corrupt(f"bad record {record.member}", exc) from exc

    def materialize(self, tensor: "torch.Tensor") -> "torch.Tensor":
        """The real (CPU) tensor for a meta tensor from :meth:`metadata` (a new, contiguous one)."""
        import torch

        if tensor.device.type != "meta":  # a legacy file: already real
            return tensor
        out = torch.empty(tuple(tensor.shape), dtype=tensor.dtype)
        self.materialize_into(tensor, out)
        return out

    def materialize_into(self, tensor: "torch.Tensor", out: "torch.Tensor") -> None:
        """Read the data of ``tensor`` (a meta tensor from :meth:`metadata`) into ``out`` (same
        shape and dtype, e.g. a slice of a larger tensor being assembled): one ranged read of the
        bytes it spans, copied once, so at most the tensor's bytes exist beside ``out``."""
        import warnings

        import torch

        if tensor.device.type != "meta":  # a legacy file: already real
            out.copy_(tensor)
            return
        loc = self.location(tensor)
        if loc.byte_end == loc.byte_start:
            return
        data = self.read_storage_bytes(loc.storage.key, loc.byte_start, loc.byte_end)
        with warnings.catch_warnings():
            # a read-only view of ``data``: only ever read from (copied into ``out``)
            warnings.simplefilter("ignore", UserWarning)
            flat = torch.frombuffer(data, dtype=tensor.dtype)
        if self.byteorder != sys.byteorder and tensor.element_size() > 1:
            flat = flat.view(torch.uint8).view(-1, tensor.element_size()).flip(1).contiguous().view(tensor.dtype)
            flat = flat.view(-1)
        out.copy_(flat.as_strided(loc.shape, loc.stride, 0))


class _Legacy(Exception):
    """Internal: the file is a pre-zip torch.save file."""
