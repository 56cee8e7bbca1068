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

Every byte of tensor data ckptctl reads is CRC-checked against the zip directory, on the bytes
the read returned (torch.load never checks): :class:`RecordCrc` adds up reads of one record in
any order and compares once they cover it; :func:`check_archive` checks a whole archive held
in memory (a DCP chunk of a ``.distcp``). A mismatch is a :class:`CorruptCheckpointError`
naming the file and the tensor.

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
import threading
import time
import zipfile
import zlib
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, Iterable

from ckptctl.errors import CkptctlError
from ckptctl.formats import safe_load
from ckptctl.formats.base import dtype_size
from ckptctl.formats.safe_load import CorruptCheckpointError
from ckptctl.heavy import import_torch

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


class RangedFile(io.RawIOBase):
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


def read_zip_directory(f: RangedFile, size: int) -> zipfile.ZipFile:
    """The zip directory of ``f`` (``size`` bytes): one ranged read of its tail (1/32 of the
    file, between TAIL_MIN and TAIL_MAX), a second only for a larger directory. Raises
    :class:`zipfile.BadZipFile` when there is no end-of-central-directory record (not a zip, or
    truncated). Torch-free: ``ckptctl.formats.integrity`` checks sizes with it on the light path."""
    f.fetch(max(0, size - min(TAIL_MAX, max(TAIL_MIN, size // 32))), size)
    return zipfile.ZipFile(f)


def is_legacy_torch_save(head: bytes) -> bool:
    """True when ``head`` (a file's first bytes) starts like a pre-zip ``torch.save`` file."""
    return any(head.startswith(pickle.dumps(_LEGACY_MAGIC, protocol=p)) for p in (2, 3, 4, 5))


# -- CRC-32 of what is read ---------------------------------------------------------------------
# torch.load does not check the CRC-32 of a zip record (its miniz is built without the check),
# so ckptctl does, on the bytes each read returns: a record's CRC is accumulated from reads in
# any order (each byte counted once, combined with zlib's crc32_combine algorithm) and compared
# as soon as the reads cover the whole record. Nothing is read twice for it.

#: Internal knob (no CLI option): False skips every check (the bench compares against it).
CHECK_CRC = True
_CRC_POLY = 0xEDB88320  # reflected CRC-32 polynomial (zlib's)


def _multmodp(a: int, b: int) -> int:
    """a(x) * b(x) modulo the CRC-32 polynomial (reflected bit order), as zlib computes it."""
    m, p = 1 << 31, 0
    while True:
        if a & m:
            p ^= b
            if not a & (m - 1):
                return p
        m >>= 1
        b = (b >> 1) ^ _CRC_POLY if b & 1 else b >> 1


_X2N = [1 << 30]  # x^(2^n) modulo the polynomial, n = 0..31
for _ in range(31):
    _X2N.append(_multmodp(_X2N[-1], _X2N[-1]))


def crc32_combine(crc1: int, crc2: int, len2: int) -> int:
    """The CRC-32 of ``A + B`` from ``crc32(A)``, ``crc32(B)`` and ``len(B)`` (zlib's
    ``crc32_combine``, which Python's zlib module does not expose)."""
    p, k, n = 1 << 31, 3, len2  # x^(8 * len2) modulo the polynomial
    while n:
        if n & 1:
            p = _multmodp(_X2N[k & 31], p)
        n >>= 1
        k += 1
    return _multmodp(p, crc1) ^ crc2


# ISA-L's CRC-32: zlib's polynomial at ~4x its speed (carry-less multiply), so checking every
# tensor read stays a few percent of an export's wall time.
from isal.isal_zlib import crc32 as _crc32  # noqa: E402

CRC_IMPLEMENTATION = "isal"


class CrcStats:
    """Time and bytes of the CRC-32s computed in this process (the bench prints them)."""

    def __init__(self) -> None:
        self.seconds = 0.0
        self.bytes = 0
        self._lock = threading.Lock()

    def crc32(self, data) -> int:
        start = time.perf_counter()
        crc = _crc32(data)  # both release the GIL on large buffers: fine in read-ahead threads
        with self._lock:
            self.seconds += time.perf_counter() - start
            self.bytes += len(data)
        return crc


CRC_STATS = CrcStats()


class RecordCrc:
    """The CRC-32 check of one zip record, fed with the bytes that reads return, in any order.

    ``add(offset, data)`` takes bytes ``[offset, offset + len(data))`` of the record; bytes
    already counted are skipped, so every byte counts once however the reads overlap. When the
    reads cover the whole record its CRC is compared: a mismatch raises
    :class:`CorruptCheckpointError` naming ``name`` (the file) and ``tensor``. ``complete()``
    reads the bytes no read has covered (``read_rest(start, end)``) and so finishes the check.
    """

    def __init__(self, name: str, member: str, size: int, crc: int, tensor: str | None = None,
                 read_rest: Callable[[int, int], bytes] | None = None):
        self.name, self.member, self.size, self.crc = name, member, size, crc
        self.tensor = tensor
        self._read_rest = read_rest
        self._spans: list[list[int]] = []  # sorted, disjoint [start, end, crc32 of those bytes]
        self._lock = threading.Lock()
        self.done = not CHECK_CRC
        self.failure: str | None = None  # the mismatch, raised again by every later read

    def add(self, offset: int, data, tensor: str | None = None) -> None:
        if self.done:
            if self.failure:
                raise CorruptCheckpointError(self.failure)
            return
        with self._lock:
            self.tensor = self.tensor or tensor
            view = memoryview(data).cast("B")
            for start, end in self._uncovered(offset, min(offset + len(view), self.size)):
                self._insert(start, end, CRC_STATS.crc32(view[start - offset:end - offset]))
            if len(self._spans) == 1 and self._spans[0][:2] == [0, self.size]:
                self._finish(self._spans[0][2])
            elif self.size == 0:
                self._finish(0)

    def missing(self) -> list[tuple[int, int]]:
        """The byte ranges of the record no read has covered yet."""
        return [] if self.done else self._uncovered(0, self.size)

    def complete(self) -> None:
        """Read what no read has covered, and check the record."""
        for start, end in self.missing():
            if self._read_rest is None:
                raise CkptctlError(f"{self.name}: bytes {start}..{end} of {self.member} were never read, so its "
                                   "CRC-32 cannot be checked")
            data = self._read_rest(start, end)
            if len(data) != end - start:
                raise CorruptCheckpointError(f"cannot read {self.name}: truncated in {self.member}")
            self.add(start, data)
        if not self.done:
            self.add(0, b"")  # an empty record

    def _uncovered(self, start: int, end: int) -> list[tuple[int, int]]:
        out = []
        for s, e, _ in self._spans:
            if e <= start:
                continue
            if s >= end:
                break
            if s > start:
                out.append((start, s))
            start = max(start, e)
        if start < end:
            out.append((start, end))
        return out

    def _insert(self, start: int, end: int, crc: int) -> None:
        i = bisect.bisect_left(self._spans, [start])
        self._spans.insert(i, [start, end, crc])
        if i + 1 < len(self._spans) and self._spans[i + 1][0] == end:  # joins the next span
            nxt = self._spans.pop(i + 1)
            self._spans[i] = [start, nxt[1], crc32_combine(crc, nxt[2], nxt[1] - nxt[0])]
        if i > 0 and self._spans[i - 1][1] == start:  # joins the previous span
            cur = self._spans.pop(i)
            prev = self._spans[i - 1]
            self._spans[i - 1] = [prev[0], cur[1], crc32_combine(prev[2], cur[2], cur[1] - cur[0])]

    def _finish(self, got: int) -> None:
        self.done = True
        self._spans = []
        if got != self.crc:
            what = f"{self.tensor}: " if self.tensor else ""
            self.failure = (f"cannot read {self.name}: {what}CRC mismatch in {self.member} (the zip directory says "
                            f"{self.crc:08x}, the bytes read give {got:08x}): the file is corrupted")
            raise CorruptCheckpointError(self.failure)


def check_archive(data: bytes, name: str, tensor: str | None = None) -> None:
    """Check the CRC-32 of every record of an in-memory ``torch.save`` archive (e.g. one DCP
    chunk of a ``.distcp``), from the bytes already read; ``name`` (and ``tensor``) go into the
    error. Bytes that are not a zip archive (no CRC to check) are left alone."""
    if not CHECK_CRC or data[:4] != _LOCAL_HEADER_MAGIC:
        return
    view = memoryview(data)
    try:
        zf = zipfile.ZipFile(io.BytesIO(data))  # a BytesIO over bytes shares them: no copy
        for info in zf.infolist():
            if info.compress_type != zipfile.ZIP_STORED:
                zf.read(info)  # zipfile checks the CRC of what it decompresses
                continue
            header = _LOCAL_HEADER.unpack(data[info.header_offset:info.header_offset + 30])
            if header[0] != _LOCAL_HEADER_MAGIC:
                raise zipfile.BadZipFile(f"bad local header for {info.filename}")
            start = info.header_offset + 30 + header[-2] + header[-1]
            if start + info.file_size > len(data):
                raise zipfile.BadZipFile(f"{info.filename} ends past the end of the archive")
            RecordCrc(name, info.filename, info.file_size, info.CRC, tensor).add(
                0, view[start:start + info.file_size])
    except (zipfile.BadZipFile, EOFError, OSError, ValueError, zlib.error, struct.error) as exc:
        if isinstance(exc, CkptctlError):
            raise
        what = f"{tensor}: " if tensor else ""
        raise CorruptCheckpointError(f"cannot read {name}: {what}not a readable torch.save archive "
                                     f"({type(exc).__name__}: {' '.join(str(exc).split())[:160]})") from exc


@dataclass(frozen=True)
class StorageRecord:
    """Where one storage's bytes are: the ``<archive>/data/<key>`` record."""

    key: str
    dtype: str  # a torch dtype name ("float32")
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

    Every storage record read is CRC-checked (:class:`RecordCrc`): a whole-tensor read reads
    its whole record at once; partial reads (``partial=True``) add up across calls, and
    :meth:`finish_crc_checks` reads what they left out before the caller trusts the result.
    """

    def __init__(self, store: "Store", rel: str, *, size: int | None = None,
                 extra_stand_ins: Iterable[str] = (), crc_checks: dict[str, RecordCrc] | None = None):
        self.store = store
        self.rel = rel
        self.name = store.url_of(rel)
        self._size = size
        self._extra_stand_ins = tuple(extra_stand_ins)
        self._file: RangedFile | None = None
        self._zip: zipfile.ZipFile | None = None
        self._prefix = ""
        self._obj: Any = None
        self._loaded = False
        self._legacy = False
        self.storages: dict[str, StorageRecord] = {}
        self._by_cdata: dict[int, str] = {}
        self._typed: dict[str, Any] = {}  # key -> the meta TypedStorage handed to the unpickler
        self._plain: Any = None  # metadata_without_torch()'s tree
        self.byteorder = "little"
        self.alignment = 64
        self._checked_records: set[str] = set()
        # storage key -> the CRC check of its record (``crc_checks``: shared by several objects
        # opening the same bytes, so that reads through any of them add up)
        self._crc: dict[str, RecordCrc] = crc_checks if crc_checks is not None else {}
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
        data = self.store.read_range(self.rel, start, end)
        # zipfile (metadata reads through RangedFile) wants bytes; a read-ahead view is copied
        return data if isinstance(data, bytes) else bytes(data)

    def planned_read(self, tensor: "torch.Tensor") -> tuple[int, int] | None:
        """The file bytes a first :meth:`materialize_into` of ``tensor`` (a meta tensor from
        :meth:`metadata`) reads: its record with the local header; None for a legacy file or
        an empty tensor. What a read-ahead fetches early (:class:`ckptctl.storage.ReadAhead`)."""
        if tensor.device.type != "meta" or not tensor.numel():
            return None
        return self._record_read(self.location(tensor).storage)

    def planned_read_stored(self, tensor: safe_load.StoredTensor) -> tuple[int, int] | None:
        """:meth:`planned_read` of a tensor from :meth:`metadata_without_torch` (:meth:`read_stored` reads it)."""
        return self._record_read(self.stored_location(tensor).storage) if tensor.numel() else None

    def _record_read(self, record: StorageRecord) -> tuple[int, int] | None:
        """The file bytes of ``record`` with its local header (None when re-zipped compressed)."""
        if not record.stored:
            return None
        return record.header_offset, min(self.size, record.data_offset + record.record_size)

    def _corrupt(self, what: str, exc: BaseException | None = None) -> CorruptCheckpointError:
        detail = f" ({type(exc).__name__}: {' '.join(str(exc).split())[:160]})" if exc else ""
        return CorruptCheckpointError(f"cannot read {self.name}: {what}{detail}")

    # -- the archive -------------------------------------------------------------------
    def _open(self) -> zipfile.ZipFile:
        if self._zip is not None:
            return self._zip
        size = self.size
        f = RangedFile(self._read_range, size)
        self._file = f
        if size < 22:
            raise self._corrupt(f"not a torch.save archive or truncated ({size} bytes)")
        try:
            zf = read_zip_directory(f, size)
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

    def _is_legacy(self, f: RangedFile) -> bool:
        try:
            return is_legacy_torch_save(f.fetch(0, min(self.size, 64)))
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
            data = self._pickle()
        except _Legacy:
            self._obj = safe_load.load_pt(self.store.read_bytes(self.rel), name=self.name,
                                          extra_stand_ins=self._extra_stand_ins)
            self._extra_requests += 1
            self._extra_bytes += self.size
            self._loaded = True
            return self._obj
        self._obj = self._unpickle(data)
        self._loaded = True
        return self._obj

    def metadata_without_torch(self) -> Any:
        """The object tree unpickled without importing torch, its tensors
        :class:`~ckptctl.formats.safe_load.StoredTensor` / ``StoredDTensor`` (read them with
        :meth:`read_stored`), when the file holds only what an FSDP2 model state dict holds;
        raises :class:`~ckptctl.formats.safe_load.NeedsTorch` otherwise (a legacy file, other
        globals, a big-endian file, damage): :meth:`metadata` then reads it, and reports."""
        if self._plain is None:
            try:
                data = self._pickle()
            except _Legacy:
                raise safe_load.NeedsTorch("a legacy torch.save file") from None
            if self.byteorder != "little":
                raise safe_load.NeedsTorch("a big-endian file")
            self._plain = safe_load.load_without_torch(
                data, lambda key, dtype, numel: self._note_storage(key, dtype, numel * dtype_size(dtype)))
        return self._plain

    def _pickle(self) -> bytes:
        """The ``data.pkl`` record, the byte order and alignment records read (cached by zipfile's reads)."""
        self._open()
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
        return self._record("data.pkl")

    def _unpickle(self, data: bytes) -> Any:
        torch = import_torch()
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

    def _note_storage(self, key: str, dtype: str, nbytes: int, location: str = "cpu") -> StorageRecord:
        """The record of storage ``key`` (``nbytes`` bytes of ``dtype``, a torch dtype name),
        checked against the zip directory the first time it is named."""
        record = self.storages.get(key)
        if record is None:
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
        return record

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
        record = self._note_storage(key, str(dtype).replace("torch.", ""),
                                    int(numel) * torch._utils._element_size(dtype), location)
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
        return self._span(self.storages[key], tensor.element_size(), tensor.storage_offset(), tuple(tensor.shape),
                          tuple(tensor.stride()))

    def stored_location(self, tensor: safe_load.StoredTensor) -> TensorLocation:
        """Where the bytes of ``tensor`` (from :meth:`metadata_without_torch`) are."""
        record = self.storages.get(tensor.storage_key)
        if record is None:
            raise ValueError(f"tensor is not from {self.name}")
        return self._span(record, dtype_size(tensor.dtype), tensor.storage_offset, tensor.shape, tensor.stride)

    def _span(self, record: StorageRecord, item: int, offset: int, shape: tuple[int, ...],
              stride: tuple[int, ...]) -> TensorLocation:
        if any(s == 0 for s in shape):
            start = end = offset * item
        else:
            if any(st < 0 for st in stride):
                raise self._corrupt("a tensor with negative strides")
            last = offset + sum((s - 1) * st for s, st in zip(shape, stride))
            start, end = offset * item, (last + 1) * item
        if end > record.nbytes:
            raise self._corrupt(f"a tensor spans bytes {start}..{end} of data/{record.key}, which holds {record.nbytes}")
        return TensorLocation(record, offset, shape, stride, start, end)

    def read_storage_bytes(self, key: str, start: int = 0, end: int | None = None, *,
                           tensor: str | None = None) -> bytes | memoryview:
        """Bytes ``[start, end)`` of storage ``key`` (up to the record's end), as bytes or a
        read-only view of the bytes read: one ranged read (two for a record whose layout differs
        from torch's alignment rule). The bytes are added to the record's CRC check (``tensor``
        names it in an error)."""
        if self._plain is None:  # the records are known from either reading of the pickle
            self.metadata()
        if self._legacy:
            raise ValueError("a legacy-format file has no storage records")
        record = self.storages[key]
        end = record.nbytes if end is None else end
        if not 0 <= start <= end <= record.record_size:
            raise ValueError(f"bad byte range {start}..{end} of a {record.record_size}-byte storage record")
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
                if actual <= record.header_offset + len(raw) - end:  # usually: the bytes are in raw (no copy)
                    data = memoryview(raw)[actual - record.header_offset + start:actual - record.header_offset + end]
                else:
                    data = self._raw(actual + start, actual + end)
            else:
                actual = self._check_header(record, self._raw(record.header_offset, record.data_offset))
                if actual != record.data_offset:
                    record = self._relocate(record, actual)
                data = self._raw(record.data_offset + start, record.data_offset + end)
        except EOFError as exc:
            raise self._corrupt(f"truncated: data/{key} ends past the end of the file", exc) from exc
        self._crc_check(record).add(start, data, tensor)
        return data

    def _crc_check(self, record: StorageRecord) -> RecordCrc:
        check = self._crc.get(record.key)
        if check is None:  # reads the rest without holding this object (and its cached segments)
            store, rel, offset = self.store, self.rel, record.data_offset
            check = RecordCrc(self.name, record.member, record.record_size, record.crc,
                              read_rest=lambda s, e: store.read_range(rel, offset + s, offset + e))
            self._crc[record.key] = check
        return check

    def crc_checked(self, key: str) -> bool:
        """True once the whole record of storage ``key`` has had its CRC checked."""
        check = self._crc.get(key)
        return check is not None and check.done

    def finish_crc_checks(self) -> None:
        """Finish the CRC check of every record partial reads touched: read the bytes no read
        covered (only those) and compare. Call it before trusting (committing) what was read."""
        for check in list(self._crc.values()):
            check.complete()

    def _raw(self, start: int, end: int) -> bytes | memoryview:
        """File bytes ``[start, end)``; a read-ahead's view is handed on as it is, not copied
        (only zipfile, reading metadata through :meth:`_read_range`, needs bytes)."""
        if end > self.size:
            raise EOFError(f"bytes {start}..{end} of a {self.size}-byte file")
        data = self.store.read_range(self.rel, start, end)
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

    def read_stored(self, tensor: safe_load.StoredTensor, *, name: str | None = None) -> bytes | memoryview:
        """The bytes of ``tensor`` (a contiguous one from :meth:`metadata_without_torch`), read
        and CRC-checked as :meth:`materialize_into` reads a meta tensor's (the whole record, the
        first time); little-endian, as :meth:`metadata_without_torch` only takes such files."""
        if not tensor.is_contiguous():
            raise ValueError("read_stored reads contiguous tensors")
        loc = self.stored_location(tensor)
        return self._read_span(loc, name) if loc.byte_end > loc.byte_start else b""

    def _read_span(self, loc: TensorLocation, name: str | None, partial: bool = False) -> bytes | memoryview:
        """The bytes ``loc`` spans, CRC-checked: by default with its whole storage record (usually
        exactly the tensor; a record checked before is not read again beyond the tensor), only the
        span with ``partial`` (see :meth:`materialize_into`)."""
        key = loc.storage.key
        if partial or self.crc_checked(key) or not CHECK_CRC:
            return self.read_storage_bytes(key, loc.byte_start, loc.byte_end, tensor=name)
        data = memoryview(self.read_storage_bytes(key, 0, self.storages[key].record_size, tensor=name))
        return data[loc.byte_start:loc.byte_end]  # a view: no copy

    def materialize(self, tensor: "torch.Tensor", *, name: str | None = None) -> "torch.Tensor":
        """The real (CPU) tensor for a meta tensor from :meth:`metadata` (a new, contiguous one);
        ``name`` names it in errors."""
        import torch

        if tensor.device.type != "meta":  # a legacy file: already real
            return tensor
        out = torch.empty(tuple(tensor.shape), dtype=tensor.dtype)
        self.materialize_into(tensor, out, name=name)
        return out

    def materialize_into(self, tensor: "torch.Tensor", out: "torch.Tensor", *, name: str | None = None,
                         partial: bool = False) -> None:
        """Read the data of ``tensor`` (a meta tensor from :meth:`metadata`) into ``out`` (same
        shape and dtype, e.g. a slice of a larger tensor being assembled): one ranged read,
        copied once, so at most the bytes read exist beside ``out``.

        The read is CRC-checked (``name``: the tensor, for the error). By default it covers the
        whole storage record (usually exactly the tensor; a record checked before is not read
        again beyond the tensor). ``partial=True`` reads only the bytes the tensor spans (e.g.
        a row range of a shard): the caller reads the rest of the record through other calls
        and calls :meth:`finish_crc_checks` before committing anything."""
        import warnings

        import torch

        if tensor.device.type != "meta":  # a legacy file: already real
            out.copy_(tensor)
            return
        loc = self.location(tensor)
        if loc.byte_end == loc.byte_start:
            return
        data = self._read_span(loc, name, partial)
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
