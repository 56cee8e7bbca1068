"""``prune``: keep the newest N complete checkpoints (and every K-th), delete the rest.

Unlike SkyRL's ``max_ckpts_to_keep`` (which sorts ``global_step_*`` names and deletes all but
the N highest, with no completeness check), the plan here:
- counts only COMPLETE steps towards N, and only steps at or below the pointer, so stale
  higher-numbered directories from an older run cannot push the current run's checkpoints out;
- never deletes the pointer target or the newest complete step (``--keep 0`` is safe);
- never deletes an incomplete step newer than the newest complete one (a save may still be
  running) unless ``include_in_progress``, nor a step above the pointer unless
  ``include_above_pointer``;
- touches nothing but the files of ``global_step_N`` directories it listed: unparsable names,
  the pointer file and anything else in the tree stay.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from ckptctl.errors import AbortedError, UsageError
from ckptctl.storage import Store, open_store
from ckptctl.tree import MEGATRON, Step, Tree, scan_tree

KEEP = "keep"
DELETE = "delete"
DROP_OPTIMIZER = "drop-optimizer"

# Deleted first, so a deletion cut short leaves a step that reads as incomplete, not complete.
_COMMIT_MARKERS = ("trainer_state.pt", "metadata.json")


@dataclass
class StepDecision:
    step: int
    name: str
    action: str  # keep | delete | drop-optimizer
    reasons: list[str]
    files: list[str] = field(default_factory=list)  # relative to the tree root
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
            "steps": [d.to_dict() for d in self.decisions],
            "kept": [d.step for d in self.decisions if d.action == KEEP],
            "deleted": [d.step for d in self.decisions if d.action == DELETE],
            "optimizer_dropped": [d.step for d in self.decisions if d.action == DROP_OPTIMIZER],
            "files_to_delete": len(self.files_to_delete),
            "bytes_freed": self.bytes_freed,
            "notes": list(self.notes),
        }


@dataclass
class PruneResult:
    plan: PrunePlan
    deleted_files: int
    dry_run: bool

    def to_dict(self) -> dict:
        return {**self.plan.to_dict(), "dry_run": self.dry_run, "deleted_files": self.deleted_files}


def _keep_reasons(tree: Tree, keep: int, keep_every: int | None, include_in_progress: bool,
                  include_above_pointer: bool) -> dict[int, list[str]]:
    reasons: dict[int, list[str]] = {s.step: [] for s in tree.steps}
    pointer = tree.pointer.step
    newest = tree.newest_complete
    if tree.pointer_target is not None:
        reasons[tree.pointer_target.step].append("pointer target")
    if newest is not None:
        reasons[newest.step].append("newest complete")
    in_run = [s for s in tree.steps if pointer is None or s.step <= pointer]
    for s in [s for s in in_run if s.complete][-keep:] if keep > 0 else []:
        reasons[s.step].append(f"among newest {keep} complete")
    if keep_every:
        for s in tree.steps:
            if s.complete and s.step % keep_every == 0:
                reasons[s.step].append(f"every {keep_every}th step")
    for s in tree.steps:
        if not s.complete and (newest is None or s.step > newest.step) and not include_in_progress:
            reasons[s.step].append("incomplete and newer than the newest complete step (may still be written)")
        if pointer is not None and s.step > pointer and not include_above_pointer:
            reasons[s.step].append("above the pointer (older run or save in progress)")
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
    plan = PrunePlan(url=tree.url, keep=keep, keep_every=keep_every, drop_optimizer=drop_optimizer, decisions=[])
    for step in tree.steps:
        plan.decisions.append(_decide(step, keep_reasons[step.step], drop_optimizer))
    if tree.unparsable:
        plan.notes.append("left alone (unparsable names): " + ", ".join(tree.unparsable))
    return plan


def _decide(step: Step, keep_reasons: list[str], drop_optimizer: bool) -> StepDecision:
    decision = StepDecision(step=step.step, name=step.name, action=KEEP, reasons=keep_reasons,
                            complete=step.complete)
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
        decision.files = files
        decision.bytes = sum(sizes.get(f, 0) for f in files)
        return decision
    decision.action = DELETE
    decision.reasons = ["not kept" if step.complete else "incomplete, older than the newest complete step"]
    ordered = sorted(step.files, key=lambda f: (f.name not in _COMMIT_MARKERS, f.path))
    decision.files = [f"{step.name}/{f.path}" for f in ordered]
    decision.bytes = step.bytes
    return decision


def execute_prune(store: Store, plan: PrunePlan) -> int:
    """Delete exactly the files the plan lists (batched); returns how many were deleted."""
    return store.delete_many(plan.files_to_delete)


def prune(url: str, *, keep: int, keep_every: int | None = None, drop_optimizer: bool = False,
          include_in_progress: bool = False, include_above_pointer: bool = False, dry_run: bool = False,
          confirm=None, endpoint_url: str | None = None) -> PruneResult:
    """Plan and (unless ``dry_run``) carry out a prune.

    ``confirm``, when given, is called with the plan before anything is deleted; returning
    False aborts with nothing deleted.
    """
    store = open_store(url, endpoint_url=endpoint_url)
    tree = scan_tree(store)
    plan = plan_prune(tree, keep=keep, keep_every=keep_every, drop_optimizer=drop_optimizer,
                      include_in_progress=include_in_progress, include_above_pointer=include_above_pointer)
    if dry_run or not plan.files_to_delete:
        return PruneResult(plan=plan, deleted_files=0, dry_run=dry_run)
    if confirm is not None and not confirm(plan):
        raise AbortedError("aborted: nothing was deleted")
    return PruneResult(plan=plan, deleted_files=execute_prune(store, plan), dry_run=False)
