"""The error contract, audited: every command answers damaged, truncated and mis-typed input with
the README's exit code, ONE line on stderr (``ckptctl: error: ...``), no traceback, and with
``--json`` also ``{"error": ..., "exit_code": N}`` on stdout.

The inputs are copies of REAL checkpoints (FSDP2 written by torch, Megatron written by
megatron-core; ``realckpt`` fixtures) damaged in ``tmp_path``: truncated rank files, an invalid
``config.json``, text files where checkpoints belong, files where directories belong, wrong
options for the backend, bad URLs and endpoints, a bucket that does not exist, a store that
refuses connections, and access denied (a denying S3 server; ``chmod 000`` when not root).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import pytest
from typer.testing import CliRunner

from ckptctl.cli import app

runner = CliRunner()
PREFIX = "ckptctl: error: "
NOT_ROOT = hasattr(os, "geteuid") and os.geteuid() != 0


def invoke(args: list[str]):
    return runner.invoke(app, args)


def assert_contract(args: list[str], code: int, pattern: str) -> str:
    """Run ``args`` as given and with ``--json``; both must follow the contract. Returns the message."""
    result = invoke(args)
    where = f"{args}: exit {result.exit_code}\nstdout: {result.stdout}\nstderr: {result.stderr}"
    assert result.exit_code == code, where
    lines = [ln for ln in result.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith(PREFIX), where
    message = lines[0][len(PREFIX):]
    assert re.search(pattern, message), f"{pattern!r} not in {message!r}\n{where}"
    assert "Traceback" not in result.stderr + result.stdout, where

    as_json = invoke(args + ["--json"])
    where = f"{args} --json: exit {as_json.exit_code}\nstdout: {as_json.stdout}\nstderr: {as_json.stderr}"
    assert as_json.exit_code == code, where
    assert [ln for ln in as_json.stderr.splitlines() if ln.strip()] == [PREFIX + message], where
    assert json.loads(as_json.stdout) == {"error": message, "exit_code": code}, where
    return message


# -- damaged copies of real checkpoints ----------------------------------------------------------

@dataclass
class Corpus:
    root: Path

    def __truediv__(self, rel: str) -> str:
        return str(self.root / rel)


def _truncate(path: Path, size: int = 100) -> None:
    data = path.read_bytes()
    assert len(data) > size
    path.write_bytes(data[:size])


@pytest.fixture(scope="module")
def fsdp_corpus(fsdp_tree, tmp_path_factory) -> Corpus:
    """``fsdp``: the real FSDP2 tree (steps 2, 4; pointer 4), untouched; ``fsdp_badjson``: step 4's
    ``policy/huggingface/config.json`` is not JSON; ``fsdp_trunc``: step 4's rank-1 model file cut
    to 100 bytes; text, JSON and truncated single files; an empty directory."""
    root = tmp_path_factory.mktemp("corpus")
    for name in ("fsdp", "fsdp_badjson", "fsdp_trunc"):
        shutil.copytree(fsdp_tree, root / name)
    (root / "fsdp_badjson/global_step_4/policy/huggingface/config.json").write_text('{"architectures": [')
    _truncate(root / "fsdp_trunc/global_step_4/policy/model_world_size_2_rank_1.pt")
    (root / "notes.txt").write_text("my notes: not a checkpoint\n")
    (root / "bad.json").write_text('{"a": ')
    (root / "trainer_state.pt").write_bytes((root / "fsdp/global_step_4/trainer_state.pt").read_bytes()[:100])
    (root / "empty").mkdir()
    return Corpus(root)


@pytest.fixture(scope="module")
def megatron_corpus(megatron_ckpts, fsdp_tree, tmp_path_factory) -> Corpus:
    """``mg``: a tree whose step 1 policy is the real TP=2 Megatron checkpoint; ``mg_badjson``:
    the same with an invalid ``huggingface/config.json``."""
    root = tmp_path_factory.mktemp("mgcorpus")
    for name in ("mg", "mg_badjson"):
        step = root / name / "global_step_1"
        shutil.copytree(megatron_ckpts["tp2"].out_dir, step / "policy")
        for side in ("trainer_state.pt", "data.pt"):
            shutil.copy(Path(fsdp_tree) / "global_step_2" / side, step / side)
        (root / name / "latest_ckpt_global_step.txt").write_text("1")
    (root / "mg_badjson/global_step_1/policy/huggingface/config.json").write_text("{not json")
    return Corpus(root)


@dataclass(frozen=True)
class Case:
    id: str
    args: Callable[[Corpus, Path], list[str]]
    code: int
    pattern: str


NOT_FOUND = r"not found"
FILE_NOT_DIR = r"notes\.txt: is a file, not a directory"
BAD_SCHEME = r"unsupported URL scheme 'http://'"
BAD_ENDPOINT = r"--endpoint-url: invalid endpoint URL"
BAD_JSON = r"config\.json.*not valid JSON"

FSDP_CASES = [
    # list
    Case("list-missing", lambda c, o: ["list", c / "nope"], 3, NOT_FOUND),
    Case("list-file", lambda c, o: ["list", c / "notes.txt"], 5, FILE_NOT_DIR),
    Case("list-empty-dir", lambda c, o: ["list", c / "empty"], 5, r"not a checkpoint tree"),
    Case("list-bad-scheme", lambda c, o: ["list", "http://example.com/run"], 2, BAD_SCHEME),
    Case("list-endpoint-garbage", lambda c, o: ["list", "s3://bucket/run", "--endpoint-url", "garbage"], 2,
         BAD_ENDPOINT),
    Case("list-endpoint-scheme", lambda c, o: ["list", "gs://bucket/run", "--endpoint-url", "ftp://host:21"], 2,
         BAD_ENDPOINT),
    Case("list-unknown-option", lambda c, o: ["list", c / "fsdp", "--deepest"], 2, r"No such option: --deepest"),
    # inspect
    Case("inspect-missing", lambda c, o: ["inspect", c / "fsdp/global_step_9"], 3, NOT_FOUND),
    Case("inspect-text-file", lambda c, o: ["inspect", c / "notes.txt"], 5, r"notes\.txt: not a checkpoint file"),
    Case("inspect-bad-json-file", lambda c, o: ["inspect", c / "bad.json"], 1, r"bad\.json.*not valid JSON"),
    Case("inspect-truncated-pt", lambda c, o: ["inspect", c / "trainer_state.pt"], 1,
         r"trainer_state\.pt.*(corrupt|truncated)"),
    Case("inspect-bad-config-json", lambda c, o: ["inspect", c / "fsdp_badjson/global_step_4"], 1, BAD_JSON),
    Case("inspect-empty-dir", lambda c, o: ["inspect", c / "empty"], 5, r"not a checkpoint"),
    Case("inspect-bad-scheme", lambda c, o: ["inspect", "http://example.com/run"], 2, BAD_SCHEME),
    Case("inspect-unknown-component", lambda c, o: ["inspect", c / "fsdp/global_step_4", "--component", "actor"],
         2, r"no actor/ component"),
    Case("inspect-bad-config-format", lambda c, o: ["inspect", c / "fsdp", "--config-format", "xml"], 2,
         r"--config-format"),
    # prune (none of these may delete anything: checked in the test)
    Case("prune-missing", lambda c, o: ["prune", c / "nope", "--keep", "1", "--yes"], 3, NOT_FOUND),
    Case("prune-file", lambda c, o: ["prune", c / "notes.txt", "--keep", "1", "--yes"], 5, FILE_NOT_DIR),
    Case("prune-empty-dir", lambda c, o: ["prune", c / "empty", "--keep", "1", "--yes"], 5, r"not a checkpoint tree"),
    Case("prune-negative-keep", lambda c, o: ["prune", c / "fsdp", "--keep", "-1", "--yes"], 2, r"--keep"),
    Case("prune-no-keep", lambda c, o: ["prune", c / "fsdp", "--yes"], 2, r"Missing option '--keep'"),
    Case("prune-off-terminal", lambda c, o: ["prune", c / "fsdp", "--keep", "1"], 2,
         r"refusing to delete without confirmation"),
    Case("prune-bad-scheme", lambda c, o: ["prune", "http://example.com/run", "--keep", "1", "--yes"], 2, BAD_SCHEME),
    Case("prune-endpoint-garbage",
         lambda c, o: ["prune", "s3://bucket/run", "--keep", "1", "--yes", "--endpoint-url", "not a url"], 2,
         BAD_ENDPOINT),
    # resolve-resume (a missing tree is SkyRL's "start from scratch": tested with resolve-resume)
    Case("resume-bad-mode", lambda c, o: ["resolve-resume", c / "fsdp", "--mode", "bogus"], 2, r"--mode"),
    Case("resume-bad-interval", lambda c, o: ["resolve-resume", c / "fsdp", "--ckpt-interval", "two"], 2,
         r"--ckpt-interval"),
    Case("resume-bad-scheme", lambda c, o: ["resolve-resume", "http://example.com/run"], 2, BAD_SCHEME),
    Case("resume-endpoint-garbage",
         lambda c, o: ["resolve-resume", "s3://bucket/run", "--endpoint-url", "http://"], 2, BAD_ENDPOINT),
    # export-hf
    Case("export-missing", lambda c, o: ["export-hf", c / "nope", "--out", str(o / "x")], 3, NOT_FOUND),
    Case("export-file", lambda c, o: ["export-hf", c / "notes.txt", "--out", str(o / "x")], 5, FILE_NOT_DIR),
    Case("export-empty-dir", lambda c, o: ["export-hf", c / "empty", "--out", str(o / "x")], 5,
         r"not a checkpoint"),
    Case("export-bad-config-json", lambda c, o: ["export-hf", c / "fsdp_badjson", "--out", str(o / "x")], 1,
         BAD_JSON),
    Case("export-truncated-rank", lambda c, o: ["export-hf", c / "fsdp_trunc/global_step_4", "--out", str(o / "x")],
         1, r"model_world_size_2_rank_1\.pt"),
    Case("export-out-is-file", lambda c, o: ["export-hf", c / "fsdp", "--out", c / "notes.txt"], 5,
         r"notes\.txt: exists and is a file, not a directory"),
    Case("export-no-out", lambda c, o: ["export-hf", c / "fsdp"], 2, r"Missing option '--out'"),
    Case("export-bad-dtype", lambda c, o: ["export-hf", c / "fsdp", "--out", str(o / "x"), "--dtype", "fp8"], 2,
         r"--dtype"),
    Case("export-bad-shard-size",
         lambda c, o: ["export-hf", c / "fsdp", "--out", str(o / "x"), "--max-shard-size", "lots"], 2,
         r"invalid size 'lots'"),
    Case("export-bad-scheme", lambda c, o: ["export-hf", c / "fsdp", "--out", "ftp://host/x"], 2,
         r"unsupported URL scheme 'ftp://'"),
    # convert-reshard
    Case("reshard-missing", lambda c, o: ["convert-reshard", c / "nope", "--out", str(o / "x"), "--world-size", "1"],
         3, NOT_FOUND),
    Case("reshard-file", lambda c, o: ["convert-reshard", c / "notes.txt", "--out", str(o / "x"), "--world-size", "1"],
         5, FILE_NOT_DIR),
    Case("reshard-fsdp-given-tp",
         lambda c, o: ["convert-reshard", c / "fsdp/global_step_4", "--out", str(o / "x"), "--tp", "1"], 2,
         r"a fsdp component; --tp/--pp/--dp are for Megatron"),
    Case("reshard-no-layout", lambda c, o: ["convert-reshard", c / "fsdp/global_step_4", "--out", str(o / "x")], 2,
         r"say the target layout"),
    Case("reshard-zero-world",
         lambda c, o: ["convert-reshard", c / "fsdp/global_step_4", "--out", str(o / "x"), "--world-size", "0"], 2,
         r"--world-size"),
    Case("reshard-both-layouts", lambda c, o: ["convert-reshard", c / "fsdp/global_step_4", "--out", str(o / "x"),
                                                "--world-size", "1", "--tp", "1"], 2, r"not both"),
    Case("reshard-out-is-file", lambda c, o: ["convert-reshard", c / "fsdp/global_step_4", "--out", c / "notes.txt",
                                               "--world-size", "1"], 5, r"notes\.txt: exists and is a file"),
    Case("reshard-truncated-rank", lambda c, o: ["convert-reshard", c / "fsdp_trunc/global_step_4", "--out",
                                                  str(o / "x"), "--world-size", "1"], 1,
         r"model_world_size_2_rank_1\.pt"),
    Case("reshard-bad-config-json", lambda c, o: ["convert-reshard", c / "fsdp_badjson/global_step_4", "--out",
                                                   str(o / "x"), "--world-size", "1"], 1, BAD_JSON),
]

MEGATRON_CASES = [
    Case("export-megatron-bad-config-json",
         lambda c, o: ["export-hf", c / "mg_badjson/global_step_1", "--out", str(o / "x")], 1, BAD_JSON),
    Case("export-megatron-no-critic",
         lambda c, o: ["export-hf", c / "mg", "--out", str(o / "x"), "--component", "critic"], 2,
         r"no critic/ component"),
    Case("reshard-megatron-given-world-size",
         lambda c, o: ["convert-reshard", c / "mg/global_step_1", "--out", str(o / "x"), "--world-size", "2"], 2,
         r"a megatron component; convert-reshard --world-size is for FSDP"),
    Case("reshard-megatron-bad-config-json",
         lambda c, o: ["convert-reshard", c / "mg_badjson/global_step_1", "--out", str(o / "x"), "--tp", "1"], 1,
         BAD_JSON),
    Case("inspect-megatron-bad-config-json", lambda c, o: ["inspect", c / "mg_badjson/global_step_1/policy"], 1,
         BAD_JSON),
]


def _snapshot(root: Path) -> dict[str, int]:
    return {str(p.relative_to(root)): p.stat().st_size for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.mark.parametrize("case", FSDP_CASES, ids=[c.id for c in FSDP_CASES])
def test_fsdp_corpus(case: Case, fsdp_corpus: Corpus, tmp_path):
    before = _snapshot(fsdp_corpus.root)
    assert_contract([str(a) for a in case.args(fsdp_corpus, tmp_path)], case.code, case.pattern)
    assert _snapshot(fsdp_corpus.root) == before  # nothing deleted, overwritten or left behind
    assert not (tmp_path / "x").exists()


@pytest.mark.parametrize("case", MEGATRON_CASES, ids=[c.id for c in MEGATRON_CASES])
def test_megatron_corpus(case: Case, megatron_corpus: Corpus, tmp_path):
    before = _snapshot(megatron_corpus.root)
    assert_contract([str(a) for a in case.args(megatron_corpus, tmp_path)], case.code, case.pattern)
    assert _snapshot(megatron_corpus.root) == before
    assert not (tmp_path / "x").exists()


def test_resolve_resume_not_resumable_has_a_document_and_one_line(fsdp_corpus):
    """Exit 6 is a result, not an error: the JSON document says why (resumable false, reason)."""
    args = ["resolve-resume", "--mode", "from_path", "--resume-path", fsdp_corpus / "notes.txt"]
    human = invoke(args)
    assert human.exit_code == 6
    lines = [ln for ln in human.stderr.splitlines() if ln.strip()]
    assert lines[-1].startswith(PREFIX + "not resumable: ") and "Traceback" not in human.stderr
    doc = json.loads(invoke(args + ["--json"]).stdout)
    assert doc["resumable"] is False and "global_step_" in doc["reason"]


# -- object stores -------------------------------------------------------------------------------

STORE_COMMANDS = {
    "list": lambda url, o: ["list", url],
    "inspect": lambda url, o: ["inspect", url],
    "prune": lambda url, o: ["prune", url, "--keep", "0", "--yes"],
    "resolve-resume": lambda url, o: ["resolve-resume", url, "--mode", "from_path", "--resume-path",
                                      f"{url}/global_step_1"],
    "export-hf": lambda url, o: ["export-hf", url, "--out", str(o / "x")],
    "convert-reshard": lambda url, o: ["convert-reshard", url, "--out", str(o / "x"), "--world-size", "1"],
}


@pytest.mark.parametrize("command", sorted(STORE_COMMANDS))
@pytest.mark.parametrize("unknown_key", [False, True], ids=["deny-policy", "unknown-key"])
def test_access_denied_is_exit_4_everywhere(command, unknown_key, s3_denied, monkeypatch, tmp_path):
    s3_denied.use(monkeypatch, unknown_key=unknown_key)
    assert_contract(STORE_COMMANDS[command](s3_denied.url, tmp_path), 4, r"access denied")
    assert s3_denied.list_keys() == sorted("ckpt/" + k for k in s3_denied.files)


@pytest.mark.skipif(not NOT_ROOT, reason="root reads files whatever their mode (denial is tested on S3)")
@pytest.mark.parametrize("command", ["list", "inspect", "prune", "export-hf", "convert-reshard"])
def test_local_permission_denied_is_exit_4(command, fsdp_corpus, tmp_path):
    tree = tmp_path / "tree"
    shutil.copytree(fsdp_corpus / "fsdp", tree)
    locked = tree / "global_step_4" / "policy" if command != "list" else tree / "global_step_4"
    url = str(tree / "global_step_4") if command in ("inspect", "convert-reshard") else str(tree)
    os.chmod(locked, 0)
    try:
        assert_contract(STORE_COMMANDS[command](url, tmp_path), 4, r"access denied")
    finally:
        os.chmod(locked, 0o755)


@pytest.mark.parametrize("command", sorted(STORE_COMMANDS))
def test_missing_bucket_is_exit_3(command, s3_server, tmp_path):
    assert_contract(STORE_COMMANDS[command]("s3://no-such-bucket-ckptctl/run", tmp_path), 3, r"not found")


@pytest.mark.parametrize("scheme", ["s3", "gs"])
@pytest.mark.parametrize("command", ["export-hf", "convert-reshard"])
def test_missing_destination_bucket_is_named(command, scheme, fsdp_corpus, s3_server, gcs_server):
    """A destination in a bucket that does not exist: the bucket is named, not the first object
    the command would have written there."""
    src = fsdp_corpus / "fsdp" if command == "export-hf" else fsdp_corpus / "fsdp/global_step_4"
    args = [command, src, "--out", f"{scheme}://no-such-bucket-ckptctl/out"]
    message = assert_contract(args + (["--world-size", "1"] if command == "convert-reshard" else []), 3,
                              r"bucket not found")
    assert message == f"{scheme}://no-such-bucket-ckptctl: bucket not found"


@pytest.mark.parametrize("command", ["list", "export-hf"])
def test_invalid_bucket_name_is_a_usage_error(command, fsdp_corpus, s3_server):
    """botocore refuses the name before any request: the URL's fault (exit 2), said in one line."""
    url = "s3://Bad_Bucket!/run"
    args = ["list", url] if command == "list" else ["export-hf", fsdp_corpus / "fsdp", "--out", url]
    message = assert_contract(args, 2, r"invalid bucket name")
    assert message == f"{url}: invalid bucket name 'Bad_Bucket!' (only letters, digits, '.', '-' and '_')"


