"""The one commit protocol for command outputs that are directories of files.

Commands that write a directory (``convert-reshard``, the HF export's local side, ...) write
every file into a LOCAL staging directory and then commit it. "Complete" is defined by the
presence of the files named in ``commit_last`` (e.g. Megatron's ``metadata.json``): they are the
last to appear at the destination, and the first to disappear when an old output is replaced::

    with OutputDir(dest_url, overwrite=False, commit_last=(".metadata", "metadata.json")) as out:
        write_files_into(out.staging)          # plain local files, any layout below staging
        out.publish(["__0_0.distcp"])          # optional: upload finished data files early
        written = out.commit()                 # everything becomes visible, commit_last last
    # an exception inside the block aborts: nothing of this run stays behind

Local destination ``D``
  1. Stale temp siblings ``.{name}.ckptctl-tmp-*`` of dead runs are removed: those whose
     ``run.json`` names this host and a dead pid (or, without ``run.json``, older than an hour).
     If such a run died in the middle of a non-atomic replace (5, fallback), the previous
     output it had moved aside is first renamed back to ``D``.
  2. A non-empty ``D`` is refused (:class:`~ckptctl.errors.UsageError`) unless ``overwrite`` and
     it holds an earlier output of the same kind (see "What overwrite replaces" below).
  3. ``staging`` is ``.{name}.ckptctl-tmp-{random}/new/``, a sibling on the same filesystem.
  4. Commit: :data:`OUTPUT_MARKER` is written into ``staging``, every file and directory is
     fsync'ed, ``D`` is judged again; ``D`` missing or empty: one ``rename(new, D)``, atomic.
  5. ``D`` non-empty (``overwrite``): ``renameat2(new, D, RENAME_EXCHANGE)`` swaps the two
     directories atomically (``D`` is never missing), the old output is deleted with the temp
     sibling. Where the exchange is unsupported: ``rename(D, tmp/old)``, ``rename(new, D)``;
     a crash between the two is repaired by step 1 of the next run.
  A kill at any moment leaves the old ``D`` or the complete new one, plus at most a temp
  sibling that the next run removes.

Object-store prefix ``P`` (S3, GCS: no rename)
  1. A non-empty ``P`` is refused unless ``overwrite`` and it holds an earlier output of the
     same kind -- or unless it holds the marker :data:`INCOMPLETE_MARKER` and none of the
     ``commit_last`` files: an output of ckptctl that was interrupted, replaced without asking.
  2. ``staging`` is ``{TMPDIR}/ckptctl-out-{random}/new/``, beside a ``run.json`` (this host
     and pid); such directories of this user's dead runs are removed first (a killed run cannot
     remove its own). Nothing touches ``P`` before the first upload (:meth:`OutputDir.publish`
     or :meth:`OutputDir.commit`).
  3. Before the first upload: the old ``commit_last`` files are deleted FIRST (alone, so the
     old output stops looking complete before anything else changes), the marker is written.
  4. Commit: every staged file except ``commit_last`` (:data:`OUTPUT_MARKER` included) is
     uploaded (parallel), old objects this run did not write are deleted, then the
     ``commit_last`` files in their order, then the marker is deleted. (So on object stores an
     overwrite destroys the old output when uploading starts, not when it succeeds.)
  A kill at any moment leaves no ``commit_last`` file (or the complete output, plus at worst
  the marker); the rerun replaces it without ``overwrite``. :meth:`OutputDir.abort` deletes
  the objects this run uploaded and the marker.

Several processes (torchrun): the process that opened the :class:`OutputDir` shares
``staging`` (same node or shared filesystem), or other processes :meth:`OutputDir.attach` to the
destination with a staging directory of their own and :meth:`~OutputDir.publish` their files
after the owner's :meth:`~OutputDir.begin`; the owner's :meth:`~OutputDir.commit` is told what
they uploaded (``uploaded=``) so it neither deletes nor re-uploads them.

What ``overwrite`` replaces (:func:`judge_destination`, the one rule for local and object-store
destinations): only an earlier output of the same kind. Every committed :class:`OutputDir` holds
:data:`OUTPUT_MARKER` (``ckptctl-output.json``: tool, kind, source and the list of its files), so
an earlier output is recognised by that marker and its files; an HF export (written by
:mod:`ckptctl.formats.hf_writer` exactly like ``save_pretrained``, no marker) by its content: only
the files an HF model directory has, weights included. Anything else -- a checkpoint tree, step or
component, an output of another kind, a directory holding any file such an output does not have --
is refused with a one-line :class:`~ckptctl.errors.UsageError` naming what is there; so are,
locally, the current directory, the home directory, ``/`` and their ancestors. (Ancestors of a
source: :func:`refuse_overlap`.)

SIGTERM: while an output is open in the main thread, SIGTERM raises :class:`Terminated` (a
:class:`KeyboardInterrupt`), so a killed run removes its staging exactly as on Ctrl-C
(:class:`TerminateAsInterrupt`).

One writer per destination at a time: two concurrent runs to the same place are not detected
(locally the second to commit is refused or replaces the first).
"""

from __future__ import annotations

