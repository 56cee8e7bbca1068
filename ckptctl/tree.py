"""The SkyRL checkpoint tree: steps, the pointer file, components, and what "complete" means.

Everything here is decided from ONE recursive listing of the tree (names, sizes, mtimes) plus
the pointer file; no tensor file is opened. The only other read is ``fsdp_config.json`` for
the documented single-file FSDP layout, whose file names do not carry the world size.

"Complete" has one definition, used by every command:
- a model component is complete when every file its backend needs is present and non-empty
  (FSDP: a model file for each rank 0..W-1, and optimizer/extra-state files either for every
  rank or for none; Megatron: ``.metadata``, ``metadata.json`` and at least one ``.distcp``;
  HF export: ``config.json`` and every weight shard the shard names promise);
- a training step is complete when it has a complete ``policy/``, every other model component
  is complete, and ``trainer_state.pt`` is present and non-empty (it is written after the
  models, so it is the closest thing SkyRL has to a commit marker);
- an export step (``{export_path}/global_step_N/policy/``) is complete when its components are.

"The current run" has one definition too (:class:`CurrentRun`), used by prune, resolve-resume's
fallback and every command given a whole tree: the steps up to the pointer, plus the steps above
it written after the pointer target (a save in progress, or one the pointer does not name yet);
steps above the pointer written before its target are an older run's. Without a usable pointer
(SkyRL writes it non-atomically: a crash can leave it empty) the most recently written step
stands in for it. Modification times are the stores' own (upload times on S3/GCS).
"""

from __future__ import annotations

import posixpath
import re
from collections import defaultdict
from dataclasses import dataclass, field
from datetime import datetime, timedelta

from ckptctl.errors import NotACheckpointError
from ckptctl.storage import FileEntry, Store

POINTER_FILE = "latest_ckpt_global_step.txt"
#: ``ckptctl verify --write-manifest``'s file (sizes and SHA-256 of a step's or an export's files):
#: no checkpoint file, so it changes neither a backend's classification nor completeness.
MANIFEST_FILE = "ckptctl-manifest.json"
STEP_PREFIX = "global_step_"
MODEL_COMPONENTS = ("policy", "critic")
STEP_FILES = ("data.pt", "trainer_state.pt", "fully_async_state.pt")

STEP_DIR_RE = re.compile(r"^global_step_(\d+)$")
FSDP_RANK_FILE_RE = re.compile(r"^(model|optim|extra_state)_world_size_(\d+)_rank_(\d+)\.pt$")
DISTCP_RE = re.compile(r"^__(\d+)_(\d+)\.distcp$")
HF_SHARD_RE = re.compile(r"^model-(\d+)-of-(\d+)\.safetensors$")
FSDP_SINGLE_FILES = {"model": "model_state.pt", "optim": "optimizer_state.pt", "extra_state": "lr_scheduler_state.pt"}

# Backends, as shown to users and in --json.
FSDP = "fsdp"
FSDP_SINGLE = "fsdp-single-file"
MEGATRON = "megatron"
HF = "hf"
UNKNOWN = "unknown"


@dataclass
class Component:
    """One model component directory (``policy/`` or ``critic/``) of a step."""

    name: str
    path: str  # relative to the tree root
    backend: str
    files: list[FileEntry]  # paths relative to the component directory
    world_size: int | None = None
    has_optimizer: bool = False
    has_hf_config: bool = False
    has_lora: bool = False
    nesting: str = ""  # "dist_ckpt" for verl's Megatron layout
    problems: list[str] = field(default_factory=list)
    layout: str | None = None  # Megatron: "TP2·PP2·EP8", known once .metadata is read (list, integrity checks)

    @property
    def complete(self) -> bool:
        return not self.problems

    @property
    def bytes(self) -> int:
        return sum(f.size for f in self.files)

    @property
    def optimizer_files(self) -> list[str]:
        """Files holding only optimizer state (what ``prune --drop-optimizer`` removes)."""
        if self.backend == FSDP:
            return [f.path for f in self.files if f.name.startswith("optim_world_size_")]
        if self.backend == FSDP_SINGLE:
            return [f.path for f in self.files if f.path == FSDP_SINGLE_FILES["optim"]]
        return []  # Megatron keeps optimizer state inside the same .distcp files as weights

    def to_dict(self) -> dict:
        return {
            "name": self.name,
            "path": self.path,
            "backend": self.backend,
            "world_size": self.world_size,
            "layout": self.layout,
            "complete": self.complete,
            "problems": list(self.problems),
            "has_optimizer": self.has_optimizer,
            "has_hf_config": self.has_hf_config,
            "has_lora": self.has_lora,
            "nesting": self.nesting or None,
            "files": len(self.files),
            "bytes": self.bytes,
        }


