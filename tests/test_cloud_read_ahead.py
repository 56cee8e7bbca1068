"""The read-ahead of export-hf's Megatron sources and of convert-reshard (issue #11): the ranged
reads of a source on an object store are planned from its metadata in the order the operation
makes them and fetched ahead (:class:`ckptctl.storage.ReadAhead`), so that almost every read is
served from memory; the output is the local run's, byte for byte, at any budget.

Real parts only: checkpoints written by megatron-core and torch FSDP2, moto's S3 server. Each
test spies on the read-aheads made (a plan in the wrong order would leave reads unserved) and on
the reads that went to the store while one was active.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from cli_runner import run

torch = pytest.importorskip("torch")

MIB = 2**20


#: Files that differ between two identical runs: the run's marker names its source; a DCP
#: ``.metadata`` records the output's URL and a fresh save id (the index it holds is compared).
RUN_FILES = ("ckptctl-output.json", ".metadata")


def read_local(root: Path) -> dict[str, bytes]:
    """Every file below ``root`` but :data:`RUN_FILES`."""
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*"))
            if p.is_file() and p.name not in RUN_FILES}


def same_index(a: str | Path, b: str | Path) -> bool:
    """Whether two Megatron outputs' ``.metadata`` hold the same index (tensors, chunks and
    their byte ranges, objects)."""
    from ckptctl.formats.megatron import MegatronReader
    from ckptctl.storage import open_store

    ra, rb = MegatronReader(open_store(str(a))), MegatronReader(open_store(str(b)))
    return ra.tensor_infos() == rb.tensor_infos() and ra.objects() == rb.objects()


@pytest.fixture(autouse=True)
def _offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("TRANSFORMERS_OFFLINE", "1")


@pytest.fixture
def read_aheads(monkeypatch):
    """The read-aheads made (``made``) and the reads served by the store itself while one was
    active (``direct``: (file, start, end))."""
    from ckptctl import storage

    made, direct = [], []
    init, read_range = storage.ReadAhead.__init__, storage.Store.read_range

    def spy_init(self, *args, **kwargs):
        init(self, *args, **kwargs)
        made.append(self)

    def spy_read(self, rel, start, end):
        data = read_range(self, rel, start, end)
        if self.read_ahead is not None and not isinstance(data, memoryview):
            direct.append((rel, start, end))
        return data

    monkeypatch.setattr(storage.ReadAhead, "__init__", spy_init)
    monkeypatch.setattr(storage.Store, "read_range", spy_read)
    return type("Spy", (), {"made": made, "direct": direct})


@pytest.fixture(params=["tiny", "default"])
def budget(request, monkeypatch) -> list[str]:
    """The read-ahead's options: ``tiny`` (1 MiB, requests of 16 KiB: many buffers, most of the
    plan waiting for the budget) or the defaults."""
    if request.param == "default":
        return []
    from ckptctl import storage

    monkeypatch.setattr(storage, "READ_REQUEST_SIZE", 16 * 1024)
    monkeypatch.setattr(storage, "COALESCE_GAP", 4096)
    return ["--concurrency", "3", "--max-memory", "1MiB"]


def served_from_read_ahead(spy, count: int = 1) -> None:
    """``count`` read-aheads were made; every read they planned was served from them, and (almost)
    nothing else was read while they were active (a CRC check finishing a record read in parts
    reads the bytes no part covered: a few small reads), within the budget."""
    assert len(spy.made) == count, len(spy.made)
    for ra in spy.made:
        assert ra._reads and ra.served >= len(ra._reads), (ra.served, len(ra._reads))
        assert ra.peak_held <= ra.budget + max(u.size for u in ra._units)
    served = sum(ra.served for ra in spy.made)
    assert len(spy.direct) * 10 <= served, (len(spy.direct), served, spy.direct[:5])


# ------------------------------------------------------------------------------------------
# export-hf of a Megatron component
# ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["tp2pp2", "qwen3moe_tp2ep2"])
def test_megatron_export_from_s3_is_read_ahead(name, megatron_ckpts, megatron_moe_ckpts, make_backend, tmp_path,
                                               read_aheads, budget):
    """Stacked layers read layer by layer across TP x PP chunks, and (MoE) experts read one by
    one as regions of their chunks: the plan follows the conversion's order."""
    ck = (megatron_moe_ckpts if "moe" in name else megatron_ckpts)[name]
    local = tmp_path / "local"
    code, stdout, stderr = run("export-hf", ck.out_dir, "--out", local, "--max-shard-size", "300KB")
    assert code == 0, (stdout, stderr)
    backend = make_backend("s3")
    src = backend.new_root() + "/policy"
    backend.upload_dir(str(ck.out_dir), src)
    read_aheads.made.clear()
    cloud = tmp_path / "cloud"
    code, stdout, stderr = run("export-hf", src, "--out", cloud, "--max-shard-size", "300KB", *budget)
    assert code == 0, (stdout, stderr)
    assert read_local(cloud) == read_local(local)
    served_from_read_ahead(read_aheads)


