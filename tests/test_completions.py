"""The static completion scripts in completions/: up to date with the CLI, complete, and working.

Regenerate them with ``python -m ckptctl.completions`` after changing the CLI.
"""

from __future__ import annotations

import enum
import re
import shutil
import subprocess
from pathlib import Path
from typing import Annotated, Optional

import pytest
import typer
import typer.main

from ckptctl import completions
from ckptctl.cli import app

REPO = Path(__file__).resolve().parent.parent
SCRIPTS = REPO / "completions"
HIDDEN = {"--install-completion", "--show-completion"}
REGENERATE_HINT = "regenerate with: python -m ckptctl.completions  (from the repository root), then commit"


def _live_tree():
    """(path, subcommand names, option names) for every command of the live CLI, walked here
    independently of the generator so a generator bug cannot hide a missing option."""
    root = typer.main.get_command(app)
    out = []

    def walk(cmd, parent_ctx, path):
        ctx = cmd.context_class(cmd, parent=parent_ctx, info_name=path[-1], **(cmd.context_settings or {}))
        options = []
        for param in cmd.get_params(ctx):
            if getattr(param, "param_type_name", "") == "argument" or getattr(param, "hidden", False):
                continue
            names = [*param.opts, *param.secondary_opts]
            if HIDDEN.intersection(names):
                continue
            options.extend(names)
        subs = []
        if hasattr(cmd, "list_commands"):
            subs = [n for n in cmd.list_commands(ctx) if not cmd.get_command(ctx, n).hidden]
        out.append((path, subs, options))
        for name in subs:
            walk(cmd.get_command(ctx, name), ctx, (*path, name))

    walk(root, None, ("ckptctl",))
    return out


LIVE = _live_tree()


def test_live_cli_shape():
    """Guards the walk above: the commands this test suite relies on exist."""
    paths = {" ".join(p) for p, _, _ in LIVE}
    assert {"ckptctl", "ckptctl list", "ckptctl prune", "ckptctl resolve-resume"} <= paths
    prune = next(opts for p, _, opts in LIVE if p == ("ckptctl", "prune"))
    assert {"--keep", "-k", "--keep-every", "--help", "-h"} <= set(prune)


# ---------------------------------------------------------------------------------------------
# (1) the committed scripts are what the generator produces from the current CLI


@pytest.mark.parametrize("shell", completions.SHELLS)
def test_committed_script_is_up_to_date(shell):
    path = SCRIPTS / completions.FILENAMES[shell]
    assert path.is_file(), f"{path} is missing; {REGENERATE_HINT}"
    committed = path.read_text(encoding="utf-8")
    assert committed == completions.render(shell), (
        f"{path.relative_to(REPO)} is out of date with the CLI; {REGENERATE_HINT}")


def test_write_all_and_module_entry_point(tmp_path):
    written = completions.write_all(tmp_path)
    assert sorted(p.name for p in written) == sorted(completions.FILENAMES.values())
    for shell, name in completions.FILENAMES.items():
        text = (tmp_path / name).read_text(encoding="utf-8")
        assert text == completions.render(shell)
        assert "GENERATED" in text and "python -m ckptctl.completions" in text
        assert "Install:" in text
    assert completions.main([str(tmp_path / "again")]) == 0
    assert (tmp_path / "again" / "ckptctl.bash").read_text() == (tmp_path / "ckptctl.bash").read_text()
    with pytest.raises(ValueError, match="unknown shell"):
        completions.render("powershell")


def test_render_is_deterministic():
    for shell in completions.SHELLS:
        assert completions.render(shell) == completions.render(shell)


# ---------------------------------------------------------------------------------------------
# (3) every subcommand and option of the live CLI is in every script, under its own command


def _bash_words(script: str, function: str, key: str) -> list[str]:
    body = script.split(f"{function}()\n", 1)[1].split("\n}\n", 1)[0]
    m = re.search(rf"^\s*'{re.escape(key)}'\) echo '([^']*)' ;;$", body, re.M)
    return m.group(1).split() if m else []


def _zsh_function(script: str, name: str) -> str:
    m = re.search(rf"^{re.escape(name)}\(\) \{{\n(.*?)^\}}$", script, re.M | re.S)
    assert m, f"zsh function {name} missing"
    return m.group(1)


