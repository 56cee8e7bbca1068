"""HfReader on REAL ``save_pretrained`` exports (fixture ``hf_export``): header-only metadata,
one ranged read per tensor, index consistency, corrupt headers."""

from __future__ import annotations

import json
import shutil
import struct
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
from safetensors import safe_open  # noqa: E402

from ckptctl.errors import NotFoundError  # noqa: E402
from ckptctl.formats import open_reader  # noqa: E402
from ckptctl.formats.hf import HEADER_PREFETCH, LOCAL_HEADER_PREFETCH, HfReader, read_safetensors_header  # noqa: E402
from ckptctl.formats.safe_load import CorruptCheckpointError  # noqa: E402
from ckptctl.storage import open_store  # noqa: E402

EXPORTS = ["single", "single_bf16", "sharded", "sharded_bf16"]


class ByteCounter:
    """Records every read a Store makes (kind, rel, bytes returned)."""

    def __init__(self, store):
        self.reads: list[tuple[str, str, int]] = []
        orig_range, orig_bytes = store.read_range, store.read_bytes

        def read_range(rel, start, end):
            data = orig_range(rel, start, end)
            self.reads.append(("range", rel, len(data)))
            return data

        def read_bytes(rel):
            data = orig_bytes(rel)
            self.reads.append(("whole", rel, len(data)))
            return data

        store.read_range, store.read_bytes = read_range, read_bytes

    def bytes_from(self, suffix: str) -> int:
        return sum(n for _, rel, n in self.reads if rel.endswith(suffix))


def _truth(path: Path) -> dict:
    """name -> (shape, dtype, tensor) straight from safetensors' own reader."""
    out = {}
    for f in sorted(path.glob("*.safetensors")):
        with safe_open(str(f), "pt") as sf:
            for k in sf.keys():
                t = sf.get_tensor(k)
                out[k] = (tuple(t.shape), str(t.dtype).removeprefix("torch."), t, f.name)
    return out


def _header_len(path: Path) -> int:
    with open(path, "rb") as f:
        return struct.unpack("<Q", f.read(8))[0]


@pytest.mark.parametrize("name", EXPORTS)
def test_metadata_from_headers_only(hf_export, name):
    exp = hf_export[name]
    # a prefetch window well under these tiny shards (the bucket default, 256 KiB, is larger than them)
    prefetch = 8 * 1024
    reader = HfReader(open_store(str(exp.path)), header_prefetch=prefetch)
    counter = ByteCounter(reader.store)
    infos = reader.tensor_infos()
    truth = _truth(exp.path)
    assert {k: (t.shape, t.dtype) for k, t in infos.items()} == {k: v[:2] for k, v in truth.items()}
    assert all(t.layout == "safetensors" and len(t.pieces) == 1 for t in infos.values())
    assert {t.pieces[0].file for t in infos.values()} == {v[3] for v in truth.values()}
    shards = sorted(exp.path.glob("*.safetensors"))
    assert len(shards) > 1 if exp.sharded else [s.name for s in shards] == ["model.safetensors"]
    total = sum(s.stat().st_size for s in shards)
    read = counter.bytes_from(".safetensors")
    # one ranged read per shard, at most the prefetch window: far below the file sizes
    ranges = [r for r in counter.reads if r[1].endswith(".safetensors")]
    assert len(ranges) == len(shards) and all(kind == "range" for kind, *_ in ranges)
    assert read <= len(shards) * (8 + prefetch) and read < total / 5, (read, total)


def test_local_headers_use_the_small_prefetch(hf_export):
    """On disk a second read is cheap: the default prefetch is 16 KiB there, not the bucket's 256."""
    exp = hf_export["sharded"]
    reader = HfReader(open_store(str(exp.path)))
    counter = ByteCounter(reader.store)
    reader.tensor_infos()
    ranges = [r for r in counter.reads if r[1].endswith(".safetensors")]
    assert ranges and all(kind == "range" for kind, *_ in ranges)
    assert counter.bytes_from(".safetensors") <= len(ranges) * (8 + LOCAL_HEADER_PREFETCH)
    assert LOCAL_HEADER_PREFETCH < HEADER_PREFETCH


