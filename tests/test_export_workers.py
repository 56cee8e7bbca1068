"""``export-hf`` shared by several processes: ``--workers N`` and ``torchrun -m ckptctl``.

Real gloo process groups started by torch's own launcher, real checkpoints (FSDP2 and
megatron-core session fixtures), the real S3 server. The truth is the one-process export:
every file of the shared export must be byte-identical to it. A process that dies
(SIGKILL, from a fault hook loaded into the worker processes only through ``sitecustomize``)
or fails must fail the run, leave nothing that looks complete, and not stop a rerun.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

pytest.importorskip("torch")
from typer.testing import CliRunner  # noqa: E402

from ckptctl.cli import app  # noqa: E402
from ckptctl.formats.hf_writer import (INCOMPLETE_MARKER, TMP_INFIX, assign_shards, plan_shards,  # noqa: E402
                                       verify_export)
from ckptctl.ops.export import export_hf  # noqa: E402

REPO_ROOT = Path(__file__).resolve().parent.parent
SHARD = "40KB"  # the w2 fixture then has 14 shards, tp2 Megatron several: every process gets some

# Loaded by every worker process (PYTHONPATH): process FAULT_RANK dies (kill) or raises (raise)
# while adding its second tensor, in the middle of its shards.
_FAULT_HOOK = textwrap.dedent("""
    import os
    if os.environ.get("RANK") == os.environ.get("FAULT_RANK"):
        import signal
        from ckptctl.formats.hf_writer import HfModelWriter
        real, calls = HfModelWriter.add, []
        def add(self, name, tensor):
            calls.append(name)
            if len(calls) == 2:
                if os.environ["FAULT"] == "kill":
                    os.kill(os.getpid(), signal.SIGKILL)  # no cleanup of any kind
                raise RuntimeError("injected fault while writing " + name)
            return real(self, name, tensor)
        HfModelWriter.add = add
        if os.environ["FAULT"] == "abort-at-exit":  # the run succeeds; the process crashes leaving
            HfModelWriter.add = real
            os._exit = lambda code: os.abort()
