"""The REAL FSDP2 Qwen3-MoE fixture (``fsdp_ckpts["qwen3moe_w2"]``, tests/realckpt/fsdp_writer.py):
what torch's FSDP2 writes for a transformers 5.24 MoE model, and what it means.

- the rank files hold the routed experts FUSED (``mlp.experts.gate_up_proj`` [E, 2F, H],
  ``mlp.experts.down_proj`` [E, H, F]) as DTensors sharded on the expert axis;
- concatenating the rank shards gives the reference full state, which reproduces the reference
  logits in a plain ``Qwen3MoeForCausalLM`` built from ``huggingface/config.json``;
- ``gate_up_proj[e][:F]`` is expert e's gate projection: transformers' own ``save_pretrained``
  writes it as ``mlp.experts.{e}.gate_proj.weight`` (and ``[F:]`` as ``up_proj``);
- the optimizer state holds the same expert shards (keyed by parameter index).
"""

from __future__ import annotations

import json

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

NAME = "qwen3moe_w2"
E, F, H, W = 4, 32, 64, 2


@pytest.fixture(scope="module")
def comp(fsdp_ckpts):
    return fsdp_ckpts[NAME]


def _rank_state(comp, kind: str, rank: int):
    import torch.distributed.tensor  # noqa: F401  (DTensor unpickling with weights_only)

    return torch.load(comp.file(kind, rank), weights_only=True)


def _merged(comp) -> dict:
    from torch.distributed.tensor import DTensor

    parts = [_rank_state(comp, "model", r) for r in range(W)]
    out = {}
    for k, v in parts[0].items():
        if isinstance(v, DTensor):
            out[k] = torch.cat([p[k].to_local() for p in parts], dim=0)
        else:
            out[k] = v
    return out


def test_rank_files_hold_fused_experts_sharded_on_expert_axis(comp):
    from torch.distributed.tensor import DTensor, Shard

    assert sorted(p.name for p in comp.path.glob("*.pt")) == sorted(
        f"{k}_world_size_{W}_rank_{r}.pt" for k in ("model", "optim", "extra_state") for r in range(W))
    cfg = json.loads((comp.path / "huggingface" / "config.json").read_text())
    # transformers 5.24 writes num_experts under its canonical name num_local_experts
    assert cfg["architectures"] == ["Qwen3MoeForCausalLM"] and cfg["num_local_experts"] == E
    assert "num_experts" not in cfg
    assert cfg["moe_intermediate_size"] == F and cfg["num_experts_per_tok"] == 2
    for r in range(W):
        sd = _rank_state(comp, "model", r)
        for i in range(2):
            p = f"model.layers.{i}.mlp."
            assert not any(k.startswith(p + "experts.") and k.split(".")[5].isdigit() for k in sd)
            gu, dn, gate = sd[p + "experts.gate_up_proj"], sd[p + "experts.down_proj"], sd[p + "gate.weight"]
            for t, shape in ((gu, (E, 2 * F, H)), (dn, (E, H, F)), (gate, (E, H))):
                assert isinstance(t, DTensor) and tuple(t.shape) == shape
                assert t.placements == (Shard(0),)
                assert tuple(t.to_local().shape) == (E // W, *shape[1:])
            assert sd[f"model.layers.{i}.self_attn.q_norm.weight"].shape == (16,)
    assert comp.meta["local_shapes"]["model.layers.1.mlp.experts.gate_up_proj"] == [[2, 2 * F, H]] * W


def test_merged_shards_are_the_reference_and_give_its_logits(comp):
    from safetensors.torch import load_file
    from transformers import AutoConfig, Qwen3MoeForCausalLM

    merged = _merged(comp)
    ref = load_file(str(comp.reference_dir / "reference_full_state.safetensors"))
    assert set(merged) == set(ref)
    for k in ref:
        assert torch.equal(merged[k], ref[k]), k
    config = AutoConfig.from_pretrained(str(comp.path / "huggingface"))
    model = Qwen3MoeForCausalLM(config)
    missing, unexpected = model.load_state_dict({k: v for k, v in merged.items() if "inv_freq" not in k},
                                                strict=False)
    assert list(missing) == [] and list(unexpected) == []
    model.eval()
    io = load_file(str(comp.reference_dir / "reference_logits.safetensors"))
    with torch.no_grad():
        logits = model(input_ids=io["input_ids"]).logits
    assert torch.allclose(logits, io["logits"], atol=1e-5)
    # negative control: swapping experts 0 and 3 of layer 0 changes the output
    with torch.no_grad():
        gu = model.model.layers[0].mlp.experts.gate_up_proj
        gu[[0, 3]] = gu[[3, 0]].clone()
        assert (model(input_ids=io["input_ids"]).logits - io["logits"]).abs().max() > 1e-3


def test_gate_is_the_first_half_of_gate_up_proj(comp, tmp_path):
    """transformers' own save_pretrained (5.24) un-fuses gate_up_proj[e] into gate_proj = [:F],
    up_proj = [F:] -- the checkpoint-side meaning of the fused FSDP tensor."""
    from safetensors.torch import load_file
    from transformers import AutoConfig, Qwen3MoeForCausalLM

    merged = _merged(comp)
    model = Qwen3MoeForCausalLM(AutoConfig.from_pretrained(str(comp.path / "huggingface")))
    model.load_state_dict({k: v for k, v in merged.items() if "inv_freq" not in k}, strict=True)
    model.save_pretrained(str(tmp_path))
    saved = {}
    for f in tmp_path.glob("*.safetensors"):
        saved.update(load_file(str(f)))
    for i in range(2):
        gu = merged[f"model.layers.{i}.mlp.experts.gate_up_proj"]
        dn = merged[f"model.layers.{i}.mlp.experts.down_proj"]
        assert f"model.layers.{i}.mlp.experts.gate_up_proj" not in saved
        for e in range(E):
            p = f"model.layers.{i}.mlp.experts.{e}."
            assert torch.equal(saved[p + "gate_proj.weight"], gu[e, :F])
            assert torch.equal(saved[p + "up_proj.weight"], gu[e, F:])
            assert torch.equal(saved[p + "down_proj.weight"], dn[e])
        assert torch.equal(saved[f"model.layers.{i}.mlp.gate.weight"], merged[f"model.layers.{i}.mlp.gate.weight"])
    assert not torch.equal(gu[:, :F], gu[:, F:])  # the two halves are distinguishable


def test_optimizer_state_holds_the_expert_shards(comp):
    from safetensors.torch import load_file
    from torch.distributed.tensor import DTensor

    names = comp.meta["param_names"]
    idx = names.index("model.layers.0.mlp.experts.gate_up_proj")
    full = load_file(str(comp.reference_dir / "reference_full_optim.safetensors"))
    ref = full["model.layers.0.mlp.experts.gate_up_proj.exp_avg"]
    assert tuple(ref.shape) == (E, 2 * F, H) and ref.abs().sum() > 0
    shards = []
    for r in range(W):
        st = _rank_state(comp, "optim", r)["state"][idx]["exp_avg"]
        assert isinstance(st, DTensor) and tuple(st.to_local().shape) == (E // W, 2 * F, H)
        shards.append(st.to_local())
    assert torch.equal(torch.cat(shards), ref)