def test_exact_header_bytes_without_prefetch(hf_export):
    """header_prefetch=0: exactly 8 + N bytes per shard (two small reads each)."""
    exp = hf_export["sharded"]
    reader = HfReader(open_store(str(exp.path)), header_prefetch=0)
    counter = ByteCounter(reader.store)
    reader.tensor_infos()
    shards = sorted(exp.path.glob("*.safetensors"))
    assert counter.bytes_from(".safetensors") == sum(8 + _header_len(s) for s in shards)
    assert reader.bytes_read_for_headers == counter.bytes_from(".safetensors")


@pytest.mark.parametrize("name", EXPORTS)
def test_read_tensor_equals_safe_open(hf_export, name):
    exp = hf_export[name]
    reader = HfReader(open_store(str(exp.path)))
    reader.tensor_infos()  # headers first: then each tensor is exactly one ranged read
    counter = ByteCounter(reader.store)
    truth = _truth(exp.path)
    for k, (shape, dtype, want, _) in truth.items():
        before = len(counter.reads)
        got = reader.read_tensor(k)
        assert got.dtype == want.dtype and tuple(got.shape) == shape, k
        assert torch.equal(got, want), k
        new = counter.reads[before:]
        assert [(kind, n) for kind, _, n in new] == [("range", want.numel() * want.element_size())]
    assert {str(t.dtype).removeprefix("torch.") for *_, t, _ in truth.values()} == {exp.dtype}


@pytest.mark.parametrize("name", EXPORTS)
def test_summary(hf_export, name):
    exp = hf_export[name]
    s = HfReader(open_store(str(exp.path))).summary()
    json.dumps(s)
    config = json.loads((exp.path / "config.json").read_text())
    assert s["problems"] == []
    assert s["config"]["architectures"] == config["architectures"]
    for k in ("model_type", "num_hidden_layers", "hidden_size", "vocab_size", "dtype"):
        assert s["config"][k] == config[k]
    assert s["config"]["dtype"] == exp.dtype
    shards = sorted(exp.path.glob("*.safetensors"))
    assert s["sharded"] == exp.sharded and s["shards"] == len(shards)
    assert s["total_bytes"] == sum(f.stat().st_size for f in shards)
    truth = _truth(exp.path)
    assert s["tensors"] == len(truth)
    assert s["parameters"] == sum(v[2].numel() for v in truth.values())
    assert s["tensor_bytes"] == sum(v[2].numel() * v[2].element_size() for v in truth.values())
    assert s["dtypes"] == {exp.dtype: len(truth)}
    if exp.sharded:
        assert s["index_total_size"] == s["tensor_bytes"]


def test_read_safetensors_header_helper(hf_export):
    exp = hf_export["single_bf16"]
    out = read_safetensors_header(open_store(str(exp.path)), "model.safetensors")
    json.dumps(out)
    assert out["header_bytes"] == _header_len(exp.path / "model.safetensors")
    assert out["metadata"] == {"format": "pt"}
    assert out["dtypes"] == {"bfloat16": out["tensor_count"]}
    assert out["data_bytes"] == (exp.path / "model.safetensors").stat().st_size - 8 - out["header_bytes"]


# ------------------------------------------------------------------------------------------
# index consistency and broken files
# ------------------------------------------------------------------------------------------


@pytest.fixture
def sharded_copy(hf_export, tmp_path) -> Path:
    dst = tmp_path / "export"
    shutil.copytree(hf_export["sharded"].path, dst)
    return dst


def test_index_inconsistencies_are_reported(sharded_copy):
    index_path = sharded_copy / "model.safetensors.index.json"
    index = json.loads(index_path.read_text())
    wm = index["weight_map"]
    per_shard: dict[str, list[str]] = {}
    for k, f in wm.items():
        per_shard.setdefault(f, []).append(k)
    crowded = next(f for f, names in sorted(per_shard.items()) if len(names) > 1)
    dropped = sorted(per_shard[crowded])[0]  # its shard stays in the index
    del wm[dropped]
    alone = next((f for f, names in sorted(per_shard.items()) if len(names) == 1), None)
    if alone is not None:  # a shard no index entry names any more
        del wm[per_shard[alone][0]]
    wm["model.ghost.weight"] = crowded
    index_path.write_text(json.dumps(index))
    s = HfReader(open_store(str(sharded_copy))).summary()
    text = "\n".join(s["problems"])
    assert "model.ghost.weight" in text and "missing from their shard" in text
    assert dropped in text and "not in model.safetensors.index.json" in text
    if alone is not None:
        assert f"not named in model.safetensors.index.json (loaders ignore them): {alone}" in text


