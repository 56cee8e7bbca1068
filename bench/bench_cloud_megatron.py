"""Benchmark ``export-hf`` of a Megatron checkpoint from S3 against ``aws s3 cp --recursive``.

Run from the repository root::

    .venv/bin/python bench/bench_cloud_megatron.py [--kinds dense,moe] [--layers 3] [--repeat 1]

The checkpoints are the SYNTHETIC torch_dist ones of ``bench/bench_export_moe.py`` (written with
ckptctl's DCP writer, cached in ``--dir``), with fewer layers: at the defaults (3 layers, hidden
1024, 32 experts x ffn 1024, vocabulary 32000, bf16) about 0.73 GB each. ``dense``: one
``[2 x 32768, 1024]`` fc1 chunk (128 MiB) per layer, read whole; ``moe``: one chunk per
(layer, expert, gate/up half), 2 MiB each, read expert by expert as regions.

On moto's S3 server (in this process, loopback), per round and per checkpoint, each in a fresh
child process (wall time around the child: interpreter start and imports included):

  a. ``aws s3 cp --recursive`` download of the component                (the yardstick)
  b. ``export-hf s3://…/policy --out LOCAL --concurrency 1``             ("before": no read-ahead,
     what a Megatron source got before its reads were planned: one tensor read ahead, the chunks
     of one tensor fetched 8 at a time by the reader)
  c. ``export-hf s3://…/policy --out LOCAL``                             ("after": the default
     read-ahead of the chunks in the conversion's order, 8 requests in flight, 1 GiB budget)

Printed: wall, ratio to a, peak RSS, the ranged GETs made; b's and c's outputs are compared
(sha256 per file). Goal (issue #11): c <= 1.0x a.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
from types import SimpleNamespace

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

import bench_export_moe  # noqa: E402
from bench_cloud_export import S3Side, digest_dir, du, run_child  # noqa: E402

VARIANTS = [("before", ["--concurrency", "1"]), ("after", [])]


def checkpoint(args, kind: str) -> str:
    shape = SimpleNamespace(layers=args.layers, experts=args.experts, hidden=args.hidden, moe_ffn=args.moe_ffn,
                            vocab=args.vocab, ep=args.ep)
    size = f"L{args.layers}_E{args.experts}_H{args.hidden}_F{args.moe_ffn}_V{args.vocab}_ep{args.ep}"
    path = os.path.join(args.dir, size, kind, "policy")
    if not os.path.isfile(os.path.join(path, "metadata.json")):
        t0 = time.perf_counter()
        bench_export_moe.write_checkpoint(path, shape, moe=kind == "moe")
        print(f"wrote the {kind} checkpoint in {time.perf_counter() - t0:.1f} s: {path}")
    return path


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--dir", default=os.path.join(tempfile.gettempdir(), "ckptctl-bench-cloud-megatron"))
    p.add_argument("--kinds", default="dense,moe")
    p.add_argument("--repeat", type=int, default=1)
    p.add_argument("--layers", type=int, default=3)
    p.add_argument("--experts", type=int, default=32)
    p.add_argument("--hidden", type=int, default=1024)
    p.add_argument("--moe-ffn", type=int, default=1024)
    p.add_argument("--vocab", type=int, default=32000)
    p.add_argument("--ep", type=int, default=4)
    a = p.parse_args()
    sources = {kind: checkpoint(a, kind) for kind in a.kinds.split(",")}
    work = tempfile.mkdtemp(prefix="ckptctl-bench-cloud-megatron-")
    side = S3Side()
    try:
        print(f"{'checkpoint':<10} {'round':>5} {'run':<22} {'wall s':>7} {'x down':>7} {'peak RSS MB':>12} "
              f"{'GETs':>6}  output")
        for kind, src in sources.items():
            rel = f"megatron-{kind}/policy"
            side.upload(src, rel)
            print(f"{kind:<10} source {du(src) / 1e9:.2f} GB")
            for r in range(a.repeat):
                down_dir = os.path.join(work, "down")
                shutil.rmtree(down_dir, ignore_errors=True)
                down = side.download(rel, down_dir)["wall_s"]
                shutil.rmtree(down_dir, ignore_errors=True)
                print(f"{kind:<10} {r:>5} {side.yard_down:<22} {down:>7.2f} {1.0:>7.2f} {'-':>12} {'-':>6}")
                digests = {}
                for label, options in VARIANTS:
                    out = os.path.join(work, label)
                    shutil.rmtree(out, ignore_errors=True)
                    res = run_child("export", side.url(rel), out, __import__("json").dumps(options))
                    digests[label] = digest_dir(out)
                    shutil.rmtree(out, ignore_errors=True)
                    same = "same as before" if label != "before" and digests[label] == digests["before"] else (
                        "OUTPUT DIFFERS" if label != "before" else "")
                    print(f"{kind:<10} {r:>5} {'export-hf ' + label:<22} {res['wall_s']:>7.2f} "
                          f"{res['wall_s'] / down:>7.2f} {res['peak_rss_mb']:>12.0f} {res['gets']:>6}  {same}")
            side.delete(f"megatron-{kind}")
    finally:
        side.close()
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
