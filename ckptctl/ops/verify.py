"""``verify``: is a checkpoint intact? Structure always, every byte with ``full``, hashes with a manifest.

PATH is a tree (every step), a step, a component or an HF export; each step (or the component
given) is one :class:`TargetReport`. Checks, cheapest first:

- structure (always; reads metadata only): completeness by the one definition
  (:mod:`ckptctl.tree`), the deep size checks of :mod:`ckptctl.formats.integrity` (zip
  directories of every ``.pt``, DCP chunk ranges, safetensors headers and index), every ``.pt``'s
  metadata unpickled by the safe loader (:class:`~ckptctl.formats.torchzip.TorchZipFile`: no
  code runs, no tensor data is read), and every tensor's pieces tiling it exactly once
  (DCP chunks, FSDP rank shards -- each rank file holding the shard shape its mesh promises --,
  safetensors shards against the index);
- ``full``: every byte of every ``.pt`` record and every DCP chunk read and its CRC-32 compared
  with the zip directory (bit flips; safetensors carry no checksum: a manifest covers them);
  streamed: one block of :data:`BLOCK` bytes per file, one chunk per Megatron read;
- a manifest (:data:`~ckptctl.tree.MANIFEST_FILE`, written by ``write_manifest`` into each step
  directory, or into the component / export directory given): every file's size and SHA-256;
  each file that differs, is missing or is extra is a problem.

Problems are one line each, naming the file relative to the target directory
(``policy/__1_0.distcp: ...``). A check that could not run (access denied, timeouts) raises: it
never passes, nor marks a sound checkpoint damaged.
"""

from __future__ import annotations

import struct
import time
import zipfile
from dataclasses import dataclass, field
from typing import Any, Iterator

from ckptctl.errors import CkptctlError, CorruptFileError, NotACheckpointError, NotFoundError
from ckptctl.formats import open_reader
from ckptctl.formats.base import MODEL, Piece, TensorInfo
from ckptctl.formats.integrity import deep_check_component, deep_check_step, deep_check_steps
from ckptctl.formats.manifest import (BLOCK, ByteCounter, hash_files, manifest_document, pool_map, read_manifest,
                                      write_manifest_file)
from ckptctl.formats.safe_load import CorruptCheckpointError
from ckptctl.formats.torchzip import RangedFile, RecordCrc, check_archive, is_legacy_torch_save, read_zip_directory
from ckptctl.ops.export import COMPONENT, STEP, TREE, locate
from ckptctl.output_dir import INCOMPLETE_MARKER
from ckptctl.storage import FileEntry, Store, natural_key, open_store
from ckptctl.tree import FSDP, FSDP_SINGLE, HF, MANIFEST_FILE, MEGATRON, POINTER_FILE, UNKNOWN, Component, Step

# manifest states of a target
ABSENT, CHECKED, WRITTEN, NOT_WRITTEN = "absent", "checked", "written", "not written"

_LOCAL_HEADER = struct.Struct("<4sHHHHHIIIHH")
_LOCAL_HEADER_MAGIC = b"PK\x03\x04"


@dataclass
class TargetReport:
    """What verify found in one step directory, component or HF export."""

    path: str  # as the user typed it (a tree's step: below the tree's path)
    kind: str  # "step" or "component"
    backend: str
    files: int = 0
    bytes: int = 0
    checks: list[str] = field(default_factory=list)  # "structure", "crc", "manifest"
    manifest: str = ABSENT  # absent | checked | written | not written
    problems: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems

    def to_dict(self) -> dict:
        return {**self.__dict__, "ok": self.ok}


@dataclass
class VerifyReport:
    path: str
    kind: str  # tree | step | component
    full: bool = False
    write_manifest: bool = False
    targets: list[TargetReport] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)  # of the tree itself (the pointer file)
    bytes_read: int = 0  # by the CRC checks and hashing
    seconds: float = 0.0

    @property
    def ok(self) -> bool:
        return not self.problems and all(t.ok for t in self.targets)

    @property
    def problem_count(self) -> int:
        return len(self.problems) + sum(len(t.problems) for t in self.targets)

    def to_dict(self) -> dict:
        return {"path": self.path, "kind": self.kind, "ok": self.ok, "full": self.full,
                "write_manifest": self.write_manifest, "problems": list(self.problems),
                "targets": [t.to_dict() for t in self.targets], "bytes_read": self.bytes_read,
                "seconds": round(self.seconds, 3)}


