"""Streaming writer of a Hugging Face model directory (safetensors + index + config + tokenizer).

The output is what ``PreTrainedModel.save_pretrained`` writes, produced one tensor at a time
so that a model far larger than RAM can be exported::

    specs = [TensorSpec(name, shape, dtype) for ...]          # metadata only, e.g. TensorInfo
    with HfModelWriter(dest_url, specs, max_shard_size=5 * 10**9, overwrite=False) as writer:
        for spec in specs:
            writer.add(spec.name, read_tensor(spec.name))     # the caller frees it afterwards
        summary = writer.finish(config_dict, {"tokenizer.json": b"...", ...})

Shard plan first, data second
-----------------------------
The writer needs every tensor's name, shape and dtype up front (:class:`TensorSpec`, or any
object with ``name``/``shape``/``dtype`` such as :class:`~ckptctl.formats.base.TensorInfo`;
every reader lists them without reading data). :func:`plan_shards` splits them exactly as
``huggingface_hub.split_torch_state_dict_into_shards`` (what ``save_pretrained`` calls) does:
greedy in the given order, a new shard when the next tensor would overflow
``max_shard_size``, a tensor larger than ``max_shard_size`` alone in a shard that is placed
*before* the shard being filled. So the number of shards is known before the first byte, the
files get their final names (``model.safetensors``, or ``model-00001-of-0000N.safetensors``)
from the start, and each shard's safetensors header (8-byte little-endian length, JSON with
``dtype``/``shape``/``data_offsets`` and ``__metadata__ = {"format": "pt"}``, space-padded to
a multiple of 8) is written when the shard is opened. Each tensor added is then streamed
straight into its open shard: the writer never holds a shard's worth of tensors, only

* locally: nothing (the tensor's own memory is written through a memoryview, no copy);
* on S3/GCS: the upload buffer of at most two open shards (the one being filled and, for
  an oversized tensor, its own), each under ``upload_block_size`` (default 16 MiB, raised for
  very large files to stay under S3's 10,000 parts) plus one write chunk of the same size.
  With ``upload_concurrency`` > 1 (export-hf's ``--concurrency``), uploads leave the writing
  thread: an S3 shard is a multipart upload whose parts go up that many at a time in the
  background while the next tensors are written, a GCS shard (a resumable upload: chunks in
  order) is fed to a background thread; the bytes waiting for upload stay under
  ``upload_memory`` (plus the part being filled of each open shard), and for S3 under twice
  the parts that upload at once (:func:`s3_upload_limit`).

``add`` must follow the plan's order (the order of ``specs``): the shapes and dtypes are
checked against it. Tensor sizes are ``numel * element size``; ``save_pretrained`` uses the
size of the tensor's *storage*, which is the same for ordinary parameters and differs only for
views into a larger storage.

Commit protocol
---------------
"Complete" means: ``config.json`` is present (loaders need it, and it is written last).

Local directory ``D``:
  1. Stale siblings ``.{name}.ckptctl-tmp-*`` of an earlier run that died are removed (only
     those whose ``run.json`` names this host and a dead pid, or, without a ``run.json``,
     older than an hour). If such a run died in the middle of its non-atomic replace (step 5,
     fallback), the previous export it had moved aside is first renamed back to ``D``.
  2. A non-empty ``D`` is refused (:class:`~ckptctl.errors.UsageError`) unless ``overwrite`` and
     it holds an HF model directory: only HF model files, weights included (the rule shared with
     every output, :func:`ckptctl.output_dir.judge_destination`; never the current directory,
     home, a checkpoint, or a directory with any other file).
  3. Everything is written into a sibling ``.{name}.ckptctl-tmp-{random}/new/`` (same
     filesystem), each file fsync'ed: shards, extra files, index, ``config.json``.
  4. ``D`` missing or empty: one ``rename(new, D)`` — atomic.
  5. ``D`` non-empty (``overwrite``): ``renameat2(new, D, RENAME_EXCHANGE)`` swaps the two
     directories atomically (Linux >= 3.15 on ext4/xfs/btrfs/tmpfs...), so ``D`` is never
     missing; the old export, now in the temp sibling, is deleted. Where the exchange is not
     supported: ``rename(D, tmp/old)`` then ``rename(new, D)``: ``D`` is missing between two
     syscalls; a crash there is repaired by step 1 of the next run (old export restored).
  A kill at any moment thus leaves either the old ``D`` or the complete new one, plus at most
  a temp sibling that the next run removes. ``abort()`` removes the temp sibling, and so does
  SIGTERM while writing (:class:`ckptctl.output_dir.TerminateAsInterrupt`: it raises like Ctrl-C).
  (Steps 1-5 are :class:`ckptctl.output_dir.LocalStaging`, shared with every command that
  writes a directory; the object-store side below streams shards straight to the store instead
  of staging them on local disk, so it stays here.)

Object store prefix ``P`` (S3, GCS; no rename there):
  1. A non-empty ``P`` is refused unless ``overwrite`` and it holds an HF model directory (the
     same rule as locally) — or unless it holds the marker object ``.ckptctl-export-incomplete``
     and no ``config.json``: that is an export by ckptctl that was interrupted, replaced without
     asking.
  2. Lazily, before the first data byte: the old ``config.json`` is deleted first (alone, so
     the old export stops looking complete even if the next step is cut short), the marker is
     written, then every other old object under ``P`` is deleted (one bulk delete): ``P``
     then holds only objects of this run. (So on object stores, overwrite destroys the old
     export when writing starts, not when it succeeds.)
  3. Shards are streamed (multipart / resumable uploads: an interrupted upload leaves no
     object, S3 keeps the parts of a killed multipart upload until a lifecycle rule such as
     AbortIncompleteMultipartUpload removes them), then the extra files, then
     ``model.safetensors.index.json``, then ``config.json``, then the marker is deleted.
  A kill at any moment leaves no ``config.json`` (or the complete export, plus at worst the
  marker if killed after ``config.json``). ``abort()`` deletes the objects written by this run
  and the marker; uploads still open are cancelled.

Several processes (torchrun, ``export-hf --workers``): each writes some of the shards
(:func:`assign_shards`; ``shards=``). The owner's :meth:`HfModelWriter.begin` opens the output as
above; the others :meth:`HfModelWriter.attach` to it (locally: into the owner's staging directory,
so on several nodes a filesystem they share; on object stores: straight to the prefix) and end
with :meth:`~HfModelWriter.finish_part`. Once they all reported
(:meth:`~HfModelWriter.others_reported`), the owner's :meth:`~HfModelWriter.finish` checks every
shard is there and commits as above. An abort by the owner removes everything; before the others
reported (they may still be uploading), the object-store marker stays, so the rerun replaces what
is left without ``overwrite``.

One writer per destination at a time: two concurrent exports to the same place are not
detected (locally the second to commit is refused or replaces the first).

:func:`verify_export` re-reads an export's headers with ranged reads (never whole shards) and
checks names, shapes, dtypes, offsets and the index against what was expected. ``finish`` runs
it on the STAGED output (the temp sibling; on object stores the prefix, still without
``config.json``) before it writes ``config.json`` and commits, so an export that fails the check
is aborted instead of committed. An S3 shard whose completion the store answered with the
checksum of exactly the parts sent is checked from the header bytes the writer uploaded (its
listed size, offsets, names and shapes all the same): re-reading them proves nothing more, costs
a request per shard, one after the other, and on some servers (the S3 test server) a pass over
the whole object.
"""