def test_megatron_planned_reads_name_the_chunks_read(megatron_moe_ckpts):
    """``planned_reads`` of a layer, a whole tensor and a region (one expert of one layer) name
    the byte ranges of the chunks holding them, in order; unknown names are left out."""
    from ckptctl.formats.megatron import MegatronReader
    from ckptctl.storage import open_store

    reader = MegatronReader(open_store(str(megatron_moe_ckpts["qwen3moe_tp2ep2"].out_dir)))
    infos = reader.tensor_infos()

    def holding(name: str, index: tuple[int, ...]) -> list[tuple[str, int, int]]:
        return [(p.file, p.byte_offset, p.byte_offset + p.byte_length) for p in infos[name].pieces
                if all(o <= i < o + s for i, o, s in zip(index, p.offsets, p.sizes))]

    fc1 = next(n for n in infos if n.endswith("experts.experts.linear_fc1.weight"))
    qkv = next(n for n in infos if n.endswith("linear_qkv.weight"))
    shape = infos[fc1].shape  # [layers, experts, rows, cols]
    block = ((1, 3, 0, 0), (1, 1, shape[2], shape[3]))
    assert reader.planned_reads([(fc1, *block)]) == holding(fc1, (1, 3)) != holding(fc1, (1, 2))
    assert reader.planned_reads([(qkv, 1)]) == holding(qkv, (1,)) != holding(qkv, (0,))
    whole = reader.planned_reads([qkv])
    assert whole == reader.planned_reads([(qkv, None)]) == reader.planned_reads(["no.such.tensor", qkv])
    assert len(whole) == len(infos[qkv].pieces)
    assert reader.planned_reads([(qkv, 1), (fc1, *block)]) == holding(qkv, (1,)) + holding(fc1, (1, 3))


def test_tensor_bytes_read_ahead_are_used_in_place(fsdp_ckpts, make_backend):
    """A tensor read from a read-ahead gets a view of the bytes fetched, never a copy of them
    (the copy cost a pass over every byte a cloud export or reshard reads); the tensor is right."""
    from ckptctl.formats.safe_load import load_pt
    from ckptctl.formats.torchzip import TorchZipFile
    from ckptctl.storage import ReadAhead, open_store

    source = fsdp_ckpts["w3_tied"].file("model", 1)
    backend = make_backend("s3")
    root = backend.new_root()
    backend.upload_dir(str(source.parent), root)
    store = open_store(root)
    zf = TorchZipFile(store, source.name)
    tensors = {k: v for k, v in zf.metadata().items() if hasattr(v, "_local_tensor") and v._local_tensor.numel()}
    name, meta = next(iter(tensors.items()))
    loc = zf.location(meta._local_tensor)
    record = loc.storage
    store.read_ahead = ReadAhead(store, [(source.name, *zf.planned_read(meta._local_tensor))], budget=MIB,
                                 concurrency=2)
    try:
        data = zf.read_storage_bytes(record.key, 0, record.record_size, tensor=name)
        assert store.read_ahead.served == 1
        assert isinstance(data, memoryview) and any(data.obj is unit.buffer for unit in store.read_ahead._units)
    finally:
        store.read_ahead.close()
        store.read_ahead = None
    assert zf.crc_checked(record.key)
    want = load_pt(str(source))[name].to_local()
    got = torch.frombuffer(bytearray(data), dtype=want.dtype).as_strided(loc.shape, loc.stride, loc.storage_offset)
    assert torch.equal(got, want)


# ------------------------------------------------------------------------------------------
# convert-reshard
# ------------------------------------------------------------------------------------------
RESHARDS = {
    "megatron-tp2pp2-to-tp1": ("megatron", "tp2pp2", ["--tp", "1", "--pp", "1"]),
    "megatron-moe-ep2-to-dp2ep2-tp1": ("moe", "qwen3moe_tp2ep2", ["--tp", "1", "--pp", "1", "--dp", "2",
                                                                 "--ep", "2"]),
    "fsdp-w3-to-w2": ("fsdp", "w3_tied", ["--world-size", "2"]),
    "fsdp-w3-to-w7": ("fsdp", "w3_tied", ["--world-size", "7"]),  # a source shard split between target ranks
}


def _reshard_source(kind: str, name: str, megatron_ckpts, megatron_moe_ckpts, fsdp_ckpts) -> Path:
    if kind == "fsdp":
        return fsdp_ckpts[name].path
    return (megatron_moe_ckpts if kind == "moe" else megatron_ckpts)[name].out_dir


def _local_reshard(case: str, megatron_ckpts, megatron_moe_ckpts, fsdp_ckpts, tmp_path: Path):
    """(kind, source, target options, the local -> local reshard's output): the reference."""
    kind, name, target = RESHARDS[case]
    source = _reshard_source(kind, name, megatron_ckpts, megatron_moe_ckpts, fsdp_ckpts)
    local = tmp_path / "local"
    code, stdout, stderr = run("convert-reshard", source, "--out", local, *target)
    assert code == 0, (stdout, stderr)
    return kind, source, target, local


