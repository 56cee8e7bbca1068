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
"ShardedTensor.flattened_range is not supported."  Checkpoints in that format come from older
megatron-core versions (they need an older megatron-core to write).

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


if __name__ == "__main__":
    if len(sys.argv) < 2:
        print("usage: distopt_writer.py OUT_DIR [NAME ...]", file=sys.stderr)
        sys.exit(2)
    t = time.monotonic()
    res = write_distopt_fixtures(sys.argv[1], sys.argv[2:] or None)
    print(f"{len(res)} fixtures in {time.monotonic() - t:.1f}s: {', '.join(res)}")
