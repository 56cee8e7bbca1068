"""One storage abstraction over fsspec: local paths, ``file://``, ``s3://``, ``gs://``/``gcs://``.

A :class:`Store` is a root location plus the fsspec filesystem that serves it. Everything
above this module addresses files by POSIX-style paths *relative to the root*, so no caller
ever branches on the backend or pushes a URL through pathlib (which turns ``s3://b`` into
``s3:/b``). This module knows URLs and bytes, nothing about checkpoints.

Cloud filesystems are imported only for their own scheme: ``import s3fs`` and ``import gcsfs``
cost 0.3-0.5 s each, and the management commands should start in about 0.2 s.
"""

from __future__ import annotations

import os
import posixpath
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Iterable, Iterator

import fsspec

from ckptctl.errors import AccessDeniedError, BucketNotFoundError, NotFoundError, StorageError, UsageError

#: Objects per bulk-delete request: the S3 DeleteObjects maximum; gcsfs batches on its own.
DELETE_BATCH = 1000


@dataclass(frozen=True)
class FileEntry:
    """One file under a store's root, as a recursive listing reports it."""

    path: str  # relative to the store root, '/'-separated, no leading slash
    size: int
    mtime: datetime | None

    @property
    def name(self) -> str:
        return posixpath.basename(self.path)


def split_url(url: str) -> tuple[str, str]:
    """Return ``(protocol, path)``; protocol is ``file``, ``s3`` or ``gs``."""
    if "://" not in url:
        return "file", os.path.abspath(os.path.expanduser(url))
    scheme, rest = url.split("://", 1)
    scheme = scheme.lower()
    if scheme == "file":
        return "file", os.path.abspath(rest or "/")
    if scheme in ("s3", "s3a"):
        protocol = "s3"
    elif scheme in ("gs", "gcs"):
        protocol = "gs"
    else:
        raise UsageError(f"unsupported URL scheme '{scheme}://' in {url} (use a local path, s3:// or gs://)")
    rest = rest.strip("/")
    if not rest:
        raise UsageError(f"{url}: no bucket in URL")
    return protocol, rest


def _make_filesystem(protocol: str, endpoint_url: str | None) -> fsspec.AbstractFileSystem:
    if protocol == "file":
        return fsspec.filesystem("file")
    if protocol == "s3":
        import s3fs  # noqa: F401  (lazy: only for s3:// URLs)

        endpoint = endpoint_url or os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
        client_kwargs = {"endpoint_url": endpoint} if endpoint else {}
        # Few retries: a wrong endpoint or a dead emulator should fail in seconds, not minutes.
        return fsspec.filesystem(
            "s3",
            session=_fast_timestamp_session(),
            client_kwargs=client_kwargs,
            config_kwargs={"retries": {"max_attempts": 2, "mode": "standard"}, "connect_timeout": 5},
            use_listings_cache=False,
            skip_instance_cache=True,
        )
    # gs
    emulator = endpoint_url or os.environ.get("STORAGE_EMULATOR_HOST")
    if emulator:
        # gcsfs's experimental zonal/HNS path speaks gRPC+TLS, which emulators lack; it must be
        # switched off before gcsfs is first imported or every call retries forever.
        os.environ.setdefault("GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT", "false")
    import gcsfs  # noqa: F401  (lazy: only for gs:// URLs)

    kwargs: dict = {"use_listings_cache": False, "skip_instance_cache": True, "retries": 2}
    if endpoint_url:
        kwargs["endpoint_url"] = endpoint_url
    if emulator:
        kwargs["token"] = "anon"
    return fsspec.filesystem("gs", **kwargs)


def _fast_timestamp_session():
    """An aiobotocore session that parses ISO timestamps with fromisoformat.

    botocore parses every listed object's LastModified with dateutil, which was ~70% of the
    client CPU of listing a large tree; the aws CLI likewise swaps its timestamp parser.
    """
    from aiobotocore.session import AioSession
    from botocore.parsers import DEFAULT_TIMESTAMP_PARSER

    def parse(value):
        try:
            parsed = datetime.fromisoformat(value)
            return parsed if parsed.tzinfo else parsed.replace(tzinfo=timezone.utc)
        except (TypeError, ValueError):
            return DEFAULT_TIMESTAMP_PARSER(value)

    session = AioSession()
    session.get_component("response_parser_factory").set_parser_defaults(timestamp_parser=parse)
    return session