def _zsh_ident(path) -> str:
    return "_ckptctl" + "".join("__" + re.sub(r"[^A-Za-z0-9]", "_", part) for part in path[1:])


def _fish_lines(script: str, path) -> list[str]:
    cond = f"-n '__ckptctl_using {' '.join(path)}'"
    return [line for line in script.splitlines() if line.startswith("complete -c ckptctl ") and cond in line]


def _fish_flag(option: str) -> str:
    if option.startswith("--"):
        return f"-l {option[2:]}"
    return f"-s {option[1:]}" if len(option) == 2 else f"-o {option[1:]}"


@pytest.mark.parametrize("path,subcommands,options", LIVE, ids=[" ".join(p) for p, _, _ in LIVE])
def test_every_command_and_option_in_every_script(path, subcommands, options):
    key = " ".join(path)
    bash = (SCRIPTS / "ckptctl.bash").read_text()
    zsh = (SCRIPTS / "_ckptctl").read_text()
    fish = (SCRIPTS / "ckptctl.fish").read_text()

    # bash: per-command case tables
    assert set(subcommands) == set(_bash_words(bash, "__ckptctl_subcommands", key)), key
    assert set(options) == set(_bash_words(bash, "__ckptctl_options", key)), key

    # zsh: one function per command; groups also have a command lister and a dispatch case
    body = _zsh_function(zsh, _zsh_ident(path))
    for opt in options:
        assert re.search(rf"'(\([^)]*\))?\*?{re.escape(opt)}[=+]?\[", body), f"zsh: {key} {opt}"
    if subcommands:
        lister = _zsh_function(zsh, "_ckptctl_cmds" + _zsh_ident(path)[len("_ckptctl"):])
        for sub in subcommands:
            assert f"'{sub}:" in lister, f"zsh: {key} {sub}"
            assert f"({sub}) {_zsh_ident((*path, sub))} " in body, f"zsh: {key} {sub}"

    # fish: complete lines conditioned on exactly this command
    lines = _fish_lines(fish, path)
    for opt in options:
        assert any(re.search(rf" {re.escape(_fish_flag(opt))}( |$)", ln) for ln in lines), f"fish: {key} {opt}"
    for sub in subcommands:
        assert any(re.search(rf" -a '{re.escape(sub)}'( |$)", ln) for ln in lines), f"fish: {key} {sub}"
        assert f"'{sub}'" in fish.split("function __ckptctl_subcommands", 1)[1].split("\nend\n", 1)[0]


def test_typer_completion_options_hidden():
    for name in completions.FILENAMES.values():
        text = (SCRIPTS / name).read_text()
        for hidden in ("install-completion", "show-completion"):
            assert hidden not in text, f"{name} offers Typer's --{hidden}"


# ---------------------------------------------------------------------------------------------
# (2) the scripts work in real shells


def _bash_complete(script: str, cases: list[list[str]], cwd: Path) -> list[list[str]]:
    """COMPREPLY of the bash completion function for each command line (last word: the cursor)."""
    driver = [
        "set -u",
        'source "$1"',
        "complete -p ckptctl",
        "t() {",
        '    COMP_WORDS=("$@"); COMP_CWORD=$(( $# - 1 ))',
        '    COMP_LINE="$*"; COMP_POINT=${#COMP_LINE}',
        "    COMPREPLY=()",
        "    _ckptctl ckptctl \"${COMP_WORDS[COMP_CWORD]}\" \"${COMP_WORDS[COMP_CWORD-1]}\"",
        '    printf "%s\\n" "${COMPREPLY[@]}" | LC_ALL=C sort',
        "    echo '@@'",
        "}",
    ]
    for words in cases:
        driver.append("t " + " ".join("'" + w.replace("'", "'\\''") + "'" for w in words))
    script_path = cwd.parent / "ckptctl.bash.under-test"
    script_path.write_text(script)
    proc = subprocess.run(["bash", "--norc", "--noprofile", "-c", "\n".join(driver), "bash", str(script_path)],
                          cwd=cwd, capture_output=True, text=True, timeout=30)
    assert proc.returncode == 0 and not proc.stderr, proc.stderr
    head, _, rest = proc.stdout.partition("\n")
    assert "-F _ckptctl" in head and head.rstrip().endswith(" ckptctl"), head
    chunks = rest.split("@@\n")
    assert chunks[-1] == "" and len(chunks) == len(cases) + 1, proc.stdout
    return [[w for w in chunk.split("\n") if w] for chunk in chunks[:-1]]


