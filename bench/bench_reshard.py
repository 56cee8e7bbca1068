"""Benchmark ``convert-reshard`` (Megatron torch_dist) against megatron-core's own way to reshard.

Run from the repository root::

    .venv/bin/python bench/bench_reshard.py [--dir DIR] [--sizes small,deep,big] [--repeat N] [--pp2]

Prints figures only (no asserts). Goal: no slower than megatron-core, and peak memory that does
not grow with the model size (ckptctl holds one target chunk and the source bytes it needs;
megatron holds the whole model + optimizer state of a rank).

What it does:

1. Writes REAL megatron-core ``torch_dist`` checkpoints (tests/realckpt/megatron_writer.py: a
   real mcore GPTModel at TP=2 on 2 gloo ranks, ``dist_checkpointing.save``, fully_reshardable
   optimizer state -> 4 fp32-sized copies of the weights) of two sizes, cached in ``--dir``
   (default: a temp dir named after this script) and reused:
   ``small`` (hidden 512, 4 layers, vocab 8000: ~0.3 GB), ``deep`` (the same tensors, 16 layers:
   ~0.9 GB; the model grows, its largest chunk does not) and ``big`` (hidden 1024, 4 layers,
   vocab 12000: ~1.1 GB; larger tensors too).
2. Reshards each TP=2 -> TP=1 (one target rank), every run in a FRESH child process, in turn:
   * ``ckptctl``: ``reshard_megatron(src, out, tp=1, pp=1)`` (one process);
   * ``megatron``: what megatron-core itself needs for the same result: a process at the
     target layout builds the mcore GPTModel and the optimizer state's sharded state dict,
     ``dist_checkpointing.load`` from the source, then ``dist_checkpointing.save`` at the target
     layout (``("torch_dist", 1)``; megatron's file-writer result queue from a fork-context
     manager, as the test fixtures do: that only makes megatron faster).
   Wall time of the whole child (process start to exit, imports included), the time of the
   work itself (after ``import torch``: the reshard call; after megatron's imports, process
   group and model build: load + save), and the child's peak RSS (``VmHWM``).
3. ``--pp2``: also TP=2 -> TP=2 x PP=2 (4 target ranks) on the big checkpoint: ckptctl in one
   process and under torchrun with 2 processes, megatron with 4 rank processes (peak RSS: the
   largest rank and the sum over ranks).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

from _measure import IMPORT_LINE, peak_rss_mb  # this script's directory is on sys.path

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
TESTS = os.path.join(REPO, "tests")
REALCKPT = os.path.join(TESTS, "realckpt")
sys.path.insert(0, TESTS)

COMMON = dict(tp=2, make_vocab_size_divisible_by=128, optimizer_format="fully_reshardable")
SIZES = {
    "small": dict(hidden=512, ffn=1408, heads=8, kv_heads=4, vocab=8000, num_layers=4),
    # the same tensors as "small", 4x the layers: only the model size grows, not the largest chunk
    "deep": dict(hidden=512, ffn=1408, heads=8, kv_heads=4, vocab=8000, num_layers=16),
    "big": dict(hidden=1024, ffn=2816, heads=16, kv_heads=4, vocab=12000, num_layers=4),
}

_CKPTCTL_CHILD = IMPORT_LINE + r"""
import json, sys, time
t0 = time.perf_counter()
import torch  # as the megatron baseline's "work" excludes its imports
from ckptctl.ops.reshard_megatron import reshard_megatron
t1 = time.perf_counter()
s = reshard_megatron(sys.argv[1], sys.argv[2], tp=int(sys.argv[3]), pp=int(sys.argv[4]))
t2 = time.perf_counter()
print("RESULT " + json.dumps({"work_s": t2 - t1, "import_s": t1 - t0, "peak_rss_mb": peak_rss_mb(),
                              "bytes": s.bytes, "bytes_read": s.bytes_read, "processes": s.processes,
                              "chunks": s.chunks}))
"""

_CKPTCTL_TORCHRUN = IMPORT_LINE + r"""
import json, os, sys, time
t0 = time.perf_counter()
import torch
from ckptctl.ops.reshard_megatron import reshard_megatron
t1 = time.perf_counter()
s = reshard_megatron(sys.argv[1], sys.argv[2], tp=int(sys.argv[3]), pp=int(sys.argv[4]))
t2 = time.perf_counter()
print("RESULT " + json.dumps({"rank": int(os.environ["RANK"]), "work_s": t2 - t1, "import_s": t1 - t0,
                              "peak_rss_mb": peak_rss_mb(), "bytes": s.bytes, "processes": s.processes}))
