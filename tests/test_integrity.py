"""Deep checks (ckptctl.formats.integrity, ``list --deep``, ``inspect``) on real checkpoints
written by torch FSDP2, megatron-core and save_pretrained, damaged in copies."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest

from cli_runner import run, run_json
from ckptctl.formats.integrity import deep_check_component, deep_check_step, deep_check_steps
from ckptctl.storage import open_store
from ckptctl.tree import classify_component, scan_tree
from realckpt.fsdp_fixtures import FSDP_VARIANTS
from realckpt.megatron_fixtures import HF_EXPORTS, MEGATRON_VARIANTS


def component_of(directory: Path):
    """A component classified from its own directory, as scan_tree does (``parent``, ``comp``)."""
    parent = open_store(str(directory.parent))
    files = parent.child(directory.name).walk()
    return parent, classify_component(parent, "policy", directory.name, files)


def step_tree(tmp_path: Path, component_dir: Path, fsdp_tree: Path, *, step: int = 1, export: bool = False) -> Path:
    """A tree holding one step whose policy/ is a copy of ``component_dir``; a training step gets
    the real trainer_state.pt and data.pt of the FSDP tree's step 4 and a pointer."""
    root = tmp_path / ("export" if export else "tree")
    step_dir = root / f"global_step_{step}"
    shutil.copytree(component_dir, step_dir / "policy")
    if not export:
        for name in ("trainer_state.pt", "data.pt"):
            shutil.copy(fsdp_tree / "global_step_4" / name, step_dir / name)
        (root / "latest_ckpt_global_step.txt").write_text(str(step))
    return root


def truncate(path: Path, size: int) -> None:
    assert path.stat().st_size > size
    os.truncate(path, size)


# -- no false positives: every real fixture is sound ------------------------------------------

@pytest.mark.parametrize("name", sorted(FSDP_VARIANTS))
def test_every_fsdp_fixture_passes(fsdp_ckpts, name):
    parent, comp = component_of(fsdp_ckpts[name].path)
    assert comp.complete, comp.problems
    assert deep_check_component(parent, comp) == []
    assert comp.complete


@pytest.mark.parametrize("name", sorted(MEGATRON_VARIANTS))
def test_every_megatron_fixture_passes(megatron_ckpts, name):
    parent, comp = component_of(megatron_ckpts[name].out_dir)
    assert comp.backend == "megatron" and comp.complete, comp.problems
    assert deep_check_component(parent, comp) == []


@pytest.mark.parametrize("name", sorted(HF_EXPORTS))
def test_every_hf_export_passes(hf_export, name):
    parent, comp = component_of(hf_export[name].path)
    assert comp.backend == "hf" and comp.complete, comp.problems
    assert deep_check_component(parent, comp) == []


def test_fsdp_tree_with_step_files_passes(fsdp_tree):
    store = open_store(str(fsdp_tree))
    tree = scan_tree(store)
    assert deep_check_steps(store, tree.steps) == {2: [], 4: []}
    assert all(s.complete for s in tree.steps) and not any(s.notes for s in tree.steps)


# -- damage found ----------------------------------------------------------------------------------

def test_truncated_rank_file_and_trainer_state(fsdp_tree, tmp_path):
    root = tmp_path / "tree"
    shutil.copytree(fsdp_tree, root)
    truncate(root / "global_step_4/policy/model_world_size_2_rank_1.pt", 100)
    state = root / "global_step_2/trainer_state.pt"
    truncate(state, state.stat().st_size - 1024)
    store = open_store(str(root))
    tree = scan_tree(store)
    assert all(s.complete for s in tree.steps)  # names and sizes alone cannot tell
    found = deep_check_steps(store, tree.steps)
    assert found[4] == ["policy/model_world_size_2_rank_1.pt: truncated (100 bytes; no zip end record)"]
    assert len(found[2]) == 1 and found[2][0].startswith("trainer_state.pt: truncated (")
    assert not tree.step(4).complete and not tree.step(2).complete
    assert tree.step(4).policy.problems == ["model_world_size_2_rank_1.pt: truncated (100 bytes; no zip end record)"]
    assert tree.step(4).components["critic"].complete
    # a second check finds the same and repeats nothing
    assert deep_check_step(store, tree.step(4)) == found[4]
    assert tree.step(4).problems.count(found[4][0]) == 1


@pytest.mark.parametrize("damage", ["distcp_100", "distcp_minus_1k", "distcp_deleted"])
def test_damaged_megatron_step(megatron_ckpts, fsdp_tree, tmp_path, damage):
    root = step_tree(tmp_path, megatron_ckpts["tp2pp2"].out_dir, fsdp_tree)
    target = root / "global_step_1/policy/__1_0.distcp"
    if damage == "distcp_100":
        truncate(target, 100)
    elif damage == "distcp_minus_1k":
        truncate(target, target.stat().st_size - 1024)
    else:
        target.unlink()
    store = open_store(str(root))
    tree = scan_tree(store)
    assert tree.step(1).complete  # the cheap path cannot tell
    (problem,) = deep_check_steps(store, tree.steps)[1]
    if damage == "distcp_deleted":
        assert problem == "policy/__1_0.distcp: missing (named in .metadata)"
    else:
        assert problem.startswith("policy/__1_0.distcp: truncated (") and ".metadata has chunks up to" in problem
    assert not tree.step(1).complete