@dataclass
class Step:
    """One ``global_step_N`` directory."""

    step: int
    name: str  # directory name, relative to the tree root
    files: list[FileEntry]  # every file of the step, paths relative to the step directory
    components: dict[str, Component]
    export: bool = False
    problems: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    @property
    def complete(self) -> bool:
        return not self.problems

    @property
    def bytes(self) -> int:
        return sum(f.size for f in self.files)

    @property
    def mtime(self) -> datetime | None:
        times = [f.mtime for f in self.files if f.mtime is not None]
        return max(times) if times else None

    @property
    def policy(self) -> Component | None:
        return self.components.get("policy")

    @property
    def backend(self) -> str:
        return self.policy.backend if self.policy else UNKNOWN

    @property
    def world_size(self) -> int | None:
        return self.policy.world_size if self.policy else None

    @property
    def has_optimizer(self) -> bool:
        """False when optimizer files were dropped (a model-only checkpoint SkyRL cannot resume)."""
        models = [c for c in self.components.values() if c.backend in (FSDP, FSDP_SINGLE)]
        return all(c.has_optimizer for c in models)

    def has_file(self, name: str) -> bool:
        return any(f.path == name for f in self.files)

    def to_dict(self) -> dict:
        mtime = self.mtime
        return {
            "step": self.step,
            "name": self.name,
            "complete": self.complete,
            "problems": list(self.problems),
            "notes": list(self.notes),
            "backend": self.backend,
            "world_size": self.world_size,
            "components": [c.to_dict() for c in self.components.values()],
            "step_files": [n for n in STEP_FILES if self.has_file(n)],
            "has_optimizer": self.has_optimizer,
            "bytes": self.bytes,
            "files": len(self.files),
            "mtime": mtime.isoformat() if mtime else None,
        }


@dataclass
class Pointer:
    """What ``latest_ckpt_global_step.txt`` says."""

    present: bool
    raw: str | None = None
    step: int | None = None
    error: str | None = None

    def to_dict(self) -> dict:
        return {"present": self.present, "raw": self.raw, "step": self.step, "error": self.error}


