"""One notion of "the current run" (ckptctl.tree.CurrentRun) in prune, list, resolve-resume,
inspect TREE and export-hf TREE, on trees holding two runs: the current one at steps 3-5 and an
older one's 20 and 25, written first (older modification times; on S3/GCS uploaded first)."""

from __future__ import annotations

import shutil

import pytest

import treebuilder as tb
from cli_runner import run, run_json
from ckptctl.ops.export import chosen_step
from ckptctl.storage import open_store
from ckptctl.tree import scan_tree


def older_run(d: str) -> None:
    for step in (20, 25):  # its pointer file was replaced by the current run's (or lost)
        tb.fsdp_step(d, step)


def current_run(pointer):
    def build(d: str) -> None:
        for step in (3, 4, 5):
            tb.fsdp_step(d, step)
        if pointer is not None:
            tb.pointer(d, pointer)
    return build


def steps_left(backend, url: str) -> list[str]:
    return sorted({f.split("/")[0] for f in backend.list_files(url) if f.startswith("global_step_")})


@pytest.mark.parametrize("pointer", ["", "3\x00garbage", None], ids=["empty", "garbage", "missing"])
def test_unusable_pointer_refuses_to_delete_and_protects_the_latest_run(store_backend, tmp_path, pointer):
    url = tb.place_runs(store_backend, str(tmp_path), [older_run, current_run(pointer)])
    before = store_backend.list_files(url)

    listed = run_json("list", url)
    assert listed["newest_complete"] == 5, listed["current_run"]
    assert listed["current_run"]["stale"] == [20, 25] and listed["current_run"]["basis"] == "mtimes"
    assert any("two runs in one tree" in w and "global_step_25" in w for w in listed["warnings"])

    # Without --without-pointer nothing is deleted, with a one-line usage error.
    code, out, err = run("prune", url, "--keep", "1", "--yes")
    assert code == 2 and "--without-pointer" in err and len(err.strip().splitlines()) == 1
    assert store_backend.list_files(url) == before

    plan = run_json("prune", url, "--keep", "1", "--dry-run")
    assert plan["deleted"] == [3, 4] and plan["kept"] == [5, 20, 25]
    reasons = {s["step"]: s["reasons"] for s in plan["steps"]}
    assert "newest complete" in reasons[5] and not any("newest" in r for r in reasons[25])
    assert any("older run" in r for r in reasons[25])

    done = run_json("prune", url, "--keep", "1", "--yes", "--without-pointer")
    assert done["deleted"] == [3, 4]
    assert steps_left(store_backend, url) == ["global_step_20", "global_step_25", "global_step_5"]


def test_include_above_pointer_deletes_the_older_run_not_the_save_in_progress(store_backend, tmp_path):
    url = tb.place_runs(store_backend, str(tmp_path), [
        older_run, current_run(5),
        lambda d: tb.fsdp_step(d, 6, trainer_state=False, missing=("policy/optim_world_size_2_rank_1.pt",))])
    tree = scan_tree(open_store(url))
    run_ = tree.current_run
    assert run_.basis == "pointer" and [s.step for s in run_.stale] == [20, 25]
    assert [s.step for s in run_.in_progress] == [6]

    plan = run_json("prune", url, "--keep", "1", "--include-above-pointer", "--dry-run")
    assert plan["deleted"] == [3, 4, 20, 25] and plan["kept"] == [5, 6]
    step6 = next(s for s in plan["steps"] if s["step"] == 6)
    assert any("save in progress" in r for r in step6["reasons"])

    run_json("prune", url, "--keep", "1", "--include-above-pointer", "--yes")
    assert steps_left(store_backend, url) == ["global_step_5", "global_step_6"]
    # Only --include-in-progress lets it go (the save may still be running).
    run_json("prune", url, "--keep", "1", "--include-in-progress", "--yes")
    assert steps_left(store_backend, url) == ["global_step_5"]


def test_without_include_above_pointer_the_older_run_stays(make_backend, tmp_path):
    backend = make_backend("local")
    url = tb.place_runs(backend, str(tmp_path), [older_run, current_run(5)])
    doc = run_json("prune", url, "--keep", "1", "--yes")
    assert doc["deleted"] == [3, 4] and doc["kept"] == [5, 20, 25]
    warnings = run_json("list", url)["warnings"]
    assert any("written before global_step_5" in w and "global_step_20, global_step_25" in w for w in warnings)


def test_resolve_resume_fallback_stays_in_the_current_run(make_backend, tmp_path):
    backend = make_backend("local")
    url = tb.place_runs(backend, str(tmp_path), [older_run, current_run("garbage")])
    doc = run_json("resolve-resume", url, "--fallback")
    assert doc["skyrl_action"] == "fail" and "invalid literal for int()" in doc["skyrl_error"]
    assert doc["fallback"]["step"] == 5
    assert any("two runs in one tree" in w for w in doc["warnings"])


def _real_two_run_tree(fsdp_tree, dst, pointer: str) -> str:
    """A real FSDP tree: the fixture's step 4 as an older run's step 25 (aged), its step 2 as the
    current run's step 3, and ``pointer``."""
    shutil.copytree(fsdp_tree / "global_step_4", dst / "global_step_25")
    tb.age(str(dst / "global_step_25"), 3600)
    shutil.copytree(fsdp_tree / "global_step_2", dst / "global_step_3", copy_function=shutil.copyfile)
    (dst / "latest_ckpt_global_step.txt").write_text(pointer)
    return str(dst)


@pytest.mark.parametrize("pointer", ["", "7"], ids=["empty-pointer", "dangling-pointer"])
def test_inspect_and_export_of_a_tree_take_the_current_runs_step(fsdp_tree, tmp_path, pointer):
    root = _real_two_run_tree(fsdp_tree, tmp_path / "tree", pointer)
    tree = scan_tree(open_store(root))
    assert chosen_step(tree).step == 3
    doc = run_json("inspect", root)
    assert doc["step"] == 3 and "global_step_3" in doc["warnings"][0]
    out = tmp_path / "hf"
    doc = run_json("export-hf", root, "--out", str(out))
    assert doc["step"] == 3 and doc["source"].endswith("global_step_3/policy")


def test_component_option_must_match_a_component_directory(fsdp_tree, tmp_path):
    policy = str(fsdp_tree / "global_step_4" / "policy")
    for args in (["export-hf", policy, "--out", str(tmp_path / "o"), "--component", "critic"],
                 ["inspect", policy, "--component", "critic"]):
        code, out, err = run(*args)
        assert code == 2, (args, code, err)
        assert "--component critic" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "o").exists()
    doc = run_json("inspect", str(fsdp_tree / "global_step_4" / "critic"), "--component", "critic")
    assert doc["kind"] == "component"