# -- the interface ---------------------------------------------------------------------------------

def verify(url: str, *, full: bool = False, write_manifest: bool = False,
           endpoint_url: str | None = None) -> VerifyReport:
    """Verify the tree, step, component or HF export at ``url`` (see the module docstring)."""
    start = time.perf_counter()
    store = open_store(url, endpoint_url=endpoint_url)
    kind, found, _ = locate(store)
    report = VerifyReport(path=store.url, kind=kind, full=full, write_manifest=write_manifest)
    counter = ByteCounter()
    if kind == TREE:
        tree = found
        if tree.pointer.error:
            report.problems.append(f"{POINTER_FILE}: {tree.pointer.error}")
        deep_check_steps(store, tree.steps)
        for step in tree.steps:
            target = _verify_step(store, step, full, write_manifest, counter)
            if not target.ok and tree.current_run.is_in_progress(step):
                target.notes.append("written after the pointer target: possibly a save still in progress")
            report.targets.append(target)
    elif kind == STEP:
        parent = store.parent()
        deep_check_step(parent, found)
        report.targets.append(_verify_step(parent, found, full, write_manifest, counter))
    else:
        if found.backend == UNKNOWN:
            raise NotACheckpointError(f"{store.url}: not a checkpoint tree, step, model component or HF export")
        parent = store.parent()
        deep_check_component(parent, found)
        report.targets.append(_verify_component(parent, found, full, write_manifest, counter))
    report.bytes_read = counter.bytes
    report.seconds = time.perf_counter() - start
    return report


# -- one target ------------------------------------------------------------------------------------

def _verify_step(tree_store: Store, step: Step, full: bool, write_manifest: bool, counter: ByteCounter
                 ) -> TargetReport:
    """``step`` (classified and deep-checked, relative to ``tree_store``)."""
    where = tree_store.child(step.name)
    target = TargetReport(path=where.url, kind=STEP, backend=step.backend, checks=["structure"])
    files = [f for f in step.files if f.path != MANIFEST_FILE]
    target.files, target.bytes = len(files), sum(f.size for f in files)
    target.problems += step.problems
    target.notes += step.notes
    step_level = [f for f in files if "/" not in f.path and f.path.endswith(".pt") and f.size]  # trainer_state.pt
    named = _named_files(step.problems)
    target.problems += _metadata_problems(where, [f for f in step_level if f.path not in named])
    torch_files = list(step_level)
    for comp in step.components.values():
        found = _component_structure(tree_store.child(comp.path, comp.files), comp,
                                     named_in=_named_files(comp.problems))
        target.problems += [f"{comp.name}/{p}" for p in found]
        torch_files += [FileEntry(f"{comp.name}/{f.path}", f.size, f.mtime) for f in comp.files
                        if f.path.endswith(".pt") and f.size]
    if full:
        target.checks.append("crc")
        bad = _named_files(target.problems)
        target.problems += _crc_problems(where, [f for f in torch_files if f.path not in bad], target.notes, counter)
        for comp in step.components.values():
            if comp.backend == MEGATRON and not comp.problems:
                found = _megatron_chunk_problems(tree_store.child(comp.path), comp, counter)
                target.problems += [f"{comp.name}/{p}" for p in found]
    _manifest(where, files, step.files, target, write_manifest, counter)
    return target


def _verify_component(parent: Store, comp: Component, full: bool, write_manifest: bool, counter: ByteCounter
                      ) -> TargetReport:
    """A component or HF export given directly (classified and deep-checked against ``parent``)."""
    where = parent.child(comp.path)
    target = TargetReport(path=where.url, kind=COMPONENT, backend=comp.backend, checks=["structure"])
    files = [f for f in comp.files if f.path != MANIFEST_FILE]
    target.files, target.bytes = len(files), sum(f.size for f in files)
    target.problems += comp.problems
    target.problems += _component_structure(where, comp, named_in=_named_files(comp.problems))
    names = {f.path for f in comp.files}
    if comp.backend == HF and INCOMPLETE_MARKER in names and "config.json" in names:
        # export-hf writes config.json last: the marker outlived a process killed after it
        target.notes.append(f"{INCOMPLETE_MARKER} is left over: the export finished (config.json is written last) "
                            "but its process stopped before removing the marker; delete it, or rerun export-hf "
                            "with --overwrite")
    if full:
        target.checks.append("crc")
        bad = _named_files(target.problems)
        torch_files = [f for f in files if f.path.endswith(".pt") and f.size and f.path not in bad]
        target.problems += _crc_problems(where, torch_files, target.notes, counter)
        if comp.backend == MEGATRON and not comp.problems:
            target.problems += _megatron_chunk_problems(where, comp, counter)
    _manifest(where, files, comp.files, target, write_manifest, counter)
    return target