needs_bash = pytest.mark.skipif(shutil.which("bash") is None, reason="bash is not installed")


@pytest.fixture
def completion_dir(tmp_path):
    """A working directory with a few files and directories for file completion."""
    cwd = tmp_path / "cwd"
    (cwd / "ckpts" / "global_step_10").mkdir(parents=True)
    (cwd / "ckpt notes.txt").write_text("x")
    (cwd / "other").mkdir()
    return cwd


@needs_bash
def test_bash_syntax():
    proc = subprocess.run(["bash", "-n", str(SCRIPTS / "ckptctl.bash")], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr


@needs_bash
def test_bash_completes_the_cli(completion_dir):
    cases = [
        (["ckptctl", "pr"], ["prune"]),
        (["ckptctl", "prune", "--ke"], ["--keep", "--keep-every"]),
        (["ckptctl", ""], sorted(typer.main.get_command(app).commands)),  # every subcommand
        (["ckptctl", "--"], ["--help", "--version"]),
        (["ckptctl", "prune", "--keep", ""], []),  # an integer: nothing to offer
        (["ckptctl", "prune", "--keep", "=", ""], []),
        (["ckptctl", "prune", "-k", "2", "--dry-run", "ck"], ["ckpt notes.txt", "ckpts"]),
        (["ckptctl", "prune", "--keep", "=", "2", "ckpts/"], ["ckpts/global_step_10"]),
        (["ckptctl", "list", "--endpoint-url", "http://x", "--j"], ["--json"]),
        (["ckptctl", "resolve-resume", "--mode", "latest", "--res"], ["--resume-path"]),
        (["ckptctl", "list", "--", "-"], []),  # after --, words are positionals (no such file)
        (["ckptctl", "nosuch", "--"], ["--help", "--version"]),  # unknown subcommand: stays at the root
    ]
    got = _bash_complete((SCRIPTS / "ckptctl.bash").read_text(), [w for w, _ in cases], completion_dir)
    for (words, expected), reply in zip(cases, got):
        assert reply == sorted(expected), f"{' '.join(words)!r}<TAB> offered {reply}, expected {expected}"
    # every subcommand's options, and nothing of Typer's own completion machinery
    root = dict(zip((" ".join(w) for w, _ in cases), got))["ckptctl --"]
    assert not HIDDEN.intersection(root)


# A synthetic CLI exercising what ckptctl's commands do not use yet: choices, directory-only
# options, nested groups, --x/--no-x flags, multi-value options. New ckptctl subcommands
# (inspect, export-hf, convert-reshard) are picked up the same way.

class Fmt(str, enum.Enum):
    hf = "hf"
    dcp = "dcp"


def _synthetic_app() -> typer.Typer:
    demo = typer.Typer(add_completion=True)

    @demo.command("export-hf")
    def export_hf(
        src: Annotated[str, typer.Argument(help="Source.")],
        fmt: Annotated[Fmt, typer.Option("--format", "-f", help="Output [format]: 'hf' or dcp.")] = Fmt.hf,
        out: Annotated[Optional[Path], typer.Option("--out", file_okay=False, help="Output dir.")] = None,
        config: Annotated[Optional[Path], typer.Option("--config", help="A config file.")] = None,
        shard: Annotated[Optional[tuple[int, int]], typer.Option("--shard", help="Shard i of n.")] = None,
        verify: Annotated[bool, typer.Option(help="Verify after export.")] = True,
    ) -> None:
        pass

    remote = typer.Typer()

    @remote.command("add")
    def add(name: Annotated[Fmt, typer.Argument()], verbose: bool = False) -> None:
        pass

    @remote.command("rm", hidden=True)
    def rm() -> None:
        pass

    demo.add_typer(remote, name="remote", help="Manage remotes.")
    return demo


@needs_bash
def test_bash_generator_features(completion_dir):
    demo = _synthetic_app()
    script = completions.render("bash", command=demo)
    cases = [
        (["ckptctl", ""], ["export-hf", "remote"]),
        (["ckptctl", "export-hf", "--format", ""], ["dcp", "hf"]),
        (["ckptctl", "export-hf", "-f", "d"], ["dcp"]),
        (["ckptctl", "export-hf", "--format", "=", "h"], ["hf"]),
        (["ckptctl", "export-hf", "--format=d"], ["--format=dcp"]),
        (["ckptctl", "export-hf", "--out", ""], ["ckpts", "other"]),  # directories only
        (["ckptctl", "export-hf", "--config", "ck"], ["ckpt notes.txt", "ckpts"]),
        (["ckptctl", "export-hf", "--shard", "1", "2", "ck"], ["ckpt notes.txt", "ckpts"]),
        (["ckptctl", "export-hf", "--shard", "1", ""], []),
        (["ckptctl", "export-hf", "--v"], ["--verify"]),
        (["ckptctl", "export-hf", "--no"], ["--no-verify"]),
        (["ckptctl", "remote", ""], ["add"]),  # hidden subcommand left out
        (["ckptctl", "remote", "add", ""], ["dcp", "hf"]),  # an enum positional
        (["ckptctl", "remote", "add", "--"], ["--help", "--no-verbose", "--verbose"]),
    ]
    got = _bash_complete(script, [w for w, _ in cases], completion_dir)
    for (words, expected), reply in zip(cases, got):
        assert reply == sorted(expected), f"{' '.join(words)!r}<TAB> offered {reply}, expected {expected}"


def test_synthetic_zsh_and_fish_contents():
    demo = _synthetic_app()
    zsh = completions.render("zsh", command=demo)
    assert r"'(-f --format)--format=[Output \[format\]\: '\''hf'\'' or dcp.]:format:(hf dcp)'" in zsh
    assert "'(--out)--out=[Output dir.]:out:_files -/'" in zsh
    assert "'(--shard)--shard=[Shard i of n.]:shard: :shard: '" in zsh
    assert "'(--no-verify --verify)--no-verify[Verify after export.]'" in zsh
    assert "(remote) _ckptctl__remote && ret=0 ;;" in zsh and "_ckptctl__remote__add() {" in zsh
    assert "':name:(hf dcp)'" in zsh and "rm" not in _zsh_function(zsh, "_ckptctl_cmds__remote")
    assert "        'add'\n" in zsh and "'(--no-verbose --verbose)--verbose' \\\n" in zsh  # no help: no []
    fish = completions.render("fish", command=demo)
    assert ("complete -c ckptctl -n '__ckptctl_using ckptctl export-hf' -s f -l format -x -a 'hf dcp' "
            "-d 'Output [format]: \\'hf\\' or dcp.'") in fish
    assert "-l out -x -a '(__fish_complete_directories)'" in fish
    assert "-l config -r -F" in fish
    assert "case 'ckptctl export-hf --shard'\n            echo 2" in fish
    assert "complete -c ckptctl -n '__ckptctl_using ckptctl remote add' -a 'hf dcp'" in fish
    assert "complete -c ckptctl -n '__ckptctl_using ckptctl remote' -a 'add'\n" in fish
    for script in (zsh, fish, completions.render("bash", command=demo)):
        assert "install-completion" not in script and "show-completion" not in script


@pytest.mark.parametrize("shell,installed,demo,check", [
    ("zsh", "_ckptctl", "_demo", ["zsh", "-n"]),
    ("fish", "ckptctl.fish", "demo.fish", ["fish", "--no-execute"]),
])
def test_shell_syntax(tmp_path, shell, installed, demo, check):
    if shutil.which(shell) is None:
        pytest.skip(f"{shell} is not installed")
    scripts = [SCRIPTS / installed, tmp_path / demo]
    scripts[1].write_text(completions.render(shell, command=_synthetic_app()))
    for script in scripts:
        proc = subprocess.run([*check, str(script)], capture_output=True, text=True, timeout=30)
        assert proc.returncode == 0, proc.stderr
