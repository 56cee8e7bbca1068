"""The shared commit protocol for directory outputs (ckptctl.output_dir) on local disk, S3, GCS.

Checks go through independent clients (``storage_servers.Backend``): the destination must
never look complete (no ``commit_last`` file) unless the run committed, a killed run's rerun
must succeed without --overwrite, and overwriting must remove the old commit_last files first.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import tempfile
import textwrap

import pytest

from ckptctl import output_dir
from ckptctl.errors import UsageError
from ckptctl.output_dir import (INCOMPLETE_MARKER, OUTPUT_MARKER, SCRATCH_PREFIX, TMP_INFIX, OutputDir,
                                refuse_overlap)
from ckptctl.storage import open_store

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LAST = (".metadata", "metadata.json")
FILES = {"__0_0.distcp": b"rank0" * 100, "__1_0.distcp": b"rank1" * 100, "sub/dir/common.pt": b"common",
         ".metadata": b"index", "metadata.json": b"{}"}


def endpoint(backend) -> str | None:
    return backend.endpoint if backend.kind == "s3" else None


def write_all(out: OutputDir, files=FILES) -> None:
    for rel, data in files.items():
        path = os.path.join(out.staging, *rel.split("/"))
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "wb") as f:
            f.write(data)


def produce(backend, url, files=FILES, **kwargs) -> tuple[OutputDir, list[str]]:
    with OutputDir(url, commit_last=LAST, endpoint_url=endpoint(backend), **kwargs) as out:
        write_all(out, files)
        return out, out.commit()


def siblings(url: str) -> list[str]:
    parent, name = os.path.split(url)
    return sorted(n for n in os.listdir(parent) if n.startswith(f".{name}{TMP_INFIX}")) if os.path.isdir(parent) else []


def contents(backend, url) -> dict[str, bytes]:
    """Every file at ``url`` but the output marker (checked by marker())."""
    return {rel: backend.get(backend.join(url, rel)) for rel in backend.list_files(url) if rel != OUTPUT_MARKER}


def marker(backend, url) -> dict:
    return json.loads(backend.get(backend.join(url, OUTPUT_MARKER)))


def test_commit_writes_every_file(store_backend):
    url = store_backend.new_root()
    out, written = produce(store_backend, url)
    assert written == sorted(FILES)
    assert contents(store_backend, url) == FILES
    m = marker(store_backend, url)  # what wrote the output, and every file it holds
    assert (m["tool"], m["kind"], m["files"]) == ("ckptctl", "output", sorted(FILES))
    assert out.replaced is None and out.state == "committed"
    if store_backend.kind == "local":
        assert siblings(url) == []
    else:
        assert not os.path.exists(out.staging)  # the local staging dir is gone


def test_refuses_non_empty_destination(store_backend):
    url = store_backend.new_root()
    store_backend.put(store_backend.join(url, "notes.txt"), b"keep me")
    with pytest.raises(UsageError, match="not empty") as info:
        OutputDir(url, commit_last=LAST, endpoint_url=endpoint(store_backend))
    assert info.value.exit_code == 2
    assert contents(store_backend, url) == {"notes.txt": b"keep me"}


def test_empty_local_directory_is_accepted(tmp_path):
    url = tmp_path / "out"
    url.mkdir()
    with OutputDir(str(url), commit_last=LAST) as out:
        write_all(out)
        out.commit()
    assert sorted(p.name for p in url.iterdir()) == sorted({"__0_0.distcp", "__1_0.distcp", "sub", ".metadata",
                                                            "metadata.json", OUTPUT_MARKER})


def test_overwrite_replaces_old_output(store_backend, monkeypatch):
    check_overwrite(store_backend, monkeypatch)


def test_local_overwrite_without_rename_exchange(make_backend, monkeypatch):
    """Where renameat2(RENAME_EXCHANGE) is unsupported: two renames."""
    monkeypatch.setattr(output_dir, "_USE_EXCHANGE", False)
    check_overwrite(make_backend("local"), monkeypatch)


def check_overwrite(store_backend, monkeypatch):
    url = store_backend.new_root()
    produce(store_backend, url)
    new = {"__0_0.distcp": b"new0", ".metadata": b"new index", "metadata.json": b'{"v": 2}'}

    events = []
    if store_backend.kind != "local":
        real_delete = output_dir.Store.delete_many

        def delete_many(self, rels):
            rels = list(rels)
            events.append(("delete", sorted(rels)))
            return real_delete(self, rels)

        monkeypatch.setattr(output_dir.Store, "delete_many", delete_many)
    out = OutputDir(url, overwrite=True, commit_last=LAST, endpoint_url=endpoint(store_backend))
    if store_backend.kind != "local":
        real_put = out.store.fs.put_file

        def put_file(lpath, rpath, **kw):
            events.append(("put", rpath.rsplit("/", 1)[-1]))
            return real_put(lpath, rpath, **kw)

        out.store.fs.put_file = put_file
    with out:
        write_all(out, new)
        written = out.commit()
    assert written == sorted(new) and out.replaced == "an earlier ckptctl output (5 files)"
    assert contents(store_backend, url) == new  # old files are gone
    assert marker(store_backend, url)["files"] == sorted(new)
    if store_backend.kind == "local":
        assert siblings(url) == []
    else:
        # the old commit_last files go first, alone; data, then stale objects, then commit_last
        assert events[0] == ("delete", sorted(LAST))
        puts = [e[1] for e in events if e[0] == "put"]
        assert sorted(puts[:-2]) == sorted(["__0_0.distcp", OUTPUT_MARKER])
        assert puts[-2:] == [".metadata", "metadata.json"]
        stale = [e for e in events[1:] if e[0] == "delete" and INCOMPLETE_MARKER not in e[1]]
        assert stale == [("delete", ["__1_0.distcp", "sub/dir/common.pt"])]
        assert events.index(stale[0]) < events.index(("put", ".metadata"))


@pytest.mark.parametrize("when", ["before-commit", "after-publish", "exception"])
def test_abort_leaves_nothing(store_backend, when):
    url = store_backend.new_root()
    if when == "exception":
        with pytest.raises(RuntimeError, match="producer failed"):
            with OutputDir(url, commit_last=LAST, endpoint_url=endpoint(store_backend)) as out:
                write_all(out)
                out.publish(["__0_0.distcp"])
                raise RuntimeError("producer failed")
    else:
        out = OutputDir(url, commit_last=LAST, endpoint_url=endpoint(store_backend)).open()
        write_all(out)
        if when == "after-publish":
            assert out.publish(["__0_0.distcp", "__1_0.distcp"]) == ["__0_0.distcp", "__1_0.distcp"]
            if store_backend.kind != "local":
                assert sorted(store_backend.list_files(url)) == sorted([INCOMPLETE_MARKER, "__0_0.distcp",
                                                                        "__1_0.distcp"])
                assert not os.path.exists(os.path.join(out.staging, "__0_0.distcp"))  # local copy dropped
        out.abort()
    assert store_backend.list_files(url) == []
    if store_backend.kind == "local":
        assert not os.path.exists(url) and siblings(url) == []
    produce(store_backend, url)  # the destination is usable
    assert contents(store_backend, url) == FILES


def test_publish_refuses_commit_last_and_commit_needs_them(tmp_path):
    with OutputDir(str(tmp_path / "out"), commit_last=LAST) as out:
        write_all(out, {"a.distcp": b"x", ".metadata": b"i"})
        with pytest.raises(UsageError, match="committed last"):
            out.publish([".metadata"])
        with pytest.raises(UsageError, match="metadata.json was not written"):
            out.commit()
    assert not (tmp_path / "out").exists() and siblings(str(tmp_path / "out")) == []


KILLED = textwrap.dedent("""
    import os, signal, sys
    from ckptctl import output_dir
    from ckptctl.output_dir import OutputDir
    url, endpoint, overwrite = sys.argv[1], sys.argv[2] or None, sys.argv[3] == "1"
    real_upload = output_dir.RemoteCommit.upload
    def upload(self, staging, rels, **kw):
        if ".metadata" in rels:            # killed just before the first commit_last file
            os.kill(os.getpid(), signal.SIGKILL)
        return real_upload(self, staging, rels, **kw)
    output_dir.RemoteCommit.upload = upload
    def local_commit(self, **kw):          # killed with everything staged, before the rename
        os.kill(os.getpid(), signal.SIGKILL)
    output_dir.LocalStaging.commit = local_commit
    out = OutputDir(url, overwrite=overwrite, commit_last=(".metadata", "metadata.json"), endpoint_url=endpoint)
    with out:
        for rel in ("__0_0.distcp", "__1_0.distcp", ".metadata", "metadata.json"):
            with open(os.path.join(out.staging, rel), "wb") as f:
                f.write(b"killed run " + rel.encode())
        out.publish(["__0_0.distcp"])
        out.commit()