def _named_files(problems: list[str]) -> set[str]:
    """The files these problem lines name (``rel: why``)."""
    return {p.split(": ", 1)[0] for p in problems if ": " in p}


# -- structure beyond sizes: safe unpickling, pieces ------------------------------------------------

def _problem(rel: str, exc: Exception, url: str) -> str:
    """``rel: why`` from an error whose message names ``url`` (``cannot read URL: why``)."""
    text = " ".join(str(exc).split())
    for prefix in (f"cannot read {url}: ", f"{url}: ", "cannot read "):
        if text.startswith(prefix):
            text = text[len(prefix):]
            break
    return f"{rel}: {text}"


def _metadata_problems(store: Store, files: list[FileEntry], loaded: dict[str, Any] | None = None) -> list[str]:
    """Every ``.pt`` file's object tree unpickled by the safe loader (meta tensors, no data);
    the trees go into ``loaded`` (rel -> object) for later checks."""
    from ckptctl.formats.torchzip import TorchZipFile

    problems = []
    for f in files:
        try:
            obj = TorchZipFile(store, f.path, size=f.size).metadata()
        except CkptctlError as exc:
            problems.append(_problem(f.path, exc, store.url_of(f.path)))
            continue
        if loaded is not None:
            loaded[f.path] = obj
    return problems


def _component_structure(store: Store, comp: Component, named_in: set[str]) -> list[str]:
    """Metadata and piece checks of one component (``store`` rooted at it); files already named
    by a problem are skipped (their damage is known), and a component already found damaged
    gets no piece check (its reader would only fail again)."""
    loaded: dict[str, Any] = {}
    problems = _metadata_problems(store, [f for f in comp.files if f.path.endswith(".pt") and f.size
                                          and f.path not in named_in], loaded)
    if comp.problems or problems:
        return problems
    kwargs = {"nesting": comp.nesting} if comp.backend == MEGATRON else {}
    with open_reader(store, comp.backend, **kwargs) as reader:
        try:
            infos = list(reader.tensors())
            if comp.backend == HF:  # every tensor in exactly one shard, as the index says
                problems += reader.check_index()
        except CkptctlError as exc:
            return problems + [f"{comp.nesting + '/' if comp.nesting else ''}{_index_name(comp)}: "
                               f"{' '.join(str(exc).split())}"]
    for info in infos:
        why = _tiling_problem(info)
        if why:
            problems.append(f"{_files_of(info)}: {info.name}: {why}")
    if comp.backend in (FSDP, FSDP_SINGLE):
        problems += _fsdp_shard_problems(loaded, infos)
    return problems


def _index_name(comp: Component) -> str:
    return {MEGATRON: ".metadata", HF: "model.safetensors.index.json"}.get(comp.backend, "model files")


def _files_of(info: TensorInfo) -> str:
    names = sorted({p.file for p in info.pieces}, key=natural_key)
    return ", ".join(names[:3]) + (" ..." if len(names) > 3 else "") if names else "(no file)"


def _tiling_problem(info: TensorInfo) -> str | None:
    """Why the pieces of ``info`` do not cover its shape exactly once, or None (the writer's own
    check: :func:`ckptctl.formats.dcp_writer._check_tiling`)."""
    from ckptctl.formats.dcp_writer import _check_tiling

    if any(d < 0 for d in info.shape):
        return f"negative dimension in shape {list(info.shape)}"
    pieces = sorted(info.pieces, key=lambda p: tuple(p.offsets))
    try:
        _check_tiling(info.name, tuple(info.shape), pieces)
    except CkptctlError as exc:
        return str(exc).removeprefix(f"{info.name}: ")
    return None


