"""megatron-core as the judge of a Megatron checkpoint at a given layout (dense or MoE).

For each job (:func:`oracle_job`), ``world_size`` rank processes on a gloo group (forked from ONE
launcher that imported megatron-core once, :func:`run_oracle`) build the real mcore ``GPTModel``
of :mod:`megatron_worker` at the job's TP x PP (x EP x ETP for MoE), take its
``sharded_state_dict()`` plus the optimizer state keyed like the parameters, and:

* load it with megatron-core's own ``dist_checkpointing.load``; every local tensor must be
  bit-identical to the part of the fixture's full reference tensor
  (``<dir>.reference/checkpoint_tensors.safetensors``) that megatron's ShardedTensor offsets say
  the rank holds.  Together the ranks cover every element, so this is the full tensors compared;
  the verdict's ``keys`` lists the reference keys compared (all of them, or something is missing);
* report ``layout``: the main-replica chunks (key, offsets, sizes, rank) of megatron's own sharded
  state dict at that layout, i.e. what megatron's save there would write, and ``holders``: every
  rank holding each chunk, replica or not;
* with ``logits_file`` (the MoE fixtures' ``reference_logits.safetensors``: ``input_ids``, the HF
  model's fp32 ``logits``): run the loaded model (eval mode, hidden states passed stage to stage
  when PP > 1, vocab-parallel logits gathered) and report max |logits - HF logits| from the last
  stage; with ``controls`` also that error after deliberate damage (:func:`_controls`).

The optimizer keys at the target are those megatron-core 0.16 builds there for the
fully_reshardable format: ``optimizer.state.{param,exp_avg,exp_avg_sq}.<model key>`` with the
parameter's own sharding, prefixed ``chained_0.`` (dense) / ``chained_1.`` (expert parallel) only
when the model has expert-parallel parameters (``allreduce=False``: EP > 1), because
``get_megatron_optimizer`` then chains two optimizers and ``ChainedOptimizer.sharded_state_dict``
prefixes each; with one optimizer there is no prefix (optimizer/__init__.py, optimizer.py).

Top-level imports are stdlib only (runs as ``python -m realckpt.megatron_oracle SPEC.json``).
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

_HERE = Path(__file__).resolve().parent


def oracle_job(ckpt, name: str, ckpt_dir, *, tp: int, pp: int, dp: int = 1, ep: int | None = None,
               etp: int | None = None, optimizer: bool = True) -> dict:
    """The oracle job for checkpoint ``ckpt_dir`` holding the tensors of fixture ``ckpt``
    (a ``megatron_fixtures.MegatronCkpt``), judged at TP x PP x DP (MoE: EP ``ep``, default 1,
    ETP ``etp``, default TP, as convert-reshard defaults them); ``optimizer=False``: the model
    alone."""
    wj = ckpt.info["worker_job"]
    states = []  # (state, model key, reference key) of every optimizer tensor of the fixture
    for ref_key in ckpt.info["optimizer_keys"] if optimizer else ():
        state, model_key = ref_key[ref_key.index("optimizer.state.") + len("optimizer.state."):].split(".", 1)
        states.append([state, model_key, ref_key])
    job = dict(name=name, ckpt_dir=str(ckpt_dir), world_size=tp * pp * dp, tp=tp, pp=pp, model=wj["model"],
               per_layer_keys=wj["per_layer_keys"], params_dtype=wj["params_dtype"],
               tensors_file=wj["tensors_file"], optimizer_states=states)
    if wj["model"].get("moe"):
        job.update(ep=ep or 1, etp=tp if etp is None else etp)
    logits = ckpt.reference_dir / "reference_logits.safetensors"
    if logits.is_file():
        job["logits_file"] = str(logits)
    return job


def run_oracle(jobs: list[dict], work: Path, timeout: float = 400) -> dict[str, dict]:
    """Judge every job with one launcher: {job name: verdict}, each verdict the merge over the
    job's ranks of ``compared`` (tensors), ``mismatch`` (reference keys whose local part differs),
    ``keys`` (reference keys compared), ``layout``, ``holders``, ``logits`` (max |diff|, or None),
    ``controls`` (with ``job["controls"]``: the logits error after each deliberate damage),
    ``chained`` (the optimizer keys carried ``chained_N.``) and ``errors``."""
    from realckpt.fsdp_writer import run_launcher

    for job in jobs:
        job["store_file"] = str(work / f"store-{job['name']}")
        job["result_prefix"] = str(work / f"result-{job['name']}-")
    log = run_launcher("realckpt.megatron_oracle", {"jobs": jobs}, timeout, "megatron oracle")
    out = {}
    for job in jobs:
        merged = {"compared": 0, "mismatch": [], "keys": set(), "layout": [], "holders": [], "logits": None,
                  "controls": {}, "chained": None, "errors": []}
        for r in range(job["world_size"]):
            path = Path(f"{job['result_prefix']}{r}.json")
            if not path.exists():
                merged["errors"].append(f"rank {r} wrote no result:\n{log[-3000:]}")
                continue
            res = json.loads(path.read_text())
            if res["error"]:
                merged["errors"].append(res["error"])
            for k in ("compared", "mismatch", "layout", "holders"):
                merged[k] += res[k]
            merged["keys"] |= set(res["keys"])
            if res["logits"] is not None:
                merged["logits"] = max(merged["logits"] or 0.0, res["logits"])
                merged["controls"] = res["controls"]
            merged["chained"] = res["chained"]
        out[job["name"]] = merged
    return out


# --------------------------------------------------------------------------------------------
# rank side
# --------------------------------------------------------------------------------------------


def _judge_rank(job: dict, rank: int) -> None:
    out = {"rank": rank, "compared": 0, "mismatch": [], "keys": [], "layout": [], "holders": [], "logits": None,
           "controls": {}, "chained": None, "error": None}
    try:
        _judge(job, rank, out)
    except BaseException:
        import traceback

        out["error"] = traceback.format_exc()
        raise
    finally:
        with open(f"{job['result_prefix']}{rank}.json", "w") as f:
            json.dump(out, f)


def _judge(job: dict, rank: int, out: dict) -> None:
    import dataclasses

    import megatron_worker
    import torch
    from megatron.core import dist_checkpointing
    from megatron.core.dist_checkpointing.dict_utils import nested_values
    from megatron.core.dist_checkpointing.mapping import ShardedTensor, ShardedTensorFactory, is_main_replica
    from safetensors.torch import load_file

    model = megatron_worker.build_model(job)
    model.to({"float32": torch.float32, "bfloat16": torch.bfloat16}[job["params_dtype"]])
    meta = {"non_homogeneous_layers": True} if job["per_layer_keys"] else None
    model_sd = model.sharded_state_dict(metadata=meta)
    full = load_file(job["tensors_file"])
    leaves = megatron_worker._sharded_leaves(model_sd)

    # megatron's optimizer chain at this layout: expert-parallel params form a second optimizer
    expert_parallel = {id(p) for p in model.parameters() if not getattr(p, "allreduce", True)}
    chained = bool(expert_parallel) and len(expert_parallel) < len(list(model.parameters()))
    out["chained"] = chained
    states: dict[str, list] = {}
    for state, model_key, ref_key in job["optimizer_states"]:
        states.setdefault(model_key, []).append((state, ref_key))
    opt, ref_keys = {}, {}
    for i, sh in enumerate(leaves):
        prefix = f"chained_{int(id(sh.data) in expert_parallel)}." if chained else ""
        for state, ref_key in states.get(sh.key, []):
            kw = dict(key=f"{prefix}optimizer.state.{state}.{sh.key}", data=torch.empty(sh.data.shape, dtype=torch.float32))
            if isinstance(sh, ShardedTensor):
                kw["dtype"] = torch.float32
            opt[f"{i}.{state}"] = dataclasses.replace(sh, **kw)
            ref_keys[f"optimizer.{i}.{state}"] = ref_key
    state = {"model": model_sd}
    if opt:
        state["optimizer"] = opt
    flat = {"model." + str(i): sh for i, sh in enumerate(leaves)} | {"optimizer." + k: v for k, v in opt.items()}

    expected = {}
    for path, sh in flat.items():
        ref_key = ref_keys.get(path, sh.key)
        exp = dataclasses.replace(sh, key=ref_key, data=torch.zeros_like(sh.data))
        megatron_worker._fill(exp, full)
        expected[path] = exp.data
        with torch.no_grad():
            sh.data.fill_(float("nan") if sh.data.is_floating_point() else 0)
        for piece in (list(nested_values(sh.build())) if isinstance(sh, ShardedTensorFactory) else [sh]):
            chunk = [piece.key, list(piece.global_offset), [1] * piece.prepend_axis_num + list(piece.local_shape),
                     rank]
            out["holders"].append(chunk)
            if is_main_replica(piece.replica_id):
                out["layout"].append(chunk)
    loaded = dist_checkpointing.load(state, job["ckpt_dir"])
    got = {"model." + str(i): v for i, v in enumerate(_values(loaded["model"], model_sd))}
    if opt:
        got |= {"optimizer." + k: loaded["optimizer"][k] for k in opt}
    for path, exp in expected.items():
        key = ref_keys.get(path, flat[path].key)
        out["compared"] += 1
        out["keys"].append(key)
        if not torch.equal(got[path], exp):
            out["mismatch"].append(key)
    out["keys"] = sorted(set(out["keys"]))
    if job.get("logits_file"):
        model.load_state_dict(loaded["model"], strict=True)
        out["logits"] = _logits_error(model, job["logits_file"])
        if job.get("controls"):
            out["controls"] = _controls(model, job["logits_file"])


def _values(loaded, sharded):
    """The loaded tensors in the order of the sharded leaves (same nesting)."""
    from megatron.core.dist_checkpointing.mapping import ShardedTensor, ShardedTensorFactory

    if isinstance(sharded, (ShardedTensor, ShardedTensorFactory)):
        return [loaded]
    if isinstance(sharded, dict):
        return [v for k in sharded for v in _values(loaded[k], sharded[k])]
    if isinstance(sharded, (list, tuple)):
        return [v for a, b in zip(loaded, sharded) for v in _values(a, b)]
    return []


def _logits_error(model, logits_file: str) -> float | None:
    """max |logits - reference| of the model at its layout (None off the last pipeline stage):
    hidden states passed stage to stage (point-to-point, as megatron's forward-only schedule does;
    that schedule itself allocates CUDA tensors), TP logits gathered, eval mode (MoE layers refuse
    training with TP > 1 and no sequence parallel; dropout is 0 anyway)."""
    import cuda_shim
    import torch
    from megatron.core import parallel_state as ps
    from safetensors.torch import load_file

    io = load_file(logits_file)
    ids, want = io["input_ids"], io["logits"]
    b, s = ids.shape
    position_ids = torch.arange(s).unsqueeze(0).expand(b, s).contiguous()
    mask = torch.triu(torch.ones(1, 1, s, s, dtype=torch.bool), 1)
    model.eval()
    with torch.no_grad(), cuda_shim.null_rng_tracker_fork():
        if not ps.is_pipeline_first_stage():
            hidden = torch.empty(s, b, model.config.hidden_size, dtype=model.config.pipeline_dtype)
            torch.distributed.recv(hidden, src=ps.get_pipeline_model_parallel_prev_rank())
            model.set_input_tensor(hidden)
        out = model(ids, position_ids, mask, runtime_gather_output=True)
        if not ps.is_pipeline_last_stage():
            torch.distributed.send(out.contiguous(), dst=ps.get_pipeline_model_parallel_next_rank())
            return None
    return float((out[..., : want.shape[-1]].float() - want).abs().max())


def _controls(model, logits_file: str) -> dict:
    """Negative controls (the logits check must see these): the logits error after swapping the
    first two local experts of every MoE layer, and (DeepSeek-V3) after zeroing the routers'
    expert bias -- the same damage on every rank; the model is restored after each."""
    import torch

    moe_layers = [layer.mlp for layer in model.decoder.layers if hasattr(layer.mlp, "router")]

    def swap_experts():
        for mlp in moe_layers:
            a, b = mlp.experts.local_experts[:2]
            for lin in ("linear_fc1", "linear_fc2"):
                wa, wb = getattr(a, lin).weight, getattr(b, lin).weight
                saved = wa.clone()
                wa.copy_(wb)
                wb.copy_(saved)

    def zero_expert_bias():
        for mlp in moe_layers:
            mlp.router.expert_bias.zero_()

    damages = {"swap_experts": swap_experts}
    if moe_layers and getattr(moe_layers[0].router, "expert_bias", None) is not None:
        damages["zero_expert_bias"] = zero_expert_bias
    out = {}
    for name, damage in damages.items():
        saved = {k: v.clone() for k, v in model.state_dict().items() if isinstance(v, torch.Tensor)}
        with torch.no_grad():
            damage()
        out[name] = _logits_error(model, logits_file)
        model.load_state_dict(saved, strict=False)
    return out


def main(argv=None) -> int:
    """``python -m realckpt.megatron_oracle SPEC.json``: judge every job of ``spec["jobs"]``."""
    argv = sys.argv[1:] if argv is None else argv
    with open(argv[0]) as f:
        jobs = json.load(f)["jobs"]
    sys.path.insert(0, str(_HERE))
    import megatron_worker

    t0 = time.monotonic()
    megatron_worker.import_megatron()
    for job in jobs:
        t1 = time.monotonic()
        failed = megatron_worker.run_job(job, _judge_rank)
        print(f"[megatron_oracle pid={os.getpid()}] {job['name']} (world {job['world_size']}): "
              f"{failed or 'ok'} in {time.monotonic() - t1:.1f}s", file=sys.stderr, flush=True)
    print(f"[megatron_oracle] {len(jobs)} jobs in {time.monotonic() - t0:.1f}s", file=sys.stderr, flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
