"""Several processes sharing one operation (torchrun, or ``--workers`` on one machine).

The one machinery of ``convert-reshard`` (Megatron) and ``export-hf`` under torchrun: every
process is told how process 0's opening went (:meth:`ProcessGroup.broadcast`), does its share,
and process 0 gathers the small results (:meth:`ProcessGroup.gather`: storage entries, file
names, errors as :func:`error_payload`), commits or aborts, and tells everyone
(:meth:`ProcessGroup.broadcast`). Only small Python objects travel, over gloo (a gloo subgroup
on NCCL jobs): tensor bytes never do, each process reads and writes its own.

:func:`launch_workers` is ``--workers N``: the same processes started on this machine by
torch's own elastic launcher (what ``torchrun --standalone`` runs), each running
``python -m ckptctl ...`` with torchrun's environment.
"""

from __future__ import annotations

import atexit
import os
import signal
import sys
import threading
from contextlib import contextmanager
from typing import Any, Callable, Iterator

from ckptctl.errors import CkptctlError, UsageError


def under_torchrun() -> bool:
    """True in a torchrun worker of a job with several processes (``WORLD_SIZE`` > 1), or where
    the caller initialised a process group of several."""
    try:
        if int(os.environ.get("WORLD_SIZE", "1")) > 1:
            return True
    except ValueError:
        pass
    if "torch.distributed" in sys.modules:
        import torch.distributed as dist

        return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1
    return False


def error_payload(exc: BaseException) -> tuple[str, str, int]:
    """A failure as a small picklable value: (ckptctl error class name, message, exit code)."""
    if isinstance(exc, CkptctlError):
        return type(exc).__name__, str(exc), exc.exit_code
    if isinstance(exc, KeyboardInterrupt):
        return "CkptctlError", str(exc) or "interrupted", getattr(exc, "exit_code", 130)
    return type(exc).__name__, f"{type(exc).__name__}: {exc}", 1


def raise_payload(payload: tuple[str, str, int], where: str = "") -> None:
    """Raise the ckptctl error an :func:`error_payload` describes (``where``: a prefix, e.g.
    ``"process 1: "``); other exceptions come back as :class:`CkptctlError` with their text."""
    import ckptctl.errors as errors

    name, message, _ = payload
    cls = getattr(errors, name, None)
    if not (isinstance(cls, type) and issubclass(cls, CkptctlError)):
        cls = CkptctlError
    raise cls(f"{where}{message}")


class PeerLostError(CkptctlError):
    """A collective failed: another process of the run died or lost contact."""


class ProcessGroup:
    """The processes of the run: ``rank``, ``world`` and the two collectives the operations use.
    A collective that fails (a peer killed: gloo sees its connection close) raises
    :class:`PeerLostError`, one line."""

    def __init__(self, group, rank: int, world: int):
        self.group = group
        self.rank = rank
        self.world = world

    def _call(self, what: str, fn, *args, **kwargs) -> None:
        try:
            fn(*args, group=self.group, **kwargs)
        except RuntimeError as exc:
            text = " ".join(str(exc).split())[:200]
            raise PeerLostError(f"lost contact with another process of this run during the {what} (it died or was "
                                f"killed): {text}") from None

    def broadcast(self, value: Any = None) -> Any:
        """Process 0's ``value``, on every process."""
        import torch.distributed as dist

        box = [value]
        self._call("broadcast", dist.broadcast_object_list, box, src=0)
        return box[0]

    def gather(self, value: Any) -> list[Any] | None:
        """Every process's ``value`` by rank, on process 0 (None elsewhere)."""
        import torch.distributed as dist

        out: list[Any] | None = [None] * self.world if self.rank == 0 else None
        self._call("gather", dist.gather_object, value, out, dst=0)
        return out


#: How long a process may wait in a collective: process 0 waits in the gather while the others
#: finish their share, which for a large model on a slow store can take far longer than torch's
#: default 30 minutes. A process that dies is noticed at once (its connection closes), not by this.
COLLECTIVE_TIMEOUT_S = 24 * 3600


