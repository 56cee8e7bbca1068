"""A real HTTP proxy in front of a test store server (moto S3, the GCS emulator) that misbehaves.

It forwards every request unchanged to the upstream server. Two kinds of misbehaviour, both
real HTTP on a real socket (no mocks): clients see exactly what a stuck or flaky store does.

Freezing (``freeze_after_deletions``): the proxy counts the deletion requests the upstream
answered with success (S3 ``POST /bucket?delete``, GCS ``DELETE .../o/name``). After
``freeze_after_deletions`` of them it stops answering anything: each later request is read and
then held, the connection open and silent, the way a stuck store or a half-dead network path
behaves. Clients see a read timeout, or a process killed while it waits::

    proxy = FaultProxy(upstream_endpoint, freeze_after_deletions=1)
    ... run a command against proxy.endpoint ...
    proxy.deletions_done.wait(30)   # the first deletion went through
    proxy.stop()

Transient (or permanent) faults by rule (``faults=[Fault(...)]``, or :meth:`FaultProxy.add`):
each :class:`Fault` matches requests by method and a predicate on the path/query (and headers)
and answers the matching ones it selects -- the ``nth`` match, the first ``times`` matches, or
every match (``times=None``: a permanent fault) -- with one of

``"status"``     an HTTP error status (500, 503, ...) with an S3 ``<Error>`` XML body (its
                 ``<Code>`` from ``code=``, else from the status), or a GCS JSON error body for
                 GCS paths; the request never reaches the upstream.
``"slowdown"``   S3's throttling answer: 503 with ``<Code>SlowDown</Code>``.
``"reset"``      the connection is reset (TCP RST) after reading the request head and part of
                 its body: the request never reaches the upstream.
``"reset_after"`` the request is forwarded (the upstream applies it), then the connection is
                 reset before any answer: the client cannot tell whether it happened.
``"truncate"``   forwarded; the answer's head (with the full Content-Length) and half of its
                 body are sent, then the connection is reset: a reset in the middle of a download.
``"error200"``   S3 only: ``200 OK`` whose body is an ``<Error>`` document, never forwarded --
                 what AWS documents for CompleteMultipartUpload (and CopyObject) failing late.

Predicates for the common cases: :func:`complete_multipart` (``POST ?uploadId=``),
:func:`upload_part` (``PUT ?partNumber=``), :func:`ranged_get`, :func:`listing` (S3
ListObjectsV2, GCS objects.list), :func:`gcs_upload` (GCS media/resumable upload requests),
:func:`object_key` (requests for objects whose key ends with a name)::

    with FaultProxy(endpoint, faults=[Fault("status", status=500, match=complete_multipart, times=1)]) as p:
        ... run a command against p.endpoint ...
    assert p.injected == 1
"""

from __future__ import annotations

import http.client
import json
import re
import socket
import struct
import threading
import urllib.parse
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Callable, Mapping

_HOP_BY_HOP = {"connection", "keep-alive", "transfer-encoding", "te", "trailer", "upgrade",
               "proxy-connection", "proxy-authenticate", "proxy-authorization", "content-length"}

#: ``match(method, path_with_query, headers) -> bool``
Predicate = Callable[[str, str, Mapping[str, str]], bool]


def _query(path: str) -> dict[str, list[str]]:
    return urllib.parse.parse_qs(urllib.parse.urlsplit(path).query, keep_blank_values=True)


def _is_gcs_path(path: str) -> bool:
    p = urllib.parse.urlsplit(path).path
    return p.startswith(("/storage/v1/", "/upload/storage/v1/", "/download/storage/v1/", "/batch/"))


def is_deletion(method: str, path: str) -> bool:
    """S3 DeleteObjects or a GCS object DELETE (or a GCS batch request)."""
    parsed = urllib.parse.urlsplit(path)
    query = urllib.parse.parse_qs(parsed.query, keep_blank_values=True)
    return method == "DELETE" or (method == "POST" and ("delete" in query or parsed.path.startswith("/batch/")))


# -- predicates --------------------------------------------------------------------------------
def complete_multipart(method: str, path: str, headers=None) -> bool:
    """S3 CompleteMultipartUpload: ``POST /bucket/key?uploadId=...``."""
    return method == "POST" and "uploadId" in _query(path)