def _fsdp_shard_problems(loaded: dict[str, Any], infos: list[TensorInfo]) -> list[str]:
    """Each rank's model file (``loaded``: rel -> its unpickled object) holds, for every DTensor,
    the local shard shape and dtype its piece (from rank 0's mesh and placements) says: a rank
    file from another run or world size shows."""
    import torch

    by_file: dict[str, list[tuple[TensorInfo, Piece]]] = {}
    for info in infos:
        if info.layout != "dtensor" or info.group != MODEL:  # optimizer state: keyed by index, not name
            continue
        for piece in info.pieces:
            by_file.setdefault(piece.file, []).append((info, piece))
    problems = []
    for rel in sorted(by_file, key=natural_key):
        state = loaded.get(rel)
        for info, piece in by_file[rel]:
            value = state.get(info.name) if isinstance(state, dict) else None
            local = getattr(value, "_local_tensor", None)
            if not isinstance(local, torch.Tensor):
                problems.append(f"{rel}: holds no shard of {info.name}")
                continue
            dtype = str(local.dtype).removeprefix("torch.")
            if tuple(local.shape) != tuple(piece.sizes) or dtype != info.dtype:
                problems.append(f"{rel}: {info.name}: holds {list(local.shape)} {dtype}, its mesh says "
                                f"{list(piece.sizes)} {info.dtype}")
    return problems


# -- full: every byte, every CRC --------------------------------------------------------------------

class _ForwardReader:
    """Bytes of one file read front to back in blocks of :data:`BLOCK` (one block in memory):
    records packed together cost one read, not one read each."""

    def __init__(self, store: Store, rel: str, size: int, counter: ByteCounter):
        self.store, self.rel, self.size, self.counter = store, rel, size, counter
        self.start, self.block = 0, b""

    def slices(self, start: int, end: int) -> Iterator[memoryview]:
        while start < end:
            if not self.start <= start < self.start + len(self.block):
                self.start = start
                self.block = self.store.read_range(self.rel, start, min(self.size, start + BLOCK))
                self.counter.add(len(self.block))
                if not self.block:
                    raise EOFError(f"short read at {start}")
            offset = start - self.start
            take = min(end - start, len(self.block) - offset)
            yield memoryview(self.block)[offset:offset + take]
            start += take

    def read(self, start: int, end: int) -> bytes:
        return b"".join(self.slices(start, end))


def _tensor_members(store: Store, rel: str, size: int) -> dict[str, str]:
    """Zip record -> the name of the (first) tensor stored in it (its key path in the saved
    object), for naming a damaged record; {} when the metadata cannot tell."""
    import torch

    from ckptctl.formats.torchzip import TorchZipFile

    zf = TorchZipFile(store, rel, size=size)
    names: dict[str, str] = {}

    def walk(obj: Any, path: str, depth: int) -> None:
        if depth > 16:
            return
        if isinstance(obj, torch.Tensor):
            local = getattr(obj, "_local_tensor", obj)  # a DTensor's shard
            if isinstance(local, torch.Tensor) and local.device.type == "meta":
                try:
                    names.setdefault(zf.location(local).storage.member, path or "(the saved tensor)")
                except (ValueError, CkptctlError):
                    pass
        elif isinstance(obj, dict):
            for key, value in obj.items():
                walk(value, f"{path}.{key}" if path else str(key), depth + 1)
        elif isinstance(obj, (list, tuple)):
            for i, value in enumerate(obj):
                walk(value, f"{path}[{i}]", depth + 1)

    try:
        walk(zf.metadata(), "", 0)
    except CkptctlError:
        return {}
    return names


class _RecordError(Exception):
    """A damaged record: its zip member name and what is wrong (``cannot read URL: ...``)."""

    def __init__(self, member: str, error: CkptctlError):
        super().__init__(str(error))
        self.member, self.error = member, error


