"""MoE names, order and sharding as transformers 5.24's ``save_pretrained`` writes them.

Oracle: transformers itself. A tiny Qwen3-MoE, Mixtral and DeepSeek-V3 (MLA with and without
q-LoRA, a leading dense layer, shared experts, expert bias) built from a config; what
``save_pretrained`` writes is its ``revert_weight_conversion`` state dict (per-expert names, sorted)
sharded by ``split_torch_state_dict_into_shards``. Checked against it:

- :func:`ckptctl.formats.mcore_to_hf.build_plan` over the model mapped to Megatron's MoE layout by
  an HF -> mcore inverse written here (stacked ``[L, E, 2F, H]`` expert keys, or per-layer ones):
  same names in the same order, bit-identical tensors, the same shard of every tensor at several
  ``max_shard_size`` values. The real megatron-core checkpoints are exported in test_export_moe.py.
- :func:`ckptctl.formats.hf_saved_layout.saved_layout` over the model's in-memory state dict (what
  an FSDP checkpoint of it holds): the same.
"""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from huggingface_hub import split_torch_state_dict_into_shards  # noqa: E402
from transformers.modeling_utils import remove_tied_weights_from_state_dict, revert_weight_conversion  # noqa: E402

from ckptctl.formats.hf_saved_layout import saved_layout  # noqa: E402
from ckptctl.formats.hf_writer import TensorSpec, plan_shards  # noqa: E402
from ckptctl.formats.mcore_to_hf import MappingError, build_plan, state_dict_reader  # noqa: E402

TINY = dict(vocab_size=128, hidden_size=32, num_attention_heads=4, tie_word_embeddings=False)


def qwen3_moe():
    return transformers.Qwen3MoeForCausalLM(transformers.Qwen3MoeConfig(
        **TINY, intermediate_size=64, moe_intermediate_size=16, num_hidden_layers=2, num_key_value_heads=2,
        head_dim=8, num_experts=4, num_experts_per_tok=2, decoder_sparse_step=1, mlp_only_layers=[]))


def mixtral():
    return transformers.MixtralForCausalLM(transformers.MixtralConfig(
        **TINY, intermediate_size=16, num_hidden_layers=2, num_key_value_heads=2, num_local_experts=3,
        num_experts_per_tok=2))


def deepseek_v3(q_lora_rank):
    return transformers.DeepseekV3ForCausalLM(transformers.DeepseekV3Config(
        **TINY, intermediate_size=64, moe_intermediate_size=16, num_hidden_layers=3, num_key_value_heads=4,
        n_routed_experts=4, n_shared_experts=1, num_experts_per_tok=2, first_k_dense_replace=1,
        q_lora_rank=q_lora_rank, kv_lora_rank=8, qk_rope_head_dim=4, qk_nope_head_dim=8, v_head_dim=8, n_group=2,
        topk_group=1))


def glm4_moe(lite: bool):
    common = dict(**TINY, intermediate_size=64, moe_intermediate_size=16, num_hidden_layers=3, n_routed_experts=4,
                  n_shared_experts=1, num_experts_per_tok=2, first_k_dense_replace=1)
    if lite:  # GLM-4.7-Flash: DeepSeek-V3's multi-latent attention
        return transformers.Glm4MoeLiteForCausalLM(transformers.Glm4MoeLiteConfig(
            **common, num_key_value_heads=4, q_lora_rank=16, kv_lora_rank=8, qk_rope_head_dim=4, qk_nope_head_dim=8,
            v_head_dim=8))
    return transformers.Glm4MoeForCausalLM(transformers.Glm4MoeConfig(
        **common, num_key_value_heads=2, head_dim=8, attention_bias=True, use_qk_norm=True))


MODELS = {"qwen3_moe": qwen3_moe, "mixtral": mixtral, "deepseek_v3": lambda: deepseek_v3(16),
          "deepseek_v3_no_q_lora": lambda: deepseek_v3(None), "glm4_moe": lambda: glm4_moe(False),
          "glm4_moe_lite": lambda: glm4_moe(True)}


def randomized(model):
    """Random values everywhere (the expert bias buffer too): a swapped tensor cannot pass."""
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for t in list(model.parameters()) + [b for n, b in model.named_buffers() if "e_score" in n]:
            t.copy_(torch.randn(t.shape, generator=gen))
    return model


def saved_state(model) -> dict:
    return revert_weight_conversion(model, remove_tied_weights_from_state_dict(model.state_dict(), model))


def config_of(model) -> dict:
    return dict(model.config.to_dict(), architectures=[type(model).__name__])


