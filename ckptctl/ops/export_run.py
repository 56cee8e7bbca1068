"""``export-hf TREE --out EXPORT_ROOT --steps all|latest|N[,M...]``: export a whole run at once.

Fills ``EXPORT_ROOT/global_step_N/policy`` (SkyRL's ``export_path`` layout, which ``list``,
``prune`` and ``verify`` read) one step at a time through :func:`ckptctl.ops.export.export_hf`, so
each step's output is committed atomically and verified exactly as a single export is. What is
already there decides the work, so rerunning after training added steps exports only the new ones:

- a step whose export is complete (every shard the index names, headers and sizes sound: the
  same deep check ``list --deep`` runs) is skipped; ``overwrite`` re-exports it;
- a damaged earlier export (a truncated or missing shard) is exported again in its place (only
  an HF model directory is ever replaced: foreign files there make that step fail);
- source steps are deep-checked before any work; an incomplete or damaged step named in
  ``--steps`` is refused by name before anything is written; with ``all`` such a step is reported
  (exit 1) while the others are exported, the current run's save in progress and an older run's
  steps (:class:`ckptctl.tree.CurrentRun`) are skipped and said so.

A step that fails (a CRC mismatch, a foreign destination) is reported and the others go on; the
run's exit code says whether everything asked for is now exported.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable

from ckptctl.errors import BucketNotFoundError, CkptctlError, NotFoundError, UsageError
from ckptctl.ops.distributed import PeerLostError
from ckptctl.ops.export import DTYPES, TREE, ExportSummary, Transfer, chosen_step, export_hf, locate
from ckptctl.output_dir import refuse_overlap
from ckptctl.storage import Store, open_store
from ckptctl.tree import MODEL_COMPONENTS, Step, Tree, canonical_step_name, scan_tree

ALL, LATEST = "all", "latest"

# What happened to each step, as shown and in --json.
EXPORTED = "exported"  # written now
REEXPORTED = "re-exported"  # an earlier export was damaged (or --overwrite): replaced
ALREADY = "already exported"  # a complete export is there: skipped
IN_PROGRESS = "in progress"  # the current run's save still being written: skipped
OLDER_RUN = "older run"  # above the pointer, written before it: skipped under `all`
REFUSED = "refused"  # incomplete or damaged source step
FAILED = "failed"  # its export raised an error
#: Outcomes that leave a requested step without its export: the run exits non-zero.
_NOT_DONE = (REFUSED, FAILED)


@dataclass
class StepExport:
    step: int
    name: str
    source: str
    destination: str
    status: str
    reason: str = ""
    exit_code: int = 0
    export: ExportSummary | None = None

    def to_dict(self) -> dict:
        out = {"step": self.step, "name": self.name, "source": self.source, "destination": self.destination,
               "status": self.status, "reason": self.reason}
        if self.exit_code:
            out["exit_code"] = self.exit_code
        if self.export is not None:
            out["export"] = self.export.to_dict()
        return out


@dataclass
class ExportRunSummary:
    source: str
    destination: str
    component: str
    steps_asked: str
    steps: list[StepExport] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    seconds: float = 0.0

    def count(self, *statuses: str) -> int:
        return sum(1 for s in self.steps if s.status in statuses)

    @property
    def exit_code(self) -> int:
        """0 when every step asked for is exported (now or before); else the one exit code the
        failures share, or 1."""
        codes = {s.exit_code or 1 for s in self.steps if s.status in _NOT_DONE}
        if not codes:
            return 0
        return codes.pop() if len(codes) == 1 else 1

    def to_dict(self) -> dict:
        return {"source": self.source, "destination": self.destination, "component": self.component,
                "steps_asked": self.steps_asked, "exit_code": self.exit_code,
                "exported": self.count(EXPORTED, REEXPORTED), "skipped": self.count(ALREADY, IN_PROGRESS, OLDER_RUN),
                "refused": self.count(REFUSED), "failed": self.count(FAILED),
                "steps": [s.to_dict() for s in self.steps], "warnings": list(self.warnings),
                "seconds": self.seconds}


def parse_steps(spec: str) -> str | list[int]:
    """``all``, ``latest`` or the step numbers of ``N[,M...]`` (ascending, no duplicates)."""
    text = spec.strip().lower()
    if text in (ALL, LATEST):
        return text
    numbers = []
    for part in text.split(","):
        part = part.strip().removeprefix("global_step_")
        if not part.isdigit():
            raise UsageError(f"--steps must be all, latest or step numbers like 100,200; not {spec!r}")
        numbers.append(int(part))
    return sorted(set(numbers))


def _step_named(tree: Tree, number: int) -> Step | None:
    """SkyRL's directory for ``number`` (``global_step_N``), else one holding it under another name."""
    name = canonical_step_name(number)
    return next((s for s in tree.steps if s.name == name), None) or tree.step(number)


