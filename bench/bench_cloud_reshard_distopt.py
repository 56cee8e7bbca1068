"""Benchmark ``convert-reshard`` of a Megatron checkpoint WITH its DistributedOptimizer state from S3.

Run from the repository root::

    .venv/bin/python bench/bench_cloud_reshard_distopt.py [--hidden 1024] [--layers 4] [--ffn 4096]
                                                          [--vocab 32000] [--repeat 1] [--baseline REPO]

The checkpoint is REAL: megatron-core 0.16.1 trains a GPT model one step at TP2 x DP2 on 4 gloo CPU
processes and saves it with its ``dp_reshardable`` optimizer state (SkyRL's default), through the
test-fixture writer ``tests/realckpt/distopt_worker.py`` with a larger model (defaults: hidden
1024, 4 layers, ffn 4096, vocabulary 32000, fp32 params: ~1.9 GB, three quarters of it the
optimizer's fp32 param and two Adam moments in flat per-bucket buffers). Written once, cached in
``--dir`` (default ``$TMPDIR/ckptctl-bench-distopt``).

On moto's S3 server (in this process, loopback), per round, each in a fresh child process (wall
time around the child, interpreter start and imports included):

  a. ``aws s3 cp --recursive`` download of the checkpoint                     (the yardstick)
  b. ``convert-reshard s3://…/checkpoint --out LOCAL --tp 1 --dp 2``          (this checkout)
  c. the same from ``--baseline REPO`` (e.g. a ``git worktree`` of the commit before a change)

Printed: wall, ratio to a, peak RSS, the ranged GETs made, and whether b's and c's outputs are
the same files (sha256 each; the run marker and ``.metadata``, which name the run, left out).
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

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

from bench_cloud_export import REPO, S3Side, digest_dir, du, run_child  # noqa: E402

sys.path.insert(0, os.path.join(REPO, "tests", "realckpt"))

TARGET = ["--tp", "1", "--pp", "1", "--dp", "2"]
RUN_FILES = ("ckptctl-output.json", ".metadata")


def checkpoint(args) -> str:
    """The cached dp_reshardable checkpoint of this size (written by megatron-core if missing)."""
    from distopt_writer import ADAM, DENSE_MODEL

    size = f"H{args.hidden}_L{args.layers}_F{args.ffn}_V{args.vocab}"
    root = os.path.join(args.dir, size)
    ckpt = os.path.join(root, "checkpoint")
    if os.path.isfile(os.path.join(root, "COMPLETE")):
        return ckpt
    shutil.rmtree(root, ignore_errors=True)
    os.makedirs(root)
    model = dict(DENSE_MODEL, num_layers=args.layers, hidden=args.hidden, heads=16, kv_heads=4, ffn=args.ffn,
                 padded_vocab=args.vocab)
    job = dict(mode="save", tp=2, pp=1, ep=1, etp=1, world_size=4, format="dp_reshardable", steps=1, seed=7,
               bucket_size=None, params_dtype="float32", store_file=os.path.join(root, "store"),
               ckpt_dir=ckpt, ref_dir=os.path.join(root, "ref"), model=model, optimizer=ADAM, timeout=1200)
    jobs = os.path.join(root, "jobs.json")
    with open(jobs, "w") as f:
        json.dump([job], f)
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, os.path.join(REPO, "tests", "realckpt", "distopt_worker.py"), jobs],
                          capture_output=True, text=True, env={**os.environ, "PYTHONWARNINGS": "ignore"})
    if proc.returncode != 0:
        raise SystemExit(f"distopt_worker failed (rc {proc.returncode}):\n{proc.stderr[-4000:]}")
    shutil.rmtree(os.path.join(root, "ref"), ignore_errors=True)  # the writer's per-rank truth: not needed here
    with open(os.path.join(root, "COMPLETE"), "w") as f:
        f.write("ok\n")
    print(f"wrote the checkpoint in {time.perf_counter() - t0:.0f} s: {ckpt}")
    return ckpt


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--dir", default=os.path.join(tempfile.gettempdir(), "ckptctl-bench-distopt"))
    p.add_argument("--hidden", type=int, default=1024)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--ffn", type=int, default=4096)
    p.add_argument("--vocab", type=int, default=32000)
    p.add_argument("--repeat", type=int, default=1)
    p.add_argument("--baseline", help="another checkout of ckptctl, run beside this one")
    a = p.parse_args()
    src = checkpoint(a)
    work = tempfile.mkdtemp(prefix="ckptctl-bench-distopt-")
    side = S3Side()
    variants = [("this checkout", None)] + ([("baseline", os.path.abspath(a.baseline))] if a.baseline else [])
    try:
        side.upload(src, "distopt/checkpoint")
        print(f"source {du(src) / 1e9:.2f} GB (dp_reshardable, TP2 x DP2) -> {' '.join(TARGET)}")
        print(f"{'round':>5} {'run':<34} {'wall s':>7} {'x down':>7} {'peak RSS MB':>12} {'GETs':>6}  output")
        for r in range(a.repeat):
            down_dir = os.path.join(work, "down")
            down = side.download("distopt/checkpoint", down_dir)["wall_s"]
            shutil.rmtree(down_dir, ignore_errors=True)
            print(f"{r:>5} {side.yard_down:<34} {down:>7.2f} {1.0:>7.2f} {'-':>12} {'-':>6}")
            digests = {}
            for label, repo in (variants if r % 2 == 0 else variants[::-1]):
                out = os.path.join(work, "out")
                shutil.rmtree(out, ignore_errors=True)
                argv = ["convert-reshard", side.url("distopt/checkpoint"), "--out", out, *TARGET, "--json"]
                res = run_child("cli", json.dumps(argv), repo=repo)
                digests[label] = {k: v for k, v in digest_dir(out).items() if os.path.basename(k) not in RUN_FILES}
                shutil.rmtree(out, ignore_errors=True)
                same = ""
                if len(digests) == 2:
                    same = "same files" if len(set(map(json.dumps, digests.values()))) == 1 else "OUTPUTS DIFFER"
                print(f"{r:>5} {'convert-reshard (' + label + ')':<34} {res['wall_s']:>7.2f} {res['wall_s'] / down:>7.2f} "
                      f"{res['peak_rss_mb']:>12.0f} {res['gets']:>6}  {same}")
    finally:
        side.close()
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
