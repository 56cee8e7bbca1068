"""The REAL Megatron fixture generator (tests/realckpt/megatron_writer.py) writes what
megatron-core itself reads back.

All variants are written once per module with one launcher (megatron-core imported once), then
checked with megatron-core's own readers (``load_tensors_metadata``, ``load_common_state_dict``),
torch DCP's ``FileSystemReader``, megatron's ``dist_checkpointing.load`` of model and optimizer
state on every rank of the written layout (:mod:`realckpt.megatron_oracle`), and the logits of the
mcore ``GPTModel`` loaded there, which must match the HF reference model's.
"""

from __future__ import annotations

import json
import time

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("megatron.core")

from realckpt.megatron_oracle import oracle_job, run_oracle  # noqa: E402
from realckpt.megatron_writer import (  # noqa: E402
    hf_to_mcore,
    padded_vocab_size,
    split_layers,
    write_megatron_component,
    write_megatron_tree,
)

VARIANTS = {
    "tp2": dict(tp=2),
    "tp2pp2": dict(tp=2, pp=2),  # 4 layers, 2 per stage, 4 ranks
    "perlayer": dict(tp=2, per_layer_keys=True),
    "qwen2_verl": dict(tp=2, arch="qwen2", tie_embeddings=True, verl_nesting=True),
    "tiepp2_fp32opt": dict(tp=1, pp=2, tie_embeddings=True, optimizer_format="fp32", rng_format="sharded"),
    "dp2_bf16": dict(tp=1, dp=2, params_dtype="bfloat16"),
}

METADATA_JSON = {
    "sharded_backend": "torch_dist",
    "sharded_backend_version": 1,
    "common_backend": "torch",
    "common_backend_version": 1,
}

L = "decoder.layers."
QKV, PROJ = L + "self_attention.linear_qkv.weight", L + "self_attention.linear_proj.weight"
FC1, FC2 = L + "mlp.linear_fc1.weight", L + "mlp.linear_fc2.weight"
LN1, LN2 = L + "self_attention.linear_qkv.layer_norm_weight", L + "mlp.linear_fc1.layer_norm_weight"


@pytest.fixture(scope="module")
def comps(megatron_ckpts):
    """The session fixture's checkpoints (realckpt.megatron_fixtures writes them once)."""
    return {name: megatron_ckpts[name].component for name in VARIANTS}


def _expected_model_shapes(c):
    p, i = c.params, c.info
    n, h, f, d = p["num_layers"], p["hidden"], p["ffn"], i["head_dim"]
    qkv_rows = (p["heads"] + 2 * p["kv_heads"]) * d
    vp = i["padded_vocab_size"]
    layer = {
        "self_attention.linear_qkv.layer_norm_weight": (h,),
        "self_attention.linear_qkv.weight": (qkv_rows, h),
        "self_attention.linear_proj.weight": (h, p["heads"] * d),
        "mlp.linear_fc1.layer_norm_weight": (h,),
        "mlp.linear_fc1.weight": (2 * f, h),
        "mlp.linear_fc2.weight": (h, f),
    }
    if p["arch"] == "qwen2":
        layer["self_attention.linear_qkv.bias"] = (qkv_rows,)
    out = {"embedding.word_embeddings.weight": (vp, h), "decoder.final_layernorm.weight": (h,)}
    if not p["tie_embeddings"]:
        out["output_layer.weight"] = (vp, h)
    for k, s in layer.items():
        if p["per_layer_keys"]:
            out.update({f"{L}{j}.{k}": s for j in range(n)})
        else:
            out[L + k] = (n, *s)
    return out


# ------------------------------------------------------------------------------------------
# layout, megatron-core's metadata readers
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", list(VARIANTS))
def test_files_and_metadata_json(comps, name):
    c = comps[name]
    if c.params["verl_nesting"]:
        assert c.ckpt_dir == c.out_dir / "dist_ckpt"
        assert sorted(p.name for p in c.out_dir.iterdir()) == ["dist_ckpt", "huggingface"]
    else:
        assert c.ckpt_dir == c.out_dir
    names = {p.name for p in c.ckpt_dir.iterdir()}
    assert {".metadata", "common.pt", "metadata.json"} <= names
    assert json.loads((c.ckpt_dir / "metadata.json").read_text()) == METADATA_JSON
    world = c.params["tp"] * c.params["pp"] * c.params["dp"]
    # mcore 0.13-0.16: two .distcp files per rank (thread_count=2)
    assert sorted(n for n in names if n.endswith(".distcp")) == sorted(
        f"__{r}_{i}.distcp" for r in range(world) for i in range(2)
    )
    hf = json.loads((c.hf_dir / "config.json").read_text())
    assert hf["architectures"] == [{"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM"}[c.params["arch"]]]
    assert hf["vocab_size"] == 1000 and hf["tie_word_embeddings"] == c.params["tie_embeddings"]
    assert (c.hf_dir / "tokenizer.json").is_file()
    assert not list(c.hf_dir.glob("*.safetensors"))  # config + tokenizer only