def _to_datetime(info: dict) -> datetime | None:
    for key in ("LastModified", "updated", "mtime", "last_modified", "timeCreated"):
        value = info.get(key)
        if value is None:
            continue
        if isinstance(value, datetime):
            return value.astimezone(timezone.utc) if value.tzinfo else value.replace(tzinfo=timezone.utc)
        if isinstance(value, (int, float)):
            return datetime.fromtimestamp(value, tz=timezone.utc)
        if isinstance(value, str):
            try:
                return datetime.fromisoformat(value.replace("Z", "+00:00"))
            except ValueError:
                continue
    return None


def _describe(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    return text[:300]


@contextmanager
def translate_errors(url: str) -> Iterator[None]:
    """Turn the zoo of backend exceptions into ckptctl's one-line errors."""
    try:
        yield
    except (NotFoundError, AccessDeniedError, StorageError, UsageError):
        raise
    except FileNotFoundError as exc:
        raise NotFoundError(f"{url}: not found") from exc
    except PermissionError as exc:
        raise AccessDeniedError(f"{url}: access denied ({_describe(exc)})") from exc
    except IsADirectoryError as exc:
        raise UsageError(f"{url}: is a directory") from exc
    except NotADirectoryError as exc:
        raise UsageError(f"{url}: is not a directory") from exc
    except Exception as exc:  # botocore/aiohttp/google errors have no common base
        name = type(exc).__name__
        text = _describe(exc)
        lowered = f"{name} {text}".lower()
        if "credential" in lowered:  # also botocore's NoCredentialsError
            raise AccessDeniedError(f"{url}: no credentials found ({text})") from exc
        if any(k in lowered for k in ("accessdenied", "access denied", "forbidden", "403", "401",
                                       "invalidaccesskeyid", "signaturedoesnotmatch", "unauthorized")):
            raise AccessDeniedError(f"{url}: access denied ({text})") from exc
        if any(k in lowered for k in ("nosuchbucket", "nosuchkey", "not found", "404")):
            raise NotFoundError(f"{url}: not found ({text})") from exc
        if any(k in lowered for k in ("connect", "endpoint", "timeout", "resolve")):
            raise StorageError(f"{url}: cannot reach the store ({name}: {text})") from exc
        raise StorageError(f"{url}: {name}: {text}") from exc


class Store:
    """A root location (local directory, S3 or GCS prefix) and the filesystem behind it."""

    def __init__(self, url: str, *, endpoint_url: str | None = None,
                 _fs: fsspec.AbstractFileSystem | None = None):
        self.protocol, self.root = split_url(url)
        self.endpoint_url = endpoint_url
        self.fs = _fs if _fs is not None else _make_filesystem(self.protocol, endpoint_url)

    # -- naming ---------------------------------------------------------------------------
    @property
    def url(self) -> str:
        return self.root if self.protocol == "file" else f"{self.protocol}://{self.root}"

    @property
    def is_local(self) -> bool:
        return self.protocol == "file"

    @property
    def bucket(self) -> str | None:
        return None if self.is_local else self.root.split("/", 1)[0]

    def full_path(self, rel: str = "") -> str:
        rel = rel.strip("/")
        return posixpath.join(self.root, rel) if rel else self.root

    def url_of(self, rel: str = "") -> str:
        path = self.full_path(rel)
        return path if self.is_local else f"{self.protocol}://{path}"

    def child(self, rel: str) -> "Store":
        """A store rooted at ``rel`` below this one, sharing the same filesystem."""
        return Store(self.url_of(rel), endpoint_url=self.endpoint_url, _fs=self.fs)

    def parent(self) -> "Store":
        head = posixpath.dirname(self.root.rstrip("/"))
        if not head or (not self.is_local and "/" not in self.root.strip("/")):
            return self
        url = head if self.is_local else f"{self.protocol}://{head}"
        return Store(url, endpoint_url=self.endpoint_url, _fs=self.fs)

    @property
    def name(self) -> str:
        return posixpath.basename(self.root.rstrip("/"))

    def relative(self, full_path: str) -> str:
        """Path of ``full_path`` (as the filesystem reports it) relative to the root."""
        full = full_path.rstrip("/")
        if self.protocol != "file":
            full = full.split("://", 1)[-1]
        root = self.root.rstrip("/")
        if full == root:
            return ""
        if not full.startswith(root + "/"):
            raise StorageError(f"{full_path} is outside {self.url}")
        return full[len(root) + 1:]

    def local_path(self, rel: str = "") -> str | None:
        """The OS path of a local file (for memory-mapping), or None on object stores."""
        return self.full_path(rel) if self.is_local else None

    # -- reading --------------------------------------------------------------------------
    def walk(self) -> list[FileEntry]:
        """Every file below the root, with size and modification time.

        One recursive listing: on S3 a single paginated ListObjectsV2 without delimiter (one
        request per 1000 objects), on GCS one paginated objects.list, locally one os.walk.
        Raises NotFoundError when the root does not exist (or is an empty prefix).
        """
        with translate_errors(self.url):
            if self.is_local:
                return self._walk_local()
            if not self.root.strip("/").count("/"):
                # Bucket root: an empty bucket is valid, a missing one is not.
                self._check_bucket()
            try:
                found = self.fs.find(self.root, detail=True, withdirs=False)
            except FileNotFoundError:
                self._check_bucket()
                raise
            entries = []
            for full, info in found.items():
                if info.get("type") == "directory" or full.endswith("/"):
                    continue
                rel = self.relative(full)
                if not rel:  # the root itself is an object, not a prefix
                    continue
                entries.append(FileEntry(rel, int(info.get("size") or 0), _to_datetime(info)))
            if not entries and self.root.strip("/").count("/"):
                self._check_bucket()
                raise NotFoundError(f"{self.url}: not found (no objects under this prefix)")
            return sorted(entries, key=lambda e: e.path)

    def _check_bucket(self) -> None:
        bucket = self.bucket
        try:
            exists = self.fs.exists(bucket)
        except Exception:
            exists = True  # could not tell: let the listing itself report the problem
        if not exists:
            raise BucketNotFoundError(f"{self.protocol}://{bucket}: bucket not found")

    def _walk_local(self) -> list[FileEntry]:
        root = self.root
        if not os.path.exists(root):
            raise FileNotFoundError(root)
        if not os.path.isdir(root):
            raise NotADirectoryError(root)
        if not os.access(root, os.R_OK | os.X_OK):
            raise PermissionError(root)
        entries = []

        def on_error(exc: OSError) -> None:
            raise exc

        prefix_len = len(os.path.join(root, ""))  # slicing beats os.path.relpath per file
        for dirpath, dirnames, filenames in os.walk(root, onerror=on_error):
            dirnames.sort()
            for filename in filenames:
                full = os.path.join(dirpath, filename)
                try:
                    st = os.stat(full)
                except FileNotFoundError:
                    continue  # removed while we listed
                rel = full[prefix_len:].replace(os.sep, "/")
                entries.append(FileEntry(rel, st.st_size, datetime.fromtimestamp(st.st_mtime, tz=timezone.utc)))
        return sorted(entries, key=lambda e: e.path)

    def exists(self, rel: str = "") -> bool:
        with translate_errors(self.url_of(rel)):
            return self.fs.exists(self.full_path(rel))

    def is_dir(self, rel: str = "") -> bool:
        with translate_errors(self.url_of(rel)):
            return self.fs.isdir(self.full_path(rel))

    def is_file(self, rel: str = "") -> bool:
        with translate_errors(self.url_of(rel)):
            return self.fs.isfile(self.full_path(rel))

    def size(self, rel: str) -> int:
        with translate_errors(self.url_of(rel)):
            return int(self.fs.size(self.full_path(rel)))

    def read_bytes(self, rel: str) -> bytes:
        """A whole (small) file. Use :meth:`read_range` or :meth:`open` for large ones."""
        with translate_errors(self.url_of(rel)):
            if self.protocol == "s3":
                # One GET: s3fs would otherwise HEAD first to decide on a concurrent download.
                return self.fs.cat_file(self.full_path(rel), max_concurrency=1)
            return self.fs.cat_file(self.full_path(rel))

    def read_text(self, rel: str) -> str:
        return self.read_bytes(rel).decode("utf-8", errors="replace")

    def read_range(self, rel: str, start: int, end: int) -> bytes:
        """Bytes ``[start, end)`` of a file: one ranged GET on object stores."""
        if end <= start:
            return b""  # s3fs would send "bytes=s-(s-1)", which S3 ignores and answers whole
        with translate_errors(self.url_of(rel)):
            return self.fs.cat_file(self.full_path(rel), start=start, end=end)

    def open(self, rel: str, mode: str = "rb", **kwargs):
        with translate_errors(self.url_of(rel)):
            return self.fs.open(self.full_path(rel), mode, **kwargs)

    # -- writing --------------------------------------------------------------------------
    def write_bytes(self, rel: str, data: bytes) -> None:
        with translate_errors(self.url_of(rel)):
            if self.is_local:
                os.makedirs(os.path.dirname(self.full_path(rel)), exist_ok=True)
            self.fs.pipe_file(self.full_path(rel), data)

    def delete_many(self, rels: Iterable[str]) -> int:
        """Delete files in batched requests; returns how many were deleted.

        S3: DeleteObjects with up to 1000 keys a request; GCS: gcsfs's batch API. Locally,
        directories left empty by the deletion are removed too, so a deleted step vanishes
        as it does on an object store.
        """
        paths = [self.full_path(r) for r in rels]
        if not paths:
            return 0
        with translate_errors(self.url):
            if self.is_local:
                return self._delete_local(paths)
            if self.protocol == "s3":
                return self._delete_s3(paths)
            self.fs.rm(paths)  # gcsfs groups these into batch requests itself
        return len(paths)

    def _delete_s3(self, paths: list[str]) -> int:
        """DeleteObjects, 1000 keys a request, checking per-key errors that s3fs would ignore."""
        from fsspec.asyn import sync

        by_bucket: dict[str, list[str]] = {}
        for path in paths:
            bucket, key = path.split("/", 1)
            by_bucket.setdefault(bucket, []).append(key)
        deleted = 0
        for bucket, keys in by_bucket.items():
            for start in range(0, len(keys), DELETE_BATCH):
                batch = keys[start:start + DELETE_BATCH]
                out = sync(self.fs.loop, self.fs._call_s3, "delete_objects", Bucket=bucket,
                           Delete={"Objects": [{"Key": k} for k in batch], "Quiet": True})
                errors = out.get("Errors") or []
                if errors:
                    shown = ", ".join(e.get("Key", "?") for e in errors[:3])
                    codes = {e.get("Code") for e in errors}
                    cls = AccessDeniedError if "AccessDenied" in codes else StorageError
                    raise cls(f"{self.url}: {len(errors)} of {len(batch)} deletions refused "
                              f"({', '.join(sorted(c for c in codes if c))}: {shown})")
                deleted += len(batch)
        self.fs.invalidate_cache()
        return deleted

    def _delete_local(self, paths: list[str]) -> int:
        parents = set()
        for path in paths:
            try:
                os.remove(path)
            except FileNotFoundError:
                pass  # already gone: the same as on an object store
            parents.add(os.path.dirname(path))
        root = self.root.rstrip("/")
        # Deepest first, so a parent is tried after its children.
        for directory in sorted(parents, key=len, reverse=True):
            while directory.startswith(root + "/"):
                try:
                    os.rmdir(directory)
                except OSError:
                    break  # not empty, or gone already
                directory = os.path.dirname(directory)
        return len(paths)


def open_store(url: str, *, endpoint_url: str | None = None) -> Store:
    """The one way to get a :class:`Store` from a user-given path or URL."""
    if not url or not str(url).strip():
        raise UsageError("empty path")
    return Store(str(url).strip(), endpoint_url=endpoint_url)
