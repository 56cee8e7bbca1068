"""Per-rank worker for :mod:`realckpt.megatron_writer`: writes REAL megatron-core
``torch_dist`` checkpoints with ``megatron.core.dist_checkpointing.save`` on CPU (gloo).

Run by ``fsdp_writer.run_launcher`` (never imported by ckptctl)::

    python -m realckpt.megatron_worker SPEC.json     # {"jobs": [...], "tmp": ...}

The jobs' schema is whatever ``megatron_writer._job_and_info`` emits (the keys used are read
below).  The launcher (:func:`main`) imports torch and megatron-core ONCE
(:func:`import_megatron`, which also installs the test-only CUDA shim :mod:`cuda_shim`), then for
each job forks ``world_size`` rank processes (:func:`run_job`: ``fsdp_writer.run_ranks`` with the
``fork`` context, so the ~5 s megatron import is paid once per launcher, not once per rank).
:mod:`realckpt.megatron_oracle` runs its checks through the same :func:`run_job` /
:func:`rank_group` / :func:`build_model`.  Each rank (:func:`rank_group`, then :func:`_save_rank`):

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

MoE jobs (``job["model"]["moe"]``): ``initialize_model_parallel(tp, pp, expert_model_parallel_size=ep,
expert_tensor_parallel_size=etp)``; the model is built per layer from the local spec
(:func:`_build_moe_model`: SequentialMLP experts, shared experts, MLA) with the TE spec's key
names (:func:`_te_keys_map`); the optimizer part is a ChainedOptimizer-shaped
``{0: dense, 1: experts}`` with ``chained_{i}.`` key prefixes (:func:`_chained_optimizer_part`).
Test-only CPU shims besides :mod:`cuda_shim`: :func:`_define_missing_te_general_gemm` (two
megatron-core module globals that assume Transformer Engine) and a parameter-free core
attention for MLA (:func:`_mla_core_attention_class`).

Top-level imports are stdlib only: megatron's save may start a *spawn*-based multiprocessing
manager, which re-imports this module as ``__mp_main__``; the ``__main__`` guard below is required.
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


def _config_kwargs(job) -> dict:
    """TransformerConfig keywords shared by the dense and MoE models: RMSNorm, SwiGLU, no linear
    bias, every fusion off, dropout 0, CPU initialization, the job's dtype and TP x PP."""
    import torch

    m = job["model"]
    dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}[job["params_dtype"]]
    return dict(
        num_layers=m["num_layers"],
        hidden_size=m["hidden"],
        num_attention_heads=m["heads"],
        ffn_hidden_size=m["ffn"],
        layernorm_epsilon=m["norm_eps"],
        normalization="RMSNorm",
        gated_linear_unit=True,
        activation_func=torch.nn.functional.silu,
        add_bias_linear=False,
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


def _build_model(job):
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
    from megatron.core.transformer.transformer_config import TransformerConfig

    m = job["model"]
    cfg = TransformerConfig(
        **_config_kwargs(job),
        num_query_groups=m["kv_heads"],
        kv_channels=m["hidden"] // m["heads"],
        add_qkv_bias=m["qkv_bias"],
    )
    return _gpt_model(job, cfg, get_gpt_layer_local_spec(normalization="RMSNorm"))


def _gpt_model(job, cfg, layer_spec):
    """The mcore ``GPTModel`` of this rank's pipeline stage (rope, the job's vocabulary and tying)."""
    from megatron.core import parallel_state as ps
    from megatron.core.models.gpt import GPTModel

    _ensure_on_path()
    import cuda_shim

    m = job["model"]
    tied_pp = m["tie"] and job["pp"] > 1
    with cuda_shim.tensor_cuda_is_identity() if tied_pp else contextlib.nullcontext():
        return GPTModel(
            cfg,
            layer_spec,
            vocab_size=m["padded_vocab"],
            max_sequence_length=m["max_seq"],
            pre_process=ps.is_pipeline_first_stage(),
            post_process=ps.is_pipeline_last_stage(),
            share_embeddings_and_output_weights=m["tie"],
            position_embedding_type="rope",
            rotary_base=m["rotary_base"],
        )


# --------------------------------------------------------------------------------------------
# Mixture-of-Experts models (job["model"]["moe"] present)
# --------------------------------------------------------------------------------------------

#: The key renames of SkyRL's Transformer-Engine layer spec, applied to the local (non-TE) spec's
#: modules so the checkpoint holds the TE names (megatron's own ``sharded_state_dict_keys_map``
#: mechanism; the TE spec fuses these norms into the following linear layer):
#: GQA: ``input_layernorm`` -> ``self_attention.linear_qkv.layer_norm_*`` (always); dense MLP:
#: ``pre_mlp_layernorm`` -> ``mlp.linear_fc1.layer_norm_*`` (an MoE layer keeps
#: ``pre_mlp_layernorm.*`` with the TE spec); MLA keeps ``input_layernorm.*`` and fuses
#: ``q_layernorm`` / ``kv_layernorm`` into ``linear_q_up_proj`` / ``linear_kv_up_proj``.
def _te_keys_map(mla: bool, moe_layer: bool) -> dict:
    out = {}
    if mla:
        out["self_attention.q_layernorm."] = "self_attention.linear_q_up_proj.layer_norm_"
        out["self_attention.kv_layernorm."] = "self_attention.linear_kv_up_proj.layer_norm_"
    else:
        out["input_layernorm."] = "self_attention.linear_qkv.layer_norm_"
    if not moe_layer:
        out["pre_mlp_layernorm."] = "mlp.linear_fc1.layer_norm_"
    return out


def _define_missing_te_general_gemm() -> None:
    """TEST-ONLY, CPU without Transformer Engine: megatron-core 0.16.1's ``moe_utils`` imports
    ``te_general_gemm`` from TE inside a ``try`` and, when TE is missing, leaves the name
    undefined although ``RouterGatingLinearFunction.forward`` tests ``te_general_gemm is not
    None``.  Define it as ``None`` (its documented no-TE value: the plain matmul path) when it is
    absent; nothing is replaced when it exists."""
    from megatron.core.transformer.moe import moe_utils

    if not hasattr(moe_utils, "te_general_gemm"):
        moe_utils.te_general_gemm = None
    # Likewise ``multi_latent_attention`` sets ``HAVE_TE = True`` without Transformer Engine
    # (megatron's TE extension module imports and hands out MagicMock placeholders for the TE
    # classes), then calls ``isinstance(self.linear_proj, TELinear)`` with the mock.  With TE
    # really absent, set the flag to what it means.
    import importlib.util

    if importlib.util.find_spec("transformer_engine") is None:
        from megatron.core.transformer import multi_latent_attention as mla_mod

        mla_mod.HAVE_TE = False


def _mla_core_attention_class():
    """TEST-ONLY core attention for MLA on CPU: megatron-core 0.16.1's local
    ``DotProductAttention`` rejects the ``k_channels`` / ``v_channels`` that ``MLASelfAttention``
    passes (only TE's attention accepts them).  This parameter-free module computes plain causal
    softmax attention, ``softmax(q k^T * softmax_scale + mask) v`` in fp32, with megatron's
    ``[s, b, heads, d]`` inputs, boolean mask (True = masked) and ``[s, b, heads * dv]`` output.
    It holds no state: the checkpoint is unaffected; it only matters for the logits check."""
    import torch

    class _MLACoreAttention(torch.nn.Module):
        # (the base Attention builds it once with no channels; MLASelfAttention rebuilds it)
        def __init__(self, config, layer_number=None, attn_mask_type=None, attention_type=None,
                     softmax_scale=None, k_channels=None, v_channels=None, cp_comm_type=None,
                     pg_collection=None, **kwargs):
            super().__init__()
            self.config = config
            self.softmax_scale = softmax_scale

        def forward(self, query, key, value, attention_mask, attn_mask_type=None, **kwargs):
            s, b, h, _ = query.shape
            q, k, v = (t.permute(1, 2, 0, 3).float() for t in (query, key, value))  # [b, h, s, d]
            scale = self.softmax_scale if self.softmax_scale is not None else q.shape[-1] ** -0.5
            scores = torch.matmul(q, k.transpose(-1, -2)) * scale
            if attention_mask is None:
                attention_mask = torch.triu(torch.ones(s, s, dtype=torch.bool, device=q.device), 1)
            scores = scores.masked_fill(attention_mask.to(torch.bool), float("-inf"))
            out = torch.matmul(torch.softmax(scores, dim=-1), v)  # [b, h, s, dv]
            return out.permute(2, 0, 1, 3).reshape(s, b, -1).to(query.dtype)

    return _MLACoreAttention


def _moe_transformer_config(job):
    m = job["model"]
    moe = m["moe"]
    mla = m.get("mla")
    kw = dict(
        _config_kwargs(job),
        add_qkv_bias=False,
        qk_layernorm=bool(m.get("qk_layernorm")),
        expert_model_parallel_size=job["ep"],
        expert_tensor_parallel_size=job["etp"],
        # SkyRL turns sequence parallel on with TP > 1; the torch norms of the local spec refuse it
        # (it changes activations only, not one checkpoint key or shape)
        sequence_parallel=False,
        num_moe_experts=moe["num_experts"],
        moe_router_topk=moe["topk"],
        moe_ffn_hidden_size=moe["moe_ffn"],
        # an int for all-MoE models (stacked decoder.layers.* keys), a list with dense layers
        # (mcore then saves per-layer decoder.layers.{i}.* keys, as for DeepSeek-V3)
        moe_layer_freq=1 if all(moe["layer_freq"]) else [int(x) for x in moe["layer_freq"]],
        moe_router_load_balancing_type="none",
        moe_aux_loss_coeff=0.0,
        moe_token_dispatcher_type="allgather",  # alltoall creates CUDA streams
        moe_grouped_gemm=False,  # SequentialMLP: same checkpoint keys as TEGroupedMLP
        moe_router_score_function=moe["score"],
        moe_router_pre_softmax=False,
        moe_router_enable_expert_bias=bool(moe["expert_bias"]),
        moe_router_dtype="fp32",
        moe_shared_expert_intermediate_size=moe["shared_ffn"],
        moe_shared_expert_overlap=False,
        moe_permute_fusion=False,
    )
    if moe.get("num_groups"):
        kw.update(moe_router_num_groups=moe["num_groups"], moe_router_group_topk=moe["group_topk"])
    if moe.get("scaling_factor") is not None:
        kw["moe_router_topk_scaling_factor"] = moe["scaling_factor"]
    if mla:
        from megatron.core.transformer.transformer_config import MLATransformerConfig

        kw.update(
            num_query_groups=m["heads"],
            q_lora_rank=mla["q_lora_rank"],
            kv_lora_rank=mla["kv_lora_rank"],
            qk_head_dim=mla["qk_head_dim"],
            qk_pos_emb_head_dim=mla["qk_pos_emb_head_dim"],
            v_head_dim=mla["v_head_dim"],
            kv_channels=mla["qk_head_dim"] + mla["qk_pos_emb_head_dim"],
            rope_type="rope",
            rotary_base=m["rotary_base"],
            qk_layernorm=True,  # q_a_layernorm / kv_a_layernorm
        )
        return MLATransformerConfig(**kw)
    from megatron.core.transformer.transformer_config import TransformerConfig

    kw.update(num_query_groups=m["kv_heads"], kv_channels=m["head_dim"])
    return TransformerConfig(**kw)


def _build_moe_model(job):
    """A real mcore MoE ``GPTModel`` for this rank's pipeline stage: the local spec per layer
    (``SequentialMLP`` experts, shared experts, MLA when asked), with the TE spec's key names."""
    from dataclasses import replace

    from megatron.core.models.gpt.gpt_layer_specs import LNImpl, get_gpt_layer_local_spec
    from megatron.core.transformer.transformer_block import (
        TransformerBlockSubmodules,
        get_num_layers_to_build,
    )
    from megatron.core.transformer.transformer_layer import get_transformer_layer_offset

    _define_missing_te_general_gemm()
    m = job["model"]
    cfg = _moe_transformer_config(job)
    mla = bool(m.get("mla"))
    specs = []
    for is_moe in m["moe"]["layer_freq"]:
        spec = get_gpt_layer_local_spec(
            num_experts=m["moe"]["num_experts"] if is_moe else None,
            moe_grouped_gemm=False,
            qk_layernorm=cfg.qk_layernorm,
            multi_latent_attention=mla,
            normalization="RMSNorm",
        )
        sub = replace(spec.submodules, sharded_state_dict_keys_map=_te_keys_map(mla, bool(is_moe)))
        if mla:
            attn = sub.self_attention
            attn = replace(attn, submodules=replace(attn.submodules, core_attention=_mla_core_attention_class()))
            sub = replace(sub, self_attention=attn)
        specs.append(replace(spec, submodules=sub))
    offset = get_transformer_layer_offset(cfg)
    n = get_num_layers_to_build(cfg)
    return _gpt_model(job, cfg, TransformerBlockSubmodules(layer_specs=specs[offset: offset + n], layer_norm=LNImpl))


def build_model(job):
    """Dense or MoE mcore ``GPTModel`` for the job (MoE when ``job['model']['moe']``)."""
    if job["model"].get("moe"):
        return _build_moe_model(job)
    return _build_model(job)


def _sharded_leaves(sharded_sd):
    """(path, ShardedTensor|ShardedTensorFactory) for every tensor-like leaf."""
    from megatron.core.dist_checkpointing.dict_utils import nested_values
    from megatron.core.dist_checkpointing.mapping import ShardedTensor, ShardedTensorFactory

    return [v for v in nested_values(sharded_sd) if isinstance(v, (ShardedTensor, ShardedTensorFactory))]


def _fill(sh, full: dict, prefix: str = "") -> None:
    """Copy the rank-local part of the known full tensor(s) into ``sh.data`` (in place),
    using the ShardedTensor's own global offsets (a factory is built first: its pieces are
    views of ``sh.data``)."""
    import torch
    from megatron.core.dist_checkpointing.dict_utils import nested_values
    from megatron.core.dist_checkpointing.mapping import ShardedTensor, ShardedTensorFactory

    if isinstance(sh, ShardedTensorFactory):
        for piece in nested_values(sh.build()):
            _fill(piece, full, prefix)
        return
    assert isinstance(sh, ShardedTensor), type(sh)
    if prefix + sh.key not in full:
        raise KeyError(f"no reference tensor for checkpoint key {prefix + sh.key!r}")
    src = full[prefix + sh.key]
    if tuple(src.shape) != tuple(sh.global_shape):
        raise ValueError(f"{sh.key}: reference shape {tuple(src.shape)} != global shape {sh.global_shape}")
    with torch.no_grad():
        sh.data.copy_(src[sh.global_slice()].to(sh.data.dtype))


def _optimizer_part(job, model, model_sd, full, prefix: str = "", expert: bool = False):
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
    extra = dict(wd_mult=1.0, lr_mult=1.0, is_expert_parallel=expert, is_decoupled_lr=False)
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
                # (the reference tensors of a chained optimizer carry the chained_{i}. prefix the
                #  ChainedOptimizer adds afterwards)
                _fill(st, full, prefix)
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


def _chained_optimizer_part(job, model, model_sd, full):
    """MoE: megatron-core's ``get_megatron_optimizer`` builds a ``ChainedOptimizer`` of two
    optimizers, dense params first, expert-parallel params (``param.allreduce is False``) second;
    its ``sharded_state_dict`` returns ``{0: sd_0, 1: sd_1}`` and (``chained_optim_avoid_prefix``
    unset, as in SkyRL) prefixes every ShardedTensor key of optimizer i with ``chained_{i}.``
    (``add_prefix_for_sharding``).  Each part is the same fully_reshardable model-space layout as
    :func:`_optimizer_part`.  With a single optimizer (no expert parallelism) there is no chain
    and no prefix, as in megatron-core."""
    from megatron.core.dist_checkpointing.utils import add_prefix_for_sharding

    o = job["optimizer"]
    if o["format"] != "fully_reshardable":
        raise ValueError("MoE fixtures write the fully_reshardable optimizer format only")
    expert_ids = {id(p) for p in model.parameters() if not getattr(p, "allreduce", True)}
    parts = []
    for is_expert in (False, True):
        ids = {id(p) for p in model.parameters() if (id(p) in expert_ids) == is_expert}
        if ids:
            parts.append((is_expert, ids))
    sub_sds = []
    for i, (is_expert, ids) in enumerate(parts):
        prefix = f"chained_{i}." if len(parts) > 1 else ""
        sd, sched = _optimizer_part(job, _SubModel(model, ids), model_sd, full, prefix=prefix, expert=is_expert)
        sub_sds.append(sd)
    if len(sub_sds) == 1:
        return sub_sds[0], sched
    for i, sd in enumerate(sub_sds):
        add_prefix_for_sharding(sd, f"chained_{i}.")
    return dict(enumerate(sub_sds)), sched


class _SubModel:
    """The subset of a module's parameters one optimizer of a chain owns (``.parameters()``)."""

    def __init__(self, model, ids):
        self._params = [p for p in model.parameters() if id(p) in ids]

    def parameters(self):
        return iter(self._params)


def _write_rank_info(job, rank: int, model) -> None:
    """``rank_{r}.json`` in ``job['rank_info_dir']``: this rank's parallel coordinates (megatron's
    own parallel_state) and, per local MoE layer, the global expert ids it holds (the MoELayer's
    ``local_expert_indices``) -- the truth for EP layout checks."""
    from megatron.core import parallel_state as ps

    layers = {}
    for layer in getattr(model.decoder, "layers", []):
        idx = getattr(layer.mlp, "local_expert_indices", None)
        if idx is not None:
            layers[str(layer.layer_number - 1)] = [int(i) for i in idx]
    info = dict(
        rank=rank, tp_rank=ps.get_tensor_model_parallel_rank(), pp_rank=ps.get_pipeline_model_parallel_rank(),
        dp_rank=ps.get_data_parallel_rank(), ep_rank=ps.get_expert_model_parallel_rank(),
        etp_rank=ps.get_expert_tensor_parallel_rank(), expert_dp_rank=ps.get_expert_data_parallel_rank(),
        local_experts=layers,
    )
    with open(os.path.join(job["rank_info_dir"], f"rank_{rank}.json"), "w") as f:
        json.dump(info, f, sort_keys=True)


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
    torch.manual_seed(job["seed"])
    model = build_model(job)
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

    if job.get("rank_info_dir"):
        _write_rank_info(job, rank, model)
    state = {"model": model_sd}
    if job["optimizer"] is not None and job["model"].get("moe"):
        state["optimizer"], sched = _chained_optimizer_part(job, model, model_sd, full)
        state["lr_scheduler"] = sched.state_dict()
    elif job["optimizer"] is not None:
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
        _log(f"rank0: model {t1 - t0:.1f}s, state {t2 - t1:.1f}s, save {t3 - t2:.1f}s")


def rank_group(job, rank: int, store_file: str, body) -> None:
    """One forked rank process: join the job's gloo group (a ``file://`` store: no TCP port to
    race for), megatron's model-parallel groups at the job's TP x PP (x EP x ETP for MoE), then
    ``body(job, rank)``.  A failing rank exits 3 at once (its peers are killed by ``run_ranks``
    rather than left waiting in a collective)."""
    import torch
    from megatron.core import parallel_state as ps

    torch.set_num_threads(1)
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(job["world_size"]))
    try:
        torch.distributed.init_process_group("gloo", init_method="file://" + store_file, rank=rank,
                                             world_size=job["world_size"])
        if job["model"].get("moe"):
            ps.initialize_model_parallel(job["tp"], job["pp"], expert_model_parallel_size=job["ep"],
                                         expert_tensor_parallel_size=job["etp"])
        else:
            ps.initialize_model_parallel(job["tp"], job["pp"])
        body(job, rank)
        ps.destroy_model_parallel()
    except BaseException:
        traceback.print_exc()
        sys.stderr.flush()
        os._exit(3)
    torch.distributed.destroy_process_group()


