"""FsdpReader on real FSDP checkpoints (tests/realckpt/fsdp_fixtures.py), locally, on S3 and on GCS.

Oracles: the writer's reference data (``reference_meta.json``: shapes, placements, mesh, local
shapes per rank; ``reference_full_state.safetensors`` / ``reference_full_optim.safetensors``:
the gathered tensors), and torch itself (rank files loaded with ``weights_only=True``).
"""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
from safetensors.torch import load_file  # noqa: E402

from ckptctl.errors import NotFoundError  # noqa: E402
from ckptctl.formats import open_reader  # noqa: E402
from ckptctl.formats.fsdp import FsdpReader  # noqa: E402
from ckptctl.formats.safe_load import CorruptCheckpointError, UnsafeCheckpointError, load_pt  # noqa: E402
from ckptctl.storage import Store  # noqa: E402
from realckpt.fsdp_fixtures import FSDP_VARIANTS, TREE_STEPS  # noqa: E402

ALL = list(FSDP_VARIANTS)
SHARDED = [n for n, kw in FSDP_VARIANTS.items() if kw["world_size"] > 1]
WITH_OPTIM_REF = [n for n, kw in FSDP_VARIANTS.items() if kw.get("strategy", "fsdp2") == "fsdp2"]


def reference(comp) -> dict:
    return load_file(str(comp.reference_dir / "reference_full_state.safetensors"))


def reference_optim(comp) -> dict:
    return load_file(str(comp.reference_dir / "reference_full_optim.safetensors"))


@pytest.fixture(scope="session")
def readers(fsdp_ckpts):
    """One reader per variant (metadata is cached in the reader: tests share it)."""
    return {name: FsdpReader(Store(str(comp.path))) for name, comp in fsdp_ckpts.items()}


# ----------------------------------------------------------------------------- metadata

@pytest.mark.parametrize("name", ALL)
def test_model_metadata_matches_reference(fsdp_ckpts, readers, name):
    comp, reader = fsdp_ckpts[name], readers[name]
    meta = comp.meta
    infos = reader.tensor_infos()
    model = {k: v for k, v in infos.items() if v.group == "model"}
    assert list(model) == meta["state_keys"]  # state-dict order kept
    w = meta["world_size"]
    fsdp_size = meta["fsdp_size"]
    buffers = set(meta["buffer_keys"])
    for key, info in model.items():
        assert list(info.shape) == meta["global_shapes"][key], key
        assert info.dtype == "float32"
        if key in buffers:
            assert info.layout == ("plain" if not meta["sharded"] else "replicated"), key
            assert [p.rank for p in info.pieces] == [0] and info.pieces[0].sizes == info.shape
            continue
        if not meta["sharded"]:
            assert info.layout == "plain" and info.placements == () and info.mesh_shape == ()
        elif meta["fsdp1_tensor"] == "sharded_tensor" and meta["strategy"] == "fsdp":
            assert info.layout == "sharded_tensor"
            assert info.placements in (("ChunkShardingSpec(dim=0)",), ("EnumerableShardingSpec",))
        else:
            assert info.layout == "dtensor"
            assert list(info.placements) == meta["placements"]
            assert list(info.mesh_shape) == meta["mesh_shape"]
            assert list(info.mesh_dim_names) == meta["mesh_dim_names"]
        # pieces: one replica, torch.chunk along dim 0, empty shards left out
        local = meta["local_shapes"][key]
        expected = [(r, local[r]) for r in range(min(w, fsdp_size)) if local[r][0] > 0]
        assert [(p.rank, list(p.sizes)) for p in info.pieces] == expected, key
        row = 0
        for p in info.pieces:
            assert p.offsets == (row,) + (0,) * (len(info.shape) - 1)
            assert p.file == comp.file("model", p.rank).name if meta["layout"] == "skyrl" else "model_state.pt"
            row += p.sizes[0]
        assert row == info.shape[0]
        assert sum(math.prod(p.sizes) for p in info.pieces) == info.numel
        first = info.pieces[0]
        assert first.rank == 0 and first.byte_offset is not None  # rank 0: known from its metadata
        assert first.byte_length == math.prod(first.sizes) * 4
    for key, ranks in meta["empty_shards"].items():  # e.g. value_head.weight [1, 64] at W=3
        assert all(r not in [p.rank for p in model[key].pieces] for r in ranks)


