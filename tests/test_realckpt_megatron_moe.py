"""The REAL Megatron MoE fixtures (``megatron_moe_ckpts``, tests/realckpt/megatron_writer.py)
are what megatron-core writes and reads back.

Every variant of ``MEGATRON_MOE_VARIANTS`` is written once per session by megatron-core 0.16.1's
own ``dist_checkpointing.save`` (one launcher; real mcore MoE ``GPTModel`` ranks under gloo at
TP x PP x EP).  Checked here:

- the DCP keys, global shapes and dtypes, spelled out independently of the writer's mapping (TE
  spec names, doubled ``experts.experts``, stacked vs per-layer keys, MLA names, shared experts,
  router expert bias, ``chained_{0,1}.`` optimizer keys);
- the expert-parallel layout: each expert chunk lives in the file of the rank whose MoE layer holds
  that global expert (megatron's ``local_expert_indices`` = ``ep_rank * E_local + j``);
- megatron-core's own ``dist_checkpointing.load`` at the written TP x PP x EP (every rank, model
  AND chained optimizer state, :mod:`realckpt.megatron_oracle`) returns exactly the reference
  global tensors;
- the megatron-core MoE ``GPTModel`` loaded there gives the logits of the HF model the weights
  came from (atol 1e-4, fp32), and damaged copies (two experts swapped, expert bias zeroed) do not.
"""

from __future__ import annotations

import json
import time

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("megatron.core")
pytest.importorskip("transformers")

from realckpt.megatron_fixtures import MEGATRON_MOE_VARIANTS  # noqa: E402
from realckpt.megatron_oracle import oracle_job, run_oracle  # noqa: E402
from realckpt.megatron_writer import hf_moe_to_mcore, stack_layers  # noqa: E402

NAMES = list(MEGATRON_MOE_VARIANTS)
H, E, F, V = 64, 4, 32, 256  # hidden, routed experts, moe_ffn, (padded) vocab of every variant

METADATA_JSON = {
    "sharded_backend": "torch_dist",
    "sharded_backend_version": 1,
    "common_backend": "torch",
    "common_backend_version": 1,
}


@pytest.fixture(scope="module")
def moe(megatron_moe_ckpts):
    print(f"\nmegatron MoE fixtures ready in {megatron_moe_ckpts.seconds:.1f}s")
    return megatron_moe_ckpts


def _expected_model_shapes(name: str) -> dict:
    """Independent statement of what megatron-core (TE-spec names) writes for each variant."""
    if name.startswith(("qwen3moe", "mixtral")):
        n = 4 if "pp2" in name else 2
        layer = {
            "self_attention.linear_qkv.layer_norm_weight": (H,),
            "self_attention.linear_qkv.weight": ((4 + 2 * 2) * 16, H),  # 4 q heads + 2 k + 2 v, d=16
            "self_attention.linear_proj.weight": (H, H),
            "pre_mlp_layernorm.weight": (H,),
            "mlp.router.weight": (E, H),
            "mlp.experts.experts.linear_fc1.weight": (E, 2 * F, H),
            "mlp.experts.experts.linear_fc2.weight": (E, H, F),
        }
        if name.startswith("qwen3moe"):
            layer["self_attention.q_layernorm.weight"] = (16,)
            layer["self_attention.k_layernorm.weight"] = (16,)
        out = {f"decoder.layers.{k}": (n, *s) for k, s in layer.items()}  # stacked: leading L axis
    else:  # DeepSeek-V3: layer 0 dense, layer 1 MoE -> per-layer keys
        qk, pe, vd, heads = 16, 8, 16, 4
        attn = {
            "input_layernorm.weight": (H,),
            "self_attention.linear_kv_down_proj.weight": (16 + pe, H),
            "self_attention.linear_kv_up_proj.layer_norm_weight": (16,),
            "self_attention.linear_kv_up_proj.weight": (heads * (qk + vd), 16),
            "self_attention.linear_proj.weight": (H, heads * vd),
        }
        if "noqlora" in name:
            attn["self_attention.linear_q_proj.weight"] = (heads * (qk + pe), H)
        else:
            attn["self_attention.linear_q_down_proj.weight"] = (32, H)
            attn["self_attention.linear_q_up_proj.layer_norm_weight"] = (32,)
            attn["self_attention.linear_q_up_proj.weight"] = (heads * (qk + pe), 32)
        dense = {
            "mlp.linear_fc1.layer_norm_weight": (H,),
            "mlp.linear_fc1.weight": (2 * 96, H),
            "mlp.linear_fc2.weight": (H, 96),
        }
        moe_layer = {
            "pre_mlp_layernorm.weight": (H,),
            "mlp.router.weight": (E, H),
            "mlp.router.expert_bias": (E,),
            "mlp.experts.experts.linear_fc1.weight": (E, 2 * F, H),
            "mlp.experts.experts.linear_fc2.weight": (E, H, F),
            "mlp.shared_experts.linear_fc1.weight": (2 * F, H),
            "mlp.shared_experts.linear_fc2.weight": (H, F),
        }
        out = {}
        for i, mlp in enumerate((dense, moe_layer)):
            out.update({f"decoder.layers.{i}.{k}": s for k, s in {**attn, **mlp}.items()})
    out.update({"embedding.word_embeddings.weight": (V, H), "decoder.final_layernorm.weight": (H,),
                "output_layer.weight": (V, H)})
    return out


