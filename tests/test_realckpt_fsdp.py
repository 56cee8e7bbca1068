"""Checks that realckpt.fsdp_writer produces what the layout spec (shared/spec/checkpoint-layout.md)
says SkyRL writes: real FSDP2/FSDP1 rank files, loaded back with weights_only=True.

All variants are generated once per session (one launcher process for the components, one for
the tree) through ``realckpt.fsdp_writer.cached``.
"""

from __future__ import annotations

import json
import pickle
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
import torch.distributed.tensor  # noqa: E402,F401  (lets weights_only=True rebuild DTensors)
from torch.distributed.tensor import DTensor, Replicate, Shard  # noqa: E402

from realckpt import fsdp_writer as fw
from realckpt.fsdp_fixtures import FSDP_VARIANTS, TREE_STEPS  # noqa: E402

SKYRL_EXTRA_KEYS = {"lr_scheduler", "client_state", "tag", "fsdp_strategy", "world_size", "rank", "rng"}
VERL_EXTRA_KEYS = {"lr_scheduler", "rng"}
NUMPY_RNG_GLOBALS = {"numpy.ndarray", "numpy.dtype", "numpy._core.multiarray._reconstruct",
                     "numpy.core.multiarray._reconstruct", "numpy.dtypes.UInt32DType"}
HF_FILES = {"huggingface/config.json", "huggingface/generation_config.json", "huggingface/tokenizer.json",
            "huggingface/tokenizer_config.json", "huggingface/chat_template.jinja"}

# The variants are the session fixtures' own (realckpt.fsdp_fixtures builds them once for every
# test module); ``w1_mesh`` is checked by the reader tests.
VARIANTS: dict[str, dict] = {name: kw for name, kw in FSDP_VARIANTS.items() if name != "w1_mesh"}


@pytest.fixture(scope="session")
def realckpt_variants(fsdp_ckpts) -> dict[str, fw.FsdpComponent]:
    return {name: fsdp_ckpts[name] for name in VARIANTS}


@pytest.fixture(scope="session")
def realckpt_tree(fsdp_tree) -> Path:
    return fsdp_tree


@pytest.fixture
def isolated_safe_globals():
    """No process-wide safe globals (megatron.core registers some on import) during the test."""
    saved = torch.serialization.get_safe_globals()
    torch.serialization.clear_safe_globals()
    yield
    torch.serialization.clear_safe_globals()
    torch.serialization.add_safe_globals(saved)


# ------------------------------------------------------------------------------- helpers

def load(path: Path):
    return torch.load(path, map_location="cpu", weights_only=True)


