"""The ``ckptctl`` command line: parses arguments, calls the library, renders the result.

Heavy libraries (torch, transformers, megatron) are imported only inside the commands that
read tensors, so ``--help``, ``list``, ``prune`` and ``resolve-resume`` start fast.
"""

from __future__ import annotations

import functools
import os
import sys
from typing import Annotated, Literal, Optional

import typer
from typer.core import TyperGroup

from ckptctl import __version__
from ckptctl.errors import CkptctlError, UsageError
from ckptctl.output import Output, human_bytes, print_error, report_error, silence_library_logs


class _ContractGroup(TyperGroup):
    """Click's own usage errors (unknown option, bad value, missing argument) follow the same
    error contract as ckptctl's: one line on stderr, exit 2, and the JSON object with --json."""

    def main(self, args=None, prog_name=None, complete_var=None, standalone_mode=True, **extra):
        args = list(sys.argv[1:] if args is None else args)
        if not standalone_mode:
            return super().main(args, prog_name, complete_var, standalone_mode=False, **extra)
        try:
            code = super().main(args, prog_name, complete_var, standalone_mode=False, **extra)
        except typer.TyperException as exc:  # typer's (vendored) click exceptions derive from it
            if type(exc).__name__ == "NoArgsIsHelpError":  # bare `ckptctl` or `ckptctl prune`: the help
                exc.show()
                sys.exit(exc.exit_code)
            ctx = getattr(exc, "ctx", None)
            where = f" (see '{ctx.command_path} --help')" if ctx is not None else ""
            json_mode = "--json" in (args[:args.index("--")] if "--" in args else args)
            report_error(exc.format_message() + where, exc.exit_code, json_mode)
            sys.exit(exc.exit_code)
        except typer.Abort:
            print_error("aborted")
            sys.exit(1)
        sys.exit(code if isinstance(code, int) else 0)


app = typer.Typer(
    cls=_ContractGroup,
    name="ckptctl",
    help="Inspect and manage SkyRL-layout training checkpoints on local disk, S3 and GCS.",
    no_args_is_help=True,
    add_completion=True,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,
    context_settings={"help_option_names": ["-h", "--help"]},
)

PathArg = Annotated[str, typer.Argument(help="Checkpoint tree: a local path, s3://bucket/prefix or gs://bucket/prefix.",
                                        show_default=False)]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print a JSON document for scripts instead of tables.")]
EndpointOpt = Annotated[Optional[str], typer.Option(
    "--endpoint-url", metavar="URL", envvar="CKPTCTL_ENDPOINT_URL",
    help="S3-compatible or GCS emulator endpoint (also AWS_ENDPOINT_URL, STORAGE_EMULATOR_HOST).")]
OutOpt = Annotated[str, typer.Option("--out", "-o", help="Destination directory (local, s3://, gs://).",
                                     show_default=False)]
OverwriteOpt = Annotated[bool, typer.Option("--overwrite", help="Replace a non-empty destination.")]
AllowGlobalOpt = Annotated[Optional[list[str]], typer.Option(
    "--allow-global", metavar="MODULE.NAME",
    help="Keep objects of this pickled class as plain data (never executed). Repeatable.")]


def handle_errors(func):
    """Every failure of every command becomes one line on stderr and the exit code of the README's
    table (the error's class decides it); with --json also ``{"error", "exit_code"}`` on stdout.
    Nothing prints a traceback (CKPTCTL_DEBUG=1 re-raises unforeseen errors for bug reports)."""

    @functools.wraps(func)
    def wrapper(*args, **kwargs):
        json_mode = bool(kwargs.get("json_output")) and _is_rank_zero()  # torchrun: one document

        def fail(message: str, code: int):
            report_error(message, code, json_mode)
            return typer.Exit(code)

        try:
            return func(*args, **kwargs)
        except CkptctlError as exc:
            raise fail(str(exc), exc.exit_code) from None
        except KeyboardInterrupt as exc:  # Ctrl-C: 130; SIGTERM while writing (output_dir.Terminated): 143
            raise fail(str(exc) or "interrupted", getattr(exc, "exit_code", 130)) from None
        except (typer.Exit, typer.Abort):
            raise
        except OSError as exc:  # outside the storage layer (a local output file, ...): the same mapping
            if os.environ.get("CKPTCTL_DEBUG"):
                raise
            from ckptctl.storage import translate_error

            error = translate_error(str(exc.filename or "?"), exc)
            raise fail(str(error), error.exit_code) from None
        except Exception as exc:  # a bug or an unforeseen backend error: still one line
            if os.environ.get("CKPTCTL_DEBUG"):
                raise
            raise fail(f"unexpected {type(exc).__name__}: {exc} (set CKPTCTL_DEBUG=1 for a traceback)", 1) from None

    return wrapper