""")


@pytest.mark.parametrize("overwrite", [False, True], ids=["fresh", "overwrite"])
def test_killed_run_leaves_nothing_complete_and_rerun_succeeds(store_backend, overwrite, tmp_path, monkeypatch):
    url = store_backend.new_root()
    if overwrite:
        produce(store_backend, url)  # a complete old output
    scratch = tmp_path / "tmpdir"  # TMPDIR of both runs: where object-store outputs are staged
    scratch.mkdir()
    proc = subprocess.run([sys.executable, "-c", KILLED, url, endpoint(store_backend) or "", "1" if overwrite else "0"],
                          cwd=REPO_ROOT, capture_output=True, text=True, timeout=120,
                          env=dict(os.environ, TMPDIR=str(scratch)))
    assert proc.returncode == -9, proc.stderr
    left = store_backend.list_files(url)
    if store_backend.kind == "local":
        # the destination is untouched: the old output (overwrite) or nothing
        assert left == (sorted([*FILES, OUTPUT_MARKER]) if overwrite else [])
        assert len(siblings(url)) == 1  # the dead run's temp sibling
        assert os.listdir(scratch) == []
    else:
        assert not set(LAST) & set(left)  # nothing complete-looking (the old output's went first)
        assert INCOMPLETE_MARKER in left and "__1_0.distcp" in left
        dead = [str(scratch / n) for n in os.listdir(scratch)]  # the dead run's staging, with its files
        assert len(dead) == 1 and os.path.basename(dead[0]).startswith(SCRATCH_PREFIX)
        assert os.path.isfile(os.path.join(dead[0], "new", "metadata.json"))
    monkeypatch.setattr(tempfile, "tempdir", str(scratch))
    out, written = produce(store_backend, url, overwrite=overwrite)  # the same command again
    assert written == sorted(FILES)
    assert contents(store_backend, url) == FILES
    if store_backend.kind == "local":
        assert out.replaced == ("an earlier ckptctl output (5 files)" if overwrite else None)
        assert len(out.cleaned) == 1 and siblings(url) == []
    else:
        assert out.replaced == "interrupted"  # (the fresh run's rerun needed no --overwrite)
        assert out.cleaned == dead  # the rerun removed the dead run's staging; its own went at commit
    assert os.listdir(scratch) == []


def test_scratch_of_live_or_unknown_runs_is_left_alone(make_backend, tmp_path, monkeypatch):
    """Only a scratch directory whose run.json names a dead process on this host is removed:
    one without run.json may be a run creating it; one of a live process is in use."""
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    backend = make_backend("s3")
    dead_pid = int(subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                                  capture_output=True, text=True, check=True).stdout)
    runs = {"dead": dead_pid, "live": os.getpid(), "elsewhere": dead_pid, "unknown": None}
    for name, pid in runs.items():
        d = tmp_path / f"{SCRATCH_PREFIX}{name}"
        (d / "new").mkdir(parents=True)
        (d / "new" / "shard.distcp").write_bytes(b"staged")
        if pid is not None:
            host = "another-host" if name == "elsewhere" else socket.gethostname()
            (d / "run.json").write_text(json.dumps({"host": host, "pid": pid}))
    out, _ = produce(backend, backend.new_root())
    assert out.cleaned == [str(tmp_path / f"{SCRATCH_PREFIX}dead")]
    assert sorted(os.listdir(tmp_path)) == sorted(f"{SCRATCH_PREFIX}{n}" for n in ("live", "elsewhere", "unknown"))


def test_local_interrupted_replace_restores_previous_output(tmp_path):
    url = str(tmp_path / "out")
    with OutputDir(url, commit_last=LAST) as out:
        write_all(out)
        out.commit()
    run_dir = tmp_path / f".out{TMP_INFIX}deadbeef"
    run_dir.mkdir()
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    (run_dir / "run.json").write_text(json.dumps({"host": os.uname().nodename, "pid": int(dead.stdout)}))
    os.rename(url, run_dir / "old")  # died between the two renames of the fallback
    with pytest.raises(UsageError, match="not empty"):
        OutputDir(url, commit_last=LAST)
    assert sorted(os.listdir(url)) == sorted({"__0_0.distcp", "__1_0.distcp", "sub", ".metadata", "metadata.json",
                                              OUTPUT_MARKER})
    assert not run_dir.exists()


def test_live_run_sibling_is_left_alone(tmp_path):
    url = str(tmp_path / "out")
    other = tmp_path / f".out{TMP_INFIX}0123456789ab"
    other.mkdir()
    (other / "run.json").write_text(json.dumps({"host": os.uname().nodename, "pid": os.getpid()}))
    with OutputDir(url, commit_last=LAST) as out:
        write_all(out)
        out.commit()
    assert out.cleaned == [] and other.exists()


def test_attached_helper_publishes_and_owner_commits(store_backend, tmp_path):
    """torchrun: a helper process with its own staging uploads its files; the owner commits
    with uploaded=...; an abort by the owner removes the helper's objects too."""
    url = store_backend.new_root()
    ep = endpoint(store_backend)
    for outcome in ("abort", "commit"):
        owner = OutputDir(url, commit_last=LAST, endpoint_url=ep).open()
        owner.begin()
        helper_dir = tmp_path / f"helper-{outcome}"
        helper_dir.mkdir()
        helper = OutputDir.attach(url, str(helper_dir) if store_backend.kind != "local" else owner.staging,
                                  endpoint_url=ep)
        write_all(helper, {"__1_0.distcp": b"helper"})
        published = helper.publish(["__1_0.distcp"])
        write_all(owner, {"__0_0.distcp": b"owner", ".metadata": b"i", "metadata.json": b"{}"})
        with pytest.raises(UsageError, match="cannot commit"):
            helper.commit()
        if outcome == "abort":
            owner.abort(uploaded=published)
            assert store_backend.list_files(url) == []
        else:
            written = owner.commit(uploaded=published)
    assert written == [".metadata", "__0_0.distcp", "__1_0.distcp", "metadata.json"]
    assert contents(store_backend, url) == {"__0_0.distcp": b"owner", "__1_0.distcp": b"helper", ".metadata": b"i",
                                            "metadata.json": b"{}"}


