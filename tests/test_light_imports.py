"""--help, list, prune and resolve-resume must not import torch, transformers or megatron."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

import treebuilder as tb

HEAVY = ("torch", "transformers", "megatron")

PROBE = """
import json, sys
from ckptctl.cli import main
sys.argv = ["ckptctl"] + json.loads(sys.argv[1])
try:
    main()
except SystemExit:
    pass
heavy = sorted({m.split(".")[0] for m in sys.modules} & {"torch", "transformers", "megatron"})
sys.stderr.write("HEAVY=" + json.dumps(heavy) + "\\n")
"""


def heavy_modules_after(args: list[str]) -> list[str]:
    return run_probe(args)[0]


def run_probe(args: list[str]) -> tuple[list[str], str]:
    """(the heavy libraries the command imported, its stderr)."""
    done = subprocess.run([sys.executable, "-c", PROBE, json.dumps(args)], capture_output=True, text=True,
                          stdin=subprocess.DEVNULL, timeout=120)
    line = [ln for ln in done.stderr.splitlines() if ln.startswith("HEAVY=")]
    assert line, done.stderr
    return json.loads(line[-1][len("HEAVY="):]), done.stderr


@pytest.fixture(scope="module")
def tree(tmp_path_factory) -> str:
    root = tmp_path_factory.mktemp("tree")
    for step in (1, 2, 3):
        tb.fsdp_step(str(root), step)
    tb.pointer(str(root), 3)
    return str(root)


@pytest.mark.parametrize("args", [
    ["--help"],
    ["list", "{tree}"],
    ["list", "{tree}", "--json"],
    ["prune", "{tree}", "--keep", "1", "--dry-run"],
    ["prune", "{tree}", "--keep", "1", "--yes"],
    ["resolve-resume", "{tree}", "--fallback"],
], ids=["help", "list", "list-json", "prune-dry-run", "prune", "resolve-resume"])
def test_management_commands_stay_light(tree, args):
    assert heavy_modules_after([a.format(tree=tree) for a in args]) == []


TORCH_PROBE = """
import gc, json, sys
if sys.argv[1] == "disabled":
    gc.disable()
from ckptctl.heavy import import_torch
passes = []
gc.callbacks.append(lambda phase, info: passes.append(info["generation"]) if phase == "start" else None)
torch = import_torch()
gc.callbacks.clear()
print(json.dumps({"is_torch": torch is sys.modules["torch"], "gc_enabled": gc.isenabled(), "passes": len(passes),
                  "dtensor_loaded": "torch.distributed.tensor" in sys.modules}))
"""


@pytest.mark.parametrize("collector", ["enabled", "disabled"])
def test_commands_that_read_tensors_import_torch_and_restore_the_collector(collector):
    """The import pauses the garbage collector (its full passes over the ~260k new objects are a
    third of a second of every export's start) and leaves it as it found it."""
    done = subprocess.run([sys.executable, "-c", TORCH_PROBE, collector], capture_output=True, text=True,
                          stdin=subprocess.DEVNULL, timeout=120)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout.splitlines()[-1]) == {
        "is_torch": True, "gc_enabled": collector == "enabled", "passes": 0, "dtensor_loaded": False}


@pytest.mark.parametrize("command", ["export-hf", "convert-reshard"])
@pytest.mark.parametrize("where", ["local-dir", "local-file", "s3"])
def test_a_refused_destination_is_refused_before_importing_torch(where, command, fsdp_tree, make_backend, tmp_path):
    """A destination export-hf or convert-reshard will refuse is refused in a second, before
    torch is imported and the source read (it took 4-5 s, the import and the source's metadata
    first)."""
    if where == "s3":
        backend = make_backend("s3")
        out = backend.new_root()
        backend.put(f"{out}/notes.txt", b"mine")
    else:
        out = str(tmp_path / "out")
        if where == "local-dir":
            os.mkdir(out)
            out_file = os.path.join(out, "notes.txt")
        else:
            out_file = out
        with open(out_file, "w") as f:
            f.write("mine")
    args = (["export-hf", str(fsdp_tree), "--out", out] if command == "export-hf" else
            ["convert-reshard", os.path.join(fsdp_tree, "global_step_4"), "--out", out, "--world-size", "1"])
    heavy, stderr = run_probe(args)
    assert heavy == [], stderr
    message = "exists and is a file" if where == "local-file" else "destination is not empty"
    assert message in stderr


DTENSOR_PROBE = """
import json, sys
from ckptctl.cli import app
try:
    app(json.loads(sys.argv[1]), standalone_mode=False)
except SystemExit as exc:
    if exc.code:
        raise
loaded = [m for m in ("torch", "torch.distributed.tensor", "sympy") if m in sys.modules]
sys.stderr.write("LOADED=" + json.dumps(loaded) + "\\n")
"""


@pytest.mark.parametrize("command", ["inspect", "export-hf-cast", "export-hf"])
def test_fsdp2_dtensors_are_read_without_torch_distributed_tensor(command, fsdp_ckpts, tmp_path):
    """An FSDP2 checkpoint's DTensors are read as data (safe_load.DTensorData): reading one
    imports torch, not torch.distributed.tensor (nor the sympy it pulls in: ~0.8 s of every
    inspect, export and reshard start). The command still reads the sharded tensors. An export
    that converts nothing copies their bytes (formats/fsdp_bytes) and imports no torch at all."""
    src = str(fsdp_ckpts["w3_tied"].path)
    args = (["inspect", src, "--tensors", "--json"] if command == "inspect" else
            ["export-hf", src, "--out", str(tmp_path / "out"), "--json"]
            + (["--dtype", "bf16"] if command == "export-hf-cast" else []))
    done = subprocess.run([sys.executable, "-c", DTENSOR_PROBE, json.dumps(args)], capture_output=True, text=True,
                          stdin=subprocess.DEVNULL, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    line = [ln for ln in done.stderr.splitlines() if ln.startswith("LOADED=")]
    assert line, done.stderr[-2000:]
    assert json.loads(line[-1][len("LOADED="):]) == ([] if command == "export-hf" else ["torch"])
    doc = json.loads(done.stdout)
    if command == "inspect":
        text = json.dumps(doc)
        assert '"Shard(dim=0)"' in text and '"dtensor"' in text
    else:
        assert doc["verified"] and doc["byte_copy"] is (command == "export-hf")
        assert (tmp_path / "out" / "config.json").is_file()
