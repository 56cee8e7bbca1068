"""Cheap deep checks: do the files of a step hold as many bytes as their own indexes promise?

:mod:`ckptctl.tree` decides "complete" from one listing (names and sizes); a file truncated by a
killed upload or a full disk still has its name. These checks read only what each format keeps
about its own extent, never tensor data, and compare it with the size the listing already gave
(``FileEntry.size``):

- a ``torch.save`` file (``.pt``: FSDP rank files, the single-file layout, Megatron's
  ``common.pt``, ``trainer_state.pt``, ``data.pt``): its zip end record is the file's last 22
  bytes, the zip directory parses, it has a ``data.pkl`` record, and every record's local
  header and data end before the directory -- one ranged read of the file's tail
  (:func:`ckptctl.formats.torchzip.read_zip_directory`). Pre-zip (legacy) files carry no such
  index: they get a note, not a problem;
- a Megatron / torch DCP component: ``.metadata`` (read with the restricted unpickler of
  :mod:`ckptctl.formats.megatron`) names every chunk's file, offset and length: each file
  exists and holds its last chunk; ``metadata.json`` parses -- one read each;
- a ``.safetensors`` file: 8 + header length + the tensors' bytes is exactly the file size
  (:func:`ckptctl.formats.hf.parse_safetensors_header`, one ranged read); every shard
  ``model.safetensors.index.json`` names exists.

Cost: one small request per checked file (a 16-file FSDP step: 16 ranged reads of at most
64 KiB), :data:`MAX_WORKERS` at a time on object stores, for every step of ``list --deep`` and
for the steps ``prune`` and ``resolve-resume`` decide on. Plain ``list`` runs only the Megatron
``.metadata`` check (:func:`check_megatron_indexes`): one read per Megatron component, which
also gives its parallel layout (``TP2·PP2·EP8``). No torch import (the light commands use it).

Problems name the file relative to the component directory on a :class:`~ckptctl.tree.Component`
(``model_world_size_2_rank_1.pt: truncated (100 bytes; no zip end record)``) and relative to the
step directory on a :class:`~ckptctl.tree.Step` (``policy/model_world_size_2_rank_1.pt: ...``),
like the problems :mod:`ckptctl.tree` finds. A store that fails (access denied, timeouts) raises
its error: a check that could not run never passes, nor marks a good step damaged.
"""

from __future__ import annotations

import posixpath
import struct
import zipfile
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Callable

from ckptctl.errors import CkptctlError, CorruptFileError, NotFoundError
from ckptctl.formats.hf import INDEX_FILE, parse_safetensors_header
from ckptctl.formats.megatron import METADATA_FILE, METADATA_JSON, MegatronReader
from ckptctl.formats.safe_load import CorruptCheckpointError
from ckptctl.formats.torchzip import RangedFile, is_legacy_torch_save, read_zip_directory
from ckptctl.storage import Store, natural_key
from ckptctl.tree import MEGATRON, Component, Step

#: Concurrent requests of one deep check (threads; S3/GCS clients pool their connections).
MAX_WORKERS = 16

_EOCD = struct.Struct("<4s4H2LH")  # zip end-of-central-directory record, without the comment
_EOCD_MAGIC = b"PK\x05\x06"
_ZIP_MAGIC = b"PK\x03\x04"
_LOCAL_HEADER_SIZE = 30

#: What a check cannot settle and is not a problem either.
LEGACY_NOTE = "legacy (pre-zip) torch.save file: its size cannot be checked"


@dataclass
class Findings:
    """What one check found: problems (the file is damaged) and notes."""

    problems: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    layout: str | None = None  # a Megatron component's parallel layout read from its .metadata

    def add(self, other: "Findings") -> None:
        self.problems += other.problems
        self.notes += other.notes
        self.layout = self.layout or other.layout


def _fmt(n: int) -> str:
    return f"{n:,}"


# -- one file -------------------------------------------------------------------------------------

