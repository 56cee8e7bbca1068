"""Human renderings (rich tables and trees) of the operations' results."""

from __future__ import annotations

from rich.console import Console
from rich.table import Table

from ckptctl.ops.prune import DELETE, DROP_OPTIMIZER, PruneResult
from ckptctl.ops.resume import FAIL, RESUME, SCRATCH, Resolution
from ckptctl.output import human_bytes, human_time
from ckptctl.tree import Tree


def render_tree(console: Console, tree: Tree) -> None:
    newest = tree.newest_complete
    target = tree.pointer_target
    title = f"{tree.url}  ({'HF export tree' if tree.kind == 'export' else 'checkpoint tree'})"
    table = Table(title=title, title_justify="left", show_lines=False)
    for col, kw in (("step", {"justify": "right"}), ("mark", {}), ("backend", {}), ("world", {"justify": "right"}),
                    ("components", {}), ("size", {"justify": "right"}), ("status", {}), ("modified", {})):
        table.add_column(col, **kw)
    for step in tree.steps:
        marks = []
        if target is not None and step.step == target.step:
            marks.append("pointer")
        if newest is not None and step.step == newest.step:
            marks.append("newest")
        components = [c.name for c in step.components.values()]
        components += [n.removesuffix(".pt") for n in ("data.pt", "trainer_state.pt", "fully_async_state.pt")
                       if step.has_file(n)]
        status = "[green]complete[/green]" if step.complete else "[red]incomplete[/red]"
        if step.complete and not step.has_optimizer:
            status += " (model-only)"
        table.add_row(str(step.step), ",".join(marks), step.backend,
                      str(step.world_size) if step.world_size else "-", ",".join(components),
                      human_bytes(step.bytes), status, human_time(step.mtime))
    console.print(table)
    for step in tree.steps:
        for problem in step.problems:
            console.print(f"  {step.name}: [red]{problem}[/red]", highlight=False)
    pointer = tree.pointer
    if tree.kind == "checkpoints":
        shown = pointer.raw if pointer.present else "(none)"
        console.print(f"pointer: {shown}   newest complete: {newest.step if newest else '(none)'}   "
                      f"steps: {len(tree.steps)}   total: {human_bytes(tree.bytes)}", highlight=False)
    for warning in tree.warnings():
        console.print(f"[yellow]warning:[/yellow] {warning}", highlight=False)


def render_prune(console: Console, result: PruneResult) -> None:
    plan = result.plan
    table = Table(title=f"prune plan for {plan.url}", title_justify="left")
    for col in ("step", "action", "size", "why"):
        table.add_column(col, justify="right" if col in ("step", "size") else "left")
    styles = {DELETE: "[red]delete[/red]", DROP_OPTIMIZER: "[yellow]drop optimizer[/yellow]"}
    for d in plan.decisions:
        table.add_row(str(d.step), styles.get(d.action, "[green]keep[/green]"),
                      human_bytes(d.bytes) if d.action != "keep" else "", "; ".join(d.reasons))
    console.print(table)
    for note in plan.notes:
        console.print(f"note: {note}", highlight=False)
    verb = "would free" if result.dry_run else "freed"
    n = len(plan.files_to_delete)
    if not n:
        console.print("nothing to delete", highlight=False)
    elif result.dry_run:
        console.print(f"dry run: {n} files would be deleted, {verb} {human_bytes(plan.bytes_freed)}",
                      highlight=False)
    else:
        console.print(f"deleted {result.deleted_files} files, {verb} {human_bytes(plan.bytes_freed)}",
                      highlight=False)


def render_resolution(console: Console, res: Resolution) -> None:
    if res.action == SCRATCH:
        console.print("SkyRL would: [bold]start from scratch[/bold]")
    elif res.action == RESUME:
        console.print(f"SkyRL would load: [bold]{res.path}[/bold] (step {res.step})", highlight=False)
        for name, path in res.loads.items():
            console.print(f"  {name:<14} {path or '(absent)'}", highlight=False)
    elif res.action == FAIL:
        console.print(f"SkyRL would [red]fail[/red]: {res.skyrl_error}", highlight=False)
    for problem in res.problems:
        console.print(f"[red]problem:[/red] {problem}", highlight=False)
    for warning in res.warnings:
        console.print(f"[yellow]warning:[/yellow] {warning}", highlight=False)
    if res.fallback_path:
        console.print(f"fallback: [bold]{res.fallback_path}[/bold] (step {res.fallback_step}) — launch with "
                      f"trainer.resume_mode=from_path trainer.resume_path={res.fallback_path}", highlight=False)
    console.print("resumable: " + ("[green]yes[/green]" if res.resumable else "[red]no[/red]"))
