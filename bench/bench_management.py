"""Benchmark the management commands: startup cost and S3 request economy of list / prune.

Run from the repository root::

    .venv/bin/python bench/bench_management.py

Prints figures only (no asserts, no pass/fail). Goals are in bench/README.md:
``ckptctl list`` in about one request per 1000 objects and no slower than
``aws s3 ls --recursive``; ``ckptctl --help`` close to ``python -c "import typer"``.

Sections:
1. startup: ``ckptctl --help`` vs ``import typer``; heavy modules (torch, transformers,
   megatron) imported by ``--help``, ``list``, ``prune --dry-run``, ``resolve-resume``.
2. S3 (in-process moto server with a request counter): a 300-step SkyRL FSDP tree (world
   size 8, 31 objects a step, 9301 objects; every ``.pt`` a tiny but well-formed torch.save
   zip). ``ckptctl list --json`` vs ``aws s3 ls --recursive``; ``ckptctl list --deep --json``
   (its extra requests and wall time beside plain ``list``); then ``ckptctl prune --keep 5
   --yes --json``.
3. the same ``list`` on a local-disk copy of the tree, for reference.
"""

from __future__ import annotations

import io
import json
import os
import pickle
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.parse
import zipfile
from typing import NamedTuple

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
sys.path.insert(0, os.path.join(REPO, "tests"))

from storage_servers import (BUCKET, create_s3_bucket, env_with, put_objects_directly, s3_env,
                             start_s3_server)  # noqa: E402

VENV_BIN = os.path.join(REPO, ".venv", "bin")
CKPTCTL = os.path.join(VENV_BIN, "ckptctl")
PYTHON = os.path.join(VENV_BIN, "python") if os.path.exists(os.path.join(VENV_BIN, "python")) else sys.executable

STEPS = 300
WORLD = 8
def tiny_torch_save() -> bytes:
    """A minimal archive shaped like ``torch.save`` output (``archive/data.pkl``, stored), so
    that ``list --deep`` finds the tree sound: its checks read only the zip's tail."""
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_STORED) as zf:
        zf.writestr("archive/data.pkl", pickle.dumps({}, protocol=2))
        zf.writestr("archive/version", "3\n")
    return buf.getvalue()


BODY = tiny_torch_save()
KEEP = 5
HEAVY = ("torch", "transformers", "megatron")

#: Child process for the import check: runs ckptctl.cli.main with the given argv, then
#: writes which heavy top-level packages ended up in sys.modules to the file in argv[1].
_IMPORT_PROBE = r"""
import json, sys
out_path = sys.argv[1]
sys.argv = ["ckptctl"] + sys.argv[2:]
from ckptctl.cli import main
code = 0
try:
    main()
except SystemExit as exc:
    code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
heavy = sorted({m.split(".")[0] for m in sys.modules} & set(%r))
with open(out_path, "w") as f:
    json.dump({"heavy": heavy, "exit": code}, f)
""" % (HEAVY,)


# ---------------------------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------------------------
class Run(NamedTuple):
    wall: float  # seconds, time.perf_counter
    client_cpu: float  # user+sys CPU seconds of the child process (and its children)
    server_cpu: float  # CPU seconds of this process meanwhile: the in-process moto server
    proc: subprocess.CompletedProcess


def timed_run(cmd: list[str], env: dict | None = None) -> Run:
    r0 = resource.getrusage(resource.RUSAGE_CHILDREN)
    c0 = time.process_time()
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, stdin=subprocess.DEVNULL)
    wall = time.perf_counter() - t0
    server = time.process_time() - c0
    r1 = resource.getrusage(resource.RUSAGE_CHILDREN)
    client = (r1.ru_utime - r0.ru_utime) + (r1.ru_stime - r0.ru_stime)
    return Run(wall, client, server, proc)


def repeat(cmd: list[str], runs: int, env: dict | None = None, warmup: bool = True,
           before=None, after=None) -> list[Run]:
    """``runs`` timed runs (after one untimed warm-up run); ``before()``/``after(run)`` hooks."""
    if warmup:
        timed_run(cmd, env)
    out = []
    for _ in range(runs):
        if before:
            before()
        run = timed_run(cmd, env)
        out.append(run)
        if after:
            after(run)
    return out


def med(runs: list[Run], attr: str = "wall") -> float:
    return statistics.median(getattr(r, attr) for r in runs)


