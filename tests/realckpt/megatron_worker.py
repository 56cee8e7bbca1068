"""Per-rank worker for :mod:`realckpt.megatron_writer`: writes REAL megatron-core
``torch_dist`` checkpoints with ``megatron.core.dist_checkpointing.save`` on CPU (gloo).

Run as a script (never imported by ckptctl)::

    python megatron_worker.py JOBS.json

``JOBS.json`` is a list of jobs (the schema is whatever ``megatron_writer._job_for`` emits; the
keys used are read below).  The launcher (this script's ``main``) imports torch and
megatron-core ONCE, installs the test-only CUDA shim (:mod:`cuda_shim`), then for each job forks
``world_size`` rank processes (``multiprocessing`` fork context, so the ~5 s megatron import is
paid once per launcher, not once per rank).  Each rank:

1. joins a gloo group through a ``file://`` store (no TCP port to race for), then
   ``parallel_state.initialize_model_parallel(tp, pp)``;
2. builds a real mcore ``GPTModel`` on CPU for its pipeline stage (``use_cpu_initialization``,
   RMSNorm, SwiGLU, no linear bias, optional QKV bias, fusions off, dropout 0, local layer spec);
3. takes the model's own ``sharded_state_dict()`` (stacked ``decoder.layers.*`` keys, or per-layer
   keys with ``metadata={"non_homogeneous_layers": True}``) and fills every local parameter from
   the full, known tensors in ``tensors_file`` using the global offsets of megatron's own
   ShardedTensors / ShardedTensorFactories (so the swiglu ``[gate; up]`` split, QKV query-group
   chunks, row/column-parallel axes and the PP layer offsets are megatron's, not ours);
4. builds the optimizer part from a real ``torch.optim.AdamW`` over the mcore params (state filled
   from the same known tensors) in the layout of megatron-core's ``DistributedOptimizer``
   ``fully_reshardable`` format (``optimizer.state.{param,exp_avg,exp_avg_sq}.<model key>``), or the
   non-distributed optimizer format produced by megatron-core's own
   ``optim_state_to_sharding_state`` (``optimizer.state.{exp_avg,exp_avg_sq}.<model key>``);
   ``lr_scheduler`` from a real megatron-core ``OptimizerParamScheduler``; ``rng`` as SkyRL's
   common dict, or Megatron-LM's ``rng_state`` ``ShardedObject``;
5. calls ``dist_checkpointing.save(state, ckpt_dir, sharded_strategy=("torch_dist", 1))``, or, with
   ``fully_parallel``, the ``FullyParallelSaveStrategyWrapper`` over the data-parallel group that
   SkyRL's MegatronStrategy uses.

Top-level imports are stdlib only: megatron's save starts a *spawn*-based multiprocessing manager,
which re-imports this file as ``__mp_main__``; the ``__main__`` guard below is required.
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
import time
import traceback


def _ensure_on_path() -> None:
    """``cuda_shim`` is imported by its bare name (one module object per process)."""
    here = os.path.dirname(os.path.abspath(__file__))
    if here not in sys.path:
        sys.path.insert(0, here)


def _log(msg: str) -> None:
    print(f"[megatron_worker pid={os.getpid()}] {msg}", file=sys.stderr, flush=True)


# --------------------------------------------------------------------------------------------
# rank side
# --------------------------------------------------------------------------------------------


def _build_model(job):
    import torch
    from megatron.core import parallel_state as ps
    from megatron.core.models.gpt import GPTModel
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
    from megatron.core.transformer.transformer_config import TransformerConfig

    m = job["model"]
    dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}[job["params_dtype"]]
    cfg = TransformerConfig(
        num_layers=m["num_layers"],
        hidden_size=m["hidden"],
        num_attention_heads=m["heads"],
        num_query_groups=m["kv_heads"],
        ffn_hidden_size=m["ffn"],
        kv_channels=m["hidden"] // m["heads"],
        layernorm_epsilon=m["norm_eps"],
        normalization="RMSNorm",
        gated_linear_unit=True,
        activation_func=torch.nn.functional.silu,
        add_bias_linear=False,
        add_qkv_bias=m["qkv_bias"],
        bias_activation_fusion=False,
        masked_softmax_fusion=False,
        persist_layer_norm=False,
        bias_dropout_fusion=False,
        apply_rope_fusion=False,
        gradient_accumulation_fusion=False,
        hidden_dropout=0.0,
        attention_dropout=0.0,
        use_cpu_initialization=True,
        params_dtype=dtype,
        bf16=dtype == torch.bfloat16,
        pipeline_dtype=dtype,
        tensor_model_parallel_size=job["tp"],
        pipeline_model_parallel_size=job["pp"],
    )
    _ensure_on_path()
    import cuda_shim

    tied_pp = m["tie"] and job["pp"] > 1
    with cuda_shim.tensor_cuda_is_identity() if tied_pp else contextlib.nullcontext():
        return GPTModel(
            cfg,
            get_gpt_layer_local_spec(normalization="RMSNorm"),
            vocab_size=m["padded_vocab"],
            max_sequence_length=m["max_seq"],
            pre_process=ps.is_pipeline_first_stage(),
            post_process=ps.is_pipeline_last_stage(),
            share_embeddings_and_output_weights=m["tie"],
            position_embedding_type="rope",
            rotary_base=m["rotary_base"],
        )



def _sharded_leaves(sharded_sd):
    """(path, ShardedTensor|ShardedTensorFactory) for every tensor-like leaf."""
    from megatron.core.dist_checkpointing.dict_utils import nested_values
    from megatron.core.dist_checkpointing.mapping import ShardedTensor, ShardedTensorFactory

    return [v for v in nested_values(sharded_sd) if isinstance(v, (ShardedTensor, ShardedTensorFactory))]


def _fill(sh, full: dict) -> None:
    """Copy the rank-local part of the known full tensor(s) into ``sh.data`` (in place),
    using the ShardedTensor's own global offsets (a factory is built first: its pieces are
    views of ``sh.data``)."""
    import torch
    from megatron.core.dist_checkpointing.dict_utils import nested_values
    from megatron.core.dist_checkpointing.mapping import ShardedTensor, ShardedTensorFactory

    if isinstance(sh, ShardedTensorFactory):
        for piece in nested_values(sh.build()):
            _fill(piece, full)
        return
    assert isinstance(sh, ShardedTensor), type(sh)
    if sh.key not in full:
        raise KeyError(f"no reference tensor for checkpoint key {sh.key!r}")
    src = full[sh.key]
    if tuple(src.shape) != tuple(sh.global_shape):
        raise ValueError(f"{sh.key}: reference shape {tuple(src.shape)} != global shape {sh.global_shape}")
    with torch.no_grad():
        sh.data.copy_(src[sh.global_slice()].to(sh.data.dtype))


def _optimizer_part(job, model, model_sd, full):
    """Real torch AdamW over the mcore params, its state filled from the known tensors,
    expressed as megatron-core's optimizer sharded state."""
    from dataclasses import replace

    import torch
    from megatron.core.dist_checkpointing.mapping import ShardedTensorFactory
    from megatron.core.dist_checkpointing.optimizer import (
        get_param_id_to_sharded_param_map,
        optim_state_to_sharding_state,
    )
    from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler

    o = job["optimizer"]
    by_param = {}
    for sh in _sharded_leaves(model_sd):
        by_param.setdefault(id(sh.data), sh)

    params = [p for p in model.parameters() if p.requires_grad]
    # Megatron's default grouping: no weight decay for biases and 1-D params (norms).
    decay = [p for p in params if p.ndim > 1]
    no_decay = [p for p in params if p.ndim <= 1]
    extra = dict(wd_mult=1.0, lr_mult=1.0, is_expert_parallel=False, is_decoupled_lr=False)
    groups = []
    if decay:
        groups.append(dict(params=decay, weight_decay=o["weight_decay"], **extra))
    if no_decay:
        groups.append(dict(params=no_decay, weight_decay=0.0, **{**extra, "wd_mult": 0.0}))
    adam = torch.optim.AdamW(groups, lr=o["lr"], betas=tuple(o["betas"]), eps=o["eps"])
    for g in adam.param_groups:
        g["max_lr"] = o["lr"]
        g["min_lr"] = o["min_lr"]

    sched = OptimizerParamScheduler(
        adam,
        init_lr=0.0,
        max_lr=o["lr"],
        min_lr=o["min_lr"],
        lr_warmup_steps=o["warmup_steps"],
        lr_decay_steps=o["decay_steps"],
        lr_decay_style="cosine",
        start_wd=o["weight_decay"],
        end_wd=o["weight_decay"],
        wd_incr_steps=o["decay_steps"],
        wd_incr_style="constant",
    )
    for _ in range(o["step"]):
        sched.step(1)

    fmt = o["format"]
    state_keys = ("param", "exp_avg", "exp_avg_sq") if fmt == "fully_reshardable" else ("exp_avg", "exp_avg_sq")
    param_state = {}
    idx = 0
    for group in adam.param_groups:
        for p in group["params"]:
            sh = by_param.get(id(p))
            if sh is None:
                raise ValueError(f"param {tuple(p.shape)} has no sharded metadata")
            tensors = {}
            for k in state_keys:
                t = torch.empty(p.shape, dtype=torch.float32)
                kw = dict(key=f"optimizer.state.{k}.{sh.key}", data=t)
                if not isinstance(sh, ShardedTensorFactory):
                    kw["dtype"] = torch.float32
                st = replace(sh, **kw)
                _fill(st, full)
                tensors[k] = st
            # the real torch optimizer state (plain tensors, as AdamW keeps them)
            adam.state[p] = {
                "step": torch.tensor(float(o["step"])),
                "exp_avg": tensors["exp_avg"].data,
                "exp_avg_sq": tensors["exp_avg_sq"].data,
            }
            param_state[idx] = tensors
            idx += 1

    if fmt == "fully_reshardable":
        # == DistributedOptimizer.sharded_state_dict(metadata={'distrib_optim_sharding_type':
        #    'fully_reshardable'}): state_dict() (param_groups without 'params', with 'step')
        #    + param_state in model space with the model params' replica ids.
        inner = adam.state_dict()
        opt = {k: v for k, v in inner.items() if k != "state"}
        for g in opt["param_groups"]:
            del g["params"]
            g["step"] = int(o["step"])
        return {
            "optimizer": opt,
            "param_state": param_state,
            "param_state_sharding_type": "fully_reshardable",
        }, sched

    if fmt == "fp32":
        # == megatron-core's non-distributed FP32Optimizer.sharded_state_dict: uses mcore's own
        #    get_param_id_to_sharded_param_map + optim_state_to_sharding_state.
        sd = adam.state_dict()
        id_map = get_param_id_to_sharded_param_map(model_sd, (p for g in adam.param_groups for p in g["params"]))
        steps = {float(s["step"]) for s in sd["state"].values()}
        assert len(steps) == 1, steps
        optim_state_to_sharding_state(sd, id_map, exclude_keys="step")
        sd["state"]["common_step"] = steps.pop()
        return sd, sched

    raise ValueError(f"unknown optimizer format {fmt!r}")


