"""``resolve-resume``: what SkyRL would load on restart, by SkyRL's own rules, plus the checks
SkyRL skips.

SkyRL's rules (``RayPPOTrainer.load_checkpoints`` and ``validate_consistency_for_latest_checkpoint``),
reproduced step by step, listing, following and parsing what SkyRL does:
- ``none``: start from scratch.
- ``latest``: no ``latest_ckpt_global_step.txt`` → start from scratch. Otherwise
  ``int(pointer.strip())`` (an empty or garbage pointer raises) and the step directory is
  ``global_step_{that int}`` (so ``05`` opens ``global_step_5``, and a zero-padded
  ``global_step_05`` directory is never opened). Then the tree root is listed (``ls``): every
  entry whose name starts with ``global_step_`` and that is a directory (symlinks followed,
  empty ones included; files are skipped) goes through ``int(name.split("global_step_")[1])``
  (``global_step_9_tmp`` raises), and the highest may exceed the pointer by at most
  ``ckpt_interval`` ("Inconsistent checkpoint folder"). Older releases list with ``os.listdir``,
  files included: a FILE named ``global_step_*`` that would break them fails here too, with a
  note that newer releases skip it.
- ``from_path``: ``resume_path`` must be set; its basename must contain ``global_step_`` and,
  when it starts with it, the rest must be an integer.
- Then the directory must exist (a symlink is followed) and hold ``trainer_state.pt``;
  ``data.pt`` is optional.
ckptctl additionally requires the chosen step to be complete (one definition, see ``tree``),
its files to pass the deep check (:mod:`ckptctl.formats.integrity`) and to still hold optimizer
state; ``fallback`` names the newest step of the current run (:class:`ckptctl.tree.CurrentRun`)
that passes. ``require_checkpoint`` turns "start from scratch" into a failure.
"""

from __future__ import annotations

import posixpath
import re
from dataclasses import dataclass, field

from ckptctl.errors import BucketNotFoundError, NotACheckpointError, NotFoundError, UsageError
from ckptctl.storage import Store, open_store
from ckptctl.tree import (MODEL_COMPONENTS, POINTER_FILE, STEP_PREFIX, Step, Tree, canonical_step_name,
                          classify_step, scan_step, scan_tree)

MODES = ("latest", "from_path", "none")
RESUME = "resume"
SCRATCH = "scratch"
FAIL = "fail"


@dataclass
class Resolution:
    mode: str
    tree: str | None
    action: str  # what SkyRL would do: resume | scratch | fail
    path: str | None = None  # the step directory SkyRL would load
    step: int | None = None
    skyrl_error: str | None = None  # SkyRL's own reason when it would fail
    problems: list[str] = field(default_factory=list)  # ckptctl's checks on the chosen step
    warnings: list[str] = field(default_factory=list)
    loads: dict[str, str | None] = field(default_factory=dict)
    fallback_path: str | None = None
    fallback_step: int | None = None
    require_checkpoint: bool = False  # starting from scratch counts as a failure

    @property
    def resumable(self) -> bool:
        """True when training can start as planned: from scratch (unless a checkpoint is
        required), the chosen step, or the fallback."""
        if self.fallback_path:
            return True
        if self.action == SCRATCH:
            return not self.require_checkpoint
        return self.action == RESUME and not self.problems

    @property
    def reason(self) -> str | None:
        if self.resumable:
            return None
        if self.action == SCRATCH:
            return "nothing would be loaded: SkyRL would start from scratch (--require-checkpoint)"
        return self.skyrl_error or "; ".join(self.problems) or None

    def to_dict(self) -> dict:
        return {
            "mode": self.mode,
            "tree": self.tree,
            "skyrl_action": self.action,
            "resume_path": self.path,
            "step": self.step,
            "skyrl_error": self.skyrl_error,
            "problems": list(self.problems),
            "warnings": list(self.warnings),
            "loads": dict(self.loads),
            "fallback": ({"resume_path": self.fallback_path, "step": self.fallback_step,
                          "overrides": [f"trainer.resume_mode=from_path",
                                        f"trainer.resume_path={self.fallback_path}"]}
                         if self.fallback_path else None),
            "require_checkpoint": self.require_checkpoint,
            "resumable": self.resumable,
            "reason": self.reason,
        }


def _usable_problems(step: Step) -> list[str]:
    problems = list(step.problems)
    if step.complete and not step.has_optimizer:
        problems.append("optimizer state is missing (model-only checkpoint): SkyRL's load would fail")
    return problems


def _loads(url: str, step: Step) -> dict[str, str | None]:
    out = {"trainer_state": posixpath.join(url, "trainer_state.pt"),
           "data": posixpath.join(url, "data.pt") if step.has_file("data.pt") else None}
    for name in MODEL_COMPONENTS:
        out[name] = posixpath.join(url, name) if name in step.components else None
    return out


def _deep_checked_problems(store: Store, step: Step) -> list[str]:
    """:func:`_usable_problems` after the deep check of the step's files (``store``: the tree)."""
    from ckptctl.formats.integrity import deep_check_step

    if not _usable_problems(step):
        deep_check_step(store, step)
    return _usable_problems(step)