def _dcp(c):
    from torch.distributed.checkpoint import FileSystemReader

    return FileSystemReader(str(c.ckpt_dir)).read_metadata()


# ------------------------------------------------------------------------------------------
# layout
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", NAMES)
def test_files_hf_dir_and_metadata_json(moe, name):
    c = moe[name]
    p = c.params
    assert c.ckpt_dir == c.out_dir
    names = {x.name for x in c.ckpt_dir.iterdir()}
    assert {".metadata", "common.pt", "metadata.json", "huggingface"} <= names
    assert json.loads((c.ckpt_dir / "metadata.json").read_text()) == METADATA_JSON
    world = p["tp"] * p["pp"] * p["dp"]
    assert world == {"qwen3moe_tp2ep2": 4, "qwen3moe_pp2ep2": 4}.get(name, 2)
    assert sorted(n for n in names if n.endswith(".distcp")) == sorted(
        f"__{r}_{i}.distcp" for r in range(world) for i in range(2))
    hf = json.loads((c.out_dir / "huggingface" / "config.json").read_text())
    arch = {"qwen3_moe": "Qwen3MoeForCausalLM", "mixtral": "MixtralForCausalLM",
            "deepseek_v3": "DeepseekV3ForCausalLM"}[p["arch"]]
    assert hf["architectures"] == [arch] and hf["model_type"] == p["arch"]
    assert hf["vocab_size"] == V and hf["hidden_size"] == H
    assert (c.out_dir / "huggingface" / "tokenizer.json").is_file()
    assert not list((c.out_dir / "huggingface").glob("*.safetensors"))


@pytest.mark.parametrize("name", NAMES)
def test_model_keys_shapes_dtypes(moe, name):
    from megatron.core import dist_checkpointing

    c = moe[name]
    md = dist_checkpointing.load_tensors_metadata(str(c.ckpt_dir))
    model = {k: v for k, v in md.items() if "optimizer." not in k}
    assert {k: tuple(v.global_shape) for k, v in model.items()} == _expected_model_shapes(name)
    assert {v.dtype for v in model.values()} == {torch.float32}


@pytest.mark.parametrize("name", NAMES)
def test_chained_optimizer_keys(moe, name):
    """ChainedOptimizer(dense, expert) in the fully_reshardable model-space layout: every model
    PARAMETER (not the expert-bias buffer) has chained_{0|1}.optimizer.state.{param,exp_avg,
    exp_avg_sq}.<key> with the model's global shape; routed experts are optimizer 1."""
    from megatron.core import dist_checkpointing

    c = moe[name]
    md = dist_checkpointing.load_tensors_metadata(str(c.ckpt_dir))
    expected = {}
    for k, s in _expected_model_shapes(name).items():
        if k.endswith("router.expert_bias"):
            continue
        chain = 1 if ".mlp.experts.experts." in k else 0
        for st in ("param", "exp_avg", "exp_avg_sq"):
            expected[f"chained_{chain}.optimizer.state.{st}.{k}"] = s
    opt = {k: tuple(v.global_shape) for k, v in md.items() if "optimizer." in k}
    assert opt == expected
    assert {md[k].dtype for k in opt} == {torch.float32}
    common = dist_checkpointing.load_common_state_dict(str(c.ckpt_dir))
    assert set(common) == {"optimizer", "lr_scheduler", "rng"}
    assert sorted(common["optimizer"]) == [0, 1]
    for i in (0, 1):
        o = common["optimizer"][i]
        assert o["param_state_sharding_type"] == "fully_reshardable"
        groups = o["optimizer"]["param_groups"]
        assert all(g["step"] == c.params["global_step"] and "params" not in g for g in groups)
        assert {g["is_expert_parallel"] for g in groups} == {bool(i)}
    assert common["lr_scheduler"]["num_steps"] == c.params["global_step"]


