"""One storage abstraction over fsspec: local paths, ``file://``, ``s3://``, ``gs://``/``gcs://``.

A :class:`Store` is a root location plus the fsspec filesystem that serves it. Everything
above this module addresses files by POSIX-style paths *relative to the root*, so no caller
ever branches on the backend or pushes a URL through pathlib (which turns ``s3://b`` into
``s3:/b``). This module knows URLs and bytes, nothing about checkpoints.

Cloud filesystems are imported only for their own scheme: ``import s3fs`` and ``import gcsfs``
cost 0.3-0.5 s each, and the management commands should start in about 0.2 s.

Every request to a cloud store is bounded (:class:`StoreLimits`): a refused or unreachable
endpoint fails in seconds and a store that accepts connections but never answers fails within
``attempts x read_timeout`` plus a short backoff (under a minute by default), for reads,
listings and deletions alike.

Transient errors are retried per request, up to ``attempts`` tries in all, waiting
``uniform(0, min(20 s, base x 2**(n-1)))`` before try ``n + 1`` (exponential backoff with full
jitter; ``base`` is CKPTCTL_STORE_BACKOFF_BASE, 1 s by default):

* S3: whatever botocore's "standard" retry mode retries -- HTTP 500/502/503/504, throttling
  (``SlowDown``, 429 ...), a connection refused, reset or timed out before the answer, and a
  ``200 OK`` whose body is an ``<Error>`` (CompleteMultipartUpload: botocore turns it into a
  500). botocore's own conditions decide, with ckptctl's backoff (:func:`_s3_retry_handler`).
  On top (:func:`_bounded_s3_class`): a download whose body breaks off (connection reset in
  the middle of a GET: :meth:`Store.read_bytes`, :meth:`Store.read_range`) is retried -- botocore has already returned then, and s3fs's own retry
  loop is off (it would multiply the attempts of a frozen store) -- and a CompleteMultipartUpload
  whose retry is answered ``NoSuchUpload`` or a server error counts as done when the object is
  there with the ETag of exactly these parts (the first try completed it, its answer was lost
  or came after the read timeout).
* GCS: gcsfs's own conditions (``gcsfs.retry.is_retriable``: 5xx, 408, 429, aiohttp errors,
  a broken body included) with ckptctl's attempts and backoff (:func:`_bounded_gcs_class`).

S3 multipart uploads (the export writer's and s3fs's ``put_file``) are begun with a CRC-32
checksum and completed with each part's (:data:`MULTIPART_CHECKSUM`), as the aws CLI does. The
store checks each part's bytes against its checksum and answers the completion with the
checksum of the parts' checksums: every completion's answer says in
:data:`UPLOAD_CONFIRMED_FIELD` whether the object it assembled is exactly the parts sent
(:func:`multipart_checksum_matches`).

Only requests that may be repeated are: reads, listings, deletions, whole-object and part
uploads (the same bytes again), a resumable upload's chunk (the same range again) and
CompleteMultipartUpload (the same part list again).
"""

from __future__ import annotations

import asyncio
import hashlib
import io
import json
import os
import posixpath
import random
import re
import urllib.parse
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Iterable, Iterator

import fsspec

from ckptctl.errors import (AccessDeniedError, BucketNotFoundError, CkptctlError, CorruptFileError,
                            NotACheckpointError, NotFoundError, PartialDeleteError, StorageError, UsageError)

#: Objects per bulk-delete request: the S3 DeleteObjects maximum.
DELETE_BATCH = 1000
#: Objects per GCS batch request (the JSON API's maximum).
GCS_DELETE_BATCH = 100

#: Environment variables bounding every request to a cloud store (README "Paths and credentials").
CONNECT_TIMEOUT_ENV = "CKPTCTL_STORE_CONNECT_TIMEOUT"
READ_TIMEOUT_ENV = "CKPTCTL_STORE_READ_TIMEOUT"
ATTEMPTS_ENV = "CKPTCTL_STORE_ATTEMPTS"
#: Base of the exponential backoff between tries of one request (seconds; tests make it short).
BACKOFF_BASE_ENV = "CKPTCTL_STORE_BACKOFF_BASE"
#: The longest wait between two tries (seconds), botocore's own cap.
MAX_BACKOFF = 20.0
#: How often a CompleteMultipartUpload retried into NoSuchUpload looks for the object the first
#: try may still be assembling (backoff between looks: about 30 s in all by default).
COMPLETION_LOOKS = 5
#: Checksum of every multipart upload (what the aws CLI asks for): each part's CRC-32, checked
#: by the store as the part arrives, and the object's checksum composed of them. Left to the
#: store's default (a full-object CRC-64), completing a large object re-reads all of it: the S3
#: test server took 18 s to complete a 1.42 GB upload instead of 6.
MULTIPART_CHECKSUM = "CRC32"
PART_CHECKSUM_FIELD = "ChecksumCRC32"
#: Added to every CompleteMultipartUpload answer: True when the store confirmed that the object
#: is exactly the parts sent (see :meth:`_BoundedS3._confirmed`).
UPLOAD_CONFIRMED_FIELD = "CkptctlConfirmed"


@dataclass(frozen=True)
class StoreLimits:
    """How long one request may take and how often it is tried.

    Defaults suit a cloud VM: connecting takes milliseconds there, so 5 s means the endpoint is
    unreachable; the first byte of an answer (a listing page, a 1000-key DeleteObjects) comes in
    well under a second, so 15 s of silence means the store is stuck; 3 attempts ride out a
    dropped connection or throttling. A frozen store fails in about 3 x 15 s + backoff (< 1 min).
    Between two tries of a request: :meth:`backoff`, on average 0.5 s then 1 s by default.
    """

    connect_timeout: float = 5.0
    read_timeout: float = 15.0
    attempts: int = 3
    backoff_base: float = 1.0

    @classmethod
    def from_env(cls) -> "StoreLimits":
        def number(name: str, default: float, kind: type) -> float:
            raw = os.environ.get(name, "").strip()
            if not raw:
                return default
            try:
                value = kind(raw)
            except ValueError:
                value = 0
            if value <= 0:
                raise UsageError(f"{name}={raw!r}: expected a positive {'integer' if kind is int else 'number'}")
            return value

        return cls(number(CONNECT_TIMEOUT_ENV, cls.connect_timeout, float),
                   number(READ_TIMEOUT_ENV, cls.read_timeout, float),
                   int(number(ATTEMPTS_ENV, cls.attempts, int)),
                   number(BACKOFF_BASE_ENV, cls.backoff_base, float))

    def backoff(self, tries: int) -> float:
        """Seconds to wait after the ``tries``-th failed try of a request (1 for the first):
        exponential backoff with full jitter, ``uniform(0, min(MAX_BACKOFF, base * 2**(tries-1)))``."""
        return random.uniform(0.0, min(MAX_BACKOFF, self.backoff_base * 2 ** (max(tries, 1) - 1)))

    def describe(self) -> str:
        return (f"{self.attempts} attempt{'s' if self.attempts != 1 else ''}, {self.connect_timeout:g} s to connect, "
                f"{self.read_timeout:g} s to answer; see {READ_TIMEOUT_ENV}")


