"""Real object-store servers on loopback, for the tests and for the benchmarks in bench/.

Nothing here mocks a library call: the tests talk HTTP to real servers on 127.0.0.1.

* S3: moto's server (Flask app + werkzeug threaded server) run **in this process** on a free
  port, its WSGI app wrapped in a :class:`RequestCounter` middleware so tests can count the
  requests a command costs (ListObjectsV2 pages, DeleteObjects batches, ...).
* GCS: ``gcp-storage-emulator`` run as a **subprocess** (``sys.executable -m
  gcp_storage_emulator start --in-memory``), with the bucket created at start.
* Access denied (S3 only): a *second* moto server, as a subprocess, with moto's IAM
  enforcement switched on (``POST /moto-api/reset-auth``) after setup. moto does **not**
  enforce bucket policies, and its auth switch is process-global (it would deny everything on
  the main server too), hence the separate process. See :class:`DeniedS3`.

Plain functions (no pytest needed) for bench scripts::

    from storage_servers import start_s3_server, start_gcs_server, export_store_env
    s3 = start_s3_server()            # S3Server(endpoint, stop, counter); unpacks as a 3-tuple
    gcs = start_gcs_server()          # GcsServer(endpoint, stop); unpacks as a 2-tuple
    restore = export_store_env(s3_endpoint=s3.endpoint, gcs_endpoint=gcs.endpoint)
    ...
    restore(); gcs.stop(); s3.stop()

pytest fixtures (this module is loaded with ``pytest_plugins = ["storage_servers"]``):

``s3_server`` (session) -> str
    endpoint URL of the in-process moto server; bucket ``ckptctl-test`` exists; the session's
    ``os.environ`` then carries AWS_ENDPOINT_URL, dummy keys, region us-west-2, empty AWS
    config files and AWS_EC2_METADATA_DISABLED=true, so CLI subprocesses reach it too.
``gcs_server`` (session) -> str
    endpoint URL of the emulator; bucket ``ckptctl-test`` exists; ``os.environ`` then carries
    STORAGE_EMULATOR_HOST and GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT=false.
``s3_request_counter`` (function) -> RequestCounter
    the S3 server's counter, reset at the start of the test.
``store_backend`` (function, params "local"/"s3"/"gs") -> Backend
``make_backend`` (function) -> ``make(kind) -> Backend`` for tests that pick one kind
``s3_denied`` (session) -> DeniedS3 (``s3_denied.use(monkeypatch, unknown_key=False)``)
``no_aws_credentials`` (function) -> dict
    applies :func:`no_credentials_env` to ``os.environ`` for the test and returns the full
    environment to hand to a subprocess.

Not possible with these real servers: access denied / no credentials on GCS
(gcp-storage-emulator checks no auth at all, and gcsfs without credentials silently falls back
to anonymous access after ~17 s of probing), and denial through an S3 *bucket policy* (moto
stores bucket policies but does not evaluate them).
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Callable, Iterable, Mapping, NamedTuple

import pytest

BUCKET = "ckptctl-test"
DENIED_BUCKET = "ckptctl-denied"
#: Not us-east-1: bucket creation with a us-east-1 LocationConstraint fails on moto/S3.
REGION = "us-west-2"
DUMMY_KEY_ID = "testing"
DUMMY_SECRET = "testing"
START_TIMEOUT_S = 30.0

#: Environment variables through which botocore could find real credentials or endpoints.
_AWS_CREDENTIAL_VARS = (
    "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_SECURITY_TOKEN",
    "AWS_PROFILE", "AWS_DEFAULT_PROFILE", "AWS_WEB_IDENTITY_TOKEN_FILE", "AWS_ROLE_ARN",
    "AWS_ROLE_SESSION_NAME", "AWS_CONTAINER_CREDENTIALS_RELATIVE_URI",
    "AWS_CONTAINER_CREDENTIALS_FULL_URI", "AWS_CONTAINER_AUTHORIZATION_TOKEN",
    "AWS_CONTAINER_AUTHORIZATION_TOKEN_FILE", "AWS_CREDENTIAL_PROCESS",
)


# ---------------------------------------------------------------------------------------------
# small utilities
# ---------------------------------------------------------------------------------------------
def free_port() -> int:
    """A currently free TCP port on 127.0.0.1 (the usual bind-to-0 trick; tiny race)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for_http(url: str, timeout: float = START_TIMEOUT_S, proc: subprocess.Popen | None = None,
                  log_path: str | None = None, what: str = "server") -> None:
    """Poll ``url`` until it answers any HTTP status; raise RuntimeError after ``timeout``."""
    deadline = time.monotonic() + timeout
    last: BaseException | None = None
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"{what} exited with code {proc.returncode} before accepting "
                               f"connections on {url}{_log_tail(log_path)}")
        try:
            with urllib.request.urlopen(url, timeout=2):
                return
        except urllib.error.HTTPError:
            return  # it answered: that's all we wait for
        except (OSError, urllib.error.URLError) as exc:
            last = exc
            time.sleep(0.05)
    raise RuntimeError(f"{what} did not accept connections on {url} within {timeout:.0f} s "
                       f"(last error: {last}){_log_tail(log_path)}")


