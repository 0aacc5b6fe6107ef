"""The gRPC server on the kubelet's unix socket, with one log line per call."""

from __future__ import annotations

import logging
import os
import socket
import stat
import time
import traceback
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import grpc

from secretfs.fs.buffer import scrub_bytes

from . import metrics
from .errors import CsiError
from .identity import IdentityService
from .node import NodeService
from .pb import csi_pb2_grpc
from .validation import POD_NAME, POD_NAMESPACE

log = logging.getLogger(__name__)

# Calls the kubelet and the sidecars make every few seconds: logged at debug.
_ROUTINE = frozenset(
    {"Probe", "GetPluginInfo", "GetPluginCapabilities", "NodeGetCapabilities", "NodeGetInfo"}
)

# Publishes and unpublishes may wait a long time; they get at most
# node.NODE_CALL_LIMIT of these threads, the rest stay free for probes.
WORKERS = 32

# A logged request field longer than this is cut: it comes from the caller.
MAX_LOGGED = 256

# gRPC keeps a connection's received bytes, requests with their tokens
# included, in buffers that are freed (and so wiped) only when the connection
# closes. The kubelet closes its connection after every call; a client that
# keeps one open is disconnected after this much idle time.
IDLE_CONNECTION_MS = 5000
# ...and one that stays busy is asked to reconnect after this long, its calls
# in flight given as long again to finish.
MAX_CONNECTION_AGE_MS = 30_000


def socket_path(endpoint: str) -> str:
    """The filesystem path of a `unix://` endpoint."""
    for prefix in ("unix://", "unix:"):
        if endpoint.startswith(prefix):
            path = endpoint[len(prefix) :]
            if os.path.isabs(path) and not path.startswith("//"):
                return path
            break
    raise ValueError(f"endpoint {endpoint!r} is not unix:///absolute/path")


def call_fields(request: Any) -> dict[str, str]:
    """What one log line may say about a request: identifiers, never contents."""
    fields = {}
    for name in ("volume_id", "target_path"):
        value = getattr(request, name, "")
        if value:
            fields[name] = printable(value)
    context = getattr(request, "volume_context", None)
    if context is not None and POD_NAMESPACE in context:
        fields["pod"] = printable(f"{context[POD_NAMESPACE]}/{context.get(POD_NAME, '')}")
    return fields


def printable(value: str) -> str:
    """`value` made safe for one log line: escaped if it holds control or odd
    white-space characters (no forged lines), and cut if it is long."""
    text = value if value.isprintable() else value.encode("unicode_escape").decode("ascii")
    if len(text) > MAX_LOGGED:
        return f"{text[:MAX_LOGGED]}...({len(value)} characters)"
    return text


class CallLog(grpc.ServerInterceptor):  # type: ignore[misc]
    """Logs every call once and turns CsiError and crashes into status codes."""

    def __init__(self) -> None:
        # The wrapped handler of each method we serve, made on its first call.
        self._handlers: dict[str, Any] = {}

    def intercept_service(self, continuation: Callable[[Any], Any], details: Any) -> Any:
        wrapped = self._handlers.get(details.method)
        if wrapped is not None:
            return wrapped
        handler = continuation(details)
        if handler is None or handler.unary_unary is None:
            return handler  # not ours (UNIMPLEMENTED), and not worth remembering
        wrapped = self._handlers[details.method] = self._wrap(handler, details.method)
        return wrapped

    def _wrap(self, handler: Any, full_method: str) -> Any:
        method = full_method.rsplit("/", 1)[-1]
        inner = handler.unary_unary

        def logged(request: Any, context: grpc.ServicerContext) -> Any:
            start = time.monotonic()
            code, message = grpc.StatusCode.OK, ""
            try:
                return inner(request, context)
            except CsiError as exc:
                code, message = exc.code, exc.message
            except Exception as exc:
                log.error("%s failed unexpectedly: %s", method, unexpected(exc))
                code, message = grpc.StatusCode.INTERNAL, f"{method} failed; see the driver's log"
            finally:
                _log_call(method, request, code, message, time.monotonic() - start)
            context.abort(code, message)

        return grpc.unary_unary_rpc_method_handler(
            logged,
            request_deserializer=_scrubbing(handler.request_deserializer),
            response_serializer=handler.response_serializer,
        )


def unexpected(exc: BaseException) -> str:
    """An unexpected error's type and the frames it passed, without its message:
    a message can quote whatever the failing code was looking at, secrets too."""
    frames = traceback.extract_tb(exc.__traceback__)
    where = " < ".join(f"{Path(f.filename).name}:{f.lineno} {f.name}" for f in reversed(frames))
    return f"{type(exc).__name__} at {where} (message withheld: it may quote secret data)"


def _scrubbing(deserialize: Callable[[bytes], Any]) -> Callable[[bytes], Any]:
    """Parse a request, then zero its wire bytes: they may carry tokens and secrets.

    The parsed message holds its own copy; the Python objects made from it
    are wiped by the allocator when the call drops them.
    """

    def parse(raw: bytes) -> Any:
        try:
            return deserialize(raw)
        finally:
            scrub_bytes(raw)

    return parse


def _log_call(
    method: str, request: Any, code: grpc.StatusCode, message: str, seconds: float
) -> None:
    metrics.CALLS.labels(method, code.name).inc()
    metrics.CALL_SECONDS.labels(method).observe(seconds)
    fields = call_fields(request)
    fields.update(method=method, code=code.name, duration_ms=f"{seconds * 1000:.1f}")
    if message:
        fields["error"] = printable(message)
    if code == grpc.StatusCode.OK:
        level = logging.DEBUG if method in _ROUTINE else logging.INFO
    elif code in (grpc.StatusCode.INTERNAL, grpc.StatusCode.UNKNOWN):
        level = logging.ERROR
    else:
        level = logging.WARNING
    text = " ".join(f"{key}={value}" for key, value in fields.items() if key != "method")
    log.log(level, "%s %s", method, text, extra={"call": fields})


def claim_socket(endpoint: str) -> str:
    """The socket path, free for this process: a stale socket left by a crashed
    run is removed, a live one (another driver serving) is an error."""
    path = socket_path(endpoint)
    try:
        mode = os.lstat(path).st_mode
    except FileNotFoundError:
        return path
    if not stat.S_ISSOCK(mode):
        raise FileExistsError(f"{path} exists and is not a socket")
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
        try:
            probe.connect(path)
        except OSError:
            os.unlink(path)
            log.info("removed stale socket %s", path)
            return path
    raise FileExistsError(f"another driver is serving on {path}")


def serve(endpoint: str, identity: IdentityService, node: NodeService) -> grpc.Server:
    """Start serving on `endpoint` (see claim_socket)."""
    path = claim_socket(endpoint)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    server = grpc.server(
        ThreadPoolExecutor(max_workers=WORKERS, thread_name_prefix="csi"),
        interceptors=[CallLog()],
        options=[
            ("grpc.max_connection_idle_ms", IDLE_CONNECTION_MS),
            ("grpc.max_connection_age_ms", MAX_CONNECTION_AGE_MS),
            ("grpc.max_connection_age_grace_ms", MAX_CONNECTION_AGE_MS),
        ],
    )
    csi_pb2_grpc.add_IdentityServicer_to_server(identity, server)
    csi_pb2_grpc.add_NodeServicer_to_server(node, server)
    if server.add_insecure_port(f"unix:{path}") == 0:
        raise OSError(f"cannot listen on {path}")
    # Only root (the kubelet) may talk to the driver.
    server.start()
    os.chmod(path, 0o600)
    log.info("CSI server listening on %s", path)
    return server
