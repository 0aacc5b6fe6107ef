"""A stand-in for the Kubernetes API server's Secret endpoints.

Real HTTPS on loopback with a certificate made for each run, the real JSON
wire format, and the API server's semantics where the driver can observe
them:

* core/v1 Secrets: get, list, create, update, delete, and watch (chunked
  JSON event stream) under /api/v1/namespaces/{ns}/secrets.
* One resourceVersion counter for the whole store; list and watch honour it;
  a watch from a version older than the retained history gets a 410 Expired
  ERROR event, as after etcd compaction.
* Bearer-token authentication (401 Unauthorized) and a small RBAC model of
  (user, namespace, verb, name) grants (403 Forbidden with the API server's
  wording).
* Every failure is a `Status` object with code, reason and message.
* Faults can be injected: an HTTP status, a delay, or a dropped connection,
  for the next N matching requests.

The server keeps a log of requests (method, path, user) so tests can assert
how the driver talked to it. Secret values never appear in that log.
"""

from __future__ import annotations

import base64
import contextlib
import json
import re
import socket
import ssl
import subprocess
import sys
import threading
import time
import uuid
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

ADMIN = "system:admin"

_REASONS = {
    400: "BadRequest",
    401: "Unauthorized",
    403: "Forbidden",
    404: "NotFound",
    405: "MethodNotAllowed",
    409: "Conflict",
    410: "Expired",
    422: "Invalid",
    429: "TooManyRequests",
    500: "InternalError",
    503: "ServiceUnavailable",
    504: "Timeout",
}

