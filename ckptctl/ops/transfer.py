"""How the operations move bytes from and to object stores: ``--concurrency`` / ``--max-memory``
(:class:`Transfer`, parsed once for ``export-hf`` and ``convert-reshard``) and the read-ahead of a
format reader's planned ranged reads (:class:`ReadAheadScope` over
:class:`ckptctl.storage.ReadAhead`). Imports no torch."""

from __future__ import annotations

import os
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Iterator

from ckptctl.errors import UsageError
from ckptctl.heavy import import_torch


@dataclass(frozen=True)
class Transfer:
    """How an operation moves bytes from and to object stores (``--concurrency``, ``--max-memory``).

    ``concurrency``: ranged GETs in flight while reading ahead, and parts uploading at once;
    1 reads one tensor ahead and uploads in the writing thread (no read-ahead, no background
    upload). ``max_memory``: bytes the read-ahead buffers and the upload buffers may hold
    together (split evenly when both ends are object stores; besides that, the tensors being
    converted and written). Local files are read and written as before."""

    concurrency: int
    max_memory: int

    @classmethod
    def make(cls, concurrency: int | None = None, max_memory: int | str | None = None) -> "Transfer":
        from ckptctl.formats.hf_writer import parse_size
        from ckptctl.storage import DEFAULT_CONCURRENCY, MIN_MAX_MEMORY, check_concurrency, default_max_memory

        conc = DEFAULT_CONCURRENCY if concurrency is None else check_concurrency(concurrency)
        if max_memory is None:
            memory = default_max_memory()
        else:
            try:
                memory = parse_size(max_memory)
            except UsageError:
                raise UsageError(f"--max-memory: invalid size {max_memory!r} (e.g. 1GiB, 512MiB)") from None
            if memory < MIN_MAX_MEMORY:
                raise UsageError(f"--max-memory must be at least 1MiB, not {max_memory!r}")
        return cls(conc, memory)

    def budgets(self, src_remote: bool, dst_remote: bool) -> tuple[int, int]:
        """(read-ahead bytes, upload bytes)."""
        if src_remote and dst_remote:
            return self.max_memory // 2, self.max_memory - self.max_memory // 2
        return (self.max_memory if src_remote else 0), (self.max_memory if dst_remote else 0)


@contextmanager
def one_intra_op_thread() -> Iterator[None]:
    """torch's intra-op thread pool limited to one thread while the scope lasts, unless the user
    set ``OMP_NUM_THREADS`` (torchrun sets it to 1 for its workers).

    Export and reshard stream bytes through their own threads (read-ahead, reading, writing,
    uploads); torch only copies and casts in between. Its OpenMP workers then spin after each
    of those short parallel regions and take the cores the streaming threads and the network
    stack need: local -> S3 export of a 1.42 GB checkpoint used 8.3-8.8 s of CPU with the
    default pool, 5.1-5.5 s with one thread, and a local export (with or without a cast) took
    the same wall time with a third less user CPU."""
    if os.environ.get("OMP_NUM_THREADS"):
        yield
        return
    torch = import_torch()
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


class ReadAheadScope:
    """The read-ahead of one store's files while a scope lasts (object stores only): the ranged
    reads a format reader will make (its ``planned_reads``), fetched concurrently ahead of their
    use within a byte budget (:class:`ckptctl.storage.ReadAhead`). Stopped, and its buffers
    dropped, when the scope ends; :meth:`start` again stops the previous one first."""

    def __init__(self):
        self.read_ahead = None
        self.store = None

    def __enter__(self) -> "ReadAheadScope":
        return self

    def start(self, store: Any, plan: Iterable[tuple[str, int, int]], budget: int, concurrency: int) -> None:
        """Read ``plan`` (``(file, start, end)`` of ``store``, in the order they will be read)
        ahead. Nothing happens for a local store, a zero budget or ``concurrency`` 1."""
        from ckptctl.storage import ReadAhead

        self.stop()
        if store.is_local or not budget or concurrency <= 1:
            return
        plan = list(plan)
        if not plan:
            return
        self.store = store
        self.read_ahead = ReadAhead(store, plan, budget=budget, concurrency=concurrency)
        store.read_ahead = self.read_ahead

    def stop(self) -> None:
        if self.read_ahead is not None:
            self.store.read_ahead = None
            self.read_ahead.close()
            self.read_ahead = None

    def __exit__(self, *exc) -> None:
        self.stop()


class BackgroundPublish:
    """``publish(rels)`` (e.g. :meth:`ckptctl.output_dir.OutputDir.publish`: upload finished
    files) in one background thread, one call at a time, so that the next file is produced while
    the previous one uploads; with ``background`` False, in the caller's thread. What the calls
    returned is added to ``published``. Leaving the scope waits for the call in flight (after an
    error too, so that nothing uploads under an abort)."""

    def __init__(self, publish: Callable[[list[str]], list[str] | None], background: bool,
                 published: list[str] | None = None):
        self._publish = publish
        self.published = [] if published is None else published
        self._pool = None
        if background:
            from concurrent.futures import ThreadPoolExecutor

            self._pool = ThreadPoolExecutor(1, thread_name_prefix="ckptctl-upload")
        self._pending = None

    def __enter__(self) -> "BackgroundPublish":
        return self

    def __call__(self, rels: Iterable[str]) -> None:
        rels = list(rels)
        self.wait()
        if self._pool is None:
            self.published += self._publish(rels) or []
        elif rels:
            self._pending = self._pool.submit(self._publish, rels)

    def wait(self) -> None:
        """Wait for the call in flight; its error is raised here."""
        pending, self._pending = self._pending, None
        if pending is not None:
            self.published += pending.result() or []

    def __exit__(self, exc_type, exc, tb) -> None:
        try:
            if exc_type is None:
                self.wait()
            else:
                try:
                    self.wait()
                except BaseException:  # noqa: BLE001 - the error in flight already fails the run
                    pass
        finally:
            if self._pool is not None:
                self._pool.shutdown(wait=True)