def _check_records(reader: _ForwardReader, base: int, directory: zipfile.ZipFile, url: str,
                   tensor: str | None = None) -> None:
    """The CRC-32 of every record of the zip archive at ``base`` of the file (``directory``: its
    zip directory, offsets relative to ``base``), from bytes read front to back; raises
    :class:`_RecordError` for the first damaged record."""
    for info in sorted(directory.infolist(), key=lambda i: i.header_offset):
        at = base + info.header_offset
        header = _LOCAL_HEADER.unpack(reader.read(at, at + _LOCAL_HEADER.size))
        if header[0] != _LOCAL_HEADER_MAGIC:
            raise _RecordError(info.filename, CorruptCheckpointError(f"cannot read {url}: bad local header for "
                                                                     f"record {info.filename}"))
        if info.compress_type != zipfile.ZIP_STORED:
            raise _RecordError(info.filename, CorruptCheckpointError(
                f"cannot read {url}: record {info.filename} is compressed: not written by torch.save"))
        start = at + _LOCAL_HEADER.size + header[-2] + header[-1]
        check = RecordCrc(url, info.filename, info.file_size, info.CRC, tensor)
        offset = 0
        try:
            for view in reader.slices(start, start + info.file_size):
                check.add(offset, view)
                offset += len(view)
            if not info.file_size:
                check.add(0, b"")
        except CkptctlError as exc:
            raise _RecordError(info.filename, exc) from exc


def _zip_directory(store: Store, rel: str, base: int, size: int) -> zipfile.ZipFile:
    """The zip directory of the archive at bytes ``[base, base + size)`` of ``rel``."""
    return read_zip_directory(RangedFile(lambda s, e: store.read_range(rel, base + s, base + e), size), size)


def _reason_text(exc: Exception, url: str) -> str:
    return _problem("", exc, url)[2:]


def torch_save_crc_problem(store: Store, rel: str, size: int, counter: ByteCounter | None = None) -> str | None:
    """Read every record of the ``torch.save`` zip ``rel`` and compare its CRC-32 with the zip
    directory; why it is damaged (naming the record and its tensor), None when sound, or
    :data:`LEGACY` for a pre-zip file (no CRC). Streamed: one block in memory."""
    url = store.url_of(rel)
    try:
        directory = _zip_directory(store, rel, 0, size)
    except (zipfile.BadZipFile, EOFError, OSError, ValueError, struct.error):
        if is_legacy_torch_save(store.read_range(rel, 0, min(size, 64))):
            return LEGACY
        return "not a readable zip archive"
    try:
        _check_records(_ForwardReader(store, rel, size, counter or ByteCounter()), 0, directory, url)
    except _RecordError as exc:
        tensor = _tensor_members(store, rel, size).get(exc.member)  # metadata read only now, on damage
        why = _reason_text(exc.error, url)
        return f"{tensor}: {why}" if tensor else why
    except EOFError:
        return f"shorter than the {size:,} bytes listed"
    return None


LEGACY = "legacy (pre-zip) torch.save file: it carries no CRC-32"


def _crc_problems(store: Store, files: list[FileEntry], notes: list[str], counter: ByteCounter) -> list[str]:
    def check(f: FileEntry) -> str | None:
        try:
            return torch_save_crc_problem(store, f.path, f.size, counter)
        except NotFoundError:
            return "missing (removed since it was listed)"

    problems = []
    for f, why in zip(files, pool_map(check, files)):
        if why == LEGACY:
            notes.append(f"{f.path}: {why}")
        elif why:
            problems.append(f"{f.path}: {why}")
    return problems