def _log_tail(log_path: str | None) -> str:
    if not log_path or not os.path.exists(log_path):
        return ""
    with open(log_path, "rb") as f:
        tail = f.read()[-3000:].decode("utf-8", "replace")
    return f"\n--- server log ({log_path}) ---\n{tail}" if tail.strip() else ""


def _stopper(proc: subprocess.Popen, log_name: str) -> Callable[[], None]:
    """Stops a started server and removes its log file."""
    def stop() -> None:
        _stop_process(proc)
        try:
            os.unlink(log_name)
        except OSError:
            pass
    return stop


def _stop_process(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=5)


def _empty_aws_config_dir() -> str:
    d = tempfile.mkdtemp(prefix="ckptctl-aws-")
    for name in ("config", "credentials"):
        open(os.path.join(d, name), "w").close()
    return d


def apply_env(overlay: Mapping[str, str | None], target: dict | None = None) -> Callable[[], None]:
    """Apply ``overlay`` (value None = unset) to ``target`` (default ``os.environ``).

    Returns a function that restores the previous values.
    """
    env = os.environ if target is None else target
    saved = {k: env.get(k) for k in overlay}
    for k, v in overlay.items():
        if v is None:
            env.pop(k, None)
        else:
            env[k] = v

    def restore() -> None:
        for k, v in saved.items():
            if v is None:
                env.pop(k, None)
            else:
                env[k] = v

    return restore


def env_with(overlay: Mapping[str, str | None], base: Mapping[str, str] | None = None) -> dict:
    """A full environment dict (for ``subprocess.run(env=...)``): ``base`` + ``overlay``."""
    env = dict(os.environ if base is None else base)
    apply_env(overlay, env)
    return env


# ---------------------------------------------------------------------------------------------
# S3: moto in-process, with a request counter
# ---------------------------------------------------------------------------------------------
class S3Request(NamedTuple):
    method: str
    path: str  # URL path, e.g. "/ckptctl-test/some/key" (path-style addressing)
    query: str  # raw query string, e.g. "list-type=2&prefix=x%2F" or "delete"
    status: int


class RequestCounter:
    """Records every HTTP request the S3 server answers (except moto's own ``/moto-api``).

    ``count(method=None, path_contains=None, query_contains=None)`` counts matching requests
    since the last ``reset()``; ``list_objects()`` counts ListObjects(V2) pages and
    ``delete_objects()`` DeleteObjects (bulk delete) requests.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._requests: list[S3Request] = []
        self._timings: list[tuple[float, float, S3Request]] = []

    def record(self, req: S3Request) -> None:
        with self._lock:
            self._requests.append(req)

    def record_timing(self, started: float, seconds: float, req: S3Request) -> None:
        with self._lock:
            self._timings.append((started, seconds, req))

    def reset(self) -> None:
        with self._lock:
            self._requests.clear()
            self._timings.clear()

    @property
    def timings(self) -> list[tuple[float, float, S3Request]]:
        """``(time.monotonic() at arrival, seconds the server took, request)`` for each request
        answered: when the benches' requests came and how long the server worked on each."""
        with self._lock:
            return list(self._timings)

    @property
    def requests(self) -> list[S3Request]:
        with self._lock:
            return list(self._requests)

    def count(self, method: str | None = None, path_contains: str | None = None,
              query_contains: str | None = None) -> int:
        return sum(
            1 for r in self.requests
            if (method is None or r.method == method.upper())
            and (path_contains is None or path_contains in r.path)
            and (query_contains is None or query_contains in r.query)
        )

    def list_objects(self, bucket: str | None = None) -> int:
        """ListObjects/ListObjectsV2 requests (GET on a bucket, not on a key)."""
        n = 0
        for r in self.requests:
            parts = r.path.strip("/").split("/", 1)
            if r.method != "GET" or len(parts) != 1 or not parts[0]:
                continue
            if bucket is not None and parts[0] != bucket:
                continue
            q = urllib.parse.parse_qs(r.query, keep_blank_values=True)
            # bucket sub-resources (?location, ?versioning, ...) are not listings
            if q and not ({"list-type", "prefix", "delimiter", "marker", "continuation-token",
                           "max-keys", "encoding-type"} & q.keys()):
                continue
            n += 1
        return n

    def delete_objects(self) -> int:
        """DeleteObjects (``POST /bucket?delete``) requests."""
        return sum(1 for r in self.requests
                   if r.method == "POST" and "delete" in urllib.parse.parse_qs(r.query, keep_blank_values=True))

    def summary(self) -> str:
        """One line per request, for assertion messages."""
        return "\n".join(f"{r.method} {r.path}?{r.query} -> {r.status}" for r in self.requests)


