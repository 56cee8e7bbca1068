"""export-hf and convert-reshard check a source's ``ckptctl-manifest.json`` (written by
``verify --write-manifest``) while they work, and commit nothing when a file differs: on copies of
the real FSDP2 and megatron-core fixtures, with a file changed that no CRC covers."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest
from typer.testing import CliRunner

from ckptctl.cli import app

runner = CliRunner()


def run(*args) -> tuple[int, str, str]:
    result = runner.invoke(app, [str(a) for a in args])
    return result.exit_code, result.stdout, result.stderr


def write_manifest(path: Path) -> None:
    code, out, err = run("verify", path, "--write-manifest", "--json")
    assert code == 0 and json.loads(out)["ok"], (code, out, err)


def tamper(config: Path) -> None:
    """A same-size edit that leaves valid JSON (and no CRC to notice it): one version digit."""
    text = config.read_text()
    changed = re.sub(r'("transformers_version": "\d+\.\d+\.)(\d)', lambda m: m.group(1) + str((int(m.group(2)) + 1) % 10),
                     text, count=1)
    assert changed != text and len(changed) == len(text)
    config.write_text(changed)


@pytest.fixture
def fsdp_step(fsdp_tree, tmp_path) -> Path:
    step = Path(shutil.copytree(fsdp_tree / "global_step_4", tmp_path / "run" / "global_step_4"))
    write_manifest(step)
    return step


@pytest.fixture
def megatron_component(megatron_ckpts, tmp_path) -> Path:
    comp = Path(shutil.copytree(megatron_ckpts["tp2"].out_dir, tmp_path / "src" / "policy"))
    write_manifest(comp)
    return comp


def refused(args: list, out: Path, changed: str) -> None:
    code, stdout, stderr = run(*args, "--out", out)
    assert code == 1, (code, stdout, stderr)
    assert stderr.count("\n") == 1 and "Traceback" not in stderr
    assert f"{changed}: SHA-256 differs" in stderr, stderr
    assert not out.exists() and not any(p.name.startswith(out.name) for p in out.parent.iterdir())


def test_sound_source_is_checked_and_exported(fsdp_step, tmp_path):
    code, out, err = run("export-hf", fsdp_step, "--out", tmp_path / "hf", "--json")
    assert code == 0, err
    assert json.loads(out)["manifest_checked"] is True


def test_export_refuses_a_source_that_differs_from_its_manifest(fsdp_step, tmp_path):
    tamper(fsdp_step / "policy" / "huggingface" / "config.json")
    refused(["export-hf", fsdp_step], tmp_path / "hf", "huggingface/config.json")
    code, out, err = run("export-hf", fsdp_step, "--out", tmp_path / "hf", "--no-verify", "--json")
    assert code == 0 and json.loads(out)["manifest_checked"] is False, err


def test_fsdp_reshard_refuses_a_source_that_differs_from_its_manifest(fsdp_step, tmp_path):
    tamper(fsdp_step / "critic" / "huggingface" / "config.json")
    refused(["convert-reshard", fsdp_step, "--world-size", "1"], tmp_path / "rs", "critic/huggingface/config.json")
    code, _, err = run("convert-reshard", fsdp_step, "--world-size", "1", "--out", tmp_path / "rs", "--no-verify")
    assert code == 0, err


def test_megatron_reshard_and_export_refuse_a_source_that_differs(megatron_component, tmp_path):
    code, _, err = run("convert-reshard", megatron_component, "--tp", "1", "--out", tmp_path / "sound")
    assert code == 0, err  # the sound source passes its own manifest
    tamper(megatron_component / "huggingface" / "config.json")
    refused(["convert-reshard", megatron_component, "--tp", "1"], tmp_path / "rs", "huggingface/config.json")
    refused(["export-hf", megatron_component], tmp_path / "hf", "huggingface/config.json")


def test_prune_drop_optimizer_removes_the_manifest_it_would_falsify(fsdp_tree, tmp_path):
    tree = Path(shutil.copytree(fsdp_tree, tmp_path / "run"))
    write_manifest(tree)
    assert (tree / "global_step_2" / "ckptctl-manifest.json").exists()
    code, out, err = run("prune", tree, "--keep", "1", "--drop-optimizer", "--yes", "--json")
    assert code == 0 and json.loads(out)["optimizer_dropped"] == [2], (out, err)
    assert not (tree / "global_step_2" / "ckptctl-manifest.json").exists()
    assert not list((tree / "global_step_2" / "policy").glob("optim_*"))
    assert (tree / "global_step_4" / "ckptctl-manifest.json").exists()  # kept step: untouched
    code, out, err = run("verify", tree, "--json")
    assert code == 0 and json.loads(out)["ok"], (out, err)