@pytest.mark.parametrize("name", list(VARIANTS))
def test_tensors_metadata_keys_shapes_dtypes(comps, name):
    from megatron.core import dist_checkpointing

    c = comps[name]
    md = dist_checkpointing.load_tensors_metadata(str(c.ckpt_dir))
    model = {k: v for k, v in md.items() if not k.startswith("optimizer.")}
    expected = _expected_model_shapes(c)
    assert {k: tuple(v.global_shape) for k, v in model.items()} == expected
    pdt = {"float32": torch.float32, "bfloat16": torch.bfloat16}[c.params["params_dtype"]]
    assert {v.dtype for v in model.values()} == {pdt}
    opt = {k: v for k, v in md.items() if k.startswith("optimizer.")}
    states = ("param", "exp_avg", "exp_avg_sq") if c.params["optimizer_format"] == "fully_reshardable" else (
        "exp_avg", "exp_avg_sq")
    assert {k: tuple(v.global_shape) for k, v in opt.items()} == {
        f"optimizer.state.{s}.{k}": shape for s in states for k, shape in expected.items()
    }
    assert {v.dtype for v in opt.values()} == {torch.float32}
    assert c.info["padded_vocab_size"] == padded_vocab_size(1000, c.params["tp"], 128) == 1024


@pytest.mark.parametrize("name", list(VARIANTS))
def test_common_state_dict(comps, name):
    from megatron.core import dist_checkpointing

    c = comps[name]
    common = dist_checkpointing.load_common_state_dict(str(c.ckpt_dir))
    assert set(common) == ({"optimizer", "lr_scheduler", "rng"} if c.params["rng_format"] == "common"
                           else {"optimizer", "lr_scheduler"})
    assert common["lr_scheduler"]["num_steps"] == c.params["global_step"]
    assert common["lr_scheduler"]["lr_decay_style"] == "cosine"
    opt = common["optimizer"]
    if c.params["optimizer_format"] == "fully_reshardable":
        assert opt["param_state_sharding_type"] == "fully_reshardable"
        groups = opt["optimizer"]["param_groups"]
        assert [g["weight_decay"] for g in groups] == [0.01, 0.0]
        assert all("params" not in g and g["step"] == 1 for g in groups)
    else:
        assert opt["state"]["common_step"] == 1.0
        assert [g["weight_decay"] for g in opt["param_groups"]] == [0.01, 0.0]
    if c.params["rng_format"] == "common":
        assert set(common["rng"]) == {"cpu", "numpy", "random"}
        assert isinstance(common["rng"]["cpu"], torch.Tensor)


def _chunks(c):
    from torch.distributed.checkpoint import FileSystemReader

    md = FileSystemReader(str(c.ckpt_dir)).read_metadata()
    out = {}
    for k, v in md.state_dict_metadata.items():
        if hasattr(v, "chunks"):
            out[k] = (tuple(v.size), sorted((tuple(ch.offsets), tuple(ch.sizes)) for ch in v.chunks))
        else:
            out[k] = None
    return md, out


def _per_layer(chunks, n):
    """Stacked layer tensors hold one chunk group per layer (leading axis chunk size 1)."""
    groups = {}
    for off, size in chunks:
        assert size[0] == 1
        groups.setdefault(off[0], []).append((off[1:], size[1:]))
    assert sorted(groups) == list(range(n))
    return groups


