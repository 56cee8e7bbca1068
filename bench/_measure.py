"""Measuring helpers shared by the bench scripts and the child processes they start.

Children started with ``python -c CODE`` import it through :data:`IMPORT_LINE`; scripts run as
``python bench/X.py`` have this directory on ``sys.path`` already. Imports nothing heavy (the
inspect bench checks that its child never imports torch).
"""

from __future__ import annotations

import os

BENCH_DIR = os.path.dirname(os.path.abspath(__file__))
#: The line a ``python -c`` child starts with to get :func:`peak_rss_mb`.
IMPORT_LINE = f"import sys; sys.path.insert(0, {BENCH_DIR!r}); from _measure import peak_rss_mb\n"


def peak_rss_mb() -> float:
    """This process's peak resident set size in MB: ``VmHWM`` from ``/proc/self/status``.

    Not ``ru_maxrss``: Linux carries it over ``execve`` from the forking parent, so a child of a
    big process would report the parent's peak (it is only the fallback where /proc is missing).
    """
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def exit_as_ckptctl(status: int | None) -> None:
    """Leave this (export child) process as the ``ckptctl`` command does (``ckptctl.cli.main``:
    through ``exit_process``, without the interpreter's teardown), so that its wall is the user's."""
    from ckptctl.ops.distributed import exit_process

    exit_process(status)
