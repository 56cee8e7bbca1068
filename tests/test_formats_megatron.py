"""MegatronReader on REAL megatron-core torch_dist checkpoints (tests/realckpt/megatron_writer.py).

Every variant is written once per session by megatron-core's own ``dist_checkpointing.save``
(fixture ``megatron_ckpts``); the truth is the writer's ``checkpoint_tensors.safetensors``
(every checkpoint key -> its full global tensor).
"""

from __future__ import annotations

import json
import os
import pickle
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")

from ckptctl.errors import CkptctlError, NotFoundError  # noqa: E402
from ckptctl.formats import open_reader  # noqa: E402
from ckptctl.formats.base import MODEL, OPTIMIZER  # noqa: E402
from ckptctl.formats.megatron import METADATA_GLOBALS, MegatronReader  # noqa: E402
from ckptctl.formats.safe_load import CorruptCheckpointError, UnsafeCheckpointError  # noqa: E402
from ckptctl.storage import open_store  # noqa: E402
from realckpt.megatron_fixtures import MEGATRON_VARIANTS  # noqa: E402

VARIANTS = list(MEGATRON_VARIANTS)
L = "decoder.layers."


def reader_for(ckpt, url: str | None = None) -> MegatronReader:
    return MegatronReader(open_store(url or str(ckpt.out_dir)))


class CountingStore:
    """Wraps a Store's reads to record (what, rel, start, end, bytes) without changing them."""

    def __init__(self, store):
        self.calls: list[tuple] = []
        orig_range, orig_bytes = store.read_range, store.read_bytes

        def read_range(rel, start, end):
            data = orig_range(rel, start, end)
            self.calls.append(("range", rel, start, end, len(data)))
            return data

        def read_bytes(rel):
            data = orig_bytes(rel)
            self.calls.append(("whole", rel, None, None, len(data)))
            return data

        store.read_range, store.read_bytes = read_range, read_bytes

    def on(self, suffix: str) -> list[tuple]:
        return [c for c in self.calls if c[1].endswith(suffix)]


# ------------------------------------------------------------------------------------------
# metadata
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", VARIANTS)
def test_keys_shapes_dtypes_groups(megatron_ckpts, name):
    c = megatron_ckpts[name]
    infos = reader_for(c).tensor_infos()
    model_keys = c.info["model_keys"]
    optim_keys = c.info["optimizer_keys"]
    assert set(infos) == set(model_keys) | set(optim_keys)
    for k, v in model_keys.items():
        t = infos[k]
        assert (list(t.shape), t.dtype, t.group, t.layout) == (v["shape"], v["dtype"], MODEL, "dcp"), k
    for k, shape in optim_keys.items():
        t = infos[k]
        assert (list(t.shape), t.dtype, t.group) == (shape, "float32", OPTIMIZER), k
    assert not any("_extra_state" in k for k in infos)
    # the reference file holds exactly these keys with these shapes
    ref = c.reference_tensors()
    assert {k: tuple(v.shape) for k, v in ref.items()} == {k: t.shape for k, t in infos.items()}


def _chunks_per_layer(info):
    by_layer: dict[int, list] = {}
    for p in info.pieces:
        assert p.sizes[0] == 1
        by_layer.setdefault(p.offsets[0], []).append((p.offsets[1:], p.sizes[1:]))
    return by_layer