@dataclass
class Tree:
    """A checkpoint root (``trainer.ckpt_path``) or an export root (``trainer.export_path``)."""

    url: str
    kind: str  # "checkpoints" or "export"
    pointer: Pointer
    steps: list[Step]  # ascending by step
    unparsable: list[str]  # top-level directories named global_step_* that carry no step number
    files: list[FileEntry]

    def step(self, number: int) -> Step | None:
        return next((s for s in self.steps if s.step == number), None)

    @property
    def pointer_target(self) -> Step | None:
        """The directory SkyRL loads for the pointer: named ``global_step_{int(pointer)}`` exactly
        (a zero-padded ``global_step_05`` holds step 5 but is not the one SkyRL opens)."""
        if self.pointer.step is None:
            return None
        name = canonical_step_name(self.pointer.step)
        return next((s for s in self.steps if s.name == name), None)

    @property
    def pointer_usable(self) -> bool:
        return self.pointer.step is not None

    @property
    def current_run(self) -> "CurrentRun":
        return find_current_run(self)

    @property
    def newest_complete(self) -> Step | None:
        """The newest complete step of the current run (never an older run's higher step)."""
        return self.current_run.newest_complete

    @property
    def above_pointer(self) -> list[Step]:
        if self.pointer.step is None:
            return []
        return [s for s in self.steps if s.step > self.pointer.step]

    @property
    def bytes(self) -> int:
        return sum(f.size for f in self.files)

    def warnings(self) -> list[str]:
        """What a person should know before trusting this tree, one line each."""
        out: list[str] = []
        if self.kind == "checkpoints":
            p = self.pointer
            if not p.present:
                if self.steps:
                    out.append(f"no {POINTER_FILE}: SkyRL's resume_mode=latest would start from scratch")
            elif p.error:
                out.append(f"{POINTER_FILE} is unusable: {p.error}")
            elif self.pointer_target is None:
                other = self.step(p.step)
                out.append(f"{POINTER_FILE} points to step {p.step}, but {canonical_step_name(p.step)}/ does not exist"
                           + (f" ({other.name}/ holds step {p.step} under another name, which SkyRL does not open)"
                              if other else ""))
            elif not self.pointer_target.complete:
                out.append(f"{POINTER_FILE} points to step {p.step}, which is incomplete: "
                           + "; ".join(self.pointer_target.problems))
        out.extend(self.current_run.warnings())
        for step in self.steps:
            if step.name != canonical_step_name(step.step):
                out.append(f"{step.name}: not SkyRL's name for step {step.step} ({canonical_step_name(step.step)}); "
                           "a pointer to this step would not find it")
        for name in self.unparsable:
            out.append(f"unparsable step directory name: {name} (SkyRL's int() on it would fail)")
        return out

    def to_dict(self) -> dict:
        newest = self.newest_complete
        return {
            "url": self.url,
            "kind": self.kind,
            "pointer": self.pointer.to_dict(),
            "pointer_target": self.pointer.step if self.pointer_target else None,
            "newest_complete": newest.step if newest else None,
            "current_run": self.current_run.to_dict(),
            "steps": [s.to_dict() for s in self.steps],
            "unparsable": list(self.unparsable),
            "warnings": self.warnings(),
            "bytes": self.bytes,
            "files": len(self.files),
        }


POINTER = "pointer"
MTIMES = "mtimes"
NO_BASIS = "none"
#: Modification times closer than this are not told apart: S3 keeps whole seconds, and a copied
#: or uploaded run's steps land in any order within moments. Runs are minutes or more apart.
MTIME_TOLERANCE = timedelta(seconds=2)


@dataclass
class CurrentRun:
    """The steps of the run that wrote this tree last, and the steps of an older one.

    ``basis`` says how it was decided: ``pointer`` (the pointer file names a step), ``mtimes``
    (no usable pointer: the most recently written step stands in for it) or ``none`` (neither:
    every step counts as the current run's). ``head`` is the pointer's step, or the most
    recently written step. Steps above ``head`` are ``in_progress`` when written after it (or
    when their time is unknown: ckptctl then protects them) and ``stale`` when written before.
    """

    tree: "Tree" = field(repr=False)
    basis: str
    head: int | None
    head_name: str | None
    in_progress: list[Step] = field(default_factory=list)
    stale: list[Step] = field(default_factory=list)

    def includes(self, step: Step) -> bool:
        return self.head is None or step.step <= self.head or any(s is step for s in self.in_progress)

    @property
    def steps(self) -> list[Step]:
        return [s for s in self.tree.steps if self.includes(s)]

    @property
    def newest_complete(self) -> Step | None:
        complete = [s for s in self.steps if s.complete]
        return complete[-1] if complete else None

    def is_stale(self, step: Step) -> bool:
        return any(s is step for s in self.stale)

    def is_in_progress(self, step: Step) -> bool:
        return any(s is step for s in self.in_progress)

    def warnings(self) -> list[str]:
        out = []

        def names(steps: list[Step]) -> str:
            return ", ".join(s.name for s in steps)

        if self.basis == POINTER:
            if self.stale:
                out.append(f"step directories above the pointer ({self.head}) written before {self.head_name}: "
                           f"{names(self.stale)} (an older run's; prune keeps them unless --include-above-pointer)")
            if self.in_progress:
                out.append(f"step directories above the pointer ({self.head}) written after {self.head_name}: "
                           f"{names(self.in_progress)} (this run's save in progress, or one the pointer does not "
                           "name yet)")
        elif self.basis == MTIMES and self.stale:
            out.append(f"two runs in one tree: {names(self.stale)} were written before {self.head_name}, the most "
                       f"recently written step; steps up to {self.head} are taken as the current run and protected")
        return out

    def to_dict(self) -> dict:
        newest = self.newest_complete
        return {"basis": self.basis, "head": self.head,
                "in_progress": [s.step for s in self.in_progress], "stale": [s.step for s in self.stale],
                "newest_complete": newest.step if newest else None}


