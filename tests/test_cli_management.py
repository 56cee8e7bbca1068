"""list, prune and resolve-resume through the CLI, on local disk, S3 (moto server) and GCS (emulator)."""

from __future__ import annotations

import json
import os

import pytest
from typer.testing import CliRunner

import treebuilder as tb
from ckptctl.cli import app

runner = CliRunner()


def run(*args: str, input: str | None = None):
    result = runner.invoke(app, list(args), input=input)
    return result.exit_code, result.stdout, result.stderr


def run_json(*args: str, expect: int = 0) -> dict:
    code, out, err = run(*args, "--json")
    assert code == expect, (code, out, err)
    return json.loads(out)


@pytest.fixture
def make_tree(store_backend, tmp_path):
    """Build a tree locally with ``builder(dir)``, place it on the backend, return its URL."""
    counter = iter(range(1000))

    def make(builder) -> str:
        local = tmp_path / f"src{next(counter)}"
        local.mkdir()
        builder(str(local))
        url = store_backend.new_root()
        store_backend.upload_dir(str(local), url)
        return url

    return make


def standard_tree(d: str) -> None:
    """Steps 10..50: 20 lacks a rank file, 50 is an unfinished save above the pointer (40)."""
    for step in (10, 20, 30, 40):
        tb.fsdp_step(d, step, missing=("policy/model_world_size_2_rank_1.pt",) if step == 20 else ())
    tb.fsdp_step(d, 50, trainer_state=False)
    tb.pointer(d, 40)


# -- list -----------------------------------------------------------------------------------

def test_list_reports_steps_pointer_and_completeness(make_tree):
    url = make_tree(standard_tree)
    doc = run_json("list", url)
    steps = {s["step"]: s for s in doc["steps"]}
    assert sorted(steps) == [10, 20, 30, 40, 50]
    assert doc["pointer"]["step"] == 40 and doc["pointer_target"] == 40
    assert doc["newest_complete"] == 40
    assert steps[10]["complete"] and steps[10]["backend"] == "fsdp" and steps[10]["world_size"] == 2
    assert steps[20]["problems"] == ["policy: missing model rank files 1 of world size 2"]
    assert steps[50]["problems"] == ["missing trainer_state.pt"]
    # 3 kinds x 2 ranks x 300 bytes + hf files + trainer_state + data + fsdp_config.json
    config_len = len(json.dumps({"fsdp_strategy": "fsdp2", "world_size": 2}))
    assert steps[10]["bytes"] == 6 * 300 + 2 * 300 + 2 * 300 + config_len
    assert steps[10]["mtime"] is not None
    assert any("above the pointer" in w and "global_step_50" in w for w in doc["warnings"])


def test_list_human_table_marks_pointer_and_newest(make_tree):
    url = make_tree(standard_tree)
    code, out, _ = run("list", url)
    assert code == 0
    row40 = next(line for line in out.splitlines() if line.strip("│ ").startswith("40"))
    assert "pointer" in row40 and "newest" in row40 and "complete" in row40
    assert "global_step_20: policy: missing model rank files 1 of world size 2" in out
    assert "warning:" in out and "global_step_50" in out


def test_list_warns_about_dangling_pointer_and_bad_names(make_tree):
    def build(d):
        tb.fsdp_step(d, 1)
        tb.pointer(d, 7)
        os.makedirs(os.path.join(d, "global_step_final"))
        tb._write(os.path.join(d, "global_step_final", "x.pt"))

    doc = run_json("list", make_tree(build))
    assert doc["pointer_target"] is None
    assert any("global_step_7/ does not exist" in w for w in doc["warnings"])
    assert doc["unparsable"] == ["global_step_final"]


def test_list_pointer_to_incomplete_step(make_tree):
    def build(d):
        tb.fsdp_step(d, 1)
        tb.fsdp_step(d, 2, zero=("policy/optim_world_size_2_rank_0.pt",))
        tb.pointer(d, 2)

    doc = run_json("list", make_tree(build))
    assert doc["newest_complete"] == 1
    assert any("points to step 2, which is incomplete" in w and "zero-byte file optim_world_size_2_rank_0.pt" in w
               for w in doc["warnings"])


def test_list_garbage_pointer_is_a_warning(make_tree):
    def build(d):
        tb.fsdp_step(d, 1)
        tb.pointer(d, "not-a-number\n")

    doc = run_json("list", make_tree(build))
    assert doc["pointer"]["error"] and doc["pointer"]["step"] is None
    assert any("unusable" in w for w in doc["warnings"])