@pytest.mark.parametrize("name", VARIANTS)
def test_chunking_follows_tp_and_layers(megatron_ckpts, name):
    """Chunk counts per the writer's docs: per layer (stacked: leading layers axis), TP chunks on
    dim 0 (QKV, by whole query groups) or the last dim (linear_proj, linear_fc2), 2*TP for fc1
    (swiglu gate_r/up_r), one for replicated norms; the embedding TP chunks on vocab."""
    c = megatron_ckpts[name]
    p = c.params
    tp, n, h, f = p["tp"], p["num_layers"], p["hidden"], p["ffn"]
    qkv_rows = (p["heads"] + 2 * p["kv_heads"]) * (h // p["heads"])
    infos = reader_for(c).tensor_infos()
    expect = {
        "self_attention.linear_qkv.weight": sorted(((r * qkv_rows // tp, 0), (qkv_rows // tp, h)) for r in range(tp)),
        "self_attention.linear_proj.weight": sorted(((0, r * h // tp), (h, h // tp)) for r in range(tp)),
        "mlp.linear_fc2.weight": sorted(((0, r * f // tp), (h, f // tp)) for r in range(tp)),
        "mlp.linear_fc1.weight": sorted(((r * f // tp, 0), (f // tp, h)) for r in range(2 * tp)),
        "self_attention.linear_qkv.layer_norm_weight": [((0,), (h,))],
        "mlp.linear_fc1.layer_norm_weight": [((0,), (h,))],
    }
    for prefix in ("", "optimizer.state.exp_avg."):
        for sub, chunks in expect.items():
            if p["per_layer_keys"]:
                for i in range(n):
                    t = infos[f"{prefix}{L}{i}.{sub}"]
                    assert sorted((q.offsets, q.sizes) for q in t.pieces) == chunks, (t.name, t.pieces)
            else:
                t = infos[f"{prefix}{L}{sub}"]
                by_layer = _chunks_per_layer(t)
                assert sorted(by_layer) == list(range(n)), t.name
                assert all(sorted(v) == chunks for v in by_layer.values()), t.name
    vp = c.info["padded_vocab_size"]
    emb = infos["embedding.word_embeddings.weight"]
    assert sorted((q.offsets, q.sizes) for q in emb.pieces) == [((r * vp // tp, 0), (vp // tp, h)) for r in range(tp)]
    assert [(q.offsets, q.sizes) for q in infos["decoder.final_layernorm.weight"].pieces] == [((0,), (h,))]


@pytest.mark.parametrize("name", VARIANTS)
def test_pieces_point_into_the_distcp_files(megatron_ckpts, name):
    c = megatron_ckpts[name]
    reader = reader_for(c)
    prefix = "dist_ckpt/" if c.params["verl_nesting"] else ""
    assert reader.nesting == prefix.rstrip("/")
    sizes = {f"{prefix}{q.name}": q.stat().st_size for q in c.ckpt_dir.glob("*.distcp")}
    world = c.params["tp"] * c.params["pp"] * c.params["dp"]
    seen = set()
    for t in reader.tensors():
        for q in t.pieces:
            assert q.file in sizes and q.byte_offset + q.byte_length <= sizes[q.file]
            assert q.file.endswith(f"__{q.rank}_0.distcp") or q.file.endswith(f"__{q.rank}_1.distcp")
            seen.add(q.file)
    assert {int(Path(f).name.split("_")[2]) for f in seen} == set(range(world))
    objs = reader.objects()
    assert all(o.file in sizes for o in objs)
    assert {o.key for o in objs if "_extra_state" in o.key}  # the local layers' _extra_state entries


def test_metadata_needs_no_torch_and_is_fast(megatron_ckpts):
    """Listing parses .metadata with the allowlist alone: torch is never imported."""
    c = megatron_ckpts["tp2pp2"]
    code = (
        "import sys, time; t = time.perf_counter()\n"
        "from ckptctl.storage import open_store\n"
        "from ckptctl.formats.megatron import MegatronReader\n"
        f"r = MegatronReader(open_store({str(c.out_dir)!r}))\n"
        "n = sum(len(t.pieces) for t in r.tensors())\n"
        "print(n, 'torch' in sys.modules, time.perf_counter() - t)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         cwd=str(Path(__file__).resolve().parents[1]))
    chunks, torch_loaded, seconds = out.stdout.split()
    assert int(chunks) > 100
    assert torch_loaded == "False"
    assert float(seconds) < 1.0


def test_allowlist_is_data_only():
    """Every allowlisted global is a record class, a tuple/dict builder, a dtype name or a
    pass-through: nothing from torch is imported or called."""
    for qualname, obj in METADATA_GLOBALS.items():
        assert isinstance(obj, (str, type)) or getattr(obj, "__module__", "") == "ckptctl.formats.megatron", qualname
        if isinstance(obj, type):
            assert obj in (tuple, dict) or obj.__module__ == "ckptctl.formats.megatron", qualname


# ------------------------------------------------------------------------------------------
# tensor data
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", VARIANTS)
def test_read_every_tensor_bit_identical(megatron_ckpts, name):
    c = megatron_ckpts[name]
    reader = reader_for(c)
    ref = c.reference_tensors()
    for key, want in ref.items():
        got = reader.read_tensor(key)
        assert got.dtype == want.dtype and got.shape == want.shape, key
        assert torch.equal(got, want), key


@pytest.mark.parametrize("name", ["tp2pp2", "perlayer"])
def test_read_one_layer_of_a_stacked_tensor(megatron_ckpts, name):
    """read_tensor(key, index) reads only the chunks holding tensor[index] (layer streaming)."""
    c = megatron_ckpts[name]
    reader = reader_for(c)
    infos = reader.tensor_infos()
    ref = c.reference_tensors()
    for key in [k for k in ref if k in infos and len(infos[k].shape) >= 2]:
        for index in range(infos[key].shape[0]):
            assert torch.equal(reader.read_tensor(key, index), ref[key][index]), (key, index)
    with pytest.raises(CkptctlError):
        reader.read_tensor(next(iter(ref)), 10**6)


def _overlapping(info, offsets, sizes):
    """Every chunk of ``info`` overlapping block ``[offsets, offsets + sizes)``, in stored order (a
    pass over all of them: what the reader's index must find)."""
    return [p for p in info.pieces
            if all(max(po, o) < min(po + ps, o + s) for po, ps, o, s in zip(p.offsets, p.sizes, offsets, sizes))]


def _blocks(info):
    """Blocks of ``info`` that a reader asks for: each chunk, a chunk's middle reaching into its
    neighbours, each row along dim 0 (a layer, an expert), and the whole tensor."""
    shape = tuple(info.shape)
    yield (0,) * len(shape), shape
    for p in info.pieces:
        yield p.offsets, p.sizes
        lo = tuple(o + s // 2 for o, s in zip(p.offsets, p.sizes))
        yield lo, tuple(min(s, d - a) for s, d, a in zip(p.sizes, shape, lo))
    for row in range(shape[0] if shape else 0):
        yield (row, *(0,) * (len(shape) - 1)), (1, *shape[1:])


@pytest.mark.parametrize("kind,name", [("dense", n) for n in ("tp2pp2", "perlayer")]
                         + [("moe", n) for n in ("qwen3moe_tp2ep2", "dsv3_ep2")])
def test_the_chunks_of_a_block_are_found_without_a_pass_over_all(kind, name, megatron_ckpts, megatron_moe_ckpts):
    """The reader finds the chunks overlapping a block (read_region, its plan, a layer of a
    stacked tensor) from an index of where chunks start; it finds exactly those a pass over all
    of them finds, in the same order, for every tensor of real megatron-core checkpoints (routed
    experts chunked by layer, expert and TP rank included)."""
    c = (megatron_moe_ckpts if kind == "moe" else megatron_ckpts)[name]
    reader = reader_for(c)
    checked = 0
    for info in reader.tensor_infos().values():
        for offsets, sizes in _blocks(info):
            whole, partial = reader._region_pieces(info, tuple(offsets), tuple(sizes))
            found = [p for p, _, _ in whole + partial]
            assert sorted(found, key=info.pieces.index) == _overlapping(info, offsets, sizes), (info.name, offsets)
            checked += 1
        for row in range(info.shape[0] if info.shape else 0):
            want = [p for p in info.pieces if p.offsets[0] <= row < p.offsets[0] + p.sizes[0]]
            assert reader._pieces_of(info).at_index(row) == want, (info.name, row)
    assert checked > 100


def test_read_tensor_one_ranged_read_per_chunk(megatron_ckpts):
    c = megatron_ckpts["tp2pp2"]
    reader = reader_for(c)
    counting = CountingStore(reader.store)
    info = reader.tensor_infos()[L + "mlp.linear_fc1.weight"]
    assert len(info.pieces) == 4 * 4  # 4 layers x 2*TP
    reader.read_tensor(info.name)
    reads = counting.on(".distcp")
    assert len(reads) == len(info.pieces)
    assert all(k == "range" for k, *_ in reads)
    assert sorted((r[1], r[2], r[3]) for r in reads) == sorted(
        (q.file, q.byte_offset, q.byte_offset + q.byte_length) for q in info.pieces)


def test_read_sharded_rng_object(megatron_ckpts):
    c = megatron_ckpts["tiepp2_fp32opt"]
    reader = reader_for(c)
    names = sorted(o.name for o in reader.objects() if o.key == "rng_state")
    assert names == ["rng_state/shard_0.0_2.1", "rng_state/shard_1.0_2.1"]
    rng = reader.read_object(names[0])
    # the ShardedObject's data as saved: [[{"cpu", "numpy", "random"}]] (a list per PP x TP cell)
    state = rng[0][0]
    assert set(state) == {"cpu", "numpy", "random"}
    assert isinstance(state["cpu"], torch.Tensor) and state["numpy"][0] == "MT19937"


def test_unknown_tensor_name(megatron_ckpts):
    reader = reader_for(megatron_ckpts["tp2"])
    with pytest.raises(NotFoundError, match="no tensor named 'nope'"):
        reader.read_tensor("nope")


# ------------------------------------------------------------------------------------------
# summary
# ------------------------------------------------------------------------------------------

EXPECTED_LAYOUT = {  # name -> (tp, pp, dp, optimizer format, rng where)
    "tp2": (2, 1, 1, "fully_reshardable", "common.pt"),
    "tp2pp2": (2, 2, 1, "fully_reshardable", "common.pt"),
    "perlayer": (2, 1, 1, "fully_reshardable", "common.pt"),
    "qwen2_verl": (2, 1, 1, "fully_reshardable", "common.pt"),
    "tiepp2_fp32opt": (1, 2, 1, "non_distributed", "sharded objects"),
    "dp2_bf16": (1, 1, 2, "fully_reshardable", "common.pt"),
    "pp2dp2": (1, 2, 2, "fully_reshardable", "common.pt"),
}


@pytest.mark.parametrize("name", VARIANTS)
def test_summary(megatron_ckpts, name):
    c = megatron_ckpts[name]
    p = c.params
    s = reader_for(c).summary()
    json.dumps(s)  # plain data
    tp, pp, dp, opt_format, rng_where = EXPECTED_LAYOUT[name]
    assert s["problems"] == []
    assert s["metadata_json"]["sharded_backend"] == "torch_dist"
    assert s["nesting"] == ("dist_ckpt" if p["verl_nesting"] else "")
    par = s["parallel"]
    assert (par["tp"], par["pp"], par["dp"]) == (tp, pp, dp), par
    assert par["world_size_min"] == par["writer_ranks"] == tp * pp * dp
    assert par["swiglu_fc1_chunks"] == 2 * tp
    assert s["files"]["distcp"] == 2 * tp * pp * dp
    m = s["model"]
    assert m["layer_keys"] == ("per_layer" if p["per_layer_keys"] else "stacked")
    assert m["num_layers"] == p["num_layers"]
    assert (m["padded_vocab_size"], m["hidden_size"]) == (c.info["padded_vocab_size"], p["hidden"])
    assert m["tied_embeddings"] == p["tie_embeddings"]
    groups = s["tensors"]["by_group"]
    assert groups["model"]["tensors"] == len(c.info["model_keys"])
    assert groups["optimizer"]["tensors"] == len(c.info["optimizer_keys"])
    ref = c.reference_tensors()
    assert groups["model"]["params"] == sum(ref[k].numel() for k in c.info["model_keys"])
    assert groups["model"]["bytes"] == sum(ref[k].numel() * ref[k].element_size() for k in c.info["model_keys"])
    assert groups["model"]["dtypes"] == {p["params_dtype"]: len(c.info["model_keys"])}
    opt = s["optimizer"]
    assert opt["format"] == opt_format and opt["format_from_keys"] == opt_format
    assert opt["format_source"] == ("common.pt" if opt_format == "fully_reshardable" else "keys")
    assert opt["step"] == p["global_step"]
    assert [g["weight_decay"] for g in opt["param_groups"]] == [0.01, 0.0]
    assert s["lr_scheduler"]["num_steps"] == p["global_step"]
    assert s["lr_scheduler"]["lr_decay_style"] == "cosine"
    assert s["rng"]["present"] and s["rng"]["where"] == rng_where


def test_open_reader_dispatch_and_explicit_nesting(megatron_ckpts):
    c = megatron_ckpts["qwen2_verl"]
    with open_reader(open_store(str(c.out_dir)), "megatron") as reader:
        assert reader.nesting == "dist_ckpt"
        n = len(list(reader.tensors()))
    # pointed at dist_ckpt/ itself, or told the nesting, it reads the same
    assert len(MegatronReader(open_store(str(c.ckpt_dir))).tensor_infos()) == n
    assert len(MegatronReader(open_store(str(c.out_dir)), nesting="dist_ckpt").tensor_infos()) == n


# ------------------------------------------------------------------------------------------
# object stores: ranged reads only
# ------------------------------------------------------------------------------------------


def test_remote_component(megatron_ckpts, store_backend, request):
    """Metadata, every tensor and the summary through s3:// / gs:// (and local) via the Store."""
    c = megatron_ckpts["qwen2_verl"]  # verl nesting: the dist_ckpt/ probe goes over the wire too
    url = store_backend.new_root()
    store_backend.upload_dir(str(c.out_dir), url)
    counter = store_backend.counter
    if counter:
        counter.reset()
    reader = MegatronReader(open_store(url))
    infos = reader.tensor_infos()
    assert {k: (t.shape, t.dtype) for k, t in infos.items()} == {
        k: (t.shape, t.dtype) for k, t in reader_for(c).tensor_infos().items()}
    if counter:
        # .metadata at the top (404), then dist_ckpt/.metadata: no .distcp touched
        assert counter.count(path_contains=".distcp") == 0, counter.summary()
        assert counter.count() <= 3, counter.summary()
        counter.reset()
    ref = c.reference_tensors()
    key = "optimizer.state.exp_avg." + L + "mlp.linear_fc1.weight"
    got = reader.read_tensor(key)
    assert torch.equal(got, ref[key])
    if counter:
        gets = [r for r in counter.requests if ".distcp" in r.path]
        assert len(gets) == len(infos[key].pieces) and all(r.method == "GET" and r.status == 206 for r in gets), \
            counter.summary()
        counter.reset()
    for k, want in ref.items():
        assert torch.equal(reader.read_tensor(k), want), k
    if counter:
        assert counter.count(path_contains=".distcp") == sum(len(t.pieces) for t in infos.values())
        counter.reset()
    s = reader.summary()
    local = reader_for(c).summary()
    assert s["problems"] == [] and s["parallel"] == local["parallel"] and s["optimizer"] == local["optimizer"]
    assert s["lr_scheduler"] == local["lr_scheduler"] and s["tensors"] == local["tensors"]
    if counter:
        # metadata.json, common.pt, one listing (the .metadata is cached): a handful, no .distcp
        assert counter.count(path_contains=".distcp") == 0, counter.summary()
        assert counter.count() <= 5, counter.summary()


# ------------------------------------------------------------------------------------------
# broken checkpoints: clear errors naming the file
# ------------------------------------------------------------------------------------------


@pytest.fixture
def tp2_copy(megatron_ckpts, tmp_path) -> Path:
    dst = tmp_path / "policy"
    shutil.copytree(megatron_ckpts["tp2"].out_dir, dst)
    return dst


@pytest.mark.parametrize("damage", ["truncated", "garbage", "empty", "not_metadata"])
def test_corrupt_metadata(tp2_copy, damage):
    path = tp2_copy / ".metadata"
    data = path.read_bytes()
    path.write_bytes({"truncated": data[: len(data) // 2], "garbage": os.urandom(256), "empty": b"",
                      "not_metadata": pickle.dumps({"a": 1})}[damage])
    with pytest.raises(CorruptCheckpointError, match=r"\.metadata"):
        list(MegatronReader(open_store(str(tp2_copy))).tensors())


def test_malicious_metadata_is_refused_not_run(tp2_copy, tmp_path):
    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    (tp2_copy / ".metadata").write_bytes(pickle.dumps(Evil()))
    with pytest.raises(UnsafeCheckpointError, match=r"\.metadata.*system"):
        list(MegatronReader(open_store(str(tp2_copy))).tensors())
    assert not marker.exists()


def test_missing_metadata(tp2_copy):
    (tp2_copy / ".metadata").unlink()
    with pytest.raises(NotFoundError, match=r"\.metadata"):
        MegatronReader(open_store(str(tp2_copy))).tensor_infos()


def test_truncated_distcp_and_missing_metadata_json(tp2_copy):
    victim = tp2_copy / "__1_1.distcp"
    victim.write_bytes(victim.read_bytes()[:1000])
    (tp2_copy / "metadata.json").unlink()
    reader = MegatronReader(open_store(str(tp2_copy)))
    s = reader.summary()
    assert any("__1_1.distcp is truncated" in p for p in s["problems"]), s["problems"]
    assert any("metadata.json" in p for p in s["problems"])
    broken = next(t for t in reader.tensors() if any(p.file == "__1_1.distcp" and p.byte_offset > 1000
                                                      for p in t.pieces))
    with pytest.raises(CkptctlError, match="__1_1.distcp"):
        reader.read_tensor(broken.name)


_SUMMARY_CHILD = """
import json, sys
from ckptctl.storage import open_store
from ckptctl.formats.megatron import MegatronReader
print(json.dumps(MegatronReader(open_store(sys.argv[1]), extra_stand_ins=sys.argv[2:]).summary(), default=str))
"""


def test_common_pt_with_unknown_global(tp2_copy):
    """Megatron-LM's common.pt carries an argparse.Namespace: the summary reports the refusal
    (naming the global and --allow-global) and still gives every metadata fact; allowed as a
    stand-in, it loads as data. Run in a fresh interpreter: once anything imports megatron.core
    (test_realckpt_megatron.py does, at collection), torch's process-wide safe globals include
    argparse.Namespace and torch.load(weights_only=True) accepts it."""
    import argparse

    common = tp2_copy / "common.pt"
    state = torch.load(common, weights_only=False)  # our own fixture file
    state["args"] = argparse.Namespace(tensor_model_parallel_size=2)
    torch.save(state, common)

    def summary(*allow):
        out = subprocess.run([sys.executable, "-c", _SUMMARY_CHILD, str(tp2_copy), *allow], capture_output=True,
                             text=True, check=True, cwd=str(Path(__file__).resolve().parents[1]))
        return json.loads(out.stdout)

    s = summary()
    assert "argparse.Namespace" in s["common"]["error"] and "--allow-global" in s["common"]["error"]
    assert s["parallel"]["tp"] == 2 and s["optimizer"]["format"] == "fully_reshardable"
    s = summary("argparse.Namespace")
    assert s["problems"] == [] and "args" in s["common"]["keys"]
    assert s["lr_scheduler"]["num_steps"] == 1


def test_corrupt_chunk_blob(tp2_copy):
    reader = MegatronReader(open_store(str(tp2_copy)))
    info = reader.tensor_infos()["output_layer.weight"]
    piece = info.pieces[0]
    path = tp2_copy / piece.file
    data = bytearray(path.read_bytes())
    data[piece.byte_offset: piece.byte_offset + 64] = b"\0" * 64
    path.write_bytes(bytes(data))
    with pytest.raises(CorruptCheckpointError, match=piece.file):
        MegatronReader(open_store(str(tp2_copy))).read_tensor("output_layer.weight")
