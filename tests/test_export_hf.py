"""``ckptctl export-hf`` end to end, on REAL checkpoints (the session fixtures ``fsdp_ckpts``,
``fsdp_tree`` and ``megatron_ckpts``), through the CLI (``--json``) and the library.

The truth is transformers itself: ``AutoModelForCausalLM.from_pretrained(out)`` must give the
same logits as the original tiny model (FSDP: the writer's ``reference_logits.safetensors``;
Megatron: ``from_pretrained`` of the reference ``save_pretrained`` dir of the same weights), and
a critic rebuilt from the exported config with ``load_state_dict(strict=True)`` the same values.
Object stores are the session's real emulators (moto S3, gcp-storage-emulator), checked through
independent clients (``storage_servers.Backend``).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")
from safetensors import safe_open  # noqa: E402
from safetensors.torch import load_file  # noqa: E402
from typer.testing import CliRunner  # noqa: E402

from ckptctl.cli import app  # noqa: E402
from ckptctl.formats.hf_writer import INCOMPLETE_MARKER, TMP_INFIX, verify_export  # noqa: E402
from ckptctl.ops.export import export_hf  # noqa: E402

REPO_ROOT = Path(__file__).resolve().parent.parent
HF_SIDE_FILES = ("generation_config.json", "tokenizer.json", "tokenizer_config.json", "chat_template.jinja")
runner = CliRunner()


@pytest.fixture(autouse=True)
def _offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("TRANSFORMERS_OFFLINE", "1")


# ------------------------------------------------------------------------------------------
# helpers
# ------------------------------------------------------------------------------------------
def cli(*args: str):
    result = runner.invoke(app, ["export-hf", *map(str, args)])
    return result.exit_code, result.stdout, result.stderr


def cli_json(src, out, *args: str) -> dict:
    code, stdout, stderr = cli(src, "--out", out, *args, "--json")
    assert code == 0, (code, stdout, stderr)
    assert stderr == ""  # no progress bar, no warnings: they are in the document
    return json.loads(stdout)  # the whole of stdout is one JSON document


def refused(src, out, *args: str, code: int, match: str) -> None:
    got, stdout, stderr = cli(src, "--out", out, *args, "--json")
    assert got == code, (got, stdout, stderr)
    assert json.loads(stdout) == {"error": stderr.removeprefix("ckptctl: error: ").rstrip("\n"), "exit_code": code}
    assert stderr.startswith("ckptctl: error: ") and match in stderr, stderr
    assert stderr.count("\n") == 1  # one line, no traceback


def load_dir(path) -> dict:
    """Every tensor of an HF dir (all shards), via safetensors' own reader."""
    out = {}
    for f in sorted(Path(path).glob("*.safetensors")):
        with safe_open(str(f), "pt") as sf:
            for k in sf.keys():
                assert k not in out, f"{k} in two shards"
                out[k] = sf.get_tensor(k)
    return out


def causal_lm(path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(path)).eval()


def logits_of(path, ids):
    with torch.no_grad():
        return causal_lm(path)(input_ids=ids).logits


def ref_logits(component):
    return load_file(str(component.reference_dir / "reference_logits.safetensors"))


def expected_fsdp_state(reference_dir: Path, config: dict) -> dict:
    """What save_pretrained would write: the reference state without non-persistent rotary
    buffers and without a tied lm_head."""
    state = load_file(str(reference_dir / "reference_full_state.safetensors"))
    state = {k: v for k, v in state.items() if not k.endswith("rotary_emb.inv_freq")}
    if config.get("tie_word_embeddings"):
        state.pop("lm_head.weight", None)
    return state


def assert_same_tensors(got: dict, want: dict) -> None:
    assert sorted(got) == sorted(want)
    for k in want:
        assert got[k].dtype == want[k].dtype and got[k].shape == want[k].shape, k
        assert torch.equal(got[k], want[k]), k


def assert_side_files(out: Path, hf_dir: Path) -> None:
    for name in HF_SIDE_FILES:
        assert (out / name).read_bytes() == (hf_dir / name).read_bytes(), name


def leftovers(out: Path) -> list[str]:
    """Temp siblings a run left next to a local destination."""
    return sorted(p.name for p in out.parent.iterdir() if p.name.startswith(f".{out.name}{TMP_INFIX}"))


def snapshot(path: Path) -> dict:
    return {str(p.relative_to(path)): p.stat().st_size for p in sorted(path.rglob("*"))}


def upload_component(backend, path: Path, rel: str) -> str:
    """Upload a component directory under a fresh root of an emulated bucket; returns its URL."""
    url = backend.new_root() + "/" + rel
    backend.upload_dir(str(path), url)
    return url