def torch_save_problem(store: Store, rel: str, size: int) -> str | None:
    """Why the ``torch.save`` zip ``rel`` (``size`` bytes, from a listing) is damaged, or None;
    :data:`LEGACY_NOTE` for a pre-zip file. One ranged read of the tail (two for a big directory,
    one more of the head when there is no end record)."""
    if size == 0:
        return "zero-byte file"
    try:
        return _zip_problem(RangedFile(lambda start, end: store.read_range(rel, start, end), size), size)
    except EOFError:
        return f"shorter than the {_fmt(size)} bytes listed (changed while being checked?)"


def _zip_problem(f: RangedFile, size: int) -> str | None:
    try:
        zf = read_zip_directory(f, size) if size >= _EOCD.size else None
        failure = None
    except (zipfile.BadZipFile, EOFError, OSError, ValueError, struct.error) as exc:
        zf, failure = None, f"{type(exc).__name__}: {' '.join(str(exc).split())[:120]}"
    end_record = _EOCD.unpack(f.fetch(size - _EOCD.size, size)) if size >= _EOCD.size else None
    at_end = end_record is not None and end_record[0] == _EOCD_MAGIC and not end_record[-1]
    if zf is None:
        if at_end:
            return f"unreadable zip directory ({failure})"
        head = f.fetch(0, min(size, 64))
        if is_legacy_torch_save(head):
            return LEGACY_NOTE
        if head.startswith(_ZIP_MAGIC):
            return f"truncated ({_fmt(size)} bytes; no zip end record)"
        return f"not a torch.save file ({_fmt(size)} bytes; no zip end record)"
    if not at_end:
        return "the zip end record is not at the end of the file (data appended, or damaged)"
    cd_offset = end_record[6]
    if cd_offset != 0xFFFFFFFF and cd_offset != zf.start_dir:  # zip64 keeps the offset elsewhere
        return f"the zip directory is not where the end record says ({_fmt(zf.start_dir)}, not {_fmt(cd_offset)})"
    names = zf.namelist()
    if not any(n == "data.pkl" or n.endswith("/data.pkl") for n in names):
        return "no data.pkl record: not a torch.save archive"
    for info in zf.infolist():
        end = info.header_offset + _LOCAL_HEADER_SIZE + len(info.orig_filename.encode("utf-8")) + info.compress_size
        if end > zf.start_dir:
            return f"record {info.filename} ends past the zip directory ({_fmt(end)} > {_fmt(zf.start_dir)})"
    return None


def safetensors_problem(store: Store, rel: str, size: int) -> str | None:
    """Why the safetensors file ``rel`` is damaged, or None: its header must parse and its data
    end exactly at ``size``. One ranged read (two for a header larger than the prefetch)."""
    if size == 0:
        return "zero-byte file"
    try:
        header = parse_safetensors_header(store, rel)
    except CorruptCheckpointError as exc:
        return _reason(exc, store.url_of(rel))
    if header.data_end > size:
        return f"truncated ({_fmt(size)} bytes; its header promises {_fmt(header.data_end)})"
    if header.data_end < size:
        return f"{_fmt(size - header.data_end)} bytes after the last tensor (its header ends the data at " \
               f"{_fmt(header.data_end)})"
    return None


def _reason(exc: Exception, url: str) -> str:
    """The part of a ``cannot read URL: why`` message after the file name."""
    text = " ".join(str(exc).split())
    for prefix in (f"cannot read {url}: ", f"{url}: "):
        if text.startswith(prefix):
            return text[len(prefix):]
    return text


# -- one component --------------------------------------------------------------------------------

Check = Callable[[], Findings]


def _file_check(store: Store, base: str, rel: str, size: int, check: Callable[[Store, str, int], str | None]
                ) -> Check:
    def run() -> Findings:
        try:
            why = check(store, posixpath.join(base, rel), size)
        except NotFoundError:
            why = "missing (removed since it was listed)"
        if why is None:
            return Findings()
        if why == LEGACY_NOTE:
            return Findings(notes=[f"{rel}: {why}"])
        return Findings(problems=[f"{rel}: {why}"])

    return run


