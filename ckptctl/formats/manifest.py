"""Manifests: every file of a step (or component) with its size and SHA-256, and the checks
against them.

``ckptctl verify --write-manifest`` writes :data:`~ckptctl.tree.MANIFEST_FILE` (written last,
atomically); ``verify`` compares every hash, and ``export-hf`` / ``convert-reshard`` hash the
files they read in background threads (:class:`ManifestCheck`) and refuse to commit when any
differs. Hashing is streamed (:data:`BLOCK` bytes per file in memory) and parallel across files.
"""

from __future__ import annotations

import hashlib
import json
import os
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Callable

from ckptctl.errors import CorruptFileError, NotFoundError
from ckptctl.formats.safe_load import CorruptCheckpointError
from ckptctl.output_dir import TMP_INFIX, fsync_dir
from ckptctl.storage import FileEntry, Store, natural_key, write_local_file
from ckptctl.tree import MANIFEST_FILE, Component

#: Bytes read at a time by hashing and CRC checks (per file being read): big enough that an
#: object store's per-request cost stays small beside the transfer (bench/bench_verify.py).
BLOCK = 16 * 1024 * 1024
#: Files hashed / CRC-checked at once (hashlib and the CRC release the GIL): memory stays below
#: WORKERS x BLOCK (x the largest DCP chunk for Megatron's ``full``).
WORKERS = 8
MANIFEST_VERSION = 1
ALGORITHM = "sha256"

class ByteCounter:
    """Bytes read, for the figures of a report or a bench."""

    def __init__(self) -> None:
        self.bytes = 0

    def add(self, n: int) -> None:
        self.bytes += n  # += on an int attribute under the GIL: exact enough for a figure


def pool_map(func: Callable[[Any], Any], items: list) -> list:
    if len(items) < 2:
        return [func(item) for item in items]
    with ThreadPoolExecutor(min(WORKERS, len(items))) as pool:
        return list(pool.map(func, items))


def sha256_of(store: Store, rel: str, size: int, counter: ByteCounter | None = None) -> str:
    """The SHA-256 of file ``rel`` (``size`` bytes), read in blocks of :data:`BLOCK`."""
    digest = hashlib.sha256()
    position = 0
    while position < size:
        block = store.read_range(rel, position, min(size, position + BLOCK))
        if not block:
            raise CorruptFileError(f"{store.url_of(rel)}: shorter than the {size:,} bytes listed")
        digest.update(block)  # releases the GIL: the other files' threads hash meanwhile
        position += len(block)
        if counter is not None:
            counter.add(len(block))
    return digest.hexdigest()


def hash_files(store: Store, files: list[FileEntry], counter: ByteCounter | None = None) -> dict[str, str]:
    """rel -> SHA-256 of every file, :data:`WORKERS` files at once (largest first)."""
    ordered = sorted(files, key=lambda f: -f.size)
    digests = pool_map(lambda f: sha256_of(store, f.path, f.size, counter), ordered)
    return {f.path: d for f, d in zip(ordered, digests)}


def manifest_document(files: list[FileEntry], digests: dict[str, str]) -> dict:
    return {"version": MANIFEST_VERSION, "algorithm": ALGORITHM,
            "files": {f.path: {"size": f.size, "sha256": digests[f.path]}
                      for f in sorted(files, key=lambda f: natural_key(f.path))}}


def read_manifest(store: Store) -> dict[str, tuple[int, str]]:
    """rel -> (size, sha256) from the manifest at ``store``; CorruptFileError when it is not one."""
    doc = store.read_json(MANIFEST_FILE)
    entries = doc.get("files") if isinstance(doc, dict) else None
    if not isinstance(doc, dict) or doc.get("version") != MANIFEST_VERSION or doc.get("algorithm") != ALGORITHM \
            or not isinstance(entries, dict):
        raise CorruptFileError(f"not a version-{MANIFEST_VERSION} {ALGORITHM} ckptctl manifest")
    out = {}
    for rel, entry in entries.items():
        if not (isinstance(entry, dict) and isinstance(entry.get("size"), int)
                and isinstance(entry.get("sha256"), str)):
            raise CorruptFileError(f"entry {rel!r} has no size and sha256")
        out[str(rel)] = (entry["size"], entry["sha256"].lower())
    return out


