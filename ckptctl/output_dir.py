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
  2. A non-empty ``D`` is refused (:class:`~ckptctl.errors.UsageError`) unless ``overwrite``.
  3. ``staging`` is ``.{name}.ckptctl-tmp-{random}/new/``, a sibling on the same filesystem.
  4. Commit: every file and directory is fsync'ed; ``D`` missing or empty: one
     ``rename(new, D)``, atomic.
  5. ``D`` non-empty (``overwrite``): ``renameat2(new, D, RENAME_EXCHANGE)`` swaps the two
     directories atomically (``D`` is never missing), the old output is deleted with the temp
     sibling. Where the exchange is unsupported: ``rename(D, tmp/old)``, ``rename(new, D)``;
     a crash between the two is repaired by step 1 of the next run.
  A kill at any moment leaves the old ``D`` or the complete new one, plus at most a temp
  sibling that the next run removes.

Object-store prefix ``P`` (S3, GCS: no rename)
  1. A non-empty ``P`` is refused unless ``overwrite`` -- or unless it holds the marker
     :data:`INCOMPLETE_MARKER` and none of the ``commit_last`` files: an output of ckptctl that
     was interrupted, replaced without asking.
  2. ``staging`` is a local temp directory (``TMPDIR``). Nothing touches ``P`` before the first
     upload (:meth:`OutputDir.publish` or :meth:`OutputDir.commit`).
  3. Before the first upload: the old ``commit_last`` files are deleted FIRST (alone, so the
     old output stops looking complete before anything else changes), the marker is written.
  4. Commit: every staged file except ``commit_last`` is uploaded (parallel), old objects this
     run did not write are deleted, then the ``commit_last`` files in their order, then the
     marker is deleted. (So on object stores an overwrite destroys the old output when
     uploading starts, not when it succeeds.)
  A kill at any moment leaves no ``commit_last`` file (or the complete output, plus at worst
  the marker); the rerun replaces it without ``overwrite``. :meth:`OutputDir.abort` deletes
  the objects this run uploaded and the marker.

Several processes (torchrun): the process that opened the :class:`OutputDir` shares
``staging`` (same node or shared filesystem), or other processes :meth:`OutputDir.attach` to the
destination with a staging directory of their own and :meth:`~OutputDir.publish` their files
after the owner's :meth:`~OutputDir.begin`; the owner's :meth:`~OutputDir.commit` is told what
they uploaded (``uploaded=``) so it neither deletes nor re-uploads them.

