"""Benchmark MegatronReader: metadata listing + summary time and peak RSS vs checkpoint size.

Run from the repository root::

    .venv/bin/python bench/bench_inspect_megatron.py [--dir DIR] [--repeat N] [--no-s3]

Prints figures only (no asserts). Goal: listing + summary of a >= 1000-tensor Megatron
checkpoint well under 1 s of reader work, and peak RSS that does not grow with the size of the
checkpoint (the reader reads ``.metadata``, ``metadata.json`` and ``common.pt`` only, never the
``.distcp`` data files).

What it does:
1. Writes two REAL megatron-core ``torch_dist`` checkpoints with ``dist_checkpointing.save``
   (tests/realckpt/megatron_writer.py; TP=2, per-layer ``decoder.layers.{i}.*`` keys, 48 layers,
   fully_reshardable optimizer state -> 1164 tensors, ~4,000 chunks each): "small" (hidden 64,
   ffn 128, vocab 1000) and "big" (hidden 160, ffn 320, vocab 2500: every tensor ~6x larger).
   Both are cached in ``--dir`` (default: a temp dir named after this script) and reused. The
   build runs in a child process, so this script itself stays small (see RSS below).
2. For each, in FRESH child processes (median of ``--repeat``): the import of
   ``ckptctl.formats.megatron``; ``tensor_infos()`` (parse ``.metadata``); ``summary(common=False)``
   (+ one listing to check file sizes); ``summary()`` with ``common.pt`` (which loads torch via
   safe_load.load_pt); the child's peak RSS after listing and at the end, and whether torch was
   imported by the listing. Peak RSS is ``VmHWM`` from ``/proc/self/status``: Linux carries
   ``ru_maxrss`` over ``execve`` from the forking parent, so a child of a big process would report
   the parent's peak (``ru_maxrss`` is the fallback where /proc is missing).
3. The same listing + summary from S3 (in-process moto server with a request counter): requests
   made and bytes of ``.distcp`` downloaded (must be 0).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

from _measure import IMPORT_LINE  # this script's directory is on sys.path

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
sys.path.insert(0, os.path.join(REPO, "tests"))

COMMON = dict(tp=2, per_layer_keys=True, num_layers=48, heads=4, kv_heads=2)
SIZES = {
    "small": dict(hidden=64, ffn=128, vocab=1000),
    "big": dict(hidden=160, ffn=320, vocab=2500),
}

_CHILD = IMPORT_LINE + r"""
import json, sys, time