def test_list_recognises_every_backend_layout(make_tree):
    def build(d):
        tb.megatron_step(d, 1, ranks=3)
        tb.megatron_step(d, 2, nested=True)
        tb.megatron_step(d, 3, metadata_json=False)
        tb.documented_step(d, 4, world=8)
        tb.fsdp_step(d, 5, world=3, critic=True, missing=("critic/extra_state_world_size_3_rank_2.pt",))
        tb.fsdp_step(d, 6, optimizer=False)
        tb.pointer(d, 6)

    steps = {s["step"]: s for s in run_json("list", make_tree(build))["steps"]}
    assert steps[1]["backend"] == "megatron" and steps[1]["world_size"] == 3
    assert steps[2]["backend"] == "megatron" and steps[2]["components"][0]["nesting"] == "dist_ckpt"
    # the builder's .metadata holds filler bytes: list reads it (for the layout) and says so
    assert steps[1]["problems"] == ["policy/.metadata: corrupt or truncated (UnpicklingError)"]
    assert steps[2]["problems"] == ["policy/dist_ckpt/.metadata: corrupt or truncated (UnpicklingError)"]
    assert not steps[3]["complete"] and "metadata.json" in steps[3]["problems"][0]
    assert steps[4]["backend"] == "fsdp-single-file" and steps[4]["world_size"] == 8 and steps[4]["complete"]
    assert [c["name"] for c in steps[5]["components"]] == ["policy", "critic"]
    assert steps[5]["problems"] == ["critic: missing extra_state rank files 2 of world size 3"]
    assert steps[6]["complete"] and not steps[6]["has_optimizer"]


def test_list_export_tree(make_tree):
    def build(d):
        tb.export_step(d, 10)
        tb.export_step(d, 20, shards=3)
        tb.export_step(d, 30, shards=3, missing_shard=2)

    doc = run_json("list", make_tree(build))
    assert doc["kind"] == "export"
    steps = {s["step"]: s for s in doc["steps"]}
    assert steps[10]["complete"] and steps[20]["complete"] and steps[10]["backend"] == "hf"
    assert steps[30]["problems"] == ["policy: missing weight shards 2 of 3"]


# -- prune ----------------------------------------------------------------------------------

def test_prune_dry_run_deletes_nothing(make_tree, store_backend):
    url = make_tree(standard_tree)
    before = store_backend.list_files(url)
    doc = run_json("prune", url, "--keep", "1", "--dry-run")
    assert doc["deleted"] == [10, 20, 30] and doc["kept"] == [40, 50]
    assert doc["bytes_freed"] > 0 and doc["dry_run"]
    assert store_backend.list_files(url) == before


def test_prune_deletes_exactly_the_plan(make_tree, store_backend):
    url = make_tree(standard_tree)
    before = store_backend.list_files(url)
    doc = run_json("prune", url, "--keep", "2", "--yes")
    assert doc["deleted"] == [10, 20] and doc["kept"] == [30, 40, 50]
    after = store_backend.list_files(url)
    assert after == [f for f in before if not f.startswith(("global_step_10/", "global_step_20/"))]
    assert doc["deleted_files"] == len(before) - len(after)
    assert "latest_ckpt_global_step.txt" in after


def test_prune_keep_zero_still_keeps_pointer_and_newest(store_backend, tmp_path):
    def saved(d):
        for step in (1, 2):
            tb.fsdp_step(d, step)
        tb.pointer(d, 2)

    # Written after the pointer target (so this run's, not an older run's): 3 complete, 4 in progress.
    url = tb.place_runs(store_backend, str(tmp_path), [
        saved, lambda d: tb.fsdp_step(d, 3), lambda d: tb.fsdp_step(d, 4, trainer_state=False)])
    doc = run_json("prune", url, "--keep", "0", "--yes", "--include-above-pointer")
    # 3 is above the pointer but complete: it is the newest complete and is kept; 4 may be in progress.
    assert doc["deleted"] == [1] and doc["kept"] == [2, 3, 4]
    doc = run_json("prune", url, "--keep", "0", "--yes", "--include-above-pointer", "--include-in-progress")
    assert doc["deleted"] == [4]
    assert sorted({f.split("/")[0] for f in store_backend.list_files(url)}) == [
        "global_step_2", "global_step_3", "latest_ckpt_global_step.txt"]


def test_prune_counts_only_the_current_run(store_backend, tmp_path):
    """Stale higher steps from an older run do not push the current run's checkpoints out."""
    def older_run(d):
        for step in (500, 600):
            tb.fsdp_step(d, step)

    def current_run(d):
        for step in (10, 20, 30):
            tb.fsdp_step(d, step)
        tb.pointer(d, 30)

    url = tb.place_runs(store_backend, str(tmp_path), [older_run, current_run])
    doc = run_json("prune", url, "--keep", "2", "--dry-run")
    assert doc["kept"] == [20, 30, 500, 600] and doc["deleted"] == [10]
    assert doc["current_run"]["stale"] == [500, 600]


