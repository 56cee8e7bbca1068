"""export-hf of Megatron MoE checkpoints with more and more expert chunks: does the cost per
tensor stay flat? (issue #11: 235B / 671B MoE models, hundreds of layers x experts.)

Run from the repository root::

    .venv/bin/python bench/bench_export_moe_scale.py [--layers 8,16,32] [--experts 128] [--baseline REPO]

The checkpoints are ``bench/bench_export_moe.py``'s synthetic Megatron MoE ones (its writer,
imported: Qwen3-MoE keys, stacked ``decoder.layers.*`` tensors, EP=4), with TINY tensors
(hidden 64, expert FFN 64, vocab 1000) so that the figures are the per-tensor work, not bytes:
each layer holds ``experts`` x 3 routed-expert matrices, each its own chunk of a stacked tensor
(32 layers x 128 experts: 12,288 expert matrices, the fc1 tensor alone 8,192 chunks). They are
written once into ``--dir`` and reused.

Each export runs local -> local in a fresh child process (``python -m ckptctl export-hf``; the
interpreter's start and imports included, about 2 s). Prints per size: tensors exported, wall,
and the milliseconds each tensor beyond the previous size's added (the start-up cancels out);
then how much that grew from the first step of sizes to the last (1.0x: flat). ``--baseline REPO``:
the same exports with ckptctl imported from that checkout (e.g. a ``git worktree`` of an older
commit), run first.
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

import bench_export_moe  # this script's directory is on sys.path

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def checkpoint(directory: str, layers: int, experts: int) -> str:
    args = argparse.Namespace(layers=layers, experts=experts, hidden=64, moe_ffn=64, vocab=1000, ep=4)
    src = os.path.join(directory, f"L{layers}_E{experts}", "policy")
    if not os.path.isfile(os.path.join(src, "metadata.json")):
        t0 = time.perf_counter()
        bench_export_moe.write_checkpoint(src, args, moe=True)
        print(f"wrote {src} in {time.perf_counter() - t0:.1f} s", flush=True)
    return src


def export(src: str, out: str, repo: str) -> tuple[float, int]:
    shutil.rmtree(out, ignore_errors=True)
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "ckptctl", "export-hf", src, "--out", out, "--json"],
                          env=dict(os.environ, PYTHONPATH=repo), cwd=repo,  # -m puts the cwd first on sys.path
                          capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        raise SystemExit(f"export of {src} failed: {proc.stderr.strip().splitlines()[-1:]}")
    tensors = json.loads(proc.stdout)["tensors"]
    shutil.rmtree(out, ignore_errors=True)
    return wall, tensors


def report(label: str, rows: list[tuple[int, int, float]]) -> None:
    """Per size: wall and the cost of each tensor beyond the previous size's (the start-up, the
    same for every size, cancels out); then how much that cost grew from the first step to the last."""
    print(f"[{label}]")
    print(f"  {'layers':>6} {'tensors':>8} {'wall s':>7} {'ms per extra tensor':>20}")
    steps = []
    for i, (layers, tensors, wall) in enumerate(rows):
        step = ""
        if i:
            _, before_tensors, before_wall = rows[i - 1]
            steps.append((wall - before_wall) / (tensors - before_tensors) * 1e3)
            step = f"{steps[-1]:.3f}"
        print(f"  {layers:>6} {tensors:>8} {wall:>7.2f} {step:>20}")
    if len(steps) >= 2:
        print(f"  the cost of an extra tensor grew {steps[-1] / steps[0]:.1f}x from the first step to the last "
              "(1.0x: flat)")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--dir", default=os.path.join(tempfile.gettempdir(), "ckptctl-bench-moe-scale"))
    p.add_argument("--layers", default="8,16,32")
    p.add_argument("--experts", type=int, default=128)
    p.add_argument("--baseline", metavar="REPO")
    a = p.parse_args()
    sizes = [int(x) for x in a.layers.split(",") if x.strip()]
    sources = {layers: checkpoint(a.dir, layers, a.experts) for layers in sizes}
    print(f"export-hf local -> local, {a.experts} experts of 64 x 64 per layer, EP4; machine: {os.cpu_count()} CPUs")
    for label, repo in ([("baseline " + a.baseline, os.path.abspath(a.baseline))] if a.baseline else []) + [
            ("this checkout", REPO)]:
        rows = []
        for layers in sizes:
            wall, tensors = export(sources[layers], os.path.join(a.dir, "out"), repo)
            rows.append((layers, tensors, wall))
        report(label, rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