def _rng_part(job):
    import random

    import numpy as np
    import torch
    from megatron.core import parallel_state as ps
    from megatron.core.dist_checkpointing.mapping import ShardedObject

    seed = job["seed"]
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    rng = {"cpu": torch.get_rng_state(), "numpy": np.random.get_state(), "random": random.getstate()}
    if job["rng_format"] == "common":  # SkyRL's MegatronStrategy.get_rng_state(): common.pt
        return rng
    if job["rng_format"] == "sharded":  # Megatron-LM: one ShardedObject per (pp, tp) rank
        return ShardedObject(
            "rng_state",
            [rng],
            (ps.get_pipeline_model_parallel_world_size(), ps.get_tensor_model_parallel_world_size()),
            (ps.get_pipeline_model_parallel_rank(), ps.get_tensor_model_parallel_rank()),
            replica_id=ps.get_data_parallel_rank(with_context_parallel=True),
        )
    raise ValueError(f"unknown rng_format {job['rng_format']!r}")


def _fork_results_queue() -> None:
    """Speed only (the files written are unchanged): megatron-core creates the queue through
    which its forked file-writer processes report back from a SPAWN-context ``Manager``
    (``filesystem_async._get_write_results_queue``).  The spawned manager process then imports
    torch (~2.5 s of CPU per rank per save) to unpickle the first ``WriteResult``.  Pre-set that
    private global to a queue of a FORK-context manager (torch already imported).  Guarded: if
    the private name is gone in another megatron-core version, nothing is changed."""
    import multiprocessing as mp

    from megatron.core.dist_checkpointing.strategies import filesystem_async as fa

    if getattr(fa, "_results_queue", "missing") is None:
        fa._results_queue = mp.get_context("fork").Manager().Queue()


