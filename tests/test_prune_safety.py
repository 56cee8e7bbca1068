"""prune never leaves a step that reads complete with files missing, and never keeps a damaged
step in place of a good one: real console-script processes killed or stalled mid-way against
the S3 server and the GCS emulator through a freezing proxy (tests/fault_proxy.py), and real
truncated files."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest

import treebuilder as tb
from ckptctl.storage import open_store
from ckptctl.tree import scan_tree
from fault_proxy import FaultProxy
from test_current_run import run_json

EXE = os.path.join(os.path.dirname(sys.executable), "ckptctl")


def four_steps(d: str) -> None:
    for step in (1, 2, 3, 4):
        tb.fsdp_step(d, step, critic=True)
    tb.pointer(d, 4)


def _files_by_step(backend, url: str) -> dict[str, set[str]]:
    out: dict[str, set[str]] = {}
    for f in backend.list_files(url):
        head, _, rest = f.partition("/")
        if rest:
            out.setdefault(head, set()).add(rest)
    return out


def assert_no_step_reads_complete_with_files_missing(backend, url: str, before: dict[str, set[str]]) -> list[str]:
    """Returns the steps that now read as incomplete."""
    after = _files_by_step(backend, url)
    tree = scan_tree(open_store(url))
    incomplete = []
    for step in tree.steps:
        if step.complete:
            assert after[step.name] == before[step.name], \
                f"{step.name} reads complete with {sorted(before[step.name] - after[step.name])} gone"
        else:
            incomplete.append(step.name)
    return incomplete


def _prune_command(url: str, endpoint: str) -> list[str]:
    return [EXE, "prune", url, "--keep", "1", "--yes", "--endpoint-url", endpoint]


@pytest.mark.parametrize("kind", ["s3", "gs"])
def test_prune_killed_after_its_first_deletion_request(make_backend, tmp_path, kind):
    backend = make_backend(kind)
    local = tmp_path / "tree"
    four_steps(str(local))
    url = backend.new_root()
    backend.upload_dir(str(local), url)
    before = _files_by_step(backend, url)
    with FaultProxy(backend.endpoint, freeze_after_deletions=1) as proxy:
        proc = subprocess.Popen(_prune_command(url, proxy.endpoint), stdin=subprocess.DEVNULL,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        try:
            assert proxy.deletions_done.wait(60), proc.communicate(timeout=5)
            proc.send_signal(signal.SIGKILL)
        finally:
            proc.wait(timeout=30)
    assert proc.returncode == -signal.SIGKILL
    incomplete = assert_no_step_reads_complete_with_files_missing(backend, url, before)
    # The first request removed a commit marker (trainer_state.pt), nothing else of the step.
    assert incomplete and incomplete[0] == "global_step_1"
    gone = before["global_step_1"] - _files_by_step(backend, url)["global_step_1"]
    assert gone == {"trainer_state.pt"}
    # A rerun finishes the job.
    doc = run_json("prune", url, "--keep", "1", "--yes")
    assert doc["kept"] == [4] and sorted(_files_by_step(backend, url)) == ["global_step_4"]


@pytest.mark.parametrize("kind", ["s3", "gs"])
def test_prune_on_a_frozen_store_fails_in_bounded_time_saying_what_is_gone(make_backend, tmp_path, kind):
    backend = make_backend(kind)
    local = tmp_path / "tree"
    four_steps(str(local))
    url = backend.new_root()
    backend.upload_dir(str(local), url)
    before = _files_by_step(backend, url)
    # a timeout a loaded machine's emulator still meets for the reads before the freeze: the
    # frozen deletions cost one timeout, not one per object
    env = dict(os.environ, CKPTCTL_STORE_READ_TIMEOUT="10", CKPTCTL_STORE_ATTEMPTS="1",
               CKPTCTL_STORE_CONNECT_TIMEOUT="2")
    with FaultProxy(backend.endpoint, freeze_after_deletions=1) as proxy:
        started = time.monotonic()
        done = subprocess.run(_prune_command(url, proxy.endpoint), stdin=subprocess.DEVNULL, capture_output=True,
                              text=True, env=env, timeout=120)
        elapsed = time.monotonic() - started
    assert proxy.held >= 1, (done.returncode, done.stdout[-1500:], done.stderr)  # it did freeze
    assert done.returncode == 1, done.stderr
    assert elapsed < 60, elapsed
    err = done.stderr.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err
    assert "prune of" in err and "stopped" in err and "already deleted" in err and "rerun" in err
    assert "steps 1" in err and "now read as incomplete" in err
    deleted = sum(len(before[s] - _files_by_step(backend, url).get(s, set())) for s in before)
    assert f"{deleted} of " in err
    assert_no_step_reads_complete_with_files_missing(backend, url, before)


def test_markers_go_in_requests_of_their_own_on_s3(make_backend, tmp_path, s3_request_counter):
    backend = make_backend("s3")
    local = tmp_path / "tree"
    four_steps(str(local))
    tb.megatron_step(str(local), 0)
    url = backend.new_root()
    backend.upload_dir(str(local), url)
    s3_request_counter.reset()
    doc = run_json("prune", url, "--keep", "1", "--yes")
    assert doc["deleted"] == [0, 1, 2, 3]
    assert s3_request_counter.delete_objects() == 2  # the markers, then the rest
    from ckptctl.ops.prune import commit_markers
    step0 = scan_tree(open_store(str(local))).step(0)
    assert commit_markers(step0) == ["trainer_state.pt", "policy/metadata.json"]


# -- deep checks ---------------------------------------------------------------------------------

def _truncate(path, size: int = 100) -> None:
    with open(path, "r+b") as f:
        f.truncate(size)


def test_a_truncated_rank_file_is_not_kept_in_place_of_a_good_step(store_backend, tmp_path):
    local = tmp_path / "tree"
    for step in (1, 2, 3):
        tb.fsdp_step(str(local), step)
    tb.pointer(str(local), 3)
    _truncate(local / "global_step_2" / "policy" / "model_world_size_2_rank_1.pt")
    url = store_backend.new_root()
    store_backend.upload_dir(str(local), url)
    assert run_json("list", url)["newest_complete"] == 3  # the listing alone cannot tell
    doc = run_json("prune", url, "--keep", "2", "--yes")
    assert doc["kept"] == [1, 3] and doc["deleted"] == [2]
    step2 = next(s for s in doc["steps"] if s["step"] == 2)
    assert not step2["complete"]
    assert sorted(_files_by_step(store_backend, url)) == ["global_step_1", "global_step_3"]


def test_a_truncated_export_shard_is_not_kept_in_place_of_a_good_step(make_backend, tmp_path):
    backend = make_backend("local")
    local = tmp_path / "exports"
    for step in (10, 20, 30):
        tb.export_step(str(local), step, shards=3)
    for step in (10, 20, 30):  # index.json naming the shards
        comp = local / f"global_step_{step}" / "policy"
        names = sorted(p.name for p in comp.glob("model-*.safetensors"))
        (comp / "model.safetensors.index.json").write_text(
            '{"metadata": {}, "weight_map": {' + ", ".join(f'"w{i}": "{n}"' for i, n in enumerate(names)) + "}}")
    _truncate(local / "global_step_30" / "policy" / "model-00002-of-00003.safetensors")
    url = backend.new_root()
    backend.upload_dir(str(local), url)
    doc = run_json("prune", url, "--keep", "1", "--dry-run")
    # 30 is damaged (or still being uploaded): kept, but 20 is the newest complete, not deleted.
    assert doc["kept"] == [20, 30] and doc["deleted"] == [10]
    step30 = next(s for s in doc["steps"] if s["step"] == 30)
    assert not step30["complete"] and "newest complete" not in step30["reasons"]
