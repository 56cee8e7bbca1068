"""Static shell completion scripts for ``ckptctl`` (bash, zsh, fish), generated from the CLI.

The scripts in the repository's ``completions/`` directory are produced by this module from the
command tree Typer builds (``typer.main.get_command(app)``): every (sub)command, every option
with its long and short names, help text, whether it takes a value and its choices, and the
positional arguments (completed as files or directories; remote ``s3://``/``gs://`` URLs
cannot be completed statically). Regenerate after changing the CLI::

    python -m ckptctl.completions            # writes ./completions/ of the repository
    python -m ckptctl.completions DIR        # writes DIR/ckptctl.bash, DIR/_ckptctl, DIR/ckptctl.fish

``tests/test_completions.py`` fails when the committed scripts are out of date.

Only typer is imported (lazily, with the CLI), and the command tree is read through the
attributes Click and Typer's vendored Click share, so this stays fast and needs no extra
dependency. Output is deterministic: commands and options in declaration order.
"""

from __future__ import annotations

import re
import sys
from dataclasses import dataclass
from pathlib import Path, PurePath
from typing import Any, get_args, get_origin

PROG = "ckptctl"
SHELLS = ("bash", "zsh", "fish")
FILENAMES = {"bash": "ckptctl.bash", "zsh": "_ckptctl", "fish": "ckptctl.fish"}
REGENERATE = "python -m ckptctl.completions"

# Typer's own dynamic-completion options; a static script has no use for them.
_HIDDEN_OPTIONS = {"--install-completion", "--show-completion"}
_SAFE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.+-]*$")
_SAFE_OPT = re.compile(r"^--?[A-Za-z0-9][A-Za-z0-9_.+-]*$")
_DEFAULT_DIR = Path(__file__).resolve().parent.parent / "completions"


# --------------------------------------------------------------------------------------------
# The model: what the scripts need to know about the command tree.


@dataclass(frozen=True)
class Option:
    names: tuple[str, ...]  # all spellings: short ones first, then long ones (--x and --no-x)
    help: str
    takes_value: bool
    nargs: int  # values per occurrence when takes_value
    multiple: bool  # may be given more than once
    kind: str  # value completion: "choice", "file", "dir" or "text" (nothing to complete)
    choices: tuple[str, ...]
    metavar: str


@dataclass(frozen=True)
class Argument:
    name: str
    help: str
    required: bool
    variadic: bool
    kind: str  # "choice", "file" or "dir"
    choices: tuple[str, ...]


@dataclass(frozen=True)
class Command:
    path: tuple[str, ...]  # ("ckptctl",), ("ckptctl", "prune"), ...
    help: str
    options: tuple[Option, ...]
    arguments: tuple[Argument, ...]
    subcommands: tuple[Command, ...]

    @property
    def key(self) -> str:
        return " ".join(self.path)

    def walk(self):
        yield self
        for sub in self.subcommands:
            yield from sub.walk()


def _text(value: Any) -> str:
    return " ".join(str(value or "").split())


def _choice_str(choice: Any) -> str:
    value = getattr(choice, "value", choice)  # Enum members complete as their value
    return str(value)


def _value_kind(param: Any) -> tuple[str, tuple[str, ...]]:
    """("choice", values) / ("file", ()) / ("dir", ()) / ("text", ()) for one parameter."""
    desc = getattr(param, "type_descriptor", None)
    if desc is not None:  # Typer's own parameters (Typer 0.29 vendors Click; types live here)
        choices = desc.choices
        if choices:
            return "choice", tuple(_choice_str(c) for c in choices)
        info = desc.parameter_info
        dir_only = bool(getattr(info, "dir_okay", True)) and not getattr(info, "file_okay", True)
        if desc.is_file:
            return "file", ()
        annotation = desc.annotation
        if get_origin(annotation) in (list, tuple) and get_args(annotation):
            annotation = get_args(annotation)[0]
        if desc.is_path or (isinstance(annotation, type) and issubclass(annotation, PurePath)):
            return ("dir" if dir_only else "file"), ()
        if annotation is bool and not getattr(param, "is_flag", False):
            return "choice", ("true", "false")
        return "text", ()
    ptype = getattr(param, "type", None)  # plain Click parameter types
    choices = getattr(ptype, "choices", None)
    if choices:
        return "choice", tuple(_choice_str(c) for c in choices)
    name = getattr(ptype, "name", "")
    if name in ("file", "path", "filename") or hasattr(ptype, "dir_okay"):
        dir_only = getattr(ptype, "dir_okay", True) and not getattr(ptype, "file_okay", True)
        return ("dir" if dir_only else "file"), ()
    if name == "boolean" and not getattr(param, "is_flag", False):
        return "choice", ("true", "false")
    return "text", ()