from __future__ import annotations

import io
import json
import os
import posixpath
import socket
import sys
from collections import Counter
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import IO, TYPE_CHECKING, Any, Iterable, Mapping

from ckptctl.errors import CkptctlError, NotFoundError, UsageError
from ckptctl.formats.base import RawTensor, TensorSize
from ckptctl.formats.hf import SAFETENSORS_DTYPES, SafetensorsHeader, parse_safetensors_header
# INCOMPLETE_MARKER (object-store marker of an export in progress), TMP_INFIX and RUN_INFO (the
# local temp sibling) are those of the shared output protocol.
from ckptctl.output_dir import (HF_EXPORT, INCOMPLETE_MARKER, RUN_INFO, TMP_INFIX, LocalStaging,  # noqa: F401
                                TerminateAsInterrupt, judge_destination, pid_alive, rename_exchange)
from ckptctl.storage import (UPLOAD_CONFIRMED_FIELD, Store, gcs_chunk_size, min_part_size, open_local_for_writing,
                              open_store, translate_errors, write_local_file)

if TYPE_CHECKING:  # pragma: no cover
    import torch

CONFIG_NAME = "config.json"
SAFE_WEIGHTS_NAME = "model.safetensors"
SAFE_WEIGHTS_INDEX_NAME = "model.safetensors.index.json"
#: transformers 4.x's save_pretrained default ("5GB"); transformers 5 uses "50GB".
DEFAULT_MAX_SHARD_SIZE = 5 * 10**9
DEFAULT_UPLOAD_BLOCK_SIZE = 16 * 2**20

# torch dtype name -> safetensors dtype code (the reader's table, inverted)
_ST_CODES: dict[str, str] = {name: code for code, name in SAFETENSORS_DTYPES.items()}


# ---------------------------------------------------------------------------------------------
# specs and the shard plan
# ---------------------------------------------------------------------------------------------
def normalize_dtype(dtype: Any) -> str:
    """``torch.bfloat16`` / ``"torch.bfloat16"`` / ``"bfloat16"`` / ``"BF16"`` -> ``"bfloat16"``."""
    text = str(dtype)
    if text.startswith("torch."):
        text = text[len("torch."):]
    if text in _ST_CODES:
        return text
    if text in SAFETENSORS_DTYPES:
        return SAFETENSORS_DTYPES[text]
    raise UsageError(f"dtype {dtype!s} cannot be written to safetensors")


def parse_size(size: int | str) -> int:
    """Bytes from an int or a string like ``"5GB"``, ``"500MB"``, ``"2GiB"`` (HF: decimal units)."""
    if isinstance(size, bool):
        raise UsageError(f"invalid size {size!r}")
    if isinstance(size, int):
        value = size
    else:
        text = str(size).strip().upper().replace(" ", "")
        units = {"TIB": 2**40, "GIB": 2**30, "MIB": 2**20, "KIB": 2**10,
                 "TB": 10**12, "GB": 10**9, "MB": 10**6, "KB": 10**3, "B": 1}
        for unit, factor in units.items():
            if text.endswith(unit):
                number = text[: -len(unit)]
                break
        else:
            unit, factor, number = "", 1, text
        try:
            value = int(float(number) * factor)
        except ValueError:
            raise UsageError(f"invalid size {size!r} (e.g. 5GB, 500MB, 2GiB)") from None
    if value <= 0:
        raise UsageError(f"invalid size {size!r}: must be positive")
    return value


@dataclass(frozen=True)
class TensorSpec(TensorSize):
    """What the writer must know about a tensor before its data arrives (``numel``/``nbytes``
    as :class:`~ckptctl.formats.base.TensorInfo`'s)."""

    name: str
    shape: tuple[int, ...]
    dtype: str  # torch dtype name without "torch.", e.g. "bfloat16"
    #: Consecutive specs with one group share a storage in transformers' state dict (the experts of
    #: one MoE projection): placed in one shard, sized together, as save_pretrained does.
    shard_group: str | None = field(default=None, compare=False)

    @classmethod
    def coerce(cls, obj: Any) -> "TensorSpec":
        """From a TensorSpec, anything with ``name``/``shape``/``dtype`` (TensorInfo), or a
        ``(name, shape, dtype)`` tuple."""
        if isinstance(obj, TensorSpec):
            return obj
        if isinstance(obj, tuple) and len(obj) == 3:
            name, shape, dtype = obj
        else:
            try:
                name, shape, dtype = obj.name, obj.shape, obj.dtype
            except AttributeError:
                raise UsageError(f"not a tensor spec: {obj!r}") from None
        if not isinstance(name, str) or not name or name == "__metadata__":
            raise UsageError(f"invalid tensor name {name!r}")
        shape = tuple(int(d) for d in shape)
        if any(d < 0 for d in shape):
            raise UsageError(f"{name}: negative dimension in shape {list(shape)}")
        return cls(name, shape, normalize_dtype(dtype))


def specs_from_state_dict(state_dict: Mapping[str, "torch.Tensor"]) -> list[TensorSpec]:
    """Specs of an in-memory state dict, in its order."""
    return [TensorSpec(k, tuple(v.shape), normalize_dtype(v.dtype)) for k, v in state_dict.items()]


def shard_file_name(index: int, count: int) -> str:
    """``model.safetensors`` for one shard, else ``model-{index+1:05d}-of-{count:05d}.safetensors``."""
    if count == 1:
        return SAFE_WEIGHTS_NAME
    return f"model-{index + 1:05d}-of-{count:05d}.safetensors"


@dataclass(frozen=True)
class ShardPlan:
    """Which tensor goes into which file, in file order; tensors of a shard in write order."""

    max_shard_size: int
    shards: tuple[tuple[TensorSpec, ...], ...]

    @property
    def files(self) -> list[str]:
        return [shard_file_name(i, len(self.shards)) for i in range(len(self.shards))]

    @property
    def is_sharded(self) -> bool:
        return len(self.shards) > 1

    @property
    def weight_map(self) -> dict[str, str]:
        return {spec.name: file for file, shard in zip(self.files, self.shards) for spec in shard}

    @property
    def total_size(self) -> int:
        return sum(spec.nbytes for shard in self.shards for spec in shard)

    @property
    def total_parameters(self) -> int:
        return sum(spec.numel for shard in self.shards for spec in shard)

    def shard_bytes(self) -> list[int]:
        return [sum(s.nbytes for s in shard) for shard in self.shards]


def _storage_units(specs: Iterable[Any]) -> list[list[TensorSpec]]:
    """``specs`` as save_pretrained's sharding sees them: one unit per storage (a run of specs
    with the same ``shard_group``, else one tensor)."""
    units: list[list[TensorSpec]] = []
    seen: set[str] = set()
    for obj in specs:
        spec = TensorSpec.coerce(obj)
        if spec.name in seen:
            raise UsageError(f"tensor {spec.name!r} listed twice")
        seen.add(spec.name)
        if spec.shard_group is not None and units and units[-1][0].shard_group == spec.shard_group:
            units[-1].append(spec)
        else:
            units.append([spec])
    return units