def test_tensors_reads_rank_zero_only(fsdp_ckpts):
    comp = fsdp_ckpts["w3_tied"]
    reader = FsdpReader(Store(str(comp.path)))
    list(reader.tensors())
    assert set(reader._zips) == {"model_world_size_3_rank_0.pt", "optim_world_size_3_rank_0.pt"}
    size = sum(p.stat().st_size for p in comp.path.glob("*_rank_0.pt"))
    assert reader.requests <= 4 and reader.bytes_fetched < size / 5, (reader.requests, reader.bytes_fetched, size)


def test_piece_byte_offsets_point_at_the_data(fsdp_ckpts, readers):
    comp, reader = fsdp_ckpts["w2"], readers["w2"]
    ref = reference(comp)
    for info in reader.tensors():
        if info.group != "model":
            continue
        p = info.pieces[0]
        with open(comp.path / p.file, "rb") as f:
            f.seek(p.byte_offset)
            raw = bytearray(f.read(p.byte_length))
        index = tuple(slice(o, o + s) for o, s in zip(p.offsets, p.sizes))
        assert torch.equal(torch.frombuffer(raw, dtype=torch.float32).view(p.sizes), ref[info.name][index])


@pytest.mark.parametrize("name", WITH_OPTIM_REF)
def test_optimizer_metadata(fsdp_ckpts, readers, name):
    comp, reader = fsdp_ckpts[name], readers[name]
    meta = comp.meta
    optim = {k: v for k, v in reader.tensor_infos().items() if v.group == "optimizer"}
    # LoRA: peft freezes the base weights, so only the adapter's parameters have AdamW state
    trained = meta["trainable_param_names"] if meta.get("lora") else meta["param_names"]
    expected = {f"optimizer.state.{p}.{k}" for p in trained for k in ("exp_avg", "exp_avg_sq", "step")}
    assert set(optim) == expected
    for pname in trained:
        step = optim[f"optimizer.state.{pname}.step"]
        assert step.shape == () and step.layout == ("replicated" if meta["sharded"] and meta["world_size"] > 1
                                                    else "plain")
        for key in ("exp_avg", "exp_avg_sq"):
            info = optim[f"optimizer.state.{pname}.{key}"]
            assert list(info.shape) == meta["global_shapes"][pname]
            if meta["sharded"]:
                assert info.layout == "dtensor" and list(info.placements) == meta["placements"]
                assert info.pieces[0].file.startswith("optim_world_size_")
    if meta["tie"]:  # a tied lm_head is not a separate parameter
        assert not any("lm_head" in k for k in optim)


# ----------------------------------------------------------------------------- tensor data

@pytest.mark.parametrize("name", ALL)
def test_every_model_tensor_is_bit_identical(fsdp_ckpts, readers, name):
    comp, reader = fsdp_ckpts[name], readers[name]
    ref = reference(comp)
    infos = [i for i in reader.tensors() if i.group == "model"]
    assert {i.name for i in infos} == set(ref)
    for info in infos:
        t = reader.read_tensor(info.name)
        assert t.dtype == ref[info.name].dtype and t.shape == ref[info.name].shape
        assert torch.equal(t, ref[info.name]), info.name


@pytest.mark.parametrize("name", WITH_OPTIM_REF)
def test_every_optimizer_tensor_is_bit_identical(fsdp_ckpts, readers, name):
    comp, reader = fsdp_ckpts[name], readers[name]
    ref = reference_optim(comp)
    infos = [i for i in reader.tensors() if i.group == "optimizer"]
    assert {i.name.removeprefix("optimizer.state.") for i in infos} == set(ref)
    for info in infos:
        expected = ref[info.name.removeprefix("optimizer.state.")]
        t = reader.read_tensor(info.name)
        assert torch.equal(t, expected.reshape(t.shape)), info.name