""")


def run_ckptctl(*args, fault: str | None = None, tmp_path: Path | None = None,
                launcher: tuple[str, ...] = ()) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(REPO_ROOT), HF_HUB_OFFLINE="1")
    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(var, None)
    if fault:
        hook = tmp_path / "hook"
        hook.mkdir(exist_ok=True)
        (hook / "sitecustomize.py").write_text(_FAULT_HOOK)
        env.update(PYTHONPATH=f"{hook}{os.pathsep}{REPO_ROOT}", FAULT=fault, FAULT_RANK="1")
    cmd = [sys.executable, *(launcher or ("-m", "ckptctl")), "export-hf", *map(str, args)]
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)


def one_process(src, out, *args) -> dict:
    result = CliRunner().invoke(app, ["export-hf", str(src), "--out", str(out), *args, "--json"])
    assert result.exit_code == 0, (result.stdout, result.stderr)
    return json.loads(result.stdout)


def local_files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def s3_files(s3, url: str) -> dict[str, bytes]:
    return {rel: s3.get(s3.join(url, rel)) for rel in s3.list_files(url)}


def assert_identical(got: dict[str, bytes], want: dict[str, bytes]) -> None:
    assert sorted(got) == sorted(want)
    differ = [rel for rel in want if got[rel] != want[rel]]
    assert not differ, f"files differ from the one-process export: {differ}"


def leftovers(out: Path) -> list[str]:
    return sorted(p.name for p in out.parent.iterdir() if p.name.startswith(f".{out.name}{TMP_INFIX}"))


# ------------------------------------------------------------------------------------------
# the split
# ------------------------------------------------------------------------------------------
def test_shards_split_into_balanced_runs_every_shard_once():
    specs = [(f"t{i}", (n,), "float32") for i, n in enumerate([5000, 100, 100, 3000, 100, 2000, 2000, 50, 4000])]
    plan = plan_shards(specs, 16000)
    sizes = plan.shard_bytes()
    for processes in (1, 2, 3, 4, len(sizes) + 2):
        split = assign_shards(plan, processes)
        assert len(split) == processes
        assert sorted(i for part in split for i in part) == list(range(len(sizes)))
        assert [i for part in split for i in part] == list(range(len(sizes)))  # consecutive runs, in order
        assert split == assign_shards(plan, processes)  # every process computes the same
    two = assign_shards(plan, 2)
    loads = [sum(sizes[i] for i in part) for part in two]
    assert max(loads) - min(loads) <= max(sizes)  # balanced to within one shard


def test_workers_refusals():
    runner = CliRunner()
    result = runner.invoke(app, ["export-hf", "x", "--out", "y", "--workers", "0"])
    assert result.exit_code == 2 and "--workers" in result.stderr
    result = runner.invoke(app, ["export-hf", "x", "--out", "y", "--workers", "2"], env={"WORLD_SIZE": "2"})
    assert result.exit_code == 2 and "torchrun" in result.stderr


# ------------------------------------------------------------------------------------------
# identical to the one-process export
# ------------------------------------------------------------------------------------------
def test_workers_local_fsdp_identical_to_one_process(fsdp_ckpts, tmp_path):
    src = fsdp_ckpts["w2"].path
    want = tmp_path / "one"
    single = one_process(src, want, "--max-shard-size", SHARD)
    assert single["shards"] >= 4
    out = tmp_path / "two"
    proc = run_ckptctl(src, "--out", out, "--max-shard-size", SHARD, "--workers", "2", "--json")
    assert proc.returncode == 0, proc.stderr
    doc = json.loads(proc.stdout)  # one document: only process 0 prints
    assert doc["processes"] == 2 and doc["verified"] and doc["files"] == single["files"]
    assert proc.stderr == ""
    assert_identical(local_files(out), local_files(want))
    assert leftovers(out) == []


def test_torchrun_megatron_identical_to_one_process(megatron_ckpts, tmp_path):
    """The torchrun command line of the README, on a Megatron TP2 checkpoint."""
    src = megatron_ckpts["tp2"].out_dir
    want = tmp_path / "one"
    one_process(src, want, "--max-shard-size", SHARD)
    out = tmp_path / "two"
    proc = run_ckptctl(src, "--out", out, "--max-shard-size", SHARD, "--json",
                       launcher=("-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                                 "-m", "ckptctl"))
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["processes"] == 2
    assert_identical(local_files(out), local_files(want))


def test_workers_to_s3_identical_to_one_process(fsdp_ckpts, make_backend, tmp_path):
    s3 = make_backend("s3")
    src = fsdp_ckpts["w2"].path
    want = tmp_path / "one"
    one_process(src, want, "--max-shard-size", SHARD)
    out = s3.new_root()
    proc = run_ckptctl(src, "--out", out, "--max-shard-size", SHARD, "--workers", "2", "--json")
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["destination"] == out
    assert_identical(s3_files(s3, out), local_files(want))  # the marker is gone too


def test_workers_export_a_whole_run_like_one_process(tmp_path):
    """--steps with --workers: process 0 plans, every step is shared by both processes, one
    document; the result is the one-process run's, file for file; a rerun skips every step."""
    import shutil

    example = Path(shutil.copytree(REPO_ROOT / "examples" / "skyrl-run", tmp_path / "ckpts",
                                   copy_function=shutil.copy))
    want = tmp_path / "one"
    single = CliRunner().invoke(app, ["export-hf", str(example), "--out", str(want), "--steps", "all",
                                      "--max-shard-size", SHARD, "--json"])
    assert single.exit_code == 0, single.stderr
    out = tmp_path / "two"
    proc = run_ckptctl(example, "--out", out, "--steps", "all", "--max-shard-size", SHARD, "--workers", "2",
                       "--json")
    assert proc.returncode == 0, proc.stderr
    doc = json.loads(proc.stdout)  # one document
    statuses = {s["step"]: s["status"] for s in doc["steps"]}
    assert statuses == {1: "exported", 2: "exported", 3: "exported", 4: "in progress"}
    assert all(s["export"]["processes"] == 2 for s in doc["steps"][:3])
    assert_identical(local_files(out), local_files(want))
    proc = run_ckptctl(example, "--out", out, "--steps", "1,3", "--workers", "2", "--json")
    assert proc.returncode == 0, proc.stderr
    assert {s["step"]: s["status"] for s in json.loads(proc.stdout)["steps"]} == {1: "already exported",
                                                                                   3: "already exported"}
    # a plan refused by process 0 is the run's one error, with the one-process exit code
    alone = CliRunner().invoke(app, ["export-hf", str(example), "--out", str(tmp_path / "x"), "--steps", "2,9"])
    proc = run_ckptctl(example, "--out", tmp_path / "x", "--steps", "2,9", "--workers", "2")
    assert proc.returncode == alone.exit_code != 0
    assert proc.stderr.strip().splitlines() == alone.stderr.strip().splitlines()
    assert "no global_step_9" in proc.stderr and not (tmp_path / "x").exists()


# ------------------------------------------------------------------------------------------
# a process that dies or fails
# ------------------------------------------------------------------------------------------
def test_killed_process_fails_the_run_local_then_rerun(fsdp_ckpts, tmp_path):
    src = fsdp_ckpts["w2"].path
    out = tmp_path / "out"
    proc = run_ckptctl(src, "--out", out, "--max-shard-size", SHARD, "--workers", "2", fault="kill",
                       tmp_path=tmp_path)
    assert proc.returncode != 0
    assert proc.stderr.strip().splitlines() == [  # one line, naming the process
        "ckptctl: error: process 1 of 2 was killed (SIGKILL); the run failed and nothing was committed"], proc.stderr
    assert not out.exists()  # nothing at DST; at most a hidden temp sibling the rerun removes
    proc = run_ckptctl(src, "--out", out, "--max-shard-size", SHARD, "--workers", "2")
    assert proc.returncode == 0, proc.stderr
    assert leftovers(out) == []
    want = tmp_path / "one"
    one_process(src, want, "--max-shard-size", SHARD)
    assert_identical(local_files(out), local_files(want))


