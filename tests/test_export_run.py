"""``export-hf TREE --out EXPORT_ROOT --steps all|latest|N[,M...]``: a whole run at once, on the
bundled example (a real FSDP2 run: steps 1-3 complete, pointer 3, step 4 cut off before
trainer_state.pt), the FSDP fixture tree (steps 2 and 4 with a critic) and the S3 server."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from cli_runner import run, run_json
from ckptctl.ops.export import export_hf

EXAMPLE = Path(__file__).resolve().parent.parent / "examples" / "skyrl-run"


@pytest.fixture
def example(tmp_path) -> Path:
    """A fresh copy of the example run (fresh modification times: one run, step 4 in progress)."""
    return Path(shutil.copytree(EXAMPLE, tmp_path / "ckpts", copy_function=shutil.copy))


def export_tensors(path: Path) -> dict[str, torch.Tensor]:
    state: dict[str, torch.Tensor] = {}
    for shard in sorted(path.glob("*.safetensors")):
        state.update(load_file(str(shard)))
    return state


def statuses(doc: dict) -> dict[int, str]:
    return {s["step"]: s["status"] for s in doc["steps"]}


def mtimes(root: Path) -> dict[str, int]:
    return {str(p.relative_to(root)): p.stat().st_mtime_ns for p in sorted(root.rglob("*")) if p.is_file()}


def test_all_exports_every_complete_step_and_a_rerun_only_new_ones(example, tmp_path):
    out = tmp_path / "exports"
    doc = run_json("export-hf", example, "--out", out, "--steps", "all")
    assert statuses(doc) == {1: "exported", 2: "exported", 3: "exported", 4: "in progress"}
    assert doc["exit_code"] == 0 and doc["exported"] == 3 and doc["skipped"] == 1
    assert "missing trainer_state.pt" in doc["steps"][3]["reason"]
    assert sorted(p.name for p in out.iterdir()) == ["global_step_1", "global_step_2", "global_step_3"]
    for s in doc["steps"][:3]:
        assert s["destination"] == str(out / s["name"] / "policy") and s["export"]["verified"]

    # each step's export is exactly the one-step export of that step
    single = tmp_path / "single"
    export_hf(str(example / "global_step_2"), str(single))
    assert (out / "global_step_2" / "policy" / "model.safetensors").read_bytes() == \
        (single / "model.safetensors").read_bytes()
    # and the steps differ (a real training run): nothing was exported twice from one step
    one, three = export_tensors(out / "global_step_1" / "policy"), export_tensors(out / "global_step_3" / "policy")
    assert one.keys() == three.keys() and any(not torch.equal(one[k], three[k]) for k in one)

    # the tree list reads is an export tree with three complete steps
    listing = run_json("list", out, "--deep")
    assert listing["kind"] == "export" and [s["step"] for s in listing["steps"] if s["complete"]] == [1, 2, 3]

    # a rerun writes nothing
    before = mtimes(out)
    doc = run_json("export-hf", example, "--out", out, "--steps", "all")
    assert statuses(doc) == {1: "already exported", 2: "already exported", 3: "already exported",
                             4: "in progress"}
    assert mtimes(out) == before

    # training finishes step 4 and moves the pointer: only step 4 is exported
    shutil.copy(example / "global_step_3" / "trainer_state.pt", example / "global_step_4" / "trainer_state.pt")
    (example / "latest_ckpt_global_step.txt").write_text("4")
    doc = run_json("export-hf", example, "--out", out, "--steps", "all")
    assert statuses(doc) == {1: "already exported", 2: "already exported", 3: "already exported", 4: "exported"}
    assert {k: v for k, v in mtimes(out).items() if not k.startswith("global_step_4")} == before
    assert (out / "global_step_4" / "policy" / "config.json").is_file()


def test_latest_and_named_steps(example, tmp_path):
    out = tmp_path / "exports"
    doc = run_json("export-hf", example, "--out", out, "--steps", "latest")
    assert statuses(doc) == {3: "exported"}
    assert any("pointer target" in w for w in doc["warnings"])
    doc = run_json("export-hf", example, "--out", out, "--steps", "1, 3")
    assert statuses(doc) == {1: "exported", 3: "already exported"}
    assert sorted(p.name for p in out.iterdir()) == ["global_step_1", "global_step_3"]


def test_named_incomplete_or_missing_steps_are_refused_before_anything_is_written(example, tmp_path):
    out = tmp_path / "exports"
    code, stdout, err = run("export-hf", example, "--out", out, "--steps", "2,4")
    assert code == 1 and "global_step_4" in err and "missing trainer_state.pt" in err and "nothing was exported" in err
    assert not out.exists()
    code, _, err = run("export-hf", example, "--out", out, "--steps", "2,9")
    assert code == 3 and "global_step_9" in err and "1, 2, 3, 4" in err
    assert not out.exists()
    for bad in ("last", "2-3", "", "-1"):
        code, _, err = run("export-hf", example, "--out", out, "--steps", bad)
        assert code == 2 and "--steps" in err, (bad, err)
    code, _, err = run("export-hf", example / "global_step_2", "--out", out, "--steps", "all")
    assert code == 2 and "needs a checkpoint tree" in err
    assert not out.exists()


def test_a_damaged_source_step_is_named_and_the_others_exported(example, tmp_path):
    rank_file = example / "global_step_2" / "policy" / "model_world_size_2_rank_1.pt"
    os.truncate(rank_file, 100)
    out = tmp_path / "exports"
    code, stdout, err = run("export-hf", example, "--out", out, "--steps", "all", "--json")
    doc = json.loads(stdout)
    assert code == 1 and doc["exit_code"] == 1
    assert statuses(doc) == {1: "exported", 2: "refused", 3: "exported", 4: "in progress"}
    assert "model_world_size_2_rank_1.pt" in doc["steps"][1]["reason"]
    assert not (out / "global_step_2").exists()
    # named, it stops the run before any work
    code, _, err = run("export-hf", example, "--out", tmp_path / "other", "--steps", "2")
    assert code == 1 and "model_world_size_2_rank_1.pt" in err and not (tmp_path / "other").exists()


def test_a_truncated_export_is_redone_and_foreign_files_are_never_replaced(example, tmp_path):
    out = tmp_path / "exports"
    run_json("export-hf", example, "--out", out, "--steps", "1,2,3")
    shard = out / "global_step_2" / "policy" / "model.safetensors"
    good = shard.read_bytes()
    os.truncate(shard, 1000)
    notes = out / "global_step_3" / "policy" / "NOTES.md"
    notes.write_text("mine")
    doc = run_json("export-hf", example, "--out", out, "--steps", "all")
    assert statuses(doc) == {1: "already exported", 2: "re-exported", 3: "already exported", 4: "in progress"}
    assert "truncated" in doc["steps"][1]["reason"] and "model.safetensors" in doc["steps"][1]["reason"]
    assert shard.read_bytes() == good

    # --overwrite re-exports complete steps, but a directory holding files no export has stays
    code, stdout, _ = run("export-hf", example, "--out", out, "--steps", "all", "--overwrite", "--json")
    doc = json.loads(stdout)
    assert code == 2 and doc["exit_code"] == 2
    assert statuses(doc) == {1: "re-exported", 2: "re-exported", 3: "failed", 4: "in progress"}
    assert "NOTES.md" in doc["steps"][2]["reason"]
    assert notes.read_text() == "mine" and (out / "global_step_3" / "policy" / "config.json").is_file()


def test_out_must_not_be_a_checkpoint_tree(example, tmp_path):
    other = Path(shutil.copytree(EXAMPLE, tmp_path / "other-run"))
    before = mtimes(other)
    code, _, err = run("export-hf", example, "--out", other, "--steps", "all")
    assert code == 2 and "checkpoint tree" in err
    assert mtimes(other) == before
    code, _, err = run("export-hf", example, "--out", example / "exports", "--steps", "all")
    assert code == 2


def test_critic_of_every_step_of_the_fixture_tree(fsdp_tree, tmp_path):
    out = tmp_path / "exports"
    doc = run_json("export-hf", fsdp_tree, "--out", out, "--steps", "all", "--component", "critic")
    assert statuses(doc) == {2: "exported", 4: "exported"} and doc["component"] == "critic"
    for step in (2, 4):
        got = export_tensors(out / f"global_step_{step}" / "critic")
        ref = load_file(str(fsdp_tree.parent / "ckpts.reference" / f"global_step_{step}" / "critic"
                            / "reference_full_state.safetensors"))
        ref = {k: v for k, v in ref.items() if not k.endswith("rotary_emb.inv_freq")}
        assert got.keys() == ref.keys()
        assert all(torch.equal(got[k], ref[k]) for k in ref)
    # the policy goes next to it, into the same export root
    doc = run_json("export-hf", fsdp_tree, "--out", out, "--steps", "all", "--dtype", "bf16")
    assert statuses(doc) == {2: "exported", 4: "exported"}
    assert sorted(p.name for p in (out / "global_step_4").iterdir()) == ["critic", "policy"]
    assert {t.dtype for t in export_tensors(out / "global_step_4" / "policy").values()} == {torch.bfloat16}


def test_s3_run_to_s3_exports_then_skips(example, make_backend, tmp_path):
    s3 = make_backend("s3")
    src = s3.new_root()
    s3.upload_dir(str(example), src)
    out = s3.new_root()
    # the transfer options reach every step's export (a tight budget, several requests in flight)
    doc = run_json("export-hf", src, "--out", out, "--steps", "all", "--concurrency", "3", "--max-memory", "2MiB")
    assert doc["source"] == src and doc["destination"] == out
    assert statuses(doc)[3] == "exported" and statuses(doc)[1] == "exported"
    files = s3.list_files(out)
    assert {f"global_step_{n}/policy/model.safetensors" for n in (1, 2, 3)} <= set(files)
    assert not any(f.startswith("global_step_4") for f in files)
    doc = run_json("export-hf", src, "--out", out, "--steps", "all")
    assert doc["exported"] == 0 and statuses(doc)[2] == "already exported"
    local = tmp_path / "local"
    export_hf(str(example / "global_step_3"), str(local))
    assert s3.get(s3.join(out, "global_step_3/policy/model.safetensors")) == (local / "model.safetensors").read_bytes()