@pytest.mark.parametrize("name", NAMES)
def test_expert_parallel_layout(moe, name):
    """Expert chunks: one per (layer, expert[, half of fc1, TP piece]); each lives in a .distcp
    of a rank whose MoE layer holds that global expert, and the ranks' local experts are the
    contiguous blocks ep_rank * (E / EP) + j."""
    c = moe[name]
    p = c.params
    ranks = [json.loads((c.reference_dir / "ranks" / f"rank_{r}.json").read_text())
             for r in range(p["tp"] * p["pp"] * p["dp"])]
    local = E // p["ep"]
    for r in ranks:
        assert r["expert_dp_rank"] == 0 and r["etp_rank"] == r["tp_rank"]
        assert r["local_experts"] and all(v == [r["ep_rank"] * local + j for j in range(local)]
                                          for v in r["local_experts"].values())
    md = _dcp(c)
    per_layer = p["per_layer_keys"]
    keys = [k for k in md.state_dict_metadata
            if k.endswith(("experts.experts.linear_fc1.weight", "experts.experts.linear_fc2.weight"))]
    assert len(keys) == 8  # fc1, fc2 x (model, chained_1.optimizer.state.{param,exp_avg,exp_avg_sq})
    for key in keys:
        meta = md.state_dict_metadata[key]
        for ch in meta.chunks:
            info = md.storage_data[next(i for i in md.storage_data if i.fqn == key and tuple(i.offset) == tuple(ch.offsets))]
            writer = int(info.relative_path.split("_")[2])
            if per_layer:
                layer, expert = int(key[key.index("decoder.layers."):].split(".")[2]), ch.offsets[0]
            else:
                layer, expert = ch.offsets[0], ch.offsets[1]
            assert ch.sizes[0 if per_layer else 1] == 1  # one expert per chunk
            held = ranks[writer]["local_experts"].get(str(layer))
            assert held is not None and expert in held, (key, ch.offsets, writer)
        # fc1: gate and up halves of every TP piece are separate chunks (swiglu factory)
        n_layers = 1 if per_layer else p["num_layers"]
        pieces = 2 * p["etp"] if "linear_fc1" in key else p["etp"]
        assert len(meta.chunks) == n_layers * E * pieces