_NAME = re.compile(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*")
_KEY = re.compile(r"[-._a-zA-Z0-9]+")
# Go's http.ResponseWriter buffers this much before it switches to chunked.
_GO_BUFFER = 4096
_PATH = re.compile(r"^/api/v1/namespaces/(?P<ns>[^/]+)/secrets(?:/(?P<name>[^/]+))?$")


def status_body(
    code: int, message: str, reason: str | None = None, details: dict[str, Any] | None = None
) -> dict[str, Any]:
    body: dict[str, Any] = {
        "kind": "Status",
        "apiVersion": "v1",
        "metadata": {},
        "status": "Failure",
        "message": message,
        "reason": reason or _REASONS.get(code, "Unknown"),
        "code": code,
    }
    if details:
        body["details"] = details
    return body


class ApiError(Exception):
    def __init__(
        self,
        code: int,
        message: str,
        reason: str | None = None,
        details: dict[str, Any] | None = None,
    ) -> None:
        super().__init__(message)
        self.body = status_body(code, message, reason, details)
        self.code = code


@dataclass
class Fault:
    """What to do to the next `times` requests whose path contains `path`."""

    status: int | None = None  # answer with this code and a Status body
    delay: float = 0.0  # wait this long first
    drop: bool = False  # close the connection without answering
    trailing: bytes = b""  # extra bytes sent after the real answer
    misframed: bool = False  # the real answer, chunked, its first chunk's size understated
    times: int = 1
    path: str = ""
    method: str = ""


@dataclass
class Request:
    method: str
    path: str
    user: str | None
    status: int = 0


@dataclass
class _Event:
    rv: int
    type: str
    obj: dict[str, Any]


@dataclass
class Store:
    """Secrets with one resourceVersion counter and a bounded event history."""

    history_limit: int = 1000
    rv: int = 100
    objects: dict[tuple[str, str], dict[str, Any]] = field(default_factory=dict)
    events: list[_Event] = field(default_factory=list)
    oldest_rv: int = 100  # a watch may start at any version from here on
    changed: threading.Condition = field(default_factory=threading.Condition)

    def _record(self, kind: str, obj: dict[str, Any]) -> None:
        self.events.append(_Event(self.rv, kind, obj))
        if len(self.events) > self.history_limit:
            dropped = self.events[: len(self.events) - self.history_limit]
            del self.events[: len(dropped)]
            self.oldest_rv = dropped[-1].rv
        self.changed.notify_all()

    def compact(self) -> None:
        """Forget all history, as etcd compaction does: older watches get 410."""
        with self.changed:
            self.events.clear()
            self.oldest_rv = self.rv

    def put(
        self,
        namespace: str,
        name: str,
        data: dict[str, str],
        *,
        create: bool,
        expect_rv: str | None = None,
        type_: str = "Opaque",
    ) -> dict[str, Any]:
        with self.changed:
            old = self.objects.get((namespace, name))
            if create and old is not None:
                raise ApiError(
                    409,
                    f'secrets "{name}" already exists',
                    "AlreadyExists",
                    {"name": name, "kind": "secrets"},
                )
            if not create and old is None:
                raise ApiError(
                    404, f'secrets "{name}" not found', None, {"name": name, "kind": "secrets"}
                )
            if old is not None and expect_rv and expect_rv != old["metadata"]["resourceVersion"]:
                raise ApiError(
                    409,
                    f'Operation cannot be fulfilled on secrets "{name}": the '
                    "object has been modified; please apply your changes to the "
                    "latest version and try again",
                    "Conflict",
                    {"name": name, "kind": "secrets"},
                )
            self.rv += 1
            meta = (
                dict(old["metadata"])
                if old
                else {
                    "name": name,
                    "namespace": namespace,
                    "uid": str(uuid.uuid4()),
                    "creationTimestamp": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                }
            )
            meta["resourceVersion"] = str(self.rv)
            obj = {"kind": "Secret", "apiVersion": "v1", "metadata": meta, "type": type_}
            if data:
                obj["data"] = dict(data)
            self.objects[(namespace, name)] = obj
            self._record("MODIFIED" if old else "ADDED", obj)
            return obj

    def delete(self, namespace: str, name: str) -> dict[str, Any]:
        with self.changed:
            obj = self.objects.pop((namespace, name), None)
            if obj is None:
                raise ApiError(
                    404, f'secrets "{name}" not found', None, {"name": name, "kind": "secrets"}
                )
            self.rv += 1
            gone = json.loads(json.dumps(obj))
            gone["metadata"]["resourceVersion"] = str(self.rv)
            self._record("DELETED", gone)
            return gone


class FakeKubeAPI:
    """The server. Use as a context manager, or call start() and stop()."""

    def __init__(self, workdir: Path) -> None:
        self.workdir = Path(workdir)
        self.store = Store()
        self.tokens: dict[str, str] = {}  # bearer token -> user name
        self.grants: set[tuple[str, str, str, str]] = set()  # user, namespace, verb, name|*
        self.requests: list[Request] = []
        self.connections = 0  # TCP connections accepted, to observe keep-alive
        self._faults: list[Fault] = []
        self._lock = threading.Lock()
        self._stopping = threading.Event()
        self._httpd: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None
        self.ca_file = self.workdir / "ca.crt"

    # ---- lifecycle -----------------------------------------------------

    def start(self) -> FakeKubeAPI:
        self.workdir.mkdir(parents=True, exist_ok=True)
        key = self.workdir / "server.key"
        subprocess.run(
            [
                "openssl",
                "req",
                "-x509",
                "-newkey",
                "ec",
                "-pkeyopt",
                "ec_paramgen_curve:P-256",
                "-nodes",
                "-days",
                "1",
                "-subj",
                "/CN=kube-apiserver-standin",
                "-addext",
                "subjectAltName=IP:127.0.0.1,DNS:localhost",
                "-keyout",
                str(key),
                "-out",
                str(self.ca_file),
            ],
            check=True,
            capture_output=True,
        )
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.load_cert_chain(self.ca_file, key)
        httpd = _Server(("127.0.0.1", 0), _Handler)
        httpd.api = self
        httpd.socket = context.wrap_socket(
            httpd.socket, server_side=True, do_handshake_on_connect=False
        )
        self._httpd = httpd
        self._thread = threading.Thread(
            target=httpd.serve_forever,
            name="fake-kube-api",
            kwargs={"poll_interval": 0.05},
            daemon=True,
        )
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stopping.set()
        with self.store.changed:
            self.store.changed.notify_all()
        if self._httpd is not None:
            self._httpd.shutdown()
            self._httpd.server_close()
        if self._thread is not None:
            self._thread.join(5)

    def __enter__(self) -> FakeKubeAPI:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    @property
    def url(self) -> str:
        assert self._httpd is not None
        return f"https://127.0.0.1:{self._httpd.server_address[1]}"

    # ---- set-up helpers for tests ---------------------------------------

    def add_user(self, user: str, token: str | None = None) -> str:
        token = token or base64.urlsafe_b64encode(uuid.uuid4().bytes).decode().rstrip("=")
        self.tokens[token] = user
        return token

    def grant(self, user: str, namespace: str, verb: str = "get", name: str = "*") -> None:
        self.grants.add((user, namespace, verb, name))

    def set_secret(self, namespace: str, name: str, values: dict[str, bytes]) -> dict[str, Any]:
        data = {k: base64.b64encode(v).decode() for k, v in values.items()}
        exists = (namespace, name) in self.store.objects
        return self.store.put(namespace, name, data, create=not exists)

    def delete_secret(self, namespace: str, name: str) -> None:
        self.store.delete(namespace, name)

    def inject(self, fault: Fault) -> None:
        with self._lock:
            self._faults.append(fault)

    def clear_faults(self) -> None:
        with self._lock:
            self._faults.clear()

    def write_kubeconfig(self, path: Path, token: str) -> Path:
        config = {
            "apiVersion": "v1",
            "kind": "Config",
            "current-context": "standin",
            "clusters": [
                {
                    "name": "standin",
                    "cluster": {"server": self.url, "certificate-authority": str(self.ca_file)},
                }
            ],
            "users": [{"name": "driver", "user": {"token": token}}],
            "contexts": [{"name": "standin", "context": {"cluster": "standin", "user": "driver"}}],
        }
        path.write_text(json.dumps(config, indent=2))  # JSON is valid YAML
        return path

    def count(self, method: str = "GET", path: str = "") -> int:
        with self._lock:
            return sum(1 for r in self.requests if r.method == method and path in r.path)

    # ---- request handling ---------------------------------------------

    def _take_fault(self, method: str, path: str) -> Fault | None:
        with self._lock:
            for fault in self._faults:
                if fault.path in path and fault.method in ("", method):
                    fault.times -= 1
                    if fault.times <= 0:
                        self._faults.remove(fault)
                    return fault
        return None

    def _authenticate(self, header: str | None) -> str:
        if not header or not header.startswith("Bearer "):
            raise ApiError(401, "Unauthorized")
        user = self.tokens.get(header[len("Bearer ") :])
        if user is None:
            raise ApiError(401, "Unauthorized")
        return user

    def _authorize(self, user: str, verb: str, namespace: str, name: str | None) -> None:
        if user == ADMIN:
            return
        for n in (name, "*") if name else ("*",):
            if (user, namespace, verb, n) in self.grants:
                return
        target = f'secrets "{name}"' if name else "secrets"
        raise ApiError(
            403,
            f'{target} is forbidden: User "{user}" cannot {verb} resource '
            f'"secrets" in API group "" in the namespace "{namespace}"',
            None,
            {"name": name or "", "kind": "secrets"},
        )


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    api: FakeKubeAPI

    def handle_error(self, request: Any, client_address: Any) -> None:
        # A client that hangs up before its answer is written is no error of
        # the server's (the driver drops a read when its publish fails early).
        if not isinstance(sys.exc_info()[1], OSError):
            super().handle_error(request, client_address)


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    # Buffered: like Go's net/http, a response's headers and a body that fits
    # the buffer leave in one write, so one TLS record, when the handler ends.
    wbufsize = -1
    server: _Server

    def setup(self) -> None:
        super().setup()
        # http.server writes headers and body separately: without NODELAY
        # each response would wait for the client's delayed ACK.
        self.request.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        with self.server.api._lock:
            self.server.api.connections += 1
        try:
            self.request.do_handshake()
        except (ssl.SSLError, OSError):
            self.close_connection = True

    def log_message(self, format: str, *args: Any) -> None:
        pass  # the request log in FakeKubeAPI.requests replaces stderr noise

    def do_GET(self) -> None:
        self._dispatch("GET")

    def do_POST(self) -> None:
        self._dispatch("POST")

    def do_PUT(self) -> None:
        self._dispatch("PUT")

    def do_DELETE(self) -> None:
        self._dispatch("DELETE")

    def do_PATCH(self) -> None:
        self._dispatch("PATCH")

    def _dispatch(self, method: str) -> None:
        api = self.server.api
        url = urlsplit(self.path)
        entry = Request(method, url.path, None)
        with api._lock:
            api.requests.append(entry)
        body = self._body()
        fault = api._take_fault(method, url.path)
        if fault is not None:
            if fault.delay:
                time.sleep(fault.delay)
            if fault.drop:
                entry.status = -1
                self.close_connection = True
                with contextlib.suppress(OSError):
                    self.request.shutdown(socket.SHUT_RDWR)
                return
            if fault.status:
                entry.status = fault.status
                self._send(fault.status, status_body(fault.status, "injected fault"))
                return
        try:
            entry.user = api._authenticate(self.headers.get("Authorization"))
            match = _PATH.match(url.path)
            if match is None:
                raise ApiError(404, "the server could not find the requested resource")
            namespace, name = match["ns"], match["name"]
            query = {k: v[-1] for k, v in parse_qs(url.query).items()}
            result = self._route(method, namespace, name, query, body, entry.user)
        except ApiError as exc:
            entry.status = exc.code
            self._send(exc.code, exc.body)
            return
        if result is not None:
            entry.status = 200 if method != "POST" else 201
            if fault is not None and fault.misframed:
                self._send_misframed(entry.status, result)
            else:
                self._send(entry.status, result)
        if fault is not None and fault.trailing:
            self.wfile.write(fault.trailing)

    def _body(self) -> bytes:
        length = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(length) if length else b""

    def _route(
        self,
        method: str,
        namespace: str,
        name: str | None,
        query: dict[str, str],
        body: bytes,
        user: str,
    ) -> dict[str, Any] | None:
        api, store = self.server.api, self.server.api.store
        verb = {
            "GET": "get" if name else "list",
            "POST": "create",
            "PUT": "update",
            "DELETE": "delete",
            "PATCH": "patch",
        }[method]
        if method == "GET" and not name and query.get("watch") in ("true", "1"):
            verb = "watch"
        api._authorize(user, verb, namespace, name)
        if verb == "get":
            obj = store.objects.get((namespace, name or ""))
            if obj is None:
                raise ApiError(
                    404, f'secrets "{name}" not found', None, {"name": name, "kind": "secrets"}
                )
            return obj
        if verb == "list":
            with store.changed:
                items = [o for (ns, _), o in sorted(store.objects.items()) if ns == namespace]
                items = _select(items, query.get("fieldSelector"))
                return {
                    "kind": "SecretList",
                    "apiVersion": "v1",
                    "metadata": {"resourceVersion": str(store.rv)},
                    "items": items,
                }
        if verb == "watch":
            self._watch(namespace, query)
            return None
        if verb in ("create", "update"):
            obj = _parse_secret(body, name)
            meta = obj.get("metadata", {})
            return store.put(
                namespace,
                meta["name"],
                obj.get("data") or {},
                create=verb == "create",
                expect_rv=meta.get("resourceVersion"),
                type_=obj.get("type", "Opaque"),
            )
        if verb == "delete":
            return store.delete(namespace, name or "")
        raise ApiError(405, f"{method} is not supported by this stand-in")

    def _watch(self, namespace: str, query: dict[str, str]) -> None:
        api, store = self.server.api, self.server.api.store
        selector = query.get("fieldSelector")
        deadline = time.monotonic() + float(query.get("timeoutSeconds") or 300)
        since = query.get("resourceVersion") or "0"
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()
        self.wfile.flush()  # a watcher sees the headers before any event
        with store.changed:
            if since == "0":
                # No version: the current state as ADDED events, then changes.
                backlog = [
                    _Event(store.rv, "ADDED", o)
                    for (ns, _), o in sorted(store.objects.items())
                    if ns == namespace
                ]
                cursor = store.rv
            elif int(since) < store.oldest_rv:
                backlog = [
                    _Event(
                        0,
                        "ERROR",
                        status_body(410, f"too old resource version: {since} ({store.oldest_rv})"),
                    )
                ]
                cursor = -1
            else:
                cursor = int(since)
                backlog = []
        try:
            for event in backlog:
                self._chunk(event)
            while cursor >= 0 and not api._stopping.is_set() and time.monotonic() < deadline:
                with store.changed:
                    store.changed.wait(0.2)
                    fresh = [e for e in store.events if e.rv > cursor]
                for event in fresh:
                    cursor = event.rv
                    if event.obj["metadata"]["namespace"] == namespace and _select(
                        [event.obj], selector
                    ):
                        self._chunk(event)
            self.wfile.write(b"0\r\n\r\n")
        except OSError:
            pass
        self.close_connection = True

    def _chunk(self, event: _Event) -> None:
        line = json.dumps({"type": event.type, "object": event.obj}).encode() + b"\n"
        self.wfile.write(f"{len(line):x}\r\n".encode() + line + b"\r\n")
        self.wfile.flush()

    def _send(self, code: int, payload: dict[str, Any]) -> None:
        data = json.dumps(payload).encode()
        self.send_response(code)
        self.send_header("Content-Type", "application/json")
        if len(data) <= _GO_BUFFER:
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)
            return
        # Like Go's net/http under kube-apiserver: a body that outgrows the
        # response buffer goes out chunked.
        self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()
        for at in range(0, len(data), _GO_BUFFER):
            piece = data[at : at + _GO_BUFFER]
            self.wfile.write(f"{len(piece):x}\r\n".encode() + piece + b"\r\n")
        self.wfile.write(b"0\r\n\r\n")

    def _send_misframed(self, code: int, payload: dict[str, Any]) -> None:
        """Chunked framing gone wrong: the first chunk claims 10 bytes, the
        rest of the body follows where the next chunk's size should be."""
        data = json.dumps(payload).encode()
        self.send_response(code)
        self.send_header("Content-Type", "application/json")
        self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()
        self.wfile.write(b"a\r\n" + data[:10] + b"\r\n" + data[10:] + b"\r\n0\r\n\r\n")