@contextmanager
def process_group() -> Iterator[ProcessGroup]:
    """The job's process group (initialised here from torchrun's environment unless the caller
    did: NCCL on GPU nodes, gloo on CPU), with a gloo group for the small objects; destroyed
    on the way out when created here."""
    from datetime import timedelta

    import torch.distributed as dist

    timeout = timedelta(seconds=COLLECTIVE_TIMEOUT_S)
    own_group = not dist.is_initialized()
    if own_group:
        import torch

        if torch.cuda.is_available():  # GPU nodes: NCCL for the job, gloo subgroup for objects
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
            dist.init_process_group("nccl", timeout=timeout)
        else:
            dist.init_process_group("gloo", timeout=timeout)
    # Small Python objects only: a gloo group also on NCCL jobs (no CUDA tensors needed).
    group = dist.new_group(backend="gloo", timeout=timeout) if dist.get_backend() != "gloo" else None
    try:
        yield ProcessGroup(group, dist.get_rank(group), dist.get_world_size(group))
    finally:
        try:
            if group is not None:
                dist.destroy_process_group(group)
            if own_group:
                dist.destroy_process_group()
        except Exception:  # noqa: BLE001 - a peer died: the run's own error is what matters
            pass


# ---------------------------------------------------------------------------------------------
# --workers N: torchrun's launcher, started from ckptctl
# ---------------------------------------------------------------------------------------------
#: Set in the processes ``--workers`` starts: the launcher names a process that died, so the
#: others' "lost contact" errors stay silent (under torchrun they are the only word from ckptctl).
WORKERS_ENV = "CKPTCTL_WORKERS"


#: Names a file in the processes ``--workers`` starts: process 0 creates it once the output is
#: committed (:func:`mark_committed`), so that a process failing after that (on its way out) is
#: not reported as a failed run.
COMMITTED_ENV = "CKPTCTL_WORKERS_COMMITTED"


_commit_mark_held = False


def mark_committed() -> None:
    """Process 0, right after its commit: tell the ``--workers`` launcher the output is complete
    (held back inside :func:`one_commit_mark`)."""
    if not _commit_mark_held:
        _write_commit_mark()


def _write_commit_mark() -> None:
    path = os.environ.get(COMMITTED_ENV)
    if path:
        with open(path, "w"):
            pass


@contextmanager
def one_commit_mark(owner: bool) -> Iterator[Callable[[], None]]:
    """A run of several commits (``export-hf --steps``): the mark each one would leave is held
    back; the run calls the function yielded (a no-op unless ``owner``) once all are settled."""
    global _commit_mark_held
    held, _commit_mark_held = _commit_mark_held, True
    try:
        yield _write_commit_mark if owner else (lambda: None)
    finally:
        _commit_mark_held = held


#: Exit status of a ``--workers`` process that lost its peers and printed nothing: the launcher
#: then names the process that died (any other non-zero status is the run's error, which
#: process 0 printed).
UNREPORTED_EXIT = 75


def exit_process(code: int | str | None) -> None:
    """``sys.exit(code)``, but once torch is loaded the process leaves without the interpreter's
    teardown, which only destroys modules and C++ statics after the work is done:

    - a torchrun process leaves at once: torch's gloo teardown at interpreter exit can abort
      ("terminate called without an active exception") after the work is done and committed,
      which the launcher would report as a failed run;
    - any other process first does what the interpreter's exit does before its teardown: it
      waits for the threads that are not daemons and runs the exit handlers (temporary files,
      logging). The teardown it skips cost about 0.4 s of CPU with torch loaded (``ckptctl
      inspect`` of an FSDP checkpoint: 1.95 s -> 1.55 s).
    """
    torchrun = int(os.environ.get("WORLD_SIZE", "1") or 1) > 1 and "torch.distributed" in sys.modules
    wait_for_threads = getattr(threading, "_shutdown", None)  # what the interpreter's exit calls first
    if "torch" not in sys.modules or (wait_for_threads is None and not torchrun):
        sys.exit(code)
    if isinstance(code, str):
        print(code, file=sys.stderr)
    status = code if isinstance(code, int) else (0 if code is None else 1)
    if not torchrun:
        wait_for_threads()
        atexit._run_exitfuncs()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):  # a closed pipe: nothing more can reach it
            pass
    os._exit(status)


def silent_exit(exc: CkptctlError) -> int | None:
    """The exit status with which this process leaves ``exc`` unprinted, or None to print it:
    process 0 prints the run's error; a lost peer is named by the ``--workers`` launcher."""
    if isinstance(exc, PeerLostError):
        return UNREPORTED_EXIT if os.environ.get(WORKERS_ENV) else None
    if os.environ.get("RANK", "0") == "0" or not under_torchrun():
        return None
    # Under --workers the others leave with 0, so that the launcher does not stop process 0 while
    # it reports the error and exits with the run's status (torchrun: each its own status).
    return 0 if os.environ.get(WORKERS_ENV) else exc.exit_code


