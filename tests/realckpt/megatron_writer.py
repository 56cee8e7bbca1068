"""REAL Megatron (megatron-core ``torch_dist``) checkpoint fixtures for ckptctl tests.

Nothing here fakes a checkpoint file: every ``policy/`` component is written by megatron-core
0.16.1's own ``dist_checkpointing.save`` from a real mcore ``GPTModel`` built on CPU at the
requested TP x PP x DP (``tp*pp*dp`` rank processes on a gloo group, see
:mod:`realckpt.megatron_worker`).  The weights are KNOWN: a tiny Hugging Face model
(:mod:`realckpt.tiny_models`) is trained for ``global_step`` AdamW steps in this process, its
weights and Adam moments are mapped to mcore layouts, and the ranks copy their parts in through
megatron's own ShardedTensor offsets.

Public API
----------
- :func:`write_megatron_component` -- one SkyRL ``policy/`` directory (megatron files +
  ``huggingface/``), or verl's nesting (``dist_ckpt/`` + ``huggingface/``), plus a reference
  directory (default ``out_dir + ".reference"``) holding the truth to compare against.
- :func:`write_megatron_components` -- several components with ONE launcher (the ~5 s
  megatron-core import is paid once); same keyword arguments per component.
- :func:`write_megatron_tree` -- a SkyRL checkpoint tree (pointer file, ``global_step_N/policy``,
  ``trainer_state.pt``, ``data.pt``).
- :func:`hf_to_mcore` / :func:`split_layers` -- the HF -> mcore mapping used to build the truth.

Mixture of Experts
------------------
``arch`` in :data:`MOE_ARCHS` (``"qwen3_moe"``, ``"mixtral"``, ``"deepseek_v3"``) selects the MoE
path (keywords: :func:`_normalize_moe`): a tiny transformers 5.24 MoE model
(:func:`realckpt.tiny_models.make_moe_model`) trained ``global_step`` AdamW steps, mapped by
:func:`hf_moe_to_mcore`, written by real megatron-core MoE ``GPTModel`` ranks at TP x PP x EP
(``etp`` = TP as in SkyRL; SequentialMLP experts, allgather dispatcher, local spec with the key
names of SkyRL's Transformer-Engine spec, MLA for DeepSeek-V3), optimizer state as megatron's
ChainedOptimizer writes it (``chained_0.`` dense / ``chained_1.`` expert params,
fully_reshardable model space).  The reference dir also holds ``reference_logits.safetensors``
(``input_ids``, the HF model's ``logits``) and ``ranks/rank_{r}.json`` (each rank's parallel
coordinates and the global expert ids of its MoE layers, from megatron's ``parallel_state`` and
``MoELayer.local_expert_indices``).  Measured with megatron-core 0.16.1: experts are
``decoder.layers[.{i}].mlp.experts.experts.linear_fc{1,2}.weight`` ([L,] E, 2F, H) / ([L,] E, H, F);
EP rank r holds global experts ``r * E/EP + j``; all-MoE models get stacked keys, models with a
dense layer (``moe_layer_freq`` a list) per-layer keys.

All writers are idempotent: a directory already holding a complete write with the same
parameters is left untouched (cheap), one holding an older/partial write of ours is rewritten,
and a non-empty directory that is not ours raises ``FileExistsError``.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any, Iterable, Sequence

_MARKER = ".realckpt-megatron"
REFERENCE_FORMAT = "realckpt-megatron/1"

ADAM = dict(lr=1e-3, min_lr=1e-5, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.01, warmup_steps=1, decay_steps=100)


# --------------------------------------------------------------------------------------------
# parameters
# --------------------------------------------------------------------------------------------


def _normalize(
    *,
    tp: int = 2,
    pp: int = 1,
    dp: int = 1,
    arch: str = "llama",
    num_layers: int | None = None,
    hidden: int = 64,
    heads: int = 4,
    kv_heads: int = 2,
    ffn: int = 128,
    vocab: int = 1000,
    make_vocab_size_divisible_by: int | None = 128,
    tie_embeddings: bool = False,
    per_layer_keys: bool = False,
    optimizer: bool = True,
    optimizer_format: str = "fully_reshardable",
    params_dtype: str = "float32",
    rng_format: str = "common",
    fully_parallel: bool = True,
    verl_nesting: bool = False,
    global_step: int = 1,
    seed: int = 0,
) -> dict[str, Any]:
    if arch not in ("llama", "qwen2"):
        raise ValueError(f"arch must be 'llama' or 'qwen2', not {arch!r}")
    if num_layers is None:
        num_layers = 2 * pp
    if num_layers % pp:
        raise ValueError(f"num_layers={num_layers} not divisible by pp={pp}")
    if hidden % heads or heads % kv_heads:
        raise ValueError("hidden % heads and heads % kv_heads must be 0")
    if kv_heads % tp or ffn % tp or heads % tp:
        raise ValueError(f"tp={tp} must divide heads, kv_heads and ffn")
    if optimizer_format not in ("fully_reshardable", "fp32"):
        raise ValueError(f"optimizer_format must be 'fully_reshardable' or 'fp32', not {optimizer_format!r}")
    if params_dtype not in ("float32", "bfloat16"):
        raise ValueError(f"params_dtype must be 'float32' or 'bfloat16', not {params_dtype!r}")
    if rng_format not in ("common", "sharded"):
        raise ValueError(f"rng_format must be 'common' or 'sharded', not {rng_format!r}")
    if global_step < 1:
        raise ValueError("global_step must be >= 1 (it is the number of AdamW steps taken)")
    return dict(
        tp=tp, pp=pp, dp=dp, arch=arch, num_layers=num_layers, hidden=hidden, heads=heads,
        kv_heads=kv_heads, ffn=ffn, vocab=vocab, make_vocab_size_divisible_by=make_vocab_size_divisible_by,
        tie_embeddings=bool(tie_embeddings), per_layer_keys=bool(per_layer_keys), optimizer=bool(optimizer),
        optimizer_format=optimizer_format, params_dtype=params_dtype, rng_format=rng_format,
        fully_parallel=bool(fully_parallel), verl_nesting=bool(verl_nesting), global_step=int(global_step),
        seed=int(seed),
    )


def padded_vocab_size(vocab: int, tp: int, make_vocab_size_divisible_by: int | None) -> int:
    """Megatron-LM's ``_vocab_size_with_padding``: round up to a multiple of
    ``make_vocab_size_divisible_by * tp`` (``None``: only to a multiple of ``tp``)."""
    multiple = (make_vocab_size_divisible_by or 1) * tp
    return ((vocab + multiple - 1) // multiple) * multiple


# --------------------------------------------------------------------------------------------
# HF -> mcore mapping (the truth the checkpoint is built from)
# --------------------------------------------------------------------------------------------


def _pad_rows(t, padded_vocab: int):
    """A copy of ``t`` with zero rows appended up to ``padded_vocab`` (Megatron's vocab padding)."""
    import torch

    out = torch.zeros((padded_vocab, *t.shape[1:]), dtype=t.dtype)
    out[: t.shape[0]] = t
    return out


def _interleave_qkv(q, k, v, heads: int, kv_heads: int):
    """HF q/k/v projections (weights or biases) -> mcore's fused ``linear_qkv`` rows: per query
    group g, the q heads of g, then k_g, then v_g."""
    import torch

    d = q.shape[0] // heads
    rest = q.shape[1:]
    q = q.reshape(kv_heads, heads // kv_heads * d, *rest)
    k = k.reshape(kv_heads, d, *rest)
    v = v.reshape(kv_heads, d, *rest)
    return torch.cat([q, k, v], dim=1).reshape(kv_heads * (heads // kv_heads + 2) * d, *rest)


def hf_to_mcore(hf: dict, *, num_layers: int, heads: int, kv_heads: int, hidden: int,
                padded_vocab: int, tie_embeddings: bool) -> dict:
    """Map an HF Llama/Qwen2 state dict (or a dict of same-shaped optimizer moments) to the
    GLOBAL tensors of an mcore checkpoint with stacked ``decoder.layers.*`` keys (leading
    num_layers axis), TE-compatible names as mcore's local spec saves them:

    ``embedding.word_embeddings.weight`` [Vp, H] (rows >= V are zero),
    ``decoder.layers.self_attention.linear_qkv.layer_norm_weight`` [L, H] (= input_layernorm),
    ``decoder.layers.self_attention.linear_qkv.weight`` [L, (nh+2*ng)*d, H] (per query group g:
    q heads of g, k_g, v_g), ``...linear_qkv.bias`` [L, (nh+2*ng)*d] (qwen2),
    ``decoder.layers.self_attention.linear_proj.weight`` [L, H, nh*d] (= o_proj),
    ``decoder.layers.mlp.linear_fc1.layer_norm_weight`` [L, H] (= post_attention_layernorm),
    ``decoder.layers.mlp.linear_fc1.weight`` [L, 2F, H] (= [gate; up]),
    ``decoder.layers.mlp.linear_fc2.weight`` [L, H, F] (= down_proj),
    ``decoder.final_layernorm.weight`` [H], ``output_layer.weight`` [Vp, H] (untied only).
    """
    import torch

    def pad_rows(t):
        return _pad_rows(t, padded_vocab)

    def qkv(q, k, v):
        return _interleave_qkv(q, k, v, heads, kv_heads)

    per_layer: dict[str, list] = {}

    def add(name, t):
        per_layer.setdefault(name, []).append(t)

    for i in range(num_layers):
        p = f"model.layers.{i}."
        add("self_attention.linear_qkv.layer_norm_weight", hf[p + "input_layernorm.weight"])
        add("self_attention.linear_qkv.weight", qkv(hf[p + "self_attn.q_proj.weight"],
                                                    hf[p + "self_attn.k_proj.weight"],
                                                    hf[p + "self_attn.v_proj.weight"]))
        if p + "self_attn.q_proj.bias" in hf:
            add("self_attention.linear_qkv.bias", qkv(hf[p + "self_attn.q_proj.bias"],
                                                      hf[p + "self_attn.k_proj.bias"],
                                                      hf[p + "self_attn.v_proj.bias"]))
        add("self_attention.linear_proj.weight", hf[p + "self_attn.o_proj.weight"])
        add("mlp.linear_fc1.layer_norm_weight", hf[p + "post_attention_layernorm.weight"])
        add("mlp.linear_fc1.weight", torch.cat([hf[p + "mlp.gate_proj.weight"], hf[p + "mlp.up_proj.weight"]], 0))
        add("mlp.linear_fc2.weight", hf[p + "mlp.down_proj.weight"])

    out = {"embedding.word_embeddings.weight": pad_rows(hf["model.embed_tokens.weight"])}
    for name, ts in per_layer.items():
        out[f"decoder.layers.{name}"] = torch.stack([t.detach() for t in ts]).contiguous()
    out["decoder.final_layernorm.weight"] = hf["model.norm.weight"].detach().clone()
    if not tie_embeddings:
        out["output_layer.weight"] = pad_rows(hf["lm_head.weight"])
    return {k: v.detach().contiguous() for k, v in out.items()}


def split_layers(stacked: dict) -> dict:
    """Stacked ``decoder.layers.X`` [L, ...] -> per-layer ``decoder.layers.{i}.X`` (the keys
    mcore saves with ``metadata={"non_homogeneous_layers": True}``)."""
    out = {}
    for k, v in stacked.items():
        if k.startswith("decoder.layers."):
            rest = k[len("decoder.layers."):]
            for i in range(v.shape[0]):
                out[f"decoder.layers.{i}.{rest}"] = v[i].clone().contiguous()
        else:
            out[k] = v
    return out


# --------------------------------------------------------------------------------------------
# Mixture-of-Experts: parameters and the HF -> mcore mapping
# --------------------------------------------------------------------------------------------

MOE_ARCHS = ("qwen3_moe", "mixtral", "deepseek_v3")


def _normalize_moe(
    *,
    arch: str,
    tp: int = 1,
    pp: int = 1,
    ep: int = 2,
    etp: int | None = None,
    dp: int | None = None,
    num_layers: int | None = None,
    hidden: int = 64,
    heads: int = 4,
    kv_heads: int = 2,
    ffn: int = 96,
    moe_ffn: int = 32,
    num_experts: int = 4,
    topk: int = 2,
    shared_experts: int = 1,
    first_k_dense: int = 1,
    n_group: int = 2,
    topk_group: int = 1,
    routed_scaling_factor: float = 2.5,
    q_lora_rank: int | None = 32,
    kv_lora_rank: int = 16,
    qk_nope_head_dim: int = 16,
    qk_rope_head_dim: int = 8,
    v_head_dim: int = 16,
    vocab: int = 256,
    make_vocab_size_divisible_by: int | None = 128,
    optimizer: bool = True,
    fully_parallel: bool = True,
    global_step: int = 2,
    seed: int = 0,
) -> dict[str, Any]:
    """MoE job parameters.  ``etp`` defaults to ``tp`` (SkyRL: expert_tensor_parallel_size = TP).
    The world is ``tp * pp * dp`` ranks with ``dp`` (dense data parallel) defaulting to the
    smallest value megatron accepts: ``ep * etp / tp`` (so expert DP is 1).  Qwen3-MoE and Mixtral
    are all-MoE (stacked ``decoder.layers.*`` keys); DeepSeek-V3 has ``first_k_dense`` dense layers
    (mcore then writes per-layer ``decoder.layers.{i}.*`` keys), shared experts, a sigmoid router
    with expert bias and MLA (``q_lora_rank=None``: no q-LoRA, like Moonlight)."""
    if arch not in MOE_ARCHS:
        raise ValueError(f"MoE arch must be one of {MOE_ARCHS}, not {arch!r}")
    etp = tp if etp is None else etp
    if dp is None:
        dp = max(1, (ep * etp) // tp)
    world = tp * pp * dp
    if world % (ep * etp * pp):
        raise ValueError(f"world {world} (tp*pp*dp) not divisible by ep*etp*pp = {ep * etp * pp}")
    if num_layers is None:
        num_layers = 2 * pp
    if num_layers % pp:
        raise ValueError(f"num_layers={num_layers} not divisible by pp={pp}")
    if num_experts % ep:
        raise ValueError(f"ep={ep} must divide num_experts={num_experts}")
    if heads % tp or (arch != "deepseek_v3" and kv_heads % tp) or moe_ffn % etp or ffn % tp:
        raise ValueError(f"tp={tp} / etp={etp} must divide heads, kv_heads, ffn and moe_ffn")
    if global_step < 1:
        raise ValueError("global_step must be >= 1 (it is the number of AdamW steps taken)")
    out = dict(
        moe=True, arch=arch, tp=tp, pp=pp, ep=ep, etp=etp, dp=dp, num_layers=num_layers, hidden=hidden,
        heads=heads, ffn=ffn, moe_ffn=moe_ffn, num_experts=num_experts, topk=topk, vocab=vocab,
        make_vocab_size_divisible_by=make_vocab_size_divisible_by, optimizer=bool(optimizer),
        fully_parallel=bool(fully_parallel), global_step=int(global_step), seed=int(seed),
        # fixed for these fixtures (the dense writer's knobs)
        tie_embeddings=False, params_dtype="float32", optimizer_format="fully_reshardable",
        rng_format="common", verl_nesting=False,
    )
    if arch == "deepseek_v3":
        out.update(
            kv_heads=heads, shared_experts=shared_experts, first_k_dense=first_k_dense, n_group=n_group,
            topk_group=topk_group, routed_scaling_factor=float(routed_scaling_factor), q_lora_rank=q_lora_rank,
            kv_lora_rank=kv_lora_rank, qk_nope_head_dim=qk_nope_head_dim, qk_rope_head_dim=qk_rope_head_dim,
            v_head_dim=v_head_dim, per_layer_keys=first_k_dense > 0,
        )
    else:
        out.update(kv_heads=kv_heads, shared_experts=0, first_k_dense=0, per_layer_keys=False)
    return out


def _moe_hf_config(params: dict):
    from realckpt import tiny_models

    kw = dict(vocab=params["vocab"], hidden=params["hidden"], layers=params["num_layers"],
              heads=params["heads"], kv_heads=params["kv_heads"], num_experts=params["num_experts"],
              topk=params["topk"], moe_ffn=params["moe_ffn"], ffn=params["ffn"], tie=params["tie_embeddings"])
    if params["arch"] == "deepseek_v3":
        kw.update({k: params[k] for k in ("first_k_dense", "n_group", "topk_group", "routed_scaling_factor",
                                          "q_lora_rank", "kv_lora_rank", "qk_nope_head_dim",
                                          "qk_rope_head_dim", "v_head_dim")})
        kw["shared_experts"] = params["shared_experts"]
    return tiny_models.make_moe_config(params["arch"], **kw)


def moe_layer_pattern(params: dict) -> list[int]:
    """1 = MoE layer, 0 = dense layer (mcore's ``moe_layer_freq`` list)."""
    return [0 if i < params["first_k_dense"] else 1 for i in range(params["num_layers"])]


def hf_moe_to_mcore(hf: dict, params: dict, *, padded_vocab: int) -> dict:
    """Map an HF MoE state dict (transformers 5.24 in-memory names: fused experts), or a dict of
    same-shaped optimizer moments, to the GLOBAL tensors of the mcore checkpoint, PER-LAYER keys
    ``decoder.layers.{i}.*`` (use :func:`stack_layers` for the stacked form).  Names are those of
    SkyRL's Transformer-Engine spec:

    GQA (Qwen3-MoE, Mixtral): ``self_attention.linear_qkv.layer_norm_weight`` (= input_layernorm),
    ``self_attention.linear_qkv.weight`` (q/k/v interleaved per query group),
    ``self_attention.linear_proj.weight``, ``self_attention.{q,k}_layernorm.weight`` (Qwen3 q/k norm).
    MLA (DeepSeek-V3): ``input_layernorm.weight``, ``self_attention.linear_q_down_proj.weight``
    (= q_a_proj), ``linear_q_up_proj.layer_norm_weight`` (= q_a_layernorm),
    ``linear_q_up_proj.weight`` (= q_b_proj) or ``linear_q_proj.weight`` (no q-LoRA),
    ``linear_kv_down_proj.weight`` (= kv_a_proj_with_mqa), ``linear_kv_up_proj.layer_norm_weight``
    (= kv_a_layernorm), ``linear_kv_up_proj.weight`` (= kv_b_proj), ``linear_proj.weight`` (= o_proj).
    MoE layer: ``pre_mlp_layernorm.weight`` (= post_attention_layernorm), ``mlp.router.weight``
    [E, H] (= mlp.gate.weight), ``mlp.router.expert_bias`` [E] fp32 (= e_score_correction_bias),
    ``mlp.experts.experts.linear_fc1.weight`` [E, 2F, H] (= gate_up_proj: [gate; up] per expert),
    ``mlp.experts.experts.linear_fc2.weight`` [E, H, F] (= down_proj),
    ``mlp.shared_experts.linear_fc1.weight`` [2F_sh, H] (= [gate_proj; up_proj]),
    ``mlp.shared_experts.linear_fc2.weight``.  Dense layer: ``mlp.linear_fc1.layer_norm_weight``,
    ``mlp.linear_fc1.weight`` ([gate; up]), ``mlp.linear_fc2.weight``.
    Plus ``embedding.word_embeddings.weight`` / ``output_layer.weight`` (zero-padded to
    ``padded_vocab`` rows) and ``decoder.final_layernorm.weight``.
    """
    import torch

    arch = params["arch"]
    mla = arch == "deepseek_v3"

    def pad_rows(t):
        return _pad_rows(t, padded_vocab)

    def qkv(q, k, v):
        return _interleave_qkv(q, k, v, params["heads"], params["kv_heads"])

    out = {"embedding.word_embeddings.weight": pad_rows(hf["model.embed_tokens.weight"])}
    for i, is_moe in enumerate(moe_layer_pattern(params)):
        p, o = f"model.layers.{i}.", f"decoder.layers.{i}."
        a = p + "self_attn."
        if mla:
            out[o + "input_layernorm.weight"] = hf[p + "input_layernorm.weight"]
            if params["q_lora_rank"] is not None:
                out[o + "self_attention.linear_q_down_proj.weight"] = hf[a + "q_a_proj.weight"]
                out[o + "self_attention.linear_q_up_proj.layer_norm_weight"] = hf[a + "q_a_layernorm.weight"]
                out[o + "self_attention.linear_q_up_proj.weight"] = hf[a + "q_b_proj.weight"]
            else:
                out[o + "self_attention.linear_q_proj.weight"] = hf[a + "q_proj.weight"]
            out[o + "self_attention.linear_kv_down_proj.weight"] = hf[a + "kv_a_proj_with_mqa.weight"]
            out[o + "self_attention.linear_kv_up_proj.layer_norm_weight"] = hf[a + "kv_a_layernorm.weight"]
            out[o + "self_attention.linear_kv_up_proj.weight"] = hf[a + "kv_b_proj.weight"]
        else:
            out[o + "self_attention.linear_qkv.layer_norm_weight"] = hf[p + "input_layernorm.weight"]
            out[o + "self_attention.linear_qkv.weight"] = qkv(hf[a + "q_proj.weight"], hf[a + "k_proj.weight"],
                                                              hf[a + "v_proj.weight"])
            if a + "q_norm.weight" in hf:
                out[o + "self_attention.q_layernorm.weight"] = hf[a + "q_norm.weight"]
                out[o + "self_attention.k_layernorm.weight"] = hf[a + "k_norm.weight"]
        out[o + "self_attention.linear_proj.weight"] = hf[a + "o_proj.weight"]
        m = p + "mlp."
        if is_moe:
            out[o + "pre_mlp_layernorm.weight"] = hf[p + "post_attention_layernorm.weight"]
            out[o + "mlp.router.weight"] = hf[m + "gate.weight"]
            if m + "gate.e_score_correction_bias" in hf:
                out[o + "mlp.router.expert_bias"] = hf[m + "gate.e_score_correction_bias"].float()
            out[o + "mlp.experts.experts.linear_fc1.weight"] = hf[m + "experts.gate_up_proj"]
            out[o + "mlp.experts.experts.linear_fc2.weight"] = hf[m + "experts.down_proj"]
            if m + "shared_experts.gate_proj.weight" in hf:
                out[o + "mlp.shared_experts.linear_fc1.weight"] = torch.cat(
                    [hf[m + "shared_experts.gate_proj.weight"], hf[m + "shared_experts.up_proj.weight"]], 0)
                out[o + "mlp.shared_experts.linear_fc2.weight"] = hf[m + "shared_experts.down_proj.weight"]
        else:
            out[o + "mlp.linear_fc1.layer_norm_weight"] = hf[p + "post_attention_layernorm.weight"]
            out[o + "mlp.linear_fc1.weight"] = torch.cat([hf[m + "gate_proj.weight"], hf[m + "up_proj.weight"]], 0)
            out[o + "mlp.linear_fc2.weight"] = hf[m + "down_proj.weight"]
    out["decoder.final_layernorm.weight"] = hf["model.norm.weight"]
    if not params["tie_embeddings"]:
        out["output_layer.weight"] = pad_rows(hf["lm_head.weight"])
    return {k: v.detach().clone().contiguous() for k, v in out.items()}


def stack_layers(per_layer: dict) -> dict:
    """Per-layer ``decoder.layers.{i}.X`` -> stacked ``decoder.layers.X`` [L, ...] (every layer
    must hold the same keys: the inverse of :func:`split_layers`)."""
    import torch

    groups: dict[str, dict[int, Any]] = {}
    out = {}
    for k, v in per_layer.items():
        if k.startswith("decoder.layers."):
            idx, rest = k[len("decoder.layers."):].split(".", 1)
            groups.setdefault(rest, {})[int(idx)] = v
        else:
            out[k] = v
    for rest, by_idx in groups.items():
        n = len(by_idx)
        if sorted(by_idx) != list(range(n)):
            raise ValueError(f"layers of {rest} are not 0..{n - 1}: {sorted(by_idx)}")
        out[f"decoder.layers.{rest}"] = torch.stack([by_idx[i] for i in range(n)]).contiguous()
    return out


def moe_is_expert_key(key: str) -> bool:
    """Routed-expert parameters (``allreduce=False`` with EP > 1: megatron's second optimizer)."""
    return ".mlp.experts." in key


# --------------------------------------------------------------------------------------------
# result objects
# --------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class MegatronComponent:
    """What :func:`write_megatron_component` wrote.

    ``out_dir``: the component dir (SkyRL ``policy/``).  ``ckpt_dir``: the megatron checkpoint dir
    (= ``out_dir``, or ``out_dir/dist_ckpt`` with ``verl_nesting``).  ``hf_dir``:
    ``out_dir/huggingface``.  ``reference_dir`` holds ``reference.json``,
    ``checkpoint_tensors.safetensors`` (every ShardedTensor key of the checkpoint -> its full
    global tensor, model and optimizer) and ``hf/`` (a ``save_pretrained`` dir of the same
    weights with the tokenizer: loadable with ``from_pretrained`` for logits checks).
    """

    out_dir: Path
    ckpt_dir: Path
    hf_dir: Path
    reference_dir: Path
    params: dict
    info: dict

    @property
    def reference_hf_dir(self) -> Path:
        return self.reference_dir / "hf"

    @property
    def reference_tensors_file(self) -> Path:
        return self.reference_dir / "checkpoint_tensors.safetensors"

    def reference_tensors(self) -> dict:
        """checkpoint key -> full global tensor (model + optimizer keys)."""
        from safetensors.torch import load_file

        return load_file(str(self.reference_tensors_file))

    def reference_hf_state_dict(self) -> dict:
        """HF-named full state dict (unpadded vocab) the checkpoint was built from."""
        from safetensors.torch import load_file

        files = sorted(self.reference_hf_dir.glob("*.safetensors"))
        out = {}
        for f in files:
            out.update(load_file(str(f)))
        return out


@dataclasses.dataclass(frozen=True)
class MegatronTree:
    root: Path
    steps: tuple
    pointer: int | None
    components: dict  # step -> MegatronComponent (policy)


# --------------------------------------------------------------------------------------------
# parent-side preparation
# --------------------------------------------------------------------------------------------


def _dirs(out_dir: Path, params: dict, reference_dir) -> tuple[Path, Path, Path]:
    ckpt_dir = out_dir / "dist_ckpt" if params["verl_nesting"] else out_dir
    ref = Path(reference_dir) if reference_dir is not None else Path(str(out_dir) + ".reference")
    return ckpt_dir, out_dir / "huggingface", ref


def _is_complete(out_dir: Path, ckpt_dir: Path, ref: Path, params: dict) -> bool:
    try:
        info = json.loads((ref / "reference.json").read_text())
    except (OSError, ValueError):
        return False
    if params.get("moe") and not (ref / "ranks" / "rank_0.json").is_file():
        return False
    return (
        info.get("format") == REFERENCE_FORMAT
        and info.get("params") == params
        and (ckpt_dir / "metadata.json").is_file()
        and (out_dir / "huggingface" / "config.json").is_file()
    )


def _claim(out_dir: Path, ref: Path, overwrite: bool) -> None:
    """Make out_dir and ref empty dirs that we own (marker in ref)."""
    for d in (out_dir, ref):
        if d.exists() and any(d.iterdir()):
            ours = (ref / _MARKER).exists()
            if not (ours or overwrite):
                raise FileExistsError(f"{d} is not empty and was not written by realckpt.megatron_writer")
    for d in (out_dir, ref):
        if d.exists():
            shutil.rmtree(d)
    ref.mkdir(parents=True)
    (ref / _MARKER).write_text("")
    out_dir.mkdir(parents=True)


def _train_hf(params: dict):
    """Tiny HF model (dense, or MoE for ``params["moe"]``), ``global_step`` real AdamW steps
    (then an MoE's DeepSeek-V3 expert bias set to known non-zero values); returns (model, config,
    tokenizer, hf state dict, {"exp_avg": ..., "exp_avg_sq": ...} in HF names)."""
    import torch

    from realckpt import tiny_models

    if params.get("moe"):
        config = _moe_hf_config(params)
        model = tiny_models.make_moe_model(params["arch"], params["seed"], config=config)
    else:
        config = tiny_models.make_config(
            params["arch"], vocab=params["vocab"], hidden=params["hidden"], layers=params["num_layers"],
            heads=params["heads"], kv_heads=params["kv_heads"], intermediate=params["ffn"],
            tie=params["tie_embeddings"],
        )
        model = tiny_models.make_model(params["arch"], params["seed"], config=config)
    tokenizer = tiny_models.make_tokenizer()
    named = list(model.named_parameters())  # tied lm_head is deduplicated here
    decay = [p for _, p in named if p.ndim > 1]
    no_decay = [p for _, p in named if p.ndim <= 1]
    adam = torch.optim.AdamW(
        [dict(params=decay, weight_decay=ADAM["weight_decay"]), dict(params=no_decay, weight_decay=0.0)],
        lr=ADAM["lr"], betas=ADAM["betas"], eps=ADAM["eps"],
    )
    gen = torch.Generator().manual_seed(params["seed"] + 1)
    model.train()
    for _ in range(params["global_step"]):
        ids = torch.randint(3, params["vocab"], (2, 16), generator=gen)
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        adam.step()
        adam.zero_grad(set_to_none=True)
    model.eval()
    if params.get("moe"):
        tiny_models.set_expert_bias(model, params["seed"])
    hf = {k: v.detach().clone() for k, v in model.state_dict().items()}
    moments = {"exp_avg": {}, "exp_avg_sq": {}}
    for name, p in named:
        st = adam.state[p]
        moments["exp_avg"][name] = st["exp_avg"].detach().clone()
        moments["exp_avg_sq"][name] = st["exp_avg_sq"].detach().clone()
    return model, config, tokenizer, hf, moments


def _prepare(out_dir: Path, params: dict, ref: Path, tmp: Path, index: int) -> dict:
    """Everything before the ranks run: truth tensors, reference dir, the worker job."""
    import torch
    from safetensors.torch import save_file

    ckpt_dir, _, _ = _dirs(out_dir, params, ref)
    model, config, tokenizer, hf, moments = _train_hf(params)
    dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}[params["params_dtype"]]
    vp = padded_vocab_size(params["vocab"], params["tp"], params["make_vocab_size_divisible_by"])
    geo = dict(num_layers=params["num_layers"], heads=params["heads"], kv_heads=params["kv_heads"],
               hidden=params["hidden"], padded_vocab=vp, tie_embeddings=params["tie_embeddings"])

    fp32_model = hf_to_mcore(hf, **geo)
    lay = split_layers if params["per_layer_keys"] else (lambda x: x)
    model_t = {k: v.to(dtype) for k, v in lay(fp32_model).items()}
    tensors = dict(model_t)
    optim_keys: dict[str, list] = {}
    if params["optimizer"]:
        states = {"exp_avg": lay(hf_to_mcore(moments["exp_avg"], **geo)),
                  "exp_avg_sq": lay(hf_to_mcore(moments["exp_avg_sq"], **geo))}
        if params["optimizer_format"] == "fully_reshardable":
            states = {"param": lay(fp32_model), **states}
        for sk, d in states.items():
            for k, v in d.items():
                tensors[f"optimizer.state.{sk}.{k}"] = v.float().clone().contiguous()
                optim_keys[f"optimizer.state.{sk}.{k}"] = list(v.shape)
    save_file(tensors, str(ref / "checkpoint_tensors.safetensors"))

    # HF reference: the same weights (cast to params_dtype), unpadded, loadable for logits checks
    model.to(dtype)
    model.save_pretrained(str(ref / "hf"))
    tokenizer.save_pretrained(str(ref / "hf"))

    job, info = _job_and_info(params, out_dir, ckpt_dir, ref, tmp, index, config, vp, model_t, optim_keys,
                              model_extra=dict(qkv_bias=params["arch"] == "qwen2"), timeout=240)
    return dict(job=job, info=info, config=config, tokenizer=tokenizer)


def _job_and_info(params: dict, out_dir: Path, ckpt_dir: Path, ref: Path, tmp: Path, index: int, config, vp: int,
                  model_t: dict, optim_keys: dict, *, model_extra: dict, timeout: float, job_extra=None,
                  info_extra=None) -> tuple[dict, dict]:
    """The worker job (:mod:`realckpt.megatron_worker`'s schema) and ``reference.json``'s content;
    ``model_extra`` / ``job_extra`` / ``info_extra``: what the dense and MoE models add."""
    world = params["tp"] * params["pp"] * params["dp"]
    job = dict(
        ckpt_dir=str(ckpt_dir),
        world_size=world,
        tp=params["tp"],
        pp=params["pp"],
        model=dict(
            num_layers=params["num_layers"], hidden=params["hidden"], heads=params["heads"],
            kv_heads=params["kv_heads"], ffn=params["ffn"], padded_vocab=vp, tie=params["tie_embeddings"],
            norm_eps=float(config.rms_norm_eps), rotary_base=float(_rope_theta(config)),
            max_seq=int(config.max_position_embeddings), **model_extra,
        ),
        per_layer_keys=params["per_layer_keys"],
        params_dtype=params["params_dtype"],
        tensors_file=str(ref / "checkpoint_tensors.safetensors"),
        optimizer=(dict(format=params["optimizer_format"], step=params["global_step"],
                        **{k: (list(v) if isinstance(v, tuple) else v) for k, v in ADAM.items()})
                   if params["optimizer"] else None),
        rng_format=params["rng_format"],
        fully_parallel=params["fully_parallel"],
        seed=params["seed"],
        store_file=str(tmp / f"store_{index}"),
        timeout=timeout,
        **(job_extra or {}),
    )
    info = dict(
        format=REFERENCE_FORMAT,
        params=params,
        worker_job={k: v for k, v in job.items() if k not in ("store_file", "timeout", "rank_info_dir")},
        out_dir=str(out_dir),
        ckpt_dir=str(ckpt_dir),
        ckpt_subdir="dist_ckpt" if params["verl_nesting"] else "",
        world_size=world,
        vocab_size=params["vocab"],
        padded_vocab_size=vp,
        head_dim=params["hidden"] // params["heads"],
        hf_architectures=list(config.architectures),
        model_keys={k: {"shape": list(v.shape), "dtype": str(v.dtype).replace("torch.", "")}
                    for k, v in model_t.items()},
        optimizer_keys=optim_keys,
        **(info_extra or {}),
    )
    return job, info


def _prepare_moe(out_dir: Path, params: dict, ref: Path, tmp: Path, index: int) -> dict:
    """MoE counterpart of :func:`_prepare`: truth tensors, reference dir (incl. reference logits),
    the worker job."""
    import torch
    from safetensors.torch import save_file

    ckpt_dir, _, _ = _dirs(out_dir, params, ref)
    model, config, tokenizer, hf, moments = _train_hf(params)
    vp = padded_vocab_size(params["vocab"], params["tp"], params["make_vocab_size_divisible_by"])
    lay = (lambda x: x) if params["per_layer_keys"] else stack_layers
    model_t = lay(hf_moe_to_mcore(hf, params, padded_vocab=vp))
    tensors = dict(model_t)
    optim_keys: dict[str, list] = {}
    if params["optimizer"]:
        chained = params["ep"] > 1  # expert params form megatron's second optimizer
        states = {"param": {k: v for k, v in model_t.items() if not k.endswith("router.expert_bias")},
                  "exp_avg": lay(hf_moe_to_mcore(moments["exp_avg"], params, padded_vocab=vp)),
                  "exp_avg_sq": lay(hf_moe_to_mcore(moments["exp_avg_sq"], params, padded_vocab=vp))}
        for sk, dct in states.items():
            for k, v in dct.items():
                pre = (f"chained_{int(moe_is_expert_key(k))}." if chained else "")
                key = f"{pre}optimizer.state.{sk}.{k}"
                tensors[key] = v.float().clone().contiguous()
                optim_keys[key] = list(v.shape)
    save_file(tensors, str(ref / "checkpoint_tensors.safetensors"))

    model.save_pretrained(str(ref / "hf"))
    tokenizer.save_pretrained(str(ref / "hf"))
    ids = torch.randint(3, params["vocab"], (2, 12), generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        logits = model(input_ids=ids).logits.float()
    save_file({"input_ids": ids, "logits": logits.contiguous()}, str(ref / "reference_logits.safetensors"))

    arch = params["arch"]
    mla = None
    if arch == "deepseek_v3":
        mla = dict(q_lora_rank=params["q_lora_rank"], kv_lora_rank=params["kv_lora_rank"],
                   qk_head_dim=params["qk_nope_head_dim"], qk_pos_emb_head_dim=params["qk_rope_head_dim"],
                   v_head_dim=params["v_head_dim"])
    moe = dict(
        num_experts=params["num_experts"], topk=params["topk"], moe_ffn=params["moe_ffn"],
        layer_freq=moe_layer_pattern(params),
        score="sigmoid" if arch == "deepseek_v3" else "softmax",
        expert_bias=arch == "deepseek_v3",
        shared_ffn=(params["moe_ffn"] * params["shared_experts"]) if params["shared_experts"] else None,
        num_groups=params.get("n_group") if arch == "deepseek_v3" else None,
        group_topk=params.get("topk_group") if arch == "deepseek_v3" else None,
        scaling_factor=params.get("routed_scaling_factor") if arch == "deepseek_v3" else None,
    )
    (ref / "ranks").mkdir()
    job, info = _job_and_info(
        params, out_dir, ckpt_dir, ref, tmp, index, config, vp, model_t, optim_keys,
        model_extra=dict(head_dim=params["hidden"] // params["heads"], qkv_bias=False,
                         qk_layernorm=arch == "qwen3_moe", moe=moe, mla=mla),
        timeout=300, job_extra=dict(ep=params["ep"], etp=params["etp"], rank_info_dir=str(ref / "ranks")),
        info_extra=dict(rank_info="ranks/rank_{r}.json", reference_logits="reference_logits.safetensors"),
    )
    return dict(job=job, info=info, config=config, tokenizer=tokenizer)


def _rope_theta(config) -> float:
    rp = getattr(config, "rope_parameters", None) or {}
    if isinstance(rp, dict) and "rope_theta" in rp:
        return rp["rope_theta"]
    return getattr(config, "rope_theta", 10000.0)


def _launch(jobs: list[dict], timeout: float) -> tuple[float, str]:
    """Every job with one :mod:`realckpt.megatron_worker` launcher: (seconds, its output)."""
    from realckpt.fsdp_writer import run_launcher

    t0 = time.monotonic()
    out = run_launcher("realckpt.megatron_worker", {"jobs": jobs}, timeout, "megatron worker")
    return time.monotonic() - t0, out


def _finish(out_dir: Path, ref: Path, prep: dict, seconds: float, log: str) -> None:
    from realckpt import tiny_models

    info = prep["info"]
    ckpt_dir = Path(info["ckpt_dir"])
    if not (ckpt_dir / "metadata.json").is_file():
        raise RuntimeError(f"megatron save finished without {ckpt_dir / 'metadata.json'}")
    # SkyRL writes huggingface/ (config + tokenizer, no weights) after the dist save
    tiny_models.save_hf_dir(out_dir / "huggingface", prep["config"], prep["tokenizer"])
    info = dict(info, launcher_seconds=round(seconds, 2),
                distcp_files=sorted(p.name for p in ckpt_dir.glob("*.distcp")))
    (ref / "launcher.log").write_text(log)
    (ref / "reference.json").write_text(json.dumps(info, indent=1, sort_keys=True))


# --------------------------------------------------------------------------------------------
# public writers
# --------------------------------------------------------------------------------------------


def write_megatron_components(
    specs: Iterable[tuple[str | os.PathLike, dict]],
    *,
    overwrite: bool = False,
    timeout: float = 600.0,
) -> list[MegatronComponent]:
    """Write several components with one launcher process.  ``specs``: ``(out_dir, kwargs)``
    pairs, kwargs as for :func:`write_megatron_component` (``reference_dir`` allowed)."""
    specs = list(specs)
    results: list[MegatronComponent | None] = [None] * len(specs)
    pending = []
    with tempfile.TemporaryDirectory(prefix="realckpt-mcore-") as tmpname:
        tmp = Path(tmpname)
        for i, (out_dir, kw) in enumerate(specs):
            kw = dict(kw)
            reference_dir = kw.pop("reference_dir", None)
            moe = kw.get("arch") in MOE_ARCHS
            params = _normalize_moe(**kw) if moe else _normalize(**kw)
            out_dir = Path(out_dir).resolve()
            ckpt_dir, hf_dir, ref = _dirs(out_dir, params, reference_dir)
            ref = ref.resolve()
            if _is_complete(out_dir, ckpt_dir, ref, params):
                info = json.loads((ref / "reference.json").read_text())
                results[i] = MegatronComponent(out_dir, ckpt_dir, hf_dir, ref, params, info)
                continue
            _claim(out_dir, ref, overwrite)
            prep = (_prepare_moe if moe else _prepare)(out_dir, params, ref, tmp, i)
            pending.append((i, out_dir, ckpt_dir, hf_dir, ref, params, prep))
        if pending:
            seconds, log = _launch([p[-1]["job"] for p in pending], timeout)
            for i, out_dir, ckpt_dir, hf_dir, ref, params, prep in pending:
                _finish(out_dir, ref, prep, seconds, log)
                info = json.loads((ref / "reference.json").read_text())
                results[i] = MegatronComponent(out_dir, ckpt_dir, hf_dir, ref, params, info)
    return results  # type: ignore[return-value]


def write_megatron_component(
    out_dir: str | os.PathLike,
    *,
    reference_dir: str | os.PathLike | None = None,
    overwrite: bool = False,
    timeout: float = 600.0,
    **params: Any,
) -> MegatronComponent:
    """Write one REAL megatron-core ``torch_dist`` component (SkyRL ``policy/``) at ``out_dir``.

    ``num_layers`` defaults to ``2 * pp``.  ``vocab`` is the HF vocabulary; the embedding /
    output layer are padded like Megatron-LM to a multiple of ``make_vocab_size_divisible_by *
    tp`` (``None``: of ``tp``) with zero rows.  ``per_layer_keys``: ``decoder.layers.{i}.*`` keys
    instead of stacked ones.  ``optimizer_format``: ``"fully_reshardable"`` (DistributedOptimizer
    model-space format: ``optimizer.state.{param,exp_avg,exp_avg_sq}.<key>``) or ``"fp32"``
    (non-distributed optimizer: ``optimizer.state.{exp_avg,exp_avg_sq}.<key>``).
    ``rng_format``: ``"common"`` (SkyRL: a dict in common.pt) or ``"sharded"`` (Megatron-LM:
    ``rng_state`` ShardedObject).  ``fully_parallel``: save through
    ``FullyParallelSaveStrategyWrapper`` over the DP group (as SkyRL does), else plain
    ``("torch_dist", 1)``.  ``verl_nesting``: checkpoint under ``out_dir/dist_ckpt/``.
    ``global_step``: AdamW steps taken (and the scheduler's ``num_steps``). ``params`` are the
    keywords of :func:`_normalize` (the defaults and checks live there).
    """
    kw = dict(params, reference_dir=reference_dir)
    return write_megatron_components([(out_dir, kw)], overwrite=overwrite, timeout=timeout)[0]


def _trainer_config(root: Path, params: dict, steps: Sequence[int]) -> dict:
    interval = min((b - a for a, b in zip(steps, steps[1:])), default=1) if len(steps) > 1 else 1
    return {
        "trainer": {
            "strategy": "megatron",
            "seed": params["seed"],
            "epochs": 1,
            "train_batch_size": 4,
            "ckpt_path": str(root),
            "ckpt_interval": interval,
            "max_ckpts_to_keep": -1,
            "resume_mode": "latest",
            "resume_path": None,
            "export_path": str(root) + "_export",
            "policy": {
                "model": {"path": f"tiny-{params['arch'].replace('_', '-')}"},
                "optimizer_config": {"lr": ADAM["lr"], "weight_decay": ADAM["weight_decay"]},
                "megatron_config": {
                    "tensor_model_parallel_size": params["tp"],
                    "pipeline_model_parallel_size": params["pp"],
                    "context_parallel_size": 1,
                    "expert_model_parallel_size": params.get("ep", 1),
                    "expert_tensor_parallel_size": params.get("etp"),
                },
            },
        },
        "data": {"train_data": ["tiny.parquet"]},
    }


def _data_state(step: int, seed: int):
    """A real ``torchdata`` ``StatefulDataLoader.state_dict()`` after ``step`` batches
    (falls back to a plain dict when torchdata is missing)."""
    import torch

    try:
        from torchdata.stateful_dataloader import StatefulDataLoader
    except ImportError:  # pragma: no cover - torchdata is a test dependency
        return {"_fallback": "torch.utils.data (torchdata missing)", "batches_yielded": step}
    import warnings

    gen = torch.Generator().manual_seed(seed)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torchdata 0.11 calls the deprecated torch.set_vital
        dl = StatefulDataLoader(list(range(64)), batch_size=4, shuffle=True, drop_last=True, generator=gen)
        it = iter(dl)
        for _ in range(step):
            next(it)
        return dl.state_dict()


def _save_replacing(obj, path: Path) -> None:
    """``torch.save`` to a sibling, then rename: a test process reading the tree (a cached one,
    rewritten by the next session or test process) never sees a half-written file."""
    import torch

    tmp = path.with_name(path.name + ".tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def write_megatron_tree(
    root: str | os.PathLike,
    steps: Sequence[int] = (2, 4),
    pointer: int | None = 4,
    *,
    data_pt: bool = True,
    trainer_config_format: str = "dict",
    reference_root: str | os.PathLike | None = None,
    overwrite: bool = False,
    timeout: float = 600.0,
    **kw,
) -> MegatronTree:
    """A SkyRL Megatron checkpoint tree at ``root``::

        latest_ckpt_global_step.txt      bare integer, no newline (omitted when pointer is None)
        global_step_{N}/policy/          write_megatron_component(global_step=N, **kw)
        global_step_{N}/data.pt          StatefulDataLoader.state_dict() (unless data_pt=False)
        global_step_{N}/trainer_state.pt {"global_step": N, "config": ...} (torch.save)

    ``trainer_config_format``: ``"dict"`` (newer SkyRL) or ``"omegaconf"`` (a pickled
    ``DictConfig``, as 0.3.1).  References go OUTSIDE the tree, to
    ``{reference_root or root + ".reference"}/global_step_{N}/policy``.  All steps are written
    with one launcher.  Write order per step follows SkyRL (policy, data.pt, trainer_state.pt,
    then the pointer last).
    """
    import torch

    if trainer_config_format not in ("dict", "omegaconf"):
        raise ValueError("trainer_config_format must be 'dict' or 'omegaconf'")
    root = Path(root).resolve()
    ref_root = Path(reference_root).resolve() if reference_root is not None else Path(str(root) + ".reference")
    steps = tuple(int(s) for s in steps)
    root.mkdir(parents=True, exist_ok=True)
    specs = [
        (root / f"global_step_{n}" / "policy",
         dict(kw, global_step=n, reference_dir=ref_root / f"global_step_{n}" / "policy"))
        for n in steps
    ]
    comps = write_megatron_components(specs, overwrite=overwrite, timeout=timeout)
    for n, comp in zip(steps, comps):
        step_dir = root / f"global_step_{n}"
        if data_pt:
            _save_replacing(_data_state(n, comp.params["seed"]), step_dir / "data.pt")
        cfg = _trainer_config(root, comp.params, steps)
        if trainer_config_format == "omegaconf":
            from omegaconf import OmegaConf

            cfg = OmegaConf.create(cfg)
        _save_replacing({"global_step": n, "config": cfg}, step_dir / "trainer_state.pt")
    pointer_file = root / "latest_ckpt_global_step.txt"
    if pointer is not None:
        tmp = pointer_file.with_name(pointer_file.name + ".tmp")
        tmp.write_text(str(int(pointer)))
        os.replace(tmp, pointer_file)
    elif pointer_file.exists():
        pointer_file.unlink()
    return MegatronTree(root, steps, pointer, dict(zip(steps, comps)))


__all__ = [
    "MOE_ARCHS",
    "MegatronComponent",
    "hf_moe_to_mcore",
    "moe_is_expert_key",
    "moe_layer_pattern",
    "stack_layers",
    "MegatronTree",
    "hf_to_mcore",
    "padded_vocab_size",
    "split_layers",
    "write_megatron_component",
    "write_megatron_components",
    "write_megatron_tree",
]