# --------------------------------------------------------------------------------------------
# launcher side
# --------------------------------------------------------------------------------------------


def import_megatron() -> None:
    """In a launcher, before forking ranks: torch single-threaded, the CUDA shim, and the ~5 s
    megatron-core import paid once."""
    import torch

    torch.set_num_threads(1)
    _ensure_on_path()
    import cuda_shim

    cuda_shim.install()
    import megatron.core.dist_checkpointing  # noqa: F401
    import megatron.core.dist_checkpointing.strategies.torch  # noqa: F401
    import megatron.core.models.gpt  # noqa: F401
    import megatron.core.models.gpt.gpt_layer_specs  # noqa: F401
    import megatron.core.optimizer_param_scheduler  # noqa: F401
    import megatron.core.pipeline_parallel  # noqa: F401
    import megatron.core.transformer.moe.moe_layer  # noqa: F401
    import megatron.core.transformer.multi_latent_attention  # noqa: F401
    import safetensors.torch  # noqa: F401


def run_job(job, body) -> str | None:
    """``body(job, rank)`` in ``job["world_size"]`` forked rank processes (:func:`rank_group`);
    None when all succeeded, else why not."""
    import functools
    import multiprocessing as mp

    from fsdp_writer import run_ranks

    return run_ranks(mp.get_context("fork"), functools.partial(rank_group, body=body), job, job["world_size"],
                     job["store_file"], float(job.get("timeout", 240)))


def main(argv=None) -> int:
    """``python -m realckpt.megatron_worker SPEC.json`` (``fsdp_writer.run_launcher``'s spec:
    ``{"jobs": [...], "tmp": ...}``): save every job."""
    argv = sys.argv[1:] if argv is None else argv
    with open(argv[0]) as f:
        jobs = json.load(f)["jobs"]
    t0 = time.monotonic()
    import_megatron()
    _log(f"imports {time.monotonic() - t0:.1f}s")
    for job in jobs:
        t1 = time.monotonic()
        failed = run_job(job, _save_rank)
        if failed:
            _log(f"megatron save of {job['ckpt_dir']} failed: {failed}")
            return 1
        _log(f"saved {job['ckpt_dir']} (world {job['world_size']}) in {time.monotonic() - t1:.1f}s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