def _version(value: bool) -> None:
    if value:
        typer.echo(f"ckptctl {__version__}")
        raise typer.Exit()


@app.callback()
def main_callback(
    version: Annotated[bool, typer.Option("--version", callback=_version, is_eager=True,
                                          help="Show the version and exit.")] = False,
) -> None:
    """Inspect and manage SkyRL-layout training checkpoints on local disk, S3 and GCS.

    Exit codes: 0 ok, 1 failed, 2 usage, 3 not found, 4 access denied / no credentials,
    5 not a checkpoint tree (or not the kind of path the command needs), 6 not resumable.
    Errors are one line on stderr; with --json also {"error": ..., "exit_code": N} on stdout.
    """
    if not os.environ.get("CKPTCTL_DEBUG"):
        silence_library_logs()


@app.command("list")
@handle_errors
def list_command(
    path: PathArg,
    deep: Annotated[bool, typer.Option(
        "--deep", help="Also check every file's size against its own index (zip directory, safetensors "
                       "header; Megatron's .metadata is read without it): about one small read per file.")] = False,
    json_output: JsonOpt = False,
    endpoint_url: EndpointOpt = None,
) -> None:
    """List the steps of a checkpoint (or HF export) tree: backend, parallel layout (Megatron: TP·PP·EP from
    .metadata; FSDP: world size), size, completeness."""
    from ckptctl.ops.listing import list_checkpoints
    from ckptctl.render import render_tree

    out = Output(json_output)
    out.result(list_checkpoints(path, endpoint_url=endpoint_url, deep=deep),
               functools.partial(render_tree, deep=deep))


@app.command("prune")
@handle_errors
def prune_command(
    path: PathArg,
    keep: Annotated[int, typer.Option("--keep", "-k", min=0, help="Keep the newest N complete checkpoints.")],
    keep_every: Annotated[Optional[int], typer.Option("--keep-every", min=1, metavar="K",
                                                      help="Also keep every step divisible by K.")] = None,
    drop_optimizer: Annotated[bool, typer.Option(
        "--drop-optimizer", help="For steps not kept, delete only the optimizer files (FSDP).")] = False,
    include_in_progress: Annotated[bool, typer.Option(
        "--include-in-progress",
        help="Allow deleting incomplete steps newer than the newest complete one (a save may be running).")] = False,
    include_above_pointer: Annotated[bool, typer.Option(
        "--include-above-pointer",
        help="Allow deleting an older run's steps above the current run's (written before the pointer target).")
    ] = False,
    without_pointer: Annotated[bool, typer.Option(
        "--without-pointer",
        help="Allow deleting when latest_ckpt_global_step.txt is missing or unusable (the current run is then "
             "the most recently written one).")] = False,
    dry_run: Annotated[bool, typer.Option("--dry-run", "-n", help="Print the plan; delete nothing.")] = False,
    yes: Annotated[bool, typer.Option("--yes", "-y", help="Do not ask for confirmation.")] = False,
    json_output: JsonOpt = False,
    endpoint_url: EndpointOpt = None,
) -> None:
    """Delete all but the newest N complete checkpoints (never the pointer target or newest complete)."""
    from ckptctl.ops.prune import prune
    from ckptctl.render import render_prune

    out = Output(json_output)
    if not dry_run and not yes and not sys.stdin.isatty():
        # Decide before listing anything: a script must say --yes (or --dry-run) explicitly.
        raise UsageError("refusing to delete without confirmation: not on a terminal; pass --yes or --dry-run")

    def confirm(plan) -> bool:
        if yes:
            return True
        render_prune(out.err, _as_dry_run(plan))
        return typer.confirm(f"Delete {len(plan.files_to_delete)} files ({human_bytes(plan.bytes_freed)})?",
                             default=False, err=True)

    result = prune(path, keep=keep, keep_every=keep_every, drop_optimizer=drop_optimizer,
                   include_in_progress=include_in_progress, include_above_pointer=include_above_pointer,
                   without_pointer=without_pointer, dry_run=dry_run, confirm=confirm, endpoint_url=endpoint_url)
    out.result(result, render_prune)


