"""export-hf's transfer machinery on object stores (issue #11): concurrent read-ahead of ranged
GETs within a memory budget, concurrent / background shard uploads, and their options.

Real servers only (moto's S3 server, the GCS emulator). Whatever the concurrency and however
small the memory budget, the output is byte-identical to the local export's (and to the one
with ``--concurrency 1``, today's one-tensor-ahead path), and the budget holds.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from cli_runner import run

torch = pytest.importorskip("torch")

SHARD = "300KB"
MIB = 2**20


def read_tree(backend, url: str) -> dict[str, bytes]:
    if backend.kind == "local":
        root = Path(url)
        return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}
    return {rel: backend.get(f"{url}/{rel}") for rel in backend.list_files(url)}


@pytest.fixture(autouse=True)
def _offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("TRANSFORMERS_OFFLINE", "1")


@pytest.fixture(scope="module")
def local_reference(fsdp_ckpts, tmp_path_factory) -> dict[str, bytes]:
    out = tmp_path_factory.mktemp("ref") / "hf"
    code, stdout, stderr = run("export-hf", fsdp_ckpts["w3_tied"].path, "--out", out, "--max-shard-size", SHARD)
    assert code == 0, (stdout, stderr)
    return read_tree(type("L", (), {"kind": "local"})(), str(out))


@pytest.fixture
def small_requests(monkeypatch):
    """Read-ahead requests of 16 KiB coalesced up to 16 KiB: the tiny fixture then has many
    buffers, large records split into several requests, and neighbours coalesced."""
    from ckptctl import storage

    monkeypatch.setattr(storage, "READ_REQUEST_SIZE", 16 * 1024)
    monkeypatch.setattr(storage, "COALESCE_GAP", 4096)


@pytest.mark.parametrize("kind", ["s3", "gs"])
def test_cloud_export_identical_at_any_concurrency(kind, make_backend, fsdp_ckpts, local_reference,
                                                   small_requests):
    backend = make_backend(kind)
    root = backend.new_root()
    src = f"{root}/global_step_1/policy"
    backend.upload_dir(str(fsdp_ckpts["w3_tied"].path), src)
    for i, options in enumerate((["--concurrency", "1"], [], ["--concurrency", "5", "--max-memory", "1MiB"])):
        out = f"{root}/out{i}"
        code, stdout, stderr = run("export-hf", src, "--out", out, "--max-shard-size", SHARD, *options)
        assert code == 0, (options, stdout, stderr)
        assert read_tree(backend, out) == local_reference, options
    # local -> object store and object store -> object store with concurrent uploads
    out = f"{root}/from_local"
    code, stdout, stderr = run("export-hf", fsdp_ckpts["w3_tied"].path, "--out", out, "--max-shard-size", SHARD,
                               "--concurrency", "4", "--max-memory", "1MiB")
    assert code == 0, (stdout, stderr)
    assert read_tree(backend, out) == local_reference


def test_cloud_to_local_tiny_budget(make_backend, fsdp_ckpts, local_reference, small_requests, tmp_path,
                                    monkeypatch):
    from ckptctl import storage

    made = []
    init = storage.ReadAhead.__init__

    def spy(self, *args, **kwargs):
        init(self, *args, **kwargs)
        made.append(self)

    monkeypatch.setattr(storage.ReadAhead, "__init__", spy)
    backend = make_backend("s3")
    src = backend.new_root() + "/policy"
    backend.upload_dir(str(fsdp_ckpts["w3_tied"].path), src)
    out = tmp_path / "hf"
    code, stdout, stderr = run("export-hf", src, "--out", out, "--max-shard-size", SHARD,
                               "--concurrency", "3", "--max-memory", "1MiB")
    assert code == 0, (stdout, stderr)
    assert read_tree(type("L", (), {"kind": "local"})(), str(out)) == local_reference
    (ra,) = made
    # every tensor read came from the read-ahead, within the budget plus one buffer
    assert ra.served >= len(ra._reads) - 1 and ra.requests > len(ra._units), (ra.served, len(ra._reads))
    assert ra.budget == MIB and ra.peak_held <= MIB + 16 * 1024


@pytest.mark.parametrize("options", [
    ["--concurrency", "0"], ["--concurrency", "65"], ["--concurrency", "-3"],
    ["--max-memory", "0"], ["--max-memory", "lots"], ["--max-memory", "10KB"], ["--max-memory", "-1GiB"],
])
def test_bad_transfer_options(options, tmp_path):
    code, stdout, stderr = run("export-hf", str(tmp_path / "nothing"), "--out", str(tmp_path / "o"), *options)
    assert code == 2, (stdout, stderr)
    assert len(stderr.strip().splitlines()) == 1 and "Traceback" not in stderr, stderr
    assert options[0] in stderr
    assert not (tmp_path / "o").exists()


def test_bad_transfer_options_with_steps_are_refused_before_any_step(tmp_path):
    code, _, stderr = run("export-hf", str(tmp_path), "--out", str(tmp_path / "o"), "--steps", "all",
                          "--concurrency", "0")
    assert code == 2 and len(stderr.strip().splitlines()) == 1 and "--concurrency" in stderr, stderr
    assert not (tmp_path / "o").exists()


# ------------------------------------------------------------------------------------------
# the read-ahead itself
# ------------------------------------------------------------------------------------------
def test_read_ahead_budget_order_and_fallthrough(make_backend):
    from ckptctl.storage import ReadAhead, open_store

    backend = make_backend("s3")
    root = backend.new_root()
    data = {f"f{i}": bytes((i * 7 + j) % 251 for j in range(300_000)) for i in range(3)}
    for name, blob in data.items():
        backend.put(f"{root}/{name}", blob)
    store = open_store(root)
    # per file: records of 20 KB with 1 KB gaps (coalesced up to 64 KB), one of 150 KB (split)
    plan = []
    for start in range(0, 120_000, 21_000):
        for name in data:
            plan.append((name, start, start + 20_000))
    for name in data:
        plan.append((name, 130_000, 280_000))
    ra = ReadAhead(store, plan, budget=100_000, concurrency=4, request_size=64_000, gap=2_000)
    store.read_ahead = ra
    try:
        for i, (name, start, end) in enumerate(plan):
            if i == 4:  # a planned read never made: skipped, released when the reader passes it
                continue
            # a header-like read inside the range, then the range itself
            assert bytes(store.read_range(name, start, start + 30)) == data[name][start:start + 30]
            got = store.read_range(name, start, end)
            assert bytes(got) == data[name][start:end]
            assert isinstance(got, memoryview)
            assert ra.held <= ra.budget + 150_000
        # not planned: read from the store, as bytes
        assert store.read_range("f0", 290_000, 300_000) == data["f0"][290_000:300_000]
        # planned earlier (behind the position): read again from the store
        assert store.read_range("f1", 0, 100) == data["f1"][:100]
    finally:
        store.read_ahead = None
        ra.close()
    assert ra.served >= len(plan)
    assert ra.peak_held <= ra.budget + 150_000  # the budget plus one buffer at most
    assert ra.held == 0


def test_read_ahead_error_reaches_the_reader(make_backend):
    from ckptctl.errors import NotFoundError
    from ckptctl.storage import ReadAhead, open_store

    backend = make_backend("s3")
    root = backend.new_root()
    backend.put(f"{root}/a", b"x" * 1000)
    store = open_store(root)
    ra = ReadAhead(store, [("a", 0, 1000), ("missing", 0, 1000)], budget=10_000, concurrency=2)
    store.read_ahead = ra
    try:
        assert bytes(store.read_range("a", 0, 1000)) == b"x" * 1000
        with pytest.raises(NotFoundError):
            store.read_range("missing", 0, 1000)
    finally:
        store.read_ahead = None
        ra.close()


def test_read_ahead_requests_grow_with_the_budget(make_backend):
    """Requests as large as the budget allows twice ``concurrency`` of them, from 1 MiB to
    64 MiB: a 6 MiB record is one request under the defaults, six under a 4 MiB budget."""
    from ckptctl.storage import DEFAULT_CONCURRENCY, ReadAhead, default_max_memory, open_store, read_request_size

    assert read_request_size(2**30, DEFAULT_CONCURRENCY) == 64 * MIB
    assert read_request_size(256 * MIB, DEFAULT_CONCURRENCY) == 16 * MIB
    assert read_request_size(MIB, 4) == MIB
    backend = make_backend("s3")
    root = backend.new_root()
    blob = os.urandom(6 * MIB)
    backend.put(f"{root}/a", blob)
    store = open_store(root)
    for budget, concurrency, requests in [(default_max_memory(), DEFAULT_CONCURRENCY, 1), (4 * MIB, 2, 6)]:
        ra = ReadAhead(store, [("a", 0, len(blob))], budget=budget, concurrency=concurrency)
        store.read_ahead = ra
        try:
            assert bytes(store.read_range("a", 0, len(blob))) == blob
            assert (ra.requests, ra.served) == (requests, 1), (budget, ra.requests)
        finally:
            store.read_ahead = None
            ra.close()


# ------------------------------------------------------------------------------------------
# concurrent uploads (library: shards larger than one part)
# ------------------------------------------------------------------------------------------
def _big_state() -> dict:
    g = torch.Generator().manual_seed(11)
    return {f"w.{i}": torch.randn(MIB, generator=g) for i in range(6)}  # 24 MiB, shards of 12 MiB


def _write(url: str, concurrency: int, memory: int | None, fail_at: int | None = None):
    from ckptctl.formats.hf_writer import HfModelWriter, specs_from_state_dict

    state = _big_state()
    with HfModelWriter(url, specs_from_state_dict(state), max_shard_size=12 * MIB, upload_block_size=5 * MIB,
                       upload_concurrency=concurrency, upload_memory=memory) as writer:
        for i, (name, tensor) in enumerate(state.items()):
            if i == fail_at:
                raise RuntimeError("boom")
            writer.add(name, tensor)
        return writer.finish({"architectures": ["Dummy"], "model_type": "dummy"})


@pytest.mark.parametrize("kind", ["s3", "gs"])
def test_concurrent_uploads_identical_and_bounded(kind, make_backend, tmp_path):
    backend = make_backend(kind)
    _write(str(tmp_path / "ref"), 1, None)
    want = read_tree(type("L", (), {"kind": "local"})(), str(tmp_path / "ref"))
    url = backend.new_root()
    summary = _write(url, 4, 10 * MIB)
    assert read_tree(backend, url) == want
    # the budget, plus the part being filled of each open shard (one here)
    assert 0 < summary.peak_buffered_bytes <= 10 * MIB + 5 * MIB


def test_s3_parts_held_are_those_worth_holding(make_backend):
    """However much memory is allowed, an S3 upload holds the parts uploading plus as many ready
    for the next free slot: more would not make it faster, only hold memory."""
    from ckptctl.formats.hf_writer import HfModelWriter, s3_upload_limit, specs_from_state_dict

    assert s3_upload_limit(2**30, 2, 5 * MIB) == 20 * MIB and s3_upload_limit(8 * MIB, 2, 5 * MIB) == 8 * MIB
    assert s3_upload_limit(None, 8, 16 * MIB) == 256 * MIB
    state = {f"w.{i}": torch.full((MIB,), float(i)) for i in range(16)}  # 64 MiB: one shard, 13 parts
    backend = make_backend("s3")
    url = backend.new_root()
    with HfModelWriter(url, specs_from_state_dict(state), max_shard_size=10**9, upload_block_size=5 * MIB,
                       upload_concurrency=2, upload_memory=2**30) as writer:
        for name, tensor in state.items():
            writer.add(name, tensor)
        summary = writer.finish({"architectures": ["Dummy"], "model_type": "dummy"})
    # two parts uploading, two ready, plus the part being filled
    assert 0 < summary.peak_buffered_bytes <= 4 * 5 * MIB + 5 * MIB
    assert backend.get(backend.join(url, "model.safetensors"))[8:].startswith(b"{")


def test_gcs_background_upload_chunks_follow_the_budget(make_backend, monkeypatch):
    """A GCS shard's resumable upload goes up in chunks of a quarter of the upload budget (one
    request each, one after the other: the fewer the faster), 16 to 128 MiB."""
    import gcsfs.core

    from ckptctl.formats.hf_writer import HfModelWriter, specs_from_state_dict
    from ckptctl.storage import GCS_MAX_CHUNK, gcs_chunk_size

    assert gcs_chunk_size(2**30) == GCS_MAX_CHUNK == 128 * MIB
    assert gcs_chunk_size(80 * MIB) == 20 * MIB and gcs_chunk_size(8 * MIB) == 16 * MIB
    chunks = []  # bytes in the file's buffer at each chunk request
    upload_chunk = gcsfs.core.GCSFile._upload_chunk

    def spy(self, final=False):
        chunks.append(len(self.buffer.getbuffer()))
        return upload_chunk(self, final=final)

    monkeypatch.setattr(gcsfs.core.GCSFile, "_upload_chunk", spy)
    state = {f"w.{i}": torch.full((MIB,), float(i)) for i in range(12)}  # 48 MiB: one shard
    backend = make_backend("gs")
    url = backend.new_root()
    with HfModelWriter(url, specs_from_state_dict(state), max_shard_size=10**9, upload_concurrency=4,
                       upload_memory=80 * MIB) as writer:
        for name, tensor in state.items():
            writer.add(name, tensor)
        writer.finish({"architectures": ["Dummy"], "model_type": "dummy"})
    assert chunks[:2] == [20 * MIB, 20 * MIB] and 48 * MIB < sum(chunks) < 49 * MIB, chunks
    assert len(backend.get(f"{url}/model.safetensors")) == sum(chunks)


@pytest.mark.parametrize("kind", ["s3", "gs"])
def test_concurrent_upload_failure_leaves_nothing(kind, make_backend):
    backend = make_backend(kind)
    url = backend.new_root()
    with pytest.raises(RuntimeError, match="boom"):
        _write(url, 4, 10 * MIB, fail_at=4)  # the first shard complete, the second half uploaded
    assert backend.list_files(url) == []
    if kind == "s3":  # no multipart upload left behind
        bucket, prefix = url.split("://", 1)[1].split("/", 1)
        assert not backend.s3.list_multipart_uploads(Bucket=bucket, Prefix=prefix).get("Uploads")
