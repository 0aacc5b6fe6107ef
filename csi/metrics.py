"""Prometheus metrics, and the small HTTP server for metrics and health checks.

No label ever holds a Secret name, a namespace, a pod name or a volume id:
they would leak who uses which Secret, and every new pod would add a
series. Labels are the CSI method, the gRPC code and the kind of API error.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily
from prometheus_client.exposition import CONTENT_TYPE_LATEST

log = logging.getLogger(__name__)

REGISTRY = CollectorRegistry(auto_describe=True)

CALLS = Counter(
    "secretfs_csi_calls",
    "CSI calls answered, by method and gRPC status code.",
    ["method", "code"],
    registry=REGISTRY,
)
CALL_SECONDS = Histogram(
    "secretfs_csi_call_duration_seconds",
    "Time to answer a CSI call, by method.",
    ["method"],
    buckets=(0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60),
    registry=REGISTRY,
)
API_ERRORS = Counter(
    "secretfs_api_errors",
    "Failed reads of Secrets from the Kubernetes API, by kind.",
    ["kind"],
    registry=REGISTRY,
)
VOLUMES = Gauge("secretfs_volumes_published", "Volumes published on this node.", registry=REGISTRY)
LOCKED_BYTES = Gauge(
    "secretfs_secret_bytes_locked",
    "Bytes of secret data held in locked memory (values and tokens in flight).",
    registry=REGISTRY,
)

# Kinds of API errors, from the HTTP status (0: no answer at all).
_API_ERROR_KINDS = {401: "unauthorized", 403: "forbidden", 404: "not_found", 429: "throttled"}


def api_error_kind(status: int) -> str:
    if status == 0:
        return "unreachable"
    return _API_ERROR_KINDS.get(status, "server_error" if status >= 500 else "other")


class _Refusals:
    """Opens refused by pod binding, read from the binding's own count."""

    def __init__(self, count: Callable[[], int]) -> None:
        self._count = count

    def collect(self) -> Iterator[CounterMetricFamily]:
        family = CounterMetricFamily(
            "secretfs_opens_refused",
            "File opens refused because the caller was not in the volume's pod.",
        )
        family.add_metric([], self._count())
        yield family


def watch(
    published: Callable[[], int], locked_bytes: Callable[[], int], refusals: Callable[[], int]
) -> None:
    """Tie the gauges to the live values they report."""
    VOLUMES.set_function(published)
    LOCKED_BYTES.set_function(locked_bytes)
    REGISTRY.register(_Refusals(refusals))


Check = Callable[[], tuple[bool, str]]


def serve_http(address: str, healthy: Check, ready: Check) -> ThreadingHTTPServer:
    """Serve /metrics, /healthz and /readyz on `address` (host:port) in a thread."""
    host, _, port = address.rpartition(":")
    routes: dict[str, Callable[[], tuple[int, str, bytes]]] = {
        "/metrics": lambda: (200, CONTENT_TYPE_LATEST, generate_latest(REGISTRY)),
        "/healthz": lambda: _answer(healthy),
        "/readyz": lambda: _answer(ready),
    }

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            route = routes.get(self.path.split("?", 1)[0])
            code, kind, body = route() if route else (404, "text/plain", b"not found\n")
            self.send_response(code)
            self.send_header("Content-Type", kind)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format: str, *args: Any) -> None:
            pass  # probes every few seconds are not news

    server = ThreadingHTTPServer((host or "0.0.0.0", int(port)), Handler)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, name="http", daemon=True).start()
    log.info("serving /metrics, /healthz and /readyz on %s", address)
    return server


def _answer(check: Check) -> tuple[int, str, bytes]:
    ok, reason = check()
    return (200 if ok else 503), "text/plain", f"{'ok' if ok else 'failing'}: {reason}\n".encode()
