"""REAL megatron-core distributed-optimizer checkpoints (issue #10), written on CPU.

Every fixture is written by megatron-core 0.16.1 itself: a real mcore ``GPTModel`` (the builders
of :mod:`megatron_worker`), wrapped in megatron-core's ``DistributedDataParallel``
(``use_distributed_optimizer=True``), optimized by the ``DistributedOptimizer`` that
``get_megatron_optimizer(OptimizerConfig(optimizer="adam", use_distributed_optimizer=True))``
builds (a ``ChainedOptimizer`` of dense + expert optimizers for MoE), for ``steps`` real
training steps (megatron's forward/backward schedule, pipeline schedule at PP > 1, the DDP
reduce-scatter of the grad buckets, Adam on each DP rank's shard, all-gather of the params), then
``optimizer.sharded_state_dict(model_sd, metadata={"distrib_optim_sharding_type": fmt})`` and
``dist_checkpointing.save(..., ("torch_dist", 1))``.  Rank side: :mod:`distopt_worker` (its
docstring lists the TEST-ONLY CPU shims, applied inside the worker processes only).

Formats: ``dp_reshardable`` (SkyRL's default) and ``fully_reshardable``.  NOT
``fully_sharded_model_space``: megatron-core 0.16.1 cannot write it on any device --
``sharded_param_state_fs_model_space`` builds ShardedTensors with ``flattened_range`` and
``ShardedTensor.validate_metadata_integrity`` (dist_checkpointing/mapping.py:133) raises
"ShardedTensor.flattened_range is not supported."  That format's fixture is written once by
megatron-core 0.13.1 (:mod:`distopt_legacy_writer`) and committed under
``tests/fixtures/distopt_fsms/``.

:func:`write_distopt_fixtures` writes every variant of :data:`DISTOPT_VARIANTS` (or a subset)
under ``out_dir/<name>/``::

    <name>/checkpoint/       the torch_dist checkpoint (model + optimizer)
    <name>/ref/rank_{r}.pt   per-rank truth: inner AdamW state (exp_avg, exp_avg_sq, fp32 main
                             param shard) per parameter name, the step, the training losses
    <name>/ref/layout_rank_{r}.json  megatron's bucket layout on that rank (dp_group_idx,
                             per_bucket_numel(_unpadded), params per bucket with gbuf ranges)
    <name>/ref/load_rank_{r}.json    the load check (when ``verify``): megatron-core reloads the
                             checkpoint at the same layout into a fresh DistributedOptimizer
    <name>/params.json       the job parameters (+ megatron-core / torch versions, timings)
    <name>/COMPLETE          written last: an earlier complete write with the same params is reused

Idempotent: a variant whose ``params.json`` matches and whose ``COMPLETE`` marker exists is not
rewritten.  All variants in one launcher (megatron imported once): ~35 s on 2 CPU cores for the
default set, save + load check.

The step oracle (:func:`next_step_job`, :func:`run_next_step`, :func:`read_full_tensors`):
megatron-core loads a checkpoint (a fixture, or a ckptctl ``convert-reshard`` output of one) at
any layout and trains the one step the fixture's job would have trained next; its loaded and
stepped states come back as full per-parameter tensors.  A fixture's own step at its own layout
is cached in ``<name>/next_step/``.

Usage: ``python distopt_writer.py OUT_DIR [NAME ...]``.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
WORKER = HERE / "distopt_worker.py"

FORMATS = ("dp_reshardable", "fully_reshardable")

DENSE_MODEL = dict(num_layers=2, hidden=32, heads=4, kv_heads=2, ffn=64, norm_eps=1e-6,
                   qkv_bias=False, padded_vocab=128, max_seq=16, tie=False, rotary_base=10000.0)
#: Qwen3-MoE-like: q/k norm, every layer MoE (stacked decoder.layers.* keys), 4 experts, top-2
MOE_MODEL = dict(DENSE_MODEL, head_dim=8, qk_layernorm=True, mla=None,
                 moe=dict(num_experts=4, topk=2, moe_ffn=16, layer_freq=[1, 1], score="softmax",
                          expert_bias=False, shared_ffn=None, num_groups=None, group_topk=None,
                          scaling_factor=None))
ADAM = dict(lr=1e-2, min_lr=1e-3, weight_decay=0.01, betas=[0.9, 0.95], eps=1e-8, clip_grad=1.0)

#: layout name -> (tp, pp, ep, world, model)
LAYOUTS = {
    "dense_tp1dp2": (1, 1, 1, 2, DENSE_MODEL),
    "dense_tp2dp2": (2, 1, 1, 4, DENSE_MODEL),
    "dense_pp2dp2": (1, 2, 1, 4, DENSE_MODEL),
    # chained optimizer: dense params (DP 2) chained_0., expert params (EP 2, expert DP 1) chained_1.
    "moe_tp2ep2dp2": (2, 1, 2, 4, MOE_MODEL),
    "moe_pp2ep2dp2": (1, 2, 2, 4, MOE_MODEL),
}

#: variant name -> layout, format
DISTOPT_VARIANTS = {f"{lay}_{fmt}": (lay, fmt) for lay in LAYOUTS for fmt in FORMATS}


def _job(name: str, out: Path, tmp: Path, mode: str, steps: int = 2, seed: int = 7) -> dict:
    lay, fmt = DISTOPT_VARIANTS[name]
    tp, pp, ep, world, model = LAYOUTS[lay]
    return dict(
        mode=mode, tp=tp, pp=pp, ep=ep, etp=1, world_size=world, format=fmt, steps=steps, seed=seed,
        # (megatron-core 0.16.1 DDP ignores bucket_size without overlap_grad_reduce: one bucket
        #  per grad buffer, as in SkyRL's non-overlapped config)
        bucket_size=2000, params_dtype="float32",
        store_file=str(tmp / f"store_{name}_{mode}"),
        ckpt_dir=str(out / name / "checkpoint"), ref_dir=str(out / name / "ref"),
        model=model, optimizer=ADAM, timeout=180,
    )


def _params(name: str) -> dict:
    job = _job(name, Path("/"), Path("/"), "save")
    for k in ("store_file", "ckpt_dir", "ref_dir", "mode", "timeout"):
        job.pop(k)
    return dict(name=name, job=job)


def _versions() -> dict:
    from importlib.metadata import version

    return {p: version(p) for p in ("megatron-core", "torch")}


def is_complete(out_dir: Path, name: str) -> bool:
    d = Path(out_dir) / name
    if not (d / "COMPLETE").is_file() or not (d / "params.json").is_file():
        return False
    try:
        rec = json.loads((d / "params.json").read_text())
    except ValueError:
        return False
    return rec.get("params") == _params(name)


def write_distopt_fixtures(out_dir, names=None, verify: bool = True, python: str | None = None,
                           timeout: float = 600) -> dict:
    """Write (or reuse) the variants ``names`` (default: all) under ``out_dir``.  Returns
    ``{name: Path(out_dir/name)}``.  Raises RuntimeError with the worker's stderr tail on failure."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    names = list(DISTOPT_VARIANTS) if names is None else list(names)
    todo = [n for n in names if not is_complete(out, n)]
    if todo:
        tmp = Path(tempfile.mkdtemp(prefix="distopt_"))
        try:
            jobs = []
            for n in todo:
                shutil.rmtree(out / n, ignore_errors=True)
                jobs.append(_job(n, out, tmp, "save"))
                if verify:
                    jobs.append(_job(n, out, tmp, "load"))
            jobs_file = tmp / "jobs.json"
            jobs_file.write_text(json.dumps(jobs))
            t0 = time.monotonic()
            proc = subprocess.run([python or sys.executable, str(WORKER), str(jobs_file)],
                                  capture_output=True, text=True, timeout=timeout,
                                  env={**os.environ, "PYTHONWARNINGS": "ignore"})
            elapsed = time.monotonic() - t0
            if proc.returncode != 0:
                raise RuntimeError(f"distopt_worker failed (rc {proc.returncode}):\n{proc.stderr[-6000:]}")
            versions = _versions()
            for n in todo:
                rec = dict(params=_params(n), versions=versions, launcher_seconds_all=round(elapsed, 1),
                           verified=verify)
                (out / n / "params.json").write_text(json.dumps(rec, indent=1, sort_keys=True))
                (out / n / "COMPLETE").write_text("ok\n")
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return {n: out / n for n in names}