def test_prune_keep_every_and_drop_optimizer(make_tree, store_backend):
    def build(d):
        for step in range(1, 7):
            tb.fsdp_step(d, step)
        tb.megatron_step(d, 7)
        tb.fsdp_step(d, 8)
        tb.pointer(d, 8)

    url = make_tree(build)
    doc = run_json("prune", url, "--keep", "1", "--keep-every", "3", "--drop-optimizer", "--yes")
    assert doc["kept"] == [3, 6, 7, 8] and doc["optimizer_dropped"] == [1, 2, 4, 5] and doc["deleted"] == []
    step7 = next(s for s in doc["steps"] if s["step"] == 7)
    assert "Megatron" in step7["reasons"][0]
    files = store_backend.list_files(url)
    assert not any(f.startswith("global_step_1/") and "/optim_" in f for f in files)
    assert "global_step_1/policy/model_world_size_2_rank_0.pt" in files
    assert "global_step_3/policy/optim_world_size_2_rank_0.pt" in files
    steps = {s["step"]: s for s in run_json("list", url)["steps"]}
    assert steps[1]["complete"] and not steps[1]["has_optimizer"]


def test_prune_refuses_without_yes_off_a_terminal(make_tree, store_backend):
    url = make_tree(standard_tree)
    before = store_backend.list_files(url)
    code, out, err = run("prune", url, "--keep", "1")
    assert code == 2 and "--yes" in err and "Traceback" not in err + out
    assert store_backend.list_files(url) == before


def test_prune_declined_confirmation_deletes_nothing(make_tree, store_backend):
    from ckptctl.errors import AbortedError
    from ckptctl.ops.prune import prune

    url = make_tree(standard_tree)
    before = store_backend.list_files(url)
    seen = []
    with pytest.raises(AbortedError):
        prune(url, keep=1, confirm=lambda plan: seen.append(plan) or False)
    assert seen and seen[0].files_to_delete
    assert store_backend.list_files(url) == before


# -- resolve-resume -------------------------------------------------------------------------

def test_resume_latest_loads_pointer_step(make_tree):
    def build(d):
        tb.fsdp_step(d, 5, critic=True)
        tb.fsdp_step(d, 10, critic=True)
        tb.pointer(d, 10)

    url = make_tree(build)
    doc = run_json("resolve-resume", url)
    assert doc["skyrl_action"] == "resume" and doc["step"] == 10 and doc["resumable"]
    assert doc["resume_path"] == url.rstrip("/") + "/global_step_10"
    assert doc["loads"]["critic"].endswith("global_step_10/critic")
    assert doc["loads"]["data"].endswith("global_step_10/data.pt")


def test_resume_without_pointer_starts_from_scratch(make_tree):
    url = make_tree(lambda d: tb.fsdp_step(d, 5))
    doc = run_json("resolve-resume", url)
    assert doc["skyrl_action"] == "scratch" and doc["resumable"]
    assert any("no latest_ckpt_global_step.txt" in w for w in doc["warnings"])


def test_resume_mode_none():
    doc = run_json("resolve-resume", "--mode", "none")
    assert doc["skyrl_action"] == "scratch" and doc["resumable"]


def test_resume_incomplete_pointer_step_and_fallback(make_tree):
    def build(d):
        tb.fsdp_step(d, 5)
        tb.fsdp_step(d, 10, missing=("policy/optim_world_size_2_rank_1.pt",))
        tb.pointer(d, 10)

    url = make_tree(build)
    code, out, err = run("resolve-resume", url)
    assert code == 6 and "optim rank files 1" in err
    doc = run_json("resolve-resume", url, expect=6)
    assert doc["skyrl_action"] == "resume" and not doc["resumable"] and doc["problems"]
    doc = run_json("resolve-resume", url, "--fallback")
    assert doc["resumable"] and doc["fallback"]["step"] == 5
    assert doc["fallback"]["resume_path"] == url.rstrip("/") + "/global_step_5"


def test_resume_skyrl_failures(make_tree):
    def missing_state(d):
        tb.fsdp_step(d, 5, trainer_state=False)
        tb.pointer(d, 5)

    doc = run_json("resolve-resume", make_tree(missing_state), expect=6)
    assert doc["skyrl_action"] == "fail" and "Trainer state file not found" in doc["skyrl_error"]

    def dangling(d):
        tb.fsdp_step(d, 5)
        tb.pointer(d, 9)

    doc = run_json("resolve-resume", make_tree(dangling), expect=6)
    assert "Checkpoint path not found" in doc["skyrl_error"]

    def garbage(d):
        tb.fsdp_step(d, 5)
        tb.pointer(d, "five")

    doc = run_json("resolve-resume", make_tree(garbage), "--fallback")
    assert "invalid literal for int()" in doc["skyrl_error"] and doc["fallback"]["step"] == 5

    def stale(d):
        for step in (10, 20, 100):
            tb.fsdp_step(d, step)
        tb.pointer(d, 20)

    url = make_tree(stale)
    doc = run_json("resolve-resume", url, "--ckpt-interval", "10", expect=6)
    assert "Inconsistent checkpoint folder" in doc["skyrl_error"]
    assert run_json("resolve-resume", url, "--ckpt-interval", "80")["resumable"]
    assert any("--ckpt-interval" in w for w in run_json("resolve-resume", url)["warnings"])