def _as_dry_run(plan):
    from ckptctl.ops.prune import PruneResult

    return PruneResult(plan=plan, deleted_files=0, dry_run=True)


@app.command("resolve-resume")
@handle_errors
def resolve_resume_command(
    path: Annotated[Optional[str], typer.Argument(
        help="Checkpoint tree (trainer.ckpt_path); needed for --mode latest.", show_default=False)] = None,
    mode: Annotated[Literal["latest", "from_path", "none"], typer.Option(
        "--mode", help="trainer.resume_mode.")] = "latest",
    resume_path: Annotated[Optional[str], typer.Option(
        "--resume-path", metavar="P", help="trainer.resume_path (a global_step_N directory) for from_path.")] = None,
    ckpt_interval: Annotated[Optional[int], typer.Option(
        "--ckpt-interval", metavar="N", help="trainer.ckpt_interval, for SkyRL's consistency check.")] = None,
    fallback: Annotated[bool, typer.Option(
        "--fallback", help="When the chosen step is unusable, name the newest complete one.")] = False,
    require_checkpoint: Annotated[bool, typer.Option(
        "--require-checkpoint", help="Exit 6 when nothing would be loaded (SkyRL would start from scratch).")
    ] = False,
    json_output: JsonOpt = False,
    endpoint_url: EndpointOpt = None,
) -> None:
    """Print what a SkyRL restart would load, by SkyRL's rules, and check that it is usable.

    Exit 0 when training can start (from scratch, the chosen step, or with --fallback the
    fallback step); exit 6 with SkyRL's reason when it would fail.
    """
    from ckptctl.ops.resume import resolve_resume
    from ckptctl.render import render_resolution

    out = Output(json_output)
    res = resolve_resume(path, mode=mode, resume_path=resume_path, ckpt_interval=ckpt_interval,
                         fallback=fallback, require_checkpoint=require_checkpoint, endpoint_url=endpoint_url)
    out.result(res, render_resolution)
    if not res.resumable:
        if not json_output:
            print_error(f"not resumable: {res.reason}")
        raise typer.Exit(6)


@app.command("inspect")
@handle_errors
def inspect_command(
    path: Annotated[str, typer.Argument(
        help="A tree, a global_step_N directory, a policy/critic component, or one file (local, s3://, gs://).",
        show_default=False)],
    tensors: Annotated[bool, typer.Option("--tensors", help="List every tensor: global shape, dtype, sharding.")] = False,
    config: Annotated[bool, typer.Option("--config", help="Print the training config saved in trainer_state.pt.")] = False,
    config_format: Annotated[Literal["yaml", "json"], typer.Option(
        "--config-format", help="Format of --config output.")] = "yaml",
    component: Annotated[Optional[str], typer.Option(
        "--component", help="Only this model component (policy or critic).")] = None,
    allow_global: AllowGlobalOpt = None,
    json_output: JsonOpt = False,
    endpoint_url: EndpointOpt = None,
) -> None:
    """Show what a checkpoint holds: backend, layout, dtypes, parameters, optimizer, scheduler, trainer state."""
    from ckptctl.ops.inspect import inspect_path
    from ckptctl.render import render_inspect

    out = Output(json_output)
    report = inspect_path(path, with_tensors=tensors, with_config=config, component=component,
                          allow_globals=tuple(allow_global or ()), endpoint_url=endpoint_url)
    if config and not json_output:
        config_data = (report.trainer_state or {}).get("config")
        if config_data is None:
            raise UsageError(f"{report.url}: no saved training config (no trainer_state.pt with a config)")
        render_config(config_data, config_format)
        return
    out.result(report, render_inspect)


