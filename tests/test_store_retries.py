"""Transient store errors are retried per request; permanent ones fail the command in one line.

Real servers only (moto's S3 server, the GCS emulator), with a real HTTP proxy in front of them
(tests/fault_proxy.py) that answers chosen requests with HTTP 500/503, S3's SlowDown, a
connection reset (before the request reaches the store, after it did, or in the middle of a
download), or -- for S3's CompleteMultipartUpload -- a 500 or a ``200 OK`` carrying an
``<Error>``. Each command run through a transient fault must succeed with the very output it
writes without faults; through a permanent fault it must fail with exit code 1, one line naming
the object once, and leave nothing that looks complete. Backoff is kept short here
(CKPTCTL_STORE_BACKOFF_BASE).
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path

import pytest

from cli_runner import run
from fault_proxy import (Fault, FaultProxy, complete_multipart, gcs_upload, listing, object_get, object_key,
                         put_object, ranged_get, upload_part)

torch = pytest.importorskip("torch")

SHARD = "300KB"  # the w2 policy exports as 3 shards + index + config + side files
LOCAL = type("Local", (), {"kind": "local"})()  # read_tree() of a local directory


@pytest.fixture(autouse=True)
def _fast_backoff(monkeypatch):
    monkeypatch.setenv("CKPTCTL_STORE_BACKOFF_BASE", "0.02")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("TRANSFORMERS_OFFLINE", "1")


# ------------------------------------------------------------------------------------------
# helpers
# ------------------------------------------------------------------------------------------
def read_tree(backend, url: str) -> dict[str, bytes]:
    if backend.kind == "local":
        root = Path(url)
        return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}
    return {rel: backend.get(f"{url}/{rel}") for rel in backend.list_files(url)}


def export(src: str, out: str, endpoint: str, *extra: str) -> tuple[int, str, str]:
    return run("export-hf", src, "--out", out, "--endpoint-url", endpoint, "--max-shard-size", SHARD, *extra)


def assert_one_line_naming_once(err: str, obj_url: str) -> None:
    """One line, no traceback, naming ``obj_url`` (scheme://bucket/prefix/file) exactly once and
    never with the prefix repeated (``s3://b/p/b/p/file``)."""
    line = err.strip()
    assert len(line.splitlines()) == 1 and "Traceback" not in line, err
    assert line.count(obj_url) == 1, (obj_url, line)
    path = obj_url.split("://", 1)[1]
    bucket, parent = path.split("/", 1)[0], path.rsplit("/", 1)[0]
    assert f"{parent}/{bucket}/" not in line, line


@pytest.fixture(scope="module")
def reference_export(fsdp_ckpts, tmp_path_factory) -> dict[str, bytes]:
    """The w2 policy exported to local disk without any fault."""
    out = tmp_path_factory.mktemp("ref") / "hf"
    code, stdout, stderr = run("export-hf", fsdp_ckpts["w2"].path, "--out", out, "--max-shard-size", SHARD)
    assert code == 0, (stdout, stderr)
    files = {p.relative_to(out).as_posix(): p.read_bytes() for p in sorted(out.rglob("*")) if p.is_file()}
    assert sum(f.endswith(".safetensors") for f in files) == 3
    return files


def _source_on(backend, fsdp_ckpts) -> str:
    url = backend.new_root() + "/global_step_1/policy"
    backend.upload_dir(str(fsdp_ckpts["w2"].path), url)
    return url


# ------------------------------------------------------------------------------------------
# export-hf local -> store, transient faults
# ------------------------------------------------------------------------------------------
UPLOAD_FAULTS = {
    "s3": {
        "500": Fault("status", status=500, match=put_object, nth=2),
        "503x2": Fault("status", status=503, match=put_object, times=2),
        "slowdown": Fault("slowdown", match=put_object, times=1),
        "reset": Fault("reset", match=put_object, nth=3),
        "reset_after": Fault("reset_after", match=put_object, nth=3),
    },
    "gs": {
        "500": Fault("status", status=500, match=gcs_upload, nth=2),
        "503x2": Fault("status", status=503, match=gcs_upload, times=2),
        "reset": Fault("reset", match=gcs_upload, nth=3),
        # A simple (one-request) upload: the emulator forgets a resumable session once it is
        # finalised (GCS itself answers a repeated final chunk with the object).
        "reset_after": Fault("reset_after", match=lambda m, p, h: gcs_upload(m, p, h) and "multipart" in p, nth=2),
    },
}


@pytest.mark.parametrize("kind,fault", [(k, f) for k in UPLOAD_FAULTS for f in UPLOAD_FAULTS[k]])
def test_export_to_store_rides_out_a_transient_fault(kind, fault, make_backend, fsdp_ckpts, reference_export):
    backend = make_backend(kind)
    out = backend.new_root()
    rule = dataclasses.replace(UPLOAD_FAULTS[kind][fault])  # fresh counters
    with FaultProxy(backend.endpoint, faults=[rule]) as proxy:
        code, stdout, stderr = export(fsdp_ckpts["w2"].path, out, proxy.endpoint)
    assert rule.fired >= 1, proxy.log
    assert code == 0, (stdout, stderr)
    assert read_tree(backend, out) == reference_export


# ------------------------------------------------------------------------------------------
# multipart / resumable uploads (library: a shard larger than the upload block)
# ------------------------------------------------------------------------------------------
MIB = 2**20


def _big_state() -> dict:
    g = torch.Generator().manual_seed(7)
    return {"big.weight": torch.randn(3 * MIB, generator=g),  # 12 MiB: parts of 5 + 5 + 2 MiB
            "small.bias": torch.randn(16, generator=g)}


def write_big(url: str, endpoint: str, concurrency: int = 1) -> None:
    from ckptctl.formats.hf_writer import HfModelWriter, specs_from_state_dict

    state = _big_state()
    with HfModelWriter(url, specs_from_state_dict(state), max_shard_size="1GB", endpoint_url=endpoint,
                       upload_block_size=5 * MIB, upload_concurrency=concurrency) as writer:
        for name, tensor in state.items():
            writer.add(name, tensor)
        writer.finish({"architectures": ["Dummy"], "model_type": "dummy"})


@pytest.fixture(scope="module")
def big_reference(tmp_path_factory) -> dict[str, bytes]:
    out = tmp_path_factory.mktemp("bigref") / "hf"
    write_big(str(out), None)
    return {p.relative_to(out).as_posix(): p.read_bytes() for p in sorted(out.rglob("*")) if p.is_file()}


MULTIPART_FAULTS = {
    "s3": {
        "part-500": Fault("status", status=500, match=upload_part, nth=2),
        "part-slowdown": Fault("slowdown", match=upload_part, times=1),
        "part-reset": Fault("reset", match=upload_part, nth=1),
        "part-reset_after": Fault("reset_after", match=upload_part, nth=2),
        "complete-500": Fault("status", status=500, match=complete_multipart, times=1),
        "complete-503x2": Fault("status", status=503, match=complete_multipart, times=2),
        "complete-error200": Fault("error200", match=complete_multipart, times=1),
        # completed upstream, the answer lost: the retry finds the upload gone (NoSuchUpload)
        "complete-reset_after": Fault("reset_after", match=complete_multipart, times=1),
    },
    "gs": {
        "chunk-503": Fault("status", status=503, match=gcs_upload, nth=3),
        "chunk-reset": Fault("reset", match=gcs_upload, nth=3),
    },
}


@pytest.mark.parametrize("kind,fault", [(k, f) for k in MULTIPART_FAULTS for f in MULTIPART_FAULTS[k]])
def test_multipart_upload_rides_out_a_transient_fault(kind, fault, make_backend, big_reference):
    backend = make_backend(kind)
    out = backend.new_root()
    rule = dataclasses.replace(MULTIPART_FAULTS[kind][fault])
    with FaultProxy(backend.endpoint, faults=[rule]) as proxy:
        write_big(out, proxy.endpoint)
    assert rule.fired >= 1, proxy.log
    assert read_tree(backend, out) == big_reference


def test_completion_whose_answer_was_lost_counts_when_the_object_is_there(make_backend, big_reference):
    """CompleteMultipartUpload went through but its answer was lost (connection reset); the
    retry finds the upload gone (S3 may answer NoSuchUpload: moto repeats the success instead,
    hence the second rule). The object holds exactly the parts sent (its multipart ETag): done."""
    backend = make_backend("s3")
    out = backend.new_root()
    rules = [Fault("reset_after", match=complete_multipart, times=1),
             Fault("status", status=404, code="NoSuchUpload", match=complete_multipart, times=1)]
    with FaultProxy(backend.endpoint, faults=rules) as proxy:
        write_big(out, proxy.endpoint)
    assert [r.fired for r in rules] == [1, 1], proxy.log
    assert read_tree(backend, out) == big_reference


@pytest.mark.parametrize("retry_answer", ["status", "error200"])
def test_completion_whose_retries_get_server_errors_counts_when_the_object_is_there(
        retry_answer, make_backend, big_reference):
    """The first CompleteMultipartUpload completes upstream, but its answer never arrives (here a
    reset; on the S3 test server, a 1.42 GB completion outlasting the read timeout), and every
    retry gets a server error (the S3 test server answers 500 to a retry racing the first try,
    then to one finding the upload gone). The object holds exactly the parts sent: done."""
    backend = make_backend("s3")
    out = backend.new_root()
    rules = [Fault("reset_after", match=complete_multipart, times=1),
             Fault(retry_answer, status=500, match=complete_multipart, times=ATTEMPTS - 1)]
    with FaultProxy(backend.endpoint, faults=rules) as proxy:
        write_big(out, proxy.endpoint)
    assert [r.fired for r in rules] == [1, ATTEMPTS - 1], proxy.log
    assert read_tree(backend, out) == big_reference


def test_completion_refused_as_a_client_error_is_not_looked_for(make_backend):
    """A completion the store refuses as wrong (4xx, e.g. InvalidPart) failed for good: no
    looking for the object, the upload is aborted and nothing is left."""
    from ckptctl.errors import StorageError

    backend = make_backend("s3")
    out = backend.new_root()
    rules = [Fault("status", status=400, code="InvalidPart", match=complete_multipart, times=None),
             Fault("status", status=404, code="NoSuchKey", times=None,
                   match=lambda method, path, headers=None: method == "HEAD" and ".safetensors" in path)]
    with FaultProxy(backend.endpoint, faults=rules) as proxy:
        with pytest.raises(StorageError):
            write_big(out, proxy.endpoint)
    assert rules[0].fired == 1 and rules[1].fired == 0, proxy.log  # not retried, not looked for
    assert backend.list_files(out) == []


def _shard_reads(proxy: FaultProxy) -> list:
    return [entry for entry in proxy.log if entry[0] == "GET" and ".safetensors" in entry[1]]


def test_a_shard_the_store_confirmed_is_checked_without_reading_it_back(make_backend, big_reference):
    """Parts uploaded concurrently, the completion answered with the checksum of exactly the
    parts' checksums: the object holds the bytes sent, so the check before the commit takes the
    shard's header from what was uploaded (a ranged GET costs a request per shard, and on the S3
    test server a pass over the whole object)."""
    backend = make_backend("s3")
    out = backend.new_root()
    with FaultProxy(backend.endpoint) as proxy:
        write_big(out, proxy.endpoint, concurrency=2)
    assert _shard_reads(proxy) == [], proxy.log
    assert [e[0] for e in proxy.log if "uploadId" in e[1]].count("PUT") == 3  # parts of 5 + 5 + 2 MiB
    assert read_tree(backend, out) == big_reference


def test_a_shard_whose_completion_answer_was_lost_is_still_confirmed(make_backend, big_reference):
    """The completion's answer lost (found by its ETag): the object's checksum, asked for with
    one HEAD, is still the composite of the parts': no read back."""
    backend = make_backend("s3")
    out = backend.new_root()
    rules = [Fault("reset_after", match=complete_multipart, times=1),
             Fault("status", status=404, code="NoSuchUpload", match=complete_multipart, times=1)]
    with FaultProxy(backend.endpoint, faults=rules) as proxy:
        write_big(out, proxy.endpoint, concurrency=2)
    assert [r.fired for r in rules] == [1, 1], proxy.log
    assert _shard_reads(proxy) == [], proxy.log
    assert read_tree(backend, out) == big_reference


def test_a_shard_without_checksums_is_read_back(make_backend, big_reference, monkeypatch):
    """A store without checksums (``AWS_REQUEST_CHECKSUM_CALCULATION=when_required``) confirms
    nothing: the check before the commit reads the shard's header back."""
    from ckptctl.storage import open_store

    monkeypatch.setenv("AWS_REQUEST_CHECKSUM_CALCULATION", "when_required")
    backend = make_backend("s3")
    out = backend.new_root()
    with FaultProxy(backend.endpoint) as proxy:
        type(open_store(out, endpoint_url=proxy.endpoint).fs).clear_instance_cache()
        try:
            write_big(out, proxy.endpoint, concurrency=2)
        finally:
            type(open_store(out, endpoint_url=proxy.endpoint).fs).clear_instance_cache()
    assert len(_shard_reads(proxy)) == 1, proxy.log
    assert read_tree(backend, out) == big_reference


def test_multipart_checksum_matches_only_the_parts_composite():
    import base64
    import zlib

    from ckptctl.storage import multipart_checksum_matches

    data = os.urandom(3000)
    sizes = [1000, 1500, 500]
    starts = [0, 1000, 2500]
    parts = [base64.b64encode(zlib.crc32(data[a:a + n]).to_bytes(4, "big")).decode() for a, n in zip(starts, sizes)]
    composite = _composite_crc32(data, sizes)
    assert multipart_checksum_matches(composite, parts)
    assert multipart_checksum_matches(f"{composite}-3", parts)  # S3's form
    assert not multipart_checksum_matches(f"{composite}-2", parts)
    assert not multipart_checksum_matches(composite, parts[::-1])  # another order: other bytes
    assert not multipart_checksum_matches(_composite_crc32(data, [1500, 1000, 500]), parts)
    assert not multipart_checksum_matches(None, parts)
    assert not multipart_checksum_matches(composite, parts[:2] + [None])  # a store without checksums
    assert not multipart_checksum_matches("not base64!", parts)


def _composite_crc32(data: bytes, part_sizes: list[int]) -> str:
    """S3's composite checksum: the CRC-32 of the parts' big-endian CRC-32s, base64."""
    import base64
    import zlib

    starts = [sum(part_sizes[:i]) for i in range(len(part_sizes))]
    assert sum(part_sizes) == len(data)
    crcs = b"".join(zlib.crc32(data[a:a + n]).to_bytes(4, "big") for a, n in zip(starts, part_sizes))
    return base64.b64encode(zlib.crc32(crcs).to_bytes(4, "big")).decode()


def test_multipart_uploads_carry_each_parts_checksum(make_backend, big_reference, tmp_path):
    """Every multipart upload -- the writer's own and s3fs's ``put_file`` (convert-reshard's
    uploads) -- is begun with CRC-32 and completed with each part's checksum, as the aws CLI
    does: the store checks each part as it arrives, and the object's checksum is composed of
    the parts'. (Left to the S3 server's default, a full-object checksum, completing a 1.42 GB
    shard took 18 s instead of 6.)"""
    from ckptctl.storage import open_store

    backend = make_backend("s3")
    out = backend.new_root()
    write_big(out, backend.endpoint)
    blob = os.urandom(11 * MIB)
    (tmp_path / "blob").write_bytes(blob)
    store = open_store(out, endpoint_url=backend.endpoint)
    store.fs.put_file(str(tmp_path / "blob"), store.full_path("blob"), chunksize=5 * MIB)

    bucket, prefix = out.split("://", 1)[1].split("/", 1)
    for rel, data in [("model.safetensors", big_reference["model.safetensors"]), ("blob", blob)]:
        key = f"{prefix}/{rel}"
        head = backend.s3.head_object(Bucket=bucket, Key=key, ChecksumMode="ENABLED")
        assert head["ETag"].strip('"').endswith("-3"), (rel, head["ETag"])  # three parts
        sizes = [backend.s3.head_object(Bucket=bucket, Key=key, PartNumber=n)["ContentLength"] for n in (1, 2, 3)]
        assert head.get("ChecksumCRC32", "").split("-")[0] == _composite_crc32(data, sizes), (rel, sizes, head)
    assert not backend.s3.list_multipart_uploads(Bucket=bucket, Prefix=prefix).get("Uploads")


def test_part_checksums_are_computed_once_and_not_by_botocore(make_backend, tmp_path, monkeypatch):
    """The parts' CRC-32 is computed here (ISA-L), not again by botocore's zlib-based one: one
    pass over every uploaded byte, not two; the store accepts each part's."""
    from botocore import httpchecksum

    from ckptctl.storage import open_store

    hashed = []
    update = httpchecksum.Crc32Checksum.update
    monkeypatch.setattr(httpchecksum.Crc32Checksum, "update", lambda self, chunk: (hashed.append(len(chunk)),
                                                                                  update(self, chunk))[1])
    backend = make_backend("s3")
    out = backend.new_root()
    blob = os.urandom(11 * MIB)
    (tmp_path / "blob").write_bytes(blob)
    store = open_store(out, endpoint_url=backend.endpoint)
    store.fs.put_file(str(tmp_path / "blob"), store.full_path("blob"), chunksize=5 * MIB)
    assert backend.get(f"{out}/blob") == blob
    bucket, prefix = out.split("://", 1)[1].split("/", 1)
    head = backend.s3.head_object(Bucket=bucket, Key=f"{prefix}/blob", ChecksumMode="ENABLED")
    assert head["ChecksumCRC32"].split("-")[0] == _composite_crc32(blob, [5 * MIB, 5 * MIB, MIB])
    assert sum(hashed) < MIB, sum(hashed)  # none of the parts' bytes


def test_no_checksums_where_the_user_asked_botocore_for_none(make_backend, tmp_path, monkeypatch):
    """``AWS_REQUEST_CHECKSUM_CALCULATION=when_required`` (for an S3-compatible store without
    checksums): multipart uploads are begun and completed without them."""
    from ckptctl.storage import open_store

    monkeypatch.setenv("AWS_REQUEST_CHECKSUM_CALCULATION", "when_required")
    backend = make_backend("s3")
    out = backend.new_root()
    blob = os.urandom(11 * MIB)
    (tmp_path / "blob").write_bytes(blob)
    store = open_store(out, endpoint_url=backend.endpoint)
    type(store.fs).clear_instance_cache()  # a filesystem made before the variable was set
    store = open_store(out, endpoint_url=backend.endpoint)
    store.fs.put_file(str(tmp_path / "blob"), store.full_path("blob"), chunksize=5 * MIB)
    type(store.fs).clear_instance_cache()
    bucket, prefix = out.split("://", 1)[1].split("/", 1)
    head = backend.s3.head_object(Bucket=bucket, Key=f"{prefix}/blob", ChecksumMode="ENABLED")
    assert head["ETag"].strip('"').endswith("-3") and "ChecksumCRC32" not in head, head
    assert backend.get(f"{out}/blob") == blob


def test_completion_still_assembling_when_the_retry_finds_the_upload_gone(make_backend, big_reference):
    """The first CompleteMultipartUpload is still assembling a large object when its retry
    (after a timeout or a 500) finds the upload gone: the object is not there yet at the first
    look (HEAD 404), and is at the next. Seen on the S3 server with a 1.42 GB shard."""
    backend = make_backend("s3")
    out = backend.new_root()
    rules = [Fault("reset_after", match=complete_multipart, times=1),
             Fault("status", status=404, code="NoSuchUpload", match=complete_multipart, times=1),
             Fault("status", status=404, code="NoSuchKey", times=2,
                   match=lambda method, path, headers=None: method == "HEAD" and ".safetensors" in path)]
    with FaultProxy(backend.endpoint, faults=rules) as proxy:
        write_big(out, proxy.endpoint)
    assert [r.fired for r in rules] == [1, 1, 2], proxy.log
    assert read_tree(backend, out) == big_reference


# ------------------------------------------------------------------------------------------
# reads: export-hf store -> local, inspect --tensors, list
# ------------------------------------------------------------------------------------------
READ_FAULTS = {
    "s3": {
        "get-500": Fault("status", status=500, match=object_get, nth=2),
        "get-503x2": Fault("status", status=503, match=object_get, times=2),
        "get-slowdown": Fault("slowdown", match=object_get, times=1),
        "get-reset": Fault("reset", match=object_get, nth=2),
        "get-truncate": Fault("truncate", match=object_get, nth=2),
        "list-500": Fault("status", status=500, match=listing, times=1),
        "list-reset": Fault("reset", match=listing, times=1),
    },
    "gs": {
        "get-500": Fault("status", status=500, match=object_get, nth=2),
        "get-503x2": Fault("status", status=503, match=object_get, times=2),
        "get-reset": Fault("reset", match=object_get, nth=2),
        "get-truncate": Fault("truncate", match=object_get, nth=2),
        "list-503": Fault("status", status=503, match=listing, times=1),
        "list-reset": Fault("reset", match=listing, times=1),
    },
}


@pytest.fixture(scope="module")
def store_sources(fsdp_ckpts, gcs_server, s3_server):
    from storage_servers import BUCKET, Backend
    out = {}
    for kind, endpoint in (("s3", s3_server), ("gs", gcs_server)):
        backend = Backend(kind, endpoint=endpoint, bucket=BUCKET)
        out[kind] = (backend, _source_on(backend, fsdp_ckpts))
    return out


@pytest.mark.parametrize("kind,fault", [(k, f) for k in READ_FAULTS for f in READ_FAULTS[k]])
def test_export_from_store_rides_out_a_transient_fault(kind, fault, store_sources, reference_export, tmp_path):
    backend, src = store_sources[kind]
    rule = dataclasses.replace(READ_FAULTS[kind][fault])
    out = tmp_path / "hf"
    with FaultProxy(backend.endpoint, faults=[rule]) as proxy:
        code, stdout, stderr = export(src, str(out), proxy.endpoint)
    assert rule.fired >= 1, proxy.log
    assert code == 0, (stdout, stderr)
    assert read_tree(LOCAL, str(out)) == reference_export


@pytest.mark.parametrize("kind", ["s3", "gs"])
def test_inspect_tensors_rides_out_transient_read_faults(kind, store_sources):
    backend, src = store_sources[kind]
    code, want, stderr = run("inspect", src, "--tensors", "--json", "--endpoint-url", backend.endpoint)
    assert code == 0, stderr
    rules = [Fault("status", status=500, match=ranged_get, nth=2), Fault("truncate", match=ranged_get, nth=4),
             Fault("reset", match=ranged_get, nth=6)]
    with FaultProxy(backend.endpoint, faults=rules) as proxy:
        code, got, stderr = run("inspect", src, "--tensors", "--json", "--endpoint-url", proxy.endpoint)
    assert [r.fired for r in rules] == [1, 1, 1], proxy.log
    assert code == 0, stderr
    assert json.loads(got) == json.loads(want)


# ------------------------------------------------------------------------------------------
# listings: ckptctl list
# ------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def store_trees(fsdp_tree, gcs_server, s3_server):
    from storage_servers import BUCKET, Backend
    out = {}
    for kind, endpoint in (("s3", s3_server), ("gs", gcs_server)):
        backend = Backend(kind, endpoint=endpoint, bucket=BUCKET)
        url = backend.new_root() + "/ckpts"
        backend.upload_dir(str(fsdp_tree), url)
        code, listed, stderr = run("list", url, "--json", "--endpoint-url", endpoint)  # without faults
        assert code == 0, stderr
        out[kind] = (backend, url, json.loads(listed))
    return out


LIST_FAULTS = {"503": dict(action="status", status=503, times=1), "slowdown": dict(action="slowdown", times=1),
               "reset": dict(action="reset", times=1)}


@pytest.mark.parametrize("kind,fault", [(k, f) for k in ("s3", "gs") for f in LIST_FAULTS
                                        if not (k == "gs" and f == "slowdown")])
def test_list_rides_out_a_transient_fault(kind, fault, store_trees):
    backend, url, want = store_trees[kind]
    rule = Fault(match=listing, **LIST_FAULTS[fault])
    with FaultProxy(backend.endpoint, faults=[rule]) as proxy:
        code, got, stderr = run("list", url, "--json", "--endpoint-url", proxy.endpoint)
    assert rule.fired == 1, proxy.log
    assert code == 0, stderr
    assert json.loads(got) == want


# ------------------------------------------------------------------------------------------
# permanent faults: bounded tries, one line naming the object once, nothing complete-looking
# ------------------------------------------------------------------------------------------
ATTEMPTS = 3  # StoreLimits' default


@pytest.mark.parametrize("kind", ["s3", "gs"])
def test_export_to_store_permanent_fault_fails_cleanly(kind, make_backend, fsdp_ckpts):
    backend = make_backend(kind)
    out = backend.new_root()
    shard = "model-00002-of-00003.safetensors"
    rule = Fault("status", status=503, match=object_key(shard, put_object if kind == "s3" else gcs_upload),
                 times=None)
    with FaultProxy(backend.endpoint, faults=[rule]) as proxy:
        code, stdout, stderr = export(fsdp_ckpts["w2"].path, out, proxy.endpoint)
    assert code == 1, (stdout, stderr)
    assert rule.fired == ATTEMPTS, proxy.log  # retried, and bounded
    assert_one_line_naming_once(stderr.removeprefix("ckptctl: error: "), f"{out}/{shard}")
    assert backend.list_files(out) == []  # aborted: what this run wrote is gone, no config.json


@pytest.mark.parametrize("action", ["status", "error200"])
def test_multipart_complete_permanent_fault_fails_cleanly(action, make_backend):
    from ckptctl.errors import StorageError

    backend = make_backend("s3")
    out = backend.new_root()
    rule = Fault(action, status=500, match=complete_multipart, times=None)
    with FaultProxy(backend.endpoint, faults=[rule]) as proxy:
        with pytest.raises(StorageError) as info:
            write_big(out, proxy.endpoint)
    assert rule.fired == ATTEMPTS, proxy.log
    assert_one_line_naming_once(str(info.value), f"{out}/model.safetensors")
    assert backend.list_files(out) == []
    uploads = backend.s3.list_multipart_uploads(Bucket=backend.bucket, Prefix=out.split("/", 3)[3])
    assert not uploads.get("Uploads")  # the parts were discarded too


@pytest.mark.parametrize("kind", ["s3", "gs"])
def test_export_from_store_permanent_fault_fails_cleanly(kind, store_sources, tmp_path):
    backend, src = store_sources[kind]
    name = "model_world_size_2_rank_1.pt"
    rule = Fault("status", status=500, match=object_key(name, object_get), times=None)
    out = tmp_path / "hf"
    with FaultProxy(backend.endpoint, faults=[rule]) as proxy:
        code, stdout, stderr = export(src, str(out), proxy.endpoint)
    assert code == 1, (stdout, stderr)
    assert rule.fired == ATTEMPTS, proxy.log
    assert_one_line_naming_once(stderr.removeprefix("ckptctl: error: "), f"{src}/{name}")
    assert list(tmp_path.iterdir()) == []  # no output, no temp sibling


@pytest.mark.parametrize("kind", ["s3", "gs"])
def test_list_permanent_fault_fails_in_one_line(kind, store_trees):
    backend, url, _ = store_trees[kind]
    rule = Fault("status", status=503, match=listing, times=None)
    with FaultProxy(backend.endpoint, faults=[rule]) as proxy:
        code, stdout, stderr = run("list", url, "--endpoint-url", proxy.endpoint)
    assert code == 1, (stdout, stderr)
    assert rule.fired == ATTEMPTS, proxy.log
    line = stderr.strip()
    assert len(line.splitlines()) == 1 and line.count(url) == 1, line


# ------------------------------------------------------------------------------------------
# OutputDir (convert-reshard's commit protocol): staged files uploaded with put_file
# ------------------------------------------------------------------------------------------
OUTPUT_FILES = {"a.bin": os.urandom(70_000), "sub/b.bin": os.urandom(50_000), "meta.json": b'{"ok": true}'}


def commit_output(url: str, endpoint: str) -> list[str]:
    from ckptctl.output_dir import OutputDir

    with OutputDir(url, commit_last=("meta.json",), endpoint_url=endpoint) as out:
        for rel, data in OUTPUT_FILES.items():
            path = Path(out.staging, rel)
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(data)
        return out.commit()


@pytest.mark.parametrize("kind", ["s3", "gs"])
def test_output_dir_commit_rides_out_transient_faults(kind, make_backend):
    backend = make_backend(kind)
    url = backend.new_root()
    upload = put_object if kind == "s3" else gcs_upload
    rules = [Fault("status", status=503, match=object_key("a.bin", upload), times=2),
             Fault("reset", match=object_key("meta.json", upload), times=1)]
    with FaultProxy(backend.endpoint, faults=rules) as proxy:
        assert commit_output(url, proxy.endpoint) == sorted(OUTPUT_FILES)
    assert [r.fired for r in rules] == [2, 1], proxy.log
    got = read_tree(backend, url)
    assert {k: v for k, v in got.items() if k in OUTPUT_FILES} == OUTPUT_FILES


@pytest.mark.parametrize("kind", ["s3", "gs"])
def test_output_dir_permanent_fault_fails_cleanly(kind, make_backend):
    from ckptctl.errors import StorageError

    backend = make_backend(kind)
    url = backend.new_root()
    rule = Fault("status", status=500, match=object_key("b.bin", put_object if kind == "s3" else gcs_upload),
                 times=None)
    with FaultProxy(backend.endpoint, faults=[rule]) as proxy:
        with pytest.raises(StorageError) as info:
            commit_output(url, proxy.endpoint)
    assert rule.fired == ATTEMPTS, proxy.log
    assert_one_line_naming_once(str(info.value), f"{url}/sub/b.bin")
    assert backend.list_files(url) == []