_MCORE = {  # HF in-memory name (relative to the layer) -> mcore name (the TE spec's)
    "self_attn.o_proj.weight": "self_attention.linear_proj.weight",
    "self_attn.q_norm.weight": "self_attention.q_layernorm.weight",
    "self_attn.k_norm.weight": "self_attention.k_layernorm.weight",
    "self_attn.q_a_proj.weight": "self_attention.linear_q_down_proj.weight",
    "self_attn.q_a_layernorm.weight": "self_attention.linear_q_up_proj.layer_norm_weight",
    "self_attn.q_b_proj.weight": "self_attention.linear_q_up_proj.weight",
    "self_attn.q_proj.weight": "self_attention.linear_q_proj.weight",  # MLA without q-LoRA
    "self_attn.kv_a_proj_with_mqa.weight": "self_attention.linear_kv_down_proj.weight",
    "self_attn.kv_a_layernorm.weight": "self_attention.linear_kv_up_proj.layer_norm_weight",
    "self_attn.kv_b_proj.weight": "self_attention.linear_kv_up_proj.weight",
    "mlp.gate.weight": "mlp.router.weight",
    "mlp.gate.e_score_correction_bias": "mlp.router.expert_bias",
    "mlp.experts.gate_up_proj": "mlp.experts.experts.linear_fc1.weight",  # [E, 2F, H]: gate rows, up rows
    "mlp.experts.down_proj": "mlp.experts.experts.linear_fc2.weight",
    "mlp.shared_experts.down_proj.weight": "mlp.shared_experts.linear_fc2.weight",
    "mlp.down_proj.weight": "mlp.linear_fc2.weight",
}


def to_mcore(model, *, stacked: bool) -> dict:
    """The model's tensors in Megatron's layout (stacked keys with a leading layer axis, or per layer)."""
    sd, cfg = model.state_dict(), model.config
    mla = hasattr(cfg, "kv_lora_rank")
    out = {"embedding.word_embeddings.weight": sd["model.embed_tokens.weight"],
           "decoder.final_layernorm.weight": sd["model.norm.weight"], "output_layer.weight": sd["lm_head.weight"]}
    layers: list[dict] = []
    for i in range(cfg.num_hidden_layers):
        p, layer = f"model.layers.{i}.", {}
        for name, tensor in sd.items():
            if name.startswith(p) and name[len(p):] in _MCORE:
                layer[_MCORE[name[len(p):]]] = tensor
        if not mla:
            hd, nkv = cfg.head_dim or cfg.hidden_size // cfg.num_attention_heads, cfg.num_key_value_heads
            q = sd[p + "self_attn.q_proj.weight"].reshape(nkv, -1, cfg.hidden_size)
            k = sd[p + "self_attn.k_proj.weight"].reshape(nkv, hd, cfg.hidden_size)
            v = sd[p + "self_attn.v_proj.weight"].reshape(nkv, hd, cfg.hidden_size)
            layer["self_attention.linear_qkv.weight"] = torch.cat([q, k, v], 1).reshape(-1, cfg.hidden_size)
            if p + "self_attn.q_proj.bias" in sd:  # grouped like the weight rows
                qb, kb, vb = (sd[p + f"self_attn.{x}_proj.bias"].reshape(nkv, -1) for x in "qkv")
                layer["self_attention.linear_qkv.bias"] = torch.cat([qb, kb, vb], 1).reshape(-1)
            layer["self_attention.linear_qkv.layer_norm_weight"] = sd[p + "input_layernorm.weight"]
            layer.pop("self_attention.linear_q_proj.weight", None)
        else:
            layer["input_layernorm.weight"] = sd[p + "input_layernorm.weight"]
        if p + "mlp.gate_proj.weight" in sd:  # a dense layer: TE fuses its pre-MLP norm into linear_fc1
            layer["mlp.linear_fc1.weight"] = torch.cat([sd[p + "mlp.gate_proj.weight"], sd[p + "mlp.up_proj.weight"]])
            layer["mlp.linear_fc1.layer_norm_weight"] = sd[p + "post_attention_layernorm.weight"]
        else:
            layer["pre_mlp_layernorm.weight"] = sd[p + "post_attention_layernorm.weight"]
        if p + "mlp.shared_experts.gate_proj.weight" in sd:
            layer["mlp.shared_experts.linear_fc1.weight"] = torch.cat(
                [sd[p + "mlp.shared_experts.gate_proj.weight"], sd[p + "mlp.shared_experts.up_proj.weight"]])
        layers.append(layer)
    if stacked:
        out.update({f"decoder.layers.{k}": torch.stack([layer[k] for layer in layers]) for k in layers[0]})
    else:
        out.update({f"decoder.layers.{i}.{k}": v for i, layer in enumerate(layers) for k, v in layer.items()})
    return out


def assert_like_save_pretrained(names: list[str], tensors: dict | None, specs: list[TensorSpec], want: dict) -> None:
    assert names == list(want)
    if tensors is not None:
        for name, w in want.items():
            assert torch.equal(tensors[name], w), name
    for size in ("2KB", "9KB", "20KB", "1MB"):
        hf = split_torch_state_dict_into_shards(want, max_shard_size=size)
        expected = hf.tensor_to_filename if hf.is_sharded else {k: "model.safetensors" for k in want}
        assert plan_shards(specs, size).weight_map == expected, size


