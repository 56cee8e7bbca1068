"""A REAL ``fully_sharded_model_space`` distributed-optimizer checkpoint (issue #10), written by
an OLDER megatron-core (0.13.1) on CPU -- the committed fixture ``tests/fixtures/distopt_fsms/``.

megatron-core 0.16.1 (the version ckptctl's tests use) cannot write that format
(``ShardedTensor.flattened_range is not supported``, see :mod:`distopt_writer`); 0.13.1, the
format's last default, can.  It is installed OUTSIDE the project venv, into its own target dir::

    .venv/bin/pip install --no-deps --target /tmp/mcore_old megatron-core==0.13.1
    PYTHONPATH=/tmp/mcore_old .venv/bin/python tests/realckpt/distopt_legacy_writer.py OUT_DIR

This launcher runs :mod:`distopt_worker` (same shims, model builder, DDP + DistributedOptimizer
and training loop as the 0.16.1 fixtures) in a child process whose ``sys.path`` starts with the
old megatron-core, with one extra rank mode, ``legacy_save``: train ``steps`` Adam steps, save
``optimizer.sharded_state_dict(model_sd, metadata={"distrib_optim_sharding_type":
"fully_sharded_model_space"})`` with ``dist_checkpointing.save(..., ("torch_dist", 1))``, and dump
what megatron handed to the saver (each optimizer ShardedTensor's key, global offset, local shape,
``flattened_range`` and data).  The launcher assembles those pieces into the reference: one full
tensor per ``optimizer.state.{fp32_param,exp_avg,exp_avg_sq}.<model key>`` (by megatron's own
ShardedTensor semantics -- the local chunk at ``global_offset``, ``data`` is
``local.flatten()[flattened_range]`` -- never through torch DCP's reformulated storage), checked to
cover every element exactly once per DP group, and ``fp32_param`` checked equal to the saved model
weight.  Output, per variant::

    OUT_DIR/<name>/tree/            a SkyRL tree: latest_ckpt_global_step.txt, global_step_2/
                                    trainer_state.pt (SkyRL's config at the writing layout) and
                                    global_step_2/policy/ (.metadata, __*_*.distcp, common.pt,
                                    metadata.json, huggingface/config.json)
    OUT_DIR/<name>/reference.pt     {"tensors": {name: full tensor}, "megatron_core": version,
                                    "torch": version, "job": the job parameters, "losses": [...]}
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
sys.path.insert(0, str(HERE))
sys.path.insert(1, str(HERE.parent))  # tests/: distopt_tree

FORMAT = "fully_sharded_model_space"
#: the dense model of distopt_writer, shrunk so that the committed fixture stays small
TINY_DENSE_MODEL = dict(num_layers=2, hidden=16, heads=4, kv_heads=2, ffn=32, norm_eps=1e-6,
                        qkv_bias=False, padded_vocab=64, max_seq=16, tie=False, rotary_base=10000.0)
#: variant name -> (tp, pp, world)
LEGACY_LAYOUTS = {"dense_tp2dp2": (2, 1, 4), "dense_pp2dp2": (1, 2, 4)}
STEP = 2  # the SkyRL global step the checkpoint is filed under (= the Adam steps trained)


def legacy_job(name: str, out: Path | None = None, tmp: Path | None = None, mode: str = "legacy_save") -> dict:
    """The worker job of variant ``name`` (2 Adam steps, fp32 params, the 0.16.1 fixtures' Adam)."""
    from distopt_writer import ADAM

    tp, pp, world = LEGACY_LAYOUTS[name]
    out, tmp = out or Path("/"), tmp or Path("/")
    return dict(mode=mode, tp=tp, pp=pp, ep=1, etp=1, world_size=world, format=FORMAT, steps=2, seed=7,
                bucket_size=2000, params_dtype="float32", store_file=str(tmp / f"store_{name}"),
                ckpt_dir=str(out / name / "tree" / f"global_step_{STEP}" / "policy"),
                ref_dir=str(out / name / "pieces"),
                model=TINY_DENSE_MODEL, optimizer=ADAM, timeout=300)


# --------------------------------------------------------------------------------------------
# rank side (inside distopt_worker's forked ranks, old megatron-core on sys.path)
# --------------------------------------------------------------------------------------------


def _legacy_save(job, rank: int) -> None:
    import torch
    from megatron.core import dist_checkpointing
    from megatron.core import parallel_state as ps
    from megatron.core.dist_checkpointing.dict_utils import nested_values
    from megatron.core.dist_checkpointing.mapping import ShardedTensor, ShardedTensorFactory

    import cuda_shim
    import distopt_worker

    ps.initialize_model_parallel(job["tp"], job["pp"])
    try:
        model, ddp, opt = distopt_worker._build(job, seed=job["seed"])
        # (0.13.1's non-interleaved pipeline schedule does torch.tensor(0).cuda(): test-only identity)
        with cuda_shim.tensor_cuda_is_identity():
            losses = distopt_worker._train(job, model, ddp, opt)
        model_sd = model.sharded_state_dict()
        with cuda_shim.tensor_cuda_is_identity():
            state = {"model": model_sd,
                     "optimizer": opt.sharded_state_dict(model_sd, metadata={"distrib_optim_sharding_type": FORMAT})}
        pieces = []
        for part, sd in state.items():
            # (a factory -- the gated fc1's [gate; up] -- saves the ShardedTensors it builds)
            leaves = [x for v in nested_values(sd) for x in (
                nested_values(v.build()) if isinstance(v, ShardedTensorFactory) else [v])]
            for sh in leaves:
                if isinstance(sh, ShardedTensor):
                    fr = sh.flattened_range
                    pieces.append(dict(part=part, key=sh.key, global_shape=tuple(sh.global_shape),
                                       global_offset=tuple(sh.global_offset), local_shape=tuple(sh.local_shape),
                                       prepend=sh.prepend_axis_num, replica_id=sh.replica_id,
                                       flat=None if fr is None else (fr.start, fr.stop),
                                       data=sh.data.detach().clone()))
        os.makedirs(job["ref_dir"], exist_ok=True)
        torch.save(dict(pieces=pieces, losses=losses),
                   os.path.join(job["ref_dir"], f"rank_{rank}.pt"))
        if rank == 0:
            os.makedirs(job["ckpt_dir"], exist_ok=True)
        torch.distributed.barrier()
        dist_checkpointing.save(state, job["ckpt_dir"], sharded_strategy=("torch_dist", 1),
                                validate_access_integrity=True)
        torch.distributed.barrier()
    finally:
        ps.destroy_model_parallel()


def _worker_main(jobs_file: str) -> int:
    """distopt_worker.main with the extra ``legacy_save`` rank mode (its ranks are forked from this
    process, so the module-level dispatch below is what they run)."""
    import numpy

    import distopt_worker

    # TEST-ONLY: megatron-core 0.13.1's save validation of flattened tensors
    # (dist_checkpointing/validation.py:506) calls np.product, which numpy 2 removed
    if not hasattr(numpy, "product"):
        numpy.product = numpy.prod
    plain_rank = distopt_worker._rank

    def _rank(job, rank):
        if job["mode"] == "legacy_save":
            return _legacy_save(job, rank)
        return plain_rank(job, rank)

    distopt_worker._rank = _rank
    return distopt_worker.main([jobs_file])


# --------------------------------------------------------------------------------------------
# launcher side
# --------------------------------------------------------------------------------------------


def assemble_reference(pieces_dir: Path, world: int) -> tuple[dict, list]:
    """Full tensors from every rank's saved ShardedTensors.  Each (key, element) must be written
    by megatron with one value (replicas agree), and every element of every key covered."""
    import torch

    full, seen, losses = {}, {}, []
    for r in range(world):
        rec = torch.load(pieces_dir / f"rank_{r}.pt", weights_only=False)
        losses += rec["losses"]
        for p in rec["pieces"]:
            name = p["key"]
            if name not in full:
                full[name] = torch.zeros(p["global_shape"], dtype=p["data"].dtype)
                seen[name] = torch.zeros(p["global_shape"], dtype=torch.bool)
            local = tuple([1] * p["prepend"]) + p["local_shape"]
            index = tuple(slice(o, o + n) for o, n in zip(p["global_offset"], local))
            # the flat indices (into the full tensor) of the local chunk, row-major, then megatron's range
            block = torch.arange(full[name].numel()).reshape(full[name].shape)[index].reshape(-1)
            start, stop = p["flat"] if p["flat"] is not None else (0, block.numel())
            idx, data = block[start:stop], p["data"].reshape(-1)
            assert data.numel() == idx.numel(), (name, data.shape, p["flat"])
            prev = seen[name].view(-1)[idx]
            if prev.any() and not torch.equal(full[name].view(-1)[idx][prev], data[prev]):
                raise AssertionError(f"{name}: replicas disagree")
            full[name].view(-1)[idx] = data
            seen[name].view(-1)[idx] = True
    for name, mask in seen.items():
        if not mask.all():
            raise AssertionError(f"{name}: {int((~mask).sum())} elements never written")
    return full, losses


def write_legacy_fixture(out_dir, names=None, timeout: float = 600) -> dict:
    import megatron.core
    import torch

    from distopt_tree import hf_config, skyrl_config

    out = Path(out_dir)
    names = list(LEGACY_LAYOUTS) if names is None else list(names)
    tmp = Path(tempfile.mkdtemp(prefix="distopt_legacy_"))
    try:
        jobs = []
        for n in names:
            shutil.rmtree(out / n, ignore_errors=True)
            jobs.append(legacy_job(n, out, tmp))
        (tmp / "jobs.json").write_text(json.dumps(jobs))
        t0 = time.monotonic()
        proc = subprocess.run([sys.executable, str(Path(__file__).resolve()), "--worker", str(tmp / "jobs.json")],
                              capture_output=True, text=True, timeout=timeout,
                              env={**os.environ, "PYTHONWARNINGS": "ignore", "OMP_NUM_THREADS": "1"})
        if proc.returncode != 0:
            raise RuntimeError(f"legacy worker failed (rc {proc.returncode}):\n{proc.stderr[-6000:]}")
        elapsed = time.monotonic() - t0
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    done = {}
    for n in names:
        job = legacy_job(n, out)
        full, losses = assemble_reference(Path(job["ref_dir"]), job["world_size"])
        opt = {k: v for k, v in full.items() if k.startswith("optimizer.state.")}
        for k, v in opt.items():
            if k.startswith("optimizer.state.fp32_param."):
                model_key = k[len("optimizer.state.fp32_param."):]
                if not torch.equal(v, full[model_key]):
                    raise AssertionError(f"{k} differs from the saved model weight {model_key}")
        if not any(v.abs().sum() > 0 for k, v in opt.items() if ".exp_avg." in k):
            raise AssertionError("every exp_avg is zero")
        policy = Path(job["ckpt_dir"])
        (policy / "huggingface").mkdir()
        (policy / "huggingface" / "config.json").write_text(json.dumps(hf_config(job), indent=1))
        torch.save({"global_step": STEP, "config": skyrl_config(job, ckpt_path="/ckpts")},
                   policy.parent / "trainer_state.pt")
        (policy.parent.parent / "latest_ckpt_global_step.txt").write_text(str(STEP))
        params = {k: v for k, v in job.items() if k not in ("store_file", "ckpt_dir", "ref_dir", "timeout", "mode")}
        torch.save(dict(tensors=full, losses=losses, job=params, megatron_core=str(megatron.core.__version__),
                        torch=str(torch.__version__), seconds=round(elapsed, 1)), out / n / "reference.pt")
        shutil.rmtree(job["ref_dir"])
        done[n] = out / n
    return done


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "--worker":
        sys.exit(_worker_main(sys.argv[2]))
    if len(sys.argv) < 2:
        print("usage: distopt_legacy_writer.py OUT_DIR [NAME ...]", file=sys.stderr)
        sys.exit(2)
    t = time.monotonic()
    res = write_legacy_fixture(sys.argv[1], sys.argv[2:] or None)
    print(f"{len(res)} fixtures in {time.monotonic() - t:.1f}s: {', '.join(map(str, res.values()))}")
