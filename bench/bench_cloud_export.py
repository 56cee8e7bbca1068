"""Benchmark ``export-hf`` on object stores against plain bulk transfers of the same bytes.

Run from the repository root::

    .venv/bin/python bench/bench_cloud_export.py [--dir DIR] [--backends s3,gs] [--repeat N]
                                                 [--export-args "--concurrency 8 --max-memory 1GiB"]

Uses a checkpoint of ``bench/bench_export.py``'s kind (a REAL fp32 W=4 FSDP2 ``policy/``, written
by its generator and cached in ``--dir``, default ``$TMPDIR/ckptctl-bench-export``; written here
first if missing), by default 28 layers (``--layers``; hidden 1024, ffn 3072, vocab 32000), as a
MODEL-ONLY component (the ``optim_*`` files left out, as ``prune --drop-optimizer`` leaves it:
export-hf never reads them, and a yardstick that downloads them would flatter the export): 4 model
files of ~403 MB + extra-state files + ``huggingface/``, ~1.61 GB, the >= 1.5 GB issue #11 asks
for (``--layers 24``, ~1.42 GB, is the checkpoint the other export benches use).

S3 (moto's server, in this process on loopback): the component is uploaded once, then each
round times, in this order, each in a fresh child process (wall time around the child: the
interpreter start, imports and exit included, for the yardsticks as for the exports; an export
child leaves as the ``ckptctl`` command does, through ``exit_process``):

  a. ``aws s3 cp --recursive`` download of the source component             (yardstick "down")
  b. ``export-hf s3://…/policy --out LOCAL``                                 -> ratio to a
  c. ``aws s3 cp --recursive`` upload of b's output                          (yardstick "up")
  c'. (S3) ckptctl's own upload path alone, the same files (:func:`_child_upload`: no conversion,
      no torch): not a goal; the floor an export to S3 cannot go under, shown beside c
  d. ``export-hf LOCAL_POLICY --out s3://…``                                 -> ratio to c
  e. ``export-hf s3://…/policy --out s3://…``                                -> ratio to a + c

GCS (gcp-storage-emulator, a subprocess on loopback): the same five, the yardsticks being
gcsfs's own bulk transfers (``fs.get(recursive=True)`` / ``fs.put(recursive=True)``, in a child).
The emulator keeps every object it was ever sent in memory, deleted ones included (at 1.61 GB it
reached 22 GB in a fourth round and the kernel killed it): each GCS round starts a fresh emulator
and uploads the source to it again.

Goals (issue #11): b <= 1.0x a, d <= 1.0x c, e <= 1.0x (a + c). Printed per export: wall, ratio,
peak RSS (the child's VmHWM) and a profile: seconds inside ranged GETs (summed over threads, so
it may exceed the wall with concurrent reads), inside CRC-32, and the main thread's seconds
inside the writer (``add`` + ``finish``: writing / uploading / waiting for upload slots). On S3,
from the server's own request log, for every upload (the aws CLI's and the exports'): when its
first part arrived after the child was started ("1st part s") and how long the server took to
complete the multipart uploads ("commit s": moto assembles the object then, 1.42 GB in one
piece). Output of every export is checked byte-identical to the first export of the round (sha256 per file;
remote outputs read with one GET per object). Export children run with
CKPTCTL_STORE_READ_TIMEOUT=60 (the aws CLI's default): see :func:`run_child`.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shlex
import shutil
import subprocess
import sys
import tempfile
import time

from _measure import exit_as_ckptctl, peak_rss_mb  # this script's directory is on sys.path

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(REPO, "tests"))
# ``--baseline REPO``: an export child imports ckptctl from that checkout instead (e.g. a
# ``git worktree`` of the commit before a change), so before/after run in the same round.
sys.path.insert(0, os.environ.get("CKPTCTL_BENCH_REPO") or REPO)
DEFAULT_DIR = os.path.join(tempfile.gettempdir(), "ckptctl-bench-export")
BUCKET = "ckptctl-bench"


def du(path: str) -> int:
    return sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(path) for f in fs)


def digest_dir(path: str) -> dict[str, str]:
    out = {}
    for d, _, files in os.walk(path):
        for f in files:
            full = os.path.join(d, f)
            h = hashlib.sha256()
            with open(full, "rb") as fh:
                for block in iter(lambda: fh.read(1 << 24), b""):
                    h.update(block)
            out[os.path.relpath(full, path)] = h.hexdigest()
    return out


# -- children ----------------------------------------------------------------------------------
def _child_export(src: str, out: str, args: list[str]) -> dict:
    return _child_cli(["export-hf", src, "--out", out, "--json"] + args)


def _child_cli(argv: list[str]) -> dict:
    """Run ``ckptctl ARGV`` in this process, timing its ranged GETs (and export's writer)."""
    import threading

    from ckptctl.cli import app
    from ckptctl.formats import hf_writer, torchzip
    from ckptctl.storage import Store

    from ckptctl import storage

    if os.environ.get("CKPTCTL_BENCH_READ_REQUEST"):  # bench-only knob: the read-ahead's request size
        storage.READ_REQUEST_SIZE = int(os.environ["CKPTCTL_BENCH_READ_REQUEST"])
    lock = threading.Lock()
    prof = {"get_s": 0.0, "get_bytes": 0, "gets": 0, "writer_s": 0.0}
    # the requests themselves (with a read-ahead: its GETs, not the reads it serves)
    meth = "_read_range_direct" if hasattr(Store, "_read_range_direct") else "read_range"
    read_range = getattr(Store, meth)

    def timed_read_range(self, rel, start, end):
        t0 = time.perf_counter()
        data = read_range(self, rel, start, end)
        with lock:
            prof["get_s"] += time.perf_counter() - t0
            prof["get_bytes"] += len(data)
            prof["gets"] += 1
        return data

    setattr(Store, meth, timed_read_range)
    for meth in ("add", "finish"):
        orig = getattr(hf_writer.HfModelWriter, meth)

        def wrapped(self, *a, _orig=orig, **k):
            t0 = time.perf_counter()
            try:
                return _orig(self, *a, **k)
            finally:
                prof["writer_s"] += time.perf_counter() - t0

        setattr(hf_writer.HfModelWriter, meth, wrapped)
    try:
        app(argv, standalone_mode=False)
    except SystemExit as exc:
        if exc.code:
            raise
    prof["crc_s"] = torchzip.CRC_STATS.seconds
    return prof


def _child_gcsfs(op: str, src: str, dst: str) -> dict:
    from ckptctl.storage import open_store

    fs = open_store("gs://" + BUCKET).fs  # gcsfs, as ckptctl configures it for the emulator
    if op == "get":
        fs.get(src.rstrip("/") + "/", dst.rstrip("/") + "/", recursive=True)
    else:
        fs.put(src.rstrip("/") + "/", dst.rstrip("/"), recursive=True)
    return {}


def _child_upload(src: str, url: str) -> dict:
    """Upload the files under ``src`` to ``url`` through the object-store target export-hf writes
    with (its default part size, concurrency and budget), nothing converted and torch never
    imported: what ckptctl's upload path alone takes for the bytes of an export's output."""
    from ckptctl.formats.hf_writer import DEFAULT_UPLOAD_BLOCK_SIZE, _ObjectStoreTarget
    from ckptctl.ops.transfer import Transfer
    from ckptctl.storage import open_store

    transfer = Transfer.make()
    _, upload_budget = transfer.budgets(False, True)  # as a local -> bucket export splits it
    target = _ObjectStoreTarget(open_store(url), True, DEFAULT_UPLOAD_BLOCK_SIZE, transfer.concurrency,
                                upload_budget or None)
    for rel in sorted(os.path.relpath(os.path.join(d, f), src) for d, _, files in os.walk(src) for f in files):
        path = os.path.join(src, rel)
        with open(path, "rb") as fh:
            size = os.path.getsize(path)
            if size < DEFAULT_UPLOAD_BLOCK_SIZE:
                target.put(rel, fh.read())
                continue
            f = target.open(rel, size)
            for block in iter(lambda: fh.read(4 << 20), b""):
                target.write(f, block)
            target.close(f)
    assert "torch" not in sys.modules
    return {}


def _child_main(mode: str, result_file: str, *rest: str) -> int:
    t0 = time.perf_counter()
    if mode == "export":
        extra = _child_export(rest[0], rest[1], json.loads(rest[2]))
    elif mode == "upload":
        extra = _child_upload(rest[0], rest[1])
    elif mode == "cli":
        extra = _child_cli(json.loads(rest[0]))
    else:
        extra = _child_gcsfs(rest[0], rest[1], rest[2])
    with open(result_file, "w") as f:
        json.dump({"inner_s": time.perf_counter() - t0, "peak_rss_mb": peak_rss_mb(), **extra}, f)
    return 0


def run_child(*args: str, repo: str | None = None) -> dict:
    with tempfile.NamedTemporaryFile(suffix=".json", delete=False) as tmp:
        result_file = tmp.name
    try:
        # 60 s to answer, as the aws CLI allows: moto completes a 1.4 GB multipart upload in
        # 15-30 s on a busy 2-core machine without the keep-alive whitespace S3 sends, so
        # ckptctl's 15 s default would time the completion out and retry it (moto then races
        # the two completions). The yardsticks and every variant run with the same setting.
        env = dict(os.environ, CKPTCTL_BENCH_REPO=repo or REPO, CKPTCTL_STORE_READ_TIMEOUT="60")
        t0 = time.perf_counter()
        proc = subprocess.run([sys.executable, os.path.abspath(__file__), "--_child", args[0], result_file, *args[1:]],
                              cwd=REPO, capture_output=True, text=True, check=False, env=env)
        wall = time.perf_counter() - t0
        if proc.returncode != 0:
            raise SystemExit(f"{args} failed (rc={proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
        with open(result_file) as f:
            res = json.load(f)
    finally:
        os.unlink(result_file)
    res["wall_s"] = wall
    return res


def run_cmd(cmd: list[str]) -> dict:
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        raise SystemExit(f"{cmd} failed (rc={proc.returncode}):\n{proc.stdout[-2000:]}\n{proc.stderr[-2000:]}")
    return {"wall_s": wall}


# -- the runs ------------------------------------------------------------------------------------
def model_only_copy(policy: str, work: str) -> str:
    """A model-only component (hard links: no copy), the source of every run."""
    dst = os.path.join(work, "src", "policy")
    if os.path.isdir(dst):
        return dst
    for d, _, files in os.walk(policy):
        rel = os.path.relpath(d, policy)
        os.makedirs(os.path.join(dst, rel), exist_ok=True)
        for f in files:
            if not f.startswith("optim_"):
                os.link(os.path.join(d, f), os.path.join(dst, rel, f))
    return dst


class S3Side:
    name = "s3"
    fresh_each_round = False

    def digest(self, rel: str) -> dict[str, str]:
        """sha256 of every object under ``rel``, one whole-object GET each (moto reads the whole
        object for every ranged GET, so a ranged download of a 1.4 GB shard costs it minutes)."""
        from storage_servers import _boto3_client

        client = _boto3_client(self.server.endpoint)
        out = {}
        prefix = rel.rstrip("/") + "/"
        for page in client.get_paginator("list_objects_v2").paginate(Bucket=BUCKET, Prefix=prefix):
            for obj in page.get("Contents", []):
                h = hashlib.sha256()
                for chunk in client.get_object(Bucket=BUCKET, Key=obj["Key"])["Body"].iter_chunks(1 << 24):
                    h.update(chunk)
                out[obj["Key"][len(prefix):]] = h.hexdigest()
        return out

    def __init__(self):
        from storage_servers import create_s3_bucket, export_store_env, start_s3_server

        self.server = start_s3_server(bucket=None)
        create_s3_bucket(self.server.endpoint, BUCKET)
        self.restore = export_store_env(s3_endpoint=self.server.endpoint)
        self.aws = ["aws", "s3", "--endpoint-url", self.server.endpoint, "--only-show-errors"]

    def url(self, rel: str) -> str:
        return f"s3://{BUCKET}/{rel}"

    def uploads_since(self, started: float) -> dict:
        """From the server's request log: the first part's arrival after ``started``
        (``time.monotonic()``) and the seconds spent completing multipart uploads since."""
        timings = [(t, secs, r) for t, secs, r in self.server.counter.timings if t >= started]
        parts = [t for t, _, r in timings if r.method == "PUT" and "partNumber=" in r.query]
        commits = [secs for _, secs, r in timings if r.method == "POST" and "uploadId=" in r.query]
        return {"first_part_s": min(parts) - started if parts else None,
                "commit_s": sum(commits) if commits else None}

    def upload(self, local: str, rel: str) -> dict:
        started = time.monotonic()
        return {**run_cmd(self.aws + ["cp", "--recursive", local, self.url(rel)]), **self.uploads_since(started)}

    def download(self, rel: str, local: str) -> dict:
        return run_cmd(self.aws + ["cp", "--recursive", self.url(rel), local])

    def upload_floor(self, local: str, rel: str) -> dict:
        started = time.monotonic()
        return {**run_child("upload", local, self.url(rel)), **self.uploads_since(started)}

    def delete(self, rel: str) -> None:
        run_cmd(self.aws + ["rm", "--recursive", self.url(rel)])

    def close(self):
        self.restore()
        self.server.stop()

    yard_down, yard_up = "aws s3 cp (down)", "aws s3 cp (up)"


class GcsSide:
    name = "gs"

    def digest(self, rel: str) -> dict[str, str]:
        from ckptctl.storage import open_store

        store = open_store(self.url(rel))
        return {e.path: hashlib.sha256(store.read_bytes(e.path)).hexdigest() for e in store.walk()}

    fresh_each_round = True  # the emulator never frees an object: see the module docstring

    def __init__(self):
        from storage_servers import export_store_env, start_gcs_server

        self.server = start_gcs_server(bucket=BUCKET)
        self.restore = export_store_env(gcs_endpoint=self.server.endpoint)

    def restart(self):
        self.close()
        self.__init__()

    def url(self, rel: str) -> str:
        return f"gs://{BUCKET}/{rel}"

    def uploads_since(self, started: float) -> dict:
        return {}  # the emulator keeps no request log

    upload_floor = None  # the GCS goals hold: no floor to show

    def upload(self, local: str, rel: str) -> dict:
        return run_child("gcsfs", "put", local, f"{BUCKET}/{rel}")

    def download(self, rel: str, local: str) -> dict:
        return run_child("gcsfs", "get", f"{BUCKET}/{rel}", local)

    def delete(self, rel: str) -> None:
        from ckptctl.storage import open_store

        store = open_store(self.url(rel))
        try:
            store.delete_many([e.path for e in store.walk()])
        except Exception:
            pass

    def close(self):
        self.restore()
        self.server.stop()

    yard_down, yard_up = "gcsfs get (down)", "gcsfs put (up)"


def bench_side(side, src_local: str, work: str, rounds: int, variants: list[tuple[str, str | None, list[str]]]
               ) -> list[dict]:
    results = []
    n = side.name
    for r in range(rounds):
        if r == 0 or side.fresh_each_round:
            if r:
                side.restart()
            t0 = time.perf_counter()
            side.upload(src_local, "src/policy")
            print(f"[{n}] source uploaded in {time.perf_counter() - t0:.1f} s ({du(src_local) / 1e9:.2f} GB)",
                  flush=True)
        res: dict = {"exports": {}}
        dl, out_l, ref = (os.path.join(work, d) for d in ("dl", "out_local", "check"))
        for d in (dl, out_l, ref):
            shutil.rmtree(d, ignore_errors=True)
        res["down"] = side.download("src/policy", dl)
        shutil.rmtree(dl, ignore_errors=True)
        want = None
        # odd rounds run the variants in reverse, so that neither side always goes first on a
        # server that has just served the other
        for label, repo, export_args in (variants if r % 2 == 0 else variants[::-1]):
            args_json = json.dumps(export_args)
            e = res["exports"][label] = {}
            shutil.rmtree(out_l, ignore_errors=True)
            e[f"{n}->local"] = run_child("export", side.url("src/policy"), out_l, args_json, repo=repo)
            got = digest_dir(out_l)
            want = want or got
            same = {"c2l": got == want}
            if "up" not in res:
                res["up"] = side.upload(out_l, "up")
                side.delete("up")
                if side.upload_floor:
                    res["floor"] = side.upload_floor(out_l, "floor")
                    side.delete("floor")
            shutil.rmtree(out_l, ignore_errors=True)
            started = time.monotonic()
            e[f"local->{n}"] = run_child("export", src_local, side.url("out_l2c"), args_json, repo=repo)
            e[f"local->{n}"].update(side.uploads_since(started))
            same["l2c"] = side.digest("out_l2c") == want
            side.delete("out_l2c")
            started = time.monotonic()
            e[f"{n}->{n}"] = run_child("export", side.url("src/policy"), side.url("out_c2c"), args_json, repo=repo)
            e[f"{n}->{n}"].update(side.uploads_since(started))
            same["c2c"] = side.digest("out_c2c") == want
            side.delete("out_c2c")
            e["identical"] = same
        results.append(res)
        report_round(side, res, r)
    return results


def _secs(x: float | None) -> str:
    return "-" if x is None else f"{x:.2f}"


def report_round(side, res: dict, r: int) -> None:
    down, up = res["down"]["wall_s"], res["up"]["wall_s"]
    n = side.name
    print(f"\n[{n}] round {r + 1}: {side.yard_down} {down:.2f} s, {side.yard_up} {up:.2f} s"
          + (f" (1st part {_secs(res['up'].get('first_part_s'))} s, commit {_secs(res['up'].get('commit_s'))} s)"
             if "commit_s" in res["up"] else ""))
    if "floor" in res:
        floor = res["floor"]
        print(f"  ckptctl's upload path alone, the same files, nothing converted, no torch: {floor['wall_s']:.2f} s "
              f"({floor['wall_s'] / up:.2f}x the aws CLI's; 1st part {_secs(floor.get('first_part_s'))} s, "
              f"commit {_secs(floor.get('commit_s'))} s, peak RSS {floor['peak_rss_mb']:.0f} MB)")
    print(f"  {'variant':<10} {'export':<12} {'wall s':>7} {'ratio':>6} {'goal':>5} {'RSS MB':>7} {'GET s':>6} "
          f"{'GETs':>5} {'CRC s':>6} {'writer s':>8} {'1st part s':>10} {'commit s':>8}")
    for label, e in res["exports"].items():
        for key, base in ((f"{n}->local", down), (f"local->{n}", up), (f"{n}->{n}", down + up)):
            x = e[key]
            ratio = x["wall_s"] / base
            print(f"  {label:<10} {key:<12} {x['wall_s']:>7.2f} {ratio:>6.2f} {'ok' if ratio <= 1.0 else 'MISS':>5} "
                  f"{x['peak_rss_mb']:>7.0f} {x['get_s']:>6.1f} {x['gets']:>5} {x['crc_s']:>6.2f} "
                  f"{x['writer_s']:>8.2f} {_secs(x.get('first_part_s')):>10} {_secs(x.get('commit_s')):>8}")
        print(f"  {label:<10} outputs byte-identical to the first export: {e['identical']}", flush=True)


def main() -> int:
    if len(sys.argv) > 1 and sys.argv[1] == "--_child":
        status = _child_main(*sys.argv[2:])
        if sys.argv[2] != "gcsfs":
            exit_as_ckptctl(status)
        return status
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--dir", default=DEFAULT_DIR)
    p.add_argument("--layers", type=int, default=28,
                   help="layers of the checkpoint (hidden 1024, ffn 3072, vocab 32000, W=4): 28 -> 1.61 GB of model files")
    p.add_argument("--backends", default="s3,gs")
    p.add_argument("--repeat", type=int, default=1)
    p.add_argument("--export-args", default="", help="extra export-hf options, e.g. '--concurrency 4'")
    p.add_argument("--baseline", metavar="REPO",
                   help="also run each export with ckptctl from this checkout (before/after in one round)")
    a = p.parse_args()
    # several after-variants: --export-args "A|B" (labels: the options)
    variants = ([("before", os.path.abspath(a.baseline), [])] if a.baseline else []) + [
        ((v.strip() or ("after" if a.baseline else "export"))[:10], None, shlex.split(v))
        for v in a.export_args.split("|")]
    backends = a.backends.split(",")
    if len(backends) > 1:
        # One bench process per backend: the S3 server runs inside this process, and the memory
        # it held and freed made the GCS rounds after it up to twice as slow (GCS -> local export
        # 11-15 s after the S3 rounds, 6 s alone): this VM hands freed memory back to its host.
        others = [x for i, x in enumerate(sys.argv[1:]) if not x.startswith("--backends")
                  and not (i > 0 and sys.argv[i] == "--backends")]
        for backend in backends:
            status = subprocess.run([sys.executable, os.path.abspath(__file__), *others, "--backends", backend]).returncode
            if status:
                return status
        return 0
    import bench_export

    shape = argparse.Namespace(world_size=4, hidden=1024, layers=a.layers, intermediate=3072, vocab=32000, lora=False)
    os.makedirs(a.dir, exist_ok=True)
    policy = bench_export.ensure_checkpoint(a.dir, bench_export.job_kwargs(shape))
    work = tempfile.mkdtemp(prefix="ckptctl-bench-cloud-")
    try:
        src_local = model_only_copy(policy, work)
        print(f"source: {src_local} ({du(src_local) / 1e9:.2f} GB, model-only), export args: {a.export_args!r}")
        for backend in backends:
            side = S3Side() if backend == "s3" else GcsSide()
            try:
                bench_side(side, src_local, work, a.repeat, variants)
            finally:
                side.close()
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