def test_process_crashing_after_the_commit_is_a_warning(fsdp_ckpts, tmp_path):
    """A process that aborts on its way out, after process 0 committed the output (torch's gloo
    teardown once did): the run succeeded, and the launcher says so instead of "nothing was
    committed"."""
    src = fsdp_ckpts["w2"].path
    out = tmp_path / "out"
    proc = run_ckptctl(src, "--out", out, "--max-shard-size", SHARD, "--workers", "2", fault="abort-at-exit",
                       tmp_path=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert "warning: process 1 of 2 was killed (SIGABRT) after the output was committed; the output is complete" \
        in " ".join(proc.stderr.split()), proc.stderr
    assert verify_export(out) == [] and leftovers(out) == []


def test_failing_process_fails_the_run_on_s3_then_rerun(fsdp_ckpts, make_backend, tmp_path):
    s3 = make_backend("s3")
    src = fsdp_ckpts["w2"].path
    out = s3.new_root()
    proc = run_ckptctl(src, "--out", out, "--max-shard-size", SHARD, "--workers", "2", "--json", fault="raise",
                       tmp_path=tmp_path)
    assert proc.returncode == 1
    assert proc.stderr.strip().splitlines() == [
        "ckptctl: error: process 1: RuntimeError: injected fault while writing "
        + proc.stderr.split("while writing ", 1)[1].strip()]  # one line, from process 0 only
    assert json.loads(proc.stdout)["exit_code"] == 1  # one document
    assert s3.list_files(out) == []  # every process reported: everything removed, marker included
    doc = one_process(src, out, "--max-shard-size", SHARD)  # the rerun needs no --overwrite
    assert doc["verified"] and verify_export(out) == []


def test_killed_process_on_s3_leaves_nothing_complete(fsdp_ckpts, make_backend, tmp_path):
    s3 = make_backend("s3")
    src = fsdp_ckpts["w2"].path
    out = s3.new_root()
    proc = run_ckptctl(src, "--out", out, "--max-shard-size", SHARD, "--workers", "2", "--json", fault="kill",
                       tmp_path=tmp_path)
    assert proc.returncode == 1 and "process 1 of 2 was killed" in proc.stderr
    assert "process 1 of 2 was killed" in json.loads(proc.stdout)["error"]  # --json: still one document
    left = s3.list_files(out)
    assert "config.json" not in left and "model.safetensors.index.json" not in left
    assert not left or INCOMPLETE_MARKER in left  # the rerun sees "interrupted"
    want = tmp_path / "one"
    one_process(src, want, "--max-shard-size", SHARD)
    export_hf(str(src), out, max_shard_size=SHARD)  # no --overwrite needed
    assert_identical(s3_files(s3, out), local_files(want))


# ------------------------------------------------------------------------------------------
# the writer's side, in one process (the owner and an attached writer as two processes use them)
# ------------------------------------------------------------------------------------------
def _shared_write(tmp_path: Path, dest: Path, staging_of_other: Path | None = None, verify: bool = True):
    import torch

    from ckptctl.formats.hf_writer import HfModelWriter

    tensors = {f"w{i}": torch.arange(i * 100, i * 100 + 250, dtype=torch.float32) for i in range(6)}
    specs = [(name, tuple(t.shape), "float32") for name, t in tensors.items()]
    plan = plan_shards(specs, 2000)
    split = assign_shards(plan, 2)
    owner = HfModelWriter(str(dest), specs, max_shard_size=2000, shards=split[0])
    with owner:
        staging = owner.begin()
        other = HfModelWriter.attach(str(dest), specs, max_shard_size=2000, shards=split[1],
                                     staging=str(staging_of_other or staging))
        for writer in (other, owner):
            for name in writer.tensor_names:
                writer.add(name, tensors[name])
        files, nbytes = other.finish_part()
        owner.others_reported(files)
        return owner.finish({"model_type": "test"}, verify=verify, bytes_elsewhere=nbytes), tensors


def test_owner_and_attached_writer_make_the_one_writer_output(tmp_path):
    from ckptctl.formats.hf_writer import HfModelWriter

    summary, tensors = _shared_write(tmp_path, tmp_path / "shared")
    assert summary.shard_count == 3 and summary.tensor_count == 6
    with HfModelWriter(str(tmp_path / "one"), [(n, tuple(t.shape), "float32") for n, t in tensors.items()],
                       max_shard_size=2000) as writer:
        for name, t in tensors.items():
            writer.add(name, t)
        single = writer.finish({"model_type": "test"})
    assert summary.files == single.files and summary.bytes_written == single.bytes_written
    assert_identical(local_files(tmp_path / "shared"), local_files(tmp_path / "one"))


def test_shard_written_where_the_owner_cannot_see_it_is_refused(tmp_path):
    """Nodes without a shared filesystem: caught before the commit, even with --no-verify."""
    elsewhere = tmp_path / "other-node"
    elsewhere.mkdir()
    with pytest.raises(Exception, match="must share the destination's filesystem"):
        _shared_write(tmp_path, tmp_path / "out", staging_of_other=elsewhere, verify=False)
    assert not (tmp_path / "out").exists() and leftovers(tmp_path / "out") == []
