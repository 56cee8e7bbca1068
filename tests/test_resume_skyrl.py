"""resolve-resume predicts SkyRL exactly: what its resume lists (``ls`` + ``isdir``: directories
only, symlinks followed, empty ones included), how it parses names (``int()`` of the suffix) and
which path it opens (``global_step_{int(pointer)}``); plus the deep check of the chosen step,
a missing path, and ``--require-checkpoint``."""

from __future__ import annotations

import os

import pytest

import treebuilder as tb
from test_current_run import run, run_json


def tree_with(tmp_path, *steps: int, pointer=None):
    root = tmp_path / "ckpts"
    for step in steps:
        tb.fsdp_step(str(root), step)
    if pointer is not None:
        tb.pointer(str(root), pointer)
    return root


def test_an_empty_step_directory_counts_for_skyrls_consistency_check(tmp_path):
    root = tree_with(tmp_path, 9, 10, pointer=10)
    (root / "global_step_12").mkdir()
    doc = run_json("resolve-resume", str(root), "--ckpt-interval", "1", expect=6)
    assert doc["skyrl_action"] == "fail" and "Inconsistent checkpoint folder" in doc["skyrl_error"]
    assert "global_step_12" in doc["skyrl_error"]
    assert run_json("resolve-resume", str(root), "--ckpt-interval", "2")["step"] == 10
    # The pointer naming the empty directory: SkyRL opens it and finds no trainer_state.pt.
    tb.pointer(str(root), 12)
    doc = run_json("resolve-resume", str(root), "--ckpt-interval", "2", expect=6)
    assert "Trainer state file not found" in doc["skyrl_error"]
    assert run_json("resolve-resume", str(root), "--fallback")["fallback"]["step"] == 10


def test_an_empty_step_directory_on_s3_is_a_marker_object(make_backend, tmp_path):
    backend = make_backend("s3")
    url = backend.new_root()
    backend.upload_dir(str(tree_with(tmp_path, 10, pointer=10)), url)
    backend.put(f"{url}/global_step_12/", b"")  # what a console "create folder" leaves
    doc = run_json("resolve-resume", url, "--ckpt-interval", "1", expect=6)
    assert "Inconsistent checkpoint folder" in doc["skyrl_error"]


def test_a_step_name_int_cannot_parse_crashes_skyrl(tmp_path):
    root = tree_with(tmp_path, 5, pointer=5)
    tb.fsdp_step(str(root), 9)
    os.rename(root / "global_step_9", root / "global_step_9_tmp")
    doc = run_json("resolve-resume", str(root), expect=6)
    assert doc["skyrl_action"] == "fail"
    assert "invalid literal for int() with base 10: '9_tmp'" in doc["skyrl_error"]
    # Empty, it crashes SkyRL just the same (it lists directories, not files).
    for p in sorted((root / "global_step_9_tmp").rglob("*"), reverse=True):
        p.rmdir() if p.is_dir() else p.unlink()
    assert "'9_tmp'" in run_json("resolve-resume", str(root), expect=6)["skyrl_error"]
    doc = run_json("resolve-resume", "--mode", "from_path", "--resume-path", str(root / "global_step_9_tmp"),
                   expect=6)
    assert "'9_tmp'" in doc["skyrl_error"]


def test_a_file_named_like_a_step(tmp_path):
    root = tree_with(tmp_path, 5, pointer=5)
    (root / "global_step_99").write_bytes(b"notes")
    # Newer SkyRL skips files; older releases (os.listdir) count it: 99 - 5 > ckpt_interval.
    doc = run_json("resolve-resume", str(root), "--ckpt-interval", "5", expect=6)
    assert "Inconsistent checkpoint folder" in doc["skyrl_error"] and "global_step_99" in doc["skyrl_error"]
    assert "older SkyRL releases" in doc["skyrl_error"]
    doc = run_json("resolve-resume", str(root))
    assert doc["step"] == 5 and any("SkyRL skips them" in w for w in doc["warnings"])
    (root / "global_step_99").rename(root / "global_step_x")
    doc = run_json("resolve-resume", str(root), expect=6)
    assert "invalid literal for int() with base 10: 'x'" in doc["skyrl_error"]