def find_current_run(tree: "Tree") -> CurrentRun:
    """Decide the current run of ``tree`` (see :class:`CurrentRun`)."""
    if tree.pointer_usable:
        head = tree.pointer.step
        target = tree.pointer_target
        # The target's newest file; without the target, the pointer file itself (written after it).
        reference = target.mtime if target is not None else next(
            (f.mtime for f in tree.files if f.path == POINTER_FILE), None)
        run = CurrentRun(tree, POINTER, head, target.name if target else f"{STEP_PREFIX}{head}")
        for step in tree.steps:
            if step.step <= head:
                continue
            # Near-ties and unknown times count as this run's: protected, never taken for stale.
            if reference is None or step.mtime is None or step.mtime >= reference - MTIME_TOLERANCE:
                run.in_progress.append(step)
            else:
                run.stale.append(step)
        return run
    if not tree.steps or any(s.mtime is None for s in tree.steps):
        return CurrentRun(tree, NO_BASIS, None, None)
    # The most recently written step, or a higher one written moments before it (same upload).
    newest = max(s.mtime for s in tree.steps)
    latest = max((s for s in tree.steps if s.mtime >= newest - MTIME_TOLERANCE), key=lambda s: s.step)
    run = CurrentRun(tree, MTIMES, latest.step, latest.name)
    run.stale = [s for s in tree.steps if s.step > latest.step]
    return run


# -- components ---------------------------------------------------------------------------

def _zero_byte_problems(files: list[FileEntry]) -> list[str]:
    return [f"zero-byte file {f.path}" for f in files if f.size == 0]


def _rank_list(ranks: list[int]) -> str:
    return ",".join(str(r) for r in sorted(ranks))


def _classify_fsdp_per_rank(comp: Component) -> None:
    by_kind: dict[str, dict[int, set[int]]] = defaultdict(lambda: defaultdict(set))
    for f in comp.files:
        m = FSDP_RANK_FILE_RE.match(f.path)
        if m:
            by_kind[m.group(1)][int(m.group(2))].add(int(m.group(3)))
    sizes = sorted({w for kinds in by_kind.values() for w in kinds})
    if len(sizes) > 1:
        comp.problems.append(f"rank files from several world sizes: {', '.join(map(str, sizes))}")
    world = sizes[-1]
    comp.world_size = world
    for kind in ("model", "optim", "extra_state"):
        ranks = by_kind.get(kind, {}).get(world, set())
        if kind != "model" and not ranks:
            continue  # absent for every rank: not saved (or dropped), which is consistent
        missing = sorted(set(range(world)) - ranks)
        if missing:
            comp.problems.append(f"missing {kind} rank files {_rank_list(missing)} of world size {world}")
        extra = sorted(r for r in ranks if r >= world)
        if extra:
            comp.problems.append(f"{kind} rank files {_rank_list(extra)} beyond world size {world}")
    comp.has_optimizer = bool(by_kind.get("optim", {}).get(world))


def _classify_fsdp_single(comp: Component, store: Store) -> None:
    names = {f.path for f in comp.files}
    comp.has_optimizer = FSDP_SINGLE_FILES["optim"] in names
    if "fsdp_config.json" in names:
        comp.world_size = read_fsdp_config_world_size(store, posixpath.join(comp.path, "fsdp_config.json"))