def describe(runs: list[Run], server: bool = True) -> str:
    """'median X (runs: ...); CPU client C, server S' (CPU: medians)."""
    text = f"median {ms(med(runs)):>8} (runs: {', '.join(ms(r.wall) for r in runs)})"
    text += f"; CPU: client {ms(med(runs, 'client_cpu'))}"
    if server:
        text += f", S3 server {ms(med(runs, 'server_cpu'))}"
    return text


def check(proc: subprocess.CompletedProcess, what: str) -> None:
    if proc.returncode != 0:
        err = proc.stderr.decode(errors="replace").strip()[-800:]
        print(f"  !! {what} exited {proc.returncode}: {err}")


def ms(t: float | None) -> str:
    return "-" if t is None else f"{t * 1000:.0f} ms"


def step_files(step: int) -> dict[str, bytes]:
    """Relative path -> body for one SkyRL FSDP step (as tests/treebuilder.fsdp_step names them)."""
    d = f"global_step_{step}"
    files = {}
    for rank in range(WORLD):
        for kind in ("model", "optim", "extra_state"):
            files[f"{d}/policy/{kind}_world_size_{WORLD}_rank_{rank}.pt"] = BODY
    files[f"{d}/policy/fsdp_config.json"] = json.dumps({"fsdp_strategy": "fsdp2", "world_size": WORLD}).encode()
    for name in ("config.json", "tokenizer.json", "tokenizer_config.json", "generation_config.json"):
        files[f"{d}/policy/huggingface/{name}"] = b"{}" if name.endswith(".json") else BODY
    files[f"{d}/data.pt"] = BODY
    files[f"{d}/trainer_state.pt"] = BODY
    return files


def tree_files(steps: int) -> dict[str, bytes]:
    files: dict[str, bytes] = {}
    for s in range(1, steps + 1):
        files.update(step_files(s))
    files["latest_ckpt_global_step.txt"] = str(steps).encode()
    return files


def put_tree(endpoint: str, prefix: str, files: dict[str, bytes], bucket: str = BUCKET) -> None:
    put_objects_directly(endpoint, bucket, {f"{prefix}/{rel}": data for rel, data in files.items()})


def write_local_tree(root: str, files: dict[str, bytes]) -> None:
    made = set()
    for rel, data in files.items():
        path = os.path.join(root, *rel.split("/"))
        parent = os.path.dirname(path)
        if parent not in made:
            os.makedirs(parent, exist_ok=True)
            made.add(parent)
        with open(path, "wb") as f:
            f.write(data)


# ---------------------------------------------------------------------------------------------
# sections
# ---------------------------------------------------------------------------------------------
def bench_startup(s3_env_full: dict, small_url: str, results: dict) -> None:
    print("== 1. startup ==")
    # Interleaved rounds (one run of each command per round), so a burst of load on a shared
    # machine hits all of them alike; one untimed warm-up round first.
    cases = {
        "ckptctl --help": [CKPTCTL, "--help"],
        "python -c 'import typer'": [PYTHON, "-c", "import typer"],
        "python -c 'pass'": [PYTHON, "-c", "pass"],
        "python -c 'import typer, rich.console'": [PYTHON, "-c", "import typer, rich.console"],
        "python -c 'import ckptctl.cli'": [PYTHON, "-c", "import ckptctl.cli"],
    }
    times: dict[str, list[float]] = {k: [] for k in cases}
    for round_ in range(8):
        for label, cmd in cases.items():
            run = timed_run(cmd)
            if round_ == 0:
                check(run.proc, label)
            else:
                times[label].append(run.wall)
    for label, ts in times.items():
        print(f"  {label:<40} median {ms(statistics.median(ts)):>7}  min {ms(min(ts)):>7}"
              + (f"  (runs: {', '.join(ms(t) for t in ts)})" if label in ("ckptctl --help", "python -c 'import typer'")
                 else ""))
    help_runs, typer_runs = times["ckptctl --help"], times["python -c 'import typer'"]
    t_help, t_typer = statistics.median(help_runs), statistics.median(typer_runs)
    print(f"  --help minus import typer: {ms(t_help - t_typer)} ({t_help / t_typer:.2f}x by median,"
          f" {min(help_runs) / min(typer_runs):.2f}x by min)")
    results["help"] = t_help
    results["typer"] = t_typer

    print(f"  heavy modules ({', '.join(HEAVY)}) imported, checked via sys.modules after ckptctl.cli.main"
          f" (tree: {small_url}, 3 steps):")
    commands = {
        "--help": ["--help"],
        "list": ["list", small_url, "--json"],
        "prune --dry-run": ["prune", small_url, "--keep", "1", "--dry-run", "--json"],
        "resolve-resume": ["resolve-resume", small_url, "--json"],
    }
    results["heavy"] = {}
    with tempfile.TemporaryDirectory(prefix="ckptctl-bench-imports-") as tmp:
        for label, argv in commands.items():
            out_path = os.path.join(tmp, "probe.json")
            if os.path.exists(out_path):
                os.remove(out_path)
            proc = subprocess.run([PYTHON, "-c", _IMPORT_PROBE, out_path] + argv, env=s3_env_full,
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE, stdin=subprocess.DEVNULL)
            if not os.path.exists(out_path):
                heavy_text = f"?? probe failed (exit {proc.returncode}): " \
                             f"{proc.stderr.decode(errors='replace').strip()[-300:]}"
            else:
                with open(out_path) as f:
                    probe = json.load(f)
                heavy_text = ", ".join(probe["heavy"]) or "none"
                if probe["exit"] != 0:
                    heavy_text += f"  (command exited {probe['exit']})"
            results["heavy"][label] = heavy_text
            print(f"    {label:<18} {heavy_text}")


