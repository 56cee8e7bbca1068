"""The read-ahead's own bookkeeping cost as plans grow (issue #11: checkpoints of hundreds of GB).

Run from the repository root::

    .venv/bin/python bench/bench_read_ahead_scale.py [--reads 10000,40000,160000] [--baseline REPO]

A 235B / 671B MoE checkpoint plans 100,000 and more reads (every expert's chunk of every
layer), coalesced into tens of thousands of buffers. What one read costs the read-ahead must
not grow with the plan. This script times :class:`ckptctl.storage.ReadAhead` alone: planned
reads of 4 KiB, 8 files read in turn (as a sharded tensor's ranks are), each read 4 KiB apart
from the next of its file so that none coalesce (the most buffers a plan of that size can
have), from sparse files on local disk (page-cache reads: the store costs next to nothing, so
the figures are the read-ahead's). The budget (1 GiB) holds every buffer.

Prints per plan size: buffers, seconds to build the read-ahead (coalescing, admission), seconds
to serve every read in order, and microseconds per read; then how much the per-read cost grew
from the smallest plan to the largest (1.0x: flat). ``--baseline REPO`` runs the same in a
child process importing ckptctl from that checkout (e.g. a ``git worktree`` of an older commit).
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

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RECORD = 4096
FILES = 8


def measure(reads: int, directory: str) -> dict:
    from ckptctl.storage import ReadAhead, open_store

    per_file = -(-reads // FILES)
    for f in range(FILES):
        with open(os.path.join(directory, f"rank{f}"), "wb") as fh:
            fh.truncate(per_file * 2 * RECORD)  # sparse: no disk, zeros from the page cache
    store = open_store(directory)
    plan = [(f"rank{i % FILES}", (i // FILES) * 2 * RECORD, (i // FILES) * 2 * RECORD + RECORD)
            for i in range(reads)]
    t0 = time.perf_counter()
    read_ahead = ReadAhead(store, plan, budget=2**30, concurrency=8, gap=0)
    t1 = time.perf_counter()
    store.read_ahead = read_ahead
    try:
        for rel, start, end in plan:
            store.read_range(rel, start, end)
    finally:
        store.read_ahead = None
        read_ahead.close()
    t2 = time.perf_counter()
    return {"reads": reads, "buffers": len(read_ahead._units), "served": read_ahead.served,
            "build_s": t1 - t0, "serve_s": t2 - t1}


def run_all(sizes: list[int]) -> list[dict]:
    out = []
    for reads in sizes:
        directory = tempfile.mkdtemp(prefix="ckptctl-bench-ra-")
        try:
            out.append(measure(reads, directory))
        finally:
            shutil.rmtree(directory, ignore_errors=True)
    return out


def report(label: str, rows: list[dict]) -> None:
    print(f"[{label}]")
    print(f"  {'reads':>8} {'buffers':>8} {'build s':>8} {'serve s':>8} {'us/read':>8}")
    for r in rows:
        print(f"  {r['reads']:>8} {r['buffers']:>8} {r['build_s']:>8.2f} {r['serve_s']:>8.2f} "
              f"{1e6 * (r['build_s'] + r['serve_s']) / r['reads']:>8.1f}")
    first, last = rows[0], rows[-1]
    growth = ((last["build_s"] + last["serve_s"]) / last["reads"]) / ((first["build_s"] + first["serve_s"]) / first["reads"])
    print(f"  per-read cost grew {growth:.1f}x from {first['reads']} to {last['reads']} reads (1.0x: flat)")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--reads", default="10000,40000,160000", help="plan sizes, comma-separated")
    p.add_argument("--baseline", metavar="REPO", help="also run ckptctl from this checkout, in a child")
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    a = p.parse_args()
    sizes = [int(x) for x in a.reads.split(",") if x.strip()]
    if a.child:
        print(json.dumps(run_all(sizes)))
        return 0
    sys.path.insert(0, REPO)
    print(f"ReadAhead bookkeeping: {FILES} files, reads of {RECORD} B, none coalesced; "
          f"machine: {os.cpu_count()} CPUs")
    if a.baseline:
        child = subprocess.run([sys.executable, os.path.abspath(__file__), "--child", "--reads", a.reads],
                               env=dict(os.environ, PYTHONPATH=os.path.abspath(a.baseline)),
                               capture_output=True, text=True, check=True)
        report(f"baseline {a.baseline}", json.loads(child.stdout.strip().splitlines()[-1]))
    report("this checkout", run_all(sizes))
    return 0


if __name__ == "__main__":
    sys.exit(main())