def _option(param: Any) -> Option | None:
    names = [*param.opts, *getattr(param, "secondary_opts", ())]
    if getattr(param, "hidden", False) or _HIDDEN_OPTIONS.intersection(names):
        return None
    for name in names:
        if not _SAFE_OPT.match(name):
            raise ValueError(f"option name {name!r} cannot be written into a completion script")
    # Short names first, then long ones; sorted because the help option's names come from a set.
    names = sorted(dict.fromkeys(names), key=lambda n: (n.startswith("--"), n))
    takes_value = not (getattr(param, "is_flag", False) or getattr(param, "count", False))
    kind, choices = _value_kind(param) if takes_value else ("text", ())
    longs = [n[2:] for n in param.opts if n.startswith("--")]
    metavar = param.metavar or (longs[0] if longs else param.name or "value").upper()
    return Option(names=tuple(names), help=_text(getattr(param, "help", "")), takes_value=takes_value,
                  nargs=max(int(param.nargs or 1), 1), multiple=bool(getattr(param, "multiple", False)
                                                                    or getattr(param, "count", False)),
                  kind=kind, choices=choices, metavar=_text(metavar))


def _argument(param: Any) -> Argument:
    kind, choices = _value_kind(param)
    if kind == "text":
        kind = "file"  # a checkpoint path: local paths complete, remote URLs cannot
    return Argument(name=_text(param.name or "arg"), help=_text(getattr(param, "help", "")),
                    required=bool(param.required), variadic=param.nargs == -1 or param.nargs > 1,
                    kind=kind, choices=choices)


def _build(cmd: Any, ctx_parent: Any, path: tuple[str, ...]) -> Command:
    ctx = cmd.context_class(cmd, parent=ctx_parent, info_name=path[-1], **(cmd.context_settings or {}))
    options: list[Option] = []
    arguments: list[Argument] = []
    for param in cmd.get_params(ctx):
        if getattr(param, "param_type_name", "") == "argument":
            arguments.append(_argument(param))
        else:
            opt = _option(param)
            if opt is not None:
                options.append(opt)
    subcommands: list[Command] = []
    if hasattr(cmd, "list_commands"):
        for name in cmd.list_commands(ctx):
            sub = cmd.get_command(ctx, name)
            if sub is None or getattr(sub, "hidden", False):
                continue
            if not _SAFE_NAME.match(name):
                raise ValueError(f"command name {name!r} cannot be written into a completion script")
            subcommands.append(_build(sub, ctx, (*path, name)))
    help_text = _text(cmd.get_short_help_str(limit=150)) if len(path) > 1 else ""
    return Command(path=path, help=help_text, options=tuple(options), arguments=tuple(arguments),
                   subcommands=tuple(subcommands))


def command_tree(command: Any = None) -> Command:
    """The completion model of ``command`` (a Click/Typer command), by default ckptctl's CLI."""
    if command is None:
        import typer.main

        from ckptctl.cli import app

        command = typer.main.get_command(app)
    elif not hasattr(command, "get_params"):  # a typer.Typer instance
        import typer.main

        command = typer.main.get_command(command)
    return _build(command, None, (PROG,))


# --------------------------------------------------------------------------------------------
# Quoting.


def _sq(text: str) -> str:
    """POSIX shell single quotes (bash and zsh)."""
    return "'" + text.replace("'", "'\\''") + "'"


def _fish_sq(text: str) -> str:
    return "'" + text.replace("\\", "\\\\").replace("'", "\\'") + "'"


def _fish_desc(text: str) -> str:
    return f" -d {_fish_sq(text)}" if text else ""


def _zsh_desc(text: str) -> str:
    """Text inside an _arguments ``[description]`` or message field (before single-quoting)."""
    for ch in "\\[]:$`":
        text = text.replace(ch, "\\" + ch)
    return text