class _CountingMiddleware:
    def __init__(self, app, counter: RequestCounter):
        self.app = app
        self.counter = counter

    def __call__(self, environ, start_response):
        method = environ.get("REQUEST_METHOD", "")
        path = environ.get("PATH_INFO", "")
        query = environ.get("QUERY_STRING", "")

        started = time.monotonic()
        answered: list[S3Request] = []

        def counting_start_response(status, headers, exc_info=None):
            if not path.startswith("/moto-api"):
                try:
                    code = int(str(status).split()[0])
                except ValueError:
                    code = 0
                answered.append(S3Request(method, path, query, code))
                self.counter.record(answered[-1])
            return start_response(status, headers, exc_info)

        try:
            return self.app(environ, counting_start_response)
        finally:  # moto builds its whole answer in the call: this is the server's time on it
            if answered:
                self.counter.record_timing(started, time.monotonic() - started, answered[-1])


class S3Server(NamedTuple):
    """Unpacks as ``endpoint, stop, counter``."""

    endpoint: str
    stop: Callable[[], None]
    counter: RequestCounter | None  # None for a subprocess server


_BOTO_CLIENTS: dict[tuple, object] = {}
_BOTO_LOCK = threading.Lock()
#: Endpoints of S3 servers running in this process (their objects can be written directly).
_IN_PROCESS_S3: set[str] = set()


def _boto3_client(endpoint: str, service: str = "s3", key_id: str = DUMMY_KEY_ID,
                  secret: str = DUMMY_SECRET):
    """A cached boto3 client (creating one costs ~0.3 s; clients are thread-safe)."""
    key = (endpoint, service, key_id, secret)
    with _BOTO_LOCK:
        client = _BOTO_CLIENTS.get(key)
        if client is None:
            import boto3
            from botocore.config import Config

            client = boto3.session.Session().client(
                service, endpoint_url=endpoint, region_name=REGION,
                aws_access_key_id=key_id, aws_secret_access_key=secret,
                config=Config(retries={"max_attempts": 2, "mode": "standard"},
                              max_pool_connections=32),
            )
            _BOTO_CLIENTS[key] = client
        return client


def put_objects_directly(endpoint: str, bucket: str, objects: Mapping[str, bytes]) -> None:
    """Create many objects fast by writing into the in-process moto backend (no HTTP).

    Only for a server started by :func:`start_s3_server` in this process. ~50x faster than
    PUTs (2500 objects: ~0.1 s instead of ~20 s with server and client sharing one GIL);
    the objects are ordinary moto objects, listed/read/deleted over HTTP like any other, and
    these writes do not show in the request counter.
    """
    if endpoint not in _IN_PROCESS_S3:
        raise ValueError(f"{endpoint} is not an in-process moto server")
    from moto.core import DEFAULT_ACCOUNT_ID
    from moto.s3.models import s3_backends

    backend = s3_backends[DEFAULT_ACCOUNT_ID]["aws"]
    for key, value in objects.items():
        backend.put_object(bucket, key, value)


def create_s3_bucket(endpoint: str, bucket: str) -> None:
    client = _boto3_client(endpoint)
    client.create_bucket(Bucket=bucket, CreateBucketConfiguration={"LocationConstraint": REGION})


def start_s3_server(bucket: str | None = BUCKET) -> S3Server:
    """Start moto's S3 API server in this process on 127.0.0.1:<free port>.

    Returns ``S3Server(endpoint, stop, counter)``. ``bucket`` (if not None) is created.
    """
    from moto.moto_server.werkzeug_app import (DomainDispatcherApplication, MotoRequestHandler,
                                               create_backend_app)
    from werkzeug.serving import make_server

    class QuietHandler(MotoRequestHandler):
        def log_request(self, *args, **kwargs):  # keep test output clean
            pass

    counter = RequestCounter()
    app = _CountingMiddleware(DomainDispatcherApplication(create_backend_app), counter)
    server = make_server("127.0.0.1", 0, app, threaded=True, request_handler=QuietHandler)
    port = server.server_address[1]
    thread = threading.Thread(target=server.serve_forever, name=f"moto-s3-{port}", daemon=True)
    thread.start()
    endpoint = f"http://127.0.0.1:{port}"

    def stop() -> None:
        _IN_PROCESS_S3.discard(endpoint)
        server.shutdown()
        server.server_close()
        thread.join(timeout=10)

    _IN_PROCESS_S3.add(endpoint)
    try:
        wait_for_http(endpoint + "/moto-api/", what="moto S3 server")
        if bucket:
            create_s3_bucket(endpoint, bucket)
    except BaseException:
        stop()
        raise
    counter.reset()
    return S3Server(endpoint, stop, counter)


