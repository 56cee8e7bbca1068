"""ckptctl.storage against local disk and REAL S3 (moto server) / GCS (emulator) on loopback.

Setup and checks go through independent clients (os, boto3, the emulator's JSON API: see
``storage_servers.Backend``), so the storage layer is not only verified against itself.
"""

from __future__ import annotations

import math
import os
import socket
import subprocess
import sys
import threading
import time
import urllib.parse
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime, timedelta, timezone
from typing import Iterator

import pytest

from ckptctl.errors import (AccessDeniedError, CorruptFileError, NotACheckpointError, NotFoundError,
                            PartialDeleteError, StorageError, UsageError)
from ckptctl.storage import (ATTEMPTS_ENV, DELETE_BATCH, READ_TIMEOUT_ENV, natural_key, open_store,
                             split_url)
from storage_servers import env_with

TREE = {
    "latest_ckpt_global_step.txt": b"20",
    "global_step_10/trainer_state.pt": b"t" * 100,
    "global_step_10/policy/model_world_size_2_rank_0.pt": b"a" * 1000,
    "global_step_10/policy/model_world_size_2_rank_1.pt": b"b" * 999,
    "global_step_20/policy/huggingface/config.json": b'{"model_type": "llama"}',
    "global_step_20/data.pt": b"",
}


def make_tree(backend, files=TREE) -> str:
    root = backend.new_root()
    backend.put_many(root, files)
    return root


# -- walk -------------------------------------------------------------------------------------
def test_walk_paths_sizes_mtimes(store_backend):
    before = datetime.now(timezone.utc) - timedelta(minutes=5)
    root = make_tree(store_backend)
    entries = open_store(root).walk()

    assert [e.path for e in entries] == sorted(TREE)
    assert {e.path: e.size for e in entries} == {k: len(v) for k, v in TREE.items()}
    after = datetime.now(timezone.utc) + timedelta(minutes=5)
    for e in entries:
        assert e.mtime is not None and e.mtime.tzinfo is not None, e
        assert before <= e.mtime <= after, e
    assert {e.name for e in entries} >= {"trainer_state.pt", "config.json", "data.pt"}


def test_walk_matches_independent_listing(store_backend, tmp_path):
    src = tmp_path / "src"
    for rel, data in TREE.items():
        (src / rel).parent.mkdir(parents=True, exist_ok=True)
        (src / rel).write_bytes(data)
    root = store_backend.new_root()
    store_backend.upload_dir(str(src), root)
    assert [e.path for e in open_store(root).walk()] == store_backend.list_files(root) == sorted(TREE)


def test_walk_does_not_leak_sibling_prefixes(store_backend):
    root = make_tree(store_backend, {"a/x.bin": b"1"})
    # A sibling whose name starts with the root's name must not show up.
    store_backend.put(root + "-sibling" + ("/" if store_backend.kind != "local" else os.sep) + "y.bin", b"2")
    store_backend.put(root + "suffix" + ("/" if store_backend.kind != "local" else os.sep) + "z.bin", b"3")
    assert [e.path for e in open_store(root).walk()] == ["a/x.bin"]


def test_walk_of_subtree_is_relative_to_it(store_backend):
    root = make_tree(store_backend)
    sub = open_store(root).child("global_step_10")
    assert [e.path for e in sub.walk()] == [
        "policy/model_world_size_2_rank_0.pt",
        "policy/model_world_size_2_rank_1.pt",
        "trainer_state.pt",
    ]
    assert sub.url == store_backend.join(root, "global_step_10")


def test_walk_missing_root_raises_not_found(store_backend):
    with pytest.raises(NotFoundError):
        open_store(store_backend.new_root()).walk()


@pytest.mark.parametrize("kind", ["s3", "gs"])
def test_missing_bucket_raises_not_found(kind, request):
    request.getfixturevalue("s3_server" if kind == "s3" else "gcs_server")
    missing = f"{kind}://ckptctl-no-such-bucket-4f1d"
    with pytest.raises(NotFoundError):
        open_store(missing).walk()
    with pytest.raises(NotFoundError):
        open_store(missing + "/some/prefix").walk()
    with pytest.raises(NotFoundError):
        open_store(missing + "/prefix").read_bytes("file.txt")


