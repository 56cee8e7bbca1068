"""``resolve-resume``: what SkyRL would load on restart, by SkyRL's own rules, plus the checks
SkyRL skips.

SkyRL's rules (``RayPPOTrainer.load_checkpoints``), reproduced step by step:
- ``none``: start from scratch.
- ``latest``: no ``latest_ckpt_global_step.txt`` → start from scratch. Otherwise
  ``int(pointer.strip())`` (a garbage pointer raises), then every ``global_step_*`` directory
  name goes through ``int()`` (an unparsable one raises), and the highest step may exceed the
  pointer by at most ``ckpt_interval`` ("Inconsistent checkpoint folder").
- ``from_path``: ``resume_path`` must be set; its basename must contain ``global_step_`` and,
  when it starts with it, the rest must be an integer.
- Then the directory must exist and hold ``trainer_state.pt``; ``data.pt`` is optional.
ckptctl additionally requires the chosen step to be complete (one definition, see ``tree``)
and to still hold optimizer state; ``fallback`` names the newest step that passes.
"""

from __future__ import annotations

import posixpath
from dataclasses import dataclass, field

from ckptctl.errors import BucketNotFoundError, NotACheckpointError, NotFoundError, UsageError
from ckptctl.storage import Store, open_store
from ckptctl.tree import MODEL_COMPONENTS, POINTER_FILE, STEP_PREFIX, Step, Tree, scan_step, scan_tree

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

    @property
    def resumable(self) -> bool:
        """True when training can start as planned: from scratch, the chosen step, or the fallback."""
        if self.fallback_path:
            return True
        return self.action == SCRATCH or (self.action == RESUME and not self.problems)

    @property
    def reason(self) -> str | None:
        if self.resumable:
            return None
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


def _pick_fallback(tree: Tree, below: int | None, exclude: int | None) -> Step | None:
    candidates = [s for s in tree.steps
                  if s.step != exclude and (below is None or s.step <= below) and not _usable_problems(s)]
    return candidates[-1] if candidates else None


def _check_step(res: Resolution, step: Step) -> None:
    """SkyRL's own checks on the chosen directory, then ckptctl's."""
    if not step.has_file("trainer_state.pt"):
        res.action = FAIL
        res.skyrl_error = f"FileNotFoundError: Trainer state file not found: {res.path}/trainer_state.pt"
        return
    res.loads = _loads(res.path, step)
    res.problems = _usable_problems(step)
    res.warnings.extend(step.notes)


def _resolve_latest(res: Resolution, store: Store, ckpt_interval: int | None) -> Tree | None:
    try:
        tree = scan_tree(store)
    except BucketNotFoundError:
        raise
    except NotFoundError:
        res.action = SCRATCH
        res.warnings.append(f"{store.url} does not exist yet: SkyRL starts from scratch")
        return None
    except NotACheckpointError:
        res.action = SCRATCH
        res.warnings.append(f"{store.url} holds no checkpoints: SkyRL starts from scratch")
        return None
    res.tree = tree.url
    if not tree.pointer.present:
        res.action = SCRATCH
        if tree.steps:
            res.warnings.append(f"{len(tree.steps)} step directories exist but there is no {POINTER_FILE}: "
                                "SkyRL starts from scratch and ignores them")
        return tree
    if tree.pointer.error:
        res.action = FAIL
        res.skyrl_error = f"ValueError: invalid literal for int() in {POINTER_FILE}: {tree.pointer.raw!r}"
        return tree
    pointer = tree.pointer.step
    res.step = pointer
    res.path = store.url_of(f"{STEP_PREFIX}{pointer}")
    if tree.unparsable:
        res.action = FAIL
        res.skyrl_error = (f"ValueError: invalid literal for int() on step directory {tree.unparsable[0]} "
                           "(SkyRL parses every global_step_* name)")
        return tree
    highest = tree.steps[-1].step if tree.steps else None
    if highest is not None and highest > pointer:
        if ckpt_interval is None:
            res.warnings.append(f"highest step directory {highest} is above the pointer {pointer}: SkyRL fails "
                                f"with 'Inconsistent checkpoint folder' if the gap exceeds trainer.ckpt_interval "
                                f"(pass --ckpt-interval to check)")
        elif highest - pointer > ckpt_interval:
            res.action = FAIL
            res.skyrl_error = (f"ValueError: Inconsistent checkpoint folder: {POINTER_FILE} points to {pointer}, "
                               f"but global_step_{highest} exists ({highest - pointer} > ckpt_interval "
                               f"{ckpt_interval}); delete or move checkpoints from older runs")
            return tree
    step = tree.pointer_target
    if step is None:
        res.action = FAIL
        res.skyrl_error = f"FileNotFoundError: Checkpoint path not found: {res.path}"
        return tree
    res.action = RESUME
    _check_step(res, step)
    return tree


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
    if step.step < 0:
        res.action = FAIL
        res.skyrl_error = f"ValueError: invalid literal for int() with base 10: {base[len(STEP_PREFIX):]!r}"
        return None
    res.action = RESUME
    res.step = step.step
    _check_step(res, step)
    return store.parent()


def resolve_resume(url: str | None, *, mode: str = "latest", resume_path: str | None = None,
                   ckpt_interval: int | None = None, fallback: bool = False,
                   endpoint_url: str | None = None) -> Resolution:
    """Tell what SkyRL would load for ``trainer.resume_mode=mode`` and whether it is usable."""
    if mode not in MODES:
        raise UsageError(f"--mode must be one of {', '.join(MODES)}, not {mode!r}")
    if ckpt_interval is not None and ckpt_interval <= 0:
        raise UsageError("--ckpt-interval must be 1 or more")
    res = Resolution(mode=mode, tree=url, action=SCRATCH)
    if mode == "none":
        return res
    if mode == "latest":
        if not url:
            raise UsageError("--mode latest needs the checkpoint tree PATH (trainer.ckpt_path)")
        store = open_store(url, endpoint_url=endpoint_url)
        tree = _resolve_latest(res, store, ckpt_interval)
    else:
        store = _resolve_from_path(res, resume_path, endpoint_url)
        tree = None
        if fallback and not res.resumable and store is not None:
            try:
                tree = scan_tree(store)
            except (NotFoundError, NotACheckpointError):
                tree = None
    if fallback and not res.resumable and tree is not None:
        below = tree.pointer.step if mode == "latest" else None
        choice = _pick_fallback(tree, below, res.step)
        if choice is not None:
            res.fallback_step = choice.step
            res.fallback_path = store.url_of(choice.name)
            res.warnings.append(f"SkyRL itself would not load this; resume instead from {res.fallback_path} "
                                f"with trainer.resume_mode=from_path")
    return res