def plan_shards(specs: Iterable[Any], max_shard_size: int | str) -> ShardPlan:
    """Split ``specs`` into shards like ``huggingface_hub.split_torch_state_dict_into_shards``
    (tensors sharing a storage, here a ``shard_group``, count once and stay together)."""
    limit = parse_size(max_shard_size)
    shards: list[list[TensorSpec]] = []
    current: list[TensorSpec] = []
    current_size = 0
    for unit in _storage_units(specs):
        size = sum(spec.nbytes for spec in unit)
        if size > limit:
            shards.append(unit)  # alone, and before the shard being filled (as HF does)
            continue
        if current_size + size > limit:
            shards.append(current)
            current, current_size = [], 0
        current.extend(unit)
        current_size += size
    if current:
        shards.append(current)
    if not shards:
        raise UsageError("no tensors to write")
    return ShardPlan(limit, tuple(tuple(s) for s in shards))


def assign_shards(plan: ShardPlan, processes: int) -> list[list[int]]:
    """The shards (indices into ``plan.files``) each of ``processes`` processes writes: runs of
    consecutive shards balanced by bytes (a shard goes to the process whose equal share of the
    total holds the shard's middle byte), so neighbours share their source reads. Deterministic
    from the plan: every process computes the same split. A process may get none."""
    sizes = plan.shard_bytes()
    if not sum(sizes):  # only empty tensors: by count
        sizes = [1] * len(sizes)
    total = sum(sizes)
    out: list[list[int]] = [[] for _ in range(processes)]
    before = 0
    for i, size in enumerate(sizes):
        out[min(processes - 1, int((before + size / 2) * processes / total))].append(i)
        before += size
    return out


def safetensors_header(specs: Iterable[TensorSpec], metadata: Mapping[str, str] | None = None) -> bytes:
    """The 8-byte length plus the space-padded JSON header of a file holding ``specs`` in order."""
    header: dict[str, Any] = {"__metadata__": dict(metadata or {"format": "pt"})}
    offset = 0
    for spec in specs:
        size = spec.nbytes
        header[spec.name] = {"dtype": _ST_CODES[spec.dtype], "shape": list(spec.shape),
                             "data_offsets": [offset, offset + size]}
        offset += size
    text = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
    text += b" " * (-len(text) % 8)
    return len(text).to_bytes(8, "little") + text


# ---------------------------------------------------------------------------------------------
# results
# ---------------------------------------------------------------------------------------------
@dataclass
class HfWriteSummary:
    dest: str
    files: list[str]  # relative names, in the order they were completed
    shard_files: list[str]
    shard_count: int
    tensor_count: int
    total_size: int  # tensor data bytes (the index's metadata.total_size)
    bytes_written: int  # every file, headers and JSON included
    dtype_counts: dict[str, int]
    replaced: str | None = None  # what was replaced, in words; "interrupted" (a dead run's leftovers); None
    cleaned: list[str] = field(default_factory=list)  # stale temp siblings removed (local)
    peak_buffered_bytes: int = 0  # most tensor bytes held in upload buffers at once (0 locally)

    def to_dict(self) -> dict:
        return dict(self.__dict__)


# ---------------------------------------------------------------------------------------------
# tensor bytes
# ---------------------------------------------------------------------------------------------
def _tensor_bytes(tensor: "torch.Tensor | RawTensor") -> list[memoryview]:
    """The tensor's little-endian bytes, in one or more consecutive parts (a :class:`RawTensor`'s
    own), without a copy for a contiguous CPU tensor."""
    if sys.byteorder != "little":  # pragma: no cover
        raise CkptctlError("writing safetensors on a big-endian host is not supported")
    if isinstance(tensor, RawTensor):
        return [memoryview(part).cast("B") for part in tensor.parts if len(part)]
    import torch

    t = tensor.detach()
    if t.device.type != "cpu":
        t = t.to("cpu")
    if t.is_complex():
        t = t.resolve_conj()
    t = t.resolve_neg().contiguous()
    if t.numel() == 0:
        return []
    return [memoryview(t.reshape(-1).view(torch.uint8).numpy())]


# ---------------------------------------------------------------------------------------------
# targets: where the files go and how they are committed
# ---------------------------------------------------------------------------------------------
#: Tests switch this off to exercise the two-rename fallback (the local commit protocol itself
#: lives in :mod:`ckptctl.output_dir`, shared with every command that writes a directory).
_USE_EXCHANGE = True
_pid_alive = pid_alive


def _rename_exchange(a: str, b: str) -> bool:
    """Atomically swap two paths (Linux renameat2 RENAME_EXCHANGE); False where unsupported."""
    return _USE_EXCHANGE and rename_exchange(a, b)


class _LocalFiles:
    """The streaming file operations of a local output, into ``new_dir``."""

    url: str
    new_dir: str | None

    def staged_store(self) -> Store:
        """The staged output (the temp sibling), for checks before the commit."""
        return open_store(self.new_dir)

    def _path(self, rel: str) -> str:
        path = os.path.join(self.new_dir, *rel.split("/"))
        if "/" in rel:  # only below: a staging directory removed by its owner is never made again
            os.makedirs(os.path.dirname(path), exist_ok=True)
        return path

    def open(self, rel: str, size: int) -> IO[bytes]:
        with translate_errors(self.url):
            return open_local_for_writing(self._path(rel))

    def write(self, f: IO[bytes], data: memoryview | bytes) -> int:
        with translate_errors(self.url):
            f.write(data)
        return 0  # nothing held in memory

    def close(self, f: IO[bytes]) -> None:
        with translate_errors(self.url):
            f.flush()
            os.fsync(f.fileno())
            f.close()

    def discard(self, f: IO[bytes]) -> None:
        try:
            f.close()
        except OSError:
            pass

    def put(self, rel: str, data: bytes) -> None:
        with translate_errors(self.url):
            write_local_file(self._path(rel), data, durable=True)


class _LocalTarget(_LocalFiles, LocalStaging):
    """A local directory built in a temp sibling and renamed into place
    (:class:`ckptctl.output_dir.LocalStaging`), plus the streaming file operations."""

    def __init__(self, store: Store, overwrite: bool):
        super().__init__(store, overwrite, kind=HF_EXPORT)

    def _exchange(self, a: str, b: str) -> bool:
        return _rename_exchange(a, b)


class _AttachedLocalTarget(_LocalFiles):
    """Another process's share of a local output: its files go into the owner's staging
    directory (same machine, or a filesystem the nodes share); the owner judges, commits
    and, on failure, removes the whole staging directory."""

    def __init__(self, store: Store, staging: str):
        self.url = store.url
        self.new_dir = staging
        self.replaced: str | None = None
        self.cleaned: list[str] = []

    def prepare(self) -> None:
        if not os.path.isdir(self.new_dir):
            raise CkptctlError(f"{self.new_dir} (the staging directory process 0 created for {self.url}) is not "
                               "here: the processes must share the destination's filesystem")

    def abort(self) -> None:
        pass  # the owner removes the staging directory