def start_s3_subprocess_server(extra_env: Mapping[str, str | None] | None = None,
                               attempts: int = 3) -> tuple[str, Callable[[], None]]:
    """Start ``python -m moto.server`` as a subprocess on a free loopback port.

    Its moto state (including the auth switch) is separate from the in-process server's.
    Returns ``(endpoint, stop)``.
    """
    last_error: Exception | None = None
    for _ in range(attempts):
        port = free_port()
        log = tempfile.NamedTemporaryFile(prefix="ckptctl-moto-", suffix=".log", delete=False)
        env = env_with({"INITIAL_NO_AUTH_ACTION_COUNT": None, **(extra_env or {})})
        proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                                stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env)
        log.close()
        endpoint = f"http://127.0.0.1:{port}"
        try:
            wait_for_http(endpoint + "/moto-api/", proc=proc, log_path=log.name, what="moto_server")
        except RuntimeError as exc:
            _stop_process(proc)
            last_error = exc
            continue

        return endpoint, _stopper(proc, log.name)
    raise RuntimeError(f"could not start moto_server after {attempts} attempts: {last_error}")


# ---------------------------------------------------------------------------------------------
# GCS: gcp-storage-emulator subprocess
# ---------------------------------------------------------------------------------------------
class GcsServer(NamedTuple):
    """Unpacks as ``endpoint, stop``."""

    endpoint: str
    stop: Callable[[], None]


def start_gcs_server(bucket: str | None = BUCKET, attempts: int = 3) -> GcsServer:
    """Start ``gcp-storage-emulator`` (in-memory) as a subprocess on 127.0.0.1:<free port>."""
    last_error: Exception | None = None
    for _ in range(attempts):
        port = free_port()
        log = tempfile.NamedTemporaryFile(prefix="ckptctl-gcs-", suffix=".log", delete=False)
        cmd = [sys.executable, "-m", "gcp_storage_emulator", "start", "--host", "127.0.0.1",
               "--port", str(port), "--in-memory", "--quiet"]
        if bucket:
            cmd += ["--default-bucket", bucket]
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        log.close()
        endpoint = f"http://127.0.0.1:{port}"
        try:
            wait_for_http(endpoint + "/", proc=proc, log_path=log.name, what="gcp-storage-emulator")
            if bucket:
                # --default-bucket is created before the server starts listening, but check.
                with urllib.request.urlopen(f"{endpoint}/storage/v1/b/{bucket}", timeout=5) as r:
                    r.read()
        except (RuntimeError, OSError) as exc:
            _stop_process(proc)
            last_error = exc
            continue

        return GcsServer(endpoint, _stopper(proc, log.name))
    raise RuntimeError(f"could not start gcp-storage-emulator after {attempts} attempts: {last_error}")


def create_gcs_bucket(endpoint: str, bucket: str) -> None:
    body = json.dumps({"name": bucket}).encode()
    req = urllib.request.Request(f"{endpoint}/storage/v1/b?project=test", data=body, method="POST",
                                 headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=10) as r:
        r.read()


# ---------------------------------------------------------------------------------------------
# environments
# ---------------------------------------------------------------------------------------------
def s3_env(endpoint: str, config_dir: str) -> dict[str, str | None]:
    """Env overlay pointing botocore/s3fs at ``endpoint`` with dummy keys, isolated from ~/.aws."""
    overlay: dict[str, str | None] = {k: None for k in _AWS_CREDENTIAL_VARS}
    overlay.update({
        "AWS_ACCESS_KEY_ID": DUMMY_KEY_ID,
        "AWS_SECRET_ACCESS_KEY": DUMMY_SECRET,
        "AWS_ENDPOINT_URL": endpoint,
        "AWS_ENDPOINT_URL_S3": None,  # would take precedence over AWS_ENDPOINT_URL
        "AWS_DEFAULT_REGION": REGION,
        "AWS_REGION": None,
        "AWS_CONFIG_FILE": os.path.join(config_dir, "config"),
        "AWS_SHARED_CREDENTIALS_FILE": os.path.join(config_dir, "credentials"),
        "AWS_EC2_METADATA_DISABLED": "true",
    })
    return overlay