def upload_part(method: str, path: str, headers=None) -> bool:
    """S3 UploadPart: ``PUT /bucket/key?partNumber=N&uploadId=...``."""
    return method == "PUT" and "partNumber" in _query(path)


def put_object(method: str, path: str, headers=None) -> bool:
    """S3 PutObject (a single-request upload, not a part)."""
    return method == "PUT" and not _is_gcs_path(path) and "partNumber" not in _query(path)


def ranged_get(method: str, path: str, headers=None) -> bool:
    """A GET with a ``Range`` header (S3 ranged GetObject, GCS ranged media download)."""
    return method == "GET" and any(k.lower() == "range" for k in (headers or {}))


def object_get(method: str, path: str, headers=None) -> bool:
    """A GET of an object's bytes (S3 GetObject, GCS ``alt=media``), ranged or not."""
    if method != "GET":
        return False
    if _is_gcs_path(path):
        return _query(path).get("alt") == ["media"] or urllib.parse.urlsplit(path).path.startswith("/download/")
    parts = urllib.parse.urlsplit(path).path.strip("/").split("/", 1)
    return len(parts) == 2 and bool(parts[1]) and not _query(path)


def listing(method: str, path: str, headers=None) -> bool:
    """S3 ListObjects(V2) (``GET /bucket?list-type=2`` or ``?prefix=``), GCS objects.list."""
    if method != "GET":
        return False
    split = urllib.parse.urlsplit(path)
    if _is_gcs_path(path):
        return split.path.rstrip("/").endswith("/o")
    query = _query(path)
    return "/" not in split.path.strip("/") and ("list-type" in query or "prefix" in query)


def gcs_upload(method: str, path: str, headers=None) -> bool:
    """A GCS upload request: ``POST /upload/storage/v1/b/B/o?uploadType=...`` or a resumable
    session's ``PUT``."""
    return method in ("POST", "PUT") and urllib.parse.urlsplit(path).path.startswith("/upload/")


_GCS_META_NAME = re.compile(rb'"name"\s*:\s*"([^"]+)"')


def object_key(name: str, inner: Predicate | None = None) -> Predicate:
    """Requests naming an object whose key ends with ``name`` (S3 path; GCS ``/o/NAME``,
    ``?name=``, or the metadata part of a one-request ``uploadType=multipart`` upload),
    optionally also matching ``inner``. (It reads the request body before deciding.)"""
    def match(method: str, path: str, headers=None, body: bytes = b"") -> bool:
        split = urllib.parse.urlsplit(path)
        names = [urllib.parse.unquote(split.path)] + [urllib.parse.unquote(v) for v in _query(path).get("name", [])]
        if body and "multipart" in _query(path).get("uploadType", []):
            names += [m.decode("utf-8", "replace") for m in _GCS_META_NAME.findall(body[:8192])]
        hit = any(n.endswith("/" + name) or n == name for n in names)
        return hit and (inner is None or inner(method, path, headers))
    match.wants_body = True
    return match


def any_request(method: str, path: str, headers=None) -> bool:
    return True


# -- the rules ---------------------------------------------------------------------------------
ACTIONS = ("status", "slowdown", "reset", "reset_after", "truncate", "error200")


@dataclass
class Fault:
    """Answer matching requests with ``action`` (see the module doc).

    ``method``: only requests with this method (None: any); ``match``: a predicate
    ``(method, path_with_query, headers)``. Which matching requests fail: ``nth`` (1-based,
    only that one), else the first ``times`` (None: every one, a permanent fault).
    """

    action: str
    match: Predicate = any_request
    method: str | None = None
    status: int = 500
    code: str | None = None  # S3 error code of a "status" answer (default: from the status)
    times: int | None = 1
    nth: int | None = None
    matched: int = field(default=0, init=False)  # matching requests seen
    fired: int = field(default=0, init=False)  # faults injected
    hits: list = field(default_factory=list, init=False)  # (method, path) of each injected fault

    def __post_init__(self) -> None:
        if self.action not in ACTIONS:
            raise ValueError(f"unknown fault action {self.action!r} (one of {', '.join(ACTIONS)})")

    @property
    def wants_body(self) -> bool:
        """Whether the predicate looks at the request body (then it is read before deciding)."""
        return bool(getattr(self.match, "wants_body", False))

    def select(self, method: str, path: str, headers, body: bytes | None = None) -> bool:
        """Count a request; True when this fault answers it (call under the proxy's lock)."""
        if self.method is not None and method != self.method:
            return False
        if not (self.match(method, path, headers, body or b"") if self.wants_body else self.match(method, path, headers)):
            return False
        self.matched += 1
        if self.nth is not None:
            fire = self.matched == self.nth
        else:
            fire = self.times is None or self.matched <= self.times
        if fire:
            self.fired += 1
            self.hits.append((method, path))
        return fire