@pytest.fixture
def closed_port_endpoint() -> str:
    """An endpoint nothing listens on (bound, then closed: connections are refused)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return f"http://127.0.0.1:{port}"


@pytest.mark.parametrize("scheme", ["s3", "gs"])
@pytest.mark.parametrize("command", ["list", "prune", "export-hf"])
def test_unreachable_store_is_one_line_exit_1(command, scheme, closed_port_endpoint, tmp_path, monkeypatch):
    monkeypatch.setenv("CKPTCTL_STORE_ATTEMPTS", "1")  # refused at once; the retries are tested in test_storage
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    args = STORE_COMMANDS[command](f"{scheme}://bucket/run", tmp_path) + ["--endpoint-url", closed_port_endpoint]
    assert_contract(args, 1, r"cannot reach the store")


# -- the real console script ---------------------------------------------------------------------

def test_console_script_keeps_the_contract(fsdp_corpus, tmp_path):
    """A real process: click's own usage errors and ckptctl's errors look the same."""
    exe = os.path.join(os.path.dirname(sys.executable), "ckptctl")
    cases = [
        (["prune", fsdp_corpus / "fsdp", "--keep", "many", "--json"], 2, r"--keep"),
        (["inspect", fsdp_corpus / "notes.txt", "--json"], 5, r"not a checkpoint file"),
        (["export-hf", fsdp_corpus / "fsdp_badjson", "--out", str(tmp_path / "x"), "--json"], 1, BAD_JSON),
    ]
    for args, code, pattern in cases:
        done = subprocess.run([exe, *map(str, args)], capture_output=True, text=True, stdin=subprocess.DEVNULL,
                              timeout=300)
        assert done.returncode == code, (args, done.stdout, done.stderr)
        lines = done.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith(PREFIX) and re.search(pattern, lines[0]), done.stderr
        assert json.loads(done.stdout) == {"error": lines[0][len(PREFIX):], "exit_code": code}


EXIT_SCRIPT = r"""
import atexit, sys, threading, time
import torch
from ckptctl.ops.distributed import exit_process