def _save_rank(job, rank: int) -> None:
    import torch
    from megatron.core import dist_checkpointing
    from megatron.core import parallel_state as ps
    from safetensors.torch import load_file

    t0 = time.monotonic()
    ps.initialize_model_parallel(job["tp"], job["pp"])
    try:
        torch.manual_seed(job["seed"])
        model = _build_model(job)
        # Megatron's Float16Module casts the whole module (norms included) for bf16 training
        model.to({"float32": torch.float32, "bfloat16": torch.bfloat16}[job["params_dtype"]])
        t1 = time.monotonic()
        metadata = {"non_homogeneous_layers": True} if job["per_layer_keys"] else None
        model_sd = model.sharded_state_dict(metadata=metadata)
        full = load_file(job["tensors_file"])

        leaves = _sharded_leaves(model_sd)
        for sh in leaves:
            _fill(sh, full)
        filled = {id(sh.data) for sh in leaves}
        missing = [n for n, p in model.named_parameters() if id(p) not in filled]
        if missing:
            raise RuntimeError(f"rank {rank}: parameters not in the sharded state dict: {missing}")

        state = {"model": model_sd}
        if job["optimizer"] is not None:
            state["optimizer"], sched = _optimizer_part(job, model, model_sd, full)
            state["lr_scheduler"] = sched.state_dict()
        state["rng"] = _rng_part(job)

        if job.get("fork_results_queue", True):
            _fork_results_queue()
        ckpt_dir = job["ckpt_dir"]
        if rank == 0:
            os.makedirs(ckpt_dir, exist_ok=True)
        torch.distributed.barrier()
        if job["fully_parallel"]:
            from megatron.core.dist_checkpointing.serialization import get_default_save_sharded_strategy
            from megatron.core.dist_checkpointing.strategies.fully_parallel import (
                FullyParallelSaveStrategyWrapper,
            )

            strategy = FullyParallelSaveStrategyWrapper(
                get_default_save_sharded_strategy("torch_dist", 1),
                ps.get_data_parallel_group(with_context_parallel=True),
            )
        else:
            strategy = ("torch_dist", 1)
        t2 = time.monotonic()
        dist_checkpointing.save(state, ckpt_dir, sharded_strategy=strategy, validate_access_integrity=True)
        torch.distributed.barrier()
        if rank == 0:
            t3 = time.monotonic()
            _log(f"rank0: groups+model {t1 - t0:.1f}s, state {t2 - t1:.1f}s, save {t3 - t2:.1f}s")
    finally:
        ps.destroy_model_parallel()