def _existing_exports(dst: Store) -> dict[int, Step]:
    """The export steps already under EXPORT_ROOT (none when it does not exist or holds none);
    a checkpoint tree there is refused: its steps are not exports to be filled in."""
    try:
        tree = scan_tree(dst)
    except BucketNotFoundError:
        raise
    except NotFoundError:  # nothing there yet
        return {}
    except CkptctlError:  # a directory without global_step_N/ (NotACheckpointError): nothing exported yet
        return {}
    training = [s.name for s in tree.steps if not s.export and s.components]
    if tree.kind != "export" and (tree.pointer.present or training):
        what = f"training steps ({', '.join(training[:3])})" if training else "a checkpoint pointer file"
        raise UsageError(f"{dst.url}: refusing to export into a checkpoint tree (it holds {what}); "
                         "--out must be an export root")
    return {s.step: s for s in tree.steps if s.name == canonical_step_name(s.step)}


def _requested(tree: Tree, spec: str | list[int], src_url: str
               ) -> tuple[list[Step], list[tuple[Step, str, str]], list[str]]:
    """(steps to export, (step, status, why) of those passed over, warnings) for ``spec``."""
    run = tree.current_run
    warnings: list[str] = []
    if spec == LATEST:
        step = chosen_step(tree)
        if step is None:
            raise CkptctlError(f"{src_url}: no complete step to export")
        how = "the pointer target" if step is tree.pointer_target else "the newest complete step of the current run"
        warnings.append(f"latest: {step.name}, {how}")
        return [step], [], warnings
    if spec == ALL:
        chosen, passed = [], []
        for step in tree.steps:
            if run.is_stale(step):
                passed.append((step, OLDER_RUN, "an older run's step above the pointer (name it in --steps to "
                                                "export it)"))
            elif not step.complete and run.is_in_progress(step):
                passed.append((step, IN_PROGRESS, "the current run's save in progress: " + "; ".join(step.problems)))
            elif step.name != canonical_step_name(step.step) and any(
                    s.name == canonical_step_name(step.step) for s in tree.steps):
                warnings.append(f"{step.name}: holds step {step.step} too; {canonical_step_name(step.step)} is exported")
            else:
                chosen.append(step)
        return chosen, passed, warnings
    chosen, missing = [], []
    for number in spec:
        step = _step_named(tree, number)
        if step is None:
            missing.append(canonical_step_name(number))
        else:
            chosen.append(step)
            if run.is_stale(step):
                warnings.append(f"{step.name} is an older run's step (above the pointer, written before it)")
    if missing:
        have = ", ".join(str(s.step) for s in tree.steps) or "none"
        raise NotFoundError(f"{src_url}: no {', '.join(missing)} (steps there: {have})")
    return chosen, [], warnings


def _incomplete_reason(step: Step) -> str:
    return "incomplete: " + "; ".join(step.problems)


@dataclass
class _Todo:
    """A step the plan exports (or settles without exporting: ``result`` is set)."""

    step: int
    name: str
    source: str
    destination: str
    redo: bool = False
    why: str = ""
    result: StepExport | None = None


def export_run(src: str, out: str, *, steps: str, component: str | None = None, dtype: str = "auto",
               max_shard_size: str | int = "5GB", overwrite: bool = False, merge_lora: bool = False,
               verify: bool = True, endpoint_url: str | None = None, concurrency: int | None = None,
               max_memory: int | str | None = None,
               on_step: Callable[[StepExport], None] | None = None,
               progress: Callable[[int, int], None] | None = None,
               distributed: bool | None = None) -> ExportRunSummary:
    """Export ``component`` (default policy) of the steps ``steps`` (``all``, ``latest`` or
    ``N[,M...]``) of the checkpoint tree ``src`` to ``out/global_step_N/{component}``.

    ``on_step(result)`` is called as each step is settled; ``progress(done, total)`` after each
    tensor of the step being exported. The other arguments are :func:`export_hf`'s; ``overwrite``
    also re-exports steps whose export is already complete.

    ``distributed`` (default: under torchrun): process 0 makes the plan (the listings and deep
    checks) and sends it to the others; then every step is exported by all processes together,
    one after the other, as :func:`export_hf` shares one export. Every process returns the same
    summary; ``on_step`` and ``progress`` are called on process 0 only."""
    started = time.perf_counter()
    export_options = dict(component=component or "policy", dtype=dtype, max_shard_size=max_shard_size,
                          merge_lora=merge_lora, verify=verify, endpoint_url=endpoint_url, concurrency=concurrency,
                          max_memory=max_memory)
    if distributed is None:
        from ckptctl.ops.distributed import under_torchrun

        distributed = under_torchrun()
    if not distributed:
        summary, todo = _plan(src, out, steps=steps, overwrite=overwrite, **export_options)
        _execute(summary, todo, export_options, on_step, progress)
    else:
        from ckptctl.ops.distributed import error_payload, one_commit_mark, process_group, raise_payload

        with process_group() as pg, one_commit_mark(pg.rank == 0) as mark:
            planned: tuple = ("ok", None)
            if pg.rank == 0:
                try:
                    planned = ("ok", _plan(src, out, steps=steps, overwrite=overwrite, **export_options))
                except BaseException as exc:  # noqa: BLE001 - every process raises it
                    planned = ("error", error_payload(exc))
            planned = pg.broadcast(planned)
            if planned[0] == "error":
                raise_payload(planned[1])
            summary, todo = planned[1]
            first = pg.rank == 0
            _execute(summary, todo, export_options, on_step if first else None, progress if first else None)
            if first:
                mark()  # every step settled: a process failing on its way out now changes nothing
            pg.broadcast()
    summary.steps.sort(key=lambda r: r.step)
    summary.seconds = round(time.perf_counter() - started, 3)
    return summary