def _zsh_value(text: str) -> str:
    """One word of a zsh ``(a b c)`` choice list (before single-quoting)."""
    for ch in "\\[]:$`() \"'":
        text = text.replace(ch, "\\" + ch)
    return text


def _ident(cmd: Command) -> str:
    return "".join("__" + re.sub(r"[^A-Za-z0-9]", "_", part) for part in cmd.path[1:])


def _header(comment: str, install: list[str]) -> list[str]:
    lines = [
        f"{PROG} {comment} completion script.",
        f"GENERATED by `{REGENERATE}` from the {PROG} CLI; do not edit by hand.",
        f"Regenerate after changing the CLI (from the repository root): {REGENERATE} [DIR]",
        "Install:",
        *("  " + line for line in install),
    ]
    return ["# " + line if line else "#" for line in lines]


# --------------------------------------------------------------------------------------------
# bash


def _bash_case(entries: list[tuple[list[str], str]], indent: str = "        ") -> list[str]:
    out = []
    for patterns, body in entries:
        out.append(f"{indent}{'|'.join(_sq(p) for p in patterns)}) {body} ;;")
    return out


def _bash_value_action(kind: str, choices: tuple[str, ...], word: str) -> str | None:
    """The call completing one value; ``word`` names the shell variable with the word so far."""
    if kind == "choice":
        return f"__{PROG}_words {_sq(' '.join(choices))} \"{word}\""
    if kind == "file":
        return f"__{PROG}_files \"{word}\""
    if kind == "dir":
        return f"__{PROG}_dirs \"{word}\""
    return None


