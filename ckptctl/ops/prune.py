"""``prune``: keep the newest N complete checkpoints (and every K-th), delete the rest.

Unlike SkyRL's ``max_ckpts_to_keep`` (which sorts ``global_step_*`` names and deletes all but
the N highest, with no completeness check), the plan here:
- counts only COMPLETE steps of the CURRENT RUN towards N (:class:`ckptctl.tree.CurrentRun`):
  an older run's higher-numbered steps cannot push the current run's checkpoints out, and are
  kept unless ``include_above_pointer``; steps the current run wrote after the pointer target
  (a save in progress) are never taken for an older run's;
- deep-checks the steps it counts as complete (file sizes against their own indexes,
  :mod:`ckptctl.formats.integrity`), so a truncated file never makes a damaged step be kept
  in place of a good one;
- never deletes the pointer target or the current run's newest complete step (``--keep 0`` is
  safe), nor an incomplete step newer than that (a save may be running) unless
  ``include_in_progress``;
- refuses to delete anything from a checkpoint tree whose pointer file is missing or unusable
  unless ``without_pointer`` (the current run is then decided from modification times);
- touches nothing but the files of ``global_step_N`` directories it listed: unparsable names,
  the pointer file and anything else in the tree stay;
- deletes every doomed step's commit markers (``trainer_state.pt``, Megatron's
  ``metadata.json``, an export's ``config.json``) in requests of their own before any other
  file, so a prune cut short leaves steps that read as incomplete, never as complete.
"""

from __future__ import annotations

import posixpath
from dataclasses import dataclass, field

from ckptctl.errors import AbortedError, CkptctlError, PartialDeleteError, UsageError
from ckptctl.storage import Store, open_store
from ckptctl.tree import HF, MANIFEST_FILE, MEGATRON, POINTER, POINTER_FILE, Step, Tree, scan_tree

KEEP = "keep"
DELETE = "delete"
DROP_OPTIMIZER = "drop-optimizer"


@dataclass
class StepDecision:
    step: int
    name: str
    action: str  # keep | delete | drop-optimizer
    reasons: list[str]
    protected: bool = False  # kept for a reason of its own (not merely left alone by --drop-optimizer)
    files: list[str] = field(default_factory=list)  # relative to the tree root, commit markers first
    markers: list[str] = field(default_factory=list)  # the files among ``files`` that make the step complete
    bytes: int = 0
    complete: bool = True

    def to_dict(self) -> dict:
        return {"step": self.step, "name": self.name, "action": self.action, "reasons": self.reasons,
                "complete": self.complete, "files": len(self.files), "bytes": self.bytes}


@dataclass
class PrunePlan:
    url: str
    keep: int
    keep_every: int | None
    drop_optimizer: bool
    decisions: list[StepDecision]
    notes: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)  # the tree's: pointer, two runs, names
    current_run: dict = field(default_factory=dict)

    @property
    def files_to_delete(self) -> list[str]:
        return [f for d in self.decisions if d.action != KEEP for f in d.files]

    @property
    def bytes_freed(self) -> int:
        return sum(d.bytes for d in self.decisions if d.action != KEEP)

    def to_dict(self) -> dict:
        return {
            "url": self.url,
            "keep": self.keep,
            "keep_every": self.keep_every,
            "drop_optimizer": self.drop_optimizer,
            "current_run": dict(self.current_run),
            "steps": [d.to_dict() for d in self.decisions],
            "kept": [d.step for d in self.decisions if d.action == KEEP],
            "deleted": [d.step for d in self.decisions if d.action == DELETE],
            "optimizer_dropped": [d.step for d in self.decisions if d.action == DROP_OPTIMIZER],
            "files_to_delete": len(self.files_to_delete),
            "bytes_freed": self.bytes_freed,
            "notes": list(self.notes),
            "warnings": list(self.warnings),
        }


@dataclass
class PruneResult:
    plan: PrunePlan
    deleted_files: int
    dry_run: bool

    def to_dict(self) -> dict:
        return {**self.plan.to_dict(), "dry_run": self.dry_run, "deleted_files": self.deleted_files}