def read_fsdp_config_world_size(store: Store, rel: str) -> int | None:
    """World size from ``fsdp_config.json`` (SkyRL's and verl's variants), or None."""
    try:
        config = store.read_json(rel)
        return int(config["world_size"])
    except Exception:
        return None  # a broken config does not change what the file names say


def _classify_megatron(comp: Component, prefix: str) -> None:
    inner = [f for f in comp.files if f.path.startswith(prefix)]
    names = {f.path[len(prefix):] for f in inner}
    ranks = [int(m.group(1)) for n in names if (m := DISTCP_RE.match(n))]
    comp.world_size = max(ranks) + 1 if ranks else None
    comp.has_optimizer = True  # interleaved with the weights; cannot be told from names
    if "metadata.json" not in names:
        comp.problems.append(f"missing {prefix}metadata.json (written last by rank 0: save did not finish)")
    if ".metadata" not in names:
        comp.problems.append(f"missing {prefix}.metadata (torch DCP index)")
    if not ranks:
        comp.problems.append(f"no {prefix}*.distcp data files")


def _classify_hf(comp: Component) -> None:
    names = {f.path for f in comp.files}
    if "config.json" not in names:
        comp.problems.append("missing config.json")
    shards = [HF_SHARD_RE.match(n) for n in names]
    totals = {int(m.group(2)) for m in shards if m}
    if totals:
        total = max(totals)
        present = {int(m.group(1)) for m in shards if m and int(m.group(2)) == total}
        missing = sorted(set(range(1, total + 1)) - present)
        if missing:
            comp.problems.append(f"missing weight shards {_rank_list(missing)} of {total}")
        if "model.safetensors.index.json" not in names:
            comp.problems.append("missing model.safetensors.index.json")


def classify_component(store: Store, name: str, path: str, files: list[FileEntry]) -> Component:
    """Decide the backend and completeness of one model component from its file list."""
    comp = Component(name=name, path=path, backend=UNKNOWN, files=files)
    top = {f.path for f in files if "/" not in f.path}
    comp.has_hf_config = any(f.path == "huggingface/config.json" for f in files)
    comp.has_lora = any(f.path.startswith("lora_adapter/") for f in files)
    nested = {f.path.split("/", 1)[1] for f in files if f.path.startswith("dist_ckpt/")}

    if any(FSDP_RANK_FILE_RE.match(n) for n in top):
        comp.backend = FSDP
        _classify_fsdp_per_rank(comp)
    elif FSDP_SINGLE_FILES["model"] in top:
        comp.backend = FSDP_SINGLE
        _classify_fsdp_single(comp, store)
    elif {".metadata", "metadata.json"} & top or any(DISTCP_RE.match(n) for n in top):
        comp.backend = MEGATRON
        _classify_megatron(comp, "")
    elif {".metadata", "metadata.json"} & nested or any(DISTCP_RE.match(n) for n in nested):
        comp.backend = MEGATRON
        comp.nesting = "dist_ckpt"
        _classify_megatron(comp, "dist_ckpt/")
    elif any(n.endswith(".safetensors") for n in top):
        comp.backend = HF
        _classify_hf(comp)
    else:
        comp.problems.append("no model files recognised (FSDP rank files, Megatron .distcp, or safetensors)")
    comp.problems.extend(_zero_byte_problems(files))
    return comp


# -- steps and trees ----------------------------------------------------------------------