def render_config(config_data, fmt: str) -> None:
    import json

    if fmt == "json":
        sys.stdout.write(json.dumps(config_data, indent=2, default=str) + "\n")
    else:
        import yaml

        sys.stdout.write(yaml.safe_dump(config_data, sort_keys=False, default_flow_style=False))


@app.command("verify")
@handle_errors
def verify_command(
    path: Annotated[str, typer.Argument(
        help="A tree (every step), a global_step_N directory, a policy/critic component or an HF export.",
        show_default=False)],
    full: Annotated[bool, typer.Option(
        "--full", help="Also read every byte and check every zip entry's CRC-32 (.pt records, DCP chunks).")] = False,
    write_manifest: Annotated[bool, typer.Option(
        "--write-manifest", help="Write ckptctl-manifest.json (size and SHA-256 of every file) into each step "
                                 "that verifies sound.")] = False,
    json_output: JsonOpt = False,
    endpoint_url: EndpointOpt = None,
) -> None:
    """Check that a checkpoint is intact: sizes against each format's index, safe metadata, pieces covering
    every tensor, completeness; with --full every CRC; with a manifest present every SHA-256.

    Exit 0 when everything checked holds, 1 when anything is wrong (one line per problem).
    """
    from ckptctl.ops.verify import verify
    from ckptctl.render import render_verify

    out = Output(json_output)
    report = verify(path, full=full, write_manifest=write_manifest, endpoint_url=endpoint_url)
    out.result(report, render_verify)
    if not report.ok:
        raise typer.Exit(1)


#: export-hf's and convert-reshard's transfer options (ckptctl.ops.transfer.Transfer)
ConcurrencyOpt = Annotated[Optional[int], typer.Option(
    "--concurrency", metavar="N",
    help="Object stores: ranged reads in flight ahead of the conversion, and shard parts uploading at once "
         "(1: one tensor read ahead, uploads in the writing thread). [default: 8]",
    show_default=False)]
MaxMemoryOpt = Annotated[Optional[str], typer.Option(
    "--max-memory", metavar="SIZE",
    help="Object stores: memory for read-ahead and upload buffers, e.g. 1GiB or 256MiB (besides the two "
         "tensors being converted). [default: 1GiB, at most 1/8 of RAM]", show_default=False)]