def check_workers(workers: int | None) -> int:
    """``--workers``: 1 or more, and not inside torchrun (which already started the processes)."""
    if workers is None:
        return 1
    if workers < 1:
        raise UsageError(f"--workers must be at least 1, not {workers}")
    if workers > 1 and under_torchrun():
        raise UsageError("--workers starts its own processes; under torchrun leave it out "
                         "(torchrun's --nproc-per-node says how many)")
    return workers


def _signal_name(code: int) -> str:
    try:
        return signal.Signals(-code).name
    except ValueError:
        return f"signal {-code}"


def launch_workers(workers: int, argv: list[str], warn: Callable[[str], None] | None = None) -> int:
    """Run ``python -m ckptctl ARGV`` in ``workers`` processes on this machine, as
    ``torchrun --standalone --nproc-per-node WORKERS -m ckptctl ARGV`` would (torch's elastic
    launcher: a free rendezvous port, torchrun's environment, the others stopped when one
    fails). Returns the exit code of process 0 (it printed the run's result or its error);
    raises :class:`CkptctlError` naming a process that died without reporting. A process that
    died after process 0 committed the output is told to ``warn`` and the run succeeds."""
    import logging
    import tempfile
    import uuid

    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.launcher.api import LaunchConfig, elastic_launch

    for name in ("torch.distributed.elastic", "torch.distributed.elastic.multiprocessing.api",
                 "torch.distributed.elastic.agent.server.api"):  # ckptctl says what failed, in one line
        logging.getLogger(name).setLevel(logging.CRITICAL)
    # the workers' environment (theirs is a copy of ours): as torchrun, one intra-op thread per
    # process unless the user chose
    saved = {name: os.environ.get(name) for name in ("OMP_NUM_THREADS", WORKERS_ENV, COMMITTED_ENV)}
    os.environ.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // workers)))
    os.environ[WORKERS_ENV] = str(workers)
    signals = tempfile.TemporaryDirectory(prefix="ckptctl-workers-")
    committed = os.environ[COMMITTED_ENV] = os.path.join(signals.name, "committed")
    config = LaunchConfig(min_nodes=1, max_nodes=1, nproc_per_node=workers, run_id=f"ckptctl-{uuid.uuid4().hex}",
                          rdzv_backend="c10d", rdzv_endpoint="127.0.0.1:0", max_restarts=0,
                          monitor_interval=0.1)
    try:
        elastic_launch(config, sys.executable)("-m", "ckptctl", *argv)
    except ChildFailedError as exc:
        failures = exc.failures
        # A status other than UNREPORTED_EXIT is the run's error, which process 0 printed (a
        # process may still crash or be stopped on its way out after that: not the cause).
        reported = sorted((rank != 0, rank, f.exitcode) for rank, f in failures.items()
                          if f.exitcode > 0 and f.exitcode != UNREPORTED_EXIT)
        if reported:
            return reported[0][2]
        # The launcher stops the others with SIGTERM once one exited: any other signal is the cause.
        _, _, rank, code = min((f.exitcode in (-signal.SIGTERM, UNREPORTED_EXIT), f.timestamp, r, f.exitcode)
                               for r, f in failures.items())
        what = f"was killed ({_signal_name(code)})" if code < 0 else "lost contact with the others"
        if os.path.exists(committed):
            if warn is not None:
                warn(f"process {rank} of {workers} {what} after the output was committed; the output is complete")
            return 0
        raise CkptctlError(f"process {rank} of {workers} {what}; the run failed and nothing was committed") from None
    except KeyboardInterrupt:
        return 130
    except Exception as exc:  # noqa: BLE001 - the launcher's own failure (a signal, the rendezvous)
        name = type(exc).__name__
        if name == "SignalException":
            sig = getattr(exc, "sigval", None)
            return 128 + int(sig) if sig is not None else 130
        raise CkptctlError(f"--workers {workers}: the processes could not be started ({name}: {exc})") from None
    finally:
        signals.cleanup()
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value
    return 0


__all__ = ["COMMITTED_ENV", "WORKERS_ENV", "mark_committed", "one_commit_mark", "PeerLostError", "ProcessGroup", "check_workers", "error_payload", "launch_workers",
           "process_group", "raise_payload", "silent_exit", "exit_process", "under_torchrun", "UNREPORTED_EXIT"]