def gcs_env(endpoint: str) -> dict[str, str | None]:
    return {
        "STORAGE_EMULATOR_HOST": endpoint,
        "GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT": "false",
    }


def export_store_env(s3_endpoint: str | None = None, gcs_endpoint: str | None = None) -> Callable[[], None]:
    """Put the S3/GCS emulator env into ``os.environ``; returns a function restoring it."""
    overlay: dict[str, str | None] = {}
    config_dir = None
    if s3_endpoint:
        config_dir = _empty_aws_config_dir()
        overlay.update(s3_env(s3_endpoint, config_dir))
    if gcs_endpoint:
        overlay.update(gcs_env(gcs_endpoint))
    restore_env = apply_env(overlay)

    def restore() -> None:
        restore_env()
        if config_dir:
            shutil.rmtree(config_dir, ignore_errors=True)

    return restore


def no_credentials_env(config_dir: str | None = None) -> dict[str, str | None]:
    """Env overlay under which botocore finds NO credentials at all.

    Unsets every credential/profile variable, points AWS_CONFIG_FILE and
    AWS_SHARED_CREDENTIALS_FILE at empty files and disables IMDS (AWS_EC2_METADATA_DISABLED),
    so the chain ends quickly with botocore's NoCredentialsError ("Unable to locate
    credentials"), raised client-side before any request: s3fs does not fall back to anonymous
    access. Keeps AWS_ENDPOINT_URL, so the request would go to the emulator if it were signed.
    (GCS has no equivalent: without credentials gcsfs silently falls back to anonymous access,
    which the emulator accepts.)
    """
    config_dir = config_dir or _empty_aws_config_dir()
    overlay: dict[str, str | None] = {k: None for k in _AWS_CREDENTIAL_VARS}
    overlay.update({
        "AWS_CONFIG_FILE": os.path.join(config_dir, "config"),
        "AWS_SHARED_CREDENTIALS_FILE": os.path.join(config_dir, "credentials"),
        "AWS_EC2_METADATA_DISABLED": "true",
    })
    for name in ("config", "credentials"):
        path = os.path.join(config_dir, name)
        if not os.path.exists(path):
            open(path, "w").close()
    return overlay


# ---------------------------------------------------------------------------------------------
# access denied (S3)
# ---------------------------------------------------------------------------------------------
@dataclass
class DeniedS3:
    """A moto server (subprocess) that enforces IAM auth, with one bucket of real objects.

    What moto's server actually enforces (moto 5.2.5), as found by experiment:

    * bucket policies are stored but never evaluated, so "deny via bucket policy" is NOT
      possible;
    * with auth switched on (``POST /moto-api/reset-auth`` body ``0``), each request's SigV4
      signature is checked against IAM access keys and the user's IAM policies are evaluated.
      The switch is process-global, hence this separate server.

    Two ways to be denied, both answered by the server with HTTP 403:

    * ``env`` - valid key of IAM user ``ckptctl-denied`` whose inline policy denies ``*``:
      S3 answers ``AccessDenied`` (HEAD answers a bare 403 "Forbidden").
    * ``unknown_key_env`` - a key id moto has never issued: ``InvalidAccessKeyId``.

    ``url`` is a prefix holding ``files`` (written before auth was switched on), so a denial
    is not confused with "not found". Apply an env overlay with :func:`apply_env` /
    ``monkeypatch.setenv`` in-process, or :func:`env_with` for a subprocess.
    """

    endpoint: str
    bucket: str
    url: str
    files: dict[str, bytes]
    env: dict[str, str | None] = field(repr=False)
    unknown_key_env: dict[str, str | None] = field(repr=False)
    stop: Callable[[], None] = field(repr=False)
    admin_keys: tuple[str, str] = field(repr=False, default=("", ""))  # an allow-all IAM user

    def list_keys(self) -> list[str]:
        """Every key in the bucket, listed with the allow-all user (to check nothing was deleted)."""
        client = _boto3_client(self.endpoint, key_id=self.admin_keys[0], secret=self.admin_keys[1])
        return sorted(o["Key"] for o in client.list_objects_v2(Bucket=self.bucket).get("Contents", []))

    def use(self, monkeypatch, unknown_key: bool = False) -> dict:
        """Point this test's ``os.environ`` at the denying server; returns the full env."""
        for k, v in (self.unknown_key_env if unknown_key else self.env).items():
            if v is None:
                monkeypatch.delenv(k, raising=False)
            else:
                monkeypatch.setenv(k, v)
        return dict(os.environ)