def test_resume_from_path(make_tree):
    def build(d):
        tb.fsdp_step(d, 5)
        tb.fsdp_step(d, 6, optimizer=False)

    url = make_tree(build).rstrip("/")
    doc = run_json("resolve-resume", "--mode", "from_path", "--resume-path", url + "/global_step_5/")
    assert doc["resumable"] and doc["step"] == 5 and doc["resume_path"] == url + "/global_step_5"
    if "://" in url:
        assert any("pathlib" in w for w in doc["warnings"])
    doc = run_json("resolve-resume", "--mode", "from_path", "--resume-path", url + "/global_step_6", "--fallback")
    assert any("optimizer state is missing" in p for p in doc["problems"]) and doc["fallback"]["step"] == 5
    assert "must be specified" in run_json("resolve-resume", "--mode", "from_path", expect=6)["skyrl_error"]
    doc = run_json("resolve-resume", "--mode", "from_path", "--resume-path", url + "/step_5", expect=6)
    assert "global_step_" in doc["skyrl_error"]
    doc = run_json("resolve-resume", "--mode", "from_path", "--resume-path", url + "/global_step_9", expect=6)
    assert "Checkpoint path not found" in doc["skyrl_error"]


# -- bad input ------------------------------------------------------------------------------

def test_bad_paths_give_one_line_errors(store_backend, make_tree):
    missing = store_backend.new_root().rstrip("/") + "/nothing-here"
    code, out, err = run("list", missing)
    assert code == 3 and err.startswith("ckptctl: error:") and len(err.strip().splitlines()) == 1
    not_a_tree = make_tree(lambda d: tb._write(os.path.join(d, "notes.txt")))
    code, out, err = run("list", not_a_tree)
    assert code == 5 and "not a checkpoint tree" in err
    step_dir = make_tree(lambda d: tb.fsdp_step(d, 3)).rstrip("/") + "/global_step_3"
    code, out, err = run("prune", step_dir, "--keep", "1", "--yes")
    assert code == 5 and "single step directory" in err


@pytest.mark.parametrize("scheme", ["s3", "gs"])
def test_missing_bucket(scheme, s3_server, gcs_server):
    code, out, err = run("list", f"{scheme}://no-such-bucket-ckptctl/run")
    assert code == 3 and "not found" in err and len(err.strip().splitlines()) == 1


def test_usage_errors():
    code, out, err = run("list", "ftp://host/x")
    assert code == 2 and "unsupported URL scheme" in err
    code, out, err = run("resolve-resume", "--mode", "bogus")
    assert code == 2 and "--mode" in err


def test_no_credentials_is_a_one_line_error(no_aws_credentials):
    code, out, err = run("list", "s3://ckptctl-test/run")
    assert code == 4 and "no credentials" in err and len(err.strip().splitlines()) == 1


@pytest.mark.parametrize("unknown_key", [False, True], ids=["denied-by-policy", "unknown-key"])
def test_access_denied_lists_and_deletes_nothing(s3_denied, monkeypatch, unknown_key):
    s3_denied.use(monkeypatch, unknown_key=unknown_key)
    for args in (["list", s3_denied.url], ["prune", s3_denied.url, "--keep", "0", "--yes"],
                 ["resolve-resume", s3_denied.url]):
        code, out, err = run(*args)
        assert code == 4, (args, code, err)
        assert "access denied" in err and "Traceback" not in err and len(err.strip().splitlines()) == 1
    assert s3_denied.list_keys() == sorted("ckpt/" + k for k in s3_denied.files)


def test_console_script_end_to_end(tmp_path):
    """The installed console script: real process, exit codes, nothing on stderr on success."""
    import subprocess
    import sys

    standard_tree(str(tmp_path))
    exe = os.path.join(os.path.dirname(sys.executable), "ckptctl")
    done = subprocess.run([exe, "list", str(tmp_path), "--json"], capture_output=True, text=True)
    assert done.returncode == 0 and json.loads(done.stdout)["newest_complete"] == 40
    done = subprocess.run([exe, "resolve-resume", str(tmp_path / "nope")], capture_output=True, text=True)
    assert done.returncode == 0 and "start from scratch" in done.stdout
    done = subprocess.run([exe, "prune", str(tmp_path), "--keep", "1"], capture_output=True, text=True,
                          stdin=subprocess.DEVNULL)
    assert done.returncode == 2 and done.stderr.startswith("ckptctl: error:")