def bench_s3(server, env: dict, files: dict[str, bytes], results: dict) -> None:
    counter = server.counter
    n_objects = len(files)
    url = f"s3://{BUCKET}/run"
    print()
    print(f"== 2. S3 (in-process moto at {server.endpoint}) ==")
    t0 = time.perf_counter()
    put_tree(server.endpoint, "run", files)
    print(f"  tree: {STEPS} steps x {len(step_files(1))} objects + pointer = {n_objects} objects under {url}"
          f" (built directly in {time.perf_counter() - t0:.2f} s)")
    print("  (CPU: client = the command's process; S3 server = moto answering it, in this process."
          " Listing pages are sequential, so wall ~ client + server CPU on an idle machine.)")

    # -- ckptctl list ---------------------------------------------------------------------
    per_run: list[tuple[int, int, list]] = []
    listed: list[int] = []

    def after_list(run: Run) -> None:
        per_run.append((len(counter.requests), counter.list_objects(), counter.requests))
        check(run.proc, "ckptctl list")
        if run.proc.returncode == 0:
            listed.append(json.loads(run.proc.stdout)["files"])

    runs = repeat([CKPTCTL, "list", url, "--json"], 3, env=env, before=counter.reset, after=after_list)
    reqs, list_reqs, requests = per_run[-1]
    other = [f"{r.method} {r.path}" for r in requests
             if not (r.method == "GET" and urllib.parse.parse_qs(r.query).get("list-type"))]
    print(f"  ckptctl list --json     {describe(runs)}")
    print(f"    requests: {reqs} total, {list_reqs} ListObjects; objects listed: {listed[-1] if listed else '?'}")
    print(f"    other requests: {', '.join(other) or 'none'}")
    per_1000 = reqs / n_objects * 1000
    print(f"    requests per 1000 objects: {per_1000:.2f} (ListObjects only: {list_reqs / n_objects * 1000:.2f})")
    results["s3_list"] = dict(time=med(runs), reqs=reqs, list_reqs=list_reqs, objects=listed[-1] if listed else None,
                              per_1000=per_1000, client_cpu=med(runs, "client_cpu"),
                              server_cpu=med(runs, "server_cpu"))

    # -- ckptctl list --deep ----------------------------------------------------------------
    deep_counts: list[tuple[int, int, int]] = []

    def after_deep(run: Run) -> None:
        check(run.proc, "ckptctl list --deep")
        damaged = None
        if run.proc.returncode == 0:
            damaged = sum(1 for st in json.loads(run.proc.stdout)["steps"] if not st["complete"])
        deep_counts.append((len(counter.requests), counter.list_objects(), damaged))

    runs_d = repeat([CKPTCTL, "list", url, "--deep", "--json"], 3, env=env, before=counter.reset, after=after_deep)
    reqs_d, list_d, damaged = deep_counts[-1]
    checked = sum(1 for rel in files if rel.endswith(".pt"))
    print(f"  ckptctl list --deep     {describe(runs_d)}")
    print(f"    requests: {reqs_d} total, {list_d} ListObjects, {reqs_d - reqs} more than plain list"
          f" ({checked} .pt files checked: {(reqs_d - reqs) / checked:.2f} extra requests a file);"
          f" steps found damaged: {damaged}")
    print(f"  ckptctl list --deep / list: {med(runs_d) / med(runs):.2f}x wall"
          f" (+{med(runs_d) - med(runs):.1f} s for {STEPS} steps, {(med(runs_d) - med(runs)) / STEPS * 1000:.0f} ms"
          " a step)")
    results["s3_list_deep"] = dict(time=med(runs_d), reqs=reqs_d, list_reqs=list_d, objects=checked,
                                   extra_reqs=reqs_d - reqs, client_cpu=med(runs_d, "client_cpu"),
                                   server_cpu=med(runs_d, "server_cpu"))

    # -- aws s3 ls --recursive ------------------------------------------------------------
    aws = shutil.which("aws")
    if aws is None:
        print("  aws s3 ls --recursive   skipped: no `aws` on PATH")
        results["aws"] = None
    else:
        aws_runs: list[tuple[int, int, int]] = []

        def after_aws(run: Run) -> None:
            check(run.proc, "aws s3 ls")
            lines = [ln for ln in run.proc.stdout.decode(errors="replace").splitlines() if ln.strip()]
            aws_runs.append((len(counter.requests), counter.list_objects(), len(lines)))

        cmd = [aws, "s3", "ls", "--recursive", f"s3://{BUCKET}/run/", "--endpoint-url", server.endpoint]
        runs_a = repeat(cmd, 3, env=env, before=counter.reset, after=after_aws)
        reqs_a, list_a, lines_a = aws_runs[-1]
        print(f"  aws s3 ls --recursive   {describe(runs_a)}")
        print(f"    requests: {reqs_a} total, {list_a} ListObjects; objects listed: {lines_a}   ({aws})")
        startup = repeat([aws, "--version"], 3, env=env)
        print(f"    aws --version alone: {describe(startup, server=False)}  (its startup share)")
        results["aws"] = dict(time=med(runs_a), reqs=reqs_a, list_reqs=list_a, objects=lines_a,
                              client_cpu=med(runs_a, "client_cpu"), server_cpu=med(runs_a, "server_cpu"))
        print(f"  ckptctl list / aws s3 ls: {med(runs) / med(runs_a):.2f}x wall,"
              f" {med(runs, 'client_cpu') / med(runs_a, 'client_cpu'):.2f}x client CPU")

    # -- ckptctl prune --------------------------------------------------------------------
    # Each timed run prunes a fresh copy of the tree in a bucket of its own: the list tree
    # stays intact, and moto's listing cost (which grows with the bucket's size) stays the same.
    prune_runs: list[Run] = []
    prune_counts = []
    for i in range(3):
        bucket = f"ckptctl-bench-prune-{i}"
        create_s3_bucket(server.endpoint, bucket)
        put_tree(server.endpoint, "run", files, bucket=bucket)
        counter.reset()
        run = timed_run([CKPTCTL, "prune", f"s3://{bucket}/run", "--keep", str(KEEP), "--yes", "--json"], env)
        check(run.proc, "ckptctl prune")
        deleted = json.loads(run.proc.stdout)["deleted_files"] if run.proc.returncode == 0 else None
        prune_runs.append(run)
        prune_counts.append((len(counter.requests), counter.list_objects(), counter.delete_objects(), deleted))
    reqs_p, list_p, del_p, deleted = prune_counts[-1]
    print(f"  ckptctl prune --keep {KEEP} --yes --json  {describe(prune_runs)}"
          f"  (each run on a fresh copy of the tree)")
    print(f"    requests: {reqs_p} total, {list_p} ListObjects, {del_p} DeleteObjects; objects deleted: {deleted}"
          f" (expected {(STEPS - KEEP) * len(step_files(1))})")
    results["s3_prune"] = dict(time=med(prune_runs), reqs=reqs_p, list_reqs=list_p, delete_reqs=del_p,
                               deleted=deleted, client_cpu=med(prune_runs, "client_cpu"),
                               server_cpu=med(prune_runs, "server_cpu"))