def start_denied_s3_server() -> DeniedS3:
    endpoint, stop = start_s3_subprocess_server()
    try:
        create_s3_bucket(endpoint, DENIED_BUCKET)
        s3 = _boto3_client(endpoint)
        files = {"ckpt/global_step_1/trainer_state.pt": b"state", "ckpt/latest_ckpt_global_step.txt": b"1"}
        for rel, data in files.items():
            s3.put_object(Bucket=DENIED_BUCKET, Key=rel, Body=data)
        iam = _boto3_client(endpoint, "iam")
        iam.create_user(UserName="ckptctl-denied")
        key = iam.create_access_key(UserName="ckptctl-denied")["AccessKey"]
        iam.put_user_policy(UserName="ckptctl-denied", PolicyName="deny-all", PolicyDocument=json.dumps(
            {"Version": "2012-10-17", "Statement": [{"Effect": "Deny", "Action": "*", "Resource": "*"}]}))
        iam.create_user(UserName="ckptctl-admin")
        admin = iam.create_access_key(UserName="ckptctl-admin")["AccessKey"]
        iam.put_user_policy(UserName="ckptctl-admin", PolicyName="allow-all", PolicyDocument=json.dumps(
            {"Version": "2012-10-17", "Statement": [{"Effect": "Allow", "Action": "*", "Resource": "*"}]}))
        req = urllib.request.Request(endpoint + "/moto-api/reset-auth", data=b"0", method="POST",
                                     headers={"Content-Type": "text/plain"})  # not form-encoded
        with urllib.request.urlopen(req, timeout=10) as r:
            r.read()
    except BaseException:
        stop()
        raise
    config_dir = _empty_aws_config_dir()
    base = s3_env(endpoint, config_dir)
    stop_server = stop

    def stop() -> None:
        stop_server()
        shutil.rmtree(config_dir, ignore_errors=True)

    denied_env = dict(base, AWS_ACCESS_KEY_ID=key["AccessKeyId"], AWS_SECRET_ACCESS_KEY=key["SecretAccessKey"])
    unknown_env = dict(base, AWS_ACCESS_KEY_ID="AKIAUNKNOWNKEY000000", AWS_SECRET_ACCESS_KEY="nope")
    return DeniedS3(endpoint, DENIED_BUCKET, f"s3://{DENIED_BUCKET}/ckpt",
                    {k.split("/", 1)[1]: v for k, v in files.items()}, denied_env, unknown_env, stop,
                    (admin["AccessKeyId"], admin["SecretAccessKey"]))


# ---------------------------------------------------------------------------------------------
# independent clients (boto3 / raw GCS JSON API), used by Backend
# ---------------------------------------------------------------------------------------------
def _split_bucket(url: str) -> tuple[str, str]:
    rest = url.split("://", 1)[1]
    bucket, _, key = rest.partition("/")
    return bucket, key  # a trailing "/" is kept: "s3://b/dir/" names a directory-marker object


def _gcs_put(endpoint: str, bucket: str, name: str, data: bytes) -> None:
    # multipart, not uploadType=media: the emulator drops the connection on an empty media body
    boundary = uuid.uuid4().hex
    body = b"".join([
        f"--{boundary}\r\nContent-Type: application/json; charset=UTF-8\r\n\r\n".encode(),
        json.dumps({"name": name}).encode(),
        f"\r\n--{boundary}\r\nContent-Type: application/octet-stream\r\n\r\n".encode(),
        data,
        f"\r\n--{boundary}--\r\n".encode(),
    ])
    req = urllib.request.Request(f"{endpoint}/upload/storage/v1/b/{bucket}/o?uploadType=multipart", data=body,
                                 method="POST",
                                 headers={"Content-Type": f'multipart/related; boundary="{boundary}"'})
    with urllib.request.urlopen(req, timeout=30) as r:
        r.read()


def _gcs_get(endpoint: str, bucket: str, name: str) -> bytes:
    quoted = urllib.parse.quote(name, safe="")
    with urllib.request.urlopen(f"{endpoint}/storage/v1/b/{bucket}/o/{quoted}?alt=media", timeout=30) as r:
        return r.read()


def _gcs_list(endpoint: str, bucket: str, prefix: str) -> list[str]:
    names: list[str] = []
    token = None
    while True:
        params = {"prefix": prefix}
        if token:
            params["pageToken"] = token
        with urllib.request.urlopen(f"{endpoint}/storage/v1/b/{bucket}/o?{urllib.parse.urlencode(params)}",
                                    timeout=30) as r:
            page = json.loads(r.read() or b"{}")
        names += [item["name"] for item in page.get("items", [])]
        token = page.get("nextPageToken")
        if not token:
            return names