def _reshard_from_s3(source: Path, target: list[str], budget: list[str], make_backend, tmp_path: Path) -> Path:
    """``source`` uploaded to the S3 server and resharded from there to local disk (``tmp_path/cloud``)."""
    backend = make_backend("s3")
    src = backend.new_root() + "/policy"
    backend.upload_dir(str(source), src)
    cloud = tmp_path / "cloud"
    code, stdout, stderr = run("convert-reshard", src, "--out", cloud, *target, *budget)
    assert code == 0, (stdout, stderr)
    return cloud


@pytest.mark.parametrize("case", list(RESHARDS))
def test_reshard_from_s3_is_read_ahead(case, megatron_ckpts, megatron_moe_ckpts, fsdp_ckpts, make_backend, tmp_path,
                                       read_aheads, budget):
    kind, source, target, local = _local_reshard(case, megatron_ckpts, megatron_moe_ckpts, fsdp_ckpts, tmp_path)
    cloud = _reshard_from_s3(source, target, budget, make_backend, tmp_path)
    assert read_local(cloud) == read_local(local)
    assert kind == "fsdp" or same_index(cloud, local)
    served_from_read_ahead(read_aheads)


#: Megatron sources whose optimizer state is mapped back to parameters (DistributedOptimizer
#: buffers, megatron-core's N-D flattened pieces), resharded to a new TP: their reads are the
#: bulk of a real checkpoint's bytes (fp32 param and two moments per bf16 weight).
DISTOPT_RESHARDS = {
    "dp_reshardable-tp2-to-tp1": ("dense_tp2dp2", "dp_reshardable", ["--tp", "1", "--dp", "2"]),
    "dp_reshardable-moe-tp2ep2-to-tp1dp4ep2": ("moe_tp2ep2dp2", "dp_reshardable", ["--tp", "1", "--dp", "4",
                                                                                   "--ep", "2"]),
    "fully_sharded_model_space-tp2-to-tp1": ("dense_tp2dp2", "fsms", ["--tp", "1", "--dp", "2"]),
}


@pytest.mark.parametrize("budget", ["tiny"], indirect=True)  # the default budget: as the model's reads above
@pytest.mark.parametrize("case", list(DISTOPT_RESHARDS))
def test_reshard_of_mapped_optimizer_state_is_read_ahead(case, distopt_ckpts, make_backend, tmp_path, read_aheads,
                                                         budget):
    layout, fmt, target = DISTOPT_RESHARDS[case]
    if fmt == "fsms":  # committed: megatron-core 0.16 cannot write it
        source = Path(__file__).resolve().parent / f"fixtures/distopt_fsms/{layout}/tree/global_step_2/policy"
    else:
        source = distopt_ckpts[f"{layout}_{fmt}"] / "checkpoint"
    local = tmp_path / "local"
    code, stdout, stderr = run("convert-reshard", source, "--out", local, *target)
    assert code == 0, (stdout, stderr)
    cloud = _reshard_from_s3(source, target, budget, make_backend, tmp_path)
    assert read_local(cloud) == read_local(local) and same_index(cloud, local)
    planned = {rel for ra in read_aheads.made for rel, *_ in ra._reads}
    assert planned and all(rel.endswith(".distcp") for rel in planned)
    served_from_read_ahead(read_aheads)


@pytest.mark.parametrize("case", ["megatron-tp2pp2-to-tp1", "fsdp-w3-to-w7"])
def test_reshard_to_s3_uploads_in_the_background(case, megatron_ckpts, megatron_moe_ckpts, fsdp_ckpts, make_backend,
                                                 tmp_path):
    """Local -> S3 and S3 -> S3 (rank files uploading while the next is written, the budget
    split between reads and uploads): the files are the local run's."""
    kind, source, target, local = _local_reshard(case, megatron_ckpts, megatron_moe_ckpts, fsdp_ckpts, tmp_path)
    backend = make_backend("s3")
    root = backend.new_root()
    backend.upload_dir(str(source), f"{root}/src/policy")
    expected = read_local(local)
    for i, src in enumerate((source, f"{root}/src/policy")):
        out = f"{root}/out{i}"
        code, stdout, stderr = run("convert-reshard", src, "--out", out, *target, "--concurrency", "4",
                                   "--max-memory", "2MiB")
        assert code == 0, (src, stdout, stderr)
        got = {rel: backend.get(f"{out}/{rel}") for rel in backend.list_files(out) if rel not in RUN_FILES}
        assert got == expected, src
        assert kind == "fsdp" or same_index(out, local)


@pytest.mark.parametrize("options", [["--concurrency", "0"], ["--concurrency", "65"], ["--max-memory", "lots"],
                                     ["--max-memory", "10KB"]])
def test_reshard_bad_transfer_options(options, tmp_path):
    code, stdout, stderr = run("convert-reshard", str(tmp_path / "nothing"), "--out", str(tmp_path / "o"),
                               "--world-size", "2", *options)
    assert code == 2, (stdout, stderr)
    assert len(stderr.strip().splitlines()) == 1 and "Traceback" not in stderr and options[0] in stderr, stderr
    assert not (tmp_path / "o").exists()