@pytest.mark.parametrize("name", ["fsdp1", "fsdp1_sharded"])
def test_fsdp1_flat_optimizer_shards(fsdp_ckpts, readers, name):
    """FSDP1 optimizer state is per flat parameter (FSDP unit), 1-D per rank: concatenated."""
    comp, reader = fsdp_ckpts[name], readers[name]
    w = comp.meta["world_size"]
    osds = [load_pt(str(comp.file("optim", r))) for r in range(w)]
    infos = {i.name: i for i in reader.tensors() if i.group == "optimizer"}
    assert set(infos) == {f"optimizer.state.{i}.{k}" for i in osds[0]["state"] for k in ("exp_avg", "exp_avg_sq", "step")}
    for i in osds[0]["state"]:
        for key in ("exp_avg", "exp_avg_sq"):
            info = infos[f"optimizer.state.{i}.{key}"]
            assert info.layout == "flat_shards" and [p.rank for p in info.pieces] == list(range(w))
            assert torch.equal(reader.read_tensor(info.name), torch.cat([o["state"][i][key] for o in osds]))
        assert reader.read_tensor(f"optimizer.state.{i}.step").item() == 1.0
    s = reader.summary()["optimizer"]
    assert s["param_mapping"] == "flat_params" and s["num_params"] == len(osds[0]["state"])


def test_hsdp_reads_one_replica_and_other_replica_agrees(fsdp_ckpts, readers):
    comp, reader = fsdp_ckpts["hsdp"], readers["hsdp"]
    info = reader.tensor_infos()["model.embed_tokens.weight"]
    assert [p.rank for p in info.pieces] == [0, 1]
    assert info.mesh_shape == (2, 2) and info.mesh_dim_names == ("ddp", "fsdp")
    sd2, sd3 = (load_pt(str(comp.file("model", r))) for r in (2, 3))
    full = reader.read_tensor("model.embed_tokens.weight")
    assert torch.equal(full, torch.cat([sd2["model.embed_tokens.weight"].to_local(),
                                        sd3["model.embed_tokens.weight"].to_local()]))


def test_tied_weights(fsdp_ckpts, readers):
    reader = readers["w3_tied"]
    s = reader.summary()
    assert s["model"]["tied"] == {"lm_head.weight": "model.embed_tokens.weight"}
    assert torch.equal(reader.read_tensor("lm_head.weight"), reader.read_tensor("model.embed_tokens.weight"))
    assert s["optimizer"]["num_params"] == len(fsdp_ckpts["w3_tied"].meta["param_names"]) == 26


# ----------------------------------------------------------------------------- summary

@pytest.mark.parametrize("name", ALL)
def test_summary(fsdp_ckpts, readers, name):
    comp, reader = fsdp_ckpts[name], readers[name]
    meta = comp.meta
    s = reader.summary()
    json.dumps(s)  # plain data
    assert s["world_size"] == meta["world_size"]
    assert s["backend"] == ("fsdp-single-file" if meta["layout"] == "documented" else "fsdp")
    assert s["strategy"] == meta["strategy"]
    if meta["config_variant"] == "verl":
        assert s["fsdp_config"] == {"FSDP_version": 2, "world_size": meta["world_size"]}
    elif meta["config_variant"] == "none":
        assert s["fsdp_config"] is None
    else:
        assert s["fsdp_config"] == {"fsdp_strategy": meta["strategy"], "world_size": meta["world_size"]}
    if meta["placements"]:  # DTensors (a ShardedTensor run has no mesh in its files)
        assert s["mesh"] == {"shape": meta["mesh_shape"], "dim_names": meta["mesh_dim_names"]}
        assert s["placements"] == sorted(meta["placements"])
    else:
        assert s["mesh"] is None
    ref = reference(comp)
    m = s["model"]
    assert m["tensors"] == len(ref) and m["dtypes"] == {"float32": len(ref)}
    assert m["parameters"] == len(meta["param_names"])
    assert m["parameter_numel"] == sum(ref[p].numel() for p in meta["param_names"])
    assert m["parameter_bytes"] == 4 * m["parameter_numel"]
    assert sorted(m["buffers"]) == sorted(meta["buffer_keys"])
    o = s["optimizer"]
    assert o["present"] and o["kind"] == "AdamW" and o["step"] == meta["num_steps"]
    assert o["state_keys"] == ["exp_avg", "exp_avg_sq", "step"]
    (group,) = o["param_groups"]
    assert group["lr"] == pytest.approx(meta["lr"]) and group["betas"] == [0.9, 0.999]
    assert group["weight_decay"] == 0.01 and group["eps"] == 1e-8
    lr = s["lr_scheduler"]
    assert lr["last_epoch"] == meta["num_steps"] and lr["base_lrs"] == [meta["lr"]] and lr["last_lr"] == [meta["lr"]]
    if meta["layout"] == "documented":
        assert s["rng"] is None and s["files"] == {"model": ["model_state.pt"], "optim": ["optimizer_state.pt"],
                                                   "extra_state": ["lr_scheduler_state.pt"]}
    else:
        assert s["rng"] == {"cpu": True, "numpy": True, "random": True, "cuda": True}
        assert len(s["files"]["model"]) == meta["world_size"]
        if meta["extra_variant"] == "skyrl":
            assert s["extra_state"]["fsdp_strategy"] == meta["strategy"] and s["extra_state"]["rank"] == 0