def test_verl_nesting_and_common_pt(megatron_ckpts, fsdp_tree, tmp_path):
    root = step_tree(tmp_path, megatron_ckpts["qwen2_verl"].out_dir, fsdp_tree)
    store = open_store(str(root))
    assert deep_check_steps(store, scan_tree(store).steps) == {1: []}
    truncate(root / "global_step_1/policy/dist_ckpt/__0_1.distcp", 100)
    truncate(root / "global_step_1/policy/dist_ckpt/common.pt", 100)
    (root / "global_step_1/policy/dist_ckpt/metadata.json").write_text("{not json")
    problems = deep_check_steps(store, scan_tree(store).steps)[1]
    assert [p.split(":")[0] for p in problems] == [
        "policy/dist_ckpt/common.pt", "policy/dist_ckpt/__0_1.distcp", "policy/dist_ckpt/metadata.json"]


def test_hf_export_tree(hf_export, fsdp_tree, tmp_path):
    root = step_tree(tmp_path, hf_export["sharded"].path, fsdp_tree, export=True)
    policy = root / "global_step_1/policy"
    store = open_store(str(root))
    assert deep_check_steps(store, scan_tree(store).steps) == {1: []}
    shard = policy / "model-00002-of-00005.safetensors"
    truncate(shard, shard.stat().st_size - 1024)
    index = json.loads((policy / "model.safetensors.index.json").read_text())
    index["weight_map"]["extra.weight"] = "model-00009-of-00009.safetensors"
    (policy / "model.safetensors.index.json").write_text(json.dumps(index))
    tree = scan_tree(store)
    assert tree.step(1).complete
    problems = deep_check_steps(store, tree.steps)[1]
    assert problems[0].startswith("policy/model-00002-of-00005.safetensors: truncated (")
    assert problems[1] == ("policy/model.safetensors.index.json: names missing shards: "
                           "model-00009-of-00009.safetensors")


def test_garbage_appended_and_legacy_files(fsdp_tree, tmp_path):
    import torch

    root = tmp_path / "tree"
    shutil.copytree(fsdp_tree, root)
    with open(root / "global_step_4/policy/extra_state_world_size_2_rank_0.pt", "ab") as f:
        f.write(b"\0" * 10)
    (root / "global_step_4/policy/optim_world_size_2_rank_1.pt").write_bytes(b"not a checkpoint at all" * 10)
    torch.save({"global_step": 2}, root / "global_step_2/trainer_state.pt", _use_new_zipfile_serialization=False)
    store = open_store(str(root))
    tree = scan_tree(store)
    found = deep_check_steps(store, tree.steps)
    assert found[4] == [
        "policy/extra_state_world_size_2_rank_0.pt: the zip end record is not at the end of the file "
        "(data appended, or damaged)",
        "policy/optim_world_size_2_rank_1.pt: not a torch.save file (230 bytes; no zip end record)"]
    assert found[2] == [] and tree.step(2).complete  # a legacy file cannot be size-checked: a note only
    assert "trainer_state.pt: legacy (pre-zip) torch.save file: its size cannot be checked" in tree.step(2).notes


def test_cost_is_one_small_read_per_file_on_s3(fsdp_tree, make_backend, s3_request_counter):
    backend = make_backend("s3")
    url = backend.new_root()
    backend.upload_dir(str(fsdp_tree), url)
    store = open_store(url)
    tree = scan_tree(store)
    s3_request_counter.reset()
    assert deep_check_steps(store, tree.steps) == {2: [], 4: []}
    checked = [f for s in tree.steps for f in s.files if f.path.endswith(".pt")]
    # one ranged GET of each file's tail, nothing else (no HEAD, no listing)
    assert s3_request_counter.count() == s3_request_counter.count("GET") == len(checked), \
        s3_request_counter.summary()


# -- list --deep and inspect through the CLI ---------------------------------------------------------

