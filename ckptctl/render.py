"""Human renderings (rich tables and trees) of the operations' results."""

from __future__ import annotations

from rich.console import Console
from rich.table import Table

from ckptctl.ops.prune import DELETE, DROP_OPTIMIZER, KEEP, PruneResult
from ckptctl.ops.resume import FAIL, RESUME, SCRATCH, Resolution
from ckptctl.output import human_bytes, human_time
from ckptctl.tree import STEP_FILES, Tree


def render_tree(console: Console, tree: Tree, *, deep: bool = False) -> None:
    newest = tree.newest_complete
    target = tree.pointer_target
    title = f"{tree.url}  ({'HF export tree' if tree.kind == 'export' else 'checkpoint tree'})"
    table = Table(title=title, title_justify="left", show_lines=False)
    for col, kw in (("step", {"justify": "right"}), ("mark", {}), ("backend", {}), ("parallel", {"justify": "right"}),
                    ("components", {}), ("size", {"justify": "right"}), ("status", {}), ("modified", {})):
        table.add_column(col, **kw)
    for step in tree.steps:
        marks = []
        if target is not None and step.step == target.step:
            marks.append("pointer")
        if newest is not None and step.step == newest.step:
            marks.append("newest")
        components = [c.name for c in step.components.values()]
        components += [n.removesuffix(".pt") for n in STEP_FILES if step.has_file(n)]
        status = "[green]complete[/green]" if step.complete else "[red]incomplete[/red]"
        if step.complete and not step.has_optimizer:
            status += " (model-only)"
        layout = step.policy.layout if step.policy is not None else None
        table.add_row(str(step.step), ",".join(marks), step.backend,
                      layout or (str(step.world_size) if step.world_size else "-"), ",".join(components),
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
    if deep:
        console.print("deep check: every .pt, .distcp and .safetensors file's size checked against its own index",
                      highlight=False)


def render_prune(console: Console, result: PruneResult) -> None:
    plan = result.plan
    table = Table(title=f"prune plan for {plan.url}", title_justify="left")
    for col in ("step", "action", "size", "why"):
        table.add_column(col, justify="right" if col in ("step", "size") else "left")
    styles = {DELETE: "[red]delete[/red]", DROP_OPTIMIZER: "[yellow]drop optimizer[/yellow]"}
    for d in plan.decisions:
        table.add_row(str(d.step), styles.get(d.action, "[green]keep[/green]"),
                      human_bytes(d.bytes) if d.action != KEEP else "", "; ".join(d.reasons))
    console.print(table)
    for note in plan.notes:
        console.print(f"note: {note}", highlight=False)
    for warning in plan.warnings:
        console.print(f"[yellow]warning:[/yellow] {warning}", highlight=False)
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
    shown = set()
    for fit in res.optimizer:
        verdict = {True: "[green]yes[/green]", False: "[red]no[/red]"}.get(fit.loadable, "[yellow]unknown[/yellow]")
        console.print(f"optimizer state loads with the run's config: {verdict} ({fit.component}: {fit.reason})",
                      highlight=False)
        shown.update(p for p in res.problems if p.startswith(f"{fit.component}: {fit.reason}"))
        if fit.convert:
            console.print(f"  convert: {fit.convert}", highlight=False)
            console.print(f"  or, weights only: {fit.drop}", highlight=False)
            console.print(f"  then copy trainer_state.pt and data.pt to {fit.resume_path} and launch with "
                          + " ".join(fit.overrides), highlight=False)
    for problem in res.problems:
        if problem not in shown:
            console.print(f"[red]problem:[/red] {problem}", highlight=False)
    for warning in res.warnings:
        console.print(f"[yellow]warning:[/yellow] {warning}", highlight=False)
    if res.fallback_path:
        console.print(f"fallback: [bold]{res.fallback_path}[/bold] (step {res.fallback_step}) — launch with "
                      f"trainer.resume_mode=from_path trainer.resume_path={res.fallback_path}", highlight=False)
    console.print("resumable: " + ("[green]yes[/green]" if res.resumable else "[red]no[/red]"))


def _kv(value) -> str:
    if isinstance(value, float):
        return f"{value:g}"
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_kv(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{k}={_kv(v)}" for k, v in value.items() if v is not None) + "}"
    return str(value)


def _add_mapping(node, mapping: dict, skip: tuple[str, ...] = (), depth: int = 0) -> None:
    from rich.markup import escape

    for key, value in mapping.items():
        if key in skip or value is None or (isinstance(value, (dict, list)) and not value):
            continue
        if isinstance(value, dict) and depth < 3:
            _add_mapping(node.add(f"[bold]{escape(str(key))}[/bold]"), value, depth=depth + 1)
        else:
            node.add(escape(f"{key}: {_kv(value)}"), highlight=False)


_BUCKET_STATES = ("param", "exp_avg", "exp_avg_sq")
_GROUP_KEYS = ("lr", "betas", "eps", "weight_decay")


def _add_megatron_optimizer(node, opt: dict) -> None:
    """A Megatron checkpoint's optimizer: format per optimizer of the chain, and for
    ``dp_reshardable`` a table of its flat buffers (dp_group_idx, grad buffer, bucket, sizes)."""
    from rich.markup import escape

    head = f"[bold]optimizer[/bold]  {escape(str(opt.get('format') or 'none'))}"
    if opt.get("format"):
        head += f" (from {opt.get('format_source', 'keys')})"
    if opt.get("step") is not None:
        head += f", step {_kv(opt['step'])}"
    branch = node.add(head, highlight=False)
    if opt.get("param_groups"):
        groups = [{k: g.get(k) for k in _GROUP_KEYS if k in g} for g in opt["param_groups"]]
        branch.add(escape(f"param_groups: {_kv(groups)}"), highlight=False)
    if opt.get("bucket_parameters"):
        branch.add(escape(f"parameters of each bucket: {opt['bucket_parameters']}"), highlight=False)
    for chain in opt.get("chains") or ():
        label = chain["chain"] or "state"
        line = f"{label}: {chain.get('format') or 'unknown'}, {chain['tensors']} tensors, {human_bytes(chain['bytes'])}"
        if chain.get("dp_groups"):
            states = {s for g in chain["dp_groups"] for b in g["buffers"] for k in b["buckets"] for s in k["bytes"]}
            line += (f"; {len(chain['dp_groups'])} model-parallel groups of flat buffers ("
                     + ", ".join(sorted(states, key=lambda s: (_BUCKET_STATES + (s,)).index(s))) + ")")
        if chain.get("format_in_common") and chain.get("format_from_keys") \
                and chain["format_in_common"] != chain["format_from_keys"]:
            line += f" (common.pt says {chain['format_in_common']}, keys say {chain['format_from_keys']})"
        sub = branch.add(escape(line), highlight=False)
        if chain.get("states"):
            sub.add(escape(f"{chain['parameters']} parameters; " + ", ".join(
                f"{state} {f['numel']:,} ({human_bytes(f['bytes'])})" for state, f in chain["states"].items())),
                highlight=False)
        if chain.get("dp_groups"):
            sub.add(_bucket_table(chain["dp_groups"]))


def _bucket_table(groups: list[dict]) -> Table:
    """One row per bucket of a ``dp_reshardable`` optimizer (a ``parameters`` column shows
    when the buckets carry what they hold)."""
    rows = [(g, b, k) for g in groups for b in g["buffers"] for k in b["buckets"]]
    with_params = any("parameters" in k for _, _, k in rows)
    table = Table(show_edge=False, pad_edge=False)
    states = [s for s in _BUCKET_STATES if any(s in k["bytes"] for _, _, k in rows)]
    for col in ("dp_group_idx", "ranks", "gbuf", "dtype", "bucket", "numel", "unpadded", "stored", "bytes/state") \
            + (("parameters",) if with_params else ()):
        table.add_column(col, justify="left" if col in ("ranks", "dtype", "parameters") else "right")
    for g, b, k in rows:
        sizes = {k["bytes"].get(s) for s in states}
        per_state = (human_bytes(sizes.pop()) if len(sizes) == 1 else
                     ", ".join(f"{s} {human_bytes(k['bytes'].get(s))}" for s in states))
        dtype = "/".join(d for d in (b.get("param_dtype"), b.get("grad_dtype")) if d) or b["dtype"]
        table.add_row(str(g["dp_group_idx"]), ",".join(map(str, g["writer_ranks"])), str(b["gbuf_idx"]), dtype,
                      str(k["bucket_idx"]), _count(k.get("numel")), _count(k.get("numel_unpadded")),
                      _count(k.get("stored_numel")), per_state,
                      *((_held(k.get("parameters")),) if with_params else ()))
    return table


def _count(n) -> str:
    return "-" if n is None else f"{n:,}"


def _held(params) -> str:
    """A bucket's parameters, short: their number, then in buffer order the modules outside the
    decoder layers and the range of layers (and of experts) inside (entries with ``key`` /
    ``layer`` / ``expert``, as inspect lists them; plain names: the first and last)."""
    if not isinstance(params, (list, tuple)):
        return _kv(params) if params is not None else "-"
    if not all(isinstance(p, dict) and "key" in p for p in params):
        names = [str(p) for p in params]
        return f"{len(names)}: {names[0]} … {names[-1]}" if len(names) > 2 else f"{len(names)}: " + ", ".join(names)
    parts: list[str] = []
    layers = [p["layer"] for p in params if p.get("layer") is not None]
    experts = [p["expert"] for p in params if p.get("expert") is not None]
    for p in params:
        if p.get("layer") is not None:
            part = "layer" if len(set(layers)) == 1 else "layers"
            part += f" {min(layers)}" if len(set(layers)) == 1 else f" {min(layers)}-{max(layers)}"
        else:
            head, _, rest = p["key"].partition(".")
            part = rest.split(".")[0] if head == "decoder" and rest else head
        if part not in parts:
            parts.append(part)
    if experts:
        parts.append(f"expert {experts[0]}" if len(set(experts)) == 1 else f"experts {min(experts)}-{max(experts)}")
    return f"{len(params)}: " + ", ".join(parts)


def render_inspect(console: Console, report) -> None:
    from rich.markup import escape
    from rich.tree import Tree as RichTree

    head = f"[bold]{report.url}[/bold]  ({report.kind}" + (f", step {report.step}" if report.step is not None else "")
    if report.complete is not None:
        head += ", [green]complete[/green]" if report.complete else ", [red]incomplete[/red]"
    root = RichTree(head + ")", highlight=False)
    for problem in report.problems:  # first, not below pages of metadata
        root.add(f"[red]problem:[/red] {escape(problem)}", highlight=False)
    if report.tree:
        _add_mapping(root.add("[bold]tree[/bold]"), report.tree, skip=("warnings",))
    for comp in report.components:
        status = "[green]complete[/green]" if comp.complete else "[red]incomplete[/red]"
        node = root.add(f"[bold]{comp.name}[/bold]  {comp.backend}, world size {comp.world_size or '-'}, {status}",
                        highlight=False)
        if comp.model_config:
            _add_mapping(node.add("[bold]model config[/bold]"), comp.model_config)
        stats = node.add("[bold]tensors[/bold]")
        stats.add(f"parameters: {comp.parameters:,} ({human_bytes(comp.parameter_bytes)})", highlight=False)
        stats.add("dtypes: " + ", ".join(f"{d} x{n}" for d, n in comp.dtypes.items()), highlight=False)
        stats.add("count: " + ", ".join(f"{g} {n}" for g, n in comp.tensor_count.items()), highlight=False)
        if comp.lora:
            _add_mapping(node.add("[bold]LoRA[/bold]"), comp.lora)
        if getattr(comp, "moe", None):
            moe = {k: (f"{v:,}" if k.endswith("_parameters") and isinstance(v, int) else v)
                   for k, v in comp.moe.items() if v is not None}
            _add_mapping(node.add("[bold]mixture of experts[/bold]"), moe)
        if comp.format:
            chained = isinstance(comp.format.get("optimizer"), dict) and "chains" in comp.format["optimizer"]
            _add_mapping(node.add("[bold]format[/bold]"), comp.format, skip=("optimizer",) if chained else ())
            if chained:
                _add_megatron_optimizer(node, comp.format["optimizer"])
        for warning in comp.warnings:
            node.add(f"[yellow]warning:[/yellow] {warning}", highlight=False)
    if report.trainer_state:
        _add_mapping(root.add("[bold]trainer state[/bold]"), report.trainer_state, skip=("config", "keys"))
    if report.data_loader:
        _add_mapping(root.add("[bold]data loader[/bold]"), report.data_loader, skip=("keys",))
    if report.files:
        _add_mapping(root.add("[bold]file[/bold]"), report.files)
    console.print(root)
    for comp in report.components:
        if comp.tensors is not None:
            table = Table(title=f"{comp.name} tensors", title_justify="left")
            for col in ("name", "group", "shape", "dtype", "layout", "pieces"):
                table.add_column(col)
            for t in comp.tensors:
                layout = t.layout + (f" {','.join(t.placements)}" if t.placements else "")
                table.add_row(t.name, t.group, "x".join(map(str, t.shape)) or "scalar", t.dtype, layout,
                              str(len(t.pieces)))
            console.print(table)
    for warning in report.warnings:
        console.print(f"[yellow]note:[/yellow] {warning}", highlight=False)


def render_export(console: Console, summary) -> None:
    console.print(f"exported {summary.source} ({summary.backend}"
                  + (f", step {summary.step}" if summary.step is not None else "") + f") -> [bold]{summary.destination}"
                  "[/bold]", highlight=False)
    dtypes = ", ".join(f"{d} x{n}" for d, n in summary.dtypes_written.items())
    console.print(f"  architecture: {', '.join(summary.architecture) or '-'}", highlight=False)
    console.print(f"  tensors: {summary.tensors}  shards: {summary.shards}  size: {human_bytes(summary.bytes)}  "
                  f"dtype: {dtypes} ({'source dtype' if summary.dtype == 'source' else 'cast to ' + summary.dtype}"
                  f"{', copied as bytes' if getattr(summary, 'byte_copy', False) else ''})",
                  highlight=False)
    console.print(f"  files: {', '.join(summary.files)}", highlight=False)
    if summary.lora:
        lora = summary.lora
        how = (f"merged into the weights (r={lora.get('r')}, lora_alpha={lora.get('lora_alpha')}"
               + (", rsLoRA" if lora.get("use_rslora") else "") + ")" if lora.get("merged")
               else "base weights + lora_adapter/ (not merged)")
        console.print(f"  LoRA: {lora.get('adapted_modules')} adapted modules, {how}", highlight=False)
    for name, why in summary.skipped.items():
        console.print(f"  skipped {name}: {why}", highlight=False)
    if getattr(summary, "replaced", None):
        console.print(f"  replaced: {summary.replaced}", highlight=False)
    for warning in summary.warnings:
        console.print(f"[yellow]note:[/yellow] {warning}", highlight=False)
    console.print("  verified: " + ("[green]yes[/green]" if summary.verified else "no (--no-verify)")
                  + ("   source matches its manifest" if summary.manifest_checked else "")
                  + f"   in {summary.seconds:.1f} s")


def render_reshard(console: Console, summary) -> None:
    from rich.tree import Tree as RichTree

    data = summary.to_dict() if hasattr(summary, "to_dict") else dict(summary)
    root = RichTree(f"[bold]resharded[/bold] {data.get('source', '')} -> [bold]{data.get('destination', '')}[/bold]",
                    highlight=False)
    shown: dict = {}
    for key, value in data.items():
        if key in ("source", "destination", "warnings", "notes", "seconds"):
            continue
        if key in ("files", "copied", "dropped") and isinstance(value, list):
            shown[key] = f"{len(value)} files" if key != "dropped" else (", ".join(map(str, value)) or None)
        elif key == "components" and isinstance(value, list):
            shown[key] = {c.get("name", "?"): f"world size {c.get('source_world_size')} -> {c.get('world_size')}, "
                          f"optimizer {c.get('optimizer')}" for c in value}
        elif key in ("bytes", "bytes_read") and isinstance(value, int):
            shown[key] = human_bytes(value)
        else:
            shown[key] = value
    _add_mapping(root, shown)
    console.print(root)
    for warning in list(data.get("warnings") or []) + list(data.get("notes") or []):
        console.print(f"[yellow]note:[/yellow] {warning}", highlight=False)
    if data.get("seconds") is not None:
        console.print(f"done in {data['seconds']:.1f} s", highlight=False)


def _figure(value: float) -> str:
    return "0" if value == 0 else f"{value:.3e}"


def render_diff(console: Console, report) -> None:
    from rich.markup import escape

    for label, side in (("A", report.a), ("B", report.b)):
        step = f", step {side.step}" if side.step is not None else ""
        console.print(f"{label}: [bold]{escape(side.path)}[/bold] ({side.backend}{step})", highlight=False)
    tables = [("per layer", report.layers), ("per module type", report.modules)]
    if report.tensors is not None:
        tables.append(("per tensor", report.tensors))
    for title, rows in tables:
        if not rows:
            continue
        table = Table(title=title, title_justify="left")
        for col in ("name", "tensors", "max |A-B|", "‖A-B‖/‖A‖", "equal"):
            table.add_column(col, justify="left" if col == "name" else "right")
        for row in rows:
            table.add_row(escape(row.name), str(row.tensors), _figure(row.max_abs_diff), _figure(row.rel_change),
                          "[green]yes[/green]" if row.equal else "[red]no[/red]")
        console.print(table)
    for label, names in (("only in A", report.only_in_a), ("only in B", report.only_in_b)):
        for name in names:
            console.print(f"[red]{label}:[/red] {escape(name)}", highlight=False)
    for m in report.mismatches:
        console.print(f"[red]mismatch:[/red] {escape(m.name)}: A {m.a_dtype} {m.a_shape}, B {m.b_dtype} {m.b_shape}",
                      highlight=False)
    for note in report.notes:
        console.print(f"[yellow]note:[/yellow] {escape(note)}", highlight=False)
    total = report.total
    console.print(f"compared {report.compared} tensors ({total.numel:,} values): {report.differing} differ "
                  f"(atol {report.atol:g}, rtol {report.rtol:g}); max |A-B| {_figure(total.max_abs_diff)}, "
                  f"‖A-B‖/‖A‖ {_figure(total.rel_change)}", highlight=False)
    console.print("equal: " + ("[green]yes[/green]" if report.equal else "[red]no[/red]")
                  + f"   in {report.seconds:.1f} s")


def render_verify(console: Console, report) -> None:
    checks = ["structure"] + (["crc"] if report.full else []) + (["manifest"] if any(
        "manifest" in t.checks for t in report.targets) else [])
    console.print(f"verify {report.path}  ({report.kind}; checked: {', '.join(checks)})", highlight=False)
    for problem in report.problems:
        console.print(f"  [red]{problem}[/red]", highlight=False)
    for t in report.targets:
        mark = "[green]ok[/green]  " if t.ok else "[red]FAIL[/red]"
        manifest = f"  manifest {t.manifest}" if t.manifest != "absent" else ""
        console.print(f"  {mark} {t.path}  {t.backend}  {t.files} files  {human_bytes(t.bytes)}{manifest}",
                      highlight=False)
        for problem in t.problems:
            console.print(f"         [red]{problem}[/red]", highlight=False)
        for note in t.notes:
            console.print(f"         note: {note}", highlight=False)
    bad = sum(1 for t in report.targets if not t.ok)
    if report.ok:
        console.print(f"[green]all {len(report.targets)} checked sound[/green] ({human_bytes(report.bytes_read)} "
                      f"read in {report.seconds:.1f}s)", highlight=False)
    else:
        console.print(f"[red]{report.problem_count} problem(s)[/red] in {bad} of {len(report.targets)}",
                      highlight=False)


_STEP_EXPORT_STYLE = {"exported": "green", "re-exported": "green", "refused": "red", "failed": "red"}


def describe_step_export(result) -> str:
    """One line for a step of ``export-hf --steps`` as it is settled (shown while the run goes on)."""
    line = f"{result.name}: {result.status}"
    if result.export is not None:
        line += f" -> {result.destination} ({human_bytes(result.export.bytes)}, {result.export.seconds:.1f} s)"
    return line + (f" ({result.reason})" if result.reason else "")


def render_export_run(console: Console, summary) -> None:
    console.print(f"export-hf {summary.source} -> [bold]{summary.destination}[/bold]  "
                  f"(--steps {summary.steps_asked}, {summary.component})", highlight=False)
    table = Table(show_edge=False, pad_edge=False)
    for column in ("step", "status", "destination", "size", "time", "why"):
        table.add_column(column, justify="right" if column in ("step", "size", "time") else "left")
    for s in summary.steps:
        style = _STEP_EXPORT_STYLE.get(s.status)
        export = s.export
        there = s.status in ("exported", "re-exported", "already exported")
        table.add_row(str(s.step), f"[{style}]{s.status}[/{style}]" if style else s.status,
                      s.destination if there else "-",
                      human_bytes(export.bytes) if export else "", f"{export.seconds:.1f} s" if export else "",
                      s.reason)
    console.print(table)
    for warning in summary.warnings:
        console.print(f"[yellow]note:[/yellow] {warning}", highlight=False)
    counts = summary.to_dict()
    console.print(f"{counts['exported']} exported, {counts['skipped']} skipped, {counts['refused']} refused, "
                  f"{counts['failed']} failed   in {summary.seconds:.1f} s", highlight=False)