def copy_component(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def edit_config(hf_dir: Path, **changes) -> None:
    path = hf_dir / "config.json"
    config = json.loads(path.read_text())
    config.update(changes)
    path.write_text(json.dumps(config, indent=2))


def make_critic_from(out: Path):
    """SkyRL's critic class built from the EXPORTED config, loaded strictly from the export."""
    from transformers import AutoConfig

    from realckpt.tiny_models import make_critic

    config = AutoConfig.from_pretrained(str(out))
    critic = make_critic(config.model_type, persistent_buffers=True, config=config)
    # the exporter drops rotary inv_freq (transformers recomputes it): non-persistent again
    for module in critic.modules():
        if "inv_freq" in getattr(module, "_buffers", {}):
            module._non_persistent_buffers_set.add("inv_freq")
    critic.load_state_dict(load_dir(out), strict=True)
    return critic.eval()


# ------------------------------------------------------------------------------------------
# FSDP: logits, tensors, config, side files
# ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["w1", "w2", "w3_tied"])
def test_fsdp_policy_logits_match(fsdp_ckpts, tmp_path, name):
    comp = fsdp_ckpts[name]
    out = tmp_path / "out"
    doc = cli_json(comp.path, out)
    hf_src = comp.path / "huggingface"
    src_config = json.loads((hf_src / "config.json").read_text())

    assert doc["backend"] == "fsdp" and doc["component"] == "policy" and doc["verified"] is True
    assert doc["dtype"] == "source" and doc["dtypes_written"] == {"float32": doc["tensors"]}
    assert doc["shards"] == 1 and doc["files"][0] == "model.safetensors" and doc["files"][-1] == "config.json"
    assert sorted(os.listdir(out)) == sorted(["config.json", "model.safetensors", *HF_SIDE_FILES])
    assert leftovers(out) == []

    config = json.loads((out / "config.json").read_text())
    assert config["dtype"] == "float32"
    assert {k: v for k, v in config.items() if k not in ("dtype", "torch_dtype")} == \
        {k: v for k, v in src_config.items() if k not in ("dtype", "torch_dtype")}
    assert_side_files(out, hf_src)

    want = expected_fsdp_state(comp.reference_dir, src_config)
    assert_same_tensors(load_dir(out), want)
    assert doc["tensors"] == len(want)
    assert "model.rotary_emb.inv_freq" in doc["skipped"]  # replicated buffer: never written
    if src_config.get("tie_word_embeddings"):
        assert "lm_head.weight" in doc["skipped"]

    ref = ref_logits(comp)
    torch.testing.assert_close(logits_of(out, ref["input_ids"]), ref["logits"], rtol=0, atol=1e-5)


@pytest.mark.parametrize("name", ["w1_mesh", "verl", "documented", "fsdp1"])
def test_fsdp_other_layouts_tensors_match(fsdp_ckpts, tmp_path, name):
    comp = fsdp_ckpts[name]
    out = tmp_path / "out"
    summary = export_hf(str(comp.path), str(out))
    config = json.loads((comp.path / "huggingface" / "config.json").read_text())
    assert summary.verified and summary.dtypes_written == {"float32": summary.tensors}
    assert_same_tensors(load_dir(out), expected_fsdp_state(comp.reference_dir, config))


@pytest.mark.parametrize("name", ["critic_w3", "hsdp", "fsdp1_sharded"])
def test_fsdp_critic_values_match(fsdp_ckpts, tmp_path, name):
    """critic_w3: EMPTY value_head shards on ranks 1, 2; hsdp: (Replicate(), Shard(0)) on a
    (2, 2) mesh, pieces from one replica; fsdp1_sharded: legacy ShardedTensor. Replicated
    buffers (mean, std) are taken once."""
    comp = fsdp_ckpts[name]
    out = tmp_path / "out"
    summary = export_hf(str(comp.path), str(out))
    assert summary.verified
    config = json.loads((comp.path / "huggingface" / "config.json").read_text())
    want = expected_fsdp_state(comp.reference_dir, config)
    assert "value_head.weight" in want and "mean" in want and "std" in want
    assert_same_tensors(load_dir(out), want)

    ref = ref_logits(comp)
    with torch.no_grad():
        values = make_critic_from(out)(ref["input_ids"])
    torch.testing.assert_close(values, ref["values"], rtol=0, atol=1e-5)


def test_tree_pointer_target_policy_and_critic(fsdp_tree, tmp_path):
    """A tree as SRC: its pointer target (global_step_4); --component critic."""
    ref_root = Path(str(fsdp_tree) + ".reference") / "global_step_4"
    doc = cli_json(fsdp_tree, tmp_path / "policy")
    assert doc["step"] == 4 and doc["component"] == "policy"
    assert any("pointer target" in w for w in doc["warnings"])
    ref = load_file(str(ref_root / "policy" / "reference_logits.safetensors"))
    torch.testing.assert_close(logits_of(tmp_path / "policy", ref["input_ids"]), ref["logits"], rtol=0, atol=1e-5)

    doc = cli_json(fsdp_tree / "global_step_4", tmp_path / "critic", "--component", "critic")
    assert doc["component"] == "critic" and doc["step"] == 4
    assert any("value_head" in w for w in doc["warnings"])  # not an AutoModelForCausalLM head
    ref = load_file(str(ref_root / "critic" / "reference_logits.safetensors"))
    with torch.no_grad():
        values = make_critic_from(tmp_path / "critic")(ref["input_ids"])
    torch.testing.assert_close(values, ref["values"], rtol=0, atol=1e-5)


# ------------------------------------------------------------------------------------------
# Megatron
# ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["tp2", "tp2pp2", "qwen2_verl"])
def test_megatron_logits_match(megatron_ckpts, tmp_path, name):
    ck = megatron_ckpts[name]
    out = tmp_path / "out"
    doc = cli_json(ck.out_dir, out)
    assert doc["backend"] == "megatron" and doc["verified"] is True
    assert doc["dtypes_written"] == {"float32": doc["tensors"]}
    ref_dir = ck.reference_hf_dir
    # the same tensors save_pretrained wrote (unpadded vocab; a tied lm_head left out)
    assert_same_tensors(load_dir(out), load_dir(ref_dir))
    if ck.params["tie_embeddings"]:
        assert "lm_head.weight" not in load_dir(out)
    config = json.loads((out / "config.json").read_text())
    assert config["architectures"] == json.loads((ref_dir / "config.json").read_text())["architectures"]
    assert_side_files(out, ck.out_dir / "huggingface")

    ids = torch.randint(3, ck.info["vocab_size"], (2, 10), generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(logits_of(out, ids), logits_of(ref_dir, ids), rtol=0, atol=1e-5)


def test_megatron_bf16_source_cast_to_fp32(megatron_ckpts, tmp_path):
    ck = megatron_ckpts["dp2_bf16"]
    default = export_hf(str(ck.out_dir), str(tmp_path / "auto"))
    assert default.dtype == "source" and default.dtypes_written == {"bfloat16": default.tensors}
    assert json.loads((tmp_path / "auto" / "config.json").read_text())["dtype"] == "bfloat16"
    doc = cli_json(ck.out_dir, tmp_path / "fp32", "--dtype", "fp32")
    assert doc["dtype"] == "fp32" and doc["dtypes_written"] == {"float32": doc["tensors"]}
    ref = load_dir(ck.reference_hf_dir)
    assert_same_tensors(load_dir(tmp_path / "fp32"), {k: v.float() for k, v in ref.items()})
    assert json.loads((tmp_path / "fp32" / "config.json").read_text())["dtype"] == "float32"


def test_megatron_unsupported_architecture_refused(megatron_ckpts, tmp_path):
    src = copy_component(megatron_ckpts["tp2"].out_dir, tmp_path / "ckpt" / "policy")
    edit_config(src / "huggingface", architectures=["GPT2LMHeadModel"], model_type="gpt2")
    out = tmp_path / "out"
    refused(src, out, code=1, match="does not support GPT2LMHeadModel")
    assert not out.exists() and leftovers(out) == []


def test_megatron_fsdp_prefix_removed(megatron_ckpts, tmp_path):
    src = copy_component(megatron_ckpts["tp2"].out_dir, tmp_path / "ckpt" / "policy")
    edit_config(src / "huggingface", architectures=["FSDPLlamaForCausalLM"])
    doc = cli_json(src, tmp_path / "out")
    assert doc["architecture"] == ["LlamaForCausalLM"]
    assert json.loads((tmp_path / "out" / "config.json").read_text())["architectures"] == ["LlamaForCausalLM"]


# ------------------------------------------------------------------------------------------
# options: shards, dtype, FSDP prefix, verification, progress, human output
# ------------------------------------------------------------------------------------------
def test_sharded_output_index(fsdp_ckpts, tmp_path):
    comp = fsdp_ckpts["w2"]
    out = tmp_path / "out"
    doc = cli_json(comp.path, out, "--max-shard-size", "100KB")
    n = doc["shards"]
    assert n > 2
    shard_names = [f"model-{i:05d}-of-{n:05d}.safetensors" for i in range(1, n + 1)]
    assert sorted(p.name for p in out.glob("*.safetensors")) == shard_names
    assert not (out / "model.safetensors").exists()
    assert doc["files"][-2:] == ["model.safetensors.index.json", "config.json"]  # index and config last

    index = json.loads((out / "model.safetensors.index.json").read_text())
    tensors = load_dir(out)
    per_file = {}
    for f in shard_names:
        with safe_open(str(out / f), "pt") as sf:
            per_file[f] = list(sf.keys())
            size = sum(sf.get_tensor(k).nbytes for k in sf.keys())
        assert size <= 100_000 or len(per_file[f]) == 1  # over the limit only alone (as HF does)
    assert index["weight_map"] == {k: f for f, keys in per_file.items() for k in keys}
    assert index["metadata"]["total_size"] == sum(t.nbytes for t in tensors.values()) == doc["bytes"]
    config = json.loads((comp.path / "huggingface" / "config.json").read_text())
    assert_same_tensors(tensors, expected_fsdp_state(comp.reference_dir, config))
    ref = ref_logits(comp)
    torch.testing.assert_close(logits_of(out, ref["input_ids"]), ref["logits"], rtol=0, atol=1e-5)


def test_dtype_bf16_cast(fsdp_ckpts, tmp_path):
    comp = fsdp_ckpts["w3_tied"]
    out = tmp_path / "out"
    doc = cli_json(comp.path, out, "--dtype", "bf16")
    assert doc["dtype"] == "bf16" and doc["dtypes_written"] == {"bfloat16": doc["tensors"]}
    config = json.loads((out / "config.json").read_text())
    assert config["dtype"] == "bfloat16" and config["torch_dtype"] == "bfloat16"
    assert "config.json dtype float32 -> bfloat16 (what was written)" in doc["warnings"]
    src_config = json.loads((comp.path / "huggingface" / "config.json").read_text())
    want = {k: v.to(torch.bfloat16) for k, v in expected_fsdp_state(comp.reference_dir, src_config).items()}
    assert_same_tensors(load_dir(out), want)
    assert causal_lm(out).dtype == torch.bfloat16


def test_fsdp_prefix_removed_from_architectures(fsdp_ckpts, tmp_path):
    src = copy_component(fsdp_ckpts["w3_tied"].path, tmp_path / "ckpt" / "policy")
    edit_config(src / "huggingface", architectures=["FSDPQwen2ForCausalLM"])
    out = tmp_path / "out"
    doc = cli_json(src, out)
    assert doc["architecture"] == ["Qwen2ForCausalLM"]
    assert any("FSDP" in w for w in doc["warnings"])
    assert json.loads((out / "config.json").read_text())["architectures"] == ["Qwen2ForCausalLM"]
    ref = ref_logits(fsdp_ckpts["w3_tied"])
    torch.testing.assert_close(logits_of(out, ref["input_ids"]), ref["logits"], rtol=0, atol=1e-5)


def test_verification_runs_by_default_and_fails_loudly(fsdp_ckpts, tmp_path, monkeypatch):
    from ckptctl.formats import hf_writer

    calls = []
    real = hf_writer.verify_export

    def spy(url, expected=None, **kw):
        calls.append((url, dict(expected)))
        return real(url, expected, **kw)

    monkeypatch.setattr(hf_writer, "verify_export", spy)
    doc = cli_json(fsdp_ckpts["w2"].path, tmp_path / "a")
    assert doc["verified"] is True and len(calls) == 1
    assert len(calls[0][1]) == doc["tensors"]
    assert all(dtype == "float32" for _, dtype in calls[0][1].values())

    doc = cli_json(fsdp_ckpts["w2"].path, tmp_path / "b", "--no-verify")
    assert doc["verified"] is False and len(calls) == 1

    # the check runs on the staged output, before config.json and the commit
    assert calls[0][0] == str(tmp_path / "a")


def test_failed_verification_commits_nothing(fsdp_ckpts, tmp_path, monkeypatch):
    """A shard that comes out short (a writer bug, a full disk that does not say so) is caught by
    re-reading the staged output, before anything is committed: no model, no temp left."""
    from ckptctl.formats import hf_writer

    real_write = hf_writer._LocalTarget.write

    def lossy_write(self, f, data):
        data = memoryview(data)
        if data.nbytes > 64:  # drop one tensor's last 4 bytes
            data = data[:-4]
        return real_write(self, f, data)

    monkeypatch.setattr(hf_writer._LocalTarget, "write", lossy_write)
    refused(fsdp_ckpts["w2"].path, tmp_path / "c", code=1, match="failed (nothing committed)")
    assert not (tmp_path / "c").exists()
    assert leftovers(tmp_path / "c") == []
    monkeypatch.undo()
    cli_json(fsdp_ckpts["w2"].path, tmp_path / "c")  # a rerun succeeds
    assert (tmp_path / "c" / "config.json").is_file()


def test_export_runs_with_one_intra_op_thread(fsdp_ckpts, tmp_path, monkeypatch):
    """The export streams through its own threads; torch's OpenMP workers would spin between
    its copies and take their cores. One intra-op thread while it runs, the caller's setting
    back afterwards (after a failure too), and an OMP_NUM_THREADS the user set is kept. (A cast:
    an export that converts nothing copies bytes without torch.)"""
    import torch

    before = torch.get_num_threads()
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    torch.set_num_threads(2)
    try:
        seen = set()
        export_hf(str(fsdp_ckpts["w2"].path), str(tmp_path / "a"), dtype="bf16", progress=lambda d, t: seen.add(torch.get_num_threads()))
        assert seen == {1}
        assert torch.get_num_threads() == 2

        def fail(done, total):
            raise RuntimeError("stop")

        with pytest.raises(RuntimeError):
            export_hf(str(fsdp_ckpts["w2"].path), str(tmp_path / "b"), dtype="bf16", progress=fail)
        assert torch.get_num_threads() == 2

        monkeypatch.setenv("OMP_NUM_THREADS", "2")
        seen.clear()
        export_hf(str(fsdp_ckpts["w2"].path), str(tmp_path / "c"), dtype="bf16", progress=lambda d, t: seen.add(torch.get_num_threads()))
        assert seen == {2}
    finally:
        torch.set_num_threads(before)


def test_progress_callback_and_human_summary(fsdp_ckpts, tmp_path, monkeypatch):
    seen = []
    summary = export_hf(str(fsdp_ckpts["w2"].path), str(tmp_path / "lib"), progress=lambda d, t: seen.append((d, t)))
    assert seen == [(i, summary.tensors) for i in range(1, summary.tensors + 1)]

    # on a "terminal", --json still prints nothing but the document
    from ckptctl import output

    monkeypatch.setattr(output.Output, "interactive", property(lambda self: not self.json_mode))
    doc = cli_json(fsdp_ckpts["w2"].path, tmp_path / "json")
    assert doc["tensors"] == summary.tensors

    # without --json the "terminal" gets a progress bar, advanced once per tensor
    advanced = []
    real_progress = output.Output.progress

    @contextlib.contextmanager
    def counting_progress(self, description, total=None):
        with real_progress(self, description, total) as advance:
            yield lambda n=1, total=None: (advanced.append((n, total)), advance(n, total))

    monkeypatch.setattr(output.Output, "progress", counting_progress)
    code, stdout, _ = cli(fsdp_ckpts["w2"].path, "--out", tmp_path / "human", "--dtype", "bf16")
    assert code == 0, stdout
    assert advanced == [(1, summary.tensors)] * summary.tensors
    assert "cast to bf16" in stdout and "verified: yes" in stdout and "LlamaForCausalLM" in stdout
    code, stdout, _ = cli(fsdp_ckpts["w2"].path, "--out", tmp_path / "human2")
    assert code == 0 and "source dtype" in stdout


def test_dtype_cast_leaves_integer_buffers_alone(fsdp_ckpts, tmp_path):
    """A real torch.save'd single-rank state dict with an int64 buffer added: --dtype bf16 casts
    the floating-point tensors only, and config.json names their dtype."""
    src = copy_component(fsdp_ckpts["w1"].path, tmp_path / "ckpt" / "policy")
    rank_file = src / "model_world_size_1_rank_0.pt"
    state = torch.load(rank_file, weights_only=True)
    state["model.position_ids"] = torch.arange(16, dtype=torch.int64)
    torch.save(state, rank_file)
    out = tmp_path / "out"
    doc = cli_json(src, out, "--dtype", "bf16")
    assert doc["dtypes_written"] == {"bfloat16": doc["tensors"] - 1, "int64": 1}
    got = load_dir(out)
    assert torch.equal(got["model.position_ids"], torch.arange(16))
    assert got["model.norm.weight"].dtype == torch.bfloat16
    assert json.loads((out / "config.json").read_text())["dtype"] == "bfloat16"


# ------------------------------------------------------------------------------------------
# LoRA (PEFT): fixtures written by peft.get_peft_model + FSDP2, lora_adapter/ as SkyRL saves it
# ------------------------------------------------------------------------------------------
LORA = ["lora_w2", "lora_w1"]


def peft_logits(base_dir: Path, adapter_dir: Path, ids):
    """The logits of the exported base model with the exported adapter, loaded by peft itself."""
    from peft import PeftModel

    model = PeftModel.from_pretrained(causal_lm(base_dir), str(adapter_dir)).eval()
    with torch.no_grad():
        return model(input_ids=ids).logits


@pytest.mark.parametrize("name", LORA)
def test_lora_merged_export_matches_peft_merge(fsdp_ckpts, tmp_path, name):
    comp = fsdp_ckpts[name]
    out = tmp_path / "merged"
    doc = cli_json(comp.path, out, "--merge-lora")
    assert doc["lora"]["merged"] is True and doc["lora"]["adapted_modules"] > 0 and doc["verified"]
    assert not (out / "lora_adapter").exists()  # merged: a standalone model
    config = json.loads((out / "config.json").read_text())
    want = load_file(str(comp.reference_dir / "reference_merged_state.safetensors"))
    want = {k: v for k, v in want.items() if not k.endswith("rotary_emb.inv_freq")}
    if config.get("tie_word_embeddings"):
        want.pop("lm_head.weight", None)
    got = load_dir(out)
    assert sorted(got) == sorted(want)
    for k in want:  # the same arithmetic as peft's merge_and_unload
        torch.testing.assert_close(got[k], want[k], rtol=0, atol=1e-6, msg=k)
    base = load_file(str(comp.reference_dir / "reference_base_state.safetensors"))
    assert any(not torch.equal(got[k], base[k]) for k in got if k in base)  # the merge changed weights
    ref = ref_logits(comp)  # the trained PEFT model's own output
    torch.testing.assert_close(logits_of(out, ref["input_ids"]), ref["logits"], rtol=0, atol=1e-5)


@pytest.mark.parametrize("name", LORA)
def test_lora_unmerged_export_is_base_plus_adapter(fsdp_ckpts, tmp_path, name):
    comp = fsdp_ckpts[name]
    out = tmp_path / "out"
    doc = cli_json(comp.path, out)
    assert doc["lora"]["merged"] is False
    assert any("--merge-lora" in w for w in doc["warnings"])
    # base weights under plain HF names (a modules_to_save original, not its trained copy)
    want = load_file(str(comp.reference_dir / "reference_base_state.safetensors"))
    want = {k: v for k, v in want.items() if not k.endswith("rotary_emb.inv_freq")}
    assert_same_tensors(load_dir(out), want)
    # the adapter as SkyRL saved it, in a subdirectory (at the top, adapter_config.json would
    # make transformers load the directory as an adapter)
    for f in ("adapter_config.json", "adapter_model.safetensors"):
        assert (out / "lora_adapter" / f).read_bytes() == (comp.path / "lora_adapter" / f).read_bytes()
    assert not (out / "adapter_config.json").exists()
    ref = ref_logits(comp)
    torch.testing.assert_close(peft_logits(out, out / "lora_adapter", ref["input_ids"]), ref["logits"],
                               rtol=0, atol=1e-5)


def test_lora_merge_from_s3_sharded_bf16(fsdp_ckpts, make_backend, tmp_path):
    comp = fsdp_ckpts["lora_w2"]
    src = upload_component(make_backend("s3"), comp.path, "global_step_1/policy")
    out = tmp_path / "out"
    doc = cli_json(src, out, "--merge-lora", "--dtype", "bf16", "--max-shard-size", "100KB")
    assert doc["shards"] > 1 and doc["dtypes_written"] == {"bfloat16": doc["tensors"]}
    want = load_file(str(comp.reference_dir / "reference_merged_state.safetensors"))
    got = load_dir(out)
    for k, v in got.items():
        assert torch.equal(v, want[k].to(torch.bfloat16)), k  # merged in fp32, then cast


def test_lora_refusals_write_nothing(fsdp_ckpts, megatron_ckpts, tmp_path):
    lora = fsdp_ckpts["lora_w2"]
    # a plain model has nothing to merge
    refused(fsdp_ckpts["w1"].path, tmp_path / "a", "--merge-lora", code=2, match="not a LoRA (PEFT) model")
    # Megatron LoRA is not supported
    refused(megatron_ckpts["tp2"].out_dir, tmp_path / "b", "--merge-lora", code=2, match="not for Megatron")
    # SkyRL swallows errors saving lora_adapter/: without its config the scaling is unknown
    src = copy_component(lora.path, tmp_path / "c" / "policy")
    (src / "lora_adapter" / "adapter_config.json").unlink()
    refused(src, tmp_path / "c_out", "--merge-lora", code=1, match="adapter_config.json is missing")
    refused(src, tmp_path / "c_out", code=1, match="adapter_config.json is missing")
    # a config that does not belong to these weights (rank 8, weights rank 4)
    src = copy_component(lora.path, tmp_path / "d" / "policy")
    cfg_path = src / "lora_adapter" / "adapter_config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg_path.write_text(json.dumps(dict(cfg, r=8)))
    refused(src, tmp_path / "d_out", "--merge-lora", code=1, match="says r=8")
    # DoRA is not merged (yet)
    cfg_path.write_text(json.dumps(dict(cfg, use_dora=True)))
    refused(src, tmp_path / "d_out", "--merge-lora", code=2, match="DoRA")
    for out in ("a", "b", "c_out", "d_out"):
        assert not (tmp_path / out).exists() and leftovers(tmp_path / out) == []


# ------------------------------------------------------------------------------------------
# refusals: nothing written
# ------------------------------------------------------------------------------------------
def test_non_empty_destination_refused_unless_overwrite(fsdp_ckpts, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    refused(fsdp_ckpts["w2"].path, out, code=2, match="not empty")
    assert snapshot(out) == {"keep.txt": 4} and leftovers(out) == []

    # --overwrite replaces only an earlier HF model directory: never a foreign file
    refused(fsdp_ckpts["w2"].path, out, "--overwrite", code=2, match="refusing to overwrite files that no export-hf")
    assert snapshot(out) == {"keep.txt": 4} and leftovers(out) == []
    (out / "keep.txt").unlink()
    cli_json(fsdp_ckpts["w2"].path, out)
    doc = cli_json(fsdp_ckpts["w2"].path, out, "--overwrite")
    assert doc["verified"] and doc["replaced"].startswith("an HF model directory") and (out / "config.json").is_file()
    assert leftovers(out) == []


def test_destination_inside_source_refused(fsdp_ckpts, tmp_path):
    src = copy_component(fsdp_ckpts["w2"].path, tmp_path / "ckpt" / "policy")
    before = snapshot(tmp_path)
    refused(src, src / "hf", code=2, match="inside the source")
    refused(tmp_path / "ckpt", tmp_path / "ckpt" / "exports" / "hf", code=2, match="inside the source")
    assert snapshot(tmp_path) == before


def test_destination_inside_source_through_a_symlink_refused(fsdp_ckpts, tmp_path):
    src = copy_component(fsdp_ckpts["w2"].path, tmp_path / "ckpt" / "policy")
    (tmp_path / "link").symlink_to(src, target_is_directory=True)
    before = snapshot(src)
    refused(src, tmp_path / "link" / "hf", code=2, match="inside the source")
    refused(tmp_path / "link", src / "hf", code=2, match="inside the source")
    assert snapshot(src) == before


def test_source_inside_destination_refused_even_with_overwrite(fsdp_ckpts, tmp_path):
    src = copy_component(fsdp_ckpts["w2"].path, tmp_path / "ckpt" / "policy")
    before = snapshot(tmp_path)
    refused(src, tmp_path / "ckpt", "--overwrite", code=2, match="contains the source")
    refused(src, tmp_path, "--overwrite", code=2, match="contains the source")
    assert snapshot(tmp_path) == before


def test_incomplete_component_refused(fsdp_ckpts, tmp_path):
    src = copy_component(fsdp_ckpts["w2"].path, tmp_path / "ckpt" / "policy")
    (src / "model_world_size_2_rank_1.pt").unlink()
    out = tmp_path / "out"
    refused(src, out, code=1, match="incomplete")
    assert not out.exists() and leftovers(out) == []


def test_hf_export_as_source_refused(fsdp_ckpts, tmp_path):
    export_hf(str(fsdp_ckpts["w1"].path), str(tmp_path / "first"))
    refused(tmp_path / "first", tmp_path / "second", code=2, match="already an HF export")
    assert not (tmp_path / "second").exists()


# ------------------------------------------------------------------------------------------
# interruption: nothing complete-looking, a rerun succeeds
# ------------------------------------------------------------------------------------------
def _fail_after(monkeypatch, cls, n: int) -> list:
    calls = []
    real = cls.read_tensor

    def read_tensor(self, *args, **kwargs):
        calls.append(args[0])
        if len(calls) > n:
            raise RuntimeError("simulated crash while reading")
        return real(self, *args, **kwargs)

    monkeypatch.setattr(cls, "read_tensor", read_tensor)
    return calls


@pytest.mark.parametrize("kind", ["fsdp", "megatron"])
def test_crash_mid_export_leaves_nothing_and_rerun_succeeds(fsdp_ckpts, megatron_ckpts, tmp_path, monkeypatch, kind):
    if kind == "fsdp":  # an FSDP2 export that converts nothing copies bytes (fsdp_bytes)
        from ckptctl.formats.fsdp_bytes import ByteCopyReader as reader_cls

        src = fsdp_ckpts["w2"].path
    else:
        from ckptctl.formats.megatron import MegatronReader as reader_cls

        src = megatron_ckpts["tp2"].out_dir
    out = tmp_path / "out"
    with monkeypatch.context() as m:
        _fail_after(m, reader_cls, 5)
        with pytest.raises(RuntimeError, match="simulated crash"):
            export_hf(str(src), str(out), max_shard_size="100KB")
    assert not out.exists() and leftovers(out) == []
    doc = cli_json(src, out, "--max-shard-size", "100KB")
    assert doc["verified"] and verify_export(str(out)) == []


_KILLER = textwrap.dedent("""
    import os, signal, sys
    from ckptctl.formats.fsdp import FsdpReader
    from ckptctl.formats.fsdp_bytes import ByteCopyReader
    calls = []
    def killing(real):
        def read_tensor(self, *a, **k):
            calls.append(1)
            if len(calls) > int(os.environ["KILL_AFTER"]):
                os.kill(os.getpid(), signal.SIGKILL)  # no cleanup of any kind
            return real(self, *a, **k)
        return read_tensor
    FsdpReader.read_tensor = killing(FsdpReader.read_tensor)  # what converts (casts, LoRA, ...)
    ByteCopyReader.read_tensor = killing(ByteCopyReader.read_tensor)  # what only copies bytes
    from ckptctl.cli import app
    app(["export-hf", *sys.argv[1:]])
""")


def run_killed(src, out, *args, kill_after: int) -> None:
    env = dict(os.environ, KILL_AFTER=str(kill_after), PYTHONPATH=str(REPO_ROOT))
    proc = subprocess.run([sys.executable, "-c", _KILLER, str(src), "--out", str(out), *args, "--json"],
                          env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == -signal.SIGKILL, (proc.returncode, proc.stdout, proc.stderr)


def test_killed_export_local_then_rerun(fsdp_ckpts, tmp_path):
    """SIGKILL mid-export (no except/finally runs): the destination does not exist, only a temp
    sibling naming a dead pid; the rerun removes it and succeeds."""
    src = fsdp_ckpts["w2"].path
    out = tmp_path / "out"
    run_killed(src, out, "--max-shard-size", "100KB", kill_after=12)
    assert not out.exists()
    assert len(leftovers(out)) == 1
    doc = cli_json(src, out, "--max-shard-size", "100KB")
    assert doc["verified"] and leftovers(out) == []
    ref = ref_logits(fsdp_ckpts["w2"])
    torch.testing.assert_close(logits_of(out, ref["input_ids"]), ref["logits"], rtol=0, atol=1e-5)


def test_killed_export_to_s3_then_rerun(fsdp_ckpts, make_backend, tmp_path):
    """On S3: completed shards may stay behind, but never config.json (complete = config.json);
    the rerun replaces the interrupted export without --overwrite."""
    s3 = make_backend("s3")
    out = s3.new_root()
    run_killed(fsdp_ckpts["w2"].path, out, "--max-shard-size", "100KB", kill_after=15)
    left = s3.list_files(out)
    assert "config.json" not in left and "model.safetensors.index.json" not in left
    assert INCOMPLETE_MARKER in left and any(f.endswith(".safetensors") for f in left)
    assert any("config.json is missing" in p for p in verify_export(out))
    doc = cli_json(fsdp_ckpts["w2"].path, out, "--max-shard-size", "100KB")
    assert doc["verified"]
    files = s3.list_files(out)
    assert INCOMPLETE_MARKER not in files and "config.json" in files and verify_export(out) == []


def test_prefetch_is_bounded_ordered_and_stops_cleanly():
    """The read-ahead thread: items in order, never more than `slots` alive, errors re-raised
    in order, and an early stop joins the thread without reading further."""
    import threading
    import time

    from ckptctl.ops.export import _prefetched

    produced = []

    def source(n, fail_at=None):
        for i in range(n):
            if i == fail_at:
                raise ValueError(f"bad tensor {i}")
            produced.append(i)
            yield i

    got = []
    for item in _prefetched(source(6), 2):
        time.sleep(0.02)  # let the producer run ahead as far as it may
        assert len(produced) <= item + 2  # the one held here and at most one read ahead
        got.append(item)
    assert got == list(range(6))

    produced.clear()
    got = []
    with pytest.raises(ValueError, match="bad tensor 3"):
        for item in _prefetched(source(6, fail_at=3), 2):
            got.append(item)
    assert got == [0, 1, 2]

    produced.clear()
    it = _prefetched(source(100), 2)
    assert [next(it), next(it)] == [0, 1]
    time.sleep(0.02)
    it.close()
    assert len(produced) <= 3
    assert not any(t.name == "ckptctl-export-reader" for t in threading.enumerate())


# ------------------------------------------------------------------------------------------
# object stores
# ------------------------------------------------------------------------------------------
def download(backend, url: str, dest: Path) -> Path:
    dest.mkdir(parents=True)
    for rel in backend.list_files(url):
        (dest / rel).parent.mkdir(parents=True, exist_ok=True)
        (dest / rel).write_bytes(backend.get(backend.join(url, rel)))
    return dest


def test_s3_to_local(fsdp_ckpts, make_backend, tmp_path):
    comp = fsdp_ckpts["w3_tied"]
    src = upload_component(make_backend("s3"), comp.path, "global_step_3/policy")
    out = tmp_path / "out"
    doc = cli_json(src, out)
    assert doc["source"] == src and doc["verified"]
    assert_side_files(out, comp.path / "huggingface")
    ref = ref_logits(comp)
    torch.testing.assert_close(logits_of(out, ref["input_ids"]), ref["logits"], rtol=0, atol=1e-5)


def test_local_to_s3_sharded(fsdp_ckpts, make_backend, tmp_path):
    s3 = make_backend("s3")
    comp = fsdp_ckpts["w2"]
    out = s3.new_root()
    doc = cli_json(comp.path, out, "--max-shard-size", "100KB")
    assert doc["destination"] == out and doc["verified"] and doc["shards"] > 1
    files = s3.list_files(out)
    assert INCOMPLETE_MARKER not in files
    assert {"config.json", "model.safetensors.index.json", *HF_SIDE_FILES} <= set(files)
    local = download(s3, out, tmp_path / "download")
    ref = ref_logits(comp)
    torch.testing.assert_close(logits_of(local, ref["input_ids"]), ref["logits"], rtol=0, atol=1e-5)

    # a second export to the same prefix needs --overwrite, and nothing is touched before that
    before = {f: s3.get(s3.join(out, f)) for f in files}
    refused(comp.path, out, code=2, match="not empty")
    assert {f: s3.get(s3.join(out, f)) for f in s3.list_files(out)} == before


def test_megatron_gcs_to_gcs(megatron_ckpts, make_backend, tmp_path):
    gs = make_backend("gs")
    ck = megatron_ckpts["tp2pp2"]
    root = gs.new_root()
    src, out = f"{root}/ckpt/global_step_1/policy", f"{root}/export"
    gs.upload_dir(str(ck.out_dir), src)
    doc = cli_json(src, out)
    assert doc["backend"] == "megatron" and doc["verified"]
    assert "config.json" in gs.list_files(out) and INCOMPLETE_MARKER not in gs.list_files(out)
    local = download(gs, out, tmp_path / "download")
    assert_same_tensors(load_dir(local), load_dir(ck.reference_hf_dir))
    refused(f"{root}/ckpt", f"{root}/ckpt/global_step_1/hf", code=2, match="inside the source")