def test_etp2_fc1_halves(moe):
    """TP2 x EP2 (etp 2): fc1 of expert e, layer l, is 4 chunks [F/2 rows each]: gate_0, gate_1,
    up_0, up_1 at row offsets 0, 16, 32, 48; fc2 is split on its input (F) axis."""
    md = _dcp(moe["qwen3moe_tp2ep2"])
    fc1 = md.state_dict_metadata["decoder.layers.mlp.experts.experts.linear_fc1.weight"]
    rows = sorted((tuple(ch.offsets), tuple(ch.sizes)) for ch in fc1.chunks if ch.offsets[:2] == torch.Size([1, 3]))
    assert rows == [((1, 3, r, 0), (1, 1, F // 2, H)) for r in (0, 16, 32, 48)]
    fc2 = md.state_dict_metadata["decoder.layers.mlp.experts.experts.linear_fc2.weight"]
    cols = sorted((tuple(ch.offsets), tuple(ch.sizes)) for ch in fc2.chunks if ch.offsets[:2] == torch.Size([0, 2]))
    assert cols == [((0, 2, 0, 0), (1, 1, H, F // 2)), ((0, 2, 0, F // 2), (1, 1, H, F // 2))]


@pytest.mark.parametrize("name", NAMES)
def test_reference_is_the_hf_model(moe, name):
    """The reference global tensors are the HF reference model's weights (independent load with
    transformers' from_pretrained), experts in order, expert bias non-zero, weights trained."""
    from transformers import AutoModelForCausalLM

    c = moe[name]
    hf_model = AutoModelForCausalLM.from_pretrained(str(c.reference_hf_dir)).eval()
    hf = {k: v.detach() for k, v in hf_model.state_dict().items()}
    mc = hf_moe_to_mcore(hf, c.params, padded_vocab=V)
    if not c.params["per_layer_keys"]:
        mc = stack_layers(mc)
    full = c.reference_tensors()
    assert set(mc) == set(_expected_model_shapes(name))
    for k, v in mc.items():
        assert torch.equal(full[k], v), k
    # spot-check the fused expert layout against the HF module itself: expert 3's gate rows
    layer = 1 if c.params["per_layer_keys"] else 0
    fc1 = full[f"decoder.layers.{layer}.mlp.experts.experts.linear_fc1.weight"] if c.params["per_layer_keys"] \
        else full["decoder.layers.mlp.experts.experts.linear_fc1.weight"][0]
    experts = hf_model.model.layers[layer].mlp.experts
    assert torch.equal(fc1[3, :F], experts.gate_up_proj[3, :F].detach())
    if c.params["arch"] == "deepseek_v3":
        bias = full["decoder.layers.1.mlp.router.expert_bias"]
        assert bias.dtype == torch.float32 and bias.abs().min() > 0
    if c.params["arch"] == "qwen3_moe":
        # the HF Qwen3-MoE init leaves q_norm at ones; two AdamW steps moved it
        assert not torch.equal(full["decoder.layers.self_attention.q_layernorm.weight"],
                               torch.ones_like(full["decoder.layers.self_attention.q_layernorm.weight"]))


# ------------------------------------------------------------------------------------------
# megatron-core's load at the written layout + the logits of the loaded MoE GPTModel
# ------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def load_results(moe, tmp_path_factory):
    """Every variant judged by :mod:`realckpt.megatron_oracle` at the layout it was written (the
    model and its chained optimizer state loaded by megatron-core on every rank, as a resume
    does), with the logits and their negative controls; one launcher.  (Loads at other layouts:
    tests/test_reshard_moe.py.)"""
    work = tmp_path_factory.mktemp("mcore_moe_load")
    jobs = []
    for n in NAMES:
        p = moe[n].params
        job = oracle_job(moe[n], n, moe[n].ckpt_dir, tp=p["tp"], pp=p["pp"], dp=p["dp"], ep=p["ep"], etp=p["etp"])
        jobs.append(dict(job, controls=True))
    t0 = time.monotonic()
    res = run_oracle(jobs, work)
    print(f"\nmegatron MoE load check: {time.monotonic() - t0:.1f}s, max |logits - hf|: "
          f"{ {n: v['logits'] for n, v in res.items()} }, controls: { {n: v['controls'] for n, v in res.items()} }")
    return res


@pytest.mark.parametrize("name", NAMES)
def test_megatron_full_load_equals_reference(moe, load_results, name):
    r = load_results[name]
    assert r["errors"] == [], r["errors"][0]
    assert r["keys"] == set(moe[name].reference_tensors()) and r["mismatch"] == []


@pytest.mark.parametrize("name", NAMES)
def test_mcore_moe_logits_match_hf(load_results, name):
    assert load_results[name]["logits"] < 1e-4


@pytest.mark.parametrize("name", NAMES)
def test_logits_oracle_is_sensitive(load_results, name):
    """Mis-mapped experts (two swapped) or a dropped expert bias would be caught."""
    controls = load_results[name]["controls"]
    assert controls["swap_experts"] > 1e-3
    if name.startswith("dsv3"):
        assert controls["zero_expert_bias"] > 1e-3


def test_reference_logits_are_the_hf_models(moe):
    """reference_logits.safetensors holds what the saved HF reference model computes."""
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    for name in ("qwen3moe_tp2ep2", "dsv3_ep2"):
        c = moe[name]
        io = load_file(str(c.reference_dir / "reference_logits.safetensors"))
        hf = AutoModelForCausalLM.from_pretrained(str(c.reference_hf_dir)).eval()
        with torch.no_grad():
            logits = hf(input_ids=io["input_ids"]).logits.float()
        assert torch.allclose(logits, io["logits"], atol=1e-5), name


def test_moe_tree(megatron_moe_tree):
    """The SkyRL MoE run: two steps of different (trained) weights, EP recorded in trainer_state."""
    from megatron.core import dist_checkpointing

    tree = megatron_moe_tree
    assert (tree.root / "latest_ckpt_global_step.txt").read_bytes() == b"2"
    for n in (1, 2):
        step = tree.root / f"global_step_{n}"
        assert sorted(p.name for p in step.iterdir()) == ["data.pt", "policy", "trainer_state.pt"]
        mc = torch.load(step / "trainer_state.pt", weights_only=True)["config"]["trainer"]["policy"]["megatron_config"]
        assert (mc["tensor_model_parallel_size"], mc["expert_model_parallel_size"],
                mc["expert_tensor_parallel_size"]) == (2, 2, 2)
        md = dist_checkpointing.load_tensors_metadata(str(step / "policy"))
        assert tuple(md["decoder.layers.mlp.experts.experts.linear_fc1.weight"].global_shape) == (2, E, 2 * F, H)
        assert "chained_1.optimizer.state.exp_avg.decoder.layers.mlp.experts.experts.linear_fc2.weight" in md
    key = "decoder.layers.mlp.experts.experts.linear_fc1.weight"
    a, b = (tree.components[n].reference_tensors()[key] for n in (1, 2))
    assert not torch.equal(a, b)