One writer per destination at a time: two concurrent runs to the same place are not detected
(locally the second to commit is refused or replaces the first).
"""

from __future__ import annotations

import ctypes
import errno
import json
import os
import posixpath
import secrets
import shutil
import socket
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime, timezone
from typing import Iterable

from ckptctl.errors import NotFoundError, UsageError
from ckptctl.storage import Store, open_store, translate_errors

#: The local temp sibling is ``.{name}{TMP_INFIX}{random}``; it holds ``run.json`` and ``new/``.
TMP_INFIX = ".ckptctl-tmp-"
RUN_INFO = "run.json"
#: Object-store marker of an output being written (deleted once the commit_last files are up).
INCOMPLETE_MARKER = ".ckptctl-export-incomplete"
#: A temp sibling without run.json is only removed once it is this old (seconds).
STALE_WITHOUT_INFO_S = 3600
#: Parallel uploads at commit.
UPLOAD_WORKERS = 8

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


# ---------------------------------------------------------------------------------------------
# local destination: temp sibling + rename / exchange
# ---------------------------------------------------------------------------------------------
class LocalStaging:
    """A local directory built in a temp sibling and renamed into place (see the module doc).

    Construction cleans stale siblings and refuses a non-empty destination (unless
    ``overwrite``); :meth:`prepare` creates the sibling; :meth:`commit` / :meth:`abort` end it.
    """

    def __init__(self, store: Store, overwrite: bool, *, what: str = "output"):
        self.url = store.url
        self.dest = os.path.realpath(store.local_path())
        self.parent, self.name = os.path.split(self.dest)
        if not self.name:
            raise UsageError(f"{self.dest}: cannot write an {what} to a filesystem root")
        self.what = what
        self.overwrite = overwrite
        self.run_dir: str | None = None
        self.new_dir: str | None = None
        self.replaced: str | None = None
        self.cleaned = self._clean_stale()
        if os.path.lexists(self.dest):
            if not os.path.isdir(self.dest):
                raise UsageError(f"{self.dest}: exists and is not a directory")
            if not overwrite and not dir_is_empty(self.dest):
                raise UsageError(f"{self.dest}: destination is not empty (overwrite it with --overwrite)")

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

    @staticmethod
    def _is_stale(run_dir: str) -> bool:
        try:
            with open(os.path.join(run_dir, RUN_INFO), "rb") as f:
                info = json.loads(f.read())
            host, pid = info["host"], int(info["pid"])
        except FileNotFoundError:
            try:
                return time.time() - os.stat(run_dir).st_mtime > STALE_WITHOUT_INFO_S
            except OSError:
                return False
        except (OSError, ValueError, KeyError, TypeError):
            return False
        return host == socket.gethostname() and not pid_alive(pid)

    def _clean_stale(self) -> list[str]:
        cleaned = []
        for run_dir in self._siblings():
            if not os.path.isdir(run_dir) or not self._is_stale(run_dir):
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
        with translate_errors(self.url):
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
            if os.path.lexists(dest) and not os.path.isdir(dest):
                raise UsageError(f"{dest}: exists and is not a directory")
            if not os.path.isdir(dest) or dir_is_empty(dest):
                try:
                    os.rename(new, dest)  # atomic; replaces an empty directory
                except OSError as exc:
                    if exc.errno in (errno.ENOTEMPTY, errno.EEXIST):
                        raise UsageError(f"{dest}: destination was filled by someone else meanwhile") from exc
                    raise
            else:
                if not self.overwrite:
                    raise UsageError(f"{dest}: destination was filled by someone else meanwhile")
                self.replaced = self.what
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

    def __init__(self, store: Store, overwrite: bool, commit_last: tuple[str, ...], *, check: bool = True):
        self.owner = check  # the owner writes and deletes the marker; attached helpers never do
        self.store = store
        self.url = store.url
        self.overwrite = overwrite
        self.commit_last = tuple(commit_last)
        self.written: list[str] = []
        self.begun = False
        self.replaced: str | None = None
        if check:
            self.replaced = self._judge(self.listing())

    def listing(self) -> list[str]:
        try:
            return [e.path for e in self.store.walk()]
        except NotFoundError:
            return []

    def _judge(self, existing: list[str]) -> str | None:
        if not existing:
            return None
        if INCOMPLETE_MARKER in existing and not any(f in existing for f in self.commit_last):
            return "interrupted"  # our own interrupted output: replaced without asking
        if not self.overwrite:
            raise UsageError(f"{self.url}: destination is not empty ({len(existing)} objects; "
                             f"overwrite it with --overwrite)")
        return "output"

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

        def put(rel: str) -> str:
            local = os.path.join(staging, *rel.split("/"))
            with translate_errors(self.store.url_of(rel)):
                self.store.fs.put_file(local, self.store.full_path(rel))
            self.written.append(rel)
            if remove_local:
                os.remove(local)
            return rel

        if len(rels) == 1:
            return [put(rels[0])]
        with ThreadPoolExecutor(min(UPLOAD_WORKERS, len(rels))) as pool:
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
    this order on object stores and removed first when an old output is replaced.
    """

    def __init__(self, dest_url: str, *, overwrite: bool = False, commit_last: tuple[str, ...] = (),
                 endpoint_url: str | None = None, store: Store | None = None, _attach: str | None = None):
        self.store = store if store is not None else open_store(dest_url, endpoint_url=endpoint_url)
        self.dest = self.store.url
        self.overwrite = overwrite
        self.commit_last = tuple(posixpath.normpath(p) for p in commit_last)
        self.state = "new"  # new -> open -> committed | aborted
        self._local: LocalStaging | None = None
        self._remote: RemoteCommit | None = None
        self._tmp: str | None = None
        self._attached = _attach is not None
        self.staging: str = ""
        if self._attached:
            self.staging = _attach
            if not self.store.is_local:
                self._remote = RemoteCommit(self.store, overwrite, self.commit_last, check=False)
                self._remote.begun = True  # the owner began
            self.state = "open"
        elif self.store.is_local:
            self._local = LocalStaging(self.store, overwrite)
        else:
            self._remote = RemoteCommit(self.store, overwrite, self.commit_last)

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
        """None, ``"output"`` (an old output was replaced) or ``"interrupted"`` (object stores:
        an interrupted earlier run's objects were replaced)."""
        target = self._local or self._remote
        return target.replaced if target is not None else None

    @property
    def cleaned(self) -> list[str]:
        """Stale temp siblings of dead runs removed (local destinations)."""
        return list(self._local.cleaned) if self._local else []

    @property
    def published(self) -> list[str]:
        """Files already uploaded by this handle (object stores)."""
        return list(self._remote.written) if self._remote else []

    # -- life cycle -----------------------------------------------------------------------
    def open(self) -> "OutputDir":
        if self.state == "new":
            if self._local is not None:
                self.staging = self._local.prepare()
            else:
                self._tmp = tempfile.mkdtemp(prefix="ckptctl-out-")
                self.staging = os.path.join(self._tmp, "new")
                os.mkdir(self.staging)
            self.state = "open"
        elif self.state != "open":
            raise UsageError(f"output {self.dest} is {self.state}; start a new one")
        return self

    def __enter__(self) -> "OutputDir":
        return self.open()

    def __exit__(self, exc_type, exc, tb) -> None:
        if self.state == "open":
            self.abort()

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

    def commit(self, *, uploaded: Iterable[str] = ()) -> list[str]:
        """Make the output visible; returns the files written (relative paths).

        ``uploaded``: files other processes already published at the destination."""
        self._require_open()
        if self._attached:
            raise UsageError("an attached output handle cannot commit; the owner does")
        rels = staged_files(self.staging)
        uploaded = list(uploaded)  # read more than once below
        missing = [f for f in self.commit_last if f not in rels and f not in uploaded]
        if missing:
            raise UsageError(f"{self.dest}: {missing[0]} was not written; refusing to commit an incomplete output")
        try:
            if self._local is not None:
                self._local.commit(fsync_files=True)
                files = rels
            else:
                files = self._remote.commit(self.staging, rels, uploaded)
        except BaseException:
            self.abort(uploaded=uploaded)
            raise
        self.state = "committed"
        self._cleanup_tmp()
        return sorted(files)

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
            self._cleanup_tmp()

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
        except Exception:
            pass


__all__ = ["INCOMPLETE_MARKER", "RUN_INFO", "TMP_INFIX", "LocalStaging", "OutputDir", "RemoteCommit",
           "dir_is_empty", "fsync_dir", "is_inside", "pid_alive", "refuse_overlap", "rename_exchange",
           "staged_files"]