def test_refuse_overlap(tmp_path):
    src = open_store(str(tmp_path / "ckpt"))
    with pytest.raises(UsageError, match="inside the source"):
        refuse_overlap(src, open_store(str(tmp_path / "ckpt" / "out")))
    with pytest.raises(UsageError, match="inside the source"):
        refuse_overlap(src, open_store(str(tmp_path / "ckpt")))
    with pytest.raises(UsageError, match="contains the source"):
        refuse_overlap(src, open_store(str(tmp_path)))
    refuse_overlap(src, open_store(str(tmp_path / "ckpt-out")))  # a sibling with a common prefix is fine
    os.symlink(tmp_path / "ckpt", tmp_path / "link")
    with pytest.raises(UsageError, match="inside the source"):
        refuse_overlap(src, open_store(str(tmp_path / "link" / "out")))


def _in_flight_spy(monkeypatch):
    """The peak bytes of S3 part/object uploads in flight at once and the GCS chunk sizes sent,
    spied on at the libraries' own request functions."""
    import threading

    import gcsfs.core

    from ckptctl import storage

    seen = {"now": 0, "peak": 0, "parts": [], "gcs_chunks": []}
    lock = threading.Lock()
    s3_class = storage._bounded_s3_class()
    call_s3 = s3_class._call_s3

    async def spy_s3(self, method, *args, **kwargs):
        n = len(kwargs.get("Body") or b"") if method in ("upload_part", "put_object") else 0
        with lock:
            seen["now"] += n
            seen["peak"] = max(seen["peak"], seen["now"])
            if method == "upload_part":
                seen["parts"].append(n)
        try:
            return await call_s3(self, method, *args, **kwargs)
        finally:
            with lock:
                seen["now"] -= n

    upload_chunk = gcsfs.core.upload_chunk

    async def spy_gcs(fs, location, data, offset, size, content_type):
        seen["gcs_chunks"].append(len(data))
        return await upload_chunk(fs, location, data, offset, size, content_type)

    monkeypatch.setattr(s3_class, "_call_s3", spy_s3)
    monkeypatch.setattr(gcsfs.core, "upload_chunk", spy_gcs)
    return seen


