"""ckptctl.formats.torchzip: torch.save files read metadata-first through a Store.

Oracle: ``torch.load(weights_only=True)`` (through safe_load.load_pt) of the same file; request
economy is counted with a Store wrapper (locally) and with the S3 server's request counter.
"""

from __future__ import annotations

import zipfile
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
from torch.distributed.tensor import DTensor  # noqa: E402

from ckptctl.formats import safe_load  # noqa: E402
from ckptctl.formats.safe_load import CorruptCheckpointError, load_pt  # noqa: E402
from ckptctl.formats.torchzip import TorchZipFile  # noqa: E402
from ckptctl.storage import Store  # noqa: E402


class CountingStore(Store):
    """A local Store that records every ranged read."""

    def __init__(self, url: str):
        super().__init__(url)
        self.reads: list[tuple[str, int, int]] = []

    def read_range(self, rel, start, end):
        self.reads.append((rel, start, end))
        return super().read_range(rel, start, end)

    @property
    def bytes_read(self) -> int:
        return sum(e - s for _, s, e in self.reads)


def open_zip(path: Path, **kw) -> TorchZipFile:
    return TorchZipFile(CountingStore(str(path.parent)), path.name, **kw)


def assert_same(zf: TorchZipFile, got, want, path="") -> int:
    """Structure equal; every tensor materialised from ``got`` equals ``want``. Returns the
    number of non-empty tensors."""
    n = 0
    if isinstance(want, dict):
        assert type(got) is type(want) and list(got) == list(want), path
        return sum(assert_same(zf, got[k], want[k], f"{path}.{k}") for k in want)
    if isinstance(want, (list, tuple)):
        assert type(got) is type(want) and len(got) == len(want), path
        return sum(assert_same(zf, g, w, f"{path}[{i}]") for i, (g, w) in enumerate(zip(got, want)))
    if safe_load.is_dtensor(want):
        assert safe_load.is_dtensor(got) and got.shape == want.shape and got.placements == want.placements, path
        assert got.device_mesh.mesh_dim_names == want.device_mesh.mesh_dim_names
        return assert_same(zf, got._local_tensor, want._local_tensor, path)
    if isinstance(want, safe_load.TensorStandIn):
        assert got.shape == want.shape and got.dtype == want.dtype
        return sum(assert_same(zf, g.fields["tensor"], w.fields["tensor"], path)
                   for g, w in zip(got.state[0], want.state[0]))
    if isinstance(want, torch.Tensor):
        assert got.device.type == "meta" and got.dtype == want.dtype and got.shape == want.shape, path
        real = zf.materialize(got)
        assert real.device.type == "cpu" and torch.equal(real, want), path
        return 1 if want.numel() else 0  # an empty tensor costs no read
    if isinstance(want, safe_load.PickledObject):
        assert type(got) is type(want)
        return n
    if hasattr(want, "__array__"):  # numpy RNG state
        assert (got == want).all()
        return n
    assert got == want, path
    return n


KINDS = ["model", "optim", "extra_state"]


def dtensor_pairs(ours, real, path=""):
    """(path, ours, torch's) for every DTensor position of two unpicklings of one file."""
    if isinstance(real, dict):
        assert isinstance(ours, dict) and list(ours) == list(real), path
        for k in real:
            yield from dtensor_pairs(ours[k], real[k], f"{path}.{k}")
    elif isinstance(real, (list, tuple)):
        for i, (a, b) in enumerate(zip(ours, real, strict=True)):
            yield from dtensor_pairs(a, b, f"{path}[{i}]")
    elif isinstance(real, DTensor):
        yield path, ours, real