out = sys.argv[1]


class TornDown:
    def __del__(self):  # runs only in the interpreter's teardown (a module global)
        sys.stderr.write("torn down")


kept = TornDown()


def late():
    time.sleep(0.5)
    with open(out + ".thread", "w") as f:
        f.write("done")


threading.Thread(target=late).start()  # not a daemon: the exit waits for it
atexit.register(lambda: open(out + ".atexit", "w").write("ran"))
print("printed", end="")  # no newline: still buffered when the process leaves
exit_process(int(sys.argv[2]) if sys.argv[2].isdigit() else sys.argv[2])
"""


@pytest.mark.parametrize("code, status", [("3", 3), ("0", 0), ("a message", 1)])
def test_a_process_with_torch_loaded_leaves_without_teardown(tmp_path, code, status):
    """With torch loaded, a finished command skips the interpreter's teardown (about 0.4 s of
    CPU) but keeps what an exit promises: the status, the buffered output, the exit handlers,
    and the threads that are not daemons finish first."""
    out = str(tmp_path / "mark")
    env = {k: v for k, v in os.environ.items() if k not in ("WORLD_SIZE", "RANK")}
    done = subprocess.run([sys.executable, "-c", EXIT_SCRIPT, out, code], capture_output=True, text=True,
                          timeout=120, env=env)
    assert done.returncode == status, done.stderr
    assert done.stdout == "printed"
    assert Path(out + ".thread").read_text() == "done"
    assert Path(out + ".atexit").read_text() == "ran"
    assert "torn down" not in done.stderr
    if status == 1:
        assert done.stderr.strip() == code


@pytest.mark.parametrize("scheme", ["s3", "gs"])
@pytest.mark.parametrize("command", ["export-hf", "convert-reshard"])
def test_destination_that_is_an_object_is_refused(command, scheme, fsdp_corpus, make_backend):
    """As a local file in the way is: writing below an object would leave an object and a
    "directory" of one name, which no local copy of the bucket can hold. The object is kept."""
    backend = make_backend(scheme)
    root = backend.new_root()
    backend.put(f"{root}/out", b"a file in the way")
    src = fsdp_corpus / "fsdp" if command == "export-hf" else fsdp_corpus / "fsdp/global_step_4"
    args = [command, src, "--out", f"{root}/out"] + (["--world-size", "1"] if command == "convert-reshard" else [])
    message = assert_contract(args, 5, r"exists and is a file")
    assert message == f"{root}/out: exists and is a file, not a directory"
    assert backend.list_files(root) == ["out"]
    assert backend.get(f"{root}/out") == b"a file in the way"