@pytest.mark.parametrize("kind", ["s3", "gs"])
def test_uploads_stay_within_their_limits(make_backend, monkeypatch, kind):
    """``limit_uploads(budget, concurrency)``: a published file's upload holds about ``budget``
    bytes (S3: parts as large as it allows, that many at a time; GCS: chunks of a quarter of it);
    left to s3fs, a 24 MiB file goes up as one 24 MiB request (its parts are 50 MiB, 10 at a time)."""
    mib = 2**20
    backend = make_backend(kind)
    url = backend.new_root()
    big = os.urandom(24 * mib)
    seen = _in_flight_spy(monkeypatch)
    with OutputDir(url, commit_last=LAST, endpoint_url=endpoint(backend)) as out:
        out.limit_uploads(12 * mib if kind == "s3" else 64 * mib, 8)
        write_all(out, {**FILES, "__2_0.distcp": big})
        out.publish(["__2_0.distcp"])
        out.commit()
    assert contents(backend, url) == {**FILES, "__2_0.distcp": big}
    if kind == "s3":  # 12 MiB: parts of 6 MiB, two at a time
        assert seen["parts"] == [6 * mib] * 4 and seen["peak"] <= 12 * mib, seen
    else:
        assert seen["gcs_chunks"][:1] == [16 * mib] and sum(seen["gcs_chunks"]) >= len(big), seen["gcs_chunks"]


