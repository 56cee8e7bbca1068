"""ckptctl.storage against local disk and REAL S3 (moto server) / GCS (emulator) on loopback.

Setup and checks go through independent clients (os, boto3, the emulator's JSON API: see
``storage_servers.Backend``), so the storage layer is not only verified against itself.
"""

from __future__ import annotations

import math
import os
import subprocess
import sys
from datetime import datetime, timedelta, timezone

import pytest

from ckptctl.errors import AccessDeniedError, NotFoundError, UsageError
from ckptctl.storage import DELETE_BATCH, open_store, split_url
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
    return backend, root, sorted(files)


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
    with pytest.raises(AccessDeniedError):
        open_store(s3_denied.url).delete_many(list(s3_denied.files))


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
    with pytest.raises(UsageError):
        open_store(str(tmp_path / "d" / "f.txt")).walk()