def _s3_error(code: str, message: str) -> bytes:
    return (f'<?xml version="1.0" encoding="UTF-8"?>\n<Error><Code>{code}</Code><Message>{message}</Message>'
            f'<RequestId>ckptctl-fault-proxy</RequestId></Error>').encode()


def _error_answer(fault: Fault, path: str) -> tuple[int, str, list[tuple[str, str]], bytes]:
    if fault.action == "slowdown":
        return 503, "Slow Down", [("Content-Type", "application/xml")], _s3_error(
            "SlowDown", "Please reduce your request rate.")
    if fault.action == "error200":
        return 200, "OK", [("Content-Type", "application/xml")], _s3_error(
            "InternalError", "We encountered an internal error. Please try again.")
    status = fault.status
    reason = http.client.responses.get(status, "Error")
    if _is_gcs_path(path):
        body = json.dumps({"error": {"code": status, "message": f"injected fault: {reason}",
                                     "errors": [{"message": f"injected fault: {reason}", "reason": "backendError"}]}})
        return status, reason, [("Content-Type", "application/json")], body.encode()
    code = fault.code or {500: "InternalError", 503: "ServiceUnavailable"}.get(status, reason.replace(" ", ""))
    return status, reason, [("Content-Type", "application/xml")], _s3_error(code, f"injected fault: {reason}")


class _Reset(Exception):
    """The handler reset the connection: nothing more is to be written on it."""