import ctypes
import errno
import json
import os
import posixpath
import re
import secrets
import shutil
import signal
import socket
import stat
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from datetime import datetime, timezone
from typing import Iterable, Iterator

from ckptctl import __version__
from ckptctl.errors import NotACheckpointError, NotFoundError, UsageError
from ckptctl.storage import Store, open_store, put_file_options, translate_errors
from ckptctl.tree import (DISTCP_RE, FSDP_RANK_FILE_RE, FSDP_SINGLE_FILES, MANIFEST_FILE, MODEL_COMPONENTS,
                          POINTER_FILE, STEP_FILES, STEP_PREFIX)

#: The local temp sibling is ``.{name}{TMP_INFIX}{random}``; it holds ``run.json`` and ``new/``.
TMP_INFIX = ".ckptctl-tmp-"
RUN_INFO = "run.json"
#: Object-store marker of an output being written (deleted once the commit_last files are up).
INCOMPLETE_MARKER = ".ckptctl-export-incomplete"
#: A temp sibling without run.json is only removed once it is this old (seconds).
STALE_WITHOUT_INFO_S = 3600
#: Object-store outputs are staged in ``{TMPDIR}/ckptctl-out-{random}/new/``, beside run.json.
SCRATCH_PREFIX = "ckptctl-out-"
#: Parallel uploads at commit.
UPLOAD_WORKERS = 8
#: Written into every committed OutputDir: what wrote it (tool, kind, source) and its files.
OUTPUT_MARKER = "ckptctl-output.json"
#: Output kinds (the command that writes them); GENERIC for OutputDir users that name none.
RESHARD, HF_EXPORT, GENERIC = "convert-reshard", "export-hf", "output"
#: Exit status of a run stopped by SIGTERM (128 + 15, like 130 for Ctrl-C).
SIGTERM_EXIT_CODE = 143

#: Tests switch this off to exercise the two-rename fallback.
_USE_EXCHANGE = True
_AT_FDCWD = -100
_RENAME_EXCHANGE = 2


# ---------------------------------------------------------------------------------------------
# small filesystem helpers
# ---------------------------------------------------------------------------------------------
def pid_alive(pid: int) -> bool:
    """Whether ``pid`` runs on this host (a zombie counts as dead)."""
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:
        return True  # exists, owned by someone else
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            return f.read().rsplit(b")", 1)[-1].split()[0] != b"Z"
    except (OSError, IndexError):
        return True


def rename_exchange(a: str, b: str) -> bool:
    """Atomically swap two paths (Linux renameat2 RENAME_EXCHANGE); False where unsupported."""
    if not _USE_EXCHANGE or not sys.platform.startswith("linux"):
        return False
    try:
        fn = ctypes.CDLL(None, use_errno=True).renameat2
    except (OSError, AttributeError):
        return False
    fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    fn.restype = ctypes.c_int
    if fn(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOSYS, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EXDEV):
        return False
    raise OSError(err, os.strerror(err), b)


