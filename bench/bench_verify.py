"""Benchmark ``verify``'s SHA-256 hashing (what ``--write-manifest`` and a manifest check cost).

Run from the repository root::

    .venv/bin/python bench/bench_verify.py [--shards 4] [--shard-mb 128] [--s3-shard-mb 64]

Prints figures only (no asserts). Goals (issue 12, bench/README.md): hashing at least 0.8x
``sha256sum`` on the same files locally, and at least 0.8x a plain download on the S3 server.

1. local: an HF export of ``--shards`` safetensors shards of random data (page cache warm).
   ``sha256sum`` on all shards vs :func:`ckptctl.ops.verify.hash_files` (files in parallel),
   and one shard alone (one file: no parallelism to help either side); then the whole
   ``verify --write-manifest`` and a ``verify`` checking that manifest, end to end.
2. S3 (moto server in a subprocess, so it does not share this process's GIL): the same
   layout with ``--s3-shard-mb`` shards. A plain download (s3fs ``get`` of the directory into
   a temp dir, and ``cat_file`` of every file with the same thread count ckptctl uses) vs
   ``hash_files`` on the S3 store; then ``verify`` checking the manifest there.
Each timing is the median of ``--repeat`` runs.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import struct
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
sys.path.insert(0, os.path.join(REPO, "tests"))
sys.path.insert(0, REPO)

from storage_servers import BUCKET, create_s3_bucket, export_store_env, start_s3_subprocess_server  # noqa: E402

from ckptctl.formats.manifest import WORKERS, hash_files  # noqa: E402
from ckptctl.ops.verify import verify  # noqa: E402
from ckptctl.storage import open_store  # noqa: E402
from ckptctl.tree import MANIFEST_FILE  # noqa: E402

MIB = 1024 * 1024


def safetensors_shard(nbytes: int, name: str) -> bytes:
    header = json.dumps({name: {"dtype": "U8", "shape": [nbytes], "data_offsets": [0, nbytes]}}).encode()
    header += b" " * (-len(header) % 8)
    return struct.pack("<Q", len(header)) + header + os.urandom(nbytes)


def export_files(shards: int, shard_bytes: int) -> dict[str, bytes]:
    """The files of an HF export: config.json, the index, ``shards`` shards of random bytes."""
    names = [f"model-{i:05d}-of-{shards:05d}.safetensors" for i in range(1, shards + 1)]
    files = {name: safetensors_shard(shard_bytes, f"w{i}") for i, name in enumerate(names)}
    files["model.safetensors.index.json"] = json.dumps(
        {"metadata": {"total_size": shards * shard_bytes},
         "weight_map": {f"w{i}": name for i, name in enumerate(names)}}).encode()
    files["config.json"] = json.dumps({"architectures": ["LlamaForCausalLM"], "model_type": "llama"}).encode()
    return files


def median_time(func, repeat: int) -> float:
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        func()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def rate(nbytes: int, seconds: float) -> str:
    return f"{nbytes / MIB / seconds:8.0f} MiB/s ({seconds:6.2f} s)"


def line(label: str, nbytes: int, seconds: float, baseline: float | None = None) -> None:
    ratio = f"   {baseline / seconds:.2f}x the baseline" if baseline else ""
    print(f"  {label:<44} {rate(nbytes, seconds)}{ratio}")


def bench_local(args) -> None:
    root = tempfile.mkdtemp(prefix="ckptctl-bench-verify-")
    try:
        export = os.path.join(root, "export")
        os.makedirs(export)
        for name, data in export_files(args.shards, args.shard_mb * MIB).items():
            with open(os.path.join(export, name), "wb") as f:
                f.write(data)
        store = open_store(export)
        entries = [e for e in store.walk() if e.path != MANIFEST_FILE]
        total = sum(e.size for e in entries)
        paths = [os.path.join(export, e.path) for e in entries]
        shard = max(entries, key=lambda e: e.size)
        subprocess.run(["cat", *paths], stdout=subprocess.DEVNULL, check=True)  # warm the page cache

        print(f"1. local: {len(entries)} files, {total / MIB:.0f} MiB ({args.shards} shards of {args.shard_mb} MiB); "
              f"{os.cpu_count()} CPUs, {WORKERS} hashing threads")
        base_all = median_time(lambda: subprocess.run(["sha256sum", *paths], stdout=subprocess.DEVNULL, check=True),
                               args.repeat)
        ours_all = median_time(lambda: hash_files(store, entries), args.repeat)
        line("sha256sum, all files", total, base_all)
        line("ckptctl hash_files, all files", total, ours_all, base_all)
        base_one = median_time(lambda: subprocess.run(["sha256sum", os.path.join(export, shard.path)],
                                                      stdout=subprocess.DEVNULL, check=True), args.repeat)
        ours_one = median_time(lambda: hash_files(store, [shard]), args.repeat)
        line("sha256sum, one shard", shard.size, base_one)
        line("ckptctl hash_files, one shard", shard.size, ours_one, base_one)
        write = median_time(lambda: verify(export, write_manifest=True), args.repeat)
        check = median_time(lambda: verify(export), args.repeat)
        line("verify --write-manifest (end to end)", total, write, base_all)
        line("verify with the manifest (end to end)", total, check, base_all)
    finally:
        shutil.rmtree(root, ignore_errors=True)


def bench_s3(args) -> None:
    endpoint, stop = start_s3_subprocess_server()
    restore = export_store_env(s3_endpoint=endpoint)
    tmp = tempfile.mkdtemp(prefix="ckptctl-bench-verify-dl-")
    try:
        create_s3_bucket(endpoint, BUCKET)
        prefix = "bench/export"
        url = f"s3://{BUCKET}/{prefix}"
        store = open_store(url)
        for name, data in export_files(args.shards, args.s3_shard_mb * MIB).items():
            store.write_bytes(name, data)
        entries = [e for e in store.walk() if e.path != MANIFEST_FILE]
        total = sum(e.size for e in entries)
        print(f"2. S3 (moto server in a subprocess): {len(entries)} files, {total / MIB:.0f} MiB "
              f"({args.shards} shards of {args.s3_shard_mb} MiB)")

        def download_get() -> None:
            target = os.path.join(tmp, "get")
            shutil.rmtree(target, ignore_errors=True)
            store.fs.get(store.full_path() + "/", target + "/", recursive=True)

        def download_cat() -> None:
            with ThreadPoolExecutor(WORKERS) as pool:
                list(pool.map(lambda e: store.fs.cat_file(store.full_path(e.path)), entries))

        hash_files(store, entries[:1])  # connect once
        get = median_time(download_get, args.repeat)
        cat = median_time(download_cat, args.repeat)
        ours = median_time(lambda: hash_files(store, entries), args.repeat)
        line("plain download: s3fs get (to local disk)", total, get)
        line(f"plain download: cat_file x {WORKERS} threads", total, cat)
        line("ckptctl hash_files vs s3fs get", total, ours, get)
        line(f"ckptctl hash_files vs cat_file x {WORKERS}", total, ours, cat)
        verify(url, write_manifest=True)
        check = median_time(lambda: verify(url), args.repeat)
        line("verify with the manifest (end to end) vs get", total, check, get)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        restore()
        stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--shards", type=int, default=4)
    parser.add_argument("--shard-mb", type=int, default=128)
    parser.add_argument("--s3-shard-mb", type=int, default=64)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--skip-s3", action="store_true")
    args = parser.parse_args()
    bench_local(args)
    if not args.skip_s3:
        bench_s3(args)


if __name__ == "__main__":
    main()