@pytest.mark.parametrize("name", ["w3_tied", "hsdp", "critic_w3"])
def test_dtensors_kept_as_data_read_as_torch_reads_them(fsdp_ckpts, name):
    """ckptctl unpickles DTensors without torch.distributed.tensor (stand-ins kept as data, see
    safe_load.DTensorData): what it reads of each is what torch's own classes give for the same
    FSDP2 file (global shape, dtype, placements, mesh, the local shard), on a 1-D and a 2-D mesh."""
    comp = fsdp_ckpts[name]
    checked = 0
    for kind in ("model", "optim"):
        for rank in range(comp.meta["world_size"]):
            path = comp.file(kind, rank)
            ours = load_pt(str(path))
            real = torch.load(path, weights_only=True, map_location="cpu")  # torch's DTensor classes
            for where, a, b in dtensor_pairs(ours, real):
                assert safe_load.is_dtensor(a) and not isinstance(a, DTensor), where
                assert (a.shape, a.dtype, a.stride()) == (b.shape, b.dtype, b.stride()), where
                assert [repr(p) for p in a.placements] == [repr(p) for p in b.placements], where
                assert [str(p) for p in a.placements] == [str(p) for p in b.placements], where
                assert [safe_load.placement_kind(p) for p in a.placements] == \
                    [type(p).__name__ for p in b.placements]
                assert a.device_mesh == b.device_mesh and a.device_mesh.mesh_dim_names == b.device_mesh.mesh_dim_names
                assert torch.equal(a._local_tensor, b._local_tensor), where
                checked += 1
    assert checked >= comp.meta["world_size"] * 2


@pytest.mark.parametrize("name", ["w1", "w3_tied", "hsdp", "fsdp1", "fsdp1_sharded"])
def test_metadata_and_tensors_match_torch_load(fsdp_ckpts, name):
    comp = fsdp_ckpts[name]
    for kind in KINDS:
        for rank in range(comp.meta["world_size"]):
            path = comp.file(kind, rank)
            zf = open_zip(path, size=path.stat().st_size)
            obj = zf.metadata()
            meta_reads, meta_bytes = len(zf.store.reads), zf.store.bytes_read
            assert meta_reads <= 2 and zf.requests == meta_reads
            if kind != "extra_state":  # extra_state files are ~15 KB: read whole in one go
                assert meta_bytes < path.stat().st_size / 5, (path.name, meta_bytes)
            tensors = assert_same(zf, obj, load_pt(str(path)))
            assert len(zf.store.reads) == meta_reads + tensors  # one ranged read per tensor
            assert zf.bytes_fetched == zf.store.bytes_read


def test_documented_and_step_files(fsdp_ckpts, fsdp_tree):
    paths = [fsdp_ckpts["documented"].path / n for n in ("model_state.pt", "optimizer_state.pt",
                                                         "lr_scheduler_state.pt")]
    paths += [fsdp_tree / "global_step_2" / n for n in ("data.pt", "trainer_state.pt")]
    for path in paths:
        zf = open_zip(path)
        assert_same(zf, zf.metadata(), load_pt(str(path)))
    ts = open_zip(fsdp_tree / "global_step_2" / "trainer_state.pt").metadata()  # OmegaConf: stand-ins
    assert safe_load.to_plain(ts["config"])["trainer"]["strategy"] == "fsdp2"


def test_size_unknown_costs_one_head(fsdp_ckpts):
    path = fsdp_ckpts["w2"].file("model", 0)
    zf = open_zip(path)
    zf.metadata()
    assert len(zf.store.reads) == 2 and zf.size == path.stat().st_size


def test_storage_locations(fsdp_ckpts):
    """Recorded offsets are where the bytes are (torch's alignment), and the local header agrees."""
    path = fsdp_ckpts["w2"].file("model", 0)
    zf = open_zip(path)
    sd = zf.metadata()
    raw = path.read_bytes()
    with zipfile.ZipFile(path) as z:
        for key, rec in zf.storages.items():
            assert rec.data_offset % zf.alignment == 0
            assert raw[rec.data_offset:rec.data_offset + rec.nbytes] == z.read(rec.member)
    t = sd["model.norm.weight"]._local_tensor
    loc = zf.location(t)
    assert loc.nbytes == t.numel() * 4 and raw[loc.file_offset:loc.file_offset + loc.nbytes] == \
        load_pt(str(path))["model.norm.weight"].to_local().numpy().tobytes()