# A leading dense layer (DeepSeek-V3) makes megatron write per-layer keys; the others may have either.
LEADING_DENSE = ("deepseek", "glm4")
LAYOUTS = [(arch, stacked) for arch in MODELS for stacked in (True, False)
           if not (stacked and arch.startswith(LEADING_DENSE))]


@pytest.mark.parametrize("arch,stacked", LAYOUTS, ids=[f"{a}-{'stacked' if s else 'per-layer'}" for a, s in LAYOUTS])
def test_megatron_moe_plan_writes_what_save_pretrained_writes(arch, stacked):
    model = randomized(MODELS[arch]())
    mcore = to_mcore(model, stacked=stacked)
    plan = build_plan(config_of(model), mcore)
    got = dict(plan.iter_tensors(state_dict_reader(mcore)))
    specs = [TensorSpec(o.name, o.shape, "float32", shard_group=o.shard_group) for o in plan.outputs]
    assert_like_save_pretrained(list(got), got, specs, saved_state(model))
    # one expert per read: no source is ever a whole stacked or per-layer expert tensor
    expert_sources = [s for step in plan.steps for s in step.sources if "experts.experts" in s.key]
    assert expert_sources and all(s.expert is not None and len(s.shape) == 2 for s in expert_sources)


def test_mtp_layers_are_dropped_on_purpose_and_said_so():
    model = randomized(deepseek_v3(16))
    mcore = to_mcore(model, stacked=False)
    mcore["mtp.layers.0.enorm.weight"] = torch.ones(32)
    plan = build_plan(config_of(model), mcore)
    assert "mtp.layers.0.enorm.weight" in plan.skipped
    assert any(w.startswith("mtp.* not exported") for w in plan.warnings)


def test_missing_experts_and_a_wrong_expert_count_are_refused():
    model = randomized(qwen3_moe())
    mcore = to_mcore(model, stacked=True)
    fc1 = mcore.pop("decoder.layers.mlp.experts.experts.linear_fc1.weight")
    with pytest.raises(MappingError, match=r"missing decoder\.layers\.mlp\.experts\.experts\.linear_fc1\.weight"):
        build_plan(config_of(model), mcore)
    mcore["decoder.layers.mlp.experts.experts.linear_fc1.weight"] = fc1[:, :3]  # 3 of the 4 experts
    with pytest.raises(MappingError, match=r"linear_fc1\.weight\[0\] \[3, 32, 32\] \(expected \[4, 32, 32\]"):
        build_plan(config_of(model), mcore)


@pytest.mark.parametrize("arch", MODELS)
def test_saved_layout_of_the_in_memory_state_dict(arch):
    """What an FSDP checkpoint of a transformers 5 MoE model holds, laid out as save_pretrained does."""
    model = randomized(MODELS[arch]())
    state = remove_tied_weights_from_state_dict(model.state_dict(), model)
    layout = saved_layout(config_of(model), [(k, tuple(v.shape)) for k, v in state.items()])
    tensors = {}
    for t in layout:
        block = state[t.source] if t.expert is None else state[t.source][t.expert]
        tensors[t.name] = block if t.rows is None else block[t.rows[0]:t.rows[1]]
    specs = [TensorSpec(t.name, t.shape, "float32", shard_group=t.shard_group) for t in layout]
    assert_like_save_pretrained([t.name for t in layout], tensors, specs, saved_state(model))


@pytest.mark.parametrize("arch", MODELS)
def test_moe_summary_counts_what_the_model_holds(arch):
    from ckptctl.formats.base import TensorInfo
    from ckptctl.formats.moe import moe_summary

    model = MODELS[arch]()
    config = config_of(model)
    saved = saved_state(model)
    summary = moe_summary(config, [TensorInfo(k, tuple(v.shape), "float32") for k, v in saved.items()])
    experts = {"qwen3_moe": 4, "mixtral": 3}.get(arch, 4)
    assert summary["routed_experts"] == experts and summary["experts_per_token"] == 2
    sigmoid = arch.startswith(LEADING_DENSE)
    assert summary["router"] == ("sigmoid, expert bias" if sigmoid else "softmax")
    assert summary["shared_experts"] == (1 if sigmoid else 0)
    assert summary["moe_layers"] == (2 if sigmoid else config["num_hidden_layers"])
    routed = sum(m.numel() for name, module in model.named_modules() if name.endswith("mlp.experts")
                 for m in module.parameters())
    total = sum(v.numel() for v in saved.values())
    assert summary["expert_parameters"] == routed and summary["dense_parameters"] == total - routed
    assert summary["active_parameters"] == total - routed + routed * 2 // experts
    # the in-memory (FSDP) names count the same
    fused = moe_summary(config, [TensorInfo(k, tuple(v.shape), "float32") for k, v in model.state_dict().items()
                                 if k != "lm_head.weight" or not config.get("tie_word_embeddings")])
    assert fused["expert_parameters"] == routed
    assert moe_summary({"model_type": "llama"}, [TensorInfo("model.layers.0.mlp.up_proj.weight", (4, 4), "float32")]) \
        is None