def test_a_symlinked_step_is_followed_like_skyrl_does(tmp_path):
    root = tree_with(tmp_path, 4, pointer=5)
    elsewhere = tmp_path / "elsewhere"
    tb.fsdp_step(str(elsewhere), 5)
    os.symlink(elsewhere / "global_step_5", root / "global_step_5")
    doc = run_json("resolve-resume", str(root), "--ckpt-interval", "1")
    assert doc["skyrl_action"] == "resume" and doc["step"] == 5 and doc["resumable"]
    assert doc["resume_path"] == str(root / "global_step_5")
    assert doc["loads"]["trainer_state"] == str(root / "global_step_5" / "trainer_state.pt")
    doc = run_json("resolve-resume", "--mode", "from_path", "--resume-path", str(root / "global_step_5"))
    assert doc["resumable"] and doc["step"] == 5
    # A dangling link is not a directory to SkyRL: the step is not found.
    os.unlink(root / "global_step_5")
    os.symlink(tmp_path / "gone", root / "global_step_5")
    assert "Checkpoint path not found" in run_json("resolve-resume", str(root), expect=6)["skyrl_error"]


def test_zero_padded_names(tmp_path):
    root = tree_with(tmp_path, 4, pointer=5)
    tb.fsdp_step(str(root), 5)
    os.rename(root / "global_step_5", root / "global_step_05")
    doc = run_json("resolve-resume", str(root), expect=6)
    assert doc["skyrl_error"] == f"FileNotFoundError: Checkpoint path not found: {root / 'global_step_5'}"
    assert any("rename global_step_05 to global_step_5" in w for w in doc["warnings"])
    assert not os.path.exists(doc["resume_path"])
    listed = run_json("list", str(root))
    assert listed["pointer_target"] is None
    assert any("global_step_05" in w and "SkyRL" in w for w in listed["warnings"])
    # A zero-padded POINTER is int()-parsed: "05" opens global_step_5.
    os.rename(root / "global_step_05", root / "global_step_5")
    tb.pointer(str(root), "05")
    doc = run_json("resolve-resume", str(root))
    assert doc["resume_path"] == str(root / "global_step_5") and doc["resumable"]


def test_empty_pointer_is_skyrls_int_error(tmp_path):
    root = tree_with(tmp_path, 5, pointer="")
    doc = run_json("resolve-resume", str(root), "--fallback")
    assert doc["skyrl_error"].startswith("ValueError: invalid literal for int() with base 10: ''")
    assert doc["fallback"]["step"] == 5


def test_the_chosen_step_and_the_fallback_are_deep_checked(tmp_path):
    root = tree_with(tmp_path, 3, 4, 5, pointer=5)
    with open(root / "global_step_5" / "policy" / "model_world_size_2_rank_1.pt", "r+b") as f:
        f.truncate(100)
    with open(root / "global_step_4" / "trainer_state.pt", "r+b") as f:
        f.truncate(100)
    assert run_json("list", str(root))["newest_complete"] == 5  # names and sizes alone cannot tell
    code, out, err = run("resolve-resume", str(root))
    assert code == 6 and "model_world_size_2_rank_1.pt" in err and "truncated" in err
    doc = run_json("resolve-resume", str(root), "--fallback")
    assert doc["fallback"]["step"] == 3


@pytest.mark.parametrize("typed,hint", [("s3:/no-bucket/run", "s3://no-bucket/run"),
                                        ("gs:/b/run", "gs://b/run"), ("nowhere/run", None)])
def test_a_path_that_does_not_exist_warns(tmp_path, monkeypatch, typed, hint):
    monkeypatch.chdir(tmp_path)
    doc = run_json("resolve-resume", typed)
    assert doc["skyrl_action"] == "scratch" and doc["resumable"]
    warning = next(w for w in doc["warnings"] if "does not exist" in w)
    assert warning.startswith(typed)
    assert (f"did you mean {hint}?" in warning) if hint else ("did you mean" not in warning)
    code, out, err = run("resolve-resume", typed, "--require-checkpoint")
    assert code == 6 and "nothing would be loaded" in err
    code, out, err = run("resolve-resume", typed)
    assert code == 0 and "warning:" in out and "start from scratch" in out


def test_require_checkpoint(tmp_path):
    root = tree_with(tmp_path, 5)  # no pointer: SkyRL starts from scratch
    run_json("resolve-resume", str(root), "--require-checkpoint", expect=6)
    assert run_json("resolve-resume", str(root), "--require-checkpoint", "--fallback")["fallback"]["step"] == 5
    run_json("resolve-resume", "--mode", "none", "--require-checkpoint", expect=6)
    tb.pointer(str(root), 5)
    assert run_json("resolve-resume", str(root), "--require-checkpoint")["step"] == 5