def bench_local(files: dict[str, bytes], results: dict) -> None:
    print()
    print("== 3. local disk ==")
    with tempfile.TemporaryDirectory(prefix="ckptctl-bench-local-") as tmp:
        root = os.path.join(tmp, "run")
        t0 = time.perf_counter()
        write_local_tree(root, files)
        print(f"  tree: {len(files)} files under {root} (written in {time.perf_counter() - t0:.2f} s)")
        listed = []

        def after(run: Run) -> None:
            check(run.proc, "ckptctl list (local)")
            listed.append(json.loads(run.proc.stdout)["files"] if run.proc.returncode == 0 else None)

        runs = repeat([CKPTCTL, "list", root, "--json"], 3, after=after)
        print(f"  ckptctl list --json     {describe(runs, server=False)}; objects listed: {listed[-1]}")
        results["local_list"] = dict(time=med(runs), objects=listed[-1], client_cpu=med(runs, "client_cpu"))


def print_table(results: dict) -> None:
    print()
    print("== summary ==")
    rows = [("what", "wall (median)", "client CPU", "server CPU", "requests", "list req", "delete req", "objects")]
    rows.append(("ckptctl --help", ms(results["help"]), "", "", "", "", "", ""))
    rows.append(("python -c 'import typer'", ms(results["typer"]), "", "", "", "", "", ""))

    def s3_row(label: str, r: dict, delete: str = "", objects: str | None = None) -> tuple:
        return (label, ms(r["time"]), ms(r["client_cpu"]), ms(r["server_cpu"]), str(r["reqs"]), str(r["list_reqs"]),
                delete, objects if objects is not None else str(r["objects"]))

    s = results["s3_list"]
    rows.append(s3_row("ckptctl list (s3)", s))
    d = results["s3_list_deep"]
    rows.append(s3_row("ckptctl list --deep (s3)", d, objects=f"{d['objects']} checked"))
    a = results.get("aws")
    rows.append(s3_row("aws s3 ls --recursive", a) if a else ("aws s3 ls --recursive", "skipped", "", "", "", "", "",
                                                               ""))
    p = results["s3_prune"]
    rows.append(s3_row(f"ckptctl prune --keep {KEEP} (s3)", p, str(p["delete_reqs"]), f"{p['deleted']} deleted"))
    loc = results["local_list"]
    rows.append(("ckptctl list (local disk)", ms(loc["time"]), ms(loc["client_cpu"]), "", "", "", "",
                 str(loc["objects"])))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    for i, r in enumerate(rows):
        print("  " + "  ".join(c.ljust(w) if j == 0 else c.rjust(w) for j, (c, w) in enumerate(zip(r, widths))))
        if i == 0:
            print("  " + "  ".join("-" * w for w in widths))
    print(f"  ckptctl list (s3): {s['per_1000']:.2f} requests per 1000 objects (goal: about 1)")
    if a:
        print(f"  ckptctl list / aws s3 ls --recursive: {s['time'] / a['time']:.2f}x wall,"
              f" {s['client_cpu'] / a['client_cpu']:.2f}x client CPU (goal: <= 1)")
    print(f"  ckptctl --help / import typer: {results['help'] / results['typer']:.2f}x (goal: close to 1)")
    print("  heavy imports: " + "; ".join(f"{k}: {v}" for k, v in results["heavy"].items()))


def main() -> None:
    if not os.path.exists(CKPTCTL):
        sys.exit(f"{CKPTCTL} not found: run from a checkout with the .venv installed")
    t_start = time.perf_counter()
    results: dict = {}
    files = tree_files(STEPS)
    server = start_s3_server()
    config_dir = tempfile.mkdtemp(prefix="ckptctl-bench-aws-")
    for name in ("config", "credentials"):
        open(os.path.join(config_dir, name), "w").close()
    env = env_with(s3_env(server.endpoint, config_dir))
    try:
        put_tree(server.endpoint, "small", tree_files(3))
        bench_startup(env, f"s3://{BUCKET}/small", results)
        bench_s3(server, env, files, results)
        bench_local(files, results)
        print_table(results)
    finally:
        server.stop()
        shutil.rmtree(config_dir, ignore_errors=True)
    print(f"\n(total bench time {time.perf_counter() - t_start:.1f} s; python {sys.version.split()[0]};"
          f" {os.cpu_count()} CPUs)")


if __name__ == "__main__":
    main()
