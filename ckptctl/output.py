"""The one place that decides how results reach the user: JSON for scripts, rich for people.

Commands hand a result (anything with ``to_dict()``) and a function that renders it for
people; they never print JSON by hand. Warnings go to stderr in human mode and into the
JSON document in ``--json`` mode. Progress bars show only on a terminal and never with
``--json``.
"""

from __future__ import annotations

import json
import sys
from contextlib import contextmanager
from datetime import datetime
from typing import TYPE_CHECKING, Any, Callable, Iterator

if TYPE_CHECKING:  # pragma: no cover
    from rich.console import Console

ERROR_PREFIX = "ckptctl: error: "


def human_bytes(n: int | None) -> str:
    if n is None:
        return "-"
    value = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if value < 1024 or unit == "TiB":
            return f"{int(value)} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{n} B"


def human_time(value: datetime | str | None) -> str:
    if value is None:
        return "-"
    if isinstance(value, str):
        value = datetime.fromisoformat(value)
    return value.astimezone().strftime("%Y-%m-%d %H:%M")


def _json_default(value: Any) -> Any:
    if isinstance(value, datetime):
        return value.isoformat()
    if hasattr(value, "to_dict"):
        return value.to_dict()
    return str(value)


class Output:
    """Renders one command's result in the mode the user chose."""

    def __init__(self, json_mode: bool = False):
        self.json_mode = json_mode
        self._out: Console | None = None
        self._err: Console | None = None

    # rich is imported on first use: --help and --json never pay for it.
    @property
    def out(self) -> "Console":
        if self._out is None:
            from rich.console import Console

            # Off a terminal rich would wrap at 80 columns; pipes and logs read better wider.
            self._out = Console(soft_wrap=False, width=None if sys.stdout.isatty() else 140)
        return self._out

    @property
    def err(self) -> "Console":
        if self._err is None:
            from rich.console import Console

            self._err = Console(stderr=True, soft_wrap=True)
        return self._err

    def result(self, result: Any, render: Callable[[Console, Any], None]) -> None:
        if self.json_mode:
            data = result.to_dict() if hasattr(result, "to_dict") else result
            sys.stdout.write(json.dumps(data, indent=2, default=_json_default) + "\n")
            sys.stdout.flush()
        else:
            render(self.out, result)

    def warn(self, message: str) -> None:
        if not self.json_mode:
            self.err.print(f"[yellow]warning:[/yellow] {message}", highlight=False, markup=True)

    def info(self, message: str) -> None:
        if not self.json_mode:
            self.err.print(message, highlight=False)

    @property
    def interactive(self) -> bool:
        return not self.json_mode and sys.stderr.isatty()

    @contextmanager
    def progress(self, description: str, total: int | None = None) -> Iterator[Callable[..., None]]:
        """Yields ``advance(n=1, total=None)``; draws a bar only on a terminal, never with --json."""
        if not self.interactive:
            yield lambda n=1, total=None, absolute=False: None
            return
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

        with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                      TimeRemainingColumn(), console=self.err, transient=True) as bar:
            task = bar.add_task(description, total=total)

            def advance(n: int = 1, total: int | None = None, absolute: bool = False) -> None:
                if total is not None:
                    bar.update(task, total=total)
                if absolute:
                    bar.update(task, completed=n)
                else:
                    bar.advance(task, n)

            yield advance


def print_error(message: str) -> None:
    """One line on stderr, no traceback."""
    sys.stderr.write(ERROR_PREFIX + " ".join(str(message).split()) + "\n")
    sys.stderr.flush()


def report_error(message: str, exit_code: int, json_mode: bool = False) -> None:
    """How every failure reaches the user: one line on stderr and, with ``--json``, also
    ``{"error": message, "exit_code": N}`` on stdout, so a script never parses an empty stream."""
    line = " ".join(str(message).split())
    print_error(line)
    if json_mode:
        sys.stdout.write(json.dumps({"error": line, "exit_code": exit_code}) + "\n")
        sys.stdout.flush()


#: Libraries that log their own retries and failures (gcsfs logs a traceback when it gives up);
#: ckptctl reports the resulting exception once, as its one-line error.
_CHATTY_LOGGERS = ("gcsfs", "s3fs", "fsspec", "aiobotocore", "botocore", "google", "urllib3", "asyncio")


def silence_library_logs() -> None:
    """Keep library log records (tracebacks included) off the terminal; CKPTCTL_DEBUG keeps them."""
    import logging

    for name in _CHATTY_LOGGERS:
        logger = logging.getLogger(name)
        logger.propagate = False
        if not any(isinstance(h, logging.NullHandler) for h in logger.handlers):
            logger.addHandler(logging.NullHandler())