def _keep_reasons(tree: Tree, keep: int, keep_every: int | None, include_in_progress: bool,
                  include_above_pointer: bool) -> dict[str, list[str]]:
    """Why each step (by directory name: ``global_step_05`` and ``global_step_5`` are two) is kept."""
    reasons: dict[str, list[str]] = {s.name: [] for s in tree.steps}
    run = tree.current_run
    target = tree.pointer_target
    newest = run.newest_complete
    if target is not None:
        reasons[target.name].append("pointer target")
    if newest is not None:
        reasons[newest.name].append("newest complete")
    current_complete = [s for s in run.steps if s.complete]
    for s in current_complete[-keep:] if keep > 0 else []:
        reasons[s.name].append(f"among newest {keep} complete")
    if keep_every:
        for s in tree.steps:
            if s.complete and s.step % keep_every == 0:
                reasons[s.name].append(f"every {keep_every}th step")
    for s in tree.steps:
        if run.is_stale(s):
            if not include_above_pointer:
                reasons[s.name].append(f"older run: written before {run.head_name} "
                                       + ("(above the pointer)" if run.basis == POINTER
                                          else "(the most recently written step)"))
        elif run.is_in_progress(s):
            if not s.complete and not include_in_progress:
                reasons[s.name].append(f"save in progress: written after {run.head_name} (above the pointer)")
        elif not s.complete and (newest is None or s.step > newest.step) and not include_in_progress:
            reasons[s.name].append("incomplete and newer than the newest complete step (may still be written)")
    return reasons


def plan_prune(tree: Tree, *, keep: int, keep_every: int | None = None, drop_optimizer: bool = False,
               include_in_progress: bool = False, include_above_pointer: bool = False) -> PrunePlan:
    """Decide, per step, whether to keep it, delete it, or delete only its optimizer files."""
    if keep < 0:
        raise UsageError("--keep must be 0 or more")
    if keep_every is not None and keep_every <= 0:
        raise UsageError("--keep-every must be 1 or more")
    if tree.kind == "export" and drop_optimizer:
        raise UsageError(f"{tree.url} is an export tree: it holds no optimizer state")
    keep_reasons = _keep_reasons(tree, keep, keep_every, include_in_progress, include_above_pointer)
    plan = PrunePlan(url=tree.url, keep=keep, keep_every=keep_every, drop_optimizer=drop_optimizer, decisions=[],
                     warnings=tree.warnings(), current_run=tree.current_run.to_dict())
    for step in tree.steps:
        plan.decisions.append(_decide(step, keep_reasons[step.name], drop_optimizer))
    if tree.unparsable:
        plan.notes.append("left alone (unparsable names): " + ", ".join(tree.unparsable))
    return plan


def commit_markers(step: Step) -> list[str]:
    """The files of ``step`` (relative to it) whose absence makes it read as incomplete:
    ``trainer_state.pt``, each Megatron component's ``metadata.json``, an export's ``config.json``."""
    present = {f.path for f in step.files}
    markers = ["trainer_state.pt"]
    for comp in step.components.values():
        if comp.backend == MEGATRON:
            markers.append(posixpath.join(comp.name, comp.nesting, "metadata.json"))
        elif comp.backend == HF:
            markers.append(posixpath.join(comp.name, "config.json"))
    return [m for m in markers if m in present]


def _decide(step: Step, keep_reasons: list[str], drop_optimizer: bool) -> StepDecision:
    decision = StepDecision(step=step.step, name=step.name, action=KEEP, reasons=keep_reasons,
                            protected=bool(keep_reasons), complete=step.complete)
    if keep_reasons:
        return decision
    if drop_optimizer:
        files = [f"{c.path}/{p}" for c in step.components.values() for p in c.optimizer_files]
        if not files:
            megatron = any(c.backend == MEGATRON for c in step.components.values())
            why = ("Megatron keeps optimizer state inside the weight .distcp files"
                   if megatron else "no optimizer files")
            decision.reasons = [f"not kept, but {why}"]
            return decision
        sizes = {f"{step.name}/{f.path}": f.size for f in step.files}
        decision.action = DROP_OPTIMIZER
        decision.reasons = ["not kept: optimizer files only"]
        # A manifest listing the dropped files would no longer describe the step: it goes first.
        manifests = [f"{step.name}/{f.path}" for f in step.files if posixpath.basename(f.path) == MANIFEST_FILE
                     and f.path.count("/") <= 1]
        if manifests:
            decision.reasons.append(f"its {MANIFEST_FILE} too (it lists them)")
        decision.markers = manifests
        decision.files = manifests + files
        decision.bytes = sum(sizes.get(f, 0) for f in decision.files)
        return decision
    decision.action = DELETE
    decision.reasons = ["not kept" if step.complete else "incomplete, older than the newest complete step"]
    markers = commit_markers(step)
    decision.markers = [f"{step.name}/{m}" for m in markers]
    decision.files = decision.markers + [f"{step.name}/{f.path}" for f in step.files if f.path not in markers]
    decision.bytes = step.bytes
    return decision