def test_list_deep_on_every_store(fsdp_tree, megatron_ckpts, store_backend, tmp_path):
    local = tmp_path / "tree"
    shutil.copytree(fsdp_tree, local)
    truncate(local / "global_step_4/policy/model_world_size_2_rank_1.pt", 100)
    megatron = step_tree(tmp_path / "mg", megatron_ckpts["tp2"].out_dir, fsdp_tree, step=6) / "global_step_6"
    distcp = megatron / "policy/__1_1.distcp"
    truncate(distcp, distcp.stat().st_size - 1024)
    shutil.copytree(megatron, local / "global_step_6")
    url = store_backend.new_root()
    store_backend.upload_dir(str(local), url)

    plain = run_json("list", url)  # the cheap path: listing, pointer, and Megatron's .metadata
    assert [s["complete"] for s in plain["steps"]] == [True, True, False]
    (megatron_problem,) = plain["steps"][2]["problems"]
    assert megatron_problem.startswith("policy/__1_1.distcp: truncated (")
    assert plain["steps"][2]["components"][0]["layout"] == "TP2·PP1"

    deep = run_json("list", url, "--deep")
    step4 = deep["steps"][1]
    problem = "policy/model_world_size_2_rank_1.pt: truncated (100 bytes; no zip end record)"
    assert step4["complete"] is False and step4["problems"] == [problem]
    policy = next(c for c in step4["components"] if c["name"] == "policy")
    assert policy["complete"] is False and policy["problems"] == [problem.removeprefix("policy/")]
    assert deep["steps"][0]["complete"] and deep["newest_complete"] == 2
    assert any("points to step 4, which is incomplete" in w for w in deep["warnings"])
    (megatron_problem,) = deep["steps"][2]["problems"]
    assert megatron_problem.startswith("policy/__1_1.distcp: truncated (") and deep["steps"][2]["complete"] is False

    code, out, _ = run("list", url, "--deep")
    assert code == 0 and f"global_step_4: {problem}" in out and "incomplete" in out


def test_list_deep_megatron_and_hf(megatron_ckpts, hf_export, fsdp_tree, tmp_path):
    root = step_tree(tmp_path, megatron_ckpts["tp2"].out_dir, fsdp_tree)
    truncate(root / "global_step_1/policy/__0_0.distcp", 100)
    for flags in ((), ("--deep",)):  # plain list reads .metadata too
        (problem,) = run_json("list", str(root), *flags)["steps"][0]["problems"]
        assert problem.startswith("policy/__0_0.distcp: truncated (100 bytes; .metadata has chunks up to ")

    export = step_tree(tmp_path, hf_export["single"].path, fsdp_tree, export=True)
    shard = export / "global_step_1/policy/model.safetensors"
    truncate(shard, shard.stat().st_size - 1024)
    doc = run_json("list", str(export), "--deep")
    assert doc["kind"] == "export" and doc["steps"][0]["complete"] is False
    assert doc["steps"][0]["problems"][0].startswith("policy/model.safetensors: truncated (")


def test_inspect_puts_problems_on_top(megatron_ckpts, hf_export, fsdp_tree, tmp_path):
    root = step_tree(tmp_path, megatron_ckpts["tp2"].out_dir, fsdp_tree)
    distcp = root / "global_step_1/policy/__1_1.distcp"
    truncate(distcp, distcp.stat().st_size - 1024)
    for target in (root, root / "global_step_1"):
        code, out, err = run("inspect", str(target))
        assert code == 0, err
        lines = out.splitlines()
        assert "incomplete" in lines[0]
        assert lines[1].startswith("├── problem: policy/__1_1.distcp: truncated (")
    doc = run_json("inspect", str(root / "global_step_1"))
    assert doc["complete"] is False and doc["problems"][0].startswith("policy/__1_1.distcp: truncated (")
    tree_doc = run_json("inspect", str(root))
    assert tree_doc["problems"] == doc["problems"] and tree_doc["tree"]["newest_complete"] is None
    assert doc["components"][0]["complete"] is False

    code, out, _ = run("inspect", str(root / "global_step_1/policy"))
    assert code == 0 and out.splitlines()[1].startswith("├── problem: __1_1.distcp: truncated (")

    export = step_tree(tmp_path, hf_export["sharded"].path, fsdp_tree, export=True)
    shard = export / "global_step_1/policy/model-00005-of-00005.safetensors"
    truncate(shard, shard.stat().st_size - 100)
    doc = run_json("inspect", str(export / "global_step_1/policy"))
    assert doc["complete"] is False and doc["problems"][0].startswith("model-00005-of-00005.safetensors: truncated")


def test_inspect_sound_step_has_no_problems(fsdp_tree):
    doc = run_json("inspect", str(fsdp_tree / "global_step_4"))
    assert doc["complete"] is True and doc["problems"] == []
    code, out, _ = run("inspect", str(fsdp_tree / "global_step_4"))
    assert code == 0 and "complete" in out.splitlines()[0] and "problem:" not in out


def test_inspect_truncated_rank_file(fsdp_tree, tmp_path):
    """Issue 13: inspect read rank 0 only, said "complete" and mentioned nothing at the top."""
    root = tmp_path / "tree"
    shutil.copytree(fsdp_tree, root)
    truncate(root / "global_step_4/policy/model_world_size_2_rank_1.pt", 100)
    code, out, err = run("inspect", str(root / "global_step_4"))
    assert code == 0, err
    lines = out.splitlines()
    assert "incomplete" in lines[0]
    assert lines[1] == ("├── problem: policy/model_world_size_2_rank_1.pt: truncated (100 bytes; "
                        "no zip end record)")
    assert next(ln for ln in lines if "policy  fsdp" in ln).endswith("incomplete")


def test_list_deep_stays_light(fsdp_tree):
    from test_light_imports import heavy_modules_after

    assert heavy_modules_after(["list", str(fsdp_tree), "--deep"]) == []