_DIGIT_RUN = re.compile(r"\d+")


def _number_key(match: re.Match) -> str:
    digits = match.group().lstrip("0") or "0"
    return f"\0{chr(len(digits))}{digits}"  # shorter numbers first, then digit by digit


def natural_key(path: str) -> str:
    """Sort key that orders numbers by value: ``rank_2`` before ``rank_10``, ``__2_0`` before ``__10_0``.

    The one order in which ckptctl lists files, ranks and steps. A string, not a tuple of parts,
    so sorting stays cheap: ~40 ms for 9,300 objects, whose S3 listing takes ~1.6 s.
    """
    return _DIGIT_RUN.sub(_number_key, path)


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
    """Return ``(protocol, path)``; protocol is ``file``, ``s3`` or ``gs``.

    ``file://`` URLs are percent-decoded (``file:///runs/my%20run`` is ``/runs/my run``), with an
    empty or ``localhost`` host; object-store keys are taken as written.
    """
    if "://" not in url:
        return "file", os.path.abspath(os.path.expanduser(url))
    scheme, rest = url.split("://", 1)
    scheme = scheme.lower()
    if scheme == "file":
        if rest.startswith("localhost/"):
            rest = rest[len("localhost"):]
        return "file", os.path.abspath(urllib.parse.unquote(rest) or "/")
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


def check_endpoint_url(value: str, source: str = "--endpoint-url", *, bare_host: bool = False) -> str:
    """``value`` if it is an ``http(s)://host[:port]`` URL, else a UsageError naming ``source``.

    ``bare_host`` also accepts ``host:port`` (STORAGE_EMULATOR_HOST, as gcsfs reads it).
    """
    text = str(value).strip()
    parsed = urllib.parse.urlsplit(text if "://" in text or not bare_host else f"http://{text}")
    try:
        ok = parsed.scheme in ("http", "https") and bool(parsed.hostname) and (parsed.port is None or parsed.port > 0)
    except ValueError:  # a port that is not a number
        ok = False
    if not ok:
        raise UsageError(f"{source}: invalid endpoint URL {text!r} (expected http://host:port or https://host)")
    return text


def _make_filesystem(protocol: str, endpoint_url: str | None) -> fsspec.AbstractFileSystem:
    if protocol == "file":
        return fsspec.filesystem("file")
    limits = StoreLimits.from_env()
    if protocol == "s3":
        endpoint = endpoint_url
        for name in ("AWS_ENDPOINT_URL_S3", "AWS_ENDPOINT_URL"):
            if not endpoint and os.environ.get(name):
                endpoint = check_endpoint_url(os.environ[name], name)
        client_kwargs = {"endpoint_url": endpoint} if endpoint else {}
        session = _fast_timestamp_session()
        # botocore's standard conditions decide what is retried, with our attempts and backoff:
        # the handler registered on the session (inherited by its clients) answers first; the
        # client's own standard handler, held to one attempt, never asks for a retry itself.
        session.register("needs-retry.s3", _s3_retry_handler(limits).needs_retry, unique_id="ckptctl-retry-s3")
        fs = _bounded_s3_class()(
            session=session,
            client_kwargs=client_kwargs,
            config_kwargs={"retries": {"total_max_attempts": 1, "mode": "standard"},
                           "connect_timeout": limits.connect_timeout, "read_timeout": limits.read_timeout},
            use_listings_cache=False,
            skip_instance_cache=True,
        )
        # botocore retries each request already; s3fs's own loop (5 more rounds of botocore's
        # attempts) would turn a frozen store's 45 s into minutes.
        fs.retries = 1
        fs.ckptctl_limits = limits
        return fs
    # gs
    emulator = endpoint_url
    if not emulator and os.environ.get("STORAGE_EMULATOR_HOST"):
        emulator = check_endpoint_url(os.environ["STORAGE_EMULATOR_HOST"], "STORAGE_EMULATOR_HOST", bare_host=True)
    if emulator:
        # gcsfs's experimental zonal/HNS path speaks gRPC+TLS, which emulators lack; it must be
        # switched off before gcsfs is first imported or every call retries forever.
        os.environ.setdefault("GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT", "false")
    import aiohttp

    kwargs: dict = {"use_listings_cache": False, "skip_instance_cache": True,
                    "requests_timeout": aiohttp.ClientTimeout(total=None, sock_connect=limits.connect_timeout,
                                                              sock_read=limits.read_timeout)}
    if endpoint_url:
        kwargs["endpoint_url"] = endpoint_url
    if emulator:
        kwargs["token"] = "anon"
    return _bounded_gcs_class(limits)(**kwargs)


_GCS_CLASSES: dict[StoreLimits, type] = {}


def _bounded_gcs_class(limits: StoreLimits) -> type:
    """gcsfs's filesystem with ``limits.attempts`` tries per request and ckptctl's backoff.

    gcsfs fixes its retry count when the class is defined (6 tries, backing off up to 32 s: 50 s
    and more before an unreachable endpoint is reported), and its ``retries`` argument does not
    reach that decorator, so the request method is re-wrapped here: gcsfs's own conditions
    (:func:`gcsfs.retry.is_retriable`; 404 and "requester pays" never retried), our backoff.
    """
    cls = _GCS_CLASSES.get(limits)
    if cls is None:
        import functools

        import gcsfs  # lazy: only for gs:// URLs
        from gcsfs.retry import is_retriable

        base = gcsfs.GCSFileSystem
        request = base._request.__wrapped__

        @functools.wraps(request)
        async def _request(self, *args, **kwargs):
            tries = 0
            while True:
                tries += 1
                try:
                    return await request(self, *args, **kwargs)
                except Exception as exc:
                    if (tries >= limits.attempts or _status_of(exc) == 404 or "requester pays" in str(exc)
                            or not is_retriable(exc)):
                        raise
                await asyncio.sleep(limits.backoff(tries))

        cls = type("BoundedGCSFileSystem", (base,), {"_request": _request, "retries": limits.attempts})
        _GCS_CLASSES[limits] = cls
    return cls


def _status_of(exc: BaseException) -> int | None:
    for name in ("code", "status"):
        value = getattr(exc, name, None)
        if isinstance(value, int):
            return value
    return None


def _s3_retry_handler(limits: StoreLimits):
    """botocore's standard retry handler (its retryable conditions, retry quota and metadata)
    with ``limits.attempts`` tries and :meth:`StoreLimits.backoff` between them."""
    from aiobotocore.retries.standard import AioRetryHandler, AioRetryPolicy, AioStandardRetryConditions
    from botocore.retries import quota
    from botocore.retries.standard import BaseRetryBackoff, RetryEventAdapter, RetryQuotaChecker

    class Backoff(BaseRetryBackoff):
        def delay_amount(self, context) -> float:
            return limits.backoff(context.attempt_number)

    return AioRetryHandler(
        retry_policy=AioRetryPolicy(retry_checker=AioStandardRetryConditions(max_attempts=limits.attempts),
                                    retry_backoff=Backoff()),
        retry_event_adapter=RetryEventAdapter(),
        retry_quota=RetryQuotaChecker(quota.RetryQuota()),
    )


