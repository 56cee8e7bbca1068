"""--help, list, prune and resolve-resume must not import torch, transformers or megatron."""

from __future__ import annotations

import json
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
    done = subprocess.run([sys.executable, "-c", PROBE, json.dumps(args)], capture_output=True, text=True,
                          stdin=subprocess.DEVNULL, timeout=120)
    line = [ln for ln in done.stderr.splitlines() if ln.startswith("HEAVY=")]
    assert line, done.stderr
    return json.loads(line[-1][len("HEAVY="):])


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
