"""A real HTTP proxy in front of a test store server (moto S3, the GCS emulator) that freezes.

It forwards every request unchanged to the upstream server and counts the deletion requests
the upstream answered with success (S3 ``POST /bucket?delete``, GCS ``DELETE .../o/name``).
After ``freeze_after_deletions`` of them it stops answering anything: each later request is
read and then held, the connection open and silent, the way a stuck store or a half-dead
network path behaves. Clients see exactly that (no mocks): a read timeout, or a process killed
while it waits.

    proxy = FaultProxy(upstream_endpoint, freeze_after_deletions=1)
    ... run a command against proxy.endpoint ...
    proxy.deletions_done.wait(30)   # the first deletion went through
    proxy.stop()
"""

from __future__ import annotations

import http.client
import threading
import urllib.parse
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

_HOP_BY_HOP = {"connection", "keep-alive", "transfer-encoding", "te", "trailer", "upgrade",
               "proxy-connection", "proxy-authenticate", "proxy-authorization", "content-length"}


def is_deletion(method: str, path: str) -> bool:
    """S3 DeleteObjects or a GCS object DELETE (or a GCS batch request)."""
    parsed = urllib.parse.urlsplit(path)
    query = urllib.parse.parse_qs(parsed.query, keep_blank_values=True)
    return method == "DELETE" or (method == "POST" and ("delete" in query or parsed.path.startswith("/batch/")))


class FaultProxy:
    def __init__(self, upstream: str, *, freeze_after_deletions: int | None = None):
        target = urllib.parse.urlsplit(upstream)
        self.upstream_host, self.upstream_port = target.hostname, target.port or 80
        self.freeze_after_deletions = freeze_after_deletions
        self.deletions = 0  # deletion requests the upstream answered with 2xx
        self.requests = 0
        self.held = 0  # requests received while frozen (never answered)
        self.deletions_done = threading.Event()  # set when freeze_after_deletions were answered
        self._released = threading.Event()
        self._lock = threading.Lock()
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):  # keep test output clean
                pass

            def _handle(self):
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length) if length else b""
                with proxy._lock:
                    proxy.requests += 1
                    frozen = proxy._frozen()
                    if frozen:
                        proxy.held += 1
                if frozen:
                    proxy._released.wait()
                    self.close_connection = True
                    return
                status, reason, headers, payload = proxy._forward(self.command, self.path, self.headers, body)
                if is_deletion(self.command, self.path) and 200 <= status < 300:
                    with proxy._lock:
                        proxy.deletions += 1
                        if proxy.freeze_after_deletions is not None \
                                and proxy.deletions >= proxy.freeze_after_deletions:
                            proxy.deletions_done.set()
                self.send_response(status, reason)
                for name, value in headers:
                    if name.lower() not in _HOP_BY_HOP:
                        self.send_header(name, value)
                self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(payload)

            do_GET = do_PUT = do_POST = do_DELETE = do_HEAD = do_PATCH = _handle

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self.endpoint = f"http://127.0.0.1:{self._server.server_address[1]}"
        self._thread = threading.Thread(target=self._server.serve_forever, name="fault-proxy", daemon=True)
        self._thread.start()

    def _frozen(self) -> bool:
        return self.freeze_after_deletions is not None and self.deletions >= self.freeze_after_deletions

    def _forward(self, method: str, path: str, headers, body: bytes):
        conn = http.client.HTTPConnection(self.upstream_host, self.upstream_port, timeout=60)
        try:
            sent = {k: v for k, v in headers.items() if k.lower() not in _HOP_BY_HOP}
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
