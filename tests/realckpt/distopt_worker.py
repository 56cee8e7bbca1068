"""Per-rank worker for :mod:`realckpt.distopt_writer`: REAL megatron-core distributed-optimizer
checkpoints, written on CPU under gloo.

Run as a script (never imported by ckptctl)::

    python distopt_worker.py JOBS.json

Each job: ``mode`` "save", "load" or "step", ``tp``, ``pp``, ``world_size`` (DP = world / (tp*pp)),
``model`` (the schema of :mod:`megatron_worker`), ``format`` (``dp_reshardable`` or
``fully_reshardable``; megatron-core 0.16.1 refuses to write ``fully_sharded_model_space``, see
:mod:`distopt_writer`), ``steps``, ``ckpt_dir``, ``ref_dir``.

Rank side, "save":

1. gloo group (``file://`` store), ``parallel_state.initialize_model_parallel(tp, pp)``;
2. the real mcore ``GPTModel`` of :mod:`megatron_worker` (``build_model``), wrapped in
   megatron-core's own ``DistributedDataParallel`` (``use_distributed_optimizer=True``, fp32
   grads, small buckets so there are several);
3. megatron-core's own ``get_megatron_optimizer`` (``OptimizerConfig(optimizer="adam",
   use_distributed_optimizer=True)``): a ``DistributedOptimizer`` over torch's ``AdamW``
   (no Apex / Transformer Engine here), a ``ChainedOptimizer`` for MoE;
4. ``steps`` real training steps through megatron's ``get_forward_backward_func`` (pipeline
   schedule when PP > 1), ``finalize_model_grads`` and ``optimizer.step()`` (reduce-scatter of the
   grad buckets, Adam on the local shard, all-gather of the params);
5. ``optimizer.sharded_state_dict(model_sd, metadata={"distrib_optim_sharding_type": fmt})``
   and ``dist_checkpointing.save(..., ("torch_dist", 1))``;
6. a per-rank reference file ``ref_dir/rank_{r}.pt``: for every model parameter (by name) the
   inner torch optimizer state (``exp_avg``, ``exp_avg_sq``, fp32 main param shard) this rank owns,
   plus the step.  The load mode compares against it.

"load": same layout, fresh model + optimizer (different init seed, no step), the optimizer's
``sharded_state_dict(model_sd, is_loading=True, metadata=...)``, ``dist_checkpointing.load``,
``optimizer.load_state_dict``, then the same per-rank reference dump, compared with the saved one.

"step" (the oracle of ``tests/test_reshard_distopt.py``, :func:`_next_step`): at ANY layout
(``tp``, ``pp``, ``ep``, ``etp``, ``world_size``), load ``ckpt_dir`` in the format its ``common.pt``
declares, snapshot the loaded state as full tensors, train the one step the writing job would have
trained next (batch ``first_step``), snapshot again (``out_dir``).

TEST-ONLY CPU shims (:func:`install_distopt_shims`, applied inside these worker processes only),
besides :mod:`cuda_shim` (``torch.cuda.current_device`` -> cpu, ``torch.cuda.synchronize`` no-op):
see that function's doc.
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
import time
import traceback


def _ensure_on_path() -> None:
    here = os.path.dirname(os.path.abspath(__file__))
    if here not in sys.path:
        sys.path.insert(0, here)


def _log(msg: str) -> None:
    print(f"[distopt_worker pid={os.getpid()}] {msg}", file=sys.stderr, flush=True)


# --------------------------------------------------------------------------------------------
# TEST-ONLY shims
# --------------------------------------------------------------------------------------------

_SHIMS: dict = {}


def install_distopt_shims() -> list:
    """TEST-ONLY, CPU only (nothing is patched when CUDA is available).  Returns the list of
    shims installed.  Inside the worker process only:

    - ``cuda_shim.install()``: ``torch.cuda.current_device()`` -> cpu device,
      ``torch.cuda.synchronize`` no-op.
    - ``torch.tensor/zeros/empty/ones/full`` with ``device="cuda"`` (or ``"cuda:N"``) allocate on
      the CPU (``MixedPrecisionOptimizer.__init__`` builds ``_scale_one`` / ``_dummy_overflow_buf``
      with ``device='cuda'``).
    - ``torch.Tensor.type()`` with no argument reports a CPU float/half/bf16 tensor as its
      ``torch.cuda.*`` name (``DistributedOptimizer._build_model_and_main_param_groups`` accepts
      only ``torch.cuda.FloatTensor`` / ``HalfTensor`` / ``BFloat16Tensor`` params).
    - gloo has no ``reduce_scatter_tensor``: the module globals ``dist_reduce_scatter_func`` /
      ``dist_all_gather_func`` of ``megatron.core.distributed.param_and_grad_buffer`` are replaced
      by synchronous equivalents (``all_reduce`` of the whole bucket + copy of this rank's slice;
      ``all_gather`` into the bucket's shard views), and its ``_coalescing_manager`` by a null
      context (gloo does not coalesce; the calls are synchronous anyway: no overlap configured).
    - ``DistributedOptimizer._set_main_param_and_optimizer_states`` skips the inner state's
      ``step`` key (torch AdamW fallback only; see the comment at the patch).

    Used around calls, not installed here: ``cuda_shim.tensor_cuda_is_identity()`` around
    ``optimizer.sharded_state_dict`` / ``load_state_dict`` (fully_reshardable's
    ``get_parameter_state_dp_zero`` calls ``send_tensor.cuda()`` before its DP all_gather) and
    ``cuda_shim.null_rng_tracker_fork()`` around the forward/backward schedule.
    """
    import torch

    if _SHIMS or torch.cuda.is_available():
        return list(_SHIMS)
    _ensure_on_path()
    import cuda_shim

    cuda_shim.install()
    _SHIMS["cuda_shim"] = True

    def _cpu_device(kw):
        d = kw.get("device")
        if d is not None and str(d).startswith("cuda"):
            kw["device"] = "cpu"
        return kw

    for name in ("tensor", "zeros", "empty", "ones", "full"):
        orig = getattr(torch, name)

        def _wrapped(*args, __orig=orig, **kwargs):
            return __orig(*args, **_cpu_device(kwargs))

        _SHIMS[f"torch.{name}"] = orig
        setattr(torch, name, _wrapped)

    orig_type = torch.Tensor.type
    cuda_names = {
        "torch.FloatTensor": "torch.cuda.FloatTensor",
        "torch.HalfTensor": "torch.cuda.HalfTensor",
        "torch.BFloat16Tensor": "torch.cuda.BFloat16Tensor",
    }

    def _type(self, dtype=None, non_blocking=False, **kwargs):
        if dtype is None and not kwargs:
            t = orig_type(self)
            return cuda_names.get(t, t)
        return orig_type(self, dtype, non_blocking, **kwargs)

    _SHIMS["Tensor.type"] = orig_type
    torch.Tensor.type = _type

    from megatron.core.distributed import param_and_grad_buffer as pgb

    def _reduce_scatter(output, input, op=torch.distributed.ReduceOp.SUM, group=None, async_op=False):
        ws = torch.distributed.get_world_size(group)
        r = torch.distributed.get_rank(group)
        buf = input.clone()
        torch.distributed.all_reduce(buf, op=op, group=group)
        n = output.numel()
        assert buf.numel() == n * ws
        output.copy_(buf[r * n:(r + 1) * n].view_as(output))
        return None

    def _all_gather(output, input, group=None, async_op=False):
        ws = torch.distributed.get_world_size(group)
        n = input.numel()
        chunks = [output[i * n:(i + 1) * n] for i in range(ws)]
        tmp = [torch.empty_like(c) for c in chunks]
        torch.distributed.all_gather(tmp, input.contiguous(), group=group)
        for c, t in zip(chunks, tmp):
            c.copy_(t)
        return None

    @contextlib.contextmanager
    def _null_coalescing(group=None, device=None, async_ops=False):
        yield None

    # torch's AdamW fallback (no Apex / TE here) keeps a per-param 'step' tensor in its state;
    # megatron-core 0.16.1's DistributedOptimizer._set_main_param_and_optimizer_states copies
    # every inner-state key from the loaded per-param tensors, so on load it either overwrites
    # 'step' with the pre-load placeholder (dp_reshardable, fully_sharded_model_space) or fails
    # with KeyError: 'step' (fully_reshardable, whose tensors carry no step).  The step is
    # restored separately, from the checkpoint's param_groups, by DistributedOptimizer.load_state_dict.
    # With TE / Apex FusedAdam (SkyRL on GPU) the inner state has no 'step'.  Skip that one key.
    from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer

    orig_set = DistributedOptimizer._set_main_param_and_optimizer_states

    def _set_states(self, model_param, tensors):
        group_index, group_order = self.model_param_group_index_map[model_param]
        if self.config.use_precision_aware_optimizer_no_fp8_or_ds_fp8:
            return orig_set(self, model_param, tensors)
        main_param = self.optimizer.param_groups[group_index]["params"][group_order]
        dst = {"param": main_param, **self.optimizer.state[main_param]}
        for key in dst:
            if key == "step":
                continue
            dst[key].copy_(tensors[key])

    _SHIMS["DistributedOptimizer._set_main_param_and_optimizer_states"] = orig_set
    DistributedOptimizer._set_main_param_and_optimizer_states = _set_states

    _SHIMS["pgb"] = (pgb.dist_reduce_scatter_func, pgb.dist_all_gather_func, pgb._coalescing_manager)
    pgb.dist_reduce_scatter_func = _reduce_scatter
    pgb.dist_all_gather_func = _all_gather
    pgb._coalescing_manager = _null_coalescing
    return list(_SHIMS)


# --------------------------------------------------------------------------------------------
# rank side
# --------------------------------------------------------------------------------------------


def _build(job, seed: int):
    import torch
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer

    _ensure_on_path()
    import megatron_worker

    torch.manual_seed(seed)
    model = megatron_worker.build_model(job)
    cfg = model.config
    ddp_cfg = DistributedDataParallelConfig(
        grad_reduce_in_fp32=True,
        overlap_grad_reduce=False,
        overlap_param_gather=False,
        use_distributed_optimizer=True,
        bucket_size=job.get("bucket_size"),
        average_in_collective=False,
    )
    ddp = DistributedDataParallel(cfg, ddp_cfg, model)
    o = job["optimizer"]
    opt_cfg = OptimizerConfig(
        optimizer="adam",
        lr=o["lr"],
        min_lr=o["min_lr"],
        weight_decay=o["weight_decay"],
        adam_beta1=o["betas"][0],
        adam_beta2=o["betas"][1],
        adam_eps=o["eps"],
        clip_grad=o["clip_grad"],
        use_distributed_optimizer=True,
        bf16=job["params_dtype"] == "bfloat16",
        params_dtype={"float32": torch.float32, "bfloat16": torch.bfloat16}[job["params_dtype"]],
    )
    opt = get_megatron_optimizer(opt_cfg, [ddp])
    return model, ddp, opt


def _train(job, model, ddp, opt, first_step: int = 0, eval_mode: bool | None = None,
           expert_grad_scale: float = 1.0) -> list:
    """``job["steps"]`` training steps on batches ``first_step``, ``first_step + 1``, ... of the
    job's deterministic batch sequence; returns the losses (last pipeline stage only).
    ``expert_grad_scale``: multiplies the reduced expert grads before the optimizer step (see
    :func:`_next_step`)."""
    import torch
    from megatron.core import parallel_state as ps
    from megatron.core.distributed import finalize_model_grads
    from megatron.core.pipeline_parallel import get_forward_backward_func

    _ensure_on_path()
    import cuda_shim

    m = job["model"]
    b, s = 2, 8
    cfg = model.config
    cfg.finalize_model_grads_func = finalize_model_grads
    g = torch.Generator().manual_seed(1234)  # same data on every rank (DP ranks see the same batch)
    losses = []
    mask = torch.triu(torch.ones(1, 1, s, s, dtype=torch.bool), 1)
    if eval_mode if eval_mode is not None else (m.get("moe") and job["tp"] > 1):
        # MoELayer refuses TRAINING mode with TP > 1 and no sequence parallel, and the local spec's
        # torch norms refuse sequence parallel; with dropout 0 eval mode changes nothing but that
        # check (autograd runs as usual: real grads, real Adam steps).
        model.eval()
    for step in range(first_step + job["steps"]):
        ids = torch.randint(0, m["padded_vocab"], (b, s + 1), generator=g)
        if step < first_step:
            continue
        # each DP rank its own micro-batch, so the DP reduce-scatter really sums different grads
        dp = ps.get_data_parallel_rank()
        ids = torch.roll(ids, shifts=dp, dims=0)
        batch = dict(
            tokens=ids[:, :-1].contiguous(),
            labels=ids[:, 1:].contiguous(),
            position_ids=torch.arange(s).unsqueeze(0).expand(b, s).contiguous(),
            attention_mask=mask,
        )

        def fwd(data_iterator, mdl):
            d = next(data_iterator)
            out = mdl(d["tokens"], d["position_ids"], d["attention_mask"], labels=d["labels"])

            def loss_func(output_tensor):
                loss = output_tensor.float().mean()
                return loss, {"loss": loss.detach()}

            return out, loss_func

        ddp.zero_grad_buffer()
        opt.zero_grad()
        with cuda_shim.null_rng_tracker_fork():
            res = get_forward_backward_func()(
                forward_step_func=fwd,
                data_iterator=iter([batch]),
                model=[ddp],
                num_microbatches=1,
                seq_length=s,
                micro_batch_size=b,
                forward_only=False,
            )
        if expert_grad_scale != 1.0:
            for buf in ddp.expert_parallel_buffers:
                buf.grad_data.mul_(expert_grad_scale)
        ok, grad_norm, _ = opt.step()
        assert ok, f"optimizer step {step} skipped"
        if res:
            losses.append(float(res[0]["loss"]))
    return losses


def _named_state(model, opt) -> dict:
    """name -> {exp_avg, exp_avg_sq, param(fp32 main shard)} of the local shards this rank's
    inner optimizers hold (empty for params this DP rank owns no part of); plus 'step'."""
    out = {}
    names = {id(p): n for n, p in model.named_parameters()}
    opts = getattr(opt, "chained_optimizers", [opt])
    steps = set()
    for i, o in enumerate(opts):
        inner = o.optimizer
        # main (fp32) shard param -> model param: DistributedOptimizer keeps model_param_group_index_map
        for mp, (gi, pi) in o.model_param_group_index_map.items():
            main = inner.param_groups[gi]["params"][pi]
            st = inner.state.get(main, {})
            rec = {"param": main.detach().clone()}
            for k in ("exp_avg", "exp_avg_sq"):
                if k in st:
                    rec[k] = st[k].detach().clone()
            if "step" in st:
                steps.add(float(st["step"]))
            out[f"{i}:{names[id(mp)]}"] = rec
    out["__steps__"] = sorted(steps)
    return out


def _layout(model, opt, rank: int) -> dict:
    """This rank's DistributedOptimizer bucket layout, as megatron-core built it: per optimizer of
    the chain, its ``data_parallel_group_idx`` (the ``dp_group_idx_{i}`` of the dp_reshardable keys),
    ``per_bucket_numel`` / ``per_bucket_numel_unpadded`` and, per bucket, the params in bucket
    order with their ``gbuf_world`` range (the offsets inside the flat buffer)."""
    from megatron.core import parallel_state as ps

    names = {id(p): n for n, p in model.named_parameters()}
    out = dict(rank=rank, tp_rank=ps.get_tensor_model_parallel_rank(),
               pp_rank=ps.get_pipeline_model_parallel_rank(), dp_rank=ps.get_data_parallel_rank(),
               optimizers=[])
    for o in getattr(opt, "chained_optimizers", [opt]):
        rec = dict(data_parallel_group_idx=o.data_parallel_group_idx,
                   dp_world=o.data_parallel_group.size(), dp_rank=o.data_parallel_group.rank(),
                   per_bucket_numel=repr(o.per_bucket_numel),
                   per_bucket_numel_unpadded=repr(o.per_bucket_numel_unpadded), buckets=[])
        for gi, gmaps in enumerate(o.gbuf_ranges):
            for dtype, buckets in gmaps.items():
                for bi, bmap in enumerate(buckets):
                    rec["buckets"].append(dict(
                        gbuf_idx=gi, dtype=repr(dtype), bucket_idx=bi,
                        params=[dict(name=names[id(mp)], shape=list(mp.shape),
                                     gbuf_world=[r["gbuf_world"].start, r["gbuf_world"].end],
                                     param=[r["param"].start, r["param"].end])
                                for mp, r in bmap["param_map"].items()]))
        out["optimizers"].append(rec)
    return out


def _chain_parts(opt_sd) -> list:
    """The per-optimizer state dicts of a (possibly chained) loaded optimizer state dict."""
    if "optimizer" in opt_sd and "param_state" in opt_sd:
        return [opt_sd]
    return [opt_sd[k] for k in sorted(opt_sd)]


def _load_checkpoint(ckpt_dir: str, model, opt, fmt: str) -> dict:
    """megatron-core's own load of a model + distributed-optimizer checkpoint in format ``fmt``
    into the freshly built ``model`` / ``opt``.  Returns what ``dist_checkpointing.load`` gave."""
    import torch
    from megatron.core import dist_checkpointing

    _ensure_on_path()
    import cuda_shim

    # torch's AdamW (no Apex / TE on this machine) creates its per-param state, which
    # holds 'step', only on the first step; DistributedOptimizer.state_dict() needs it.
    # megatron-core's own helper for this (used by its fsdp_dtensor load path): one Adam
    # step on zero grads; every value it touches is overwritten by the load.
    for o in getattr(opt, "chained_optimizers", [opt]):
        o._init_optimizer_states_with_dummy_values()
    meta = {"distrib_optim_sharding_type": fmt}
    model_sd = model.sharded_state_dict()
    with cuda_shim.tensor_cuda_is_identity():
        state = {"model": model_sd,
                 "optimizer": opt.sharded_state_dict(model_sd, is_loading=True, metadata=meta)}
    loaded = dist_checkpointing.load(state, ckpt_dir, validate_access_integrity=True)
    model.load_state_dict(loaded["model"])
    # (fp32 params: the main-param shards are views of the model params, which require
    #  grad; the in-place copy of the loaded values needs no_grad)
    with torch.no_grad(), cuda_shim.tensor_cuda_is_identity():
        opt.load_state_dict(loaded["optimizer"])
    # torch AdamW fallback only: DistributedOptimizer.load_state_dict (distrib_optimizer.py:817-823)
    # gives every param's inner state the SAME 'step' tensor, and AdamW's in-place step += 1 then
    # advances it once per param: the next step's bias correction would depend on how many params
    # the rank holds (so on the layout).  Each param its own step, as a fresh AdamW has.
    for o in getattr(opt, "chained_optimizers", [opt]):
        for st in o.optimizer.state.values():
            if isinstance(st.get("step"), torch.Tensor):
                st["step"] = st["step"].clone()
    return loaded


def checkpoint_optimizer_format(ckpt_dir: str) -> str:
    """The distributed-optimizer format a checkpoint declares in its ``common.pt``
    (``param_state_sharding_type`` of every optimizer of the chain: they must agree)."""
    from megatron.core import dist_checkpointing

    opt = dist_checkpointing.load_common_state_dict(ckpt_dir)["optimizer"]
    parts = [opt] if "param_state_sharding_type" in opt else [opt[k] for k in sorted(opt)]
    formats = {p["param_state_sharding_type"] for p in parts}
    if len(formats) != 1:
        raise ValueError(f"{ckpt_dir}: optimizers of the chain declare different formats {sorted(formats)}")
    return formats.pop()


def _save_full_snapshot(model, opt, path: str, rank: int) -> None:
    """Model + optimizer state as megatron-core's ``fully_reshardable`` checkpoint at ``path``:
    megatron's own gather of every rank's Adam shards into full per-parameter tensors, which a
    plain torch DCP read turns into layout-independent tensors to compare across layouts."""
    import torch
    from megatron.core import dist_checkpointing

    _ensure_on_path()
    import cuda_shim

    model_sd = model.sharded_state_dict()
    with cuda_shim.tensor_cuda_is_identity():
        state = {"model": model_sd, "optimizer": opt.sharded_state_dict(
            model_sd, metadata={"distrib_optim_sharding_type": "fully_reshardable"})}
    if rank == 0:
        os.makedirs(path, exist_ok=True)
    torch.distributed.barrier()
    dist_checkpointing.save(state, path, sharded_strategy=("torch_dist", 1))
    torch.distributed.barrier()


def _next_step(job, rank: int) -> None:
    """The "step" oracle: a fresh model + DDP + DistributedOptimizer at the job's layout loads
    ``ckpt_dir`` (in the format its ``common.pt`` declares, as a resumed run would), snapshots
    the loaded state (``out_dir/loaded``), takes ONE more training step on the batch the writing
    job would have used next (batch index ``first_step``), and snapshots the result
    (``out_dir/stepped``); ``out_dir/rank_{r}.json``: the loss, the inner Adam steps after load."""
    t0 = time.monotonic()
    fmt = job["format"] if job["format"] != "auto" else checkpoint_optimizer_format(job["ckpt_dir"])
    model, ddp, opt = _build(job, seed=job["seed"] + 1000)
    _load_checkpoint(job["ckpt_dir"], model, opt, fmt)
    steps_loaded = _named_state(model, opt)["__steps__"]
    if job.get("control") == "halve_exp_avg":  # a negative control: moments off by a factor
        for o in getattr(opt, "chained_optimizers", [opt]):
            for st in o.optimizer.state.values():
                st["exp_avg"].mul_(0.5)
    t1 = time.monotonic()
    _save_full_snapshot(model, opt, os.path.join(job["out_dir"], "loaded"), rank)
    t2 = time.monotonic()
    # MoE: eval mode at every layout (TP > 1 needs it, see _train) so source and target step alike.
    # MoE at TP > 1 without sequence parallel (which megatron-core refuses in training mode; the local
    # spec's torch norms refuse SP) routes every token once per TP rank, so the reduced expert
    # grads come out TP times what megatron computes with SP or at TP 1 (measured: exactly 2x at
    # TP 2, ETP 1 or 2): divided back so that every layout takes megatron's real step.
    moe = bool(job["model"].get("moe"))
    losses = _train(job, model, ddp, opt, first_step=job["first_step"], eval_mode=moe,
                    expert_grad_scale=1.0 / job["tp"] if moe else 1.0)
    t3 = time.monotonic()
    _save_full_snapshot(model, opt, os.path.join(job["out_dir"], "stepped"), rank)
    with open(os.path.join(job["out_dir"], f"rank_{rank}.json"), "w") as f:
        json.dump({"format": fmt, "losses": losses, "steps_loaded": steps_loaded,
                   "steps_after": _named_state(model, opt)["__steps__"],
                   "seconds": dict(load=round(t1 - t0, 2), snapshot=round(t2 - t1, 2), step=round(t3 - t2, 2),
                                   total=round(time.monotonic() - t0, 2))}, f)


def _rank(job, rank: int) -> None:
    import torch
    from megatron.core import dist_checkpointing
    from megatron.core import parallel_state as ps

    _ensure_on_path()
    import cuda_shim

    t0 = time.monotonic()
    if job["model"].get("moe"):
        ps.initialize_model_parallel(job["tp"], job["pp"], expert_model_parallel_size=job["ep"],
                                     expert_tensor_parallel_size=job["etp"])
    else:
        ps.initialize_model_parallel(job["tp"], job["pp"])
    try:
        fmt = job["format"]
        meta = {"distrib_optim_sharding_type": fmt}
        if job["mode"] == "save":
            model, ddp, opt = _build(job, seed=job["seed"])
            t1 = time.monotonic()
            losses = _train(job, model, ddp, opt)
            t2 = time.monotonic()
            model_sd = model.sharded_state_dict()
            # (fully_reshardable: get_parameter_state_dp_zero does send_tensor.cuda() before its
            #  all_gather over the DP group: test-only identity on CPU)
            with cuda_shim.tensor_cuda_is_identity():
                state = {"model": model_sd, "optimizer": opt.sharded_state_dict(model_sd, metadata=meta)}
            os.makedirs(job["ref_dir"], exist_ok=True)
            ref = _named_state(model, opt)
            ref["__losses__"] = losses
            with open(os.path.join(job["ref_dir"], f"layout_rank_{rank}.json"), "w") as f:
                json.dump(_layout(model, opt, rank), f, indent=1, sort_keys=True)
            torch.save(ref, os.path.join(job["ref_dir"], f"rank_{rank}.pt"))
            if rank == 0:
                os.makedirs(job["ckpt_dir"], exist_ok=True)
            torch.distributed.barrier()
            t3 = time.monotonic()
            dist_checkpointing.save(state, job["ckpt_dir"], sharded_strategy=("torch_dist", 1),
                                    validate_access_integrity=True)
            torch.distributed.barrier()
            if rank == 0:
                _log(f"{fmt}: build {t1 - t0:.1f}s train {t2 - t1:.1f}s sd {t3 - t2:.1f}s "
                     f"save {time.monotonic() - t3:.1f}s losses {losses}")
        elif job["mode"] == "step":
            _next_step(job, rank)
        else:
            model, ddp, opt = _build(job, seed=job["seed"] + 1000)
            loaded = _load_checkpoint(job["ckpt_dir"], model, opt, fmt)
            got = _named_state(model, opt)
            ref = torch.load(os.path.join(job["ref_dir"], f"rank_{rank}.pt"), weights_only=False)
            ref.pop("__losses__", None)
            problems = []
            if set(got) != set(ref):
                problems.append(f"names differ: {sorted(set(got) ^ set(ref))}")
            nonzero = 0
            for k, rec in ref.items():
                if k == "__steps__":
                    if got[k] != rec:
                        problems.append(f"inner AdamW steps {got[k]} != {rec}")
                    continue
                for kk, t in rec.items():
                    g = got.get(k, {}).get(kk)
                    if g is None or g.shape != t.shape or not torch.equal(g, t):
                        problems.append(f"{k}.{kk} differs")
                    elif kk == "exp_avg" and t.numel() and t.abs().sum() > 0:
                        nonzero += 1
            for i, sd in enumerate(_chain_parts(loaded["optimizer"])):
                steps = {g.get("step") for g in sd["optimizer"]["param_groups"]}
                if steps != set(ref["__steps__"]):
                    problems.append(f"optimizer {i}: loaded param_groups steps {steps} != {ref['__steps__']}")
            if nonzero == 0:
                problems.append("no non-zero exp_avg on this rank")
            with open(os.path.join(job["ref_dir"], f"load_rank_{rank}.json"), "w") as f:
                json.dump({"problems": problems, "nonzero_exp_avg": nonzero}, f)
            if problems:
                raise AssertionError(f"rank {rank}: {problems[:5]}")
            if rank == 0:
                _log(f"{fmt}: load check ok in {time.monotonic() - t0:.1f}s ({nonzero} params)")
    finally:
        ps.destroy_model_parallel()


_MANAGER: list = []


def _fork_results_queue() -> None:
    """Speed only, as ``megatron_worker._fork_results_queue`` (pre-sets megatron-core's private
    ``filesystem_async._results_queue`` to a queue of a FORK-context manager, so no spawned process
    re-imports torch), keeping the manager so a failing rank can shut it down."""
    import multiprocessing as mp

    from megatron.core.dist_checkpointing.strategies import filesystem_async as fa

    if getattr(fa, "_results_queue", "missing") is None:
        mgr = mp.get_context("fork").Manager()
        _MANAGER.append(mgr)
        fa._results_queue = mgr.Queue()


def _rank_entry(job, rank: int) -> None:
    import torch

    torch.set_num_threads(1)
    os.environ["RANK"] = str(rank)
    os.environ["LOCAL_RANK"] = str(rank)
    os.environ["WORLD_SIZE"] = str(job["world_size"])
    torch.distributed.init_process_group("gloo", init_method="file://" + job["store_file"],
                                         rank=rank, world_size=job["world_size"])
    try:
        if job.get("fork_results_queue", True):
            _fork_results_queue()
        _rank(job, rank)
    except BaseException:
        traceback.print_exc()
        sys.stderr.flush()
        if job["mode"] == "step":  # the oracle reports each case's failure and goes on
            with contextlib.suppress(OSError):
                os.makedirs(job["out_dir"], exist_ok=True)
                with open(os.path.join(job["out_dir"], f"error_rank_{rank}.txt"), "w") as f:
                    f.write(traceback.format_exc())
        # os._exit skips the multiprocessing finalizers: stop our own manager process first so it
        # is not left orphaned
        if _MANAGER:
            with contextlib.suppress(Exception):
                _MANAGER[0].shutdown()
        os._exit(3)
    torch.distributed.destroy_process_group()


def _run_job(job, timeout: float) -> None:
    import multiprocessing as mp

    from fsdp_writer import freeze_before_fork

    if os.path.exists(job["store_file"]):
        os.remove(job["store_file"])
    ctx = mp.get_context("fork")
    procs = [ctx.Process(target=_rank_entry, args=(job, r), name=f"distopt-rank{r}")
             for r in range(job["world_size"])]
    freeze_before_fork(ctx)
    for p in procs:
        p.start()
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
        for p in pending:
            p.kill()
        for p in pending:
            p.join(5)
        if failed is None:
            failed = f"timed out after {timeout:.0f}s"
    if failed:
        raise RuntimeError(f"distopt {job['mode']} of {job['ckpt_dir']} failed: {failed}")


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 1:
        print("usage: distopt_worker.py JOBS.json", file=sys.stderr)
        return 2
    with open(argv[0]) as f:
        jobs = json.load(f)
    t0 = time.monotonic()
    import torch

    torch.set_num_threads(1)
    _ensure_on_path()
    import megatron.core.dist_checkpointing  # noqa: F401
    import megatron.core.dist_checkpointing.strategies.torch  # noqa: F401
    import megatron.core.distributed  # noqa: F401
    import megatron.core.models.gpt  # noqa: F401
    import megatron.core.models.gpt.gpt_layer_specs  # noqa: F401
    import megatron.core.optimizer  # noqa: F401
    import megatron.core.pipeline_parallel  # noqa: F401
    import megatron.core.transformer.moe.moe_layer  # noqa: F401  (pay the MoE import once)

    shims = install_distopt_shims()
    _log(f"imports {time.monotonic() - t0:.1f}s; shims {shims}")
    for job in jobs:
        t1 = time.monotonic()
        try:
            _run_job(job, timeout=float(job.get("timeout", 240)))
        except Exception as e:  # noqa: BLE001
            _log(str(e))
            if job["mode"] != "step":
                return 1
        _log(f"{job['mode']} {job['ckpt_dir']} (world {job['world_size']}) in {time.monotonic() - t1:.1f}s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