def fsync_dir(path: str) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def fsync_file(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def dir_is_empty(path: str) -> bool:
    with os.scandir(path) as it:
        return next(it, None) is None


def is_inside(inner: Store, outer: Store) -> bool:
    """Whether ``inner`` is ``outer`` or lies below it (same backend; local paths resolved)."""
    if inner.protocol != outer.protocol:
        return False
    if inner.is_local:
        a, b = os.path.realpath(inner.root), os.path.realpath(outer.root)
    else:
        a, b = inner.root, outer.root
    a, b = a.rstrip("/"), b.rstrip("/")
    return a == b or a.startswith(b + "/")


def refuse_overlap(src: Store, dst: Store) -> None:
    """UsageError when the destination is the source, lies inside it, or contains it."""
    if is_inside(dst, src):
        raise UsageError(f"refusing to write {dst.url} inside the source {src.url}")
    if is_inside(src, dst):
        raise UsageError(f"refusing to write {dst.url}: it contains the source {src.url}")


def staged_files(staging: str) -> list[str]:
    """Every file below ``staging`` as a '/'-separated relative path, sorted."""
    out = []
    prefix = len(os.path.join(staging, ""))
    for dirpath, dirnames, filenames in os.walk(staging):
        dirnames.sort()
        for name in filenames:
            out.append(os.path.join(dirpath, name)[prefix:].replace(os.sep, "/"))
    return sorted(out)


def _run_info(dest: str) -> dict:
    return {"tool": "ckptctl", "host": socket.gethostname(), "pid": os.getpid(), "dest": dest,
            "started": datetime.now(timezone.utc).isoformat(timespec="seconds")}


def run_is_dead(run_dir: str, *, without_info_after: float | None) -> bool:
    """Whether the run that made ``run_dir`` is dead: its ``run.json`` names this host and a dead
    pid. Without ``run.json``: once the directory is ``without_info_after`` seconds old (None:
    never; it may be a run that is still creating it)."""
    try:
        with open(os.path.join(run_dir, RUN_INFO), "rb") as f:
            info = json.loads(f.read())
        host, pid = info["host"], int(info["pid"])
    except FileNotFoundError:
        if without_info_after is None:
            return False
        try:
            return time.time() - os.stat(run_dir).st_mtime > without_info_after
        except OSError:
            return False
    except (OSError, ValueError, KeyError, TypeError):
        return False
    return host == socket.gethostname() and not pid_alive(pid)


def clean_dead_scratch() -> list[str]:
    """Remove the scratch directories (:func:`make_scratch`) of this user's dead runs on this
    host: a killed run cannot remove its own, and it may hold gigabytes of staged shards."""
    tmp = tempfile.gettempdir()
    try:
        names = sorted(n for n in os.listdir(tmp) if n.startswith(SCRATCH_PREFIX))
    except OSError:
        return []
    cleaned = []
    for name in names:
        path = os.path.join(tmp, name)
        try:
            st = os.lstat(path)
        except OSError:
            continue
        if stat.S_ISDIR(st.st_mode) and st.st_uid == os.getuid() and run_is_dead(path, without_info_after=None):
            shutil.rmtree(path, ignore_errors=True)
            cleaned.append(path)
    return cleaned


def make_scratch(dest: str) -> str:
    """A new local scratch directory for files bound for the object store ``dest``:
    ``{TMPDIR}/ckptctl-out-{random}/`` holding ``run.json``, so that a later run can tell it
    is dead (:func:`clean_dead_scratch`), and the empty staging directory ``new/``. Call with
    signals deferred, so that the directory and the caller's record of it exist together."""
    path = tempfile.mkdtemp(prefix=SCRATCH_PREFIX)
    try:
        with open(os.path.join(path, RUN_INFO), "w", encoding="utf-8") as f:
            json.dump(_run_info(dest), f)
        os.mkdir(os.path.join(path, "new"))
    except BaseException:  # without run.json no later run would remove it
        shutil.rmtree(path, ignore_errors=True)
        raise
    return path


# ---------------------------------------------------------------------------------------------
# what a destination holds, and whether --overwrite may replace it
# ---------------------------------------------------------------------------------------------
#: The files an HF model directory holds (what export-hf and save_pretrained write, tokenizer
#: and processor files, a model card); below, the name patterns.
HF_MODEL_FILES = frozenset({
    "config.json", "generation_config.json", "model.safetensors", "model.safetensors.index.json",
    "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json", "vocab.json",
    "vocab.txt", "merges.txt", "tokenizer.model", "spiece.model", "sentencepiece.bpe.model", "chat_template.jinja",
    "chat_template.json", "preprocessor_config.json", "processor_config.json", "README.md"})
_HF_MODEL_FILE_RE = re.compile(r"^(model-\d+-of-\d+\.safetensors|[\w.-]+\.tiktoken|additional_chat_templates/[^/]+"
                               r"|lora_adapter/[^/]+)$")
_HF_WEIGHTS_RE = re.compile(r"^model(-\d+-of-\d+)?\.safetensors(\.index\.json)?$")
_COMPONENT_FILES = frozenset({".metadata", "metadata.json", "common.pt", *FSDP_SINGLE_FILES.values()})


def _names(paths: Iterable[str], limit: int = 4) -> str:
    paths = list(paths)
    shown = ", ".join(paths[:limit])
    return shown + (f" and {len(paths) - limit} more" if len(paths) > limit else "")


def describe_checkpoint(paths: Iterable[str]) -> str | None:
    """"a checkpoint tree (…)", "a training step (…)" or "a checkpoint component (…)" when the
    relative file paths look like one (names only: a tree's pointer or global_step_* dirs; a
    step's trainer_state.pt/data.pt or policy/critic dirs; FSDP rank files, Megatron files)."""
    paths = list(paths)
    top_files = {p for p in paths if "/" not in p}
    top_dirs = sorted({p.split("/", 1)[0] for p in paths if "/" in p})
    steps = [d + "/" for d in top_dirs if d.startswith(STEP_PREFIX)]
    if POINTER_FILE in top_files or steps:
        return f"a checkpoint tree ({_names(([POINTER_FILE] if POINTER_FILE in top_files else []) + steps)})"
    marks = [n for n in STEP_FILES if n in top_files] + [d + "/" for d in top_dirs if d in MODEL_COMPONENTS]
    if marks:
        return f"a training step ({_names(marks)})"
    marks = [n for n in sorted(top_files) if n in _COMPONENT_FILES or FSDP_RANK_FILE_RE.match(n) or DISTCP_RE.match(n)]
    marks += ["dist_ckpt/"] if "dist_ckpt" in top_dirs else []
    if marks:
        return f"a checkpoint component ({_names(marks)})"
    return None


def is_hf_model_file(rel: str) -> bool:
    return rel in HF_MODEL_FILES or bool(_HF_MODEL_FILE_RE.match(rel))


def read_output_marker(store: Store) -> dict | None:
    """The :data:`OUTPUT_MARKER` of the output at ``store`` (None: absent or not ckptctl's)."""
    try:
        marker = json.loads(store.read_bytes(OUTPUT_MARKER))
    except (NotFoundError, ValueError, UnicodeDecodeError):
        return None
    ok = (isinstance(marker, dict) and marker.get("tool") == "ckptctl" and isinstance(marker.get("kind"), str)
          and isinstance(marker.get("files"), list))
    return marker if ok else None


def _output_label(kind: str) -> str:
    return "ckptctl output" if kind == GENERIC else f"{kind} output"


def _what_is_there(store: Store, paths: list[str], kind: str) -> tuple[bool, str]:
    """(whether an output of ``kind`` may replace it, what it is in words)."""
    # verify --write-manifest's manifest is no output's own file, nor foreign: replaced with the rest
    files = [p for p in paths if p not in (INCOMPLETE_MARKER, MANIFEST_FILE)]
    marker = read_output_marker(store) if OUTPUT_MARKER in files else None
    if marker is not None:
        listed = set(map(str, marker["files"]))
        label = f"an earlier {_output_label(marker['kind'])}" + (f" of {marker['source']}" if marker.get("source")
                                                                  else "")
        extra = sorted(set(files) - listed - {OUTPUT_MARKER})
        if marker["kind"] != kind:
            return False, label
        if extra:
            return False, f"{label} plus files it did not write ({_names(extra)})"
        return True, f"{label} ({len(listed)} files)"
    checkpoint = describe_checkpoint(files)
    if checkpoint:
        return False, checkpoint
    foreign = [p for p in files if not is_hf_model_file(p)]
    if not foreign and any(_HF_WEIGHTS_RE.match(p) for p in files):
        if kind == HF_EXPORT:
            return True, f"an HF model directory ({len(files)} files)"
        return False, "an HF model directory"
    if not foreign and kind == HF_EXPORT:
        return False, f"HF side files without model weights ({_names(sorted(files))})"
    return False, f"files that no {_output_label(kind)} has ({_names(sorted(foreign or files))})"


def judge_destination(store: Store, paths: list[str], *, kind: str, overwrite: bool,
                      commit_last: Iterable[str] = ()) -> str | None:
    """What writing an output of ``kind`` to ``store`` replaces, in words (None: nothing is
    there), or a :class:`UsageError` naming what is there. ``paths``: every file there,
    relative. The one rule for every destination, local or object store:

    - nothing there: None;
    - ckptctl's own interrupted output (object stores only: :data:`INCOMPLETE_MARKER` and none
      of ``commit_last``): ``"interrupted"``, replaced without ``overwrite``;
    - an earlier output of the same kind (its marker lists every file there; an HF export: only
      HF model files, weights included): replaced with ``overwrite``, refused without;
    - anything else (a checkpoint tree/step/component, another kind's output, foreign files):
      refused, ``overwrite`` or not."""
    if not paths:
        return None
    if not store.is_local and INCOMPLETE_MARKER in paths and not any(f in paths for f in commit_last):
        return "interrupted"  # our own interrupted output: replaced without asking
    replaceable, what = _what_is_there(store, paths, kind)
    if not replaceable:
        if overwrite:
            raise UsageError(f"{store.url}: refusing to overwrite {what}: --overwrite replaces only an earlier "
                             f"{_output_label(kind)}")
        raise UsageError(f"{store.url}: destination is not empty: it holds {what}; choose another destination")
    if not overwrite:
        raise UsageError(f"{store.url}: destination is not empty: it holds {what} (overwrite it with --overwrite)")
    return what


def refuse_special_destination(dest: str, url: str) -> None:
    """UsageError when the local directory ``dest`` (resolved) is, or contains, the current
    directory, the home directory or ``/``: never replaced, whatever they hold."""
    try:
        cwd = os.path.realpath(os.getcwd())
    except OSError:
        cwd = None
    home = os.path.realpath(os.path.expanduser("~"))
    for path, what in ((cwd, "the current directory"), (home, "the home directory")):
        if path is None:
            continue
        if path == dest:
            raise UsageError(f"{url}: refusing to write over {what} ({dest}); name a new directory below it")
        if path.startswith(dest.rstrip("/") + "/"):
            raise UsageError(f"{url}: refusing to write over {dest}: it contains {what} ({path})")


# ---------------------------------------------------------------------------------------------
# SIGTERM: the same cleanup as Ctrl-C
# ---------------------------------------------------------------------------------------------
class Terminated(KeyboardInterrupt):
    """SIGTERM while an output was being written (raised by :class:`TerminateAsInterrupt`);
    ``committed``: the output it arrived during the commit of, which was then complete."""

    exit_code = SIGTERM_EXIT_CODE

    def __init__(self, committed: str | None = None):
        super().__init__()
        self.committed = committed

    def __str__(self) -> str:
        if self.committed:
            return f"terminated (SIGTERM) as {self.committed} was committed: the output is complete"
        return "terminated (SIGTERM): the output in progress was removed"


def _raise_terminated(signum, frame) -> None:
    raise Terminated()


@contextmanager
def signals_deferred() -> Iterator[None]:
    """SIGTERM and SIGINT held back (delivered at the end), so that a step such as "create a
    temp directory, remember its name" is not cut in half by the exception they raise (the
    cleanup would not know the directory).

    Blocking the signals in the main thread is not enough: the kernel then hands a signal sent to
    the process to another thread (a reader, torch's), and Python runs its handler in the main
    thread all the same, inside the step. So the Python handlers themselves are swapped for one
    that only records the signal, and the recorded signal goes to the previous handler at the end
    (a run killed that way left its staging directory behind, unknown to the cleanup)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    received: list[int] = []
    previous = {}
    for signum in (signal.SIGTERM, signal.SIGINT):
        handler = signal.getsignal(signum)
        if callable(handler) or handler is signal.SIG_DFL:
            previous[signum] = signal.signal(signum, lambda number, frame: received.append(number))
    try:
        yield
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
        for signum in dict.fromkeys(received):  # each at most once, in order
            handler = previous[signum]
            if callable(handler):
                handler(signum, None)
            else:  # the default action (SIGTERM: end the process), now that the step is whole
                signal.raise_signal(signum)


class TerminateAsInterrupt:
    """While installed, SIGTERM raises :class:`Terminated` in the main thread, so the ``with``
    blocks of an output being written abort it (staging removed) as on Ctrl-C. Installed
    only from the main thread and only over the default action (a SIG_IGN or an application's
    own handler is left alone); nested guards share one installation; :meth:`restore` puts
    the previous handler back."""

    _lock = threading.Lock()
    _depth = 0
    _previous = None

    def __init__(self) -> None:
        self.active = False

    def install(self) -> None:
        if self.active or threading.current_thread() is not threading.main_thread():
            return
        cls = TerminateAsInterrupt
        with cls._lock:
            if cls._depth == 0:
                if signal.getsignal(signal.SIGTERM) is not signal.SIG_DFL:
                    return
                cls._previous = signal.signal(signal.SIGTERM, _raise_terminated)
            cls._depth += 1
            self.active = True

    def restore(self) -> None:
        if not self.active or threading.current_thread() is not threading.main_thread():
            return
        cls = TerminateAsInterrupt
        with cls._lock:
            self.active = False
            cls._depth -= 1
            if cls._depth == 0:
                signal.signal(signal.SIGTERM, cls._previous)
                cls._previous = None


# ---------------------------------------------------------------------------------------------
# local destination: temp sibling + rename / exchange
# ---------------------------------------------------------------------------------------------
class LocalStaging:
    """A local directory built in a temp sibling and renamed into place (see the module doc).

    Construction cleans stale siblings and judges what the destination holds
    (:func:`judge_destination`: refused unless it is an earlier output of ``kind`` and
    ``overwrite``); :meth:`prepare` creates the sibling; :meth:`commit` / :meth:`abort` end it.
    """

    def __init__(self, store: Store, overwrite: bool, *, kind: str = GENERIC):
        self.url = store.url
        self.store = store
        self.dest = os.path.realpath(store.local_path())
        self.parent, self.name = os.path.split(self.dest)
        if not self.name:
            raise UsageError(f"{self.dest}: cannot write an output to a filesystem root")
        refuse_special_destination(self.dest, self.url)
        self.kind = kind
        self.overwrite = overwrite
        self.run_dir: str | None = None
        self.new_dir: str | None = None
        self.replaced: str | None = None
        self.cleaned = self._clean_stale()
        self.replaced = self._judge()

    def _judge(self) -> str | None:
        """What committing would replace (:func:`judge_destination`); None: missing or empty."""
        if not os.path.lexists(self.dest):
            return None
        if not os.path.isdir(self.dest):
            raise NotACheckpointError(f"{self.dest}: exists and is a file, not a directory")
        if dir_is_empty(self.dest):
            return None
        with translate_errors(self.url):
            paths = [e.path for e in open_store(self.dest).walk()]
        if not paths:  # only empty directories: nothing to lose, but not ours either
            if not self.overwrite:
                raise UsageError(f"{self.dest}: destination is not empty: it holds empty directories "
                                 "(overwrite it with --overwrite)")
            return "empty directories"
        return judge_destination(self.store, paths, kind=self.kind, overwrite=self.overwrite)

    def _exchange(self, a: str, b: str) -> bool:
        return rename_exchange(a, b)

    # -- stale temp siblings --------------------------------------------------------------
    def _siblings(self) -> list[str]:
        prefix = f".{self.name}{TMP_INFIX}"
        try:
            names = os.listdir(self.parent)
        except FileNotFoundError:
            return []
        return [os.path.join(self.parent, n) for n in sorted(names) if n.startswith(prefix)]

    def _clean_stale(self) -> list[str]:
        cleaned = []
        for run_dir in self._siblings():
            if not os.path.isdir(run_dir) or not run_is_dead(run_dir, without_info_after=STALE_WITHOUT_INFO_S):
                continue
            old = os.path.join(run_dir, "old")
            if os.path.isdir(old) and not os.path.lexists(self.dest):
                os.rename(old, self.dest)  # a replace died half-way: put the previous output back
            shutil.rmtree(run_dir, ignore_errors=True)
            cleaned.append(run_dir)
        return cleaned

    # -- life cycle -----------------------------------------------------------------------
    def prepare(self) -> str:
        """Create the temp sibling; returns the directory to write into."""
        if self.new_dir is not None:
            return self.new_dir
        with translate_errors(self.url), signals_deferred():  # the sibling and self.run_dir exist together
            os.makedirs(self.parent, exist_ok=True)
            while True:
                run_dir = os.path.join(self.parent, f".{self.name}{TMP_INFIX}{secrets.token_hex(6)}")
                try:
                    os.mkdir(run_dir)
                    break
                except FileExistsError:
                    continue
            self.run_dir = run_dir
            with open(os.path.join(run_dir, RUN_INFO), "w", encoding="utf-8") as f:
                json.dump(_run_info(self.dest), f)
            self.new_dir = os.path.join(run_dir, "new")
            os.mkdir(self.new_dir)
        return self.new_dir

    def commit(self, *, fsync_files: bool = False) -> None:
        """Rename (or exchange) the staged directory into place. ``fsync_files``: fsync every
        file first (writers that fsync'ed their own files leave it False)."""
        new, dest = self.new_dir, self.dest
        if new is None:
            raise UsageError(f"{dest}: nothing staged to commit")
        with translate_errors(self.url):
            for dirpath, _, filenames in os.walk(new):
                if fsync_files:
                    for name in filenames:
                        fsync_file(os.path.join(dirpath, name))
                fsync_dir(dirpath)
            replaced = self._judge()  # again: it may have been filled meanwhile
            try:
                self._rename_into_place(new, dest, replaced)
            except Terminated as exc:  # held during the renames, delivered after them
                if self.run_dir is None:
                    raise Terminated(committed=self.url) from exc
                raise

    def _rename_into_place(self, new: str, dest: str, replaced: str | None) -> None:
        """The commit proper: the renames, then the temp sibling removed; a signal waits for the
        end (the output is then complete: a SIGTERM says so instead of "removed"). Its errors are
        translated by :meth:`commit`, its one caller."""
        with signals_deferred():  # the renames are not cut in half by Ctrl-C / SIGTERM
            if replaced is None:
                try:
                    os.rename(new, dest)  # atomic; replaces an empty directory
                except OSError as exc:
                    if exc.errno in (errno.ENOTEMPTY, errno.EEXIST):
                        raise UsageError(f"{dest}: destination was filled by someone else meanwhile") from exc
                    raise
            else:
                self.replaced = replaced
                if not self._exchange(new, dest):
                    old = os.path.join(self.run_dir, "old")
                    os.rename(dest, old)
                    try:
                        os.rename(new, dest)
                    except BaseException:
                        os.rename(old, dest)
                        raise
            fsync_dir(self.parent)
            shutil.rmtree(self.run_dir, ignore_errors=True)  # the temp sibling, with the old output
            self.run_dir = self.new_dir = None

    def abort(self) -> None:
        if self.run_dir:
            shutil.rmtree(self.run_dir, ignore_errors=True)
            self.run_dir = self.new_dir = None


# ---------------------------------------------------------------------------------------------
# object-store destination: data first, commit_last last, a marker while incomplete
# ---------------------------------------------------------------------------------------------
class RemoteCommit:
    """The object-store side of :class:`OutputDir` (see the module doc)."""

    def __init__(self, store: Store, overwrite: bool, commit_last: tuple[str, ...], *, check: bool = True,
                 kind: str = GENERIC):
        self.owner = check  # the owner writes and deletes the marker; attached helpers never do
        self.store = store
        self.url = store.url
        self.overwrite = overwrite
        self.kind = kind
        self.commit_last = tuple(commit_last)
        self.written: list[str] = []
        self.begun = False
        self.replaced: str | None = None
        self.upload_limits: tuple[int, int] | None = None  # (bytes, parts in flight); None: the library's
        if check:
            self.replaced = self._judge(self.listing())

    def listing(self) -> list[str]:
        return [e.path for e in self.store.walk_destination()]

    def _judge(self, existing: list[str]) -> str | None:
        return judge_destination(self.store, existing, kind=self.kind, overwrite=self.overwrite,
                                 commit_last=self.commit_last)

    def begin(self) -> None:
        """Make the old output stop looking complete, write the marker (once)."""
        if self.begun:
            return
        existing = self.listing()
        self.replaced = self._judge(existing) if existing else self.replaced
        old_last = [f for f in self.commit_last if f in existing]
        if old_last:
            self.store.delete_many(old_last)  # first, alone
        self.store.write_bytes(INCOMPLETE_MARKER, json.dumps(_run_info(self.url)).encode())
        self.begun = True

    def upload(self, staging: str, rels: Iterable[str], *, remove_local: bool = False) -> list[str]:
        """Upload staged files (parallel); returns them. Requires :meth:`begin`."""
        rels = list(rels)
        if not rels:
            return []
        if not self.begun:
            raise UsageError(f"{self.url}: upload before begin()")

        files = min(UPLOAD_WORKERS, len(rels))

        def put(rel: str) -> str:
            local = os.path.join(staging, *rel.split("/"))
            options = {} if self.upload_limits is None else put_file_options(
                self.store, os.path.getsize(local), self.upload_limits[0] // files, self.upload_limits[1])
            with translate_errors(self.store.url_of(rel)):
                self.store.fs.put_file(local, self.store.full_path(rel), **options)
            self.written.append(rel)
            if remove_local:
                os.remove(local)
            return rel

        if files == 1:
            return [put(rels[0])]
        with ThreadPoolExecutor(files) as pool:
            return list(pool.map(put, rels))

    def commit(self, staging: str, rels: list[str], uploaded: Iterable[str] = ()) -> list[str]:
        self.begin()
        last = [f for f in self.commit_last if f in rels]
        first = [r for r in rels if r not in last]
        self.upload(staging, first)
        keep = set(rels) | set(uploaded) | set(self.written)
        stale = [p for p in self.listing() if p not in keep and p != INCOMPLETE_MARKER]
        if stale:
            self.store.delete_many(stale)
        for rel in last:  # in their order, one by one
            self.upload(staging, [rel])
        self.store.delete_many([INCOMPLETE_MARKER])
        self.begun = False
        return list(dict.fromkeys([*uploaded, *self.written]))

    def abort(self, extra: Iterable[str] = ()) -> None:
        doomed = list(dict.fromkeys([*self.written, *extra]))
        if self.begun and self.owner:
            doomed.append(INCOMPLETE_MARKER)  # last: if this fails, a rerun still sees "interrupted"
        if doomed:
            self.store.delete_many(doomed)
        self.written = []
        self.begun = False


# ---------------------------------------------------------------------------------------------
# the public object
# ---------------------------------------------------------------------------------------------
class OutputDir:
    """A command output directory at ``dest_url`` committed as one unit (see the module doc).

    ``commit_last``: files (relative paths) whose presence defines "complete", uploaded last in
    this order on object stores and removed first when an old output is replaced. ``kind``
    (e.g. :data:`RESHARD`) and ``source`` go into :data:`OUTPUT_MARKER`; ``overwrite`` replaces
    only an earlier output of the same ``kind`` (:func:`judge_destination`).
    """

    def __init__(self, dest_url: str, *, overwrite: bool = False, commit_last: tuple[str, ...] = (),
                 kind: str = GENERIC, source: str | None = None, endpoint_url: str | None = None,
                 store: Store | None = None, _attach: str | None = None):
        self.store = store if store is not None else open_store(dest_url, endpoint_url=endpoint_url)
        self.dest = self.store.url
        self.overwrite = overwrite
        self.kind = kind
        self.source = source
        self.commit_last = tuple(posixpath.normpath(p) for p in commit_last)
        self.state = "new"  # new -> open -> committed | aborted
        self._local: LocalStaging | None = None
        self._remote: RemoteCommit | None = None
        self._tmp: str | None = None
        self._scratch_cleaned: list[str] = []
        self._attached = _attach is not None
        self._sigterm = TerminateAsInterrupt()
        self._checks: list = []  # source checks that must pass before the commit
        self.staging: str = ""
        if self._attached:
            self.staging = _attach
            if not self.store.is_local:
                self._remote = RemoteCommit(self.store, overwrite, self.commit_last, check=False, kind=kind)
                self._remote.begun = True  # the owner began
            self.state = "open"
        elif self.store.is_local:
            self._local = LocalStaging(self.store, overwrite, kind=kind)
        else:
            self._remote = RemoteCommit(self.store, overwrite, self.commit_last, kind=kind)

    @classmethod
    def attach(cls, dest_url: str, staging: str, *, endpoint_url: str | None = None,
               store: Store | None = None) -> "OutputDir":
        """A helper process's handle on an output another process opened: it writes into
        ``staging`` (the owner's, or its own local directory for an object store) and may
        :meth:`publish` (object stores, after the owner's :meth:`begin`). It never commits."""
        return cls(dest_url, endpoint_url=endpoint_url, store=store, _attach=staging)

    # -- facts ----------------------------------------------------------------------------
    @property
    def is_local(self) -> bool:
        return self.store.is_local

    @property
    def replaced(self) -> str | None:
        """What was replaced, in words (e.g. "an earlier convert-reshard output of SRC (17
        files)"), ``"interrupted"`` (object stores: an interrupted earlier run's objects), or None."""
        target = self._local or self._remote
        return target.replaced if target is not None else None

    @property
    def cleaned(self) -> list[str]:
        """What dead runs left behind, removed: temp siblings (local destinations) or local
        scratch directories (object stores)."""
        return list(self._local.cleaned) if self._local else list(self._scratch_cleaned)

    @property
    def published(self) -> list[str]:
        """Files already uploaded by this handle (object stores)."""
        return list(self._remote.written) if self._remote else []

    # -- life cycle -----------------------------------------------------------------------
    def open(self) -> "OutputDir":
        if self.state == "new":
            self._sigterm.install()  # before the staging exists: from here on, SIGTERM aborts like Ctrl-C
            try:
                if self._local is not None:
                    self.staging = self._local.prepare()
                else:
                    self._scratch_cleaned = clean_dead_scratch()
                    with signals_deferred():  # the temp dir and self._tmp exist together
                        self._tmp = make_scratch(self.dest)
                    self.staging = os.path.join(self._tmp, "new")
            except BaseException:
                self.state = "aborted"
                if self._local is not None:
                    self._local.abort()
                self._cleanup_tmp()
                self._sigterm.restore()
                raise
            self.state = "open"
        elif self.state != "open":
            raise UsageError(f"output {self.dest} is {self.state}; start a new one")
        return self

    def __enter__(self) -> "OutputDir":
        return self.open()

    def __exit__(self, exc_type, exc, tb) -> None:
        if self.state == "open":
            self.abort()

    def limit_uploads(self, budget: int, concurrency: int) -> None:
        """Object stores: keep each later upload's buffers near ``budget`` bytes in all, with up
        to ``concurrency`` requests in flight per file (:func:`ckptctl.storage.put_file_options`;
        otherwise s3fs holds 10 parts of 50 MiB per file, whatever ``--max-memory`` says)."""
        if self._remote is not None and budget > 0:
            self._remote.upload_limits = (budget, concurrency)

    def begin(self) -> None:
        """Object stores: delete the old ``commit_last`` files and write the marker now (before
        helper processes publish). Implied by :meth:`publish` and :meth:`commit`; a no-op locally."""
        self._require_open()
        if self._remote is not None and not self._attached:
            self._remote.begin()

    def publish(self, rels: Iterable[str]) -> list[str]:
        """Make finished data files final early. Object stores: upload them now and drop the
        local copies (so local disk holds only files in progress). Locally: nothing to do."""
        self._require_open()
        rels = [posixpath.normpath(r) for r in rels]
        bad = [r for r in rels if r in self.commit_last]
        if bad:
            raise UsageError(f"{bad[0]} is committed last; it cannot be published early")
        if self._remote is None:
            return rels
        self.begin()
        return self._remote.upload(self.staging, rels, remove_local=True)

    def check_before_commit(self, check) -> None:
        """Have :meth:`commit` call ``check.result()`` first (it raises on a problem: nothing is
        committed) and :meth:`abort` call ``check.cancel()``: e.g. a source's manifest hashes,
        computed while the output is written."""
        self._checks.append(check)

    def commit(self, *, uploaded: Iterable[str] = ()) -> list[str]:
        """Make the output visible; returns the files written (relative paths).

        ``uploaded``: files other processes already published at the destination."""
        self._require_open()
        if self._attached:
            raise UsageError("an attached output handle cannot commit; the owner does")
        uploaded = list(uploaded)  # read more than once below
        rels = [r for r in staged_files(self.staging) if r != OUTPUT_MARKER]
        missing = [f for f in self.commit_last if f not in rels and f not in uploaded]
        if missing:
            raise UsageError(f"{self.dest}: {missing[0]} was not written; refusing to commit an incomplete output")
        try:
            for check in self._checks:
                check.result()
            self._write_marker(sorted({*rels, *uploaded, *self.published} - {OUTPUT_MARKER}))
            if self._local is not None:
                self._local.commit(fsync_files=True)
                files = rels
            else:
                files = self._remote.commit(self.staging, [*rels, OUTPUT_MARKER], uploaded)
        except BaseException:
            self.abort(uploaded=uploaded)
            raise
        self.state = "committed"
        self._sigterm.restore()
        self._cleanup_tmp()
        return sorted(f for f in files if f != OUTPUT_MARKER)

    def _write_marker(self, files: list[str]) -> None:
        """:data:`OUTPUT_MARKER` into the staging directory (what wrote the output, and its files)."""
        marker = {"tool": "ckptctl", "version": __version__, "kind": self.kind, "source": self.source,
                  "created": datetime.now(timezone.utc).isoformat(timespec="seconds"), "files": files}
        with open(os.path.join(self.staging, OUTPUT_MARKER), "w", encoding="utf-8") as f:
            json.dump(marker, f, indent=1)
            f.write("\n")

    def abort(self, *, uploaded: Iterable[str] = ()) -> None:
        """Remove what this run wrote (the staging directory; on object stores the objects it
        uploaded, plus ``uploaded`` by other processes, and the marker)."""
        if self.state in ("aborted", "committed"):
            return
        self.state = "aborted"
        try:
            if self._local is not None:
                self._local.abort()
            elif self._remote is not None:
                self._remote.abort(uploaded)
        finally:
            for check in self._checks:
                check.cancel()
            self._cleanup_tmp()
            self._sigterm.restore()

    def _require_open(self) -> None:
        if self.state != "open":
            raise UsageError(f"output {self.dest} is {self.state}, not open")

    def _cleanup_tmp(self) -> None:
        if self._tmp:
            shutil.rmtree(self._tmp, ignore_errors=True)
            self._tmp = None

    def __del__(self):
        # Dropped without commit/abort (an exception on the way down): the local temp data
        # goes; uploaded objects stay (as after a kill), and the marker tells the rerun.
        try:
            if getattr(self, "state", "committed") == "open" and not self._attached:
                if self._local is not None:
                    self._local.abort()
                self._cleanup_tmp()
                self._sigterm.restore()
        except Exception:
            pass


__all__ = ["GENERIC", "HF_EXPORT", "INCOMPLETE_MARKER", "OUTPUT_MARKER", "RESHARD", "RUN_INFO", "SCRATCH_PREFIX",
           "TMP_INFIX", "LocalStaging", "OutputDir", "RemoteCommit", "TerminateAsInterrupt", "Terminated",
           "clean_dead_scratch", "describe_checkpoint", "dir_is_empty", "fsync_dir", "is_inside", "judge_destination",
           "make_scratch", "pid_alive", "read_output_marker", "refuse_overlap", "refuse_special_destination",
           "rename_exchange", "run_is_dead", "signals_deferred", "staged_files"]