def test_open_reader_dispatch(fsdp_ckpts):
    documented = open_reader(Store(str(fsdp_ckpts["documented"].path)), "fsdp-single-file")
    assert documented.single_file and documented.summary()["backend"] == "fsdp-single-file"
    auto = open_reader(Store(str(fsdp_ckpts["documented"].path)), "fsdp")  # no rank files: single-file layout
    assert auto.summary()["backend"] == "fsdp-single-file"
    assert isinstance(open_reader(Store(str(fsdp_ckpts["w2"].path)), "fsdp"), FsdpReader)


def test_tree_components(fsdp_tree):
    ref_root = Path(str(fsdp_tree) + ".reference")
    for n in TREE_STEPS:
        for comp in ("policy", "critic"):
            reader = FsdpReader(Store(str(fsdp_tree / f"global_step_{n}" / comp)))
            ref = load_file(str(ref_root / f"global_step_{n}" / comp / "reference_full_state.safetensors"))
            ref_opt = load_file(str(ref_root / f"global_step_{n}" / comp / "reference_full_optim.safetensors"))
            s = reader.summary()
            assert s["lr_scheduler"]["last_epoch"] == n and s["optimizer"]["step"] == n
            for key, value in ref.items():
                assert torch.equal(reader.read_tensor(key), value)
            key = next(iter(ref_opt))
            assert torch.equal(reader.read_tensor(f"optimizer.state.{key}"), ref_opt[key].reshape(()) if
                               ref_opt[key].dim() == 0 else ref_opt[key])
            assert ("value_head.weight" in ref) == (comp == "critic")


# ----------------------------------------------------------------------------- errors

def _copy(comp, tmp_path) -> Path:
    dst = tmp_path / "policy"
    shutil.copytree(comp.path, dst)
    return dst


def test_missing_rank_file(fsdp_ckpts, tmp_path):
    d = _copy(fsdp_ckpts["w3_tied"], tmp_path)
    (d / "model_world_size_3_rank_2.pt").unlink()
    reader = FsdpReader(Store(str(d)))
    assert "model.norm.weight" in reader.tensor_infos()  # rank 0 alone gives the metadata
    with pytest.raises(CorruptCheckpointError, match="missing model_world_size_3_rank_2.pt"):
        reader.read_tensor("model.norm.weight")
    assert reader.read_tensor("model.rotary_emb.inv_freq").shape == (8,)  # rank 0's copy


@pytest.mark.parametrize("name", ["w1", "w2"])
def test_model_only(fsdp_ckpts, tmp_path, name):
    """Optimizer (and extra-state) files dropped: model tensors and a summary without them."""
    comp = fsdp_ckpts[name]
    d = _copy(comp, tmp_path)
    for p in [*d.glob("optim_*.pt"), *d.glob("extra_state_*.pt")]:
        p.unlink()
    reader = FsdpReader(Store(str(d)))
    infos = reader.tensor_infos()
    assert all(i.group == "model" for i in infos.values()) and len(infos) == len(comp.meta["state_keys"])
    s = reader.summary()
    assert s["optimizer"] == {"present": False} and s["lr_scheduler"] is None and s["rng"] is None
    assert s["model"]["parameters"] == len(comp.meta["param_names"])  # W=1: buffers told by name
    assert sorted(s["model"]["buffers"]) == sorted(comp.meta["buffer_keys"])
    ref = reference(comp)
    assert torch.equal(reader.read_tensor("lm_head.weight"), ref["lm_head.weight"])