class FaultProxy:
    def __init__(self, upstream: str, *, freeze_after_deletions: int | None = None,
                 faults: list[Fault] | tuple[Fault, ...] = ()):
        target = urllib.parse.urlsplit(upstream)
        self.upstream_host, self.upstream_port = target.hostname, target.port or 80
        self.freeze_after_deletions = freeze_after_deletions
        self.faults: list[Fault] = list(faults)
        self.deletions = 0  # deletion requests the upstream answered with 2xx
        self.requests = 0
        self.held = 0  # requests received while frozen (never answered)
        self.injected = 0  # faults injected, all rules together
        self.log: list[tuple[str, str, int | str]] = []  # (method, path, status or fault action)
        self.deletions_done = threading.Event()  # set when freeze_after_deletions were answered
        self._released = threading.Event()
        self._lock = threading.Lock()
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"
            disable_nagle_algorithm = True  # head and body are separate writes: no 40 ms delayed-ACK stalls

            def log_message(self, *args):  # keep test output clean
                pass

            def _read_body(self, limit: int | None = None) -> bytes:
                if "chunked" in (self.headers.get("Transfer-Encoding") or "").lower():
                    chunks = []
                    while True:
                        size = int(self.rfile.readline().split(b";", 1)[0].strip() or b"0", 16)
                        if size == 0:
                            while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                                pass
                            return b"".join(chunks)
                        chunks.append(self.rfile.read(size))
                        self.rfile.readline()
                length = int(self.headers.get("Content-Length") or 0)
                if limit is not None:
                    length = min(length, limit)
                return self.rfile.read(length) if length else b""

            def _reset(self) -> None:
                """Abort the connection with a TCP RST (SO_LINGER 0), as a dying peer does."""
                try:
                    self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                except OSError:
                    pass
                self.close_connection = True
                try:
                    self.connection.close()
                except OSError:
                    pass
                raise _Reset()

            def _send(self, status, reason, headers, payload, *, length: int | None = None) -> None:
                self.send_response(status, reason)
                for name, value in headers:
                    if name.lower() not in _HOP_BY_HOP:
                        self.send_header(name, value)
                self.send_header("Content-Length", str(len(payload) if length is None else length))
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(payload)

            def _handle(self):
                try:
                    self._handle_one()
                except _Reset:
                    pass

            def _handle_one(self):
                headers = {k: v for k, v in self.headers.items()}
                body = self._read_body() if any(f.wants_body for f in list(proxy.faults)) else None
                with proxy._lock:
                    proxy.requests += 1
                    frozen = proxy._frozen()
                    if frozen:
                        proxy.held += 1
                    fault = None if frozen else next(
                        (f for f in proxy.faults if f.select(self.command, self.path, headers, body)), None)
                    if fault is not None:
                        proxy.injected += 1
                        proxy.log.append((self.command, self.path, fault.action))
                if fault is not None and fault.action == "reset":
                    if body is None:
                        length = int(self.headers.get("Content-Length") or 0)
                        self._read_body(limit=length // 2 if length else None)  # part of the request
                    self._reset()
                if body is None:
                    body = self._read_body()
                if frozen:
                    proxy._released.wait()
                    self.close_connection = True
                    return
                if fault is not None and fault.action in ("status", "slowdown", "error200"):
                    self._send(*_error_answer(fault, self.path))
                    return
                status, reason, resp_headers, payload = proxy._forward(self.command, self.path, self.headers, body)
                with proxy._lock:
                    if fault is None:
                        proxy.log.append((self.command, self.path, status))
                if is_deletion(self.command, self.path) and 200 <= status < 300:
                    with proxy._lock:
                        proxy.deletions += 1
                        if proxy.freeze_after_deletions is not None \
                                and proxy.deletions >= proxy.freeze_after_deletions:
                            proxy.deletions_done.set()
                if fault is not None and fault.action == "reset_after":
                    self._reset()
                if fault is not None and fault.action == "truncate":
                    self._send(status, reason, resp_headers, payload[:len(payload) // 2], length=len(payload))
                    self.wfile.flush()
                    self._reset()
                length = None
                if self.command == "HEAD":  # no body, but the object's size in Content-Length
                    length = next((int(v) for k, v in resp_headers if k.lower() == "content-length"), 0)
                self._send(status, reason, resp_headers, payload, length=length)

            def finish(self):
                try:
                    super().finish()
                except OSError:
                    pass  # the connection was reset on purpose

            do_GET = do_PUT = do_POST = do_DELETE = do_HEAD = do_PATCH = _handle

        class Server(ThreadingHTTPServer):
            daemon_threads = True

            def handle_error(self, request, client_address):  # resets and client aborts are expected
                pass

        self._server = Server(("127.0.0.1", 0), Handler)
        self.endpoint = f"http://127.0.0.1:{self._server.server_address[1]}"
        self._thread = threading.Thread(target=self._server.serve_forever, name="fault-proxy", daemon=True)
        self._thread.start()

    def add(self, fault: Fault) -> Fault:
        """Add a fault rule (also while requests flow); returns it."""
        with self._lock:
            self.faults.append(fault)
        return fault

    def clear_faults(self) -> None:
        with self._lock:
            self.faults = []

    def _frozen(self) -> bool:
        return self.freeze_after_deletions is not None and self.deletions >= self.freeze_after_deletions

    def _forward(self, method: str, path: str, headers, body: bytes):
        conn = http.client.HTTPConnection(self.upstream_host, self.upstream_port, timeout=60)
        try:
            sent = {k: v for k, v in headers.items() if k.lower() not in _HOP_BY_HOP and k.lower() != "expect"}
            if body or method in ("POST", "PUT", "PATCH"):
                sent["Content-Length"] = str(len(body))
            conn.request(method, path, body=body, headers=sent)
            resp = conn.getresponse()
            return resp.status, resp.reason, resp.getheaders(), resp.read()
        finally:
            conn.close()

    def stop(self) -> None:
        self._released.set()
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=10)

    def __enter__(self) -> "FaultProxy":
        return self

    def __exit__(self, *exc) -> None:
        self.stop()