def write_manifest_file(store: Store, doc: dict) -> None:
    """Write the manifest atomically: locally a temp sibling renamed over it; on object stores
    one PUT (atomic by itself)."""
    data = (json.dumps(doc, indent=1) + "\n").encode()
    local = store.local_path(MANIFEST_FILE)
    if local is None:
        store.write_bytes(MANIFEST_FILE, data)
        return
    temp = os.path.join(os.path.dirname(local), f".{MANIFEST_FILE}{TMP_INFIX}{os.getpid()}")
    try:
        write_local_file(temp, data, durable=True)
        os.replace(temp, local)
    finally:
        if os.path.exists(temp):
            os.unlink(temp)
    fsync_dir(os.path.dirname(local))


class ManifestCheck:
    """The SHA-256 of a component's files against the manifest that covers it, computed in
    background threads while the command does its work; :meth:`result` (before committing)
    raises :class:`CorruptCheckpointError` naming every file that differs or is missing.

    The manifest is the component directory's own (``verify --write-manifest`` given the
    component) or its step's (entries under ``<component>/``). :meth:`start` returns None when
    neither exists: nothing to check."""

    def __init__(self, store: Store, rels: dict[str, str], expected: dict[str, tuple[int, str]], manifest_url: str):
        self.store, self.manifest_url = store, manifest_url
        present = {f.path: f.size for f in store.walk()}
        self.problems = [f"{rels[key]}: missing" for key in sorted(expected, key=natural_key) if rels[key] not in present]
        self.problems += [f"{rels[key]}: {present[rels[key]]:,} bytes, the manifest says {expected[key][0]:,}"
                          for key in sorted(expected, key=natural_key)
                          if rels[key] in present and present[rels[key]] != expected[key][0]]
        todo = [(rels[key], expected[key]) for key in expected
                if rels[key] in present and present[rels[key]] == expected[key][0]]
        self._pool = ThreadPoolExecutor(max(1, min(WORKERS, len(todo))))
        self._futures = [(rel, digest, self._pool.submit(sha256_of, store, rel, size)) for rel, (size, digest) in todo]

    @classmethod
    def start(cls, parent: Store, comp: Component) -> "ManifestCheck | None":
        """Start checking ``comp`` (its path relative to ``parent``), or None without a manifest."""
        return cls.start_at(parent.child(comp.path))

    @classmethod
    def start_at(cls, store: Store) -> "ManifestCheck | None":
        """Start checking the files below ``store`` against the nearest manifest: its own, or one
        up to two directories above (a step's covers ``policy/`` and verl's ``policy/dist_ckpt/``);
        None when there is none."""
        where, prefix = store, ""
        for _ in range(3):
            try:
                expected = read_manifest(where)
            except NotFoundError:
                parent = where.parent()
                if parent.url == where.url:
                    break
                where, prefix = parent, f"{where.name}/{prefix}"
                continue
            mine = {key: entry for key, entry in expected.items() if key.startswith(prefix)}
            return cls(store, {key: key[len(prefix):] for key in mine}, mine, where.url_of(MANIFEST_FILE))
        return None

    def result(self) -> None:
        try:
            for rel, digest, future in self._futures:
                if future.result() != digest:
                    self.problems.append(f"{rel}: SHA-256 differs")
        finally:
            self._pool.shutdown(wait=True, cancel_futures=True)
        if self.problems:
            raise CorruptCheckpointError(f"{self.store.url}: differs from {self.manifest_url}: "
                                         + "; ".join(self.problems[:8])
                                         + (f" (+{len(self.problems) - 8} more)" if len(self.problems) > 8 else ""))

    def cancel(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)