def render_bash(tree: Command) -> str:
    p = PROG
    cmds = list(tree.walk())
    subcommand_cases = [([c.key], f"echo {_sq(' '.join(s.path[-1] for s in c.subcommands))}")
                        for c in cmds if c.subcommands]
    option_cases = [([c.key], f"echo {_sq(' '.join(n for o in c.options for n in o.names))}")
                    for c in cmds if c.options]
    takes_value_cases = []
    value_cases = []
    for c in cmds:
        for o in c.options:
            if not o.takes_value:
                continue
            takes_value_cases.append(([f"{c.key} {n}" for n in o.names], f"return {o.nargs}"))
            action = _bash_value_action(o.kind, o.choices, "$3")
            if action:
                value_cases.append(([f"{c.key} {n}" for n in o.names], action))
    positional_cases = []
    for c in cmds:
        if c.arguments and not c.subcommands:
            # All positionals of a command share one completion: choices, directories or files.
            kinds = {a.kind for a in c.arguments}
            kind = kinds.pop() if len(kinds) == 1 else "file"
            choices = tuple(ch for a in c.arguments for ch in a.choices)
            positional_cases.append(([c.key], _bash_value_action(kind, choices, "$2")))

    lines = [
        "# bash completion for ckptctl                                 -*- shell-script -*-",
        *_header("bash", [
            "source completions/ckptctl.bash            (e.g. from ~/.bashrc), or copy it to",
            "~/.local/share/bash-completion/completions/ckptctl  (bash-completion loads it on demand).",
        ]),
        "",
        "# The subcommands of the command at path $1 (words joined by single spaces).",
        f"__{p}_subcommands()",
        "{",
        '    case "$1" in',
        *_bash_case(subcommand_cases),
        "    esac",
        "}",
        "",
        "# All option names of the command at path $1.",
        f"__{p}_options()",
        "{",
        '    case "$1" in',
        *_bash_case(option_cases),
        "    esac",
        "}",
        "",
        "# Returns the number of values option $2 of the command at path $1 takes (0: a flag).",
        f"__{p}_nvalues()",
        "{",
        '    case "$1 $2" in',
        *_bash_case(takes_value_cases),
        "    esac",
        "    return 0",
        "}",
        "",
        "# Completes a value of option $2 of the command at path $1; $3 is the word so far.",
        f"__{p}_option_value()",
        "{",
        '    case "$1 $2" in',
        *_bash_case(value_cases),
        "    esac",
        "}",
        "",
        "# Completes a positional argument of the command at path $1; $2 is the word so far.",
        f"__{p}_positional()",
        "{",
        '    case "$1" in',
        *_bash_case(positional_cases),
        "    esac",
        "}",
        "",
        f"__{p}_words()",
        "{",
        "    local IFS=$' \\t\\n'",
        '    COMPREPLY=( $(compgen -W "$1" -- "$2") )',
        "}",
        "",
        f"__{p}_files()",
        "{",
        "    compopt -o filenames 2>/dev/null",
        "    local line",
        "    while IFS= read -r line; do COMPREPLY+=( \"$line\" ); done < <(compgen -f -- \"$1\")",
        "}",
        "",
        f"__{p}_dirs()",
        "{",
        "    compopt -o filenames 2>/dev/null",
        "    local line",
        "    while IFS= read -r line; do COMPREPLY+=( \"$line\" ); done < <(compgen -d -- \"$1\")",
        "}",
        "",
        f"_{p}()",
        "{",
        '    local cur="${COMP_WORDS[COMP_CWORD]}"',
        f"    local path={p} word opt='' i skip=0 npos=0 dashdash=0",
        "    COMPREPLY=()",
        "    # Walk the words before the cursor: descend into subcommands, step over option values.",
        "    for (( i = 1; i < COMP_CWORD; i++ )); do",
        '        word="${COMP_WORDS[i]}"',
        "        if (( skip > 0 )); then",
        "            # '--opt=value' arrives as '--opt' '=' 'value' when '=' is in COMP_WORDBREAKS",
        "            [[ $word == '=' ]] || skip=$(( skip - 1 ))",
        "            continue",
        "        fi",
        "        if (( ! dashdash )); then",
        '            case "$word" in',
        "                --) dashdash=1; continue ;;",
        "                -*=*) continue ;;",
        f'                -*) __{p}_nvalues "$path" "$word"; skip=$?; opt=$word; continue ;;',
        "            esac",
        "        fi",
        f'        if (( npos == 0 )) && [[ " $(__{p}_subcommands "$path") " == *" $word "* ]]; then',
        '            path="$path $word"',
        "        else",
        "            npos=$(( npos + 1 ))",
        "        fi",
        "    done",
        "",
        "    if (( skip > 0 )); then  # the word under the cursor is a value of $opt",
        "        [[ $cur == '=' ]] && cur=''",
        f'        __{p}_option_value "$path" "$opt" "$cur"',
        "        return 0",
        "    fi",
        "    if (( ! dashdash )) && [[ $cur == -*=* ]]; then  # --opt=value in one word",
        '        opt="${cur%%=*}"',
        f'        __{p}_nvalues "$path" "$opt" && return 0',
        f'        __{p}_option_value "$path" "$opt" "${{cur#*=}}"',
        '        COMPREPLY=( "${COMPREPLY[@]/#/$opt=}" )',
        "        return 0",
        "    fi",
        "    if (( ! dashdash )) && [[ $cur == -* ]]; then",
        f'        __{p}_words "$(__{p}_options "$path")" "$cur"',
        "        return 0",
        "    fi",
        f'    local subcommands="$(__{p}_subcommands "$path")"',
        '    if (( npos == 0 )) && [[ -n $subcommands ]]; then',
        f'        __{p}_words "$subcommands" "$cur"',
        "        return 0",
        "    fi",
        f'    __{p}_positional "$path" "$cur"',
        "    return 0",
        "}",
        "",
        f"complete -F _{p} {p}",
        "",
    ]
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------
# zsh


def _zsh_action(kind: str, choices: tuple[str, ...]) -> str:
    if kind == "choice":
        return "(" + " ".join(_zsh_value(c) for c in choices) + ")"
    if kind == "file":
        return "_files"
    if kind == "dir":
        return "_files -/"
    return " "  # a value is required, but there is nothing to offer


def _zsh_option_specs(opt: Option) -> list[str]:
    specs = []
    desc = f"[{_zsh_desc(opt.help)}]" if opt.help else ""
    exclusion = "" if opt.multiple else "(" + " ".join(opt.names) + ")"
    repeat = "*" if opt.multiple else ""
    for name in opt.names:
        spec = f"{exclusion}{repeat}{name}"
        if opt.takes_value:
            spec += "=" if name.startswith("--") else "+"
        spec += desc
        if opt.takes_value:
            value = f":{_zsh_desc(opt.metavar.lower())}:{_zsh_action(opt.kind, opt.choices)}"
            spec += value * opt.nargs
        specs.append(_sq(spec))
    return specs


