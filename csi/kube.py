"""Reading Secrets from the Kubernetes API into locked buffers.

One `SecretReader` serves every publish of the node. The connection settings
and the driver's own credentials come from `apiconfig` (the pod's service
account or a kubeconfig); the GET itself goes through `secretfs.csi.https`,
which keeps every byte of the response in locked memory that is wiped after
decoding.

Every outcome becomes a `FetchError` carrying the gRPC code the kubelet
should see. Transient failures (connection errors, 429, 5xx) are retried
with capped exponential backoff inside a fixed time budget that stays well
under the kubelet's two-minute deadline for NodePublishVolume.
"""

from __future__ import annotations

import binascii
import json
import logging
import random
import re
import threading
import time
from collections.abc import Callable
from urllib.parse import quote

import grpc

from secretfs.fs.buffer import SecretBuffer, scrub_bytes, scrub_str

from . import __version__, apiconfig, metrics
from .https import Exchange, HttpError, HttpsClient, Response, server_from_url, tls_context

log = logging.getLogger(__name__)

# Secret keys become file names; the API server allows exactly these.
_KEY = re.compile(r"[-._a-zA-Z0-9]{1,253}")

# A single request may take this long before it counts as a failed attempt.
REQUEST_TIMEOUT = 10.0

# Backoff between attempts: 100 ms doubling to 2 s, with +-25 % jitter so
# that many volumes failing at once do not retry in lockstep.
_FIRST_DELAY = 0.1
_MAX_DELAY = 2.0


class FetchError(Exception):
    """A Secret could not be read; `code` is what the CSI call answers."""

    def __init__(self, code: grpc.StatusCode, message: str) -> None:
        super().__init__(message)
        self.code = code


Credentials = Callable[[], SecretBuffer | None]


def connect(kubeconfig: str | None) -> tuple[HttpsClient, Credentials]:
    """A client for the API server and the driver's own credentials (see apiconfig.load)."""
    settings = apiconfig.load(kubeconfig)
    context = tls_context(
        settings.ca_file, settings.ca_data, settings.cert_file, settings.key_file, settings.verify
    )
    server = server_from_url(settings.url, context, settings.server_name)

    def driver_credentials() -> SecretBuffer | None:
        value = settings.authorization()
        return SecretBuffer.from_bytes(value.encode()) if value else None

    return HttpsClient(server, user_agent=f"secretfs/{__version__}"), driver_credentials


class SecretReader:
    def __init__(self, client: HttpsClient, credentials: Credentials, budget: float = 30.0) -> None:
        self._client = client
        self._credentials = credentials
        self._budget = budget
        self._stopping = threading.Event()

    def cancel(self) -> None:
        """Give up every read: those waiting for an answer or their next attempt
        fail now, with UNAVAILABLE, and no new one starts."""
        self._stopping.set()
        self._client.close()

    def read(
        self, namespace: str, name: str, authorization: SecretBuffer | None = None
    ) -> dict[str, SecretBuffer]:
        """The Secret's keys mapped to locked buffers holding the decoded values.

        `authorization` (the caller keeps and wipes it) is sent as is; without
        it the driver's own credentials are used.
        """
        with self.start(namespace, name, authorization) as pending:
            return pending.result()

    def start(
        self, namespace: str, name: str, authorization: SecretBuffer | None = None
    ) -> PendingRead:
        """Send the first request for the Secret now; `result()` finishes the read.

        The caller may work while the API server answers, and must leave the
        returned context, which drops the read if `result()` was never called.
        """
        return PendingRead(self, namespace, name, authorization)

    def _send(self, path: str, deadline: float, authorization: SecretBuffer | None) -> Exchange:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise _Transient("no time left")
        own = self._credentials() if authorization is None else None
        try:
            sent = authorization if authorization is not None else own
            return self._client.send(path, sent, min(REQUEST_TIMEOUT, remaining))
        except HttpError as exc:
            metrics.API_ERRORS.labels(metrics.api_error_kind(0)).inc()
            raise _Transient(str(exc)) from None
        finally:
            if own is not None:
                own.wipe()

    def _response(self, exchange: Exchange) -> Response:
        try:
            response = exchange.response()
        except HttpError as exc:
            metrics.API_ERRORS.labels(metrics.api_error_kind(0)).inc()
            raise _Transient(str(exc)) from None
        if 200 <= response.status < 300:
            return response
        metrics.API_ERRORS.labels(metrics.api_error_kind(response.status)).inc()
        try:
            message = _status_message(response)
        finally:
            response.buffer.wipe()
        raise _classify(response.status, message)


