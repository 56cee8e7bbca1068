"""Tiny, deterministic Hugging Face models and an offline tokenizer for test fixtures.

Everything here is built locally: no hub access, no downloads.  ``transformers`` model
classes are imported lazily (a model-class import costs several seconds), so importing
this module is cheap.

- :func:`make_config` -- a tiny ``LlamaConfig`` / ``Qwen2Config``.
- :func:`make_model` -- a deterministic ``LlamaForCausalLM`` / ``Qwen2ForCausalLM``.
- :func:`make_critic` -- a SkyRL-style critic: the base decoder (``model.*``) plus a
  ``value_head`` ``Linear(hidden, 1, bias=False)`` (no ``lm_head``), like SkyRL's
  ``get_llm_for_sequence_regression(..., "critic")``.
- :func:`make_tokenizer` -- a byte-level BPE trained on a few strings, wrapped as a
  ``PreTrainedTokenizerFast``.
- :func:`save_hf_dir` -- what SkyRL's ``save_hf_configs`` writes to ``policy/huggingface/``:
  ``config.json``, the tokenizer files and ``generation_config.json`` (no weights).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

ARCHS = ("llama", "qwen2")

_CAUSAL_LM_CLASS = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM"}
_BASE_MODEL_CLASS = {"llama": "LlamaModel", "qwen2": "Qwen2Model"}
_DECODER_LAYER_CLASS = {"llama": "LlamaDecoderLayer", "qwen2": "Qwen2DecoderLayer"}

# Special tokens of the tiny tokenizer; their ids are fixed (0, 1, 2) because they are the
# first entries of the trained vocabulary.
BOS_TOKEN = "<|bos|>"
EOS_TOKEN = "<|eos|>"
PAD_TOKEN = "<|pad|>"
SPECIAL_TOKENS = (BOS_TOKEN, EOS_TOKEN, PAD_TOKEN)
BOS_ID, EOS_ID, PAD_ID = 0, 1, 2

_CORPUS = (
    "Checkpoint trees hold the state of a training run after N optimizer steps.",
    "The policy and the critic are sharded across ranks with FSDP.",
    "What is 12 plus 30? The answer is 42.",
    "def add(a, b):\n    return a + b\n",
    "Reinforcement learning from verifiable rewards with GRPO and PPO.",
    "latest_ckpt_global_step.txt points at global_step_4.",
    "The quick brown fox jumps over the lazy dog 0123456789 times.",
)

_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|bos|>' + message['role'] + '\\n' + message['content'] + '<|eos|>' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|bos|>assistant\\n' }}{% endif %}"
)


def causal_lm_class_name(arch: str) -> str:
    _check_arch(arch)
    return _CAUSAL_LM_CLASS[arch]


def decoder_layer_class_name(arch: str) -> str:
    if arch in _MOE_DECODER_LAYER_CLASS:
        return _MOE_DECODER_LAYER_CLASS[arch]
    _check_arch(arch)
    return _DECODER_LAYER_CLASS[arch]


_MOE_DECODER_LAYER_CLASS = {"qwen3_moe": "Qwen3MoeDecoderLayer", "mixtral": "MixtralDecoderLayer",
                            "deepseek_v3": "DeepseekV3DecoderLayer"}


def _check_arch(arch: str) -> None:
    if arch not in ARCHS:
        raise ValueError(f"unknown arch {arch!r}; expected one of {ARCHS}")


def make_config(
    arch: str = "llama",
    vocab: int = 1000,
    hidden: int = 64,
    layers: int = 2,
    heads: int = 4,
    kv_heads: int = 2,
    intermediate: int = 128,
    tie: bool = False,
    *,
    max_positions: int = 256,
    critic: bool = False,
):
    """A tiny transformers config (``LlamaConfig`` or ``Qwen2Config``), fp32, sdpa attention.

    ``architectures`` is set to the causal-LM class name (SkyRL loads both policy and critic
    from a causal-LM checkpoint, so the critic's saved config carries it too).  For a critic
    the config also gets ``normalize_reward = False`` as SkyRL's critic loader sets it.
    """
    _check_arch(arch)
    common: dict[str, Any] = dict(
        vocab_size=vocab,
        hidden_size=hidden,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        intermediate_size=intermediate,
        tie_word_embeddings=tie,
        max_position_embeddings=max_positions,
        bos_token_id=BOS_ID,
        eos_token_id=EOS_ID,
        pad_token_id=PAD_ID,
        rms_norm_eps=1e-6,
        use_cache=False,
        dtype="float32",
    )
    if arch == "llama":
        from transformers import LlamaConfig as cls
    else:
        from transformers import Qwen2Config as cls
        common["use_sliding_window"] = False
    config = cls(**common)
    config.architectures = [_CAUSAL_LM_CLASS[arch]]
    config._attn_implementation = "sdpa"
    if critic:
        config.normalize_reward = False
    return config


def _model_classes(arch: str):
    _check_arch(arch)
    if arch == "llama":
        from transformers.models.llama import modeling_llama as mod
    else:
        from transformers.models.qwen2 import modeling_qwen2 as mod
    return mod


def make_persistent_buffers(module) -> list[str]:
    """Turn the rotary ``inv_freq`` buffer(s) into PERSISTENT buffers (so they appear in
    ``state_dict()``, as in older transformers releases) and return their state-dict keys."""
    keys = []
    for name, sub in module.named_modules():
        if "inv_freq" in getattr(sub, "_buffers", {}) and "inv_freq" in sub._non_persistent_buffers_set:
            sub._non_persistent_buffers_set.discard("inv_freq")
            keys.append(f"{name}.inv_freq" if name else "inv_freq")
    return keys


def make_model(arch: str = "llama", seed: int = 0, *, persistent_buffers: bool = False, config=None, **kw):
    """A deterministic tiny ``{Llama,Qwen2}ForCausalLM`` (fp32, eval-independent: no dropout).

    The same ``(arch, seed, kw)`` gives bit-identical weights in every process.
    ``persistent_buffers=True`` makes the rotary ``inv_freq`` a persistent buffer
    (state-dict key ``model.rotary_emb.inv_freq``).
    """
    import torch

    if config is None:
        config = make_config(arch, **kw)
    mod = _model_classes(arch)
    cls = getattr(mod, _CAUSAL_LM_CLASS[arch])
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = cls(config)
    model.to(torch.float32)
    if persistent_buffers:
        make_persistent_buffers(model)
    return model


def _critic_class(arch: str):
    """SkyRL's critic: ``<Arch>PreTrainedModel`` subclass holding the base decoder under
    ``base_model_prefix`` (``model``) and ``value_head = Linear(hidden, 1, bias=False)``.
    ``mean``/``std`` reward-normalisation buffers are non-persistent (as in SkyRL) unless
    ``persistent_buffers`` is set (as in older OpenRLHF-derived critics)."""
    import torch
    from torch import nn

    mod = _model_classes(arch)
    pre_cls = getattr(mod, {"llama": "LlamaPreTrainedModel", "qwen2": "Qwen2PreTrainedModel"}[arch])
    base_cls = getattr(mod, _BASE_MODEL_CLASS[arch])

    class CriticModel(pre_cls):
        def __init__(self, config, persistent_buffers: bool = False):
            super().__init__(config)
            setattr(self, self.base_model_prefix, base_cls(config))
            self.value_head_prefix = "value_head"
            self.value_head = nn.Linear(config.hidden_size, 1, bias=False)
            self.normalize_reward = getattr(config, "normalize_reward", False)
            self.register_buffer("mean", torch.zeros(1), persistent=persistent_buffers)
            self.register_buffer("std", torch.ones(1), persistent=persistent_buffers)
            self.post_init()

        def forward(self, input_ids, attention_mask=None):
            out = getattr(self, self.base_model_prefix)(input_ids, attention_mask=attention_mask)
            values = self.value_head(out.last_hidden_state).squeeze(-1)
            return values

    CriticModel.__name__ = CriticModel.__qualname__ = "CriticModel"
    return CriticModel


def make_critic(arch: str = "llama", seed: int = 0, *, persistent_buffers: bool = False, config=None, **kw):
    """A deterministic SkyRL-style critic (``model.*`` + ``value_head.weight``, no ``lm_head``).

    ``persistent_buffers=True`` makes ``mean``/``std`` (shape [1]) and the rotary
    ``model.rotary_emb.inv_freq`` persistent buffers."""
    import torch

    if config is None:
        config = make_config(arch, critic=True, **kw)
    cls = _critic_class(arch)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = cls(config, persistent_buffers=persistent_buffers)
    model.to(torch.float32)
    if persistent_buffers:
        make_persistent_buffers(model)
    return model


def make_tokenizer():
    """A tiny byte-level BPE tokenizer trained offline on a few strings, wrapped as
    ``PreTrainedTokenizerFast`` (bos/eos/pad = ids 0/1/2, with a chat template).
    Deterministic; its vocabulary (a few hundred entries) is smaller than the models'."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=320,
        min_frequency=1,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(list(_CORPUS), trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=BOS_TOKEN,
        eos_token=EOS_TOKEN,
        pad_token=PAD_TOKEN,
        model_max_length=256,
    )
    fast.chat_template = _CHAT_TEMPLATE
    return fast


def save_hf_dir(dir: str | os.PathLike, config, tokenizer=None, *, generation_config: bool = True,
                architectures: list[str] | None = None) -> Path:
    """Write what SkyRL's ``save_hf_configs`` puts in ``{policy,critic}/huggingface/``:
    ``config.json`` (``architectures`` = the model class, or ``architectures`` if given --
    e.g. ``["FSDPQwen2ForCausalLM"]`` to reproduce the wrong-prefix bug), the tokenizer files
    and ``generation_config.json``.  No weights."""
    from transformers import GenerationConfig

    out = Path(dir)
    out.mkdir(parents=True, exist_ok=True)
    if architectures is not None:
        config = config.__class__.from_dict(config.to_dict())
        config.architectures = list(architectures)
    if generation_config:
        GenerationConfig.from_model_config(config).save_pretrained(out)
    config.save_pretrained(out)
    if tokenizer is not None:
        tokenizer.save_pretrained(out)
    return out


# --------------------------------------------------------------------------------------------
# Mixture-of-Experts models (transformers 5.24 classes)
# --------------------------------------------------------------------------------------------

#: arch -> causal-LM class name of the MoE builders below
MOE_ARCHS = {
    "qwen3_moe": "Qwen3MoeForCausalLM",
    "mixtral": "MixtralForCausalLM",
    "deepseek_v3": "DeepseekV3ForCausalLM",
}


def make_moe_config(
    arch: str,
    *,
    vocab: int = 256,
    hidden: int = 64,
    layers: int = 2,
    heads: int = 4,
    kv_heads: int = 2,
    head_dim: int | None = None,
    num_experts: int = 4,
    topk: int = 2,
    moe_ffn: int = 32,
    ffn: int = 96,
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
    tie: bool = False,
    max_positions: int = 256,
):
    """A tiny MoE config, fp32, sdpa attention, no cache.

    - ``qwen3_moe``: every layer MoE (``decoder_sparse_step=1``, no ``mlp_only_layers``), q/k
      RMSNorm, softmax router with ``norm_topk_prob=True``, no shared expert.
    - ``mixtral``: every layer MoE, softmax top-k router (renormalised), ``head_dim`` = hidden/heads.
    - ``deepseek_v3``: MLA (``q_lora_rank`` set: q-LoRA; ``None``: plain ``q_proj`` like
      Moonlight), the first ``first_k_dense`` layers dense (``ffn``), the rest MoE with
      ``shared_experts`` shared experts (``moe_ffn * shared_experts``), sigmoid router with
      ``e_score_correction_bias``, group-limited routing (``n_group``, ``topk_group``),
      ``norm_topk_prob=True``, ``routed_scaling_factor``; no MTP layers; ``rope_interleave=True``.
    """
    common: dict[str, Any] = dict(
        vocab_size=vocab, hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
        tie_word_embeddings=tie, max_position_embeddings=max_positions, bos_token_id=BOS_ID,
        eos_token_id=EOS_ID, pad_token_id=PAD_ID, rms_norm_eps=1e-6, use_cache=False, dtype="float32",
    )
    if arch == "qwen3_moe":
        from transformers import Qwen3MoeConfig

        config = Qwen3MoeConfig(
            **common, num_key_value_heads=kv_heads, head_dim=head_dim or hidden // heads,
            intermediate_size=ffn, moe_intermediate_size=moe_ffn, num_experts=num_experts,
            num_experts_per_tok=topk, norm_topk_prob=True, decoder_sparse_step=1, mlp_only_layers=[],
            output_router_logits=False, attention_bias=False, use_sliding_window=False,
        )
    elif arch == "mixtral":
        from transformers import MixtralConfig

        config = MixtralConfig(
            **common, num_key_value_heads=kv_heads, head_dim=hidden // heads, intermediate_size=moe_ffn,
            num_local_experts=num_experts, num_experts_per_tok=topk, output_router_logits=False,
            sliding_window=None,
        )
    elif arch == "deepseek_v3":
        from transformers import DeepseekV3Config

        config = DeepseekV3Config(
            **common, num_key_value_heads=heads, intermediate_size=ffn, moe_intermediate_size=moe_ffn,
            n_routed_experts=num_experts, n_shared_experts=shared_experts, num_experts_per_tok=topk,
            first_k_dense_replace=first_k_dense, n_group=n_group, topk_group=topk_group,
            routed_scaling_factor=routed_scaling_factor, norm_topk_prob=True, q_lora_rank=q_lora_rank,
            kv_lora_rank=kv_lora_rank, qk_nope_head_dim=qk_nope_head_dim,
            qk_rope_head_dim=qk_rope_head_dim, v_head_dim=v_head_dim, rope_interleave=True,
            num_nextn_predict_layers=0,
        )
    else:
        raise ValueError(f"unknown MoE arch {arch!r}; expected one of {tuple(MOE_ARCHS)}")
    config.architectures = [MOE_ARCHS[arch]]
    config._attn_implementation = "sdpa"
    return config


def make_moe_model(arch: str, seed: int = 0, *, config=None, **kw):
    """A deterministic tiny MoE causal LM (fp32) of ``arch`` (see :func:`make_moe_config`).

    transformers 5.24 holds the routed experts FUSED in memory: ``mlp.experts.gate_up_proj``
    ``[E, 2F, H]`` (rows ``[gate; up]``: ``forward`` does ``gate, up = linear(x, w[e]).chunk(2)``)
    and ``mlp.experts.down_proj`` ``[E, H, F]``.  ``save_pretrained`` (5.24) UN-fuses them into
    the per-expert checkpoint names serving engines read: Qwen3-MoE / DeepSeek-V3
    ``mlp.experts.{e}.{gate,up,down}_proj.weight``; Mixtral
    ``block_sparse_moe.experts.{e}.{w1,w3,w2}.weight`` (gate, up, down) and
    ``block_sparse_moe.gate.weight``; ``from_pretrained`` fuses them back.  DeepSeek-V3's
    ``e_score_correction_bias`` is a persistent buffer (zeros at init)."""
    import torch

    if config is None:
        config = make_moe_config(arch, **kw)
    import transformers

    cls = getattr(transformers, MOE_ARCHS[arch])
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = cls(config)
        # routers are zero-initialised (Qwen3-MoE, DeepSeek-V3): give them distinct rows so
        # routing depends on the token before training (a few steps barely move them)
        for name, p in model.named_parameters():
            if name.endswith("mlp.gate.weight"):
                with torch.no_grad():
                    p.normal_(0.0, 0.5)
    model.to(torch.float32)
    return model


def set_expert_bias(model, seed: int = 0) -> list[str]:
    """Give every ``e_score_correction_bias`` buffer (DeepSeek-V3 routers) non-zero known values
    (training does not change it in transformers; SkyRL's Megatron run updates it from the load);
    returns the state-dict keys set."""
    import torch

    keys = []
    gen = torch.Generator().manual_seed(seed + 17)
    for name, b in model.named_buffers():
        if name.endswith("e_score_correction_bias"):
            with torch.no_grad():
                b.copy_(torch.randn(b.shape, generator=gen) * 0.25)
            keys.append(name)
    return keys