def test_views_and_shared_storage(tmp_path):
    base = torch.arange(24, dtype=torch.float64).reshape(4, 6)
    obj = {"base": base, "t": base.t(), "row": base[2], "col": base[:, 3], "tail": base.flatten()[17:],
           "empty": base[:0], "bf16": torch.randn(3, 5).to(torch.bfloat16), "int": torch.tensor([1, -2], dtype=torch.int64),
           "bool": torch.tensor([True, False]), "scalar": torch.tensor(2.5)}
    torch.save(obj, tmp_path / "v.pt")
    zf = open_zip(tmp_path / "v.pt")
    meta = zf.metadata()
    assert len(zf.storages) == 5  # the views share one storage
    assert zf.location(meta["tail"]).byte_start == 17 * 8 and zf.location(meta["tail"]).nbytes == 7 * 8
    assert_same(zf, meta, torch.load(tmp_path / "v.pt", weights_only=True))


def test_many_tensors_large_central_directory(tmp_path):
    sd = {f"layer.{i}.weight": torch.full((2,), float(i)) for i in range(1500)}
    torch.save(sd, tmp_path / "many.pt")
    zf = open_zip(tmp_path / "many.pt")
    meta = zf.metadata()
    assert len(meta) == 1500
    assert len(zf.store.reads) <= 4  # HEAD-free: tail, rest of the directory, data.pkl (+ small records)
    assert torch.equal(zf.materialize(meta["layer.1234.weight"]), sd["layer.1234.weight"])


def _rezip(src: Path, dst: Path, compression=zipfile.ZIP_STORED, edit=None) -> None:
    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(dst, "w", compression=compression) as zout:
        for info in zin.infolist():
            data = zin.read(info)
            if edit is not None:
                data = edit(info.filename, data)
                if data is None:
                    continue
            zout.writestr(info.filename, data)


def test_other_zip_layouts(tmp_path, fsdp_ckpts):
    """Unaligned (another zip writer) and compressed re-zips read correctly too."""
    src = fsdp_ckpts["w3_tied"].file("model", 1)
    want = load_pt(str(src))
    for compression in (zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED):
        dst = tmp_path / f"re{compression}.pt"
        _rezip(src, dst, compression)
        zf = open_zip(dst)
        assert_same(zf, zf.metadata(), want)


def test_big_endian_file(tmp_path):
    t = torch.arange(6, dtype=torch.float32) / 3
    torch.save({"t": t, "b": torch.tensor([1, 2], dtype=torch.uint8)}, tmp_path / "le.pt")

    def to_big(name, data):
        if name.endswith("/byteorder"):
            return b"big"
        if name.endswith("/data/0"):
            return t.numpy().byteswap().tobytes()
        return data

    _rezip(tmp_path / "le.pt", tmp_path / "be.pt", edit=to_big)
    zf = open_zip(tmp_path / "be.pt")
    meta = zf.metadata()
    assert zf.byteorder == "big"
    assert torch.equal(zf.materialize(meta["t"]), t) and torch.equal(zf.materialize(meta["b"]), torch.tensor([1, 2], dtype=torch.uint8))
    assert torch.equal(torch.load(tmp_path / "be.pt", weights_only=True)["t"], t)  # torch agrees


def test_legacy_format(tmp_path):
    obj = {"w": torch.randn(3, 4), "step": 7}
    torch.save(obj, tmp_path / "old.pt", _use_new_zipfile_serialization=False)
    zf = open_zip(tmp_path / "old.pt")
    meta = zf.metadata()
    assert zf.legacy and meta["step"] == 7 and torch.equal(zf.materialize(meta["w"]), obj["w"])