# --------------------------------------------------------------------------------------------
# the "next step" oracle: megatron-core loads a checkpoint at some layout and trains one more step
# --------------------------------------------------------------------------------------------
#: bump when the step oracle's behaviour changes: cached reference steps are then recomputed
NEXT_STEP_VERSION = 2


def next_step_job(source: str, ckpt_dir, out_dir, *, tp: int, pp: int, dp: int, ep: int = 1, etp: int = 1,
                  cache: bool = False, control: str | None = None) -> dict:
    """A job for :func:`run_next_step`: megatron-core's DDP + DistributedOptimizer for the model and
    optimizer of fixture ``source``, at TP x PP x DP (EP, ETP for MoE), loads ``ckpt_dir`` in the
    format its ``common.pt`` declares and trains the one step the ``source`` job would have trained
    next (same batch).  ``cache``: ``out_dir`` keeps the result between runs (a fixture's own
    reference step); it is reused while the job's parameters are the same.  ``control``
    ``"halve_exp_avg"``: a negative control, the loaded exp_avg halved before anything else."""
    job = _job(source, Path("/"), Path("/"), "step")
    job.update(oracle_version=NEXT_STEP_VERSION, tp=tp, pp=pp, ep=ep, etp=etp, world_size=tp * pp * dp,
               format="auto", first_step=job["steps"], steps=1, ckpt_dir=str(ckpt_dir), out_dir=str(out_dir),
               cache=cache, control=control)
    job.pop("ref_dir")
    return job


