"""``export-hf`` and ``inspect`` of mixture-of-experts checkpoints written by the real libraries.

Fixtures (tests/realckpt): megatron-core's ``dist_checkpointing.save`` of tiny Qwen3-MoE (TP2xEP2,
PP2xEP2), Mixtral (EP2) and DeepSeek-V3 (MLA with q-LoRA, a leading dense layer, shared experts,
expert bias; EP2) models, each proven by megatron-core's own load and a GPTModel's logits
(test_realckpt_megatron_moe.py); FSDP2 of a tiny Qwen3-MoE. The ground truth is the HF model the
weights came from: ``save_pretrained``'s output (names, shapes, values, shards) and its logits.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from safetensors.torch import load_file  # noqa: E402

from cli_runner import run, run_json  # noqa: E402

MEGATRON_MOE = ["qwen3moe_tp2ep2", "qwen3moe_pp2ep2", "mixtral_ep2", "dsv3_ep2"]
LAYOUTS = {"qwen3moe_tp2ep2": "TP2·PP1·EP2", "qwen3moe_pp2ep2": "TP1·PP2·EP2", "mixtral_ep2": "TP1·PP1·EP2",
           "dsv3_ep2": "TP1·PP1·EP2"}


def load_dir(path: Path) -> dict:
    state = {}
    for shard in sorted(path.glob("*.safetensors")):
        state.update(load_file(str(shard)))
    return state


def weight_map(path: Path) -> dict:
    index = path / "model.safetensors.index.json"
    if index.is_file():
        return json.loads(index.read_text())["weight_map"]
    return {name: "model.safetensors" for name in load_dir(path)}


def causal_lm(path: Path):
    return transformers.AutoModelForCausalLM.from_pretrained(str(path)).eval()


def logits(model, vocab: int) -> torch.Tensor:
    ids = torch.randint(3, vocab, (2, 12), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        return model(input_ids=ids).logits


@pytest.mark.parametrize("name", MEGATRON_MOE)
def test_megatron_moe_export_is_what_save_pretrained_writes(megatron_moe_ckpts, tmp_path, name):
    ck = megatron_moe_ckpts[name]
    ref_dir = ck.reference_hf_dir
    out = tmp_path / "out"
    doc = run_json("export-hf", ck.out_dir, "--out", out)
    assert doc["backend"] == "megatron" and doc["verified"]
    got, want = load_dir(out), load_dir(ref_dir)
    assert sorted(got) == sorted(want)
    for key, tensor in want.items():
        assert got[key].dtype == tensor.dtype and torch.equal(got[key], tensor), key
    # diff reads the checkpoint through the same mapping: equal to the HF model, tensor for tensor
    assert run_json("diff", ck.out_dir, ref_dir)["equal"]
    reference = causal_lm(ref_dir)
    vocab = reference.config.vocab_size
    torch.testing.assert_close(logits(causal_lm(out), vocab), logits(reference, vocab), rtol=0, atol=1e-5)

    # sharded: the shards save_pretrained itself makes at the same size
    small = tmp_path / "small"
    run_json("export-hf", ck.out_dir, "--out", small, "--max-shard-size", "20KB")
    resaved = tmp_path / "resaved"
    reference.save_pretrained(str(resaved), max_shard_size="20KB")
    assert weight_map(small) == weight_map(resaved)
    assert len(set(weight_map(small).values())) > 2


@pytest.mark.parametrize("name", MEGATRON_MOE)
def test_inspect_shows_the_moe_shape_and_layout(megatron_moe_ckpts, name):
    ck = megatron_moe_ckpts[name]
    config = json.loads((ck.out_dir / "huggingface" / "config.json").read_text())
    (comp,) = run_json("inspect", ck.out_dir)["components"]
    moe = comp["moe"]
    experts = next(config[k] for k in ("num_local_experts", "num_experts", "n_routed_experts") if config.get(k))
    assert moe["routed_experts"] == experts and moe["experts_per_token"] == config["num_experts_per_tok"]
    assert moe["router"] == ("sigmoid, expert bias" if name.startswith("dsv3") else "softmax")
    assert moe["shared_experts"] == (1 if name.startswith("dsv3") else 0)
    reference = load_dir(ck.reference_hf_dir)
    routed = sum(t.numel() for k, t in reference.items() if ".experts." in k and "shared" not in k)
    assert moe["expert_parameters"] == routed
    assert comp["format"]["parallel"]["layout"] == LAYOUTS[name] == moe["layout"]


def test_an_expert_count_that_differs_from_the_config_is_refused(megatron_moe_ckpts, tmp_path):
    src = Path(shutil.copytree(megatron_moe_ckpts["qwen3moe_tp2ep2"].out_dir, tmp_path / "policy"))
    config_path = src / "huggingface" / "config.json"
    config = json.loads(config_path.read_text())
    key = next(k for k in ("num_local_experts", "num_experts") if config.get(k))
    config[key] *= 2
    config_path.write_text(json.dumps(config))
    code, _, err = run("export-hf", src, "--out", tmp_path / "out")
    assert code == 1 and "linear_fc1.weight" in err and "experts x rows x columns" in err
    assert not (tmp_path / "out").exists()


def test_a_missing_expert_rank_is_refused(megatron_moe_ckpts, tmp_path):
    """The experts of one EP rank gone (its .distcp truncated away): never a smaller model."""
    src = Path(shutil.copytree(megatron_moe_ckpts["mixtral_ep2"].out_dir, tmp_path / "policy"))
    victim = max(src.glob("__*_0.distcp"))
    victim.write_bytes(victim.read_bytes()[:100])
    code, _, err = run("export-hf", src, "--out", tmp_path / "out")
    assert code == 1 and victim.name in err
    assert not (tmp_path / "out").exists()


def test_fsdp_moe_export(fsdp_ckpts, tmp_path):
    comp = fsdp_ckpts["qwen3moe_w2"]
    out = tmp_path / "out"
    doc = run_json("export-hf", comp.path, "--out", out, "--max-shard-size", "20KB")
    assert doc["backend"] == "fsdp" and doc["verified"]
    names = set(weight_map(out))
    assert "model.layers.0.mlp.experts.0.gate_proj.weight" in names
    assert not any(n.endswith(("gate_up_proj", "experts.down_proj")) for n in names)
    model = causal_lm(out)
    ref = load_file(str(comp.reference_dir / "reference_logits.safetensors"))
    with torch.no_grad():
        got = model(input_ids=ref["input_ids"]).logits
    torch.testing.assert_close(got, ref["logits"], rtol=0, atol=1e-5)
    resaved = tmp_path / "resaved"
    model.save_pretrained(str(resaved), max_shard_size="20KB")
    assert weight_map(out) == weight_map(resaved)
