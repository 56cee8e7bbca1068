"""``ckptctl inspect`` on checkpoints written by torch FSDP2 / megatron-core / save_pretrained."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from cli_runner import run, run_json


def test_tree_inspects_the_pointer_target(fsdp_tree):
    doc = run_json("inspect", str(fsdp_tree))
    assert doc["kind"] == "tree" and doc["step"] == 4 and doc["tree"]["steps"] == [2, 4]
    comps = {c["name"]: c for c in doc["components"]}
    assert set(comps) == {"policy", "critic"}
    policy = comps["policy"]
    assert policy["backend"] == "fsdp" and policy["world_size"] == 2 and policy["complete"]
    assert policy["model_config"]["architectures"] == ["LlamaForCausalLM"]
    assert policy["format"]["optimizer"]["kind"] == "AdamW" and policy["format"]["optimizer"]["step"] == 4
    assert policy["format"]["lr_scheduler"]["last_epoch"] == 4
    assert policy["format"]["rng"]["numpy"] is True
    assert doc["trainer_state"]["global_step"] == 4
    assert doc["trainer_state"]["config_summary"]["trainer.strategy"] == "fsdp2"
    assert doc["data_loader"]["batches_yielded"] > 0


def test_parameter_count_matches_the_reference(fsdp_ckpts):
    comp = fsdp_ckpts["w3_tied"]
    doc = run_json("inspect", str(comp.path))
    assert doc["kind"] == "component"
    ref = load_file(str(comp.reference_dir / "reference_full_state.safetensors"))
    policy = doc["components"][0]
    # the tied lm_head shares the embedding's storage: it is one parameter, counted once
    expected = sum(t.numel() for k, t in ref.items() if k != "lm_head.weight" and "inv_freq" not in k)
    assert policy["format"]["model"]["parameter_numel"] == expected
    assert policy["dtypes"] == {"float32": policy["tensor_count"]["model"]}


def test_lora_component_shows_its_adapter(fsdp_ckpts, tmp_path):
    comp = fsdp_ckpts["lora_w2"]
    lora = run_json("inspect", str(comp.path))["components"][0]["lora"]
    ref = load_file(str(comp.reference_dir / "reference_full_state.safetensors"))
    assert lora["peft_state_dict"] is True and lora["adapters"] == ["default"]
    assert lora["adapted_modules"] == len(comp.meta["lora_targets"]) == 14  # 7 projections x 2 layers
    assert lora["adapter_parameters"] == sum(ref[n].numel() for n in comp.meta["trainable_param_names"])
    assert lora["adapter_config"]["r"] == 4 and lora["adapter_config"]["rank_pattern"] == {"down_proj": 2}
    code, out, _ = run("inspect", str(comp.path))
    assert code == 0 and "LoRA" in out and "adapted_modules: 14" in out
    # without its adapter_config.json (SkyRL ignores errors saving lora_adapter/) it says so
    src = tmp_path / "policy"
    shutil.copytree(comp.path, src)
    (src / "lora_adapter" / "adapter_config.json").unlink()
    doc = run_json("inspect", str(src))
    assert "adapter_config" not in doc["components"][0]["lora"]
    assert any("cannot copy or merge" in w for w in doc["components"][0]["warnings"])
    # a plain model has no LoRA section
    assert run_json("inspect", str(fsdp_ckpts["w2"].path))["components"][0]["lora"] is None


def test_tensors_lists_every_tensor_with_global_shapes(fsdp_ckpts):
    comp = fsdp_ckpts["critic_w3"]
    doc = run_json("inspect", str(comp.path), "--tensors")
    tensors = {t["name"]: t for t in doc["components"][0]["tensors"]}
    ref = load_file(str(comp.reference_dir / "reference_full_state.safetensors"))
    for name, want in ref.items():
        assert tensors[name]["shape"] == list(want.shape), name
    assert tensors["value_head.weight"]["placements"] == ["Shard(dim=0)"]
    assert any(t["group"] == "optimizer" for t in tensors.values())


def test_step_and_config_output(fsdp_tree):
    step = str(fsdp_tree / "global_step_2")
    doc = run_json("inspect", step)
    assert doc["kind"] == "step" and doc["step"] == 2
    code, out, err = run("inspect", step, "--config")
    assert code == 0 and "trainer:" in out and "strategy: fsdp2" in out
    code, out, err = run("inspect", step, "--config", "--config-format", "json")
    assert code == 0 and json.loads(out)["trainer"]["strategy"] == "fsdp2"
    doc = run_json("inspect", step, "--config")
    assert doc["trainer_state"]["config"]["trainer"]["strategy"] == "fsdp2"


def test_megatron_component(megatron_ckpts):
    ckpt = megatron_ckpts["tp2pp2"]
    doc = run_json("inspect", str(ckpt.out_dir), "--tensors")
    comp = doc["components"][0]
    assert comp["backend"] == "megatron" and comp["complete"]
    assert comp["format"]["parallel"]["tp"] == 2 and comp["format"]["parallel"]["pp"] == 2
    ref = ckpt.reference_tensors()
    shapes = {t["name"]: t["shape"] for t in comp["tensors"]}
    for key, tensor in ref.items():
        assert shapes[key] == list(tensor.shape), key


def test_hf_export_and_single_files(hf_export):
    export = hf_export["sharded"]
    doc = run_json("inspect", str(export.path))
    comp = doc["components"][0]
    assert comp["backend"] == "hf" and comp["complete"]
    shard = sorted(p for p in os.listdir(export.path) if p.endswith(".safetensors"))[0]
    doc = run_json("inspect", str(export.path / shard))
    assert doc["kind"] == "file" and doc["file"]["format"] == "safetensors"


def test_single_pt_file(fsdp_ckpts):
    comp = fsdp_ckpts["w2"]
    doc = run_json("inspect", str(comp.path / "extra_state_world_size_2_rank_1.pt"))
    content = doc["file"]["content"]
    assert content["rank"] == 1 and content["world_size"] == 2 and "lr_scheduler" in content


def test_corrupt_and_malicious_files_are_one_line_errors(fsdp_ckpts, tmp_path):
    comp = fsdp_ckpts["w2"]
    copy = tmp_path / "policy"
    shutil.copytree(comp.path, copy)
    victim = copy / "model_world_size_2_rank_0.pt"
    victim.write_bytes(victim.read_bytes()[:200])
    code, out, err = run("inspect", str(copy))
    assert code == 1 and "model_world_size_2_rank_0.pt" in err and len(err.strip().splitlines()) == 1

    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    evil = tmp_path / "evil.pt"
    torch.save({"x": Evil()}, evil)
    code, out, err = run("inspect", str(evil))
    assert code == 1 and "system" in err and "refusing" in err
    assert not marker.exists()


def test_remote_step(fsdp_tree, store_backend):
    url = store_backend.new_root()
    store_backend.upload_dir(str(fsdp_tree / "global_step_4"), url.rstrip("/") + "/global_step_4")
    doc = run_json("inspect", url.rstrip("/") + "/global_step_4")
    assert doc["step"] == 4 and {c["name"] for c in doc["components"]} == {"policy", "critic"}
    assert doc["components"][0]["format"]["optimizer"]["step"] == 4


def test_a_tree_on_s3_is_listed_once(fsdp_tree, make_backend, s3_request_counter, tmp_path):
    """inspect, export-hf and verify of a whole tree make one listing of it and no other (finding
    what SRC is, scanning the tree and the components' readers share it): on a bucket of many
    objects each listing is several requests."""
    from urllib.parse import quote

    backend = make_backend("s3")
    url = backend.new_root()
    backend.upload_dir(str(fsdp_tree), url)
    whole_listing = f"prefix={quote(url.split('/', 3)[3] + '/', safe='')}&delimiter=&"
    for args in (["inspect", url], ["export-hf", url, "--out", str(tmp_path / "hf")], ["verify", url]):
        s3_request_counter.reset()
        run_json(*args)
        assert s3_request_counter.count(method="GET", query_contains=whole_listing) == 1, \
            (args[0], s3_request_counter.summary())
        assert s3_request_counter.count(method="GET", query_contains="delimiter=&") == 1, \
            (args[0], s3_request_counter.summary())  # no listing of a step or component either


def test_not_a_checkpoint(tmp_path):
    (tmp_path / "notes.txt").write_text("hello")
    code, out, err = run("inspect", str(tmp_path))
    assert code == 5 and "not a checkpoint" in err


def test_list_shows_the_megatron_layout(megatron_ckpts, tmp_path):
    """list reads each Megatron step's .metadata: the layout read from the chunks (not the bare
    world size), and a data file shorter than its chunks, without --deep."""
    example = Path(__file__).resolve().parent.parent / "examples" / "skyrl-run" / "global_step_1"
    for n, name in enumerate(("tp2", "tp2pp2"), start=1):
        step = tmp_path / "ckpts" / f"global_step_{n}"
        shutil.copytree(megatron_ckpts[name].out_dir, step / "policy")
        shutil.copy(example / "trainer_state.pt", step / "trainer_state.pt")
    (tmp_path / "ckpts" / "latest_ckpt_global_step.txt").write_text("2")
    for flags in ((), ("--deep",)):
        listed = run_json("list", tmp_path / "ckpts", *flags)
        assert [s["components"][0]["layout"] for s in listed["steps"]] == ["TP2·PP1", "TP2·PP2"]
        assert [s["world_size"] for s in listed["steps"]] == [2, 4]
    code, out, _ = run("list", tmp_path / "ckpts")
    assert code == 0 and "TP2·PP2" in out and "TP2·PP1" in out
    data = tmp_path / "ckpts" / "global_step_2" / "policy" / "__3_0.distcp"
    with open(data, "r+b") as f:
        f.truncate(data.stat().st_size - 1)
    listed = run_json("list", tmp_path / "ckpts")
    assert [s["complete"] for s in listed["steps"]] == [True, False]
    (problem,) = listed["steps"][1]["problems"]
    assert problem.startswith("policy/__3_0.distcp: truncated (") and ".metadata has chunks up to" in problem