def _broken_body(exc: BaseException) -> bool:
    """Whether ``exc`` is a download whose body broke off after botocore returned the answer
    (connection reset or closed mid-body): worth another GET. Timeouts are not (a frozen store
    has had its tries already)."""
    import http.client

    from botocore.exceptions import IncompleteReadError, ResponseStreamingError

    kinds: tuple[type, ...] = (http.client.IncompleteRead, IncompleteReadError, ResponseStreamingError)
    try:
        from aiohttp import ClientPayloadError
        kinds += (ClientPayloadError,)
    except ImportError:  # pragma: no cover
        pass
    seen = exc
    while seen is not None:
        if isinstance(seen, TimeoutError) or "timeout" in type(seen).__name__.lower():
            return False
        seen = seen.__cause__ or seen.__context__
    return isinstance(exc, kinds)


def _multipart_etag(parts: list[dict]) -> str | None:
    """The ETag S3 gives the object completed from ``parts`` (MD5 of the parts' MD5s, "-N")."""
    try:
        digests = b"".join(bytes.fromhex(str(p["ETag"]).strip('"')) for p in parts)
    except (KeyError, ValueError):
        return None
    return f'"{hashlib.md5(digests).hexdigest()}-{len(parts)}"'


def _client_error_answer(exc: BaseException | None, client_error: type) -> tuple[str | None, int | None]:
    """The S3 error code and HTTP status of ``exc`` or of the botocore ClientError it was
    translated from; ``(None, None)`` where the store gave no answer (a timeout, a reset)."""
    while exc is not None:
        if isinstance(exc, client_error):
            return (exc.response.get("Error", {}).get("Code"),
                    exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode"))
        exc = exc.__cause__ or exc.__context__
    return None, None


def _completion_may_be_done(exc: BaseException, client_error: type) -> bool:
    """Whether a CompleteMultipartUpload that failed with ``exc`` (after its retries) may still
    have completed: its retry found the upload gone (NoSuchUpload), or the store answered a
    server error -- a retry racing the first try, still assembling a large object, gets one
    from some stores (the S3 test server answers 500 there). Not a client error (the part list
    is wrong) and not a store that stopped answering (looking would outlast the bounded tries)."""
    code, status = _client_error_answer(exc, client_error)
    return code == "NoSuchUpload" or (status is not None and status >= 500)


def _crc32_base64(data: bytes | bytearray | memoryview) -> str:
    """A part's CRC-32 as S3 wants it, computed with ISA-L (~6x zlib's speed, which botocore
    would otherwise use on every uploaded byte)."""
    import base64

    from isal.isal_zlib import crc32

    return base64.b64encode(crc32(data).to_bytes(4, "big")).decode("ascii")


def multipart_checksum_matches(answered: str | None, part_checksums: list[str | None]) -> bool:
    """Whether ``answered`` (a CompleteMultipartUpload's ``ChecksumCRC32``) is the composite
    checksum of ``part_checksums`` (each part's, base64, in part order): the CRC-32 of their
    concatenated raw values, with or without S3's ``-<part count>`` suffix. False when any is
    missing (a store without checksums confirms nothing)."""
    import base64
    import binascii

    if not answered or not part_checksums or not all(part_checksums):
        return False
    value, _, count = answered.partition("-")
    if count and count != str(len(part_checksums)):
        return False
    try:
        raw = b"".join(base64.b64decode(c, validate=True) for c in part_checksums)
    except (binascii.Error, ValueError):
        return False
    return value == _crc32_base64(raw)


_S3_CLASS: type | None = None


def _bounded_s3_class() -> type:
    """s3fs's filesystem plus the two retries botocore cannot do (see the module doc), its
    multipart uploads checksummed part by part (:data:`MULTIPART_CHECKSUM`)."""
    global _S3_CLASS
    if _S3_CLASS is not None:
        return _S3_CLASS
    import s3fs  # lazy: only for s3:// URLs
    from botocore.exceptions import ClientError
    from fsspec.asyn import sync_wrapper

    class _BoundedS3(s3fs.S3FileSystem):
        ckptctl_limits = StoreLimits()

        async def _cat_file(self, path, *args, **kwargs):
            tries = 0
            while True:
                tries += 1
                try:
                    return await super()._cat_file(path, *args, **kwargs)
                except Exception as exc:
                    if tries >= self.ckptctl_limits.attempts or not _broken_body(exc):
                        raise
                await asyncio.sleep(self.ckptctl_limits.backoff(tries))

        async def _call_s3(self, method, *akwarglist, **kwargs):
            merged = {k: v for d in akwarglist for k, v in d.items()} | kwargs
            if (method in ("create_multipart_upload", "upload_part") and "ChecksumAlgorithm" not in merged
                    and await self._checksums_wanted(merged.get("Bucket"))):
                kwargs["ChecksumAlgorithm"] = MULTIPART_CHECKSUM
                body = merged.get("Body")
                if method == "upload_part" and PART_CHECKSUM_FIELD not in merged:
                    if isinstance(body, (bytes, bytearray, memoryview)):
                        kwargs[PART_CHECKSUM_FIELD] = _crc32_base64(body)
                    elif isinstance(body, io.BytesIO):  # from where it will be read
                        with body.getbuffer() as view:
                            kwargs[PART_CHECKSUM_FIELD] = _crc32_base64(view[body.tell():])
            if method == "upload_part":
                out = await super()._call_s3(method, *akwarglist, **kwargs)
                if out.get(PART_CHECKSUM_FIELD):
                    self._part_checksums[(merged["UploadId"], merged["PartNumber"])] = out[PART_CHECKSUM_FIELD]
                return out
            if method == "abort_multipart_upload":
                self._forget_parts(merged.get("UploadId"))
            if method != "complete_multipart_upload":
                return await super()._call_s3(method, *akwarglist, **kwargs)
            parts = self._with_checksums(merged)
            if merged.get("MultipartUpload"):
                kwargs["MultipartUpload"] = {**merged["MultipartUpload"], "Parts": parts}
            try:
                out = await super()._call_s3(method, *akwarglist, **kwargs)
                self._forget_parts(merged.get("UploadId"))
                return await self._confirmed(out, merged, parts)
            except Exception as exc:  # s3fs raises botocore's ClientError translated (FileNotFoundError)
                if not _completion_may_be_done(exc, ClientError):
                    raise
                # A retry after the completion's answer was lost (or timed out) finds the upload
                # gone, or races the first try: done if the object holds exactly these parts
                # (its multipart ETag says so). The first try may still be assembling a large
                # object (a store can take many seconds), so the object is looked for a few
                # times before giving up.
                expected = _multipart_etag(parts)
                if expected is None:
                    raise
                for look in range(1, COMPLETION_LOOKS + 1):
                    try:
                        head = await super()._call_s3("head_object", Bucket=merged["Bucket"], Key=merged["Key"],
                                                      ChecksumMode="ENABLED")
                    except Exception:
                        head = None
                    if head is not None and head.get("ETag") == expected:
                        self._forget_parts(merged.get("UploadId"))
                        found = {"Bucket": merged["Bucket"], "Key": merged["Key"], "ETag": head["ETag"],
                                 "VersionId": head.get("VersionId"),
                                 "ResponseMetadata": head.get("ResponseMetadata", {})}
                        if head.get(PART_CHECKSUM_FIELD):
                            found[PART_CHECKSUM_FIELD] = head[PART_CHECKSUM_FIELD]
                        return await self._confirmed(found, merged, parts, looked=True)
                    if look < COMPLETION_LOOKS:
                        await asyncio.sleep(self.ckptctl_limits.backoff(look + 1))
                raise

        async def _confirmed(self, out: dict, merged: dict, parts: list[dict], looked: bool = False) -> dict:
            """A completion's answer with :data:`UPLOAD_CONFIRMED_FIELD`: whether the object's
            checksum is the composite of the parts' (:func:`multipart_checksum_matches`). S3
            answers the completion with it; some stores (the S3 test server) do not: one HEAD
            asks for it, unless ``out`` already is such a HEAD's answer (``looked``)."""
            checksums = [p.get(PART_CHECKSUM_FIELD) for p in parts]
            answered = out.get(PART_CHECKSUM_FIELD)
            if not answered and not looked and checksums and all(checksums):
                try:
                    head = await super()._call_s3("head_object", Bucket=merged["Bucket"], Key=merged["Key"],
                                                  ChecksumMode="ENABLED")
                except Exception:
                    head = {}
                if out.get("ETag") and head.get("ETag") == out["ETag"]:
                    answered = head.get(PART_CHECKSUM_FIELD)
            return {**out, UPLOAD_CONFIRMED_FIELD: multipart_checksum_matches(answered, checksums)}

        async def _checksums_wanted(self, bucket: str | None) -> bool:
            """False where the user told botocore to send checksums only when required
            (``AWS_REQUEST_CHECKSUM_CALCULATION=when_required``, for a store without them)."""
            await self.set_session()
            client = await self.get_s3(bucket)
            return getattr(client.meta.config, "request_checksum_calculation", None) != "when_required"

        @property
        def _part_checksums(self) -> dict:
            """(UploadId, PartNumber) -> the part's checksum, as its upload_part answered it."""
            if "_ckptctl_part_checksums" not in self.__dict__:
                self._ckptctl_part_checksums = {}
            return self._ckptctl_part_checksums

        def _forget_parts(self, upload_id: str | None) -> None:
            for key in [k for k in self._part_checksums if k[0] == upload_id]:
                del self._part_checksums[key]

        def _with_checksums(self, merged: dict) -> list[dict]:
            """The completion's part list, each part with the checksum its upload answered (an
            upload begun with a checksum algorithm must name every part's; s3fs's put_file
            sends only the ETags)."""
            parts = list((merged.get("MultipartUpload") or {}).get("Parts") or [])
            upload_id = merged.get("UploadId")
            return [part if PART_CHECKSUM_FIELD in part or (upload_id, part.get("PartNumber")) not in self._part_checksums
                    else {**part, PART_CHECKSUM_FIELD: self._part_checksums[(upload_id, part["PartNumber"])]}
                    for part in parts]

        # s3fs binds its sync call_s3 (used by its file objects) to its own _call_s3
        call_s3 = sync_wrapper(_call_s3)

    _S3_CLASS = _BoundedS3
    return _S3_CLASS


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


#: An HTTP status in an error text: 4xx standing alone, not part of a port (":40157") or another number.
_STATUS_RE = re.compile(r"(?<![\d:./])(4\d\d)(?!\d)")


def _status(text: str) -> str | None:
    m = _STATUS_RE.search(text)
    return m.group(1) if m else None


def _describe(exc: BaseException) -> str:
    if not str(exc).strip():  # fsspec's FSTimeoutError says nothing: the error it wraps does
        inner = exc.__cause__ or exc.__context__
        return f"{type(inner).__name__}: {_describe(inner)}" if inner is not None else type(exc).__name__
    return str(exc).strip().splitlines()[0][:300]


def translate_error(url: str, exc: BaseException) -> CkptctlError:
    """The ckptctl error (and so the exit code) for a backend exception: the one mapping."""
    if isinstance(exc, CkptctlError):
        return exc
    if isinstance(exc, FileNotFoundError):
        return NotFoundError(f"{url}: not found")
    if isinstance(exc, PermissionError):
        return AccessDeniedError(f"{url}: access denied ({_describe(exc)})")
    if isinstance(exc, IsADirectoryError):
        return NotACheckpointError(f"{url}: is a directory, not a file")
    if isinstance(exc, NotADirectoryError):
        return NotACheckpointError(f"{url}: is a file, not a directory")
    # botocore/aiohttp/google errors have no common base
    name = type(exc).__name__
    text = _describe(exc)
    if name == "ParamValidationError":  # botocore refused the request before sending it
        detail = [ln.strip() for ln in str(exc).splitlines()[1:] if ln.strip()] or [text]
        bad_bucket = re.match(r'Invalid bucket name "([^"]*)"', detail[0])
        if bad_bucket:  # the URL's fault, not the store's
            return UsageError(f"{url}: invalid bucket name {bad_bucket.group(1)!r} "
                              "(only letters, digits, '.', '-' and '_')")
        return StorageError(f"{url}: {detail[0][:300]}")
    lowered = f"{name} {text}".lower()
    if "credential" in lowered:  # also botocore's NoCredentialsError
        return AccessDeniedError(f"{url}: no credentials found ({text})")
    # A timeout first: its text carries the endpoint, whose port may read like a status code.
    if isinstance(exc, TimeoutError) or "timeout" in lowered or "timed out" in lowered:
        return StorageError(f"{url}: the store did not answer ({name}: {text}; {StoreLimits.from_env().describe()})")
    if (any(k in lowered for k in ("accessdenied", "access denied", "forbidden", "invalidaccesskeyid",
                                   "signaturedoesnotmatch", "unauthorized"))
            or _status(lowered) in ("401", "403")):
        return AccessDeniedError(f"{url}: access denied ({text})")
    if any(k in lowered for k in ("nosuchbucket", "nosuchkey", "not found")) or _status(lowered) == "404":
        return NotFoundError(f"{url}: not found ({text})")
    if any(k in lowered for k in ("connect", "endpoint", "resolve")):
        return StorageError(f"{url}: cannot reach the store ({name}: {text})")
    return StorageError(f"{url}: {name}: {text}")


@contextmanager
def translate_errors(url: str) -> Iterator[None]:
    """Turn the zoo of backend exceptions into ckptctl's one-line errors."""
    try:
        yield
    except CkptctlError:
        raise
    except Exception as exc:
        raise translate_error(url, exc) from exc


class Store:
    """A root location (local directory, S3 or GCS prefix) and the filesystem behind it."""

    def __init__(self, url: str, *, endpoint_url: str | None = None,
                 _fs: fsspec.AbstractFileSystem | None = None):
        self.protocol, self.root = split_url(url)
        # Local paths are shown as the user typed them (relative stays relative); ``root`` is the
        # absolute path every filesystem call uses.
        self._shown = os.path.normpath(url) if self.protocol == "file" and "://" not in url else self.root
        if endpoint_url is not None and _fs is None:
            endpoint_url = check_endpoint_url(endpoint_url)
        self.endpoint_url = endpoint_url
        self.fs = _fs if _fs is not None else _make_filesystem(self.protocol, endpoint_url)

    # -- naming ---------------------------------------------------------------------------
    @property
    def url(self) -> str:
        return self._shown if self.is_local else f"{self.protocol}://{self.root}"

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
        if self.is_local:
            rel = rel.strip("/")
            return os.path.normpath(os.path.join(self._shown, rel)) if rel else self._shown
        return f"{self.protocol}://{self.full_path(rel)}"

    def url_of_path(self, full_path: str) -> str:
        """The URL of a file named by its filesystem path (``bucket/prefix/file``, an fsspec file
        object's ``.path``), naming the object once -- not ``url_of`` of it, which would repeat
        the root."""
        try:
            return self.url_of(self.relative(full_path))
        except StorageError:
            full = full_path.split("://", 1)[-1]
            return full if self.is_local else f"{self.protocol}://{full}"

    def child(self, rel: str, files: Iterable[FileEntry] | None = None) -> "Store":
        """A store rooted at ``rel`` below this one, sharing the same filesystem. ``files``: its
        listing (paths relative to it) when the caller has just made it, e.g. a tree scan's
        files of a component: :meth:`walk` answers with it instead of listing again."""
        child = Store(self.url_of(rel), endpoint_url=self.endpoint_url, _fs=self.fs)
        if files is not None:
            child._listing = sorted(files, key=lambda e: natural_key(e.path))
        return child

    def parent(self) -> "Store":
        head = posixpath.dirname(self.root.rstrip("/"))
        if not head or (not self.is_local and "/" not in self.root.strip("/")):
            return self
        url = os.path.normpath(os.path.join(self._shown, "..")) if self.is_local else f"{self.protocol}://{head}"
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
        A store made by :meth:`child` with ``files`` answers with those, without a request.
        """
        entries, root_is_object = self._walk()
        if root_is_object and not entries:
            raise self._no_objects()
        return entries

    def _walk(self) -> tuple[list[FileEntry], bool]:
        """:meth:`walk`'s entries, and whether the root itself is an object (a file) on a store
        where a key can be both an object and a prefix."""
        if self._listing is not None:
            return list(self._listing), False
        with translate_errors(self.url):
            if self.is_local:
                return self._walk_local(), False
            if not self.root.strip("/").count("/"):
                # Bucket root: an empty bucket is valid, a missing one is not.
                self._check_bucket()
            try:
                found = self.fs.find(self.root, detail=True, withdirs=False)
            except FileNotFoundError:
                self._check_bucket()
                raise
            entries = []
            root_is_object = False
            for full, info in found.items():
                if info.get("type") == "directory" or full.endswith("/"):
                    continue
                rel = self.relative(full)
                if not rel:  # the root itself is an object, not a prefix
                    root_is_object = True
                    continue
                entries.append(FileEntry(rel, int(info.get("size") or 0), _to_datetime(info)))
            if not entries and self.root.strip("/").count("/"):
                self._check_bucket()
                if root_is_object:
                    return [], True
                raise self._no_objects()
            return sorted(entries, key=lambda e: natural_key(e.path)), root_is_object

    def _no_objects(self) -> NotFoundError:
        return NotFoundError(f"{self.url}: not found (no objects under this prefix)")

    def walk_destination(self) -> list[FileEntry]:
        """:meth:`walk` of a destination about to be written: nothing where nothing is there yet,
        but a missing bucket is an error (nothing can be written there), and so is an object at
        the destination itself, as a file is locally: writing below it would leave an object
        and a "directory" of one name, which no local copy of the bucket can hold."""
        try:
            entries, root_is_object = self._walk()
        except BucketNotFoundError:
            raise
        except NotFoundError:
            return []
        if root_is_object:
            raise NotACheckpointError(f"{self.url}: exists and is a file, not a directory")
        return entries

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
        return sorted(entries, key=lambda e: natural_key(e.path))

    def exists(self, rel: str = "") -> bool:
        with translate_errors(self.url_of(rel)):
            return self.fs.exists(self.full_path(rel))

    def is_dir(self, rel: str = "") -> bool:
        with translate_errors(self.url_of(rel)):
            return self.fs.isdir(self.full_path(rel))

    def is_file(self, rel: str = "") -> bool:
        with translate_errors(self.url_of(rel)):
            return self.fs.isfile(self.full_path(rel))

    def list_dir(self, rel: str = "") -> list[tuple[str, bool]]:
        """The entries directly below ``rel`` as (name, is a directory): symlinks followed, empty
        directories (S3/GCS: directory-marker objects) included -- what ``ls`` plus ``isdir``
        show, and how SkyRL finds its step directories. One listing request on S3/GCS."""
        with translate_errors(self.url_of(rel)):
            path = self.full_path(rel)
            if self.is_local:
                with os.scandir(path) as entries:
                    found = [(e.name, e.is_dir()) for e in entries]  # is_dir() follows symlinks
            else:
                found = [(posixpath.basename(info["name"].rstrip("/")), info.get("type") == "directory")
                         for info in self.fs.ls(path, detail=True)]
            return sorted((e for e in found if e[0]), key=lambda e: natural_key(e[0]))

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

    def read_json(self, rel: str):
        """A JSON file, parsed: the one way ckptctl reads JSON it did not just write.

        Invalid JSON (or bytes that are not UTF-8) is a :class:`CorruptFileError` naming the file.
        """
        raw = self.read_bytes(rel)
        try:
            return json.loads(raw)
        except ValueError as exc:  # JSONDecodeError, UnicodeDecodeError
            raise CorruptFileError(f"{self.url_of(rel)}: corrupt file, not valid JSON ({_describe(exc)})") from exc

    #: A :class:`ReadAhead` serving planned reads of this store's files (set by export-hf).
    read_ahead: "ReadAhead | None" = None
    #: The listing :meth:`walk` answers with (see :meth:`child`); None: list the store.
    _listing: "list[FileEntry] | None" = None

    def read_range(self, rel: str, start: int, end: int) -> bytes | memoryview:
        """Bytes ``[start, end)`` of a file: one ranged GET on object stores, or, for a read
        planned with :attr:`read_ahead`, a read-only memoryview of the bytes read ahead."""
        read_ahead = self.read_ahead
        if read_ahead is not None and end > start:
            data = read_ahead.take(rel, start, end)
            if data is not None:
                return data
        return self._read_range_direct(rel, start, end)

    def _read_range_direct(self, rel: str, start: int, end: int) -> bytes:
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
                write_local_file(self.full_path(rel), data)
                return
            self.fs.pipe_file(self.full_path(rel), data)

    def delete_many(self, rels: Iterable[str]) -> int:
        """Delete files, in the order given, in batched requests; returns how many THIS call deleted.

        S3: DeleteObjects with up to 1000 keys a request, one request after the other; GCS:
        batch requests of 100. Locally, directories left empty by the deletion are removed too,
        so a deleted step vanishes as it does on an object store. A file already gone is not an
        error. When a request fails, nothing after it is attempted and
        :class:`~ckptctl.errors.PartialDeleteError` says how many objects were deleted before
        (its ``deleted``, possibly 0) and carries the exit code of the failure.
        """
        paths = [self.full_path(r) for r in rels]
        if not paths:
            return 0
        if self.is_local:
            return self._delete_local(paths)
        if self.protocol == "s3":
            return self._delete_s3(paths)
        return self._delete_gcs(paths)

    def _partial_delete(self, cause: BaseException, deleted: int, total: int) -> PartialDeleteError:
        error = translate_error(self.url, cause)
        why = str(error).removeprefix(f"{self.url}: ")
        done = f"{deleted} of {total} objects were already deleted" if deleted else "nothing was deleted"
        return PartialDeleteError(f"deleting from {self.url} stopped: {done}; {why}",
                                  deleted=deleted, exit_code=error.exit_code)

    def _delete_s3(self, paths: list[str]) -> int:
        """DeleteObjects, 1000 keys a request, checking per-key errors that s3fs would ignore.

        S3 answers "deleted" for a key whether or not it existed (unversioned buckets), so the
        count includes keys another process deleted first; telling them apart would cost a
        request per key. Keys in a request that timed out may or may not be gone: not counted.
        """
        from fsspec.asyn import sync

        deleted = 0
        try:
            for start in range(0, len(paths), DELETE_BATCH):
                by_bucket: dict[str, list[str]] = {}
                for path in paths[start:start + DELETE_BATCH]:
                    bucket, key = path.split("/", 1)
                    by_bucket.setdefault(bucket, []).append(key)
                for bucket, batch in by_bucket.items():
                    out = sync(self.fs.loop, self.fs._call_s3, "delete_objects", Bucket=bucket,
                               Delete={"Objects": [{"Key": k} for k in batch], "Quiet": True})
                    errors = out.get("Errors") or []
                    deleted += len(batch) - len(errors)
                    if errors:
                        shown = ", ".join(e.get("Key", "?") for e in errors[:3])
                        codes = {e.get("Code") for e in errors}
                        cls = AccessDeniedError if "AccessDenied" in codes else StorageError
                        raise cls(f"{len(errors)} of {len(batch)} deletions refused "
                                  f"({', '.join(sorted(c for c in codes if c))}: {shown})")
        except Exception as exc:
            raise self._partial_delete(exc, deleted, len(paths)) from exc
        finally:
            self.fs.invalidate_cache()
        return deleted

    def _delete_gcs(self, paths: list[str]) -> int:
        """Batches of 100 deletions, one after the other, counting the per-object answers.

        GCS answers each object of a batch on its own (204 deleted, 404 already gone), so the
        count is exact. Emulators lack the batch API: one object a request, a few at a time,
        stopping at the first failure (a store that stopped answering costs one timeout, not
        one per remaining object).
        """
        from fsspec.asyn import sync

        def gone(result: BaseException) -> bool:
            return isinstance(result, FileNotFoundError) or "No such object" in str(result)

        async def one_request_each(batch: list[str], width: int = 5) -> list:
            import asyncio

            results: list = []
            for start in range(0, len(batch), width):
                chunk = await asyncio.gather(*(self.fs._rm_file(p) for p in batch[start:start + width]),
                                             return_exceptions=True)
                results += chunk
                if any(isinstance(r, BaseException) and not gone(r) for r in chunk):
                    break
            return results

        deleted = 0
        try:
            for start in range(0, len(paths), GCS_DELETE_BATCH):
                batch = paths[start:start + GCS_DELETE_BATCH]
                # the deleted paths (or None per object one request each) and an exception for
                # each object that failed
                if self.fs.on_google:
                    results = sync(self.fs.loop, self.fs._delete_files, batch, GCS_DELETE_BATCH)
                else:
                    results = sync(self.fs.loop, one_request_each, batch)
                failures = []
                for result in results:
                    if isinstance(result, BaseException):
                        if not gone(result):
                            failures.append(result)
                    else:
                        deleted += 1
                if failures:
                    raise failures[0]
        except Exception as exc:
            raise self._partial_delete(exc, deleted, len(paths)) from exc
        finally:
            self.fs.invalidate_cache()
        return deleted

    def _delete_local(self, paths: list[str]) -> int:
        deleted = 0
        parents = set()
        try:
            for path in paths:
                try:
                    os.remove(path)
                    deleted += 1
                except FileNotFoundError:
                    pass  # already gone (another prune?): not ours to count
                parents.add(os.path.dirname(path))
        except OSError as exc:
            raise self._partial_delete(exc, deleted, len(paths)) from exc
        finally:
            self._remove_empty_dirs(parents)
        return deleted

    def _remove_empty_dirs(self, directories: set[str]) -> None:
        root = self.root.rstrip("/")
        # Deepest first, so a parent is tried after its children.
        for directory in sorted(directories, key=len, reverse=True):
            while directory.startswith(root + "/"):
                try:
                    os.rmdir(directory)
                except OSError:
                    break  # not empty, or gone already
                directory = os.path.dirname(directory)


#: Local files are written in pieces of at most this many bytes. Large write() calls cost the
#: kernel far more on a VM that hands free memory back to its host (virtio-balloon free page
#: reporting, as on Firecracker): the copy into the page cache then crawls, most likely through
#: memory the host must fault in again (perf: 63% of a GCS -> local export's CPU was that copy,
#: copy_folio_from_iter_atomic). On this project's 2-core VM, 1.4 GB written in 4-64 MiB calls took
#: 7-15 s of system time, in 512 KiB calls 0.4-0.6 s; into memory the host still backed, both
#: sizes took about 0.4 s.
LOCAL_WRITE_PIECE = 512 * 2**10


class PiecewiseWriter(io.BufferedWriter):
    """A buffered binary file whose writes reach the file in pieces of at most
    :data:`LOCAL_WRITE_PIECE` bytes (small writes are buffered as usual)."""

    def write(self, data) -> int:
        view = memoryview(data)
        if view.nbytes <= LOCAL_WRITE_PIECE:  # as it is (an empty 2-d view cannot be cast to bytes)
            return super().write(view)
        view = view.cast("B")
        for start in range(0, len(view), LOCAL_WRITE_PIECE):
            super().write(view[start:start + LOCAL_WRITE_PIECE])
        return len(view)


def open_local_for_writing(path: str) -> PiecewiseWriter:
    """``open(path, "wb")`` as every ckptctl writer of a local file opens it (see
    :data:`LOCAL_WRITE_PIECE`); ``torch.save`` may write into it too."""
    return PiecewiseWriter(io.FileIO(path, "wb"))


def write_local_file(path: str, data, *, durable: bool = False) -> None:
    """Write ``data`` as the local file ``path`` (its directory made if missing), through
    :func:`open_local_for_writing`; ``durable``: flushed to disk before returning."""
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    with open_local_for_writing(path) as f:
        f.write(data)
        if durable:
            f.flush()
            os.fsync(f.fileno())


def open_store(url: str, *, endpoint_url: str | None = None) -> Store:
    """The one way to get a :class:`Store` from a user-given path or URL."""
    if not url or not str(url).strip():
        raise UsageError("empty path")
    return Store(str(url).strip(), endpoint_url=endpoint_url)


# ---------------------------------------------------------------------------------------------
# read-ahead: concurrent ranged reads of byte ranges known in advance
# ---------------------------------------------------------------------------------------------
#: Defaults of the transfer machinery (export-hf's ``--concurrency`` / ``--max-memory``).
#: 8 requests in flight and 16 MiB parts: what saturates a cloud VM's link to S3/GCS (the aws
#: CLI uses 10 x 8 MiB), while the memory they hold stays far below the budget.
DEFAULT_CONCURRENCY = 8
MAX_CONCURRENCY = 64
#: Ranges read ahead are coalesced into requests (neighbours at most COALESCE_GAP apart) and
#: larger ones split into requests, fetched concurrently: as large as the budget allows twice
#: ``concurrency`` of them to be held (:func:`read_request_size`), from 1 MiB up to this. Fewer,
#: larger requests pay less per-request cost (a round trip; on the S3 test server a pass over
#: the whole object): 64 MiB instead of 16 took a 1.42 GB export from the S3 server to local
#: disk from 19.7 s to 13.1 s (33 GETs instead of 101).
READ_REQUEST_SIZE = 64 * 2**20
MIN_READ_REQUEST_SIZE = 2**20
COALESCE_GAP = 1 * 2**20
#: The default memory budget of the transfer buffers: 1 GiB, at most 1/8 of the machine's RAM.
DEFAULT_MAX_MEMORY = 2**30
MIN_MAX_MEMORY = 2**20


def default_max_memory() -> int:
    """``DEFAULT_MAX_MEMORY``, or 1/8 of physical memory where that is less (64 MiB at least)."""
    try:
        total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):  # pragma: no cover
        return DEFAULT_MAX_MEMORY
    return max(64 * 2**20, min(DEFAULT_MAX_MEMORY, total // 8))


def read_request_size(budget: int, concurrency: int) -> int:
    """The read-ahead's request size for ``budget`` bytes and ``concurrency`` requests in flight
    (see :data:`READ_REQUEST_SIZE`): 64 MiB with the defaults, 16 MiB with 256 MiB."""
    return min(READ_REQUEST_SIZE, max(MIN_READ_REQUEST_SIZE, budget // (2 * max(concurrency, 1))))


#: Largest chunk of a GCS resumable upload: the chunks go up one after the other, one request
#: each, so fewer round trips is faster (google-cloud-storage's own default chunk is 100 MiB; on
#: the GCS emulator, 128 MiB chunks made local -> GCS export 0.81-0.88x of gcsfs's put instead
#: of 1.03-1.13x with 64 MiB).
GCS_MAX_CHUNK = 128 * 2**20
MIN_UPLOAD_CHUNK = 16 * 2**20
#: S3's smallest part (but the last) and most parts (10,000, with a margin).
MIN_UPLOAD_PART = 5 * 2**20
MAX_UPLOAD_PARTS = 9000
#: s3fs's own part size for put_file, kept where the budget allows it.
PUT_FILE_PART = 50 * 2**20


def min_part_size(size: int) -> int:
    """The smallest part, in whole MiB, that uploads ``size`` bytes in :data:`MAX_UPLOAD_PARTS`."""
    return -(-size // MAX_UPLOAD_PARTS // 2**20) * 2**20


def gcs_chunk_size(budget: int) -> int:
    """The chunk of a GCS upload under an upload ``budget``: a quarter of it, in whole MiB (GCS
    wants multiples of 256 KiB), from :data:`MIN_UPLOAD_CHUNK` to :data:`GCS_MAX_CHUNK`."""
    return min(GCS_MAX_CHUNK, max(MIN_UPLOAD_CHUNK, budget // 4 // 2**20 * 2**20))


def put_file_options(store: "Store", size: int, budget: int, concurrency: int) -> dict:
    """``put_file`` keyword arguments that keep the upload of one ``size``-byte file near
    ``budget`` bytes: S3 parts ``concurrency`` at a time (s3fs reads that many parts into memory
    at once; its default, 10 x 50 MiB, knows no budget), as large as the budget allows up to
    50 MiB (never so small that the file needs more than :data:`MAX_UPLOAD_PARTS`); a GCS
    resumable upload in chunks of :func:`gcs_chunk_size`. Nothing for local files."""
    if store.protocol == "s3":
        parallel = max(1, min(concurrency, budget // MIN_UPLOAD_PART))
        part = min(PUT_FILE_PART, max(MIN_UPLOAD_PART, budget // parallel // 2**20 * 2**20))
        part = max(part, min_part_size(size))
        return {"chunksize": part, "max_concurrency": parallel}
    if store.protocol == "gs":
        return {"chunksize": gcs_chunk_size(budget)}
    return {}


def check_concurrency(value: int, source: str = "--concurrency") -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= MAX_CONCURRENCY:
        raise UsageError(f"{source} must be an integer from 1 to {MAX_CONCURRENCY}, not {value!r}")
    return value


class _Unit:
    """One buffer of the read-ahead: a byte range of one file, fetched by one or more requests."""

    __slots__ = ("rel", "start", "end", "first", "last", "reads", "buffer", "pending", "error", "admitted",
                 "released")

    def __init__(self, rel: str, start: int, end: int, index: int):
        self.rel, self.start, self.end = rel, start, end
        self.first = self.last = index  # the plan's first and last reads inside it
        self.reads: list[int] = []  # the plan indices of those reads
        self.buffer: bytearray | None = None
        self.pending = 0  # requests not finished yet
        self.error: BaseException | None = None
        self.admitted = False
        self.released = False

    @property
    def size(self) -> int:
        return self.end - self.start


class ReadAhead:
    """Reads planned byte ranges of a store's files ahead of their use, concurrently, within a
    memory budget; :meth:`Store.read_range` serves reads inside them from memory.

    ``plan``: ``(rel, start, end)`` of the reads the caller will make, in the order it makes
    them. Neighbouring ranges of one file (at most ``gap`` apart in the file, and read within
    half the ``budget`` of plan bytes of each other, in any order) are coalesced into buffers
    of up to ``request_size`` (default :func:`read_request_size`); a larger range is one buffer fetched by several
    ``request_size`` requests in parallel. Buffers are fetched in the order of their first
    planned read by ``concurrency`` threads while the bytes fetched and not yet used stay under
    ``budget`` (one buffer is always allowed, so the budget never stalls the caller: the peak
    is ``budget`` plus one buffer).

    A read ``[start, end)`` of ``rel`` is served when it lies inside the range of a planned
    read at or after the current position (the plan's index of the previous read served); it
    then becomes the position, and buffers whose planned reads all lie before it are dropped.
    Any other read (not planned, planned earlier, a retry) goes to the store as usual: the
    plan only decides what is fetched early, never what is returned. A failed request is
    raised by the read that needs its bytes (after the store's own retries). ``close()`` stops
    the fetching and drops every buffer.
    """

    def __init__(self, store: "Store", plan: Iterable[tuple[str, int, int]], *, budget: int,
                 concurrency: int = DEFAULT_CONCURRENCY, request_size: int | None = None,
                 gap: int | None = None):
        import bisect
        import threading
        from concurrent.futures import ThreadPoolExecutor

        gap = COALESCE_GAP if gap is None else gap
        self.store = store
        self.budget = max(int(budget), 1)
        request_size = read_request_size(self.budget, concurrency) if request_size is None else request_size
        self._bisect = bisect
        self._cond = threading.Condition()
        # rel -> sorted planned ranges: starts, [(start, end, [plan indices])]
        self._ranges: dict[str, tuple[list[int], list[tuple[int, int, list[int]]]]] = {}
        reads = [(rel, start, end) for rel, start, end in plan if end > start]
        by_range: dict[tuple[str, int, int], list[int]] = {}
        for index, read in enumerate(reads):
            by_range.setdefault(read, []).append(index)
        self._units: list[_Unit] = self._coalesce(reads, request_size, gap, max(self.budget // 2, request_size))
        unit_of = {index: unit for unit in self._units for index in unit.reads}
        self._reads: list[tuple[str, int, int, _Unit]] = [(*r, unit_of[i]) for i, r in enumerate(reads)]
        for (rel, start, end), indices in sorted(by_range.items()):
            starts, entries = self._ranges.setdefault(rel, ([], []))
            starts.append(start)
            entries.append((start, end, indices))
        self.request_size = request_size
        self.position = -1
        self.held = 0  # bytes of admitted, unreleased buffers
        self.peak_held = 0
        self.requests = 0
        self.served = 0
        self._next_admit = 0
        # the buffers in the order they are done with (their last planned read), and how many
        # of them the position has passed: releasing costs nothing per read, whatever the plan's
        # size (a scan of every buffer on each read took minutes for 100,000 planned reads)
        self._by_last = sorted(self._units, key=lambda u: u.last)
        self._passed = 0
        self._closed = False
        self._pool = ThreadPoolExecutor(max_workers=concurrency, thread_name_prefix="ckptctl-read-ahead")
        with self._cond:
            self._admit_locked()

    @staticmethod
    def _coalesce(reads: list[tuple[str, int, int]], request_size: int, gap: int, window: int) -> list[_Unit]:
        """The buffers of planned ``reads``, in the order of their first read: a file's planned
        ranges, in file order, grouped while they are at most ``gap`` apart, the group spans at
        most ``request_size``, and its reads come within ``window`` bytes of plan of each other
        (whatever the order they are read in: a reader interleaving regions of one file, such
        as MoE experts' gate, up and down chunks, still gets large requests; reads far apart in
        the plan, such as a tied weight read twice, get buffers of their own, not one held long)."""
        planned_before = [0]  # bytes planned before each read
        for _, start, end in reads:
            planned_before.append(planned_before[-1] + end - start)
        by_file: dict[str, list[tuple[int, int, int]]] = {}
        for index, (rel, start, end) in enumerate(reads):
            by_file.setdefault(rel, []).append((start, end, index))
        units = []
        for rel, ranges in by_file.items():
            unit = None
            for start, end, index in sorted(ranges):
                joins = unit is not None and (
                    end <= unit.end  # inside it (a range read twice: a tied weight, an expert's gate and up)
                    or start - unit.end <= gap and end - unit.start <= request_size) and (
                    planned_before[max(index, unit.last) + 1] - planned_before[min(index, unit.first)] <= window)
                if joins:
                    unit.end = max(end, unit.end)
                    unit.first, unit.last = min(index, unit.first), max(index, unit.last)
                else:
                    unit = _Unit(rel, start, end, index)
                    units.append(unit)
                unit.reads.append(index)
        units.sort(key=lambda u: u.first)
        return units

    # -- fetching ---------------------------------------------------------------------------
    def _admit_locked(self, force: _Unit | None = None) -> None:
        if force is not None and not force.admitted:
            self._start_locked(force)
        while self._next_admit < len(self._units) and not self._closed:
            unit = self._units[self._next_admit]
            if unit.admitted or unit.released:
                self._next_admit += 1
                continue
            if self.held and self.held + unit.size > self.budget:
                return
            self._start_locked(unit)
            self._next_admit += 1

    def _start_locked(self, unit: _Unit) -> None:
        unit.admitted = True
        starts = range(unit.start, unit.end, self.request_size)
        unit.buffer = bytearray(unit.size) if len(starts) > 1 else None
        self.held += unit.size
        self.peak_held = max(self.peak_held, self.held)
        unit.pending = len(starts)
        for start in starts:
            self.requests += 1
            self._pool.submit(self._fetch, unit, start, min(unit.end, start + self.request_size))

    def _fetch(self, unit: _Unit, start: int, end: int) -> None:
        error = data = None
        try:
            if unit.released or self._closed:
                raise RuntimeError("read-ahead cancelled")
            data = self.store._read_range_direct(unit.rel, start, end)
            if len(data) != end - start:
                raise EOFError(f"short read at {start}: {len(data)} of {end - start} bytes")
            buffer = unit.buffer
            if buffer is not None:  # several requests fill one buffer
                buffer[start - unit.start:end - unit.start] = data
                data = None
        except BaseException as exc:  # noqa: BLE001 - handed to the reader of these bytes
            error = exc
        with self._cond:
            if error is not None and unit.error is None:
                unit.error = error
            elif data is not None and not unit.released:
                unit.buffer = data  # one request: its bytes are the buffer (no copy)
            unit.pending -= 1
            self._cond.notify_all()

    # -- serving -----------------------------------------------------------------------------
    def _find(self, rel: str, start: int, end: int) -> int | None:
        """The first planned read at or after the position whose range holds ``[start, end)``
        (planned ranges are records of a file: disjoint, or the same range planned twice)."""
        found = self._ranges.get(rel)
        if found is None:
            return None
        starts, entries = found
        i = self._bisect.bisect_right(starts, start) - 1
        if i < 0:
            return None
        s, e, indices = entries[i]
        if not (s <= start and end <= e):
            return None
        j = self._bisect.bisect_left(indices, max(self.position, 0))
        return indices[j] if j < len(indices) else None

    def take(self, rel: str, start: int, end: int):
        """A read-only view of bytes ``[start, end)`` of ``rel`` when planned, else None."""
        with self._cond:
            if self._closed:
                return None
            index = self._find(rel, start, end)
            if index is None:
                return None
            unit = self._reads[index][3]
            if unit.released:
                return None
            self._advance_locked(index)
            if not unit.admitted:
                self._admit_locked(force=unit)
            while unit.pending and not self._closed:
                self._cond.wait()
            if unit.error is not None:
                raise unit.error
            if unit.buffer is None:
                return None
            self.served += 1
            return memoryview(unit.buffer)[start - unit.start:end - unit.start].toreadonly()

    def _advance_locked(self, index: int) -> None:
        if index <= self.position:
            return
        self.position = index
        passed = self._passed
        while passed < len(self._by_last) and self._by_last[passed].last < index:
            self._release_locked(self._by_last[passed])
            passed += 1
        if passed > self._passed:
            self._passed = passed
            self._admit_locked()

    def _release_locked(self, unit: _Unit) -> None:
        unit.released = True
        if unit.admitted:
            self.held -= unit.size
        unit.buffer = None  # views handed out keep their bytes alive until dropped

    def close(self) -> None:
        with self._cond:
            self._closed = True
            for unit in self._by_last[self._passed:]:
                self._release_locked(unit)
            self._passed = len(self._by_last)
            self._cond.notify_all()
        self._pool.shutdown(wait=True, cancel_futures=True)
