"""``export-hf`` shared by 1, 2 and 4 processes: wall time and peak RSS of every process.

Run from the repository root::

    .venv/bin/python bench/bench_export_workers.py [--dir DIR] [--processes 1,2,4] [--max-shard-size 200MB]
                                                  [--world-size 4 --hidden 1024 --layers 24 ...]

Prints figures only (no asserts). The checkpoint is the one of ``bench/bench_export.py`` (a REAL
fp32 FSDP2 ``policy/``, its generator and cache reused: by default W=4, hidden 1024, 24 layers,
1.4 GB). One process runs ``ckptctl export-hf`` plainly; N > 1 run it under torch's launcher
exactly as ``torchrun --standalone --nproc-per-node N -m ckptctl export-hf ...`` (what
``--workers N`` starts), through a small entry point that also records each process's own
export wall and peak RSS (``VmHWM``, :mod:`_measure`). Every output is compared, file by file
(sha256), with the one-process export. Wall of the launch includes interpreter start and
imports of every process; on a machine with fewer cores than processes the processes share them.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time

import bench_export  # this script's directory is on sys.path: the checkpoint generator and cache
from _measure import peak_rss_mb
from bench_cloud_export import digest_dir

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _worker_main(src: str, out: str, shard: str, result_dir: str) -> int:
    """One process of the run (plain, or a torchrun worker): export, then write its figures."""
    from ckptctl.cli import app

    t0 = time.perf_counter()
    try:
        app(["export-hf", src, "--out", out, "--max-shard-size", shard, "--json"], standalone_mode=False)
    except SystemExit as exc:
        if exc.code:
            raise
    rank = int(os.environ.get("RANK", "0"))
    with open(os.path.join(result_dir, f"rank{rank}.json"), "w") as f:
        json.dump({"rank": rank, "wall_s": time.perf_counter() - t0, "peak_rss_mb": peak_rss_mb()}, f)
    return 0


def run(processes: int, src: str, out: str, shard: str) -> dict:
    result_dir = tempfile.mkdtemp(prefix="bench-workers-")
    entry = [os.path.abspath(__file__), "--_worker", src, out, shard, result_dir]
    if processes == 1:
        cmd = [sys.executable, *entry]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(processes),
               *entry]
    env = dict(os.environ, PYTHONPATH=REPO)
    env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // processes)))  # as torchrun / --workers
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        raise SystemExit(f"{processes} process(es) failed (rc={proc.returncode}):\n{proc.stderr[-4000:]}")
    ranks = [json.load(open(os.path.join(result_dir, f))) for f in sorted(os.listdir(result_dir))]
    shutil.rmtree(result_dir, ignore_errors=True)
    return {"processes": processes, "wall_s": wall, "ranks": sorted(ranks, key=lambda r: r["rank"])}


def main() -> int:
    if len(sys.argv) > 1 and sys.argv[1] == "--_worker":
        return _worker_main(*sys.argv[2:6])
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--dir", default=os.path.join(tempfile.gettempdir(), "ckptctl-bench-export"),
                   help="checkpoint cache (shared with bench_export.py)")
    p.add_argument("--processes", default="1,2,4")
    p.add_argument("--max-shard-size", default="200MB", help="smaller shards: more to share")
    p.add_argument("--world-size", type=int, default=4)
    p.add_argument("--hidden", type=int, default=1024)
    p.add_argument("--layers", type=int, default=24)
    p.add_argument("--intermediate", type=int, default=3072)
    p.add_argument("--vocab", type=int, default=32000)
    args = p.parse_args()
    args.lora = False
    src = bench_export.ensure_checkpoint(args.dir, bench_export.job_kwargs(args))
    counts = [int(n) for n in args.processes.split(",")]
    print(f"checkpoint: {src} ({bench_export.mb(bench_export.du(src))} on disk), {os.cpu_count()} cores, "
          f"--max-shard-size {args.max_shard_size}", flush=True)
    work = tempfile.mkdtemp(prefix="bench-workers-out-")
    try:
        reference = None
        rows = []
        for n in counts:
            out = os.path.join(work, f"p{n}")
            row = run(n, src, out, args.max_shard_size)
            digest = digest_dir(out)
            reference = reference or digest
            row["identical"] = digest == reference
            row["files"] = len(digest)
            rows.append(row)
            shutil.rmtree(out)
            per = ", ".join(f"#{r['rank']} {r['wall_s']:.1f} s / {r['peak_rss_mb']:.0f} MB" for r in row["ranks"])
            print(f"{n} process(es): wall {row['wall_s']:.1f} s (launch included); per process export wall / peak "
                  f"RSS: {per}; {row['files']} files, identical to 1 process: {row['identical']}", flush=True)
        print(json.dumps({"checkpoint": src, "cores": os.cpu_count(), "runs": rows}, indent=1))
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