def _zsh_argument_specs(cmd: Command) -> list[str]:
    specs = []
    for arg in cmd.arguments:
        message = _zsh_desc(arg.name)
        action = _zsh_action(arg.kind, arg.choices)
        if arg.variadic:
            specs.append(_sq(f"*:{message}:{action}"))
        elif arg.required:
            specs.append(_sq(f":{message}:{action}"))
        else:
            specs.append(_sq(f"::{message}:{action}"))
    return specs


def render_zsh(tree: Command) -> str:
    p = PROG
    lines = [
        f"#compdef {p}",
        *_header("zsh", [
            "put _ckptctl in a directory on $fpath before compinit runs, e.g. in ~/.zshrc:",
            "  fpath=(/path/to/ckptctl/completions $fpath); autoload -Uz compinit; compinit",
            "or, after compinit: source completions/_ckptctl",
        ]),
        "",
    ]
    for cmd in tree.walk():
        func = f"_{p}{_ident(cmd)}"
        specs = [spec for opt in cmd.options for spec in _zsh_option_specs(opt)]
        if cmd.subcommands:
            lister = f"_{p}_cmds{_ident(cmd)}"
            lines += [
                f"{lister}() {{",
                "    local -a commands",
                "    commands=(",
                *(f"        {_sq(sub.path[-1] + (':' + sub.help if sub.help else ''))}" for sub in cmd.subcommands),
                "    )",
                f"    _describe -t commands {_sq(cmd.key + ' command')} commands",
                "}",
                "",
                f"{func}() {{",
                '    local curcontext="$curcontext" state state_descr line',
                "    typeset -A opt_args",
                "    integer ret=1",
                "    _arguments -C -s -S \\",
                *(f"        {spec} \\" for spec in specs),
                f"        {_sq(': :' + lister)} \\",
                "        '*:: :->args' && ret=0",
                "    case $state in",
                "        (args)",
                f'            curcontext="${{curcontext%:*:*}}:{"-".join(cmd.path)}-${{words[1]}}:"',
                "            case ${words[1]} in",
                *(f"                ({sub.path[-1]}) _{p}{_ident(sub)} && ret=0 ;;"
                  for sub in cmd.subcommands),
                "            esac",
                "            ;;",
                "    esac",
                "    return ret",
                "}",
                "",
            ]
        else:
            specs += _zsh_argument_specs(cmd)
            lines += [
                f"{func}() {{",
                "    _arguments -s -S" + (" \\" if specs else ""),
                *(f"        {spec}" + (" \\" if i < len(specs) - 1 else "") for i, spec in enumerate(specs)),
                "}",
                "",
            ]
    lines += [
        f'if [[ "${{funcstack[1]}}" == "_{p}" ]]; then',
        f'    _{p} "$@"',
        "else",
        f"    compdef _{p} {p}",
        "fi",
        "",
    ]
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------
# fish