def _megatron_chunk_problems(store: Store, comp: Component, counter: ByteCounter) -> list[str]:
    """Every DCP chunk (tensor pieces and objects) CRC-checked: each ``.distcp`` read front to
    back in blocks (chunks packed together share reads; a chunk larger than a block is checked
    record by record), files in parallel; one problem per damaged chunk. A chunk whose bytes
    are not a zip (stream transforms) goes through :meth:`MegatronReader.read_chunk_bytes`."""
    from ckptctl.formats.megatron import MegatronReader

    reader = MegatronReader(store, nesting=comp.nesting)
    sizes = {f.path: f.size for f in comp.files}
    chunks: dict[str, list[tuple[Piece, str]]] = {}
    for info in reader.tensors():
        for piece in info.pieces:
            chunks.setdefault(piece.file, []).append((piece, info.name))
    for o in reader.objects():
        chunks.setdefault(o.file, []).append((Piece(o.file, (), (), o.byte_offset, o.byte_length, o.rank), o.name))

    def check_file(rel: str) -> list[str]:
        forward = _ForwardReader(store, rel, sizes.get(rel, 0), counter)
        url = store.url_of(rel)
        problems = []
        for piece, name in sorted(chunks[rel], key=lambda item: item[0].byte_offset):
            where = f"{url} (bytes {piece.byte_offset}+{piece.byte_length}, {name})"
            try:
                if forward.read(piece.byte_offset, piece.byte_offset + 4) != _LOCAL_HEADER_MAGIC:
                    reader.read_chunk_bytes(piece, name)  # transformed bytes: undone, then checked
                elif piece.byte_length <= BLOCK:
                    check_archive(forward.read(piece.byte_offset, piece.byte_offset + piece.byte_length), where, name)
                else:
                    directory = _zip_directory(store, rel, piece.byte_offset, piece.byte_length)
                    _check_records(forward, piece.byte_offset, directory, where, name)
            except _RecordError as exc:
                problems.append(_chunk_problem(piece, name, exc.error, where))
            except (CkptctlError, zipfile.BadZipFile, EOFError, OSError, ValueError, struct.error) as exc:
                problems.append(_chunk_problem(piece, name, exc, where))
        return problems

    files = sorted(chunks, key=natural_key)
    return [p for found in pool_map(check_file, files) for p in found]


def _chunk_problem(piece: Piece, name: str, exc: Exception, where: str) -> str:
    why = _reason_text(exc, where)
    if not why.startswith(name):
        why = f"{name}: {why}"
    return f"{piece.file}: chunk at bytes {piece.byte_offset:,}+{piece.byte_length:,}: {why}"


# -- manifest ---------------------------------------------------------------------------------------

def _manifest(store: Store, files: list[FileEntry], listing: list[FileEntry], target: TargetReport,
              write: bool, counter: ByteCounter) -> None:
    """Check the manifest at ``store`` (``files``: what is there, the manifest excluded), then
    write a new one when asked and everything held."""
    digests: dict[str, str] = {}
    if any(f.path == MANIFEST_FILE for f in listing):
        target.checks.append("manifest")
        target.manifest = CHECKED
        try:
            expected = read_manifest(store)
        except (CorruptFileError, NotFoundError) as exc:
            target.problems.append(_problem(MANIFEST_FILE, exc, store.url_of(MANIFEST_FILE)))
            expected = None
        if expected is not None:
            digests = _compare(store, files, expected, target, counter)
    if not write:
        return
    if not target.ok:
        target.manifest = NOT_WRITTEN
        target.notes.append(f"{MANIFEST_FILE} not written: fix the problems above first")
        return
    missing = [f for f in files if f.path not in digests]
    digests.update(hash_files(store, missing, counter))
    write_manifest_file(store, manifest_document(files, digests))
    target.manifest = WRITTEN


def _compare(store: Store, files: list[FileEntry], expected: dict[str, tuple[int, str]], target: TargetReport,
             counter: ByteCounter) -> dict[str, str]:
    """Problems between the files there and the manifest; returns the digests computed."""
    present = {f.path: f for f in files}
    for rel in sorted(set(expected) - set(present), key=natural_key):
        target.problems.append(f"{rel}: missing (listed in {MANIFEST_FILE})")
    for rel in sorted(set(present) - set(expected), key=natural_key):
        target.problems.append(f"{rel}: extra file (not in {MANIFEST_FILE})")
    same_size = []
    for rel in sorted(set(present) & set(expected), key=natural_key):
        if present[rel].size != expected[rel][0]:
            target.problems.append(f"{rel}: {present[rel].size:,} bytes, {MANIFEST_FILE} says {expected[rel][0]:,}")
        else:
            same_size.append(present[rel])
    digests = hash_files(store, same_size, counter)
    for f in same_size:
        if digests[f.path] != expected[f.path][1]:
            target.problems.append(f"{f.path}: SHA-256 differs from {MANIFEST_FILE} (contents changed)")
    return digests


# -- for commands that read a checkpoint (export-hf, convert-reshard) ------------------------------

__all__ = ["TargetReport", "VerifyReport", "torch_save_crc_problem", "verify"]