@app.command("export-hf")
@handle_errors
def export_hf_command(
    src: Annotated[str, typer.Argument(
        help="A global_step_N directory, a policy/critic component, or a tree (its pointer target).",
        show_default=False)],
    out: OutOpt,
    component: Annotated[Optional[Literal["policy", "critic"]], typer.Option(
        "--component", help="Which model component to export (default: policy; SRC itself when it is one).",
        show_default=False)] = None,
    dtype: Annotated[Literal["auto", "bf16", "fp16", "fp32"], typer.Option(
        "--dtype", help="auto keeps the source dtype; others cast explicitly.")] = "auto",
    max_shard_size: Annotated[str, typer.Option(
        "--max-shard-size", help="Largest safetensors shard, e.g. 5GB or 500MB.")] = "5GB",
    overwrite: OverwriteOpt = False,
    merge_lora: Annotated[bool, typer.Option(
        "--merge-lora", help="Merge the LoRA adapter into the weights (one standalone model).")] = False,
    no_verify: Annotated[bool, typer.Option(
        "--no-verify",
        help="Skip re-reading the output before it is committed, and the source's manifest check.")] = False,
    steps: Annotated[Optional[str], typer.Option(
        "--steps", metavar="all|latest|N[,M...]",
        help="SRC is a tree: export these steps to OUT/global_step_N/<component>, skipping steps already "
             "exported complete (--overwrite re-exports them).", show_default=False)] = None,
    concurrency: ConcurrencyOpt = None,
    max_memory: MaxMemoryOpt = None,
    workers: Annotated[Optional[int], typer.Option(
        "--workers", metavar="N",
        help="Share the export between N processes on this machine, each writing its own shards (as "
             "`torchrun --nproc-per-node N -m ckptctl export-hf ...` does). [default: 1]",
        show_default=False)] = None,
    json_output: JsonOpt = False,
    endpoint_url: EndpointOpt = None,
) -> None:
    """Stream an FSDP or Megatron checkpoint into a HuggingFace model (safetensors), in bounded memory.

    Runs in one process, or shared by several: `--workers N`, or under torchrun
    (`torchrun --nnodes M --nproc-per-node N -m ckptctl export-hf ...`; a local OUT must be on a
    filesystem every node shares).
    """
    from ckptctl.ops.distributed import check_workers, launch_workers

    workers = check_workers(workers)
    out_ = Output(json_output and _is_rank_zero())
    if workers > 1:  # the same run as under torchrun: these processes run this command without --workers
        argv = ["export-hf", src, "--out", out, "--dtype", dtype, "--max-shard-size", max_shard_size]
        argv += [flag for flag, on in (("--overwrite", overwrite), ("--merge-lora", merge_lora),
                                       ("--no-verify", no_verify), ("--json", json_output)) if on]
        for flag, value in (("--component", component), ("--steps", steps), ("--concurrency", concurrency),
                            ("--max-memory", max_memory), ("--endpoint-url", endpoint_url)):
            argv += [flag, str(value)] if value is not None else []
        code = launch_workers(workers, argv, warn=out_.warn)
        if code:
            raise typer.Exit(code)
        return
    if steps is not None:
        _export_run(out_, src, out, steps=steps, component=component, dtype=dtype, max_shard_size=max_shard_size,
                    overwrite=overwrite, merge_lora=merge_lora, verify=not no_verify, endpoint_url=endpoint_url,
                    concurrency=concurrency, max_memory=max_memory)
        return
    from ckptctl.ops.distributed import silent_exit
    from ckptctl.ops.export import export_hf
    from ckptctl.render import render_export

    with (out_ if _is_rank_zero() else Output(True)).progress("exporting tensors", None) as advance:  # one bar
        try:
            summary = export_hf(src, out, component=component, dtype=dtype, max_shard_size=max_shard_size,
                                overwrite=overwrite, merge_lora=merge_lora, verify=not no_verify,
                                endpoint_url=endpoint_url, progress=lambda done, total: advance(1, total),
                                concurrency=concurrency, max_memory=max_memory)
        except CkptctlError as exc:
            code = silent_exit(exc)  # several processes: one line for the run
            if code is not None:
                raise typer.Exit(code) from None
            raise
    if _is_rank_zero():
        out_.result(summary, render_export)


def _export_run(out_: Output, src: str, out: str, **options) -> None:
    from ckptctl.ops.distributed import WORKERS_ENV, silent_exit
    from ckptctl.ops.export_run import export_run
    from ckptctl.render import describe_step_export, render_export_run

    first = _is_rank_zero()  # several processes (torchrun, --workers): process 0 speaks for the run
    with (out_ if first else Output(True)).progress("exporting tensors", None) as advance:
        try:
            summary = export_run(src, out, on_step=lambda result: out_.info(describe_step_export(result)),
                                 progress=lambda done, total: advance(done, total, absolute=True), **options)
        except CkptctlError as exc:
            code = silent_exit(exc)
            if code is not None:
                raise typer.Exit(code) from None
            raise
    if first:
        out_.result(summary, render_export_run)
    # under --workers the others leave with 0: the launcher must not stop process 0 while it reports
    if summary.exit_code and (first or not os.environ.get(WORKERS_ENV)):
        raise typer.Exit(summary.exit_code)