@pytest.mark.parametrize("kind", ["s3", "gs"])
def test_empty_bucket_root_walks_empty(kind, make_backend):
    backend = make_backend(kind)
    bucket_url = backend.new_bucket()
    assert open_store(bucket_url).walk() == []
    backend.put(bucket_url + "/a/b.txt", b"hi")
    assert [(e.path, e.size) for e in open_store(bucket_url).walk()] == [("a/b.txt", 2)]



def test_walk_and_read_odd_names(store_backend):
    files = {"a b+c%d=e&f.txt": b"1", "ünï/çødé.bin": b"22", "dots/..x/.hidden": b"333"}
    root = make_tree(store_backend, files)
    store = open_store(root)
    assert [(e.path, e.size) for e in store.walk()] == sorted((k, len(v)) for k, v in files.items())
    for rel, data in files.items():
        assert store.read_bytes(rel) == data


@pytest.mark.parametrize("kind", ["s3", "gs"])
def test_walk_skips_directory_marker_objects(kind, make_backend):
    """Zero-byte "dir/" objects (S3 console "Create folder", gsutil) are not files."""
    backend = make_backend(kind)
    root = make_tree(backend, {"step/a.pt": b"abc"})
    for marker in ("step/", "empty_dir/", "step/sub/"):
        backend.put(f"{root}/{marker}", b"")
    assert [(e.path, e.size) for e in open_store(root).walk()] == [("step/a.pt", 3)]


# -- reading ----------------------------------------------------------------------------------
def test_read_bytes_and_text(store_backend):
    root = make_tree(store_backend)
    store = open_store(root)
    for rel, data in TREE.items():
        assert store.read_bytes(rel) == data
    assert store.read_text("latest_ckpt_global_step.txt") == "20"
    assert store.size("global_step_10/policy/model_world_size_2_rank_1.pt") == 999


def test_read_range(store_backend):
    root = store_backend.new_root()
    data = bytes(range(256)) * 40  # 10240 bytes
    store_backend.put(store_backend.join(root, "blob.bin"), data)
    store = open_store(root)
    assert store.read_range("blob.bin", 0, 8) == data[:8]
    assert store.read_range("blob.bin", 1000, 1300) == data[1000:1300]
    assert store.read_range("blob.bin", 10000, 10240) == data[10000:]
    assert store.read_range("blob.bin", 10239, 10240) == data[-1:]


def test_read_range_empty(store_backend, request):
    """An empty range (a zero-element tensor's extent) must read nothing, not the whole file."""
    # s3fs would turn [5, 5) into "Range: bytes=5-4", which S3 ignores and answers with the
    # whole object: the store must not send such a request.
    root = store_backend.new_root()
    data = bytes(range(256)) * 4
    store_backend.put(store_backend.join(root, "blob.bin"), data)
    store = open_store(root)
    assert store.read_range("blob.bin", 0, 0) == b""
    assert store.read_range("blob.bin", 5, 5) == b""


def test_read_missing_file_raises_not_found(store_backend):
    root = make_tree(store_backend)
    store = open_store(root)
    with pytest.raises(NotFoundError):
        store.read_bytes("global_step_10/nope.pt")
    with pytest.raises(NotFoundError):
        store.read_range("global_step_10/nope.pt", 0, 4)
    with pytest.raises(NotFoundError):
        store.size("nope")


def test_exists_is_dir_is_file(store_backend):
    root = make_tree(store_backend)
    store = open_store(root)
    assert store.exists("global_step_10/trainer_state.pt")
    assert store.is_file("global_step_10/trainer_state.pt")
    assert not store.is_dir("global_step_10/trainer_state.pt")
    assert store.exists("global_step_10")
    assert store.is_dir("global_step_10")
    assert store.is_dir("global_step_10/policy")
    assert not store.is_file("global_step_10")
    assert not store.exists("global_step_30")
    assert not store.exists("global_step_1")  # prefix of a real name is not a directory


