"""``--overwrite`` replaces only an earlier output of the same kind, and SIGTERM cleans up like
Ctrl-C: on REAL checkpoints (the session fixtures ``fsdp_ckpts`` / ``fsdp_tree``), through the
CLI (in process, and the ``.venv/bin/ckptctl`` console script for SIGTERM), locally and on the
S3 server.

Every refusal is checked the same way: exit code 2, one line on stderr naming what is there,
and every file at the destination byte-identical afterwards (no temp sibling left either).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytest.importorskip("torch")
pytest.importorskip("transformers")
from typer.testing import CliRunner  # noqa: E402

from ckptctl.cli import app  # noqa: E402
from ckptctl.output_dir import OUTPUT_MARKER, TMP_INFIX  # noqa: E402

REPO_ROOT = Path(__file__).resolve().parent.parent
CONSOLE_SCRIPT = Path(sys.executable).parent / "ckptctl"
runner = CliRunner()
#: command -> the arguments that follow SRC --out DST (FSDP component w2 as the source)
COMMANDS = {"export-hf": [], "convert-reshard": ["--world-size", "1"]}


@pytest.fixture(autouse=True)
def _offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("TRANSFORMERS_OFFLINE", "1")


def ckptctl(*args, env: dict | None = None) -> tuple[int, str, str]:
    result = runner.invoke(app, [str(a) for a in args], env=env)
    return result.exit_code, result.stdout, result.stderr


def write(command: str, src, out, *more: str, env: dict | None = None) -> tuple[int, str, str]:
    return ckptctl(command, src, "--out", out, *COMMANDS[command], *more, env=env)


def contents(path: Path) -> dict[str, bytes]:
    return {str(p.relative_to(path)): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()}


def leftovers(out: Path) -> list[str]:
    return sorted(p.name for p in out.parent.iterdir() if p.name.startswith(f".{out.name}{TMP_INFIX}"))


def assert_refused(command: str, src, out: Path, what: str, *, env: dict | None = None, out_arg=None) -> None:
    before = contents(out)
    code, stdout, stderr = write(command, src, out if out_arg is None else out_arg, "--overwrite", env=env)
    assert code == 2, (code, stdout, stderr)
    assert stderr.startswith("ckptctl: error: ") and stderr.count("\n") == 1, stderr  # one line
    assert what in stderr, stderr
    assert contents(out) == before  # every file still there, byte-identical
    assert leftovers(out) == []


# ------------------------------------------------------------------------------------------
# replaced: an earlier output of the same kind
# ------------------------------------------------------------------------------------------
def test_export_replaces_an_earlier_export_and_says_so(fsdp_ckpts, tmp_path):
    src, out = fsdp_ckpts["w2"].path, tmp_path / "hf"
    code, _, err = write("export-hf", src, out, "--dtype", "bf16")
    assert code == 0, err
    first = contents(out)
    code, stdout, err = write("export-hf", src, out, "--overwrite")
    assert code == 0, err
    assert f"replaced: an HF model directory ({len(first)} files)" in stdout  # the human summary says it
    assert contents(out) != first and OUTPUT_MARKER not in contents(out)  # an export is save_pretrained's files
    code, stdout, err = write("export-hf", src, out, "--overwrite", "--json")
    assert code == 0 and json.loads(stdout)["replaced"].startswith("an HF model directory")


def test_reshard_replaces_an_earlier_reshard_output_and_says_so(fsdp_ckpts, tmp_path):
    src, out = fsdp_ckpts["w2"].path, tmp_path / "w3"
    assert ckptctl("convert-reshard", src, "--out", out, "--world-size", "3")[0] == 0
    marker = json.loads((out / OUTPUT_MARKER).read_text())
    assert (marker["tool"], marker["kind"], marker["source"]) == ("ckptctl", "convert-reshard", str(src))
    assert sorted(marker["files"]) == sorted(set(contents(out)) - {OUTPUT_MARKER})
    code, stdout, err = ckptctl("convert-reshard", src, "--out", out, "--world-size", "1", "--overwrite", "--json")
    assert code == 0, err
    doc = json.loads(stdout)
    assert doc["replaced"] == f"an earlier convert-reshard output of {src} ({len(marker['files'])} files)"
    assert "model_world_size_1_rank_0.pt" in contents(out) and "model_world_size_3_rank_0.pt" not in contents(out)


# ------------------------------------------------------------------------------------------
# refused: what ckptctl did not write
# ------------------------------------------------------------------------------------------
@pytest.fixture
def victim_tree(fsdp_tree, tmp_path) -> Path:
    """A copy of a real SkyRL tree (pointer, global_step_2 and _4 with policy/critic, data.pt,
    trainer_state.pt) with a notes file, as in the report that deleted one."""
    tree = tmp_path / "victim"
    shutil.copytree(fsdp_tree, tree)
    (tree / "notes.txt").write_text("my notes on this run")
    return tree


@pytest.mark.parametrize("command", list(COMMANDS))
def test_checkpoint_tree_step_and_component_refused(command, fsdp_ckpts, victim_tree):
    src = fsdp_ckpts["w2"].path
    assert_refused(command, src, victim_tree, "refusing to overwrite a checkpoint tree (latest_ckpt_global_step.txt")
    assert_refused(command, src, victim_tree / "global_step_2",
                   "a training step (data.pt, trainer_state.pt, critic/, policy/)")
    assert_refused(command, src, victim_tree / "global_step_2" / "policy",
                   "a checkpoint component (extra_state_world_size_2_rank_0.pt")
    # without --overwrite: refused too, without suggesting --overwrite
    code, _, err = write(command, src, victim_tree / "global_step_4")
    assert code == 2 and "not empty: it holds a training step" in err and "--overwrite" not in err


@pytest.mark.parametrize("command", list(COMMANDS))
def test_directory_with_an_unrelated_file_refused(command, fsdp_ckpts, tmp_path):
    out = tmp_path / "docs"
    out.mkdir()
    (out / "notes.txt").write_text("an unrelated document")
    assert_refused(command, fsdp_ckpts["w2"].path, out, f"files that no {command} output has (notes.txt)")


def test_export_with_an_extra_file_refused(fsdp_ckpts, tmp_path):
    src, out = fsdp_ckpts["w2"].path, tmp_path / "hf"
    assert write("export-hf", src, out)[0] == 0
    (out / "notes.txt").write_text("added by hand")
    assert_refused("export-hf", src, out, "files that no export-hf output has (notes.txt)")
    # and a reshard does not replace an export, nor an export a reshard output
    assert_refused("convert-reshard", src, out, "refusing to overwrite files that no convert-reshard output has")
    (out / "notes.txt").unlink()
    assert_refused("convert-reshard", src, out, "refusing to overwrite an HF model directory")
    resharded = tmp_path / "w1"
    assert write("convert-reshard", src, resharded)[0] == 0
    assert_refused("export-hf", src, resharded, f"an earlier convert-reshard output of {src}")


def test_reshard_output_with_an_extra_file_refused(fsdp_ckpts, tmp_path):
    src, out = fsdp_ckpts["w2"].path, tmp_path / "w1"
    assert write("convert-reshard", src, out)[0] == 0
    (out / "huggingface" / "notes.md").write_text("added by hand")
    assert_refused("convert-reshard", src, out, "plus files it did not write (huggingface/notes.md)")


@pytest.mark.parametrize("command", list(COMMANDS))
def test_current_directory_refused(command, fsdp_ckpts, tmp_path, monkeypatch):
    cwd = tmp_path / "work"
    cwd.mkdir()
    (cwd / "mine.txt").write_text("a user's file")
    monkeypatch.chdir(cwd)
    assert_refused(command, fsdp_ckpts["w2"].path, cwd, "refusing to write over the current directory", out_arg=".")
    # an ancestor of the current directory too
    inner = cwd / "sub"
    inner.mkdir()
    monkeypatch.chdir(inner)
    assert_refused(command, fsdp_ckpts["w2"].path, cwd, "it contains the current directory", out_arg="..")


@pytest.mark.parametrize("command", list(COMMANDS))
def test_home_directory_refused(command, fsdp_ckpts, tmp_path):
    home = tmp_path / "home"
    home.mkdir()
    (home / ".bashrc").write_text("export PATH")
    assert_refused(command, fsdp_ckpts["w2"].path, home, "refusing to write over the home directory",
                   env={"HOME": str(home)})


@pytest.mark.parametrize("command", list(COMMANDS))
def test_ancestor_of_the_source_refused(command, fsdp_ckpts, tmp_path):
    src = tmp_path / "run" / "global_step_2" / "policy"
    shutil.copytree(fsdp_ckpts["w2"].path, src)
    assert_refused(command, src, tmp_path / "run", "contains the source")


def test_s3_overwrite(fsdp_ckpts, make_backend):
    """The cloud side judges with the same rule: an export replaced, an export with a foreign
    file and an uploaded checkpoint step refused (their objects unchanged)."""
    s3 = make_backend("s3")
    src = fsdp_ckpts["w2"].path
    out = s3.new_root() + "/hf"
    assert ckptctl("export-hf", src, "--out", out)[0] == 0
    code, stdout, err = ckptctl("export-hf", src, "--out", out, "--overwrite", "--json")
    assert code == 0, err
    assert json.loads(stdout)["replaced"].startswith("an HF model directory")
    s3.put(s3.join(out, "notes.txt"), b"added by hand")
    before = {rel: s3.get(s3.join(out, rel)) for rel in s3.list_files(out)}
    code, _, err = ckptctl("export-hf", src, "--out", out, "--overwrite")
    assert code == 2 and "files that no export-hf output has (notes.txt)" in err and err.count("\n") == 1
    assert {rel: s3.get(s3.join(out, rel)) for rel in s3.list_files(out)} == before

    resharded = s3.new_root() + "/w1"
    assert ckptctl("convert-reshard", src, "--out", resharded, "--world-size", "1")[0] == 0
    assert OUTPUT_MARKER in s3.list_files(resharded)
    code, stdout, err = ckptctl("convert-reshard", src, "--out", resharded, "--world-size", "2", "--overwrite",
                                "--json")
    assert code == 0, err
    assert json.loads(stdout)["replaced"].startswith(f"an earlier convert-reshard output of {src}")
    assert "model_world_size_1_rank_0.pt" not in s3.list_files(resharded)

    step = s3.new_root() + "/global_step_2"
    s3.upload_dir(str(fsdp_ckpts["w2"].path), step + "/policy")
    s3.put(s3.join(step, "trainer_state.pt"), b"state")
    before = s3.list_files(step)
    code, _, err = ckptctl("convert-reshard", src, "--out", step, "--world-size", "1", "--overwrite")
    assert code == 2 and "refusing to overwrite a training step (trainer_state.pt, policy/)" in err
    assert s3.list_files(step) == before


# ------------------------------------------------------------------------------------------
# SIGTERM: the same cleanup as Ctrl-C (a real console-script process)
# ------------------------------------------------------------------------------------------
def run_terminated(args: list[str], out: Path, attempts: int = 8) -> subprocess.CompletedProcess:
    """Run the console script, SIGTERM it as soon as its staging directory appears. A run that
    finished before the signal landed (a lost race: the fixtures are small) is retried."""
    for _ in range(attempts):
        shutil.rmtree(out, ignore_errors=True)
        proc = subprocess.Popen([str(CONSOLE_SCRIPT), *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                text=True, env=dict(os.environ, HF_HUB_OFFLINE="1"))
        deadline = time.monotonic() + 120
        while not leftovers(out) and proc.poll() is None and time.monotonic() < deadline:
            pass  # busy-wait: the window between the staging directory and the commit is short
        proc.send_signal(signal.SIGTERM)
        stdout, stderr = proc.communicate(timeout=120)
        if proc.returncode != 0:
            return subprocess.CompletedProcess(proc.args, proc.returncode, stdout, stderr)
    pytest.fail(f"every run finished before SIGTERM landed ({attempts} attempts)")


@pytest.mark.parametrize("command", list(COMMANDS))
def test_sigterm_removes_the_output_in_progress(command, fsdp_ckpts, tmp_path):
    src, out = fsdp_ckpts["w2"].path, tmp_path / "out"
    extra = ["--world-size", "3"] if command == "convert-reshard" else ["--max-shard-size", "20KB"]
    done = run_terminated([command, str(src), "--out", str(out), *extra], out)
    assert done.returncode == 143, (done.returncode, done.stderr)
    assert done.stderr.startswith("ckptctl: error: terminated (SIGTERM)") and done.stderr.count("\n") == 1
    assert not out.exists() and leftovers(out) == []  # nothing that looks complete, no staging
    rerun = subprocess.run([str(CONSOLE_SCRIPT), command, str(src), "--out", str(out), *extra],
                           capture_output=True, text=True, timeout=300)
    assert rerun.returncode == 0, rerun.stderr
    assert out.is_dir() and leftovers(out) == []


def test_sigterm_handler_is_restored(fsdp_ckpts, tmp_path):
    """The library installs its SIGTERM handler only while an output is open."""
    from ckptctl.ops.export import export_hf

    before = signal.getsignal(signal.SIGTERM)
    export_hf(str(fsdp_ckpts["w2"].path), str(tmp_path / "hf"))
    assert signal.getsignal(signal.SIGTERM) is before