_DEFERRED_SCRIPT = textwrap.dedent("""
    import signal, sys, threading, time
    from ckptctl.output_dir import TerminateAsInterrupt, Terminated, signals_deferred

    target, guarded = sys.argv[1], sys.argv[2] == "guarded"
    if guarded:
        TerminateAsInterrupt().install()
    main = threading.get_ident()
    go, sent = threading.Event(), threading.Event()

    def helper():  # created before the step: it does not block anything the step might
        go.wait()
        signal.pthread_kill(threading.get_ident() if target == "helper" else main, signal.SIGTERM)
        sent.set()

    threading.Thread(target=helper).start()
    try:
        with signals_deferred():
            go.set()
            sent.wait(5)
            for _ in range(200):  # Python would run the handler here, between two steps
                time.sleep(0.001)
            print("whole", flush=True)
        print("after", flush=True)
    except Terminated:
        print("terminated", flush=True)
""")


@pytest.mark.parametrize("target", ["helper", "main"])
@pytest.mark.parametrize("guarded", ["guarded", "default"])
def test_a_signal_waits_for_the_end_of_a_deferred_step_whichever_thread_receives_it(target, guarded):
    """signals_deferred() holds SIGTERM until its step is whole, also when the kernel hands the
    signal to another thread (it does whenever the main thread blocks it): Python runs handlers in
    the main thread, inside the step. Under TerminateAsInterrupt the step ends, then Terminated
    is raised; with the default action the process ends by SIGTERM after the step."""
    done = subprocess.run([sys.executable, "-c", _DEFERRED_SCRIPT, target, guarded], capture_output=True,
                          text=True, timeout=60)
    if guarded == "guarded":
        assert (done.returncode, done.stdout.split()) == (0, ["whole", "terminated"]), done.stderr
    else:
        assert (done.returncode, done.stdout.split()) == (-15, ["whole"]), done.stderr


_COMMIT_SCRIPT = textwrap.dedent("""
    import os, signal, sys
    from ckptctl import output_dir
    from ckptctl.output_dir import LocalStaging, TerminateAsInterrupt, Terminated
    from ckptctl.storage import open_store

    dest = sys.argv[1]
    staging = LocalStaging(open_store(dest), overwrite=False)
    with open(os.path.join(staging.prepare(), "model.safetensors"), "wb") as f:
        f.write(b"complete")
    TerminateAsInterrupt().install()
    rename = os.rename

    def rename_then_sigterm(a, b):  # SIGTERM lands in the middle of the commit
        rename(a, b)
        os.kill(os.getpid(), signal.SIGTERM)

    output_dir.os.rename = rename_then_sigterm
    try:
        staging.commit()
        print("committed")
    except Terminated as exc:
        print(exc)
""")


def test_a_sigterm_during_the_commit_renames_says_the_output_is_complete(tmp_path):
    """A SIGTERM that lands during a local commit's renames waits for them (and the temp
    sibling's removal), then ends the run saying the output is complete, which it is: not
    "removed", as it said before."""
    dest = tmp_path / "out"
    done = subprocess.run([sys.executable, "-c", _COMMIT_SCRIPT, str(dest)], capture_output=True, text=True,
                          timeout=60)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == f"terminated (SIGTERM) as {dest} was committed: the output is complete"
    assert (dest / "model.safetensors").read_bytes() == b"complete"
    assert [p.name for p in tmp_path.iterdir()] == ["out"]  # no temp sibling left