class _UploadBudget:
    """Bytes handed to background uploads and not yet uploaded, at most ``limit`` (one part is
    always let through when nothing is held, so a part larger than the limit cannot stall)."""

    def __init__(self, limit: int):
        import threading

        self.limit = max(int(limit), 1)
        self.held = 0
        self.peak = 0
        self._cond = threading.Condition()
        self._spare: dict[int, list[io.BytesIO]] = {}  # part size -> bodies to reuse

    def acquire(self, n: int, failed=lambda: False) -> None:
        with self._cond:
            while self.held and self.held + n > self.limit and not failed():
                self._cond.wait(0.5)
            self.held += n
            self.peak = max(self.peak, self.held)

    def release(self, n: int) -> None:
        with self._cond:
            self.held -= n
            self._cond.notify_all()

    # Part bodies are reused rather than allocated (and their memory faulted in) part after
    # part; with them sent as file-like bodies, the 1.42 GB bench export to S3 took 4.1-4.3 s of
    # user CPU instead of 4.6-5.3 s.
    def part_body(self, size: int) -> io.BytesIO:
        """An empty body for a part of ``size`` bytes: one a finished part gave back, or new."""
        with self._cond:
            spare = self._spare.get(size)
            body = spare.pop() if spare else io.BytesIO()
        body.seek(0)
        return body

    def give_back(self, body: io.BytesIO, size: int) -> None:
        """A full part's body, uploaded: for the next part of the same size."""
        with self._cond:
            self._spare.setdefault(size, []).append(body)


def s3_upload_limit(memory: int | None, concurrency: int, part_size: int) -> int:
    """Bytes of S3 parts worth holding for upload: ``concurrency`` parts uploading and as many
    ready for the next free slot, at most ``memory``. More queued parts do not make the upload
    faster, they only hold memory: with 1 GiB allowed, the 1.42 GB bench export to S3 held 1.46 GB
    for the whole of its run (0.83 GB with this limit). That memory is not free for anything else
    on the machine: the bench's S3 server assembled the parts of the aws CLI's upload of the same
    file in 2.5-2.7 s beside an idle machine, in 7.0-7.8 s beside a process holding 1.5 GB."""
    useful = 2 * concurrency * part_size
    return min(memory, useful) if memory else useful


class _S3ConcurrentUpload:
    """One S3 object written as a multipart upload whose parts are uploaded concurrently, in
    the background, while the caller produces the next bytes.

    Parts of ``part_size`` bytes go to ``pool`` as they fill; ``budget`` bounds the bytes of
    parts not yet uploaded (the writer blocks when it is spent). ``close()`` uploads the last
    part, waits for all, and completes the upload (parts in order: the object is the bytes
    written, in order); an object smaller than one part is one PUT. A failed part (after the
    store's retries) fails the next ``write``/``close``; ``discard()`` aborts the upload, so
    nothing partial ever appears. Requests go through the store's filesystem (its retries,
    timeouts and the lost-completion check of :mod:`ckptctl.storage`).

    ``confirmed`` after ``close()``: the store confirmed the object is exactly the parts sent
    (:data:`~ckptctl.storage.UPLOAD_CONFIRMED_FIELD`), so nothing needs reading back."""

    def __init__(self, store: Store, rel: str, part_size: int, pool, budget: _UploadBudget):
        self.store = store
        self.path = store.full_path(rel)
        self.bucket, self.key = self.path.split("/", 1)
        self.blocksize = part_size
        self._pool = pool
        self._budget = budget
        self._part = budget.part_body(part_size)  # the part being filled (a reused body)
        self._filled = 0
        self._futures: list = []
        self._parts: list[dict] = []
        self._upload_id: str | None = None
        self._error: BaseException | None = None
        self.closed = False
        self.confirmed = False

    def _check(self) -> None:
        if self._error is None:
            for future in self._futures:
                if future.done() and future.exception() is not None:
                    self._error = future.exception()
                    break
        if self._error is not None:
            raise self._error

    @property
    def buffered(self) -> int:
        return self._filled

    def write(self, data) -> None:
        view = memoryview(data).cast("B")
        while len(view):
            n = min(len(view), self.blocksize - self._filled)
            self._part.write(view[:n])
            self._filled += n
            view = view[n:]
            if self._filled >= self.blocksize:
                self._hand_over()

    def _hand_over(self) -> None:
        self._check()
        if self._upload_id is None:
            self._upload_id = self.store.fs.call_s3("create_multipart_upload", Bucket=self.bucket,
                                                    Key=self.key)["UploadId"]
        body, size = self._part, self._filled
        body.truncate(size)  # a reused body may hold more (the last part is shorter)
        body.seek(0)
        self._part, self._filled = self._budget.part_body(self.blocksize), 0
        number = len(self._futures) + 1
        self._budget.acquire(size, failed=lambda: any(f.done() and f.exception() for f in self._futures))
        try:
            self._futures.append(self._pool.submit(self._upload_part, number, body, size))
        except BaseException:
            self._budget.release(size)
            raise

    def _upload_part(self, number: int, body: io.BytesIO, size: int) -> dict:
        try:
            if self.closed and self._upload_id is None:
                raise RuntimeError("upload discarded")
            # a file-like body goes out in small pieces: bytes would be copied whole into the
            # connection's send buffer (asyncio before Python 3.12), fresh memory for every part
            out = self.store.fs.call_s3("upload_part", Bucket=self.bucket, Key=self.key, PartNumber=number,
                                        UploadId=self._upload_id, Body=body)
            return {"PartNumber": number, "ETag": out["ETag"]}
        finally:
            self._budget.release(size)
            if size == self.blocksize:
                self._budget.give_back(body, size)

    def close(self) -> None:
        if self.closed:
            return
        if self._upload_id is None:  # smaller than one part: one PUT
            with self._part.getbuffer() as view:
                data = bytes(view[:self._filled])
            self.store.fs.pipe_file(self.path, data)
            self._filled = 0
            self.closed = True
            return
        if self._filled:
            self._hand_over()
        from concurrent.futures import wait

        wait(self._futures)
        self._check()
        parts = [f.result() for f in self._futures]
        out = self.store.fs.call_s3("complete_multipart_upload", Bucket=self.bucket, Key=self.key,
                                    UploadId=self._upload_id, MultipartUpload={"Parts": parts})
        self.closed = True
        self.confirmed = bool(out.get(UPLOAD_CONFIRMED_FIELD))

    def discard(self) -> None:
        self.closed = True
        self._filled = 0
        for future in self._futures:
            future.cancel()
        from concurrent.futures import wait

        wait(self._futures)
        upload_id, self._upload_id = self._upload_id, None
        if upload_id is not None:
            self.store.fs.call_s3("abort_multipart_upload", Bucket=self.bucket, Key=self.key, UploadId=upload_id)