def _rank_entry(job, rank: int) -> None:
    """Body of one forked rank process (multiprocessing.Process target)."""
    import torch

    torch.set_num_threads(1)
    os.environ["RANK"] = str(rank)
    os.environ["LOCAL_RANK"] = str(rank)
    os.environ["WORLD_SIZE"] = str(job["world_size"])
    t0 = time.monotonic()
    torch.distributed.init_process_group(
        "gloo",
        init_method="file://" + job["store_file"],
        rank=rank,
        world_size=job["world_size"],
    )
    if rank == 0:
        _log(f"rank0: init_process_group {time.monotonic() - t0:.1f}s")
    try:
        _save_rank(job, rank)
    except BaseException:
        traceback.print_exc()
        sys.stderr.flush()
        os._exit(3)  # do not hang in destroy_process_group waiting for dead peers
    torch.distributed.destroy_process_group()


# --------------------------------------------------------------------------------------------
# launcher side
# --------------------------------------------------------------------------------------------


def _run_job(job, timeout: float) -> None:
    import multiprocessing as mp

    ctx = mp.get_context("fork")
    procs = []
    for rank in range(job["world_size"]):
        p = ctx.Process(target=_rank_entry, args=(job, rank), name=f"mcore-rank{rank}")
        p.start()
        procs.append(p)
    deadline = time.monotonic() + timeout
    failed = None
    pending = list(procs)
    while pending:
        for p in list(pending):
            p.join(timeout=0.05)
            if p.exitcode is not None:
                pending.remove(p)
                if p.exitcode != 0 and failed is None:
                    failed = f"{p.name} exited with {p.exitcode}"
        if failed or time.monotonic() > deadline:
            break
    if pending:
        for p in pending:  # only our own rank processes, by their Process handle
            p.kill()
        for p in pending:
            p.join(5)
        if failed is None:
            failed = f"timed out after {timeout:.0f}s"
    if failed:
        raise RuntimeError(f"megatron save of {job['ckpt_dir']} failed: {failed}")


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 1:
        print("usage: megatron_worker.py JOBS.json", file=sys.stderr)
        return 2
    with open(argv[0]) as f:
        jobs = json.load(f)

    t0 = time.monotonic()
    import torch

    torch.set_num_threads(1)
    _ensure_on_path()
    import cuda_shim

    cuda_shim.install()
    # pay the megatron import once, before forking the ranks
    import megatron.core.dist_checkpointing  # noqa: F401
    import megatron.core.dist_checkpointing.strategies.torch  # noqa: F401
    import megatron.core.models.gpt  # noqa: F401
    import megatron.core.optimizer_param_scheduler  # noqa: F401
    import safetensors.torch  # noqa: F401

    _log(f"imports {time.monotonic() - t0:.1f}s")
    for job in jobs:
        t1 = time.monotonic()
        try:
            _run_job(job, timeout=float(job.get("timeout", 240)))
        except Exception as e:  # noqa: BLE001
            _log(str(e))
            return 1
        _log(f"saved {job['ckpt_dir']} (world {job['world_size']}) in {time.monotonic() - t1:.1f}s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