# -- writing ----------------------------------------------------------------------------------
def test_write_bytes_creates_and_overwrites(store_backend):
    root = store_backend.new_root()
    store = open_store(root)
    store.write_bytes("a/b/c.txt", b"first")
    store.write_bytes("top.txt", b"top")
    assert store_backend.list_files(root) == ["a/b/c.txt", "top.txt"]
    assert store_backend.get(store_backend.join(root, "a/b/c.txt")) == b"first"
    store.write_bytes("a/b/c.txt", b"second, longer")
    assert store_backend.get(store_backend.join(root, "a/b/c.txt")) == b"second, longer"
    store.write_bytes("empty.bin", b"")
    assert store_backend.get(store_backend.join(root, "empty.bin")) == b""
    assert [(e.path, e.size) for e in store.walk()] == [("a/b/c.txt", 14), ("empty.bin", 0), ("top.txt", 3)]


# -- deleting ---------------------------------------------------------------------------------
def test_delete_many_deletes_exactly_the_named_files(store_backend):
    root = make_tree(store_backend)
    store = open_store(root)
    doomed = ["global_step_10/policy/model_world_size_2_rank_0.pt",
              "global_step_10/policy/model_world_size_2_rank_1.pt", "global_step_20/data.pt"]
    assert store.delete_many(doomed) == 3
    assert store_backend.list_files(root) == sorted(set(TREE) - set(doomed))
    if store_backend.kind == "local":
        # emptied directories vanish, as they would on an object store; the rest stay
        assert not os.path.exists(os.path.join(root, "global_step_10", "policy"))
        assert os.path.isdir(os.path.join(root, "global_step_10"))
        assert os.path.isdir(os.path.join(root, "global_step_20", "policy", "huggingface"))
    assert store.delete_many([]) == 0


def test_delete_everything_keeps_local_root(store_backend):
    root = make_tree(store_backend)
    store = open_store(root)
    assert store.delete_many(sorted(TREE)) == len(TREE)
    assert store_backend.list_files(root) == []
    if store_backend.kind == "local":
        assert os.path.isdir(root) and os.listdir(root) == []
        assert store.walk() == []
    else:
        with pytest.raises(NotFoundError):
            store.walk()


def test_delete_does_not_touch_siblings(store_backend):
    root = make_tree(store_backend, {"step/a.pt": b"1", "step/b.pt": b"2", "stepx/a.pt": b"3"})
    open_store(root).delete_many(["step/a.pt"])
    assert store_backend.list_files(root) == ["step/b.pt", "stepx/a.pt"]


# -- request counts on S3 ---------------------------------------------------------------------
N_MANY = 2500


@pytest.fixture
def many_objects_root(make_backend, s3_request_counter):
    """2500 objects under a prefix of a fresh bucket (moto's listing cost grows with the bucket)."""
    backend = make_backend("s3")
    root = backend.new_bucket() + "/run"
    files = {f"global_step_{i // 100}/shard_{i:05d}.bin": b"x" * (i % 7) for i in range(N_MANY)}
    backend.put_many(root, files, direct=True)
    backend.put(root + "-decoy/a.bin", b"")  # a sibling prefix outside the tree
    s3_request_counter.reset()
    return backend, root, sorted(files, key=natural_key)  # the order walk lists in: step 2 before 10


def test_s3_walk_costs_one_list_request_per_1000_objects(many_objects_root, s3_request_counter):
    backend, root, rels = many_objects_root
    entries = open_store(root).walk()
    assert [e.path for e in entries] == rels
    assert sum(e.size for e in entries) == sum(i % 7 for i in range(N_MANY))
    expected = math.ceil(N_MANY / 1000)
    assert s3_request_counter.list_objects() == expected, s3_request_counter.summary()
    assert len(s3_request_counter.requests) == expected, s3_request_counter.summary()