def classify_step(store: Store, name: str, number: int, files: list[FileEntry]) -> Step:
    """Build a :class:`Step` from the files below ``name`` (paths relative to the step dir).

    ``store`` is rooted at the step's parent; ``name`` is the step directory's name in it.
    """
    grouped, names = _split_top(files)
    components = {
        comp: classify_component(store, comp, posixpath.join(name, comp), grouped[comp])
        for comp in MODEL_COMPONENTS if grouped.get(comp)
    }
    step = Step(step=number, name=name, files=files, components=components)
    step.export = bool(components) and all(c.backend == HF for c in components.values()) \
        and not any(n in names for n in STEP_FILES)
    if "policy" not in components:
        step.problems.append("no policy/ directory")
    for comp in components.values():
        step.problems.extend(f"{comp.name}: {p}" for p in comp.problems)
    if not step.export:
        state = names.get("trainer_state.pt")
        if state is None:
            step.problems.append("missing trainer_state.pt")
        elif state.size == 0:
            step.problems.append("zero-byte trainer_state.pt")
        if "data.pt" not in names:
            step.notes.append("no data.pt: the data loader would restart from the beginning")
        elif names["data.pt"].size == 0:
            step.problems.append("zero-byte data.pt")
        if components and not step.has_optimizer:
            step.notes.append("model-only: optimizer state was not saved or was dropped")
    return step


def _split_top(files: list[FileEntry]) -> tuple[dict[str, list[FileEntry]], dict[str, FileEntry]]:
    """Files below each top-level directory (paths re-rooted there), and the top-level files."""
    by_top: dict[str, list[FileEntry]] = defaultdict(list)
    top_files: dict[str, FileEntry] = {}
    for f in files:
        head, _, rest = f.path.partition("/")
        if rest:
            by_top[head].append(FileEntry(rest, f.size, f.mtime))
        else:
            top_files[head] = f
    return by_top, top_files


def parse_pointer(text: str) -> Pointer:
    raw = text.strip()
    try:
        value = int(raw)
    except ValueError:
        shown = raw if len(raw) <= 40 else raw[:37] + "..."
        return Pointer(present=True, raw=raw, error=f"holds {shown!r}, not a step number")
    if value < 0:
        return Pointer(present=True, raw=raw, error=f"holds a negative step {value}")
    return Pointer(present=True, raw=raw, step=value)


def canonical_step_name(number: int) -> str:
    """The directory name SkyRL writes and opens for a step: ``global_step_{number}``."""
    return f"{STEP_PREFIX}{number}"


def parse_step_name(name: str) -> int | None:
    m = STEP_DIR_RE.match(name)
    return int(m.group(1)) if m else None


def scan_tree(store: Store, files: list[FileEntry] | None = None) -> Tree:
    """Discover the checkpoint (or export) tree rooted at ``store``: one listing, one pointer read.
    ``files``: the store's listing (``store.walk()``) when the caller already made it."""
    files = store.walk() if files is None else files
    by_top, top_files = _split_top(files)

    pointer = Pointer(present=False)
    if POINTER_FILE in top_files:
        pointer = parse_pointer(store.read_text(POINTER_FILE))

    steps: list[Step] = []
    unparsable: list[str] = []
    for name in sorted(by_top):
        if not name.startswith(STEP_PREFIX):
            continue
        number = parse_step_name(name)
        if number is None:
            unparsable.append(name)
            continue
        steps.append(classify_step(store, name, number, by_top[name]))
    steps.sort(key=lambda s: s.step)

    if not steps and not pointer.present:
        hint = ""
        if parse_step_name(store.name) is not None or any(n in top_files for n in STEP_FILES) \
                or any(c in by_top for c in MODEL_COMPONENTS):
            hint = " (it looks like a single step directory: pass its parent)"
        raise NotACheckpointError(
            f"{store.url}: not a checkpoint tree: no {STEP_PREFIX}N directories and no {POINTER_FILE}{hint}")

    kind = "export" if steps and all(s.export for s in steps) and not pointer.present else "checkpoints"
    return Tree(url=store.url, kind=kind, pointer=pointer, steps=steps,
                unparsable=unparsable, files=files)


def scan_step(store: Store) -> Step:
    """Classify a single step directory given by its own URL (for ``--resume-path``)."""
    files = store.walk()
    number = parse_step_name(store.name)
    parent = store.parent()
    return classify_step(parent, store.name, number if number is not None else -1, files)