def _plan(src: str, out: str, *, steps: str, component: str, dtype: str, overwrite: bool, endpoint_url: str | None,
          concurrency: int | None, max_memory: int | str | None, **_) -> tuple[ExportRunSummary, list[_Todo]]:
    """The run's summary with the steps passed over already settled, and the steps to export
    (those settled without an export carry their ``result``)."""
    from ckptctl.formats.integrity import deep_check_steps

    Transfer.make(concurrency, max_memory)  # a bad value: a usage error before any step is settled
    spec = parse_steps(steps)
    if dtype not in DTYPES:
        raise UsageError(f"--dtype must be one of {', '.join(DTYPES)}, not {dtype!r}")
    if component not in MODEL_COMPONENTS:
        raise UsageError(f"--component must be policy or critic, not {component!r}")
    src_store = open_store(src, endpoint_url=endpoint_url)
    dst_store = open_store(out, endpoint_url=endpoint_url)
    refuse_overlap(src_store, dst_store)
    kind, tree, _ = locate(src_store)
    if kind != TREE:
        raise UsageError(f"{src_store.url}: --steps needs a checkpoint tree (the directory holding global_step_N/); "
                         "to export one step, pass it without --steps")
    summary = ExportRunSummary(source=src_store.url, destination=dst_store.url, component=component,
                               steps_asked=steps)
    chosen, passed, summary.warnings = _requested(tree, spec, src_store.url)

    def where(step: Step) -> tuple[str, str]:
        return src_store.url_of(step.name), dst_store.url_of(f"{canonical_step_name(step.step)}/{component}")

    # What is exported already (deep-checked: a truncated shard is redone, not skipped).
    exports = _existing_exports(dst_store)
    done_before = {n: s for n, s in exports.items() if s.step in {c.step for c in chosen} and s.complete}
    deep_check_steps(dst_store, list(done_before.values()))
    todo: list[tuple[Step, Step | None]] = []
    skipped = [StepExport(s.step, s.name, *where(s), status, why) for s, status, why in passed]
    for step in chosen:
        previous = exports.get(step.step)
        if previous is not None and previous.complete and component in previous.components and not overwrite:
            skipped.append(StepExport(step.step, step.name, *where(step), ALREADY))
        else:
            todo.append((step, previous))

    # Sources: complete by the listing, then deep-checked (one small read per file) before any work.
    deep_check_steps(src_store, [s for s, _ in todo if s.complete])
    bad = [s for s, _ in todo if not s.complete]
    if bad and spec != ALL:
        raise CkptctlError("refusing incomplete steps (nothing was exported): "
                           + "; ".join(f"{s.name}: {', '.join(s.problems)}" for s in bad))
    plan = [_Todo(r.step, r.name, r.source, r.destination, result=r) for r in sorted(skipped, key=lambda r: r.step)]
    for step, previous in todo:
        item = _Todo(step.step, step.name, *where(step))
        if not step.complete:
            item.result = StepExport(step.step, step.name, item.source, item.destination, REFUSED,
                                     _incomplete_reason(step), exit_code=1)
        elif component not in step.components:
            item.result = StepExport(step.step, step.name, item.source, item.destination, FAILED,
                                     f"no {component}/ component", exit_code=2)
        elif previous is not None and component in previous.components:
            item.redo = True
            item.why = ("replaced a complete export (--overwrite)" if previous.complete
                        else "replaced a damaged export: " + "; ".join(previous.problems))
        plan.append(item)
    return summary, plan


def _execute(summary: ExportRunSummary, plan: list[_Todo], export_options: dict,
             on_step: Callable[[StepExport], None] | None, progress: Callable[[int, int], None] | None) -> None:
    def settle(result: StepExport) -> None:
        summary.steps.append(result)
        if on_step:
            on_step(result)

    for item in plan:
        if item.result is not None:
            settle(item.result)
            continue
        try:
            exported = export_hf(item.source, item.destination, overwrite=item.redo, progress=progress,
                                 **export_options)
        except PeerLostError:
            raise  # another process of the run is gone: no step can follow
        except CkptctlError as exc:
            settle(StepExport(item.step, item.name, item.source, item.destination, FAILED, str(exc),
                              exit_code=exc.exit_code))
            continue
        settle(StepExport(item.step, item.name, item.source, item.destination, REEXPORTED if item.redo else EXPORTED,
                          item.why, export=exported))