class _BackgroundUpload:
    """An fsspec file written by a background thread (GCS: a resumable upload's chunks must go
    up in order, one at a time): the caller hands over copies of ``blocksize`` bytes and goes on
    producing while the previous ones are uploaded; ``budget`` bounds the bytes handed over and
    not yet written. Errors of the thread fail the next ``write``/``close``."""

    _END = object()

    def __init__(self, f, budget: _UploadBudget):
        import queue
        import threading

        self._f = f
        self.path = getattr(f, "path", "")
        self.blocksize = max(int(getattr(f, "blocksize", 0) or 0), 2**20)
        self._budget = budget
        self._queue: queue.Queue = queue.Queue()
        self._error: BaseException | None = None
        self._buffer = bytearray()
        self.closed = False
        self._thread = threading.Thread(target=self._run, name="ckptctl-upload", daemon=True)
        self._thread.start()

    @property
    def buffered(self) -> int:
        return len(self._buffer)

    def write(self, data) -> None:
        """Collect ``data`` into blocks of ``blocksize``; each full block is handed over as is."""
        view = memoryview(data).cast("B")
        while len(view):
            n = min(len(view), self.blocksize - len(self._buffer))
            self._buffer += view[:n]
            view = view[n:]
            if len(self._buffer) >= self.blocksize:
                self._hand_over()

    def _run(self) -> None:
        while True:
            item = self._queue.get()
            if item is self._END:
                return
            try:
                if self._error is None and not self.closed:
                    self._f.write(item)
            except BaseException as exc:  # noqa: BLE001 - raised by the caller's next call
                self._error = exc
            finally:
                self._budget.release(len(item))

    def _hand_over(self) -> None:
        if self._error is not None:
            raise self._error
        chunk, self._buffer = self._buffer, bytearray()  # handed over as is: no copy
        self._budget.acquire(len(chunk), failed=lambda: self._error is not None)
        self._queue.put(chunk)

    def close(self) -> None:
        if self.closed:
            return
        if self._buffer:
            self._hand_over()
        self._queue.put(self._END)
        self._thread.join()
        if self._error is not None:
            raise self._error
        self._f.close()
        self.closed = True

    def discard(self) -> None:
        self.closed = True
        self._buffer = bytearray()
        self._queue.put(self._END)
        self._thread.join()
        try:
            if not self._f.closed:
                self._f.discard()
        finally:
            self._f.closed = True  # never let the file's own __del__ commit a partial object