def _pick_fallback(store: Store, tree: Tree, exclude: str | None) -> Step | None:
    """The newest step of the current run that is usable, deep check included (never an older
    run's higher step)."""
    for step in reversed(tree.current_run.steps):
        if step.name != exclude and not _usable_problems(step) and not _deep_checked_problems(store, step):
            return step
    return None


def _check_step(res: Resolution, store: Store, step: Step) -> None:
    """SkyRL's own checks on the chosen directory, then ckptctl's (``store``: its parent)."""
    if not step.has_file("trainer_state.pt"):
        res.action = FAIL
        res.skyrl_error = f"FileNotFoundError: Trainer state file not found: {res.path}/trainer_state.pt"
        return
    res.loads = _loads(res.path, step)
    res.problems = _deep_checked_problems(store, step)
    res.warnings.extend(step.notes)


def skyrl_step_number(name: str) -> int:
    """SkyRL's ``extract_step_from_path`` on a directory name: ``int()`` of what follows
    ``global_step_`` (raising ValueError as SkyRL does), -1 when the name does not start with it."""
    if name.startswith(STEP_PREFIX):
        return int(name.split(STEP_PREFIX)[1])
    return -1


def _highest_listed(names: list[str]) -> tuple[int | None, str | None]:
    """(highest step among ``names``, None) the way SkyRL parses them, or (None, its error)."""
    values = []
    for name in names:
        try:
            values.append(skyrl_step_number(name))
        except ValueError as exc:
            return None, f"ValueError: {exc} (SkyRL parses every {STEP_PREFIX}* name; here {name})"
    return (max(values) if values else None), None


def _inconsistent(pointer: int, highest: int, interval: int) -> str:
    return (f"ValueError: Inconsistent checkpoint folder: {POINTER_FILE} points to {pointer}, but "
            f"{canonical_step_name(highest)} exists ({highest - pointer} > ckpt_interval {interval}); "
            "delete or move checkpoints from older runs")


_SCHEME_TYPO = re.compile(r"^(s3|s3a|gs|gcs):/(?!/)", re.IGNORECASE)


def _missing_path_warning(typed: str) -> str:
    text = f"{typed} does not exist: SkyRL starts from scratch and nothing is loaded"
    match = _SCHEME_TYPO.match(typed)
    if match:
        text += f" (did you mean {match.group(1)}://{typed[match.end():]}?)"
    return text


def _resolve_latest(res: Resolution, store: Store, ckpt_interval: int | None, typed: str) -> Tree | None:
    try:
        tree = scan_tree(store)
    except BucketNotFoundError:
        raise
    except NotFoundError:
        res.action = SCRATCH
        res.warnings.append(_missing_path_warning(typed))
        return None
    except NotACheckpointError:
        res.action = SCRATCH
        res.warnings.append(f"{typed} holds no checkpoints: SkyRL starts from scratch")
        return None
    res.tree = tree.url
    res.warnings.extend(tree.current_run.warnings())
    if not tree.pointer.present:
        res.action = SCRATCH
        if tree.steps:
            res.warnings.append(f"{len(tree.steps)} step directories exist but there is no {POINTER_FILE}: "
                                "SkyRL starts from scratch and ignores them")
        return tree
    try:
        pointer = int(tree.pointer.raw)  # SkyRL: int(f.read().strip())
    except ValueError as exc:
        res.action = FAIL
        res.skyrl_error = f"ValueError: {exc} (in {POINTER_FILE})"
        return tree
    name = canonical_step_name(pointer)
    res.step = pointer
    res.path = store.url_of(name)
    # SkyRL lists the root (ls) and keeps the global_step_* entries that are directories.
    entries = dict(store.list_dir())
    dirs = [n for n, is_dir in entries.items() if n.startswith(STEP_PREFIX) and is_dir]
    highest, error = _highest_listed(dirs)
    if error is None and highest is not None and ckpt_interval is not None and highest - pointer > ckpt_interval:
        error = _inconsistent(pointer, highest, ckpt_interval)
    files = [n for n, is_dir in entries.items() if n.startswith(STEP_PREFIX) and not is_dir]
    if error is None and files:
        # Older releases list with os.listdir: files too.
        old_highest, old_error = _highest_listed(dirs + files)
        if old_error is None and old_highest is not None and ckpt_interval is not None \
                and old_highest - pointer > ckpt_interval:
            old_error = _inconsistent(pointer, old_highest, ckpt_interval)
        if old_error is not None:
            error = (f"{old_error} -- older SkyRL releases count the FILE{'S' if len(files) > 1 else ''} "
                     f"{', '.join(files)} (newer ones skip files); remove or rename it")
        else:
            res.warnings.append(f"files named like steps ({', '.join(files)}): SkyRL skips them (older releases "
                                "count them as steps)")
    if error is not None:
        res.action = FAIL
        res.skyrl_error = error
        return tree
    if highest is not None and highest > pointer and ckpt_interval is None:
        res.warnings.append(f"highest step directory {highest} is above the pointer {pointer}: SkyRL fails "
                            f"with 'Inconsistent checkpoint folder' if the gap exceeds trainer.ckpt_interval "
                            f"(pass --ckpt-interval to check)")
    # SkyRL's exists(): a listed entry that is no directory may be a file, or a dangling link.
    if name not in entries or (not entries[name] and not store.exists(name)):
        res.action = FAIL
        res.skyrl_error = f"FileNotFoundError: Checkpoint path not found: {res.path}"
        other = tree.step(pointer)
        if other is not None:
            res.warnings.append(f"{other.name} holds step {pointer}, but SkyRL opens {name} (it builds the name "
                                f"from the number): rename {other.name} to {name}")
        return tree
    step = tree.pointer_target
    if step is None:  # listed by SkyRL, not by the tree walk: a symlink, an empty directory or a file
        step = _scan_listed_step(store, name, pointer, is_dir=entries[name])
    res.action = RESUME
    _check_step(res, store, step)
    return tree