def _s3_list(client, bucket: str, prefix: str) -> list[str]:
    keys: list[str] = []
    for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix):
        keys += [obj["Key"] for obj in page.get("Contents", [])]
    return keys


@dataclass
class Backend:
    """One storage backend for parametrized tests, with helpers that do NOT go through ckptctl.

    Independent clients: boto3 for S3, raw HTTP to the emulator's JSON API for GCS, plain
    os/shutil locally. URLs are full URLs (``s3://bucket/key``, ``gs://bucket/key``) or, for
    ``local``, absolute paths.
    """

    kind: str  # "local" | "s3" | "gs"
    endpoint: str | None = None  # S3 endpoint or GCS emulator URL; None for local
    base_dir: str | None = None  # local: the directory new roots go in
    bucket: str = BUCKET
    counter: RequestCounter | None = None  # s3 only

    @property
    def s3(self):
        """A boto3 S3 client for this backend's endpoint (cached per endpoint)."""
        return _boto3_client(self.endpoint)

    def new_root(self) -> str:
        """A fresh, unique root that holds nothing (locally: a path that does not exist yet)."""
        name = uuid.uuid4().hex[:16]
        if self.kind == "local":
            return os.path.join(self.base_dir, name)
        return f"{self.kind}://{self.bucket}/{name}"

    def join(self, root: str, rel: str) -> str:
        return os.path.join(root, *rel.split("/")) if self.kind == "local" else f"{root.rstrip('/')}/{rel}"

    def new_bucket(self) -> str:
        """Create a fresh, empty bucket; returns its URL (``s3://name`` / ``gs://name``)."""
        if self.kind == "local":
            raise ValueError("no buckets on local disk")
        name = f"ckptctl-{uuid.uuid4().hex[:12]}"
        if self.kind == "s3":
            create_s3_bucket(self.endpoint, name)
        else:
            create_gcs_bucket(self.endpoint, name)
        return f"{self.kind}://{name}"

    def put(self, url: str, data: bytes) -> None:
        if self.kind == "local":
            os.makedirs(os.path.dirname(url), exist_ok=True)
            with open(url, "wb") as f:
                f.write(data)
        elif self.kind == "s3":
            bucket, key = _split_bucket(url)
            self.s3.put_object(Bucket=bucket, Key=key, Body=data)
        else:
            bucket, key = _split_bucket(url)
            _gcs_put(self.endpoint, bucket, key, data)

    def put_many(self, root: str, files: Mapping[str, bytes], workers: int = 8, direct: bool = False) -> None:
        """Write ``{relative path: bytes}`` under ``root``, concurrently on object stores.

        ``direct=True`` (s3 only) writes straight into the in-process moto backend: see
        :func:`put_objects_directly`; use it for thousands of objects.
        """
        if direct:
            if self.kind != "s3":
                raise ValueError("direct=True is only for the s3 backend")
            bucket, key = _split_bucket(root.rstrip("/"))
            put_objects_directly(self.endpoint, bucket,
                                 {f"{key}/{rel}" if key else rel: data for rel, data in files.items()})
            return
        if self.kind == "local":
            for rel, data in files.items():
                self.put(self.join(root, rel), data)
            return
        if self.kind == "gs":
            # The emulator is a single-threaded http.server with a listen backlog of 5:
            # concurrent uploads only get connections reset, and gain nothing.
            workers = 1
        with ThreadPoolExecutor(workers) as pool:
            list(pool.map(lambda item: self.put(self.join(root, item[0]), item[1]), files.items()))

    def get(self, url: str) -> bytes:
        if self.kind == "local":
            with open(url, "rb") as f:
                return f.read()
        bucket, key = _split_bucket(url)
        if self.kind == "s3":
            return self.s3.get_object(Bucket=bucket, Key=key)["Body"].read()
        return _gcs_get(self.endpoint, bucket, key)

    def upload_dir(self, local_dir: str, root_url: str) -> None:
        """Copy the local tree ``local_dir`` to ``root_url`` (merging into what is there)."""
        if self.kind == "local":
            shutil.copytree(local_dir, root_url, dirs_exist_ok=True)
            return
        files = {}
        for dirpath, _dirs, names in os.walk(local_dir):
            for name in names:
                full = os.path.join(dirpath, name)
                rel = os.path.relpath(full, local_dir).replace(os.sep, "/")
                with open(full, "rb") as f:
                    files[rel] = f.read()
        self.put_many(root_url, files)

    def list_files(self, root_url: str) -> list[str]:
        """Sorted relative paths of all files under ``root_url`` ([] if nothing is there)."""
        if self.kind == "local":
            out = []
            for dirpath, _dirs, names in os.walk(root_url):
                for name in names:
                    out.append(os.path.relpath(os.path.join(dirpath, name), root_url).replace(os.sep, "/"))
            return sorted(out)
        bucket, key = _split_bucket(root_url.rstrip("/"))
        prefix = f"{key}/" if key else ""
        names = _s3_list(self.s3, bucket, prefix) if self.kind == "s3" else _gcs_list(self.endpoint, bucket, prefix)
        return sorted(n[len(prefix):] for n in names if not n.endswith("/"))