# ----------------------------------------------------------------------------- corrupt files

@pytest.fixture
def small_file(tmp_path) -> Path:
    path = tmp_path / "ckpt" / "model_world_size_1_rank_0.pt"
    path.parent.mkdir()
    torch.save({"a": torch.randn(64, 64), "b": torch.arange(10)}, path)
    return path


@pytest.mark.parametrize("how", ["half", "tail", "empty", "garbage", "one_byte"])
def test_truncated_or_garbage_is_corrupt(small_file, how):
    raw = small_file.read_bytes()
    small_file.write_bytes({"half": raw[:len(raw) // 2], "tail": raw[:-10], "empty": b"",
                            "garbage": bytes(range(256)) * 40, "one_byte": b"P"}[how])
    with pytest.raises(CorruptCheckpointError, match="model_world_size_1_rank_0.pt"):
        open_zip(small_file).metadata()


def test_corrupt_pickle_is_corrupt(small_file):
    raw = bytearray(small_file.read_bytes())
    with zipfile.ZipFile(small_file) as z:
        info = z.getinfo(next(n for n in z.namelist() if n.endswith("data.pkl")))
    start = info.header_offset + 30 + len(info.filename) + 100
    raw[start:start + 20] = b"\xff" * 20
    small_file.write_bytes(bytes(raw))
    with pytest.raises(CorruptCheckpointError, match="model_world_size_1_rank_0.pt"):
        open_zip(small_file).metadata()


def test_corrupt_storage_bytes(small_file):
    zf = open_zip(small_file)
    meta = zf.metadata()
    rec = zf.storages[zf.location(meta["a"]).storage.key]
    raw = bytearray(small_file.read_bytes())
    raw[rec.data_offset + 5] ^= 0xFF
    small_file.write_bytes(bytes(raw))
    zf = open_zip(small_file)
    meta = zf.metadata()
    with pytest.raises(CorruptCheckpointError, match="CRC mismatch"):
        zf.materialize(meta["a"])
    with pytest.raises(CorruptCheckpointError, match="CRC mismatch"):  # a record found corrupt stays so
        zf.materialize(meta["a"][1:])
    zf = open_zip(small_file)  # a partial read checks the whole record too
    with pytest.raises(CorruptCheckpointError, match="CRC mismatch"):
        zf.materialize(zf.metadata()["a"][1:])


def test_missing_storage_record(small_file, tmp_path):
    dst = tmp_path / "missing.pt"
    _rezip(small_file, dst, edit=lambda name, data: None if name.endswith("/data/1") else data)
    with pytest.raises(CorruptCheckpointError, match=r"missing\.pt.*missing record data/1"):
        open_zip(dst).metadata()


def test_not_a_tensor_of_this_file(small_file):
    zf = open_zip(small_file)
    zf.metadata()
    with pytest.raises(ValueError):
        zf.location(torch.empty(3, device="meta"))


# ----------------------------------------------------------------------------- object stores

def test_s3_ranged_reads(fsdp_ckpts, make_backend, s3_request_counter):
    backend = make_backend("s3")
    comp = fsdp_ckpts["w2"]
    root = backend.new_root()
    path = comp.file("optim", 1)
    backend.upload_dir(str(comp.path), root)
    s3_request_counter.reset()
    zf = TorchZipFile(Store(root), path.name)
    osd = zf.metadata()
    assert [r.method for r in s3_request_counter.requests] == ["HEAD", "GET", "GET"], s3_request_counter.summary()
    assert zf.bytes_fetched < path.stat().st_size / 10
    s3_request_counter.reset()
    exp_avg = zf.materialize(osd["state"][0]["exp_avg"]._local_tensor)
    assert s3_request_counter.count(method="GET") == 1
    assert torch.equal(exp_avg, load_pt(str(path))["state"][0]["exp_avg"].to_local())
