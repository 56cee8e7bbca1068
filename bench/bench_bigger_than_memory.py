"""Export a checkpoint several times larger than the memory the export may use, under a watchdog.

Run from the repository root::

    .venv/bin/python bench/bench_bigger_than_memory.py [--dir DIR] [--layers 20] [--experts 32]
                                                       [--rss-limit 1GiB] [--max-memory 256MiB]
                                                       [--targets local,s3]

Prints figures only (no asserts). Goal (issue #11, "bigger-than-memory proof"): a checkpoint
larger than the memory the export is allowed completes with flat RSS and the same output.

The checkpoint is the synthetic Megatron MoE checkpoint of ``bench/bench_export_moe.py`` (its
writer, imported: ckptctl's own DCP file writer, Qwen3-MoE keys, EP=4), by default 20 layers x
32 experts x 3 x 1024 x 1024 bf16 = 4.03 GB of experts, ~4.4 GB on disk. Each export runs in a
fresh child process; this script samples the child's ``VmRSS`` every 20 ms and KILLS it when it
passes ``--rss-limit`` (the watchdog: a run that needed more memory fails instead of finishing),
and prints the peak and the RSS at each quarter of the run (flat = no growth with progress).

Targets: ``local`` (export to a local directory) and ``s3`` (to moto's S3 server on loopback,
with ``--max-memory`` bounding the upload buffers and ``--concurrency 8`` parts in flight). The
S3 output is downloaded and compared with the local one, file by file (sha256). The source is
local for both: moto reads a whole object for every ranged GET, so a ranged read of a 1 GB
``.distcp`` per expert would measure moto, not ckptctl.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time

import bench_export_moe  # this script's directory is on sys.path
from bench_cloud_export import S3Side, digest_dir

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

_CHILD = r"""
import sys
from ckptctl.cli import app
try:
    app(["export-hf", sys.argv[1], "--out", sys.argv[2], "--json"] + sys.argv[3:], standalone_mode=False)
except SystemExit as exc:
    if exc.code:
        raise
"""


def parse_size(text: str) -> int:
    from ckptctl.formats.hf_writer import parse_size as parse

    return parse(text)


def vm_rss(pid: int) -> int | None:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def watched_export(src: str, out: str, args: list[str], limit: int, env: dict) -> dict:
    """Run one export child; sample its RSS; kill it past ``limit``."""
    t0 = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-c", _CHILD, src, out, *args], cwd=REPO, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    samples: list[tuple[float, int]] = []
    killed = threading.Event()

    def watch() -> None:
        while proc.poll() is None:
            rss = vm_rss(proc.pid)
            if rss is not None:
                samples.append((time.perf_counter() - t0, rss))
                if rss > limit:
                    killed.set()
                    proc.kill()
                    return
            time.sleep(0.02)

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    stdout, stderr = proc.communicate()
    watcher.join()
    wall = time.perf_counter() - t0
    peak = max((r for _, r in samples), default=0)
    quarters = []
    for q in (0.25, 0.5, 0.75, 1.0):
        before = [r for t, r in samples if t <= q * wall]
        quarters.append(max(before, default=0))
    result = {"wall_s": wall, "peak_rss": peak, "rss_by_quarter": quarters, "killed": killed.is_set(),
              "rc": proc.returncode}
    if proc.returncode == 0:
        result["summary"] = json.loads(stdout)
    else:
        result["error"] = (stderr.strip().splitlines() or ["?"])[-1]
    return result


def child_env() -> dict:
    # the S3 server's endpoint and credentials are in os.environ once it runs; 60 s read
    # timeout as the aws CLI has: moto completes a multi-GB multipart upload slowly
    return dict(os.environ, CKPTCTL_STORE_READ_TIMEOUT="60")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dir", default=os.path.join(tempfile.gettempdir(), "ckptctl-bench-big"))
    parser.add_argument("--layers", type=int, default=20)
    parser.add_argument("--experts", type=int, default=32)
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--moe-ffn", type=int, default=1024)
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--ep", type=int, default=4)
    parser.add_argument("--rss-limit", default="1GiB", help="the watchdog kills an export past this RSS")
    parser.add_argument("--max-memory", default="256MiB", help="export-hf --max-memory for the S3 target")
    parser.add_argument("--targets", default="local,s3")
    args = parser.parse_args()
    limit = parse_size(args.rss_limit)
    targets = [t for t in args.targets.split(",") if t]

    size = f"L{args.layers}_E{args.experts}_H{args.hidden}_F{args.moe_ffn}_V{args.vocab}_ep{args.ep}"
    src = os.path.join(args.dir, size, "policy")
    if not os.path.isfile(os.path.join(src, "metadata.json")):
        t0 = time.perf_counter()
        bench_export_moe.write_checkpoint(src, args, moe=True)
        print(f"wrote the checkpoint in {time.perf_counter() - t0:.1f} s: {src}")
    on_disk = sum(os.path.getsize(os.path.join(src, n)) for n in os.listdir(src) if n.endswith(".distcp"))
    print(f"checkpoint: {on_disk / 2**30:.2f} GiB of .distcp ({args.layers} layers x {args.experts} experts); "
          f"watchdog: kill past {limit / 2**30:.2f} GiB RSS (the checkpoint is {on_disk / limit:.1f}x that)")
    print(f"{'target':<8} {'wall s':>7} {'peak RSS MiB':>13} {'RSS by quarter of the run, MiB':>34} {'written GiB':>12}  "
          f"result")
    local_out = os.path.join(args.dir, size, "export")
    local_digest = None
    s3 = None
    try:
        for target in targets:
            if target == "local":
                shutil.rmtree(local_out, ignore_errors=True)
                res = watched_export(src, local_out, [], limit, child_env())
                if res["rc"] == 0:
                    local_digest = digest_dir(local_out)
                same = "-"
            elif target == "s3":
                s3 = s3 or S3Side()
                rel = f"big-{int(time.time())}"
                res = watched_export(src, s3.url(rel), ["--max-memory", args.max_memory, "--concurrency", "8"],
                                     limit, child_env())
                same = "-"
                if res["rc"] == 0 and local_digest is not None:
                    same = "same output" if s3.digest(rel) == local_digest else "OUTPUT DIFFERS"
                s3.delete(rel)
            else:
                raise SystemExit(f"unknown target {target!r}")
            quarters = " ".join(f"{r / 2**20:7.0f}" for r in res["rss_by_quarter"])
            written = res.get("summary", {}).get("bytes", 0) / 2**30
            status = ("KILLED by the watchdog" if res["killed"] else
                      f"ok {same if target != 'local' else ''}".strip() if res["rc"] == 0 else f"failed: {res['error']}")
            print(f"{target:<8} {res['wall_s']:>7.1f} {res['peak_rss'] / 2**20:>13.0f} {quarters:>34} {written:>12.2f}  "
                  f"{status}")
    finally:
        if s3 is not None:
            s3.close()
        shutil.rmtree(local_out, ignore_errors=True)


if __name__ == "__main__":
    main()