def test_dcp_chunks_tp2(comps):
    c = comps["tp2"]
    md, ch = _chunks(c)
    h, f, tp = 64, 128, 2
    qkv_rows = 128
    for layer in _per_layer(ch[QKV][1], 2).values():  # whole query groups on dim 0
        assert sorted(layer) == [((r * qkv_rows // tp, 0), (qkv_rows // tp, h)) for r in range(tp)]
    for layer in _per_layer(ch[PROJ][1], 2).values():  # row-parallel: dim 1
        assert sorted(layer) == [((0, r * h // tp), (h, h // tp)) for r in range(tp)]
    for layer in _per_layer(ch[FC2][1], 2).values():
        assert sorted(layer) == [((0, r * f // tp), (h, f // tp)) for r in range(tp)]
    for layer in _per_layer(ch[FC1][1], 2).values():  # swiglu: gate_r and up_r -> 2*TP chunks
        assert sorted(layer) == [((r * f // tp, 0), (f // tp, h)) for r in range(2 * tp)]
    for key in (LN1, LN2):  # replicated norms: one chunk per layer
        assert all(v == [((0,), (h,))] for v in _per_layer(ch[key][1], 2).values())
    assert ch["decoder.final_layernorm.weight"][1] == [((0,), (h,))]
    assert ch["embedding.word_embeddings.weight"][1] == [((0, 0), (512, h)), ((512, 0), (512, h))]
    assert ch["output_layer.weight"][1] == [((0, 0), (512, h)), ((512, 0), (512, h))]
    assert ch["optimizer.state.exp_avg." + FC1] == ch[FC1]
    # non-tensor entries: the local layers' (empty) TE-style _extra_state ShardedObjects
    assert {k for k, v in ch.items() if v is None} == {
        f"{L}{m}._extra_state/shard_{i}_2" for m in
        ("self_attention.linear_qkv", "self_attention.linear_proj", "mlp.linear_fc1", "mlp.linear_fc2")
        for i in range(2)
    }
    # every chunk's bytes are in one of the .distcp files present
    files = {si.relative_path for si in md.storage_data.values()}
    assert files == {p.name for p in c.ckpt_dir.glob("*.distcp")}


def test_dcp_chunks_tp2pp2_and_perlayer(comps):
    _, ch = _chunks(comps["tp2pp2"])
    assert ch[QKV][0] == (4, 128, 64)
    assert all(len(v) == 2 for v in _per_layer(ch[QKV][1], 4).values())
    assert all(len(v) == 4 for v in _per_layer(ch[FC1][1], 4).values())
    assert ch["embedding.word_embeddings.weight"][1] == [((0, 0), (512, 64)), ((512, 0), (512, 64))]
    _, ch = _chunks(comps["perlayer"])
    assert not any(k.startswith(L) and k.split(".")[2] not in "0123456789" for k in ch)
    assert ch[f"{L}1.self_attention.linear_qkv.weight"] == ((128, 64), [((0, 0), (64, 64)), ((64, 0), (64, 64))])
    assert ch[f"{L}0.mlp.linear_fc1.weight"][1] == [((r * 64, 0), (64, 64)) for r in range(4)]
    assert ch[f"{L}0.self_attention.linear_proj.weight"][1] == [((0, 0), (64, 32)), ((0, 32), (64, 32))]


def test_dcp_qwen2_tied_sharded_rng_and_dp(comps):
    _, ch = _chunks(comps["qwen2_verl"])
    assert ch[L + "self_attention.linear_qkv.bias"][0] == (2, 128)
    assert "output_layer.weight" not in ch
    _, ch = _chunks(comps["tiepp2_fp32opt"])
    assert "output_layer.weight" not in ch  # tied: the last stage's copy is not saved
    assert {k for k in ch if k.startswith("rng_state")} == {"rng_state/shard_0.0_2.1", "rng_state/shard_1.0_2.1"}
    assert not any(".state.param." in k for k in ch)
    c = comps["dp2_bf16"]
    md, ch = _chunks(c)
    assert ch["embedding.word_embeddings.weight"][1] == [((0, 0), (1024, 64))]
    # fully parallel save: both DP ranks wrote tensor data
    writers = {si.relative_path.split("_")[2] for si in md.storage_data.values()}
    assert writers == {"0", "1"}


def test_reference_matches_hf_mapping(comps):
    """The reference HF dir and checkpoint_tensors.safetensors describe the same weights."""
    for name in ("tp2", "perlayer", "qwen2_verl", "tp2pp2"):
        c = comps[name]
        p = c.params
        full = c.reference_tensors()
        hf = c.reference_hf_state_dict()
        mc = hf_to_mcore(hf, num_layers=p["num_layers"], heads=p["heads"], kv_heads=p["kv_heads"],
                         hidden=p["hidden"], padded_vocab=c.info["padded_vocab_size"],
                         tie_embeddings=p["tie_embeddings"])
        if p["per_layer_keys"]:
            mc = split_layers(mc)
        assert set(mc) == set(c.info["model_keys"])
        for k, v in mc.items():
            assert torch.equal(full[k], v), (name, k)
        assert not full["embedding.word_embeddings.weight"][1000:].any()  # zero padded rows


# ------------------------------------------------------------------------------------------
# megatron-core's load at the written layout + the logits of the loaded GPTModel
# ------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def load_results(megatron_ckpts, tmp_path_factory):
    """Every variant judged by :mod:`realckpt.megatron_oracle` at the layout it was written (model
    and optimizer state loaded by megatron-core on every rank), with the logits of four of them
    against the HF reference model's; one launcher."""
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM

    work = tmp_path_factory.mktemp("mcore_load")
    jobs = []
    for name in VARIANTS:
        c = megatron_ckpts[name]
        job = oracle_job(c, name, c.ckpt_dir, tp=c.params["tp"], pp=c.params["pp"], dp=c.params["dp"])
        if name in ("tp2", "tp2pp2", "perlayer", "qwen2_verl"):
            hf = AutoModelForCausalLM.from_pretrained(str(c.reference_hf_dir)).eval()
            ids = torch.randint(3, 1000, (2, 12), generator=torch.Generator().manual_seed(7))
            with torch.no_grad():
                logits = hf(input_ids=ids).logits.float()
            job["logits_file"] = str(work / f"{name}.safetensors")
            save_file({"input_ids": ids, "logits": logits.contiguous()}, job["logits_file"])
        jobs.append(job)
    t0 = time.monotonic()
    res = run_oracle(jobs, work)
    print(f"\nmegatron load check: {time.monotonic() - t0:.1f}s, max |logits - hf|: "
          f"{ {n: v['logits'] for n, v in res.items()} }")
    return res


@pytest.mark.parametrize("name", list(VARIANTS))
def test_megatron_full_load_equals_reference(megatron_ckpts, load_results, name):
    r = load_results[name]
    assert r["errors"] == [], r["errors"][0]
    assert r["keys"] == set(megatron_ckpts[name].reference_tensors()) and r["mismatch"] == []


@pytest.mark.parametrize("name", ["tp2", "tp2pp2", "perlayer", "qwen2_verl"])
def test_mcore_logits_match_hf(load_results, name):
    assert load_results[name]["logits"] < 1e-4


# ------------------------------------------------------------------------------------------
# idempotency and the SkyRL tree
# ------------------------------------------------------------------------------------------


def test_idempotent_and_refuses_foreign_dir(comps, tmp_path):
    c = comps["tp2"]
    before = {p: p.stat().st_mtime_ns for p in c.ckpt_dir.iterdir() if p.is_file()}
    again = write_megatron_component(c.out_dir, **VARIANTS["tp2"])
    assert again.ckpt_dir == c.ckpt_dir and again.params == c.params
    # no megatron launch: nothing is rewritten (not a timed bound: CI machines are loaded)
    assert {p: p.stat().st_mtime_ns for p in c.ckpt_dir.iterdir() if p.is_file()} == before
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "keep.txt").write_text("not ours")
    with pytest.raises(FileExistsError):
        write_megatron_component(foreign, tp=2)
    assert (foreign / "keep.txt").read_text() == "not ours"


def test_write_megatron_tree(tmp_path):
    from megatron.core import dist_checkpointing

    t0 = time.monotonic()
    tree = write_megatron_tree(tmp_path / "ckpts", steps=(2, 4), pointer=4, tp=2)
    print(f"\nwrote a 2-step megatron tree in {time.monotonic() - t0:.1f}s")
    root = tmp_path / "ckpts"
    assert (root / "latest_ckpt_global_step.txt").read_bytes() == b"4"
    assert sorted(p.name for p in root.iterdir()) == ["global_step_2", "global_step_4", "latest_ckpt_global_step.txt"]
    assert not (tmp_path / "ckpts.reference" / "global_step_2" / "policy").is_relative_to(root)
    for n in (2, 4):
        step = root / f"global_step_{n}"
        assert sorted(p.name for p in step.iterdir()) == ["data.pt", "policy", "trainer_state.pt"]
        ts = torch.load(step / "trainer_state.pt", weights_only=True)
        assert ts["global_step"] == n and ts["config"]["trainer"]["strategy"] == "megatron"
        assert ts["config"]["trainer"]["policy"]["megatron_config"]["tensor_model_parallel_size"] == 2
        data = torch.load(step / "data.pt", weights_only=False)
        assert data["_num_yielded"] == n
        common = dist_checkpointing.load_common_state_dict(str(step / "policy"))
        assert common["lr_scheduler"]["num_steps"] == n
        assert tree.components[n].reference_dir == tmp_path / "ckpts.reference" / f"global_step_{n}" / "policy"
    # different steps hold different (trained) weights
    a = tree.components[2].reference_tensors()["decoder.layers.self_attention.linear_qkv.weight"]
    b = tree.components[4].reference_tensors()["decoder.layers.self_attention.linear_qkv.weight"]
    assert not torch.equal(a, b)