class _ObjectStoreTarget:
    """An S3/GCS prefix: data first, ``config.json`` last, a marker while incomplete.

    ``concurrency`` 1: each shard streams through an fsspec file (its parts uploaded in the
    caller's thread as its buffer fills). Above 1: S3 shards are multipart uploads whose parts
    go up ``concurrency`` at a time in the background, GCS shards are written by a background
    thread (resumable uploads take their chunks in order); ``memory`` bounds the bytes waiting
    for upload in either case."""

    def __init__(self, store: Store, overwrite: bool, upload_block_size: int, concurrency: int = 1,
                 memory: int | None = None, *, attached: bool = False):
        self.store = store
        self.url = store.url
        self.overwrite = overwrite
        self.block_size = upload_block_size
        self.concurrency = concurrency
        self._pool = None
        self._memory = memory
        self._budget = _UploadBudget(memory if memory else 4 * concurrency * upload_block_size)
        self._largest_part = 0
        self.written: list[str] = []
        self.marker_written = False
        self.cleaned: list[str] = []
        # attached: another process's share; the owner judged and prepared the prefix, and commits
        self.attached = attached
        self.replaced = None if attached else self._judge(self._listing())

    def _judge(self, existing: list[str]) -> str | None:
        """The shared rule (:func:`ckptctl.output_dir.judge_destination`): only an earlier HF
        model directory is replaced, and only with ``overwrite``."""
        return judge_destination(self.store, existing, kind=HF_EXPORT, overwrite=self.overwrite,
                                 commit_last=(CONFIG_NAME,))

    def _listing(self) -> list[str]:
        return [e.path for e in self.store.walk_destination()]

    def prepare(self) -> None:
        if self.attached:
            return
        existing = self._listing()
        self.replaced = self._judge(existing)  # again: it may have been filled meanwhile
        if CONFIG_NAME in existing:
            self.store.delete_many([CONFIG_NAME])  # first, alone: the old export stops looking complete
        self.store.write_bytes(INCOMPLETE_MARKER, json.dumps({
            "tool": "ckptctl", "host": socket.gethostname(), "pid": os.getpid(),
            "started": datetime.now(timezone.utc).isoformat(timespec="seconds")}).encode())
        self.marker_written = True
        rest = [p for p in existing if p not in (CONFIG_NAME, INCOMPLETE_MARKER)]
        if rest:
            self.store.delete_many(rest)

    def open(self, rel: str, size: int):
        block = max(self.block_size, min_part_size(size))
        self.written.append(rel)
        if self.concurrency > 1 and self.store.protocol == "s3":
            if self._pool is None:
                from concurrent.futures import ThreadPoolExecutor

                self._pool = ThreadPoolExecutor(max_workers=self.concurrency, thread_name_prefix="ckptctl-upload")
            self._largest_part = max(self._largest_part, block)
            self._budget.limit = s3_upload_limit(self._memory, self.concurrency, self._largest_part)
            return _S3ConcurrentUpload(self.store, rel, block, self._pool, self._budget)
        if self.concurrency > 1 and self.block_size == DEFAULT_UPLOAD_BLOCK_SIZE:
            block = max(block, gcs_chunk_size(self._budget.limit))  # its chunks go up one by one
        f = self.store.open(rel, "wb", block_size=block)
        return _BackgroundUpload(f, self._budget) if self.concurrency > 1 else f

    def _url_of(self, f) -> str:
        """The object an open upload writes (its ``.path`` is the full ``bucket/prefix/file``)."""
        path = getattr(f, "path", "")
        return self.store.url_of_path(path) if path else self.url

    def write(self, f, data: memoryview | bytes) -> int:
        """Write in pieces of at most one block, so the upload buffer never exceeds two blocks."""
        if isinstance(f, (_S3ConcurrentUpload, _BackgroundUpload)):
            with translate_errors(self._url_of(f)):
                f.write(data)
            return self._budget.held + f.buffered
        view = memoryview(data)
        step = max(int(getattr(f, "blocksize", 0) or 0), 2**20)
        peak = 0
        with translate_errors(self._url_of(f)):
            for start in range(0, len(view), step):
                piece = view[start:start + step]
                buffer = getattr(f, "buffer", None)
                held = buffer.tell() if buffer is not None else 0
                peak = max(peak, held + len(piece))
                f.write(piece)
        return peak

    def close(self, f) -> None:
        with translate_errors(self._url_of(f)):
            try:
                f.close()
            except BaseException:
                # The completion failed for good (its transient failures were retried): the file
                # counts as closed now, so cancel the upload here -- S3 would keep the parts of
                # an unfinished multipart upload, unseen, until a lifecycle rule removes them.
                try:
                    f.discard()
                except Exception:
                    pass
                raise

    def discard(self, f) -> None:
        """Cancel an open upload so that no partial object ever appears."""
        try:
            if not f.closed:
                f.discard()
        except Exception:
            pass
        try:
            f.closed = True  # never let the file's own __del__ commit a partial object
        except Exception:
            pass

    def put(self, rel: str, data: bytes) -> None:
        self.written.append(rel)
        self.store.write_bytes(rel, data)

    def staged_store(self) -> Store:
        """The output in progress (no config.json yet, the marker present)."""
        return self.store

    def commit(self) -> None:
        self.store.delete_many([INCOMPLETE_MARKER])
        self.marker_written = False
        self.shutdown()

    def shutdown(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
            self._pool = None

    def abort(self, extra: Iterable[str] = (), *, keep_marker: bool = False) -> None:
        """Delete this run's objects (``extra``: those other processes wrote) and the marker,
        last; ``keep_marker`` leaves it (other processes may still be writing: the rerun sees
        an interrupted export and replaces it without asking). Callable again to finish."""
        self.shutdown()
        doomed = list(dict.fromkeys([*self.written, *extra]))
        drop_marker = self.marker_written and not keep_marker
        if drop_marker:
            doomed.append(INCOMPLETE_MARKER)  # last: if this fails, a rerun still sees "interrupted"
        if doomed:
            if self.attached:  # best effort: the owner deletes them again
                try:
                    self.store.delete_many(doomed)
                except CkptctlError:
                    pass
            else:
                self.store.delete_many(doomed)
        self.written = []
        if drop_marker:
            self.marker_written = False


# ---------------------------------------------------------------------------------------------
# the writer
# ---------------------------------------------------------------------------------------------
_RESERVED = {CONFIG_NAME, SAFE_WEIGHTS_INDEX_NAME, INCOMPLETE_MARKER}


def _check_extra_name(rel: str, shard_files: set[str]) -> str:
    if not isinstance(rel, str) or not rel or "\\" in rel or rel.startswith("/"):
        raise UsageError(f"invalid extra file name {rel!r}")
    norm = posixpath.normpath(rel)
    if norm.startswith("../") or norm == ".." or norm == ".":
        raise UsageError(f"invalid extra file name {rel!r}")
    if norm in _RESERVED or norm in shard_files or norm == SAFE_WEIGHTS_NAME:
        raise UsageError(f"extra file {rel!r} would replace a file the writer produces itself")
    return norm


def _config_bytes(config: Mapping[str, Any] | bytes | str) -> bytes:
    if isinstance(config, bytes):
        data = config
    elif isinstance(config, str):
        data = config.encode("utf-8")
    else:
        return (json.dumps(dict(config), indent=2, sort_keys=True) + "\n").encode("utf-8")
    try:
        json.loads(data)
    except ValueError as exc:
        raise UsageError(f"config.json is not valid JSON: {exc}") from None
    return data


def judge_export_destination(store: Store, overwrite: bool) -> str | None:
    """What writing an export to ``store`` would replace (None: nothing), judged by the rule the
    writer applies when it opens (so a refusal reads the same), writing nothing (locally a dead
    run's temp sibling is removed, as the writer would): lets an export refuse its destination
    before it imports torch and reads the source."""
    target = _LocalTarget(store, overwrite) if store.is_local else _ObjectStoreTarget(
        store, overwrite, DEFAULT_UPLOAD_BLOCK_SIZE)
    return target.replaced


class HfModelWriter:
    """Stream tensors into an HF model directory at ``dest_url``; see the module docstring.

    ``specs``: every tensor, in the order :meth:`add` will receive them (TensorSpec,
    TensorInfo or ``(name, shape, dtype)``). Use as a context manager, or call
    :meth:`abort` on error: an exception inside the ``with`` block aborts.
    """

    def __init__(self, dest_url: str, specs: Iterable[Any], *, max_shard_size: int | str,
                 overwrite: bool = False, endpoint_url: str | None = None, store: Store | None = None,
                 upload_block_size: int = DEFAULT_UPLOAD_BLOCK_SIZE, upload_concurrency: int = 1,
                 upload_memory: int | None = None, shards: Iterable[int] | None = None,
                 _attach: str | bool | None = None):
        spec_list = [TensorSpec.coerce(s) for s in specs]
        self.plan = plan_shards(spec_list, max_shard_size)
        self.store = store if store is not None else open_store(dest_url, endpoint_url=endpoint_url)
        #: another process's share (:meth:`attach`): it writes its shards, never commits
        self.attached = _attach is not None
        if self.store.is_local:
            self._target: Any = (_AttachedLocalTarget(self.store, str(_attach)) if self.attached
                                 else _LocalTarget(self.store, overwrite))
        else:
            self._target = _ObjectStoreTarget(self.store, overwrite, upload_block_size, upload_concurrency,
                                              upload_memory, attached=self.attached)
        self.dest = self.store.url
        self._files = self.plan.files
        #: the shards this writer writes (all, unless several processes share the export)
        self.shards = sorted(set(range(len(self._files)) if shards is None else shards))
        if any(not 0 <= i < len(self._files) for i in self.shards):
            raise UsageError(f"shards {self.shards}: the plan has {len(self._files)}")
        self.shared = len(self.shards) < len(self._files) or self.attached
        mine = set(self.shards)
        # Write order = the order of ``specs`` (a tensor larger than max_shard_size sits in an
        # earlier file than its neighbours but arrives in between them).
        shard_of = {spec.name: i for i, shard in enumerate(self.plan.shards) for spec in shard}
        self._order = [(spec, shard_of[spec.name]) for spec in spec_list if shard_of[spec.name] in mine]
        last_tensor = {shard_of[spec.name]: i for i, spec in enumerate(spec_list)}
        #: the shards in the order one process completes them (its last tensor added)
        self._completion_order = [self._files[i] for i in sorted(last_tensor, key=last_tensor.get)]
        self._remaining = [len(shard) for shard in self.plan.shards]
        #: files other processes wrote (owner of a shared export): kept at commit, deleted on abort
        self._elsewhere: list[str] = []
        self._others_settled = True
        self._open: dict[int, Any] = {}
        #: shards whose upload the store confirmed: checked from their header, not re-read
        self._confirmed: list[int] = []
        self._next = 0
        self._state = "new"  # new -> writing -> finished | aborted; "broken" after a failure
        self._abort_settled = False
        self._completed: list[str] = []
        self._bytes_written = 0
        self.peak_buffered_bytes = 0
        self._sigterm = TerminateAsInterrupt()

    @classmethod
    def attach(cls, dest_url: str, specs: Iterable[Any], *, staging: str | None, shards: Iterable[int],
               **options) -> "HfModelWriter":
        """Another process's share of an export that a writer opened with :meth:`begin`: it writes
        the shards ``shards`` (into ``staging``, the owner's staging directory, locally; straight
        to the prefix on object stores) and ends with :meth:`finish_part`. ``options``: as the
        owner's (``max_shard_size`` and the specs must be the same: the plan is)."""
        return cls(dest_url, specs, shards=shards, _attach=staging if staging is not None else True, **options)

    def begin(self) -> str | None:
        """Open the output now (local: the temp sibling; object stores: the old export stops
        looking complete, the marker is written), before other processes :meth:`attach`; returns
        the local staging directory they write into (None on object stores)."""
        self._start()
        return self._target.new_dir if self.store.is_local else None

    # -- context manager ------------------------------------------------------------------
    def __enter__(self) -> "HfModelWriter":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if self._state not in ("finished", "aborted"):
            self.abort()

    def __del__(self):
        # An abandoned writer (the process is going down on an exception): cancel open
        # uploads so that their file objects do not commit partial shards when collected,
        # and drop the local temp directory. Completed objects stay (like after a kill).
        try:
            if getattr(self, "_state", "finished") not in ("finished", "aborted"):
                for f in list(self._open.values()):
                    self._target.discard(f)
                self._open.clear()
                if isinstance(self._target, _LocalTarget):
                    self._target.abort()
                self._sigterm.restore()
        except Exception:
            pass

    # -- writing --------------------------------------------------------------------------
    @property
    def tensors_added(self) -> int:
        return self._next

    @property
    def tensor_names(self) -> list[str]:
        """The tensors :meth:`add` takes from this writer, in order (its shards' only, when shared)."""
        return [spec.name for spec, _ in self._order]

    def _start(self) -> None:
        if self._state == "new":
            self._state = "broken"
            self._sigterm.install()  # before the staging exists: from here on, SIGTERM aborts like Ctrl-C
            if self.shared and not self.attached:
                self._others_settled = False  # others may write until they report
            self._target.prepare()
            self._state = "writing"
        elif self._state != "writing":
            raise UsageError(f"writer for {self.dest} is {self._state}; start a new one")

    def add(self, name: str, tensor: "torch.Tensor | RawTensor") -> None:
        """Stream one tensor (or its bytes, a :class:`RawTensor`) into its shard; it must be the
        next one of the plan."""
        if self._state not in ("new", "writing"):
            raise UsageError(f"writer for {self.dest} is {self._state}; start a new one")
        if self._next >= len(self._order):
            raise UsageError(f"tensor {name!r}: all {len(self._order)} planned tensors were already added")
        spec, shard = self._order[self._next]
        if name != spec.name:
            planned = any(s.name == name for s, _ in self._order)
            raise UsageError(f"tensor {name!r} added out of order: expected {spec.name!r} next"
                             if planned else f"tensor {name!r} is not in the plan (expected {spec.name!r})")
        shape, dtype = tuple(tensor.shape), normalize_dtype(tensor.dtype)
        if shape != spec.shape or dtype != spec.dtype:
            raise UsageError(f"tensor {name!r}: got shape {list(shape)} {dtype}, "
                             f"planned {list(spec.shape)} {spec.dtype}")
        self._start()
        self._state = "broken"
        parts = _tensor_bytes(tensor)
        f = self._open.get(shard)
        if f is None:
            header = safetensors_header(self.plan.shards[shard])
            f = self._target.open(self._files[shard], len(header) + sum(s.nbytes for s in self.plan.shards[shard]))
            self._open[shard] = f
            self._target.write(f, header)
            self._bytes_written += len(header)
        for data in parts:
            held = self._target.write(f, data)
            self.peak_buffered_bytes = max(self.peak_buffered_bytes, held)
            self._bytes_written += data.nbytes
            del data
        del parts
        self._remaining[shard] -= 1
        if self._remaining[shard] == 0:
            f = self._open.pop(shard)
            self._target.close(f)
            if getattr(f, "confirmed", False):
                self._confirmed.append(shard)
            self._completed.append(self._files[shard])
        self._next += 1
        self._state = "writing"

    def _check_all_added(self) -> None:
        if self._next != len(self._order):
            missing = len(self._order) - self._next
            raise UsageError(f"{missing} planned tensor(s) not added yet (next: {self._order[self._next][0].name!r})")

    def others_reported(self, files: Iterable[str]) -> None:
        """Owner of a shared export: every other process has stopped writing, and these are the
        files they wrote (kept by the commit, deleted by an abort, marker included)."""
        self._elsewhere = list(dict.fromkeys([*self._elsewhere, *files]))
        self._others_settled = True

    def finish_part(self) -> tuple[list[str], int]:
        """An attached writer's end: every tensor of its shards added and each shard closed
        (uploaded); returns (its files, bytes written). The owner commits them."""
        if not self.attached:
            raise UsageError("finish_part() is for an attached writer; the owner calls finish()")
        self._check_all_added()
        self._start()  # a process without shards still checks the staging directory is shared
        if isinstance(self._target, _ObjectStoreTarget):
            self._target.shutdown()
        self._state = "finished"
        self._sigterm.restore()
        return list(self._completed), self._bytes_written

    def finish(self, config: Mapping[str, Any] | bytes | str, extra_files: Mapping[str, bytes] | None = None,
               *, total_parameters: int | None = None, verify: bool = True,
               bytes_elsewhere: int = 0) -> HfWriteSummary:
        """Write extra files (tokenizer, generation_config.json), the index, then -- unless
        ``verify`` is false -- re-read what was written (:func:`verify_export` on the staged
        output: every shard header and the index, against the planned names, shapes and dtypes), and only
        then ``config.json`` and the commit. A failed check raises :class:`CkptctlError` and
        aborts: nothing that looks like a model is left behind. Returns what was written.

        ``config``: a dict (written like ``PretrainedConfig.to_json_string``) or the file's bytes.
        ``total_parameters`` goes into the index metadata; transformers writes
        ``model.num_parameters()`` there, which leaves out persistent buffers: by default the
        sum of all tensors' element counts (the same for models whose state dict holds only
        parameters).

        Shared by several processes: the others' shards must be written (:meth:`others_reported`,
        ``bytes_elsewhere`` their bytes); the check covers every shard, whoever wrote it."""
        if self.attached:
            raise UsageError("an attached writer cannot commit; the owner does")
        self._check_all_added()
        if not self._others_settled:
            raise UsageError("the other processes' shards are not all written yet")
        shard_files = set(self._files)
        extras = {_check_extra_name(rel, shard_files): bytes(data) for rel, data in (extra_files or {}).items()}
        config_data = _config_bytes(config)
        self._start()
        self._state = "broken"
        for rel in sorted(extras):
            self._target.put(rel, extras[rel])
            self._completed.append(rel)
            self._bytes_written += len(extras[rel])
        if self.plan.is_sharded:
            params = self.plan.total_parameters if total_parameters is None else int(total_parameters)
            index = {"metadata": {"total_parameters": params,
                                  "total_size": self.plan.total_size},
                     "weight_map": self.plan.weight_map}
            data = (json.dumps(index, indent=2, sort_keys=True) + "\n").encode("utf-8")
            self._target.put(SAFE_WEIGHTS_INDEX_NAME, data)
            self._completed.append(SAFE_WEIGHTS_INDEX_NAME)
            self._bytes_written += len(data)
        all_specs = [spec for shard in self.plan.shards for spec in shard]
        if self.shared:  # even without verify: a shard another process wrote where this one cannot see it
            staged = {e.path for e in self._target.staged_store().walk()}
            missing = [f for f in self._files if f not in staged]
            if missing:
                self.abort()
                raise CkptctlError(f"{missing[0]} (written by another process) is not at {self.dest}'s staging: the "
                                   "processes must share the destination's filesystem (nothing committed)")
        if verify:
            want = {spec.name: (spec.shape, spec.dtype) for spec in all_specs}
            problems = verify_export(self.dest, want, store=self._target.staged_store(), staged=True,
                                     known_headers={self._files[i]: safetensors_header(self.plan.shards[i])
                                                    for i in self._confirmed})
            if problems:
                self.abort()
                raise CkptctlError(f"verification of {self.dest} failed (nothing committed): "
                                   + "; ".join(problems[:5]))
        self._target.put(CONFIG_NAME, config_data)
        self._completed.append(CONFIG_NAME)
        self._bytes_written += len(config_data)
        self._target.commit()
        self._state = "finished"
        self._sigterm.restore()
        files = list(self._completed)
        if self.shared:  # every shard, in the order one process would have completed them, then the rest
            done = set(files) | set(self._elsewhere)
            files = [f for f in self._completion_order if f in done] + [f for f in files if f not in shard_files]
        return HfWriteSummary(
            dest=self.dest, files=files, shard_files=list(self._files),
            shard_count=len(self._files), tensor_count=len(all_specs), total_size=self.plan.total_size,
            bytes_written=self._bytes_written + bytes_elsewhere,
            dtype_counts=dict(sorted(Counter(spec.dtype for spec in all_specs).items())),
            replaced=self._target.replaced, cleaned=list(self._target.cleaned),
            peak_buffered_bytes=self.peak_buffered_bytes)

    def abort(self) -> None:
        """Remove what this run wrote (local: the temp directory; cloud: its objects).

        Owner of a shared export on an object store: the others' files too; while they may still
        be writing (before :meth:`others_reported`) every planned shard is deleted but the marker
        stays (the rerun replaces an interrupted export without asking); called again once they
        reported, it deletes what they wrote and the marker."""
        if self._state == "finished" or (self._state == "aborted" and self._abort_settled):
            return
        for f in list(self._open.values()):
            self._target.discard(f)
        self._open.clear()
        self._state = "aborted"
        self._abort_settled = self._others_settled
        try:
            if isinstance(self._target, _ObjectStoreTarget) and self.shared and not self.attached:
                others = [f for i, f in enumerate(self._files) if i not in set(self.shards)]
                self._target.abort([*self._elsewhere, *others], keep_marker=not self._others_settled)
            else:
                self._target.abort()
        finally:
            self._sigterm.restore()


# ---------------------------------------------------------------------------------------------
# verification
# ---------------------------------------------------------------------------------------------
def _check_shard(rel: str, header: "SafetensorsHeader", size: int, problems: list[str]) -> dict[str, tuple]:
    """What the parsed header of one file does not satisfy; returns name -> (shape, dtype)."""
    if header.metadata.get("format") != "pt":
        problems.append(f"{rel}: __metadata__.format is not 'pt' (transformers refuses the file)")
    position = header.data_start
    for name, info in sorted(header.tensors.items(), key=lambda kv: (kv[1]["begin"], kv[1]["end"])):
        if info["begin"] != position:
            problems.append(f"{rel}: {name}: data starts at {info['begin'] - header.data_start}, expected "
                            f"{position - header.data_start} (gap or overlap)")
        position = max(position, info["end"])
    if position != size:
        problems.append(f"{rel}: file is {size} bytes, the header describes {position}")
    return {name: (tuple(info["shape"]), info["dtype"]) for name, info in header.tensors.items()}


def _expected_entry(value: Any) -> tuple[tuple[int, ...], str]:
    if isinstance(value, tuple) and len(value) == 2:
        shape, dtype = value
    else:
        shape, dtype = value.shape, value.dtype
    return tuple(int(d) for d in shape), normalize_dtype(dtype)


def verify_export(dest_url: str, expected: Mapping[str, Any] | None = None, *,
                  endpoint_url: str | None = None, store: Store | None = None, staged: bool = False,
                  known_headers: Mapping[str, bytes] | None = None) -> list[str]:
    """Problems with the HF export at ``dest_url`` (empty list: fine).

    ``expected``: tensor name -> ``(shape, dtype)`` (or an object with ``shape``/``dtype``).
    Reads the listing, ``config.json``, the index and each shard's header (ranged reads).
    ``staged``: the export is not committed yet (the writer checks before it writes
    ``config.json``), so neither a missing ``config.json`` nor the in-progress marker counts.
    ``known_headers``: file -> its first bytes (length field and header) where the caller knows
    the store holds them (the writer's confirmed uploads): parsed from there instead of re-read;
    everything else (listed size, offsets, names, shapes, dtypes, the index) is checked alike.
    """
    store = store if store is not None else open_store(dest_url, endpoint_url=endpoint_url)
    problems: list[str] = []
    try:
        sizes = {e.path: e.size for e in store.walk()}
    except NotFoundError:
        return [f"{store.url}: not found"]
    if staged:
        pass
    elif CONFIG_NAME not in sizes:
        problems.append("config.json is missing (incomplete export)")
    else:
        try:
            json.loads(store.read_bytes(CONFIG_NAME))
        except ValueError:
            problems.append("config.json is not valid JSON")
    if INCOMPLETE_MARKER in sizes and not staged:
        problems.append(f"{INCOMPLETE_MARKER} is present (the export did not finish cleanly)")

    weight_map: dict[str, str] | None = None
    index_total: int | None = None
    if SAFE_WEIGHTS_INDEX_NAME in sizes:
        if SAFE_WEIGHTS_NAME in sizes:
            problems.append(f"both {SAFE_WEIGHTS_NAME} and {SAFE_WEIGHTS_INDEX_NAME} are present")
        try:
            index = json.loads(store.read_bytes(SAFE_WEIGHTS_INDEX_NAME))
            weight_map = index["weight_map"]
            if not isinstance(weight_map, dict):
                raise TypeError
            index_total = (index.get("metadata") or {}).get("total_size")
        except (ValueError, KeyError, TypeError, AttributeError):
            problems.append(f"{SAFE_WEIGHTS_INDEX_NAME}: no valid weight_map")
            weight_map = {}
        referenced = set(weight_map.values())
        for rel in sorted(referenced - set(sizes)):
            problems.append(f"{rel}: listed in the index but missing")
        for rel in sorted(p for p in sizes if p.endswith(".safetensors") and "/" not in p and p not in referenced):
            problems.append(f"{rel}: not referenced by the index")
        files = sorted(referenced & set(sizes))
    elif SAFE_WEIGHTS_NAME in sizes:
        files = [SAFE_WEIGHTS_NAME]
    else:
        return problems + [f"neither {SAFE_WEIGHTS_NAME} nor {SAFE_WEIGHTS_INDEX_NAME} is present"]

    found: dict[str, tuple] = {}
    data_bytes = 0
    for rel in files:
        try:
            header = parse_safetensors_header(store, rel, head=(known_headers or {}).get(rel))
        except CkptctlError as exc:
            problems.append(str(exc))
            continue
        data_bytes += sizes[rel] - header.data_start
        for name, entry in _check_shard(rel, header, sizes[rel], problems).items():
            if name in found:
                problems.append(f"{name}: stored in more than one file")
            found[name] = entry
            if weight_map is not None and weight_map.get(name) != rel:
                where = weight_map.get(name)
                problems.append(f"{name}: in {rel} but the index maps it to {where}" if where
                                else f"{name}: in {rel} but missing from the index")
    if weight_map is not None:
        for name, rel in weight_map.items():
            if rel in sizes and name not in found:
                problems.append(f"{name}: the index maps it to {rel}, which does not hold it")
        if index_total is not None and index_total != data_bytes:
            problems.append(f"index total_size {index_total} != {data_bytes} bytes of tensor data")

    if expected is not None:
        want = {name: _expected_entry(v) for name, v in expected.items()}
        for name in sorted(set(want) - set(found)):
            problems.append(f"{name}: missing")
        for name in sorted(set(found) - set(want)):
            problems.append(f"{name}: not expected")
        for name in sorted(set(want) & set(found)):
            (shape, dtype), (got_shape, got_dtype) = want[name], found[name]
            if got_shape != shape:
                problems.append(f"{name}: shape {list(got_shape)}, expected {list(shape)}")
            if got_dtype != dtype:
                problems.append(f"{name}: dtype {got_dtype}, expected {dtype}")
    return problems


__all__ = [
    "CONFIG_NAME", "DEFAULT_MAX_SHARD_SIZE", "INCOMPLETE_MARKER", "SAFE_WEIGHTS_INDEX_NAME", "SAFE_WEIGHTS_NAME",
    "HfModelWriter", "HfWriteSummary", "ShardPlan", "TensorSpec", "assign_shards", "normalize_dtype", "parse_size", "plan_shards",
    "s3_upload_limit", "safetensors_header", "shard_file_name", "specs_from_state_dict", "verify_export",
]