t0 = time.perf_counter()
from ckptctl.storage import open_store
from ckptctl.formats.megatron import MegatronReader
t1 = time.perf_counter()
r = MegatronReader(open_store(sys.argv[1]))
infos = r.tensor_infos()
t2 = time.perf_counter()
rss_listing = peak_rss_mb()
torch_after_listing = "torch" in sys.modules
s = r.summary(common=False)
t3 = time.perf_counter()
s = r.summary()
t4 = time.perf_counter()
print(json.dumps({
    "import_s": t1 - t0, "listing_s": t2 - t1, "summary_nocommon_s": t3 - t2, "summary_common_s": t4 - t3,
    "tensors": len(infos), "chunks": sum(len(t.pieces) for t in infos.values()),
    "data_bytes": s["files"]["data_bytes"], "tp": s["parallel"]["tp"], "pp": s["parallel"]["pp"],
    "problems": s["problems"], "torch_after_listing": torch_after_listing,
    "rss_listing_mb": rss_listing, "rss_end_mb": peak_rss_mb(),
}))
"""


def build(root: str) -> dict[str, str]:
    """Write (or reuse) the two checkpoints in a child process; returns name -> ckpt dir."""
    t0 = time.monotonic()
    out = subprocess.run([sys.executable, os.path.abspath(__file__), "--build-only", "--dir", root],
                         capture_output=True, text=True, cwd=REPO, check=False)
    if out.returncode != 0:
        raise RuntimeError(out.stdout[-2000:] + out.stderr[-4000:])
    paths = json.loads(out.stdout.strip().splitlines()[-1])
    print(f"checkpoints ready in {time.monotonic() - t0:.1f}s (cached in {root})")
    return paths


def _build_here(root: str) -> dict[str, str]:
    from realckpt.megatron_writer import write_megatron_components

    specs = [(os.path.join(root, name, "policy"), dict(COMMON, **kw)) for name, kw in SIZES.items()]
    comps = write_megatron_components(specs, timeout=900)
    return {name: str(c.ckpt_dir) for name, c in zip(SIZES, comps)}


def du(path: str) -> int:
    return sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(path) for f in fs)


def run_child(url: str, env: dict | None = None) -> dict:
    out = subprocess.run([sys.executable, "-c", _CHILD, url], capture_output=True, text=True, cwd=REPO,
                         env=env, check=False)
    if out.returncode != 0:
        raise RuntimeError(out.stderr[-3000:])
    return json.loads(out.stdout.strip().splitlines()[-1])


def median_runs(url: str, repeat: int, env: dict | None = None) -> dict:
    runs = [run_child(url, env) for _ in range(repeat)]
    out = dict(runs[-1])
    for k in ("import_s", "listing_s", "summary_nocommon_s", "summary_common_s", "rss_listing_mb", "rss_end_mb"):
        out[k] = statistics.median(r[k] for r in runs)
    return out


def s3_section(paths: dict[str, str], repeat: int) -> None:
    from storage_servers import env_with, put_objects_directly, s3_env, start_s3_server

    server = start_s3_server()
    try:
        env = env_with(s3_env(server.endpoint, tempfile.mkdtemp(prefix="bench-aws-")))
        print("\nS3 (in-process moto; the child process talks HTTP to it)")
        print(f"{'ckpt':6} {'requests':>8} {'distcp GETs':>11} {'listing s':>9} {'summary s':>9}")
        for name, path in paths.items():
            objects = {}
            for d, _, fs in os.walk(path):
                for f in fs:
                    full = os.path.join(d, f)
                    with open(full, "rb") as fh:
                        objects[f"bench-{name}/" + os.path.relpath(full, path)] = fh.read()
            put_objects_directly(server.endpoint, "ckptctl-test", objects)
            server.counter.reset()
            r = run_child(f"s3://ckptctl-test/bench-{name}", env)
            reqs = server.counter.requests
            n_distcp = sum(1 for q in reqs if q.path.endswith(".distcp"))
            # two summaries ran (without and with common.pt): requests are for both
            print(f"{name:6} {len(reqs):8d} {n_distcp:11d} {r['listing_s']:9.3f} "
                  f"{r['summary_nocommon_s'] + r['summary_common_s']:9.3f}")
            for q in reqs:
                query = f"?{q.query}" if q.query else ""
                print(f"         {q.method} {q.path.split('/', 2)[-1]}{query} -> {q.status}")
    finally:
        server.stop()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--dir", default=os.path.join(tempfile.gettempdir(), "ckptctl-bench-inspect-megatron"))
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--no-s3", action="store_true")
    ap.add_argument("--build-only", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.build_only:
        print(json.dumps(_build_here(args.dir)))
        return
    paths = build(args.dir)
    print(f"\nlocal disk, fresh process per run, median of {args.repeat}")
    header = (f"{'ckpt':6} {'tensors':>7} {'chunks':>6} {'on disk MB':>10} {'import s':>8} {'listing s':>9} "
              f"{'summary s':>9} {'+common.pt s':>12} {'RSS listing MB':>14} {'RSS end MB':>10} torch@listing")
    print(header)
    results = {}
    for name, path in paths.items():
        r = median_runs(path, args.repeat)
        results[name] = r
        print(f"{name:6} {r['tensors']:7d} {r['chunks']:6d} {du(path) / 2**20:10.1f} {r['import_s']:8.3f} "
              f"{r['listing_s']:9.3f} {r['summary_nocommon_s']:9.3f} {r['summary_common_s']:12.3f} "
              f"{r['rss_listing_mb']:14.1f} {r['rss_end_mb']:10.1f} {r['torch_after_listing']}")
    s, b = results["small"], results["big"]
    print(f"\nbig/small: data bytes x{b['data_bytes'] / s['data_bytes']:.1f}, listing time "
          f"x{b['listing_s'] / s['listing_s']:.2f}, RSS after listing x{b['rss_listing_mb'] / s['rss_listing_mb']:.2f}, "
          f"peak RSS x{b['rss_end_mb'] / s['rss_end_mb']:.2f}")
    print(f"inferred layout: small TP={s['tp']} PP={s['pp']}, big TP={b['tp']} PP={b['pp']}; "
          f"problems: {s['problems'] or 'none'} / {b['problems'] or 'none'}")
    work = {n: r["listing_s"] + r["summary_nocommon_s"] for n, r in results.items()}
    print(f"reader work (listing + summary without common.pt): small {work['small']:.3f} s, "
          f"big {work['big']:.3f} s; common.pt adds the torch import (safe_load.load_pt)")
    if not args.no_s3:
        s3_section(paths, args.repeat)


if __name__ == "__main__":
    main()