def test_missing_shard_and_fsdp_prefix(sharded_copy):
    shards = sorted(sharded_copy.glob("model-*.safetensors"))
    shards[-1].unlink()
    config = json.loads((sharded_copy / "config.json").read_text())
    config["architectures"] = ["FSDPQwen2ForCausalLM"]
    (sharded_copy / "config.json").write_text(json.dumps(config))
    s = HfReader(open_store(str(sharded_copy))).summary()
    text = "\n".join(s["problems"])
    assert f"shard {shards[-1].name} named in model.safetensors.index.json is missing" in text
    assert "FSDP" in text


@pytest.mark.parametrize("damage", ["truncated_header", "bad_json", "huge_length", "tiny", "bad_offsets"])
def test_corrupt_header(hf_export, tmp_path, damage):
    src = hf_export["single"].path / "model.safetensors"
    dst = tmp_path / "export"
    dst.mkdir()
    data = src.read_bytes()
    n = struct.unpack("<Q", data[:8])[0]
    header = json.loads(data[8:8 + n])
    if damage == "truncated_header":
        bad = data[: 8 + n // 2]
    elif damage == "bad_json":
        bad = data[:8] + b"{" + b"x" * (n - 1) + data[8 + n:]
    elif damage == "huge_length":
        bad = struct.pack("<Q", 1 << 40) + data[8:]
    elif damage == "tiny":
        bad = data[:5]
    else:
        name = next(k for k in header if k != "__metadata__")
        header[name]["data_offsets"][1] += 4
        raw = json.dumps(header).encode()
        bad = struct.pack("<Q", len(raw)) + raw + data[8 + n:]
    (dst / "model.safetensors").write_bytes(bad)
    with pytest.raises(CorruptCheckpointError, match="model.safetensors"):
        HfReader(open_store(str(dst))).tensor_infos()


def test_truncated_data_section(hf_export, tmp_path):
    src = hf_export["single"].path
    dst = tmp_path / "export"
    shutil.copytree(src, dst)
    f = dst / "model.safetensors"
    f.write_bytes(f.read_bytes()[:-1000])
    reader = HfReader(open_store(str(dst)))
    s = reader.summary()
    assert any("model.safetensors is truncated" in p for p in s["problems"])
    last = max(reader.tensors(), key=lambda t: t.pieces[0].byte_offset)
    with pytest.raises(CorruptCheckpointError, match="model.safetensors.*truncated"):
        reader.read_tensor(last.name)


def test_no_weights(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(NotFoundError, match="no safetensors weights"):
        HfReader(open_store(str(tmp_path))).tensor_infos()


# ------------------------------------------------------------------------------------------
# object stores
# ------------------------------------------------------------------------------------------


def test_remote_export(hf_export, store_backend):
    exp = hf_export["sharded_bf16"]
    url = store_backend.new_root()
    store_backend.upload_dir(str(exp.path), url)
    counter = store_backend.counter
    if counter:
        counter.reset()
    with open_reader(open_store(url), "hf") as reader:
        infos = reader.tensor_infos()
        shards = reader.shard_files()
        if counter:
            # the index, then one ranged GET per shard header
            assert counter.count() == 1 + len(shards), counter.summary()
            assert all(r.status == 206 for r in counter.requests if ".safetensors?" in r.path + "?"
                       and r.path.endswith(".safetensors")), counter.summary()
            counter.reset()
        truth = _truth(exp.path)
        assert {k: (t.shape, t.dtype) for k, t in infos.items()} == {k: v[:2] for k, v in truth.items()}
        for k, (_, _, want, _) in truth.items():
            assert torch.equal(reader.read_tensor(k), want), k
        if counter:
            assert counter.count() == len(truth), counter.summary()
            counter.reset()
        s = reader.summary()
        assert s["problems"] == [] and s["shards"] == len(shards) == 3
        if counter:
            assert counter.count() <= 2, counter.summary()  # config.json + one listing