"""


# ---------------------------------------------------------------------------------------------
# megatron-core baseline: load at the target layout + save (one process per target rank)
# ---------------------------------------------------------------------------------------------
def megatron_rank(job: dict, rank: int) -> dict:
    import dataclasses

    import torch

    torch.set_num_threads(1)
    t0 = time.perf_counter()
    torch.distributed.init_process_group("gloo", init_method="file://" + job["store_file"], rank=rank,
                                         world_size=job["world_size"])
    import megatron_worker
    from megatron.core import dist_checkpointing
    from megatron.core import parallel_state as ps
    from megatron.core.dist_checkpointing.dict_utils import nested_values
    from megatron.core.dist_checkpointing.mapping import ShardedTensor, ShardedTensorFactory

    ps.initialize_model_parallel(job["tp"], job["pp"])
    model = megatron_worker._build_model(job)

    def state_dict(opt_data: dict | None):
        model_sd = model.sharded_state_dict()
        leaves = [v for v in nested_values(model_sd) if isinstance(v, (ShardedTensor, ShardedTensorFactory))]
        opt = {}
        made = {}
        for i, sh in enumerate(leaves):
            for k in ("param", "exp_avg", "exp_avg_sq"):
                data = opt_data[f"{i}.{k}"] if opt_data else torch.empty(sh.data.shape, dtype=torch.float32)
                made[f"{i}.{k}"] = data
                kw = dict(key=f"optimizer.state.{k}.{sh.key}", data=data)
                if isinstance(sh, ShardedTensor):
                    kw["dtype"] = torch.float32
                opt[f"{i}.{k}"] = dataclasses.replace(sh, **kw)
        return {"model": model_sd, "optimizer": opt}, made

    state, opt_data = state_dict(None)
    t1 = time.perf_counter()
    loaded = dist_checkpointing.load(state, job["src"])
    t2 = time.perf_counter()
    # the loaded optimizer tensors are the ones we allocated (loaded in place): save them again
    for k, v in loaded["optimizer"].items():
        if isinstance(v, torch.Tensor) and v.data_ptr() != opt_data[k].data_ptr():
            opt_data[k] = v
    state, _ = state_dict(opt_data)
    state["lr_scheduler"] = loaded.get("lr_scheduler")
    megatron_worker._fork_results_queue()
    if rank == 0:
        os.makedirs(job["dst"], exist_ok=True)
    torch.distributed.barrier()
    dist_checkpointing.save(state, job["dst"], sharded_strategy=("torch_dist", 1))
    torch.distributed.barrier()
    t3 = time.perf_counter()
    ps.destroy_model_parallel()
    return {"rank": rank, "setup_s": t1 - t0, "load_s": t2 - t1, "save_s": t3 - t2, "work_s": t3 - t1,
            "peak_rss_mb": peak_rss_mb()}


def _megatron_child(job_file: str, rank: int) -> int:
    import torch

    sys.path.insert(0, REALCKPT)
    import cuda_shim

    cuda_shim.install()
    job = json.loads(open(job_file).read())
    out = megatron_rank(job, rank)
    print("RESULT " + json.dumps(out), flush=True)
    torch.distributed.destroy_process_group()
    return 0


# ---------------------------------------------------------------------------------------------
# the parent
# ---------------------------------------------------------------------------------------------
def _results(text: str) -> list[dict]:
    return [json.loads(line[len("RESULT "):]) for line in text.splitlines() if line.startswith("RESULT ")]


def _env() -> dict:
    return dict(os.environ, OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="", PYTHONUNBUFFERED="1",
                PYTHONPATH=os.pathsep.join([REPO, TESTS, REALCKPT]))


def run_ckptctl(src: str, dst: str, tp: int, pp: int, nproc: int = 1) -> dict:
    shutil.rmtree(dst, ignore_errors=True)
    t0 = time.perf_counter()
    if nproc == 1:
        proc = subprocess.run([sys.executable, "-c", _CKPTCTL_CHILD, src, dst, str(tp), str(pp)], cwd=REPO,
                              capture_output=True, text=True, env=_env())
    else:
        proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                               f"--nproc-per-node={nproc}", "--no-python", sys.executable,
                               "-c", _CKPTCTL_TORCHRUN, src, dst, str(tp), str(pp)], cwd=REPO,
                              capture_output=True, text=True, env=_env())
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        raise RuntimeError(f"ckptctl reshard failed:\n{proc.stderr[-4000:]}")
    res = _results(proc.stdout)
    return {"wall_s": wall, "work_s": max(r["work_s"] for r in res),
            "peak_rss_mb": max(r["peak_rss_mb"] for r in res), "rss_sum_mb": sum(r["peak_rss_mb"] for r in res),
            "procs": len(res), **{k: res[0][k] for k in ("bytes_read", "chunks") if k in res[0]}}


def run_megatron(src: str, dst: str, tp: int, pp: int, info: dict, work: str) -> dict:
    shutil.rmtree(dst, ignore_errors=True)
    world = tp * pp
    store = os.path.join(work, f"store-{time.monotonic_ns()}")
    job = dict(info["worker_job"], src=src, dst=dst, tp=tp, pp=pp, world_size=world, store_file=store)
    job_file = os.path.join(work, "megatron_job.json")
    with open(job_file, "w") as f:
        json.dump(job, f)
    t0 = time.perf_counter()
    procs = [subprocess.Popen([sys.executable, os.path.abspath(__file__), "--megatron-child", job_file, str(r)],
                              cwd=work, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=_env())
             for r in range(world)]
    outs = [p.communicate() for p in procs]
    wall = time.perf_counter() - t0
    for p, (_, err) in zip(procs, outs):
        if p.returncode != 0:
            raise RuntimeError(f"megatron baseline failed:\n{err[-4000:]}")
    res = [r for out, _ in outs for r in _results(out)]
    return {"wall_s": wall, "work_s": max(r["work_s"] for r in res), "load_s": max(r["load_s"] for r in res),
            "save_s": max(r["save_s"] for r in res), "peak_rss_mb": max(r["peak_rss_mb"] for r in res),
            "rss_sum_mb": sum(r["peak_rss_mb"] for r in res), "procs": len(res)}


def ensure_checkpoint(root: str, size: str):
    from realckpt.megatron_writer import write_megatron_component

    out = os.path.join(root, size, "policy")
    t0 = time.perf_counter()
    comp = write_megatron_component(out, **COMMON, **SIZES[size], timeout=1800)
    took = time.perf_counter() - t0
    nbytes = sum(os.path.getsize(os.path.join(comp.ckpt_dir, n)) for n in os.listdir(comp.ckpt_dir)
                 if n.endswith(".distcp"))
    return comp, nbytes, took


def _median(runs: list[dict], key: str) -> float:
    return statistics.median(r[key] for r in runs)


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--dir", default=os.path.join(tempfile.gettempdir(), "ckptctl-bench-reshard"))
    ap.add_argument("--sizes", default="small,deep,big")
    ap.add_argument("--repeat", type=int, default=1)
    ap.add_argument("--pp2", action="store_true", help="also TP2 -> TP2 x PP2 on the biggest size")
    ap.add_argument("--megatron-child", nargs=2, metavar=("JOB", "RANK"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.megatron_child:
        return _megatron_child(args.megatron_child[0], int(args.megatron_child[1]))

    os.makedirs(args.dir, exist_ok=True)
    work = tempfile.mkdtemp(prefix="bench-reshard-")
    rows = []
    try:
        sizes = [s for s in args.sizes.split(",") if s]
        comps = {}
        for size in sizes:
            comp, nbytes, took = ensure_checkpoint(args.dir, size)
            comps[size] = comp
            print(f"[{size}] source: {comp.ckpt_dir} TP=2, {nbytes / 1e9:.2f} GB of .distcp "
                  f"({'written' if took > 5 else 'cached'} in {took:.0f} s)", flush=True)
            cases = [(1, 1)]
            if args.pp2 and size == sizes[-1]:
                cases.append((2, 2))
            for tp, pp in cases:
                label = f"{size} TP2->TP{tp}" + (f"xPP{pp}" if pp > 1 else "")
                runs = {"ckptctl": [], "megatron": []}
                if tp * pp > 1:
                    runs["ckptctl torchrun-2"] = []
                for _ in range(args.repeat):
                    runs["ckptctl"].append(run_ckptctl(str(comp.ckpt_dir), os.path.join(work, "out-ckptctl"), tp, pp))
                    if "ckptctl torchrun-2" in runs:
                        runs["ckptctl torchrun-2"].append(
                            run_ckptctl(str(comp.ckpt_dir), os.path.join(work, "out-ckptctl2"), tp, pp, nproc=2))
                    runs["megatron"].append(run_megatron(str(comp.ckpt_dir), os.path.join(work, "out-megatron"), tp,
                                                         pp, comp.info, work))
                for who, rs in runs.items():
                    row = {"case": label, "who": who, "gb": nbytes / 1e9, "procs": rs[0]["procs"],
                           **{k: _median(rs, k) for k in ("wall_s", "work_s", "peak_rss_mb", "rss_sum_mb")}}
                    if who == "megatron":
                        row["detail"] = f"load {_median(rs, 'load_s'):.1f}s + save {_median(rs, 'save_s'):.1f}s"
                    else:
                        row["detail"] = (f"read {rs[0]['bytes_read'] / 1e9:.2f} GB, {rs[0]['chunks']} chunks"
                                         if "bytes_read" in rs[0] else "")
                    rows.append(row)
                    print(f"  {label:22s} {who:20s} wall {row['wall_s']:6.1f}s  work {row['work_s']:6.1f}s  "
                          f"peak RSS {row['peak_rss_mb']:7.0f} MB (sum {row['rss_sum_mb']:7.0f} MB, "
                          f"{row['procs']} proc)  {row['detail']}", flush=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)

    print("\nsummary (median of %d run(s); wall = child process start to exit, imports included)" % args.repeat)
    print(f"{'case':22s} {'who':20s} {'GB':>5s} {'wall s':>7s} {'work s':>7s} {'peak RSS MB':>12s} "
          f"{'RSS sum MB':>11s}")
    for r in rows:
        print(f"{r['case']:22s} {r['who']:20s} {r['gb']:5.2f} {r['wall_s']:7.1f} {r['work_s']:7.1f} "
              f"{r['peak_rss_mb']:12.0f} {r['rss_sum_mb']:11.0f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