def test_no_model_files(tmp_path):
    (tmp_path / "policy").mkdir()
    (tmp_path / "policy" / "fsdp_config.json").write_text('{"world_size": 2}')
    with pytest.raises(NotFoundError, match="no FSDP model files"):
        list(FsdpReader(Store(str(tmp_path / "policy"))).tensors())


def test_truncated_rank_zero(fsdp_ckpts, tmp_path):
    d = _copy(fsdp_ckpts["w2"], tmp_path)
    f = d / "model_world_size_2_rank_0.pt"
    f.write_bytes(f.read_bytes()[:5000])
    with pytest.raises(CorruptCheckpointError, match="model_world_size_2_rank_0.pt"):
        list(FsdpReader(Store(str(d))).tensors())


def test_unsafe_rank_file_is_refused_and_runs_nothing(fsdp_ckpts, tmp_path):
    import os

    d = _copy(fsdp_ckpts["w2"], tmp_path)
    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    import torch.distributed.tensor  # noqa: F401  (torch's own DTensor classes, to save them again)

    osd = torch.load(d / "optim_world_size_2_rank_1.pt", weights_only=True)
    osd["state"][0]["evil"] = Evil()
    torch.save(osd, d / "optim_world_size_2_rank_1.pt")
    reader = FsdpReader(Store(str(d)))
    list(reader.tensors())  # rank 0 is fine
    with pytest.raises(UnsafeCheckpointError, match=r"posix\.system|os\.system") as info:
        reader.read_tensor("optimizer.state.model.embed_tokens.weight.exp_avg")
    assert "optim_world_size_2_rank_1.pt" in str(info.value)
    assert not marker.exists()


# ----------------------------------------------------------------------------- object stores

@pytest.mark.parametrize("name", ["critic_w3", "hsdp"])
def test_remote(fsdp_ckpts, store_backend, name):
    """Upload the component, read it back through the Store only: same metadata and tensors."""
    comp = fsdp_ckpts[name]
    url = store_backend.join(store_backend.new_root(), "policy")
    store_backend.upload_dir(str(comp.path), url)
    counter = store_backend.counter
    if counter is not None:
        counter.reset()
    reader = FsdpReader(Store(url))
    infos = reader.tensor_infos()
    if counter is not None:  # metadata: 1 listing + fsdp_config.json + 2 ranged reads per rank-0 file
        gets = counter.count(method="GET")
        assert gets <= 6 and counter.count(method="HEAD") == 0, counter.summary()
        rank0 = sum(p.stat().st_size for p in comp.path.glob("*_rank_0.pt") if not p.name.startswith("extra"))
        assert reader.bytes_fetched < rank0 / 5
    local = FsdpReader(Store(str(comp.path))).tensor_infos()
    assert [i.to_dict() for i in infos.values()] == [i.to_dict() for i in local.values()]
    assert [i.pieces for i in infos.values()] == [i.pieces for i in local.values()]
    ref = reference(comp)
    ref_opt = reference_optim(comp)
    if counter is not None:
        counter.reset()
    reader.read_tensor("model.embed_tokens.weight")
    if counter is not None:  # metadata of the other shard-holding ranks once, then 1 GET per piece
        pieces = len(infos["model.embed_tokens.weight"].pieces)
        assert counter.count(method="GET") == 2 * (pieces - 1) + pieces, counter.summary()
        counter.reset()
        reader.read_tensor("model.norm.weight")
        assert counter.count(method="GET") == len(infos["model.norm.weight"].pieces), counter.summary()
    for key, value in ref.items():
        assert torch.equal(reader.read_tensor(key), value), key
    for key, value in ref_opt.items():
        assert torch.equal(reader.read_tensor(f"optimizer.state.{key}").reshape(value.shape), value), key
    s = reader.summary()
    assert s["world_size"] == comp.meta["world_size"] and s["optimizer"]["step"] == 1
    assert s["rng"]["numpy"] is True