@app.command("convert-reshard")
@handle_errors
def convert_reshard_command(
    src: Annotated[str, typer.Argument(help="A Megatron or FSDP component, or a global_step_N directory.",
                                       show_default=False)],
    out: OutOpt,
    tp: Annotated[Optional[int], typer.Option("--tp", min=1, help="Megatron: target tensor-parallel size.")] = None,
    pp: Annotated[Optional[int], typer.Option("--pp", min=1, help="Megatron: target pipeline-parallel size.")] = None,
    dp: Annotated[Optional[int], typer.Option("--dp", min=1, help="Megatron: target data-parallel size.")] = None,
    ep: Annotated[Optional[int], typer.Option(
        "--ep", min=1, help="Megatron MoE: target expert-parallel size (default 1).")] = None,
    etp: Annotated[Optional[int], typer.Option(
        "--etp", min=1, help="Megatron MoE: target expert-tensor-parallel size (default: the target TP).")] = None,
    world_size: Annotated[Optional[int], typer.Option(
        "--world-size", min=1, help="FSDP: target world size.")] = None,
    device_type: Annotated[Optional[str], typer.Option(
        "--device-type", metavar="DEVICE",
        help="FSDP: device type of the target DeviceMesh (cuda, cpu, xpu, hpu, npu, mtia); default: the "
             "source's.")] = None,
    drop_optimizer: Annotated[bool, typer.Option(
        "--drop-optimizer", help="Write no optimizer state (when its format cannot be resharded).")] = False,
    overwrite: OverwriteOpt = False,
    allow_global: AllowGlobalOpt = None,
    no_verify: Annotated[bool, typer.Option(
        "--no-verify", help="Skip checking the source against its ckptctl-manifest.json.")] = False,
    concurrency: ConcurrencyOpt = None,
    max_memory: MaxMemoryOpt = None,
    json_output: JsonOpt = False,
    endpoint_url: EndpointOpt = None,
) -> None:
    """Reshard a Megatron checkpoint to a new TP/PP/EP (or an FSDP one to a new world size), offline.

    Runs in one process, or under torchrun with one process per target rank
    (`torchrun --nproc-per-node N -m ckptctl convert-reshard ...`; gloo on CPU, NCCL on GPUs).
    """
    from ckptctl.ops.reshard import convert_reshard
    from ckptctl.render import render_reshard

    out_ = Output(json_output and _is_rank_zero())
    with out_.progress("resharding", None) as advance:
        summary = convert_reshard(src, out, tp=tp, pp=pp, dp=dp, ep=ep, etp=etp, world_size=world_size,
                                  drop_optimizer=drop_optimizer, overwrite=overwrite, device_type=device_type,
                                  allow_globals=tuple(allow_global or ()), endpoint_url=endpoint_url,
                                  verify=not no_verify, concurrency=concurrency, max_memory=max_memory,
                                  progress=lambda done, total: advance(done, total, absolute=True))
    if _is_rank_zero():
        out_.result(summary, render_reshard)


@app.command("diff")
@handle_errors
def diff_command(
    a: Annotated[str, typer.Argument(
        metavar="A", help="A step, a policy/critic component, an HF export, or a tree (its pointer target).",
        show_default=False)],
    b: Annotated[str, typer.Argument(metavar="B", help="What to compare A with (any of the same, any backend).",
                                     show_default=False)],
    atol: Annotated[float, typer.Option("--atol", min=0.0, metavar="X",
                                        help="Absolute tolerance: equal where |A-B| <= atol + rtol*|B|.")] = 0.0,
    rtol: Annotated[float, typer.Option("--rtol", min=0.0, metavar="Y", help="Relative tolerance.")] = 0.0,
    tensors: Annotated[bool, typer.Option("--tensors", help="Also show every tensor's figures.")] = False,
    component: Annotated[Optional[Literal["policy", "critic"]], typer.Option(
        "--component", help="Which model component (default: policy; a component path is itself).",
        show_default=False)] = None,
    json_output: JsonOpt = False,
    endpoint_url: EndpointOpt = None,
) -> None:
    """Compare the model weights of two checkpoints under HF names, tensor by tensor (optimizer state is not compared).

    FSDP, Megatron (through the mcore -> HF mapping) and HF exports, in any pairing. Reports tensors
    only in A or B, shape/dtype mismatches, max |A-B| and ||A-B||/||A|| per layer and module type.
    Exit 0 when every common tensor is equal within the tolerances (default: exactly) and nothing
    is missing or mismatched, 1 otherwise.
    """
    from ckptctl.ops.diff import diff
    from ckptctl.render import render_diff

    out = Output(json_output)
    with out.progress("comparing tensors", None) as advance:
        report = diff(a, b, atol=atol, rtol=rtol, per_tensor=tensors, component=component,
                      endpoint_url=endpoint_url, progress=lambda done, total: advance(1, total))
    out.result(report, render_diff)
    if not report.equal:
        raise typer.Exit(1)


def _is_rank_zero() -> bool:
    return os.environ.get("RANK", "0") == "0"


def main() -> None:
    try:
        app()
    except SystemExit as exc:
        from ckptctl.ops.distributed import exit_process

        exit_process(exc.code)


if __name__ == "__main__":
    main()