def execute_prune(store: Store, plan: PrunePlan) -> int:
    """Delete exactly the files the plan lists; returns how many were deleted.

    Every doomed step's commit markers go first, in requests of their own (a client library may
    reorder the objects within one batch: gcsfs sorts them), then the rest, batched. When the
    store fails part-way, the error says what is already gone.
    """
    markers = [m for d in plan.decisions if d.action != KEEP for m in d.markers]
    marked = set(markers)
    rest = [f for f in plan.files_to_delete if f not in marked]
    deleted = 0
    phase = markers
    try:
        deleted += store.delete_many(markers)
        phase = rest
        deleted += store.delete_many(rest)
    except CkptctlError as exc:
        done = deleted + (exc.deleted if isinstance(exc, PartialDeleteError) else 0)
        raise _interrupted(plan, exc, done, markers_done=phase is rest or done >= len(markers) > 0,
                           markers_deleted=min(done, len(markers))) from exc
    return deleted


def _interrupted(plan: PrunePlan, exc: CkptctlError, done: int, *, markers_done: bool,
                 markers_deleted: int) -> PartialDeleteError:
    total = len(plan.files_to_delete)
    touched = [d for d in plan.decisions if d.action != KEEP]
    if markers_done:
        opened = [d.step for d in touched if d.markers and d.action == DELETE]
    else:  # the markers go in plan order: the first ``markers_deleted`` of them are gone
        opened, seen = [], 0
        for d in touched:
            if d.markers and seen < markers_deleted and d.action == DELETE:
                opened.append(d.step)
            seen += len(d.markers)
    what = f"{done} of {total} files were already deleted"
    if opened:
        what += (f"; steps {', '.join(map(str, opened))} now read as incomplete (their commit markers went first)")
    return PartialDeleteError(f"prune of {plan.url} stopped: {what}; rerun the same prune to finish. Cause: {exc}",
                              deleted=done, exit_code=exc.exit_code)


def _deep_check_kept(store: Store, tree: Tree, plan_args: dict) -> PrunePlan:
    """Plan, deep-check the complete steps the plan keeps, and plan again until those pass.

    A step whose files fail the check becomes incomplete, so the next plan keeps an older good
    step in its place (and checks that one too)."""
    from ckptctl.formats.integrity import deep_check_steps

    checked: set[str] = set()
    while True:
        plan = plan_prune(tree, **plan_args)
        kept = {d.name for d in plan.decisions if d.protected and d.complete}
        todo = [s for s in tree.steps if s.name in kept and s.name not in checked]
        if not todo:
            return plan
        checked.update(s.name for s in todo)
        found = deep_check_steps(store, todo)
        if not any(found.values()):
            return plan


def prune(url: str, *, keep: int, keep_every: int | None = None, drop_optimizer: bool = False,
          include_in_progress: bool = False, include_above_pointer: bool = False, without_pointer: bool = False,
          dry_run: bool = False, confirm=None, endpoint_url: str | None = None) -> PruneResult:
    """Plan and (unless ``dry_run``) carry out a prune.

    ``confirm``, when given, is called with the plan before anything is deleted; returning
    False aborts with nothing deleted. ``without_pointer`` allows deleting from a checkpoint
    tree whose pointer file is missing or unusable.
    """
    store = open_store(url, endpoint_url=endpoint_url)
    tree = scan_tree(store)
    plan = _deep_check_kept(store, tree, dict(
        keep=keep, keep_every=keep_every, drop_optimizer=drop_optimizer,
        include_in_progress=include_in_progress, include_above_pointer=include_above_pointer))
    if dry_run or not plan.files_to_delete:
        return PruneResult(plan=plan, deleted_files=0, dry_run=dry_run)
    if tree.kind == "checkpoints" and not tree.pointer_usable and not without_pointer:
        state = "missing" if not tree.pointer.present else f"unusable ({tree.pointer.error})"
        raise UsageError(f"{store.url}: {POINTER_FILE} is {state}, so the current run is a guess from modification "
                         "times; refusing to delete without --without-pointer (see the plan with --dry-run)")
    if confirm is not None and not confirm(plan):
        raise AbortedError("aborted: nothing was deleted")
    return PruneResult(plan=plan, deleted_files=execute_prune(store, plan), dry_run=False)