def test_s3_delete_many_batches_1000_keys_a_request(many_objects_root, s3_request_counter):
    backend, root, rels = many_objects_root
    store = open_store(root)
    assert store.delete_many(rels) == N_MANY
    assert s3_request_counter.delete_objects() == math.ceil(N_MANY / DELETE_BATCH), s3_request_counter.summary()
    assert len(s3_request_counter.requests) == math.ceil(N_MANY / DELETE_BATCH), s3_request_counter.summary()
    assert backend.list_files(root) == []


# -- access denied / no credentials (S3) ------------------------------------------------------
@pytest.mark.parametrize("which", ["policy-deny", "unknown-key"])
def test_s3_access_denied(s3_denied, monkeypatch, which):
    s3_denied.use(monkeypatch, unknown_key=(which == "unknown-key"))
    store = open_store(s3_denied.url)
    rel = next(iter(s3_denied.files))
    with pytest.raises(AccessDeniedError):
        store.walk()
    with pytest.raises(AccessDeniedError):
        store.read_bytes(rel)
    with pytest.raises(AccessDeniedError):
        store.read_range(rel, 0, 2)
    with pytest.raises(AccessDeniedError):
        store.write_bytes("new.txt", b"x")


@pytest.mark.parametrize("which", ["policy-deny", "unknown-key"])
def test_s3_delete_denied(s3_denied, monkeypatch, request, which):
    # With a deny policy DeleteObjects answers 200 with a per-key AccessDenied error (so does
    # real S3), which s3fs's bulk delete ignores; the store must report it.
    s3_denied.use(monkeypatch, unknown_key=(which == "unknown-key"))
    with pytest.raises(PartialDeleteError, match="nothing was deleted.*access denied|nothing was deleted.*refused") \
            as caught:
        open_store(s3_denied.url).delete_many(list(s3_denied.files))
    assert caught.value.exit_code == AccessDeniedError.exit_code and caught.value.deleted == 0


def test_s3_no_credentials(s3_server, no_aws_credentials):
    store = open_store(f"s3://ckptctl-test/{os.urandom(4).hex()}")
    with pytest.raises(AccessDeniedError, match="credentials"):
        store.walk()
    with pytest.raises(AccessDeniedError, match="credentials"):
        store.read_bytes("a.txt")
    with pytest.raises(AccessDeniedError, match="credentials"):
        store.write_bytes("a.txt", b"x")


def test_servers_reachable_from_a_subprocess(s3_server, gcs_server, make_backend):
    """The exported env lets a child process (like the CLI) reach both stores."""
    s3, gs = make_backend("s3"), make_backend("gs")
    s3_root, gs_root = make_tree(s3, {"f.txt": b"s3!"}), make_tree(gs, {"f.txt": b"gs!"})
    code = ("import sys; from ckptctl.storage import open_store; "
            "print(b''.join(open_store(u).read_bytes('f.txt') for u in sys.argv[1:]).decode())")
    out = subprocess.run([sys.executable, "-c", code, s3_root, gs_root], env=env_with({}),
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "s3!gs!"


# -- URL handling -----------------------------------------------------------------------------
def test_split_url_forms(tmp_path):
    assert split_url("s3://b/k/") == ("s3", "b/k")
    assert split_url("s3a://b/k") == ("s3", "b/k")
    assert split_url("gcs://b/k") == ("gs", "b/k")
    assert split_url("gs://b") == ("gs", "b")
    assert split_url(f"file://{tmp_path}") == ("file", str(tmp_path))
    assert split_url(str(tmp_path / "x" / "..")) == ("file", str(tmp_path))
    with pytest.raises(UsageError):
        split_url("http://example.com/x")
    with pytest.raises(UsageError):
        split_url("s3://")
    with pytest.raises(UsageError):
        open_store("  ")


def test_file_url_and_plain_path_are_the_same_store(tmp_path):
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "f.txt").write_bytes(b"abc")
    assert open_store(f"file://{tmp_path}/d").walk() == open_store(str(tmp_path / "d")).walk()
    with pytest.raises(NotACheckpointError, match="is a file, not a directory"):
        open_store(str(tmp_path / "d" / "f.txt")).walk()