class PendingRead:
    """A Secret being read: the first request is on the wire, retries are to come."""

    def __init__(
        self,
        reader: SecretReader,
        namespace: str,
        name: str,
        authorization: SecretBuffer | None,
    ) -> None:
        self._reader = reader
        self._what = f"secret {namespace}/{name}"
        self._path = f"/api/v1/namespaces/{quote(namespace)}/secrets/{quote(name)}"
        self._authorization = authorization
        self._deadline = time.monotonic() + reader._budget
        self._exchange: Exchange | None = None
        self._failed: _Transient | None = None  # why the first request could not be sent
        try:
            self._exchange = reader._send(self._path, self._deadline, authorization)
        except _Transient as exc:
            self._failed = exc

    def __enter__(self) -> PendingRead:
        return self

    def __exit__(self, *exc: object) -> None:
        if self._exchange is not None:
            self._exchange.abandon()
            self._exchange = None

    def result(self) -> dict[str, SecretBuffer]:
        """The Secret's keys mapped to buffers; retries transient failures within the budget."""
        reader, what = self._reader, self._what
        delay = _FIRST_DELAY
        attempt = 0
        while True:
            attempt += 1
            try:
                if self._failed is not None:
                    failed, self._failed = self._failed, None
                    raise failed
                if self._exchange is None:
                    self._exchange = reader._send(self._path, self._deadline, self._authorization)
                exchange, self._exchange = self._exchange, None
                response = reader._response(exchange)
            except _Transient as exc:
                if reader._stopping.is_set():
                    raise _shutting_down(what) from None
                pause = delay * random.uniform(0.75, 1.25)  # noqa: S311 - jitter, not crypto
                if time.monotonic() + pause >= self._deadline:
                    raise FetchError(
                        grpc.StatusCode.UNAVAILABLE,
                        f"{what}: API server unavailable after {attempt} attempts "
                        f"in {reader._budget:g}s: {exc}",
                    ) from None
                log.info("reading %s failed (%s); retry %d in %.2fs", what, exc, attempt, pause)
                if reader._stopping.wait(pause):
                    raise _shutting_down(what) from None
                delay = min(delay * 2, _MAX_DELAY)
                continue
            except _Refused as exc:
                raise FetchError(exc.code, f"{what}: {exc}") from None
            try:
                return decode_secret(response.body(), what)
            finally:
                response.buffer.wipe()


def _shutting_down(what: str) -> FetchError:
    return FetchError(grpc.StatusCode.UNAVAILABLE, f"{what}: the driver is shutting down")


class _Transient(Exception):
    pass


class _Refused(Exception):
    def __init__(self, code: grpc.StatusCode, message: str) -> None:
        super().__init__(message)
        self.code = code


_CODES = {
    401: grpc.StatusCode.UNAUTHENTICATED,
    403: grpc.StatusCode.PERMISSION_DENIED,
    404: grpc.StatusCode.NOT_FOUND,
}


def _classify(status: int, message: str) -> Exception:
    if status in _CODES:
        return _Refused(_CODES[status], message)
    if status == 429 or status >= 500:
        return _Transient(f"HTTP {status}: {message}")
    return _Refused(grpc.StatusCode.INTERNAL, f"unexpected HTTP {status}: {message}")


def _status_message(response: Response) -> str:
    """The `message` of a Kubernetes Status body; it never holds Secret data."""
    try:
        status = json.loads(bytes(response.body()))
        if isinstance(status, dict) and status.get("kind") == "Status":
            return str(status.get("message") or f"HTTP {response.status}")
    except ValueError:
        pass
    return f"HTTP {response.status} without a Status body"


def decode_secret(body: memoryview, what: str) -> dict[str, SecretBuffer]:
    """Decode a Secret's JSON into buffers; on any failure none is left behind.

    Every temporary that holds secret data (the body as `bytes`, each base64
    `str`, each decoded `bytes`) is zeroed as soon as it has been used; the
    allocator wipes whatever else the JSON parser made when it is freed.
    """
    raw = bytes(body)
    try:
        secret = json.loads(raw)
    except (ValueError, RecursionError) as exc:
        raise FetchError(
            grpc.StatusCode.INTERNAL, f"{what}: unreadable API response ({exc.__class__.__name__})"
        ) from None
    finally:
        scrub_bytes(raw)
    if not isinstance(secret, dict) or secret.get("kind", "Secret") != "Secret":
        raise FetchError(grpc.StatusCode.INTERNAL, f"{what}: the API response is not a Secret")
    data = secret.get("data")
    if data is None:
        data = {}  # a Secret without data
    if not isinstance(data, dict):
        raise FetchError(grpc.StatusCode.INTERNAL, f"{what}: data is not a map")
    buffers: dict[str, SecretBuffer] = {}
    try:
        for key, encoded in data.items():
            if not isinstance(encoded, str):
                raise FetchError(grpc.StatusCode.INTERNAL, f"{what}: a value is not a string")
            if not _KEY.fullmatch(key) or key in (".", ".."):
                raise FetchError(
                    grpc.StatusCode.FAILED_PRECONDITION,
                    f"{what} has a key that cannot be a file name",
                )
            try:
                decoded = binascii.a2b_base64(encoded, strict_mode=True)
            except binascii.Error:
                raise FetchError(
                    grpc.StatusCode.INTERNAL, f"{what}: a value is not valid base64"
                ) from None
            buffers[key] = SecretBuffer.from_bytes(decoded)
            scrub_bytes(decoded)
    except BaseException:
        for buffer in buffers.values():
            buffer.wipe()
        raise
    finally:
        for encoded in data.values():
            if isinstance(encoded, str):
                scrub_str(encoded)
    return buffers