def _select(items: list[dict[str, Any]], selector: str | None) -> list[dict[str, Any]]:
    """Apply a `metadata.name=X` field selector, the only one the driver uses."""
    if not selector:
        return items
    key, _, value = selector.partition("=")
    if key != "metadata.name":
        raise ApiError(400, f'"{key}" is not a known field selector: only "metadata.name"')
    return [o for o in items if o["metadata"]["name"] == value]


def _parse_secret(body: bytes, path_name: str | None) -> dict[str, Any]:
    try:
        obj = json.loads(body)
    except ValueError as exc:
        raise ApiError(400, f"body is not JSON: {exc}") from None
    name = (obj.get("metadata") or {}).get("name") or ""
    if path_name and name != path_name:
        raise ApiError(400, "the name in the body does not match the name in the URL")
    if not _NAME.fullmatch(name) or len(name) > 253:
        raise ApiError(422, f'Secret "{name}" is invalid: metadata.name: Invalid value')
    for key, value in (obj.get("data") or {}).items():
        if not _KEY.fullmatch(key) or key in (".", ".."):
            raise ApiError(422, f'Secret "{name}" is invalid: data[{key}]: Invalid value')
        try:
            base64.b64decode(value, validate=True)
        except (ValueError, TypeError):
            raise ApiError(400, f"data[{key}] is not valid base64") from None
    return obj  # type: ignore[no-any-return]