# ---------------------------------------------------------------------------------------------
# pytest fixtures
# ---------------------------------------------------------------------------------------------
def pytest_configure(config) -> None:
    # Must be set before gcsfs is first imported anywhere in the session, or gcsfs tries a
    # gRPC/TLS API the emulator lacks and retries forever. Harmless for real GCS in tests.
    os.environ.setdefault("GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT", "false")


@pytest.fixture(scope="session")
def _s3_server_handle(tmp_path_factory) -> Iterable[S3Server]:
    server = start_s3_server()
    config_dir = str(tmp_path_factory.mktemp("aws-config"))
    for name in ("config", "credentials"):
        open(os.path.join(config_dir, name), "w").close()
    restore = apply_env(s3_env(server.endpoint, config_dir))
    try:
        yield server
    finally:
        restore()
        server.stop()


@pytest.fixture(scope="session")
def s3_server(_s3_server_handle: S3Server) -> str:
    """Endpoint URL of the session's in-process moto S3 server (bucket ``ckptctl-test``)."""
    return _s3_server_handle.endpoint


@pytest.fixture
def s3_request_counter(_s3_server_handle: S3Server) -> RequestCounter:
    """The S3 server's request counter, reset at the start of the test."""
    counter = _s3_server_handle.counter
    counter.reset()
    return counter


@pytest.fixture(scope="session")
def gcs_server() -> Iterable[str]:
    """Endpoint URL of the session's gcp-storage-emulator (bucket ``ckptctl-test``)."""
    server = start_gcs_server()
    restore = apply_env(gcs_env(server.endpoint))
    try:
        yield server.endpoint
    finally:
        restore()
        server.stop()


@pytest.fixture(params=["local", "s3", "gs"], ids=["local", "s3", "gs"])
def store_backend(request, tmp_path) -> Backend:
    kind = request.param
    if kind == "local":
        base = tmp_path / "store"
        base.mkdir()
        return Backend("local", base_dir=str(base))
    if kind == "s3":
        handle: S3Server = request.getfixturevalue("_s3_server_handle")
        return Backend("s3", endpoint=handle.endpoint, counter=handle.counter)
    return Backend("gs", endpoint=request.getfixturevalue("gcs_server"))


@pytest.fixture
def make_backend(request, tmp_path) -> Callable[[str], Backend]:
    """``make_backend(kind)`` -> Backend, for tests not parametrized over all three kinds."""

    def make(kind: str) -> Backend:
        if kind == "s3":
            handle: S3Server = request.getfixturevalue("_s3_server_handle")
            return Backend("s3", endpoint=handle.endpoint, counter=handle.counter)
        if kind in ("gs", "gcs"):
            return Backend("gs", endpoint=request.getfixturevalue("gcs_server"))
        if kind == "local":
            base = tmp_path / f"store-{uuid.uuid4().hex[:8]}"
            base.mkdir()
            return Backend("local", base_dir=str(base))
        raise ValueError(f"unknown backend kind {kind!r}")

    return make


@pytest.fixture(scope="session")
def s3_denied() -> Iterable[DeniedS3]:
    """A separate auth-enforcing moto server; see :class:`DeniedS3`."""
    denied = start_denied_s3_server()
    try:
        yield denied
    finally:
        denied.stop()


@pytest.fixture
def no_aws_credentials(_s3_server_handle, tmp_path, monkeypatch) -> dict:
    """No AWS credentials anywhere for this test (see :func:`no_credentials_env`).

    Applied to ``os.environ`` for the test; returns the full environment for subprocesses.
    AWS_ENDPOINT_URL still points at the session's S3 server (started first, so its session
    env cannot overwrite this test's). botocore fails client-side with NoCredentialsError
    before sending anything, so no server is involved in the failure.
    """
    config_dir = tmp_path / "no-aws-credentials"
    config_dir.mkdir()
    overlay = no_credentials_env(str(config_dir))
    for k, v in overlay.items():
        if v is None:
            monkeypatch.delenv(k, raising=False)
        else:
            monkeypatch.setenv(k, v)
    return dict(os.environ)
