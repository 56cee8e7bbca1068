"""The ``ckptctl`` command line as tests call it: typer's runner, no subprocess."""

from __future__ import annotations

import json

from typer.testing import CliRunner

from ckptctl.cli import app

runner = CliRunner()


def run(*args: str) -> tuple[int, str, str]:
    """(exit code, stdout, stderr) of ``ckptctl ARGS``."""
    result = runner.invoke(app, [str(a) for a in args])
    return result.exit_code, result.stdout, result.stderr


def run_json(*args: str, expect: int = 0) -> dict:
    """The ``--json`` document of ``ckptctl ARGS``, asserting the exit code."""
    code, out, err = run(*args, "--json")
    assert code == expect, (code, out, err)
    return json.loads(out)