def load_safetensors(path: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(str(path))


def chunk_sizes(n: int, parts: int) -> list[int]:
    """dim-0 sizes of torch.chunk(n rows, parts), padded with empty chunks to `parts`."""
    sizes = [c.shape[0] for c in torch.chunk(torch.empty(n, 0), parts)] if n else []
    return sizes + [0] * (parts - len(sizes))


def rank_files(comp: fw.FsdpComponent, kind: str) -> list[Path]:
    w = comp.meta["world_size"]
    return [comp.path / f"{kind}_world_size_{w}_rank_{r}.pt" for r in range(w)]


def fsdp_coord(comp, rank: int) -> tuple[int, int]:
    """(replica, fsdp index) of a global rank (row-major mesh, as init_device_mesh builds it)."""
    fsdp = comp.meta["fsdp_size"]
    return rank // fsdp, rank % fsdp


def merge_rank_states(states: list[dict], fsdp_ranks: list[int]) -> dict:
    """Full state from per-rank DTensor state dicts: concatenate the fsdp shards of replica 0,
    take buffers from rank 0."""
    merged = {}
    for k, v0 in states[0].items():
        if isinstance(v0, DTensor):
            merged[k] = torch.cat([states[r][k].to_local() for r in fsdp_ranks], dim=0)
        else:
            merged[k] = v0
    return merged


def all_files(path: Path) -> set[str]:
    return {str(p.relative_to(path)) for p in path.rglob("*") if p.is_file()}


FSDP2_SHARDED = ["w2", "w3_tied", "critic_w3", "hsdp", "verl"]
DTENSOR_MODEL = FSDP2_SHARDED + ["fsdp1"]


# ------------------------------------------------------------------------------- files

@pytest.mark.parametrize("name", [n for n, kw in VARIANTS.items() if kw.get("layout") != "documented"])
def test_skyrl_layout_files(realckpt_variants, name):
    comp = realckpt_variants[name]
    w = VARIANTS[name]["world_size"]
    expected = {f"{kind}_world_size_{w}_rank_{r}.pt" for kind in ("model", "optim", "extra_state") for r in range(w)}
    expected |= HF_FILES
    if VARIANTS[name].get("config_variant", "skyrl") != "none":
        expected.add("fsdp_config.json")
    if VARIANTS[name].get("lora"):  # SkyRL's _save_lora_adapters
        expected |= {"lora_adapter/adapter_config.json", "lora_adapter/adapter_model.safetensors"}
    assert all_files(comp.path) == expected
    # reference data lives OUTSIDE the component directory
    assert comp.reference_dir == comp.path.parent / "policy.reference"
    assert {"reference_full_state.safetensors", "reference_logits.safetensors",
            "reference_meta.json"} <= set(p.name for p in comp.reference_dir.iterdir())


def test_documented_layout_files(realckpt_variants):
    comp = realckpt_variants["documented"]
    assert all_files(comp.path) == {"model_state.pt", "optimizer_state.pt", "lr_scheduler_state.pt",
                                    "fsdp_config.json"} | HF_FILES
    ref = load_safetensors(comp.reference_dir / "reference_full_state.safetensors")
    msd = load(comp.path / "model_state.pt")
    assert set(msd) == set(ref)
    for k, v in msd.items():
        assert type(v) is torch.Tensor and torch.equal(v, ref[k])
    osd = load(comp.path / "optimizer_state.pt")
    assert set(osd) == {"state", "param_groups"} and sorted(osd["state"]) == list(range(len(comp.meta["param_names"])))
    sched = load(comp.path / "lr_scheduler_state.pt")
    assert sched["last_epoch"] == 1 and sched["base_lrs"] == [1e-3]
    assert json.loads((comp.path / "fsdp_config.json").read_text()) == {"fsdp_strategy": "fsdp2", "world_size": 1}


@pytest.mark.parametrize("name,expected", [
    ("w1", {"fsdp_strategy": "fsdp2", "world_size": 1}),
    ("w2", {"fsdp_strategy": "fsdp2", "world_size": 2}),
    ("hsdp", {"fsdp_strategy": "fsdp2", "world_size": 4}),
    ("verl", {"FSDP_version": 2, "world_size": 2}),
    ("fsdp1", {"fsdp_strategy": "fsdp", "world_size": 2}),
    ("fsdp1_sharded", None),
])
def test_fsdp_config_json(realckpt_variants, name, expected):
    p = realckpt_variants[name].path / "fsdp_config.json"
    if expected is None:
        assert not p.exists()
    else:
        assert json.loads(p.read_text()) == expected
        assert p.read_text().startswith("{\n    \"")  # json.dump(indent=4), as SkyRL/verl write it


def test_huggingface_dir_loads_offline(realckpt_variants, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    from transformers import AutoConfig, AutoTokenizer, GenerationConfig

    for name, arch_cls in (("w2", "LlamaForCausalLM"), ("w3_tied", "Qwen2ForCausalLM"), ("critic_w3", "LlamaForCausalLM")):
        hf = realckpt_variants[name].path / "huggingface"
        cfg = AutoConfig.from_pretrained(hf)
        assert cfg.architectures == [arch_cls]
        assert cfg.vocab_size == 1000 and cfg.hidden_size == 64
        assert cfg.tie_word_embeddings == (name == "w3_tied")
        tok = AutoTokenizer.from_pretrained(hf)
        assert tok.decode(tok("global_step_4")["input_ids"]) == "global_step_4"
        assert GenerationConfig.from_pretrained(hf).eos_token_id == tok.eos_token_id
    assert AutoConfig.from_pretrained(realckpt_variants["critic_w3"].path / "huggingface").normalize_reward is False


# ------------------------------------------------------------------------------- model files

@pytest.mark.parametrize("name", ["w1"])
def test_w1_plain_tensors(realckpt_variants, name):
    comp = realckpt_variants[name]
    ref = load_safetensors(comp.reference_dir / "reference_full_state.safetensors")
    (path,) = rank_files(comp, "model")
    sd = load(path)
    assert list(sd) == comp.meta["state_keys"]
    for k, v in sd.items():
        assert type(v) is torch.Tensor and v.dtype == torch.float32
        assert torch.equal(v, ref[k])


@pytest.mark.parametrize("name", DTENSOR_MODEL)
def test_model_rank_files_follow_torch_chunk(realckpt_variants, name):
    comp = realckpt_variants[name]
    meta = comp.meta
    w = meta["world_size"]
    hsdp = VARIANTS[name].get("mesh") == "hsdp"
    ref = load_safetensors(comp.reference_dir / "reference_full_state.safetensors")
    states = [load(p) for p in rank_files(comp, "model")]
    buffers = set(meta["buffer_keys"])
    assert buffers, "every variant has at least one persistent (replicated) buffer"
    for r, sd in enumerate(states):
        assert set(sd) == set(ref), r
        replica, idx = fsdp_coord(comp, r)
        for k, v in sd.items():
            if k in buffers:
                # buffers: plain tensors, identical on every rank
                assert type(v) is torch.Tensor, k
                assert torch.equal(v, states[0][k]) and torch.equal(v, ref[k]), k
                continue
            assert isinstance(v, DTensor), k
            assert v.dtype == torch.float32
            assert tuple(v.shape) == tuple(ref[k].shape), k
            if hsdp:
                assert v.device_mesh.mesh_dim_names == ("ddp", "fsdp")
                assert tuple(v.device_mesh.mesh.shape) == (2, w // 2)
                assert v.placements == (Replicate(), Shard(0))
            else:
                assert v.device_mesh.mesh_dim_names == ("fsdp",)
                assert v.device_mesh.mesh.tolist() == list(range(w))
                assert v.placements == (Shard(0),)
            expected_rows = chunk_sizes(ref[k].shape[0], meta["fsdp_size"])[idx]
            local = v.to_local()
            assert tuple(local.shape) == (expected_rows, *ref[k].shape[1:]), (k, r)
            assert meta["local_shapes"][k][r] == list(local.shape)
    # concatenating replica 0's shards gives the full reference tensors exactly
    fsdp_ranks = list(range(meta["fsdp_size"]))
    merged = merge_rank_states(states, fsdp_ranks)
    for k in ref:
        assert torch.equal(merged[k], ref[k]), k
    if hsdp:  # the other replica holds identical shards
        for r in range(meta["fsdp_size"], w):
            for k, v in states[r].items():
                if isinstance(v, DTensor):
                    assert torch.equal(v.to_local(), states[r - meta["fsdp_size"]][k].to_local())


def test_uneven_and_empty_shards(realckpt_variants):
    w3 = realckpt_variants["w3_tied"]
    assert w3.meta["local_shapes"]["model.embed_tokens.weight"] == [[334, 64], [334, 64], [332, 64]]
    assert w3.meta["local_shapes"]["model.norm.weight"] == [[22], [22], [20]]
    assert w3.meta["empty_shards"] == {}
    critic = realckpt_variants["critic_w3"]
    assert critic.meta["empty_shards"] == {"value_head.weight": [1, 2]}
    sds = [load(p) for p in rank_files(critic, "model")]
    assert [tuple(sd["value_head.weight"].to_local().shape) for sd in sds] == [(1, 64), (0, 64), (0, 64)]
    assert all(tuple(sd["value_head.weight"].shape) == (1, 64) for sd in sds)
    assert "lm_head.weight" not in sds[0]
    assert {"mean", "std", "model.rotary_emb.inv_freq"} == set(critic.meta["buffer_keys"])
    hsdp = realckpt_variants["hsdp"]
    assert hsdp.meta["empty_shards"] == {"value_head.weight": [1, 3]}


def test_tied_embeddings_share_storage(realckpt_variants):
    comp = realckpt_variants["w3_tied"]
    for p in rank_files(comp, "model"):
        sd = load(p)
        a, b = sd["lm_head.weight"].to_local(), sd["model.embed_tokens.weight"].to_local()
        assert a.untyped_storage().data_ptr() == b.untyped_storage().data_ptr()
    assert "lm_head.weight" not in comp.meta["param_names"]


@pytest.mark.parametrize("name", ["w3_tied", "critic_w3", "hsdp"])
def test_merged_rank_files_reproduce_reference_outputs(realckpt_variants, name):
    """Rebuild the model from huggingface/config.json, load the state merged from the rank
    files, and get the reference outputs (proves the rank files hold the trained state)."""
    from realckpt import tiny_models as tm
    from transformers import AutoConfig

    comp = realckpt_variants[name]
    cfg = AutoConfig.from_pretrained(comp.path / "huggingface")
    kw = dict(persistent_buffers=True, config=cfg)
    model = (tm.make_critic if comp.meta["critic"] else tm.make_model)(comp.meta["arch"], 99, **kw)
    states = [load(p) for p in rank_files(comp, "model")]
    model.load_state_dict(merge_rank_states(states, list(range(comp.meta["fsdp_size"]))), strict=True)
    model.eval()
    ref = load_safetensors(comp.reference_dir / "reference_logits.safetensors")
    with torch.no_grad():
        out = model(ref["input_ids"]) if comp.meta["critic"] else model(input_ids=ref["input_ids"]).logits
    key = "values" if comp.meta["critic"] else "logits"
    torch.testing.assert_close(out, ref[key], rtol=1e-5, atol=1e-5)


# ------------------------------------------------------------------------------- optimizer

@pytest.mark.parametrize("name", ["w1", *FSDP2_SHARDED])
def test_optimizer_state_keyed_by_param_index(realckpt_variants, name):
    comp = realckpt_variants[name]
    meta = comp.meta
    names = meta["param_names"]
    ref = load_safetensors(comp.reference_dir / "reference_full_state.safetensors")
    ref_opt = load_safetensors(comp.reference_dir / "reference_full_optim.safetensors")
    osds = [load(p) for p in rank_files(comp, "optim")]
    for r, osd in enumerate(osds):
        assert set(osd) == {"state", "param_groups"}
        assert sorted(osd["state"]) == list(range(len(names)))
        assert osd["param_groups"][0]["params"] == list(range(len(names)))
        assert osd["param_groups"][0]["lr"] == pytest.approx(1e-3)
        for i, st in osd["state"].items():
            assert set(st) == {"step", "exp_avg", "exp_avg_sq"}
            assert type(st["step"]) is torch.Tensor and st["step"].item() == 1.0
            for key in ("exp_avg", "exp_avg_sq"):
                v = st[key]
                assert tuple(v.shape) == tuple(ref[names[i]].shape), (names[i], key)
                if meta["sharded"]:
                    assert isinstance(v, DTensor)
                    expected_rows = chunk_sizes(v.shape[0], meta["fsdp_size"])[fsdp_coord(comp, r)[1]]
                    assert v.to_local().shape[0] == expected_rows
                else:
                    assert type(v) is torch.Tensor
    # gathered moments equal the reference
    for i, name_i in enumerate(names):
        for key in ("exp_avg", "exp_avg_sq"):
            if meta["sharded"]:
                full = torch.cat([osds[r]["state"][i][key].to_local() for r in range(meta["fsdp_size"])])
            else:
                full = osds[0]["state"][i][key]
            assert torch.equal(full, ref_opt[f"{name_i}.{key}"])
    assert any(v.abs().sum() > 0 for k, v in ref_opt.items() if k.endswith(".exp_avg"))


def test_fsdp1_state(realckpt_variants):
    comp = realckpt_variants["fsdp1"]
    osd = load(rank_files(comp, "optim")[1])
    # flat-parameter shards: one state per FSDP unit (2 decoder layers + root), plain 1-D tensors
    assert sorted(osd["state"]) == [0, 1, 2]
    for st in osd["state"].values():
        assert type(st["exp_avg"]) is torch.Tensor and st["exp_avg"].dim() == 1
    extra = torch.load(rank_files(comp, "extra_state")[0], weights_only=False)
    assert extra["fsdp_strategy"] == "fsdp"


def test_fsdp1_sharded_tensor_files(realckpt_variants):
    comp = realckpt_variants["fsdp1_sharded"]
    for p in rank_files(comp, "model"):
        unsafe = set(torch.serialization.get_unsafe_globals_in_checkpoint(str(p)))
        assert "torch.distributed._shard.sharded_tensor.api.ShardedTensor" in unsafe
        with pytest.raises(pickle.UnpicklingError):
            torch.load(p, weights_only=True)
    assert comp.meta["empty_shards"] == {"value_head.weight": [1, 2]}
    assert comp.meta["local_shapes"]["model.embed_tokens.weight"] == [[334, 64], [334, 64], [332, 64]]


# ------------------------------------------------------------------------------- extra state

@pytest.mark.parametrize("name", [n for n, kw in VARIANTS.items() if kw.get("layout") != "documented"])
def test_extra_state(realckpt_variants, name, isolated_safe_globals):
    comp = realckpt_variants[name]
    w = comp.meta["world_size"]
    for r, p in enumerate(rank_files(comp, "extra_state")):
        unsafe = set(torch.serialization.get_unsafe_globals_in_checkpoint(str(p)))
        assert unsafe and unsafe <= NUMPY_RNG_GLOBALS, unsafe  # only the numpy RNG state needs allowlisting
        with pytest.raises(pickle.UnpicklingError):
            torch.load(p, weights_only=True)
        allow = [np.ndarray, np.dtype, np.dtypes.UInt32DType, np._core.multiarray._reconstruct]
        with torch.serialization.safe_globals(allow):
            extra = torch.load(p, weights_only=True)
        if VARIANTS[name].get("config_variant") == "verl":
            assert set(extra) == VERL_EXTRA_KEYS
        else:
            assert set(extra) == SKYRL_EXTRA_KEYS
            assert extra["world_size"] == w and extra["rank"] == r
            assert extra["fsdp_strategy"] == VARIANTS[name].get("strategy", "fsdp2")
            assert extra["client_state"] == {} and extra["tag"] is None
        sched = extra["lr_scheduler"]
        assert sched["last_epoch"] == 1 and sched["_step_count"] == 2 and sched["lr_lambdas"] == [{}]
        rng = extra["rng"]
        assert set(rng) == {"cpu", "numpy", "random", "cuda"}
        assert rng["cpu"].dtype == torch.uint8 and rng["cuda"].dtype == torch.uint8
        assert rng["numpy"][0] == "MT19937"


# ------------------------------------------------------------------------------- tree

def test_tree(realckpt_tree):
    root = realckpt_tree
    assert (root / "latest_ckpt_global_step.txt").read_bytes() == b"4"
    assert sorted(p.name for p in root.iterdir()) == ["global_step_2", "global_step_4", "latest_ckpt_global_step.txt"]
    ref_root = Path(str(root) + ".reference")
    for n in (2, 4):
        step = root / f"global_step_{n}"
        assert sorted(p.name for p in step.iterdir()) == ["critic", "data.pt", "policy", "trainer_state.pt"]
        for comp in ("policy", "critic"):
            files = all_files(step / comp)
            assert "model_world_size_2_rank_1.pt" in files and "fsdp_config.json" in files
            assert not any("reference" in f for f in files)
            extra = torch.load(step / comp / "extra_state_world_size_2_rank_0.pt", weights_only=False)
            assert extra["lr_scheduler"]["last_epoch"] == n  # state after n optimizer steps
            assert (ref_root / f"global_step_{n}" / comp / "reference_full_state.safetensors").is_file()
        assert "value_head.weight" in load(step / "critic" / "model_world_size_2_rank_0.pt")
        data = load(step / "data.pt")
        assert data["_num_yielded"] == 3
        with pytest.raises(pickle.UnpicklingError):  # a pickled OmegaConf DictConfig (0.3.1)
            torch.load(step / "trainer_state.pt", weights_only=True)
        ts = torch.load(step / "trainer_state.pt", weights_only=False)
        from omegaconf import DictConfig

        assert ts["global_step"] == n and isinstance(ts["config"], DictConfig)
        assert ts["config"].trainer.strategy == "fsdp2"
    # different steps hold different weights
    a = load(root / "global_step_2" / "policy" / "model_world_size_2_rank_0.pt")["lm_head.weight"].to_local()
    b = load(root / "global_step_4" / "policy" / "model_world_size_2_rank_0.pt")["lm_head.weight"].to_local()
    assert not torch.equal(a, b)


@pytest.mark.parametrize("kind", ["dict", "dataclass"])
def test_write_step_files(tmp_path, kind):
    fw.write_step_files(tmp_path, global_step=6, config_kind=kind, saved_global_step=5)
    if kind == "dict":
        ts = load(tmp_path / "trainer_state.pt")  # a plain nested dict loads with weights_only=True
        assert ts["config"]["trainer"]["ckpt_interval"] == 2
    else:
        with pytest.raises(pickle.UnpicklingError):
            load(tmp_path / "trainer_state.pt")
        ts = torch.load(tmp_path / "trainer_state.pt", weights_only=False)
        assert isinstance(ts["config"], fw.TrainerConfigDataclass)
    assert ts["global_step"] == 5
    assert load(tmp_path / "data.pt")["_sampler_iter_state"]["samples_yielded"] == 6


def test_write_step_files_without_data(tmp_path):
    fw.write_step_files(tmp_path, global_step=1, with_data=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["trainer_state.pt"]


def test_cached_builds_once(monkeypatch, tmp_path):
    monkeypatch.setenv("CKPTCTL_TEST_CACHE", str(tmp_path))
    calls = []

    def build(d: Path):
        calls.append(d)
        (d / "x").write_text("1")

    a = fw.cached("thing", build)
    b = fw.cached("thing", build)
    assert a == b and len(calls) == 1 and (a / "x").read_text() == "1"
    assert a.parent.parent == tmp_path  # <cache>/<source-hash>/thing

    def broken(d: Path):
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError):
        fw.cached("broken", broken)
    assert not (a.parent / "broken").exists()


def test_argument_validation(tmp_path):
    with pytest.raises(ValueError):
        fw.write_fsdp_component(tmp_path / "p", layout="documented", world_size=2)
    with pytest.raises(ValueError):
        fw.write_fsdp_component(tmp_path / "p", mesh="hsdp", world_size=3)
    with pytest.raises(TypeError):
        fw.write_fsdp_component(tmp_path / "p", no_such_option=1)
