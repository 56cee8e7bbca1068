"""ckptctl.formats.peft against peft itself: names of real PEFT state dicts, per-module scaling
(rank_pattern / alpha_pattern / rsLoRA) and the merge arithmetic, on tiny models built in-process."""

from __future__ import annotations

import copy
import dataclasses
import json

import pytest

torch = pytest.importorskip("torch")
peft = pytest.importorskip("peft")

from ckptctl.errors import UsageError  # noqa: E402
from ckptctl.formats.peft import (BASE, EMBEDDING_A, LORA_A, LORA_B, ORIGINAL, SAVED, LoraConfig,  # noqa: E402
                                  is_peft_state, merge_lora_weight, parse_adapter_config, parse_peft_name,
                                  split_peft_state)
from ckptctl.formats.safe_load import CorruptCheckpointError  # noqa: E402
from realckpt import tiny_models as tm  # noqa: E402

TINY = dict(vocab=200, hidden=32, layers=3, heads=4, kv_heads=2, intermediate=64, tie=False)


def peft_model(**lora_kw):
    base = tm.make_model("qwen2", 1, **TINY)
    cfg = peft.LoraConfig(init_lora_weights=False, **lora_kw)
    return base, peft.get_peft_model(copy.deepcopy(base), cfg)


def adapter_config_bytes(model) -> bytes:
    """adapter_config.json as SkyRL writes it (dataclasses.asdict + enum values)."""
    d = dataclasses.asdict(model.peft_config["default"])
    d["peft_type"] = d["peft_type"].value
    d["task_type"] = getattr(d["task_type"], "value", d["task_type"])
    return json.dumps(d, default=lambda o: sorted(o) if isinstance(o, set) else str(o)).encode()


def lora_layers(model):
    from peft.tuners.lora import LoraLayer

    prefix = "base_model.model."
    return {name[len(prefix):]: m for name, m in model.named_modules() if isinstance(m, LoraLayer)}


def test_base_names_are_the_hf_models_names():
    base, model = peft_model(r=4, lora_alpha=8, target_modules=["q_proj", "down_proj", "embed_tokens"],
                             modules_to_save=["lm_head"])
    names = list(model.state_dict())
    assert is_peft_state(names) and not is_peft_state(base.state_dict())
    state = split_peft_state(names)
    assert list(state.base) == list(base.state_dict())  # same names, same order
    assert {p.role for p in state.base.values()} == {BASE, ORIGINAL}
    assert set(state.saved) == {"lm_head.weight"} and state.saved["lm_head.weight"].role == SAVED
    assert state.adapters == {"default"} and not state.unsupported
    assert set(state.pairs) == set(lora_layers(model))
    assert state.pairs["model.embed_tokens"].embedding
    assert parse_peft_name(state.pairs["model.embed_tokens"].a.source).role == EMBEDDING_A
    q = state.pairs["model.layers.0.self_attn.q_proj"]
    assert (parse_peft_name(q.a.source).role, parse_peft_name(q.b.source).role) == (LORA_A, LORA_B)
    assert sorted(state.lora_names) == sorted(n for n in names if "lora_" in n or "modules_to_save" in n)


@pytest.mark.parametrize("lora_kw", [
    dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "o_proj", "down_proj"],
         rank_pattern={"down_proj": 2, "layers.1.self_attn.v_proj": 6}, alpha_pattern={"o_proj": 16}),
    dict(r=8, lora_alpha=4, use_rslora=True, target_modules=["q_proj", "up_proj"],
         rank_pattern={"model.layers.2.mlp.up_proj": 3}, alpha_pattern={"^model.layers.0.self_attn.q_proj": 7}),
])
def test_scaling_matches_peft_per_module(lora_kw):
    _, model = peft_model(**lora_kw)
    cfg = parse_adapter_config(adapter_config_bytes(model))
    layers = lora_layers(model)
    assert layers
    for module, layer in layers.items():
        rank = layer.lora_A["default"].weight.shape[0]
        assert cfg.rank_of(module) == rank == layer.r["default"], module
        assert cfg.scaling(module, rank) == pytest.approx(layer.scaling["default"], rel=1e-12), module


def test_merge_matches_peft_merge_and_unload():
    _, model = peft_model(r=4, lora_alpha=8, use_rslora=True, target_modules=["q_proj", "embed_tokens"],
                          alpha_pattern={"q_proj": 5})
    cfg = parse_adapter_config(adapter_config_bytes(model))
    sd = {k: v.detach().clone() for k, v in model.state_dict().items()}
    merged = copy.deepcopy(model).merge_and_unload().state_dict()
    state = split_peft_state(sd)
    for module, pair in state.pairs.items():
        rank = sd[pair.a.source].shape[0]
        got = merge_lora_weight(sd[state.base[f"{module}.weight"].source].clone(), sd[pair.a.source],
                                sd[pair.b.source], cfg.scaling(module, rank), transpose=pair.embedding)
        assert torch.equal(got, merged[f"{module}.weight"]), module


def test_adapter_config_refusals():
    good = {"peft_type": "LORA", "r": 4, "lora_alpha": 8}
    assert parse_adapter_config(json.dumps(good).encode()).scaling("x.q_proj", 4) == 2.0
    with pytest.raises(UsageError, match="DoRA"):
        parse_adapter_config(json.dumps(dict(good, use_dora=True)).encode())
    with pytest.raises(UsageError, match="lora_bias"):
        parse_adapter_config(json.dumps(dict(good, lora_bias=True)).encode())
    with pytest.raises(UsageError, match="only LoRA"):
        parse_adapter_config(json.dumps(dict(good, peft_type="IA3")).encode())
    with pytest.raises(CorruptCheckpointError, match="no valid r"):
        parse_adapter_config(json.dumps({"peft_type": "LORA"}).encode())
    with pytest.raises(CorruptCheckpointError, match="cannot read"):
        parse_adapter_config(b"{not json")
    with pytest.raises(CorruptCheckpointError, match="says r=4"):
        LoraConfig(r=4, lora_alpha=8).scaling("x.q_proj", 2)