def render_fish(tree: Command) -> str:
    p = PROG
    cmds = list(tree.walk())
    lines = [
        *_header("fish", [
            "cp completions/ckptctl.fish ~/.config/fish/completions/",
            "(or, for the current session only: source completions/ckptctl.fish)",
        ]),
        "",
        "# The subcommands of the command at path $argv[1] (words joined by single spaces).",
        f"function __{p}_subcommands",
        "    switch $argv[1]",
    ]
    for c in cmds:
        if c.subcommands:
            lines += [f"        case {_fish_sq(c.key)}",
                      "            printf '%s\\n' " + " ".join(_fish_sq(s.path[-1]) for s in c.subcommands)]
    lines += [
        "    end",
        "end",
        "",
        "# The number of values option $argv[2] of the command at path $argv[1] takes (0: a flag).",
        f"function __{p}_nvalues",
        '    switch "$argv[1] $argv[2]"',
    ]
    for c in cmds:
        for o in c.options:
            if o.takes_value:
                lines += [f"        case " + " ".join(_fish_sq(f"{c.key} {n}") for n in o.names),
                          f"            echo {o.nargs}",
                          "            return"]
    lines += [
        "    end",
        "    echo 0",
        "end",
        "",
        "# The path of the (sub)command being completed, e.g. 'ckptctl prune'.",
        f"function __{p}_path",
        "    set -l tokens (commandline -opc)",
        "    set -e tokens[1]",
        f"    set -l path {p}",
        "    set -l skip 0",
        "    set -l npos 0",
        "    set -l dashdash 0",
        "    for word in $tokens",
        "        if test $skip -gt 0",
        "            set skip (math $skip - 1)",
        "            continue",
        "        end",
        "        if test $dashdash -eq 0",
        "            switch $word",
        "                case '--'",
        "                    set dashdash 1",
        "                    continue",
        "                case '-*=*'",
        "                    continue",
        "                case '-*'",
        f'                    set skip (__{p}_nvalues "$path" $word)',
        "                    continue",
        "            end",
        "        end",
        f'        if test $npos -eq 0; and contains -- $word (__{p}_subcommands "$path")',
        '            set path "$path $word"',
        "        else",
        "            set npos (math $npos + 1)",
        "        end",
        "    end",
        "    echo $path",
        "end",
        "",
        "# True when the command being completed is exactly the one named by $argv.",
        f"function __{p}_using",
        f'    test (__{p}_path) = "$argv"',
        "end",
        "",
        f"complete -c {p} -f",
    ]
    for c in cmds:
        cond = f"-n {_fish_sq(f'__{p}_using ' + c.key)}"
        lines += ["", f"# {c.key}"]
        for sub in c.subcommands:
            lines.append(f"complete -c {p} {cond} -a {_fish_sq(sub.path[-1])}" + _fish_desc(sub.help))
        for o in c.options:
            flags = []
            for n in o.names:
                if n.startswith("--"):
                    flags.append(f"-l {n[2:]}")
                elif len(n) == 2:
                    flags.append(f"-s {n[1:]}")
                else:
                    flags.append(f"-o {n[1:]}")
            if o.takes_value:
                if o.kind == "choice":
                    flags.append(f"-x -a {_fish_sq(' '.join(o.choices))}")
                elif o.kind == "file":
                    flags.append("-r -F")
                elif o.kind == "dir":
                    flags.append("-x -a '(__fish_complete_directories)'")
                else:
                    flags.append("-x")
            lines.append(f"complete -c {p} {cond} {' '.join(flags)}" + _fish_desc(o.help))
        if c.arguments and not c.subcommands:
            kinds = {a.kind for a in c.arguments}
            if kinds == {"choice"}:
                choices = " ".join(ch for a in c.arguments for ch in a.choices)
                lines.append(f"complete -c {p} {cond} -a {_fish_sq(choices)}")
            elif kinds == {"dir"}:
                lines.append(f"complete -c {p} {cond} -a '(__fish_complete_directories)'")
            else:
                lines.append(f"complete -c {p} {cond} -F")
    lines.append("")
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------

_RENDERERS = {"bash": render_bash, "zsh": render_zsh, "fish": render_fish}


def render(shell: str, command: Any = None) -> str:
    """The completion script for ``shell`` ("bash", "zsh" or "fish").

    ``command`` defaults to ckptctl's CLI; a Typer app or Click command can be given for tests.
    """
    try:
        renderer = _RENDERERS[shell]
    except KeyError:
        raise ValueError(f"unknown shell {shell!r}; expected one of {', '.join(SHELLS)}") from None
    return renderer(command_tree(command))


def write_all(directory: str | Path | None = None) -> list[Path]:
    """Write the three scripts into ``directory`` (default: the repository's completions/)."""
    target = Path(directory) if directory is not None else _DEFAULT_DIR
    target.mkdir(parents=True, exist_ok=True)
    tree = command_tree()
    written = []
    for shell in SHELLS:
        path = target / FILENAMES[shell]
        path.write_text(_RENDERERS[shell](tree), encoding="utf-8", newline="\n")
        written.append(path)
    return written


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) > 1 or (args and args[0] in ("-h", "--help")):
        print(f"usage: {REGENERATE} [DIR]   (default: {_DEFAULT_DIR})", file=sys.stderr)
        return 0 if args and args[0] in ("-h", "--help") else 2
    for path in write_all(args[0] if args else None):
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