def _scan_listed_step(store: Store, name: str, number: int, *, is_dir: bool) -> Step:
    """A step directory the tree's walk did not enter (a symlink SkyRL follows, or an empty
    directory), classified from a walk of its own."""
    files = []
    if is_dir:
        try:
            files = store.child(name).walk()
        except NotFoundError:
            files = []  # an empty directory (a marker object on S3/GCS)
    return classify_step(store, name, number, files)


def _resolve_from_path(res: Resolution, resume_path: str | None, endpoint_url: str | None) -> Store | None:
    """Resolve ``from_path``; returns the step's parent store (where a fallback is looked for)."""
    if not resume_path:
        res.action = FAIL
        res.skyrl_error = "ValueError: `trainer.resume_path` must be specified when resume_mode is 'from_path'"
        return None
    path = resume_path.rstrip("/")
    base = posixpath.basename(path)
    res.path = path
    if STEP_PREFIX not in base:
        res.action = FAIL
        res.skyrl_error = (f"ValueError: `trainer.resume_path` must point to a directory whose name starts "
                           f"with {STEP_PREFIX}, got: {path}")
        return None
    if "://" in path:
        res.warnings.append("SkyRL releases up to 0.3.1 pass resume_path through pathlib, which breaks "
                            "s3:// and gs:// URIs (s3://b becomes s3:/b); newer releases read them directly")
    store = open_store(path, endpoint_url=endpoint_url)
    try:
        step = scan_step(store)
    except BucketNotFoundError:
        raise
    except NotFoundError:
        res.action = FAIL
        res.skyrl_error = f"FileNotFoundError: Checkpoint path not found: {path}"
        return None
    res.path = store.url
    if not base.startswith(STEP_PREFIX):
        res.action = FAIL
        res.skyrl_error = f"ValueError: Checkpoint path {path} is not a valid checkpoint path"
        return None
    try:
        number = skyrl_step_number(base)
    except ValueError as exc:
        res.action = FAIL
        res.skyrl_error = f"ValueError: {exc}"
        return None
    step.step = number
    res.action = RESUME
    res.step = number
    _check_step(res, store.parent(), step)
    return store.parent()


def resolve_resume(url: str | None, *, mode: str = "latest", resume_path: str | None = None,
                   ckpt_interval: int | None = None, fallback: bool = False, require_checkpoint: bool = False,
                   endpoint_url: str | None = None) -> Resolution:
    """Tell what SkyRL would load for ``trainer.resume_mode=mode`` and whether it is usable.

    ``require_checkpoint``: starting from scratch (nothing to load) is not resumable."""
    if mode not in MODES:
        raise UsageError(f"--mode must be one of {', '.join(MODES)}, not {mode!r}")
    if ckpt_interval is not None and ckpt_interval <= 0:
        raise UsageError("--ckpt-interval must be 1 or more")
    res = Resolution(mode=mode, tree=url, action=SCRATCH, require_checkpoint=require_checkpoint)
    if mode == "none":
        return res
    if mode == "latest":
        if not url:
            raise UsageError("--mode latest needs the checkpoint tree PATH (trainer.ckpt_path)")
        store = open_store(url, endpoint_url=endpoint_url)
        tree = _resolve_latest(res, store, ckpt_interval, url)
    else:
        store = _resolve_from_path(res, resume_path, endpoint_url)
        tree = None
        if fallback and not res.resumable and store is not None:
            try:
                tree = scan_tree(store)
            except (NotFoundError, NotACheckpointError):
                tree = None
    if fallback and not res.resumable and tree is not None:
        chosen = posixpath.basename(res.path) if res.action == RESUME and res.path else None
        choice = _pick_fallback(store, tree, chosen)
        if choice is not None:
            res.fallback_step = choice.step
            res.fallback_path = store.url_of(choice.name)
            res.warnings.append(f"SkyRL itself would not load this; resume instead from {res.fallback_path} "
                                f"with trainer.resume_mode=from_path")
    return res