def _job_params(job: dict) -> dict:
    return {k: v for k, v in job.items() if k not in ("store_file", "timeout")}


def run_next_step(jobs: list[dict], python: str | None = None, timeout: float = 900) -> dict[str, dict]:
    """Run every job (from :func:`next_step_job`) in ONE worker launcher (megatron imported once,
    one forked gloo process per rank).  Returns ``{out_dir: result}``, result: ``losses`` (those of
    the last pipeline stage's ranks), ``format`` (the loaded one), ``steps_loaded`` /
    ``steps_after`` (the inner Adam steps after the load / after the step), ``seconds`` (rank 0),
    ``loaded`` / ``stepped`` (snapshot dirs, see :func:`read_full_tensors`), ``errors`` (per-rank
    tracebacks; [] when it all ran), ``cached``."""
    todo = []
    for job in jobs:
        out = Path(job["out_dir"])
        done = out / "COMPLETE"
        if job["cache"] and done.is_file() and done.read_text() == json.dumps(_job_params(job), sort_keys=True):
            continue
        shutil.rmtree(out, ignore_errors=True)
        out.mkdir(parents=True)
        todo.append(job)
    tmp = Path(tempfile.mkdtemp(prefix="distopt_step_"))
    proc = None
    try:
        if todo:
            for i, job in enumerate(todo):
                job["store_file"] = str(tmp / f"store_{i}")
            (tmp / "jobs.json").write_text(json.dumps(todo))
            proc = subprocess.run([python or sys.executable, str(WORKER), str(tmp / "jobs.json")],
                                  capture_output=True, text=True, timeout=timeout,
                                  env={**os.environ, "PYTHONWARNINGS": "ignore", "OMP_NUM_THREADS": "1"})
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    results = {}
    for job in jobs:
        out = Path(job["out_dir"])
        res = dict(losses=[], format=None, steps_loaded=None, steps_after=None, seconds=None,
                   loaded=out / "loaded", stepped=out / "stepped", errors=[], cached=job not in todo)
        for r in range(job["world_size"]):
            err, rec = out / f"error_rank_{r}.txt", out / f"rank_{r}.json"
            if err.is_file():
                res["errors"].append(f"rank {r}: {err.read_text()}")
            elif not rec.is_file():
                res["errors"].append(f"rank {r} wrote no result" + (f":\n{proc.stderr[-3000:]}" if proc else ""))
            else:
                doc = json.loads(rec.read_text())
                res["losses"] += doc["losses"]
                res.update(format=doc["format"], steps_loaded=doc["steps_loaded"], steps_after=doc["steps_after"])
                if r == 0:
                    res["seconds"] = doc["seconds"]
        if job["cache"] and not res["cached"] and not res["errors"]:
            (out / "COMPLETE").write_text(json.dumps(_job_params(job), sort_keys=True))
        results[job["out_dir"]] = res
    return results


def read_full_tensors(snapshot) -> dict:
    """Every tensor of a snapshot written by the step oracle (a ``fully_reshardable`` checkpoint:
    model keys and ``[chained_i.]optimizer.state.{param,exp_avg,exp_avg_sq}.<model key>``) as one
    full tensor per key, read with plain torch DCP in this process (no megatron)."""
    import torch
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint import FileSystemReader
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    reader = FileSystemReader(str(snapshot))
    md = reader.read_metadata().state_dict_metadata
    out = {k: torch.empty(tuple(v.size), dtype=v.properties.dtype) for k, v in md.items()
           if isinstance(v, TensorStorageMetadata)}
    dcp.load(out, storage_reader=reader, no_dist=True)
    return out


if __name__ == "__main__":
    if len(sys.argv) < 2:
        print("usage: distopt_writer.py OUT_DIR [NAME ...]", file=sys.stderr)
        sys.exit(2)
    t = time.monotonic()
    res = write_distopt_fixtures(sys.argv[1], sys.argv[2:] or None)
    print(f"{len(res)} fixtures in {time.monotonic() - t:.1f}s: {', '.join(res)}")