def _megatron_check(store: Store, comp: Component, sizes: dict[str, int]) -> Check:
    """Every chunk ``.metadata`` names lies inside an existing data file of the listed size."""
    def run() -> Findings:
        reader = MegatronReader(store.child(comp.path) if comp.path else store, nesting=comp.nesting)
        index = f"{comp.nesting}/{METADATA_FILE}" if comp.nesting else METADATA_FILE
        try:
            extents = reader.data_file_extents()
        except CorruptCheckpointError as exc:
            return Findings(problems=[f"{index}: {_reason(exc, reader.store.url_of(index))}"])
        except NotFoundError:
            return Findings(problems=[f"{index}: missing (removed since it was listed)"])
        found = Findings()
        try:  # the .metadata is parsed already: its chunks also tell the layout (TP2·PP2·EP8)
            found.layout = reader.layout()
        except CkptctlError:
            pass
        for rel, end in sorted(extents.items(), key=lambda item: natural_key(item[0])):
            if rel not in sizes:
                found.problems.append(f"{rel}: missing (named in {index})")
            elif sizes[rel] < end:
                found.problems.append(f"{rel}: truncated ({_fmt(sizes[rel])} bytes; {index} has chunks up to "
                                      f"{_fmt(end)})")
        return found

    return run


def _json_check(store: Store, comp: Component, rel: str, validate: Callable[[object], str | None] | None = None
                ) -> Check:
    def run() -> Findings:
        try:
            doc = store.read_json(posixpath.join(comp.path, rel))
        except NotFoundError:
            return Findings(problems=[f"{rel}: missing (removed since it was listed)"])
        except CorruptFileError as exc:
            return Findings(problems=[f"{rel}: {_reason(exc, store.url_of(posixpath.join(comp.path, rel)))[:120]}"])
        why = validate(doc) if validate else None
        return Findings(problems=[f"{rel}: {why}"] if why else [])

    return run


def _hf_index_check(store: Store, comp: Component, sizes: dict[str, int]) -> Check:
    """Every shard ``model.safetensors.index.json`` names exists."""
    def shards_present(doc) -> str | None:
        weight_map = doc.get("weight_map") if isinstance(doc, dict) else None
        if not isinstance(weight_map, dict):
            return "no weight_map"
        missing = sorted({str(s) for s in weight_map.values()} - set(sizes))
        if missing:
            return f"names missing shards: {', '.join(missing[:4])}" + (" ..." if len(missing) > 4 else "")
        return None

    return _json_check(store, comp, INDEX_FILE, shards_present)


def component_checks(parent: Store, comp: Component, *, megatron_index_only: bool = False) -> list[Check]:
    """The checks of one component (``parent``: the store ``comp.path`` is relative to).
    ``megatron_index_only``: only a Megatron component's ``.metadata`` check."""
    sizes = {f.path: f.size for f in comp.files}
    checks: list[Check] = []
    if megatron_index_only:
        prefix = f"{comp.nesting}/" if comp.nesting else ""
        if comp.backend == MEGATRON and sizes.get(prefix + METADATA_FILE):
            checks.append(_megatron_check(parent, comp, sizes))
        return checks
    for f in comp.files:
        if f.size == 0:
            continue  # tree.py already calls it a zero-byte file
        if f.path.endswith(".pt"):
            checks.append(_file_check(parent, comp.path, f.path, f.size, torch_save_problem))
        elif f.path.endswith(".safetensors"):
            checks.append(_file_check(parent, comp.path, f.path, f.size, safetensors_problem))
    if comp.backend == MEGATRON:
        prefix = f"{comp.nesting}/" if comp.nesting else ""
        if sizes.get(prefix + METADATA_FILE):
            checks.append(_megatron_check(parent, comp, sizes))
        if sizes.get(prefix + METADATA_JSON):
            checks.append(_json_check(parent, comp, prefix + METADATA_JSON))
    if sizes.get(INDEX_FILE):
        checks.append(_hf_index_check(parent, comp, sizes))
    return checks


def _run(store: Store, checks: list[Check]) -> list[Findings]:
    if len(checks) < 2 or store.is_local:  # local reads are quick: threads would only add overhead
        return [check() for check in checks]
    with ThreadPoolExecutor(min(MAX_WORKERS, len(checks))) as pool:
        return list(pool.map(lambda check: check(), checks))