# -- bounded requests: real loopback sockets, no mocks ------------------------------------------
@pytest.fixture
def closed_endpoint() -> str:
    """An endpoint nothing listens on: connections are refused at once."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return f"http://127.0.0.1:{port}"


@pytest.fixture
def silent_endpoint() -> Iterator[str]:
    """A listener that completes every TCP handshake (the kernel's backlog) and never answers."""
    with socket.create_server(("127.0.0.1", 0), backlog=128) as s:
        yield f"http://127.0.0.1:{s.getsockname()[1]}"


def _store_operations(store) -> dict:
    return {"walk": store.walk, "read": lambda: store.read_bytes("global_step_1/trainer_state.pt"),
            "delete": lambda: store.delete_many(["global_step_1/trainer_state.pt", "global_step_1/data.pt"])}


@pytest.mark.parametrize("scheme", ["s3", "gs"])
def test_unreachable_store_fails_in_seconds(scheme, closed_endpoint, monkeypatch):
    # Default limits (3 attempts): gcsfs alone would retry 6 times over ~35 s per request.
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    store = open_store(f"{scheme}://bucket/run", endpoint_url=closed_endpoint)
    for name, operation in _store_operations(store).items():
        started = time.monotonic()
        with pytest.raises(StorageError, match="cannot reach the store") as caught:
            operation()
        assert time.monotonic() - started < 20, name  # a bound against hanging, not a timing goal
        if name == "delete":
            assert isinstance(caught.value, PartialDeleteError) and caught.value.deleted == 0
            assert "nothing was deleted" in str(caught.value)


@pytest.mark.parametrize("scheme", ["s3", "gs"])
def test_frozen_store_fails_within_the_configured_limits(scheme, silent_endpoint, monkeypatch):
    monkeypatch.setenv(READ_TIMEOUT_ENV, "1")
    monkeypatch.setenv(ATTEMPTS_ENV, "2")
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    store = open_store(f"{scheme}://bucket/run", endpoint_url=silent_endpoint)
    for name, operation in _store_operations(store).items():
        started = time.monotonic()
        with pytest.raises(StorageError, match="did not answer") as caught:
            operation()
        # 2 attempts x 1 s plus backoff; without the limits this hangs for minutes
        assert time.monotonic() - started < 20, name
        assert "2 attempts" in str(caught.value) and READ_TIMEOUT_ENV in str(caught.value)


@pytest.mark.parametrize("value", ["0", "-3", "soon"])
def test_bad_limit_values_are_usage_errors(value, monkeypatch):
    monkeypatch.setenv(ATTEMPTS_ENV, value)
    with pytest.raises(UsageError, match=ATTEMPTS_ENV):
        open_store("s3://bucket/run", endpoint_url="http://127.0.0.1:9")


@pytest.mark.parametrize("endpoint", ["garbage", "ftp://host:21", "http://", "http://host:port", "s3://bucket"])
def test_invalid_endpoint_url_is_a_usage_error(endpoint, tmp_path):
    with pytest.raises(UsageError, match="invalid endpoint URL"):
        open_store("s3://bucket/run", endpoint_url=endpoint)
    with pytest.raises(UsageError, match="invalid endpoint URL"):
        open_store(str(tmp_path), endpoint_url=endpoint)  # wrong wherever it is given


@pytest.mark.parametrize("variable, scheme", [("AWS_ENDPOINT_URL", "s3"), ("STORAGE_EMULATOR_HOST", "gs")])
def test_invalid_endpoint_from_the_environment_names_the_variable(variable, scheme, monkeypatch):
    monkeypatch.delenv("AWS_ENDPOINT_URL_S3", raising=False)
    monkeypatch.setenv(variable, "ftp://nowhere")
    with pytest.raises(UsageError, match=variable):
        open_store(f"{scheme}://bucket/run")


# -- delete_many: what THIS call deleted, and where it stopped ----------------------------------
def test_delete_many_counts_only_what_it_deleted(make_backend):
    # S3 is left out: DeleteObjects says "deleted" for keys that were already gone (see _delete_s3).
    for kind in ("local", "gs"):
        backend = make_backend(kind)
        root = make_tree(backend)
        store = open_store(root)
        doomed = sorted(TREE)[:3]
        assert store.delete_many(doomed) == 3
        assert store.delete_many(doomed) == 0, kind
        assert store.delete_many(doomed + [sorted(TREE)[3]]) == 1, kind


def test_concurrent_local_deletions_each_count_their_own(tmp_path):
    files = {f"global_step_{i % 7}/policy/model_world_size_8_rank_{i}.pt": b"x" for i in range(400)}
    for rel, data in files.items():
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_bytes(data)
    store = open_store(str(tmp_path))
    with ThreadPoolExecutor(2) as pool:
        counts = list(pool.map(lambda _: store.delete_many(sorted(files)), range(2)))
    assert sum(counts) == len(files), counts
    assert not list(tmp_path.rglob("*.pt"))


def test_local_delete_stops_at_the_first_failure(tmp_path):
    for name in ("a.pt", "b.pt", "d.pt"):
        (tmp_path / name).write_bytes(b"x")
    (tmp_path / "c.pt").mkdir()  # unlink of a directory fails, for root too
    with pytest.raises(PartialDeleteError) as caught:
        open_store(str(tmp_path)).delete_many(["a.pt", "b.pt", "c.pt", "d.pt"])
    assert caught.value.deleted == 2 and "2 of 4 objects were already deleted" in str(caught.value)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c.pt", "d.pt"]  # nothing after the failure


class FreezingProxy:
    """A loopback TCP proxy in front of a real server that stops passing requests on once
    ``freeze_after`` requests containing ``marker`` went through: later requests (and retries on
    new connections) are swallowed unanswered, as by a store that hangs mid-way. Answers to
    requests already passed on still come back."""

    def __init__(self, upstream: str, marker: bytes, freeze_after: int):
        parsed = urllib.parse.urlsplit(upstream)
        self.upstream = (parsed.hostname, parsed.port)
        self.marker, self.freeze_after, self.passed = marker, freeze_after, 0
        self.lock = threading.Lock()
        self.server = socket.create_server(("127.0.0.1", 0), backlog=128)
        self.endpoint = f"http://127.0.0.1:{self.server.getsockname()[1]}"
        self.sockets: list[socket.socket] = []
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self.server.accept()
            except OSError:
                return  # closed
            upstream = socket.create_connection(self.upstream)
            self.sockets += [client, upstream]
            threading.Thread(target=self._forward, args=(client, upstream), daemon=True).start()
            threading.Thread(target=self._backward, args=(upstream, client), daemon=True).start()

    def _forward(self, client: socket.socket, upstream: socket.socket) -> None:
        try:
            while data := client.recv(1 << 16):
                with self.lock:
                    if self.passed >= self.freeze_after:
                        continue  # frozen: swallow
                    self.passed += data.count(self.marker)
                    if self.passed > self.freeze_after:
                        continue
                upstream.sendall(data)
            upstream.shutdown(socket.SHUT_WR)
        except OSError:
            pass

    def _backward(self, upstream: socket.socket, client: socket.socket) -> None:
        try:
            while data := upstream.recv(1 << 16):
                client.sendall(data)
            client.shutdown(socket.SHUT_WR)
        except OSError:
            pass

    def close(self) -> None:
        self.server.close()
        for s in self.sockets:
            # shutdown first: a plain close() leaves the connection open while another thread
            # is blocked in recv() on it, and the single-threaded GCS emulator would wait on
            # that idle connection for good
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            s.close()


def test_s3_delete_that_freezes_midway_reports_what_was_deleted(many_objects_root, monkeypatch):
    backend, root, rels = many_objects_root
    # time for the first DeleteObjects of 1,000 keys on a loaded machine: 0.2 s alone, but over
    # 5 s once in CI beside torchrun tests; the frozen second one then costs one timeout
    monkeypatch.setenv(READ_TIMEOUT_ENV, "20")
    monkeypatch.setenv(ATTEMPTS_ENV, "1")
    proxy = FreezingProxy(backend.endpoint, marker=b"?delete", freeze_after=1)  # the 2nd DeleteObjects hangs
    try:
        with pytest.raises(PartialDeleteError) as caught:
            open_store(root, endpoint_url=proxy.endpoint).delete_many(rels)
    finally:
        proxy.close()
    error = caught.value
    assert error.deleted == DELETE_BATCH and error.exit_code == 1
    assert f"{DELETE_BATCH} of {N_MANY} objects were already deleted" in str(error) and "did not answer" in str(error)
    assert backend.list_files(root) == rels[DELETE_BATCH:]  # deleted in the order given, and no further


def test_gcs_delete_that_freezes_midway_reports_exactly_what_was_deleted(make_backend, monkeypatch):
    backend = make_backend("gs")
    total = 140
    files = {f"global_step_{i // 20}/policy/model_world_size_20_rank_{i % 20}.pt": b"x" for i in range(total)}
    root = make_tree(backend, files)
    monkeypatch.setenv(READ_TIMEOUT_ENV, "20")  # time for the first batch of 100 on a loaded machine (see above)
    monkeypatch.setenv(ATTEMPTS_ENV, "1")
    proxy = FreezingProxy(backend.endpoint, marker=b"DELETE /", freeze_after=110)
    try:
        with pytest.raises(PartialDeleteError) as caught:
            open_store(root, endpoint_url=proxy.endpoint).delete_many(sorted(files, key=natural_key))
    finally:
        proxy.close()
    deleted = caught.value.deleted
    assert 100 <= deleted <= 110, deleted  # the first batch of 100, then what passed before the freeze
    assert f"{deleted} of {total} objects were already deleted" in str(caught.value)
    assert len(backend.list_files(root)) == total - deleted  # GCS answers per object: the count is exact


# -- order and file:// URLs -----------------------------------------------------------------------
def test_walk_lists_numbers_in_natural_order(store_backend):
    names = ["__10_0.distcp", "__2_0.distcp", "__2_1.distcp", "__1_0.distcp"]
    files = {f"global_step_{s}/policy/{n}": b"x" for s in (10, 9, 100) for n in names}
    root = make_tree(store_backend, files)
    listed = [e.path for e in open_store(root).walk()]
    order = ["__1_0.distcp", "__2_0.distcp", "__2_1.distcp", "__10_0.distcp"]
    assert listed == [f"global_step_{s}/policy/{n}" for s in (9, 10, 100) for n in order]


def test_file_urls_are_percent_decoded(tmp_path):
    (tmp_path / "my run").mkdir()
    (tmp_path / "my run" / "f.txt").write_bytes(b"abc")
    for url in (f"file://{tmp_path}/my%20run", f"file://localhost{tmp_path}/my%20run"):
        assert split_url(url) == ("file", str(tmp_path / "my run"))
        assert open_store(url).read_bytes("f.txt") == b"abc"


def test_read_json_names_a_corrupt_file(store_backend):
    root = make_tree(store_backend, {"huggingface/config.json": b'{"architectures": [', "ok.json": b'{"a": 1}'})
    store = open_store(root)
    assert store.read_json("ok.json") == {"a": 1}
    with pytest.raises(CorruptFileError, match=r"huggingface/config\.json: corrupt file, not valid JSON"):
        store.read_json("huggingface/config.json")
    with pytest.raises(NotFoundError):
        store.read_json("missing.json")