def _append_new(target: list[str], found: list[str]) -> None:
    target.extend(p for p in found if p not in target)


# -- the interface ---------------------------------------------------------------------------------

def deep_check_component(parent: Store, comp: Component) -> list[str]:
    """Deep-check one component; ``parent`` is the store ``comp.path`` is relative to (the tree
    root for components from :func:`~ckptctl.tree.scan_tree`). Appends the problems found to
    ``comp.problems`` (so ``comp.complete`` turns False; one already there is not repeated) and
    returns them (file names relative to the component directory)."""
    found = Findings()
    for f in _run(parent, component_checks(parent, comp)):
        found.add(f)
    comp.layout = comp.layout or found.layout
    _append_new(comp.problems, found.problems)
    return found.problems


def _step_checks(tree_store: Store, step: Step, megatron_index_only: bool = False
                 ) -> list[tuple[Component | None, Check]]:
    checks: list[tuple[Component | None, Check]] = []
    for comp in step.components.values():
        checks += [(comp, c) for c in component_checks(tree_store, comp, megatron_index_only=megatron_index_only)]
    if megatron_index_only:
        return checks
    for f in step.files:
        if "/" not in f.path and f.path.endswith(".pt") and f.size:
            checks.append((None, _file_check(tree_store, step.name, f.path, f.size, torch_save_problem)))
    return checks


def _apply(step: Step, results: list[tuple[Component | None, Findings]]) -> list[str]:
    """Record findings on the step and its components; returns the step's problems found."""
    problems: list[str] = []
    notes: list[str] = []
    for comp, found in results:
        if comp is not None:
            comp.layout = comp.layout or found.layout
            _append_new(comp.problems, found.problems)
            problems += [f"{comp.name}/{p}" for p in found.problems]
            notes += [f"{comp.name}/{n}" for n in found.notes]
        else:
            problems += found.problems
            notes += found.notes
    _append_new(step.problems, problems)
    _append_new(step.notes, notes)
    return problems


def deep_check_step(tree_store: Store, step: Step) -> list[str]:
    """Deep-check every component of ``step`` and its ``trainer_state.pt``, ``data.pt`` (and any
    other step-level ``.pt``). ``tree_store``: the store ``step.name`` and the components' paths
    are relative to. Problems go to the components (names relative to the component) and to
    ``step.problems`` (names relative to the step: ``policy/__0_0.distcp: truncated ...``), notes
    (legacy files) to ``step.notes``; returns the step's problems found."""
    return deep_check_steps(tree_store, [step])[step.step]


def deep_check_steps(tree_store: Store, steps: list[Step]) -> dict[int, list[str]]:
    """:func:`deep_check_step` for many steps, every file's check concurrently (one pool):
    step number -> the problems found (empty for a sound step)."""
    return _check_steps(tree_store, steps, megatron_index_only=False)


def check_megatron_indexes(tree_store: Store, steps: list[Step]) -> dict[int, list[str]]:
    """The part of :func:`deep_check_steps` that reads each Megatron component's ``.metadata``
    only (one read per component, concurrently): sets the components' ``layout`` and finds
    data files missing or shorter than their chunks (the sizes come from the listing)."""
    return _check_steps(tree_store, steps, megatron_index_only=True)


def _check_steps(tree_store: Store, steps: list[Step], *, megatron_index_only: bool) -> dict[int, list[str]]:
    jobs = [(step, comp, check) for step in steps
            for comp, check in _step_checks(tree_store, step, megatron_index_only)]
    results = _run(tree_store, [check for _s, _c, check in jobs])
    per_step: dict[int, list[tuple[Component | None, Findings]]] = {id(s): [] for s in steps}
    for (step, comp, _check), found in zip(jobs, results):
        per_step[id(step)].append((comp, found))
    out: dict[int, list[str]] = {}
    for step in steps:  # two directories may carry one number (global_step_5, global_step_05)
        out.setdefault(step.step, []).extend(_apply(step, per_step[id(step)]))
    return out
