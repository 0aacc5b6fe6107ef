"""Reading Secrets from the Kubernetes API into locked buffers.

One `SecretReader` serves every publish of the node. It asks the API server
with the official client, keeps its HTTPS connections alive between calls,
and turns every outcome into a `FetchError` carrying the gRPC code the
kubelet should see. Transient failures (connection errors, 429, 5xx) are
retried with capped exponential backoff inside a fixed time budget that
stays well under the kubelet's two-minute deadline for NodePublishVolume.
"""

from __future__ import annotations

import binascii
import json
import logging
import random
import re
import time
from collections.abc import Callable
from typing import Any, Protocol

import grpc

from secretfs.fs.buffer import SecretBuffer, scrub_bytes

log = logging.getLogger(__name__)

# Secret keys become file names; the API server allows exactly these.
_KEY = re.compile(r"[-._a-zA-Z0-9]{1,253}")

# A single request may take this long before it counts as a failed attempt.
CONNECT_TIMEOUT = 5.0
READ_TIMEOUT = 10.0

# Backoff between attempts: 100 ms doubling to 2 s, with +-25 % jitter so
# that many volumes failing at once do not retry in lockstep.
_FIRST_DELAY = 0.1
_MAX_DELAY = 2.0


class FetchError(Exception):
    """A Secret could not be read; `code` is what the CSI call answers."""

    def __init__(self, code: grpc.StatusCode, message: str) -> None:
        super().__init__(message)
        self.code = code


class SecretsApi(Protocol):
    def read_namespaced_secret(self, name: str, namespace: str, **kwargs: Any) -> Any: ...


def connect(kubeconfig: str | None) -> SecretsApi:
    """A CoreV1 client: `kubeconfig` if given, else in-cluster, else $KUBECONFIG."""
    import os

    from kubernetes import client, config

    configuration = client.Configuration()
    if kubeconfig:
        config.load_kube_config(
            config_file=kubeconfig, client_configuration=configuration, persist_config=False
        )
    elif os.environ.get("KUBERNETES_SERVICE_HOST"):
        config.load_incluster_config(client_configuration=configuration)
    else:
        config.load_kube_config(client_configuration=configuration, persist_config=False)
    # Retries are ours (see SecretReader); the client must fail fast.
    configuration.retries = False
    return client.CoreV1Api(client.ApiClient(configuration))  # type: ignore[no-any-return]


class SecretReader:
    def __init__(
        self, api: SecretsApi, budget: float = 30.0, sleep: Callable[[float], None] = time.sleep
    ) -> None:
        self._api = api
        self._budget = budget
        self._sleep = sleep

    def read(self, namespace: str, name: str) -> dict[str, SecretBuffer]:
        """The Secret's keys mapped to buffers holding the decoded values."""
        what = f"secret {namespace}/{name}"
        deadline = time.monotonic() + self._budget
        delay = _FIRST_DELAY
        attempt = 0
        while True:
            attempt += 1
            remaining = deadline - time.monotonic()
            try:
                body = self._get(namespace, name, remaining)
            except _Transient as exc:
                pause = delay * random.uniform(0.75, 1.25)  # noqa: S311 - jitter, not crypto
                if time.monotonic() + pause >= deadline:
                    raise FetchError(
                        grpc.StatusCode.UNAVAILABLE,
                        f"{what}: API server unavailable after {attempt} attempts "
                        f"in {self._budget:.0f}s: {exc}",
                    ) from None
                log.info("reading %s failed (%s); retry %d in %.2fs", what, exc, attempt, pause)
                self._sleep(pause)
                delay = min(delay * 2, _MAX_DELAY)
                continue
            except _Refused as exc:
                raise FetchError(exc.code, f"{what}: {exc}") from None
            try:
                return decode_secret(body, what)
            finally:
                body[:] = bytes(len(body))

    def _get(self, namespace: str, name: str, remaining: float) -> bytearray:
        from kubernetes.client.exceptions import ApiException
        from urllib3.exceptions import HTTPError

        timeout = (
            max(0.1, min(CONNECT_TIMEOUT, remaining)),
            max(0.1, min(READ_TIMEOUT, remaining)),
        )
        try:
            response = self._api.read_namespaced_secret(
                name, namespace, _preload_content=False, _request_timeout=timeout
            )
        except ApiException as exc:
            raise _classify(exc.status, _status_message(exc.body, exc.reason)) from None
        except (HTTPError, OSError) as exc:
            raise _Transient(f"{type(exc).__name__}: {exc}") from None
        try:
            return _read_body(response)
        except (HTTPError, OSError) as exc:
            raise _Transient(f"reading the response: {exc}") from None
        finally:
            response.release_conn()


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
    if status == 0 or status == 429 or status >= 500:
        return _Transient(f"HTTP {status}: {message}")
    return _Refused(grpc.StatusCode.INTERNAL, f"unexpected HTTP {status}: {message}")


def _status_message(body: str | bytes | None, fallback: str | None) -> str:
    """The `message` of a Kubernetes Status body; it never holds Secret data."""
    try:
        status = json.loads(body or b"")
        if isinstance(status, dict) and status.get("kind") == "Status":
            return str(status.get("message") or fallback)
    except ValueError:
        pass
    return str(fallback or "no reason given")


def _read_body(response: Any) -> bytearray:
    """The whole response body in a buffer the caller owns and wipes."""
    length = response.headers.get("Content-Length")
    body = bytearray(int(length) if length else 16384)
    filled = 0
    while True:
        if filled == len(body):
            if length:
                break
            body = _grown(body)
        got = response.readinto(memoryview(body)[filled:])
        if not got:
            break
        filled += got
    del body[filled:]
    return body


def _grown(body: bytearray) -> bytearray:
    """A buffer twice the size holding `body`, which is wiped."""
    bigger = bytearray(len(body) * 2)
    bigger[: len(body)] = body
    body[:] = bytes(len(body))
    return bigger


def decode_secret(body: bytearray, what: str) -> dict[str, SecretBuffer]:
    """Decode a Secret's JSON into buffers; on any failure none is left behind."""
    # TODO(#3): json and base64 decoding leave str temporaries with secret
    # data on the Python heap until it is reused; decode into the buffers
    # directly.
    try:
        secret = json.loads(body)
        data = secret.get("data") or {}
        if not isinstance(data, dict):
            raise TypeError("data is not a map")
    except (ValueError, TypeError, AttributeError) as exc:
        raise FetchError(
            grpc.StatusCode.INTERNAL, f"{what}: unreadable API response ({exc})"
        ) from None
    buffers: dict[str, SecretBuffer] = {}
    try:
        for key, encoded in data.items():
            if not _KEY.fullmatch(key) or key in (".", "..") or not isinstance(encoded, str):
                raise FetchError(
                    grpc.StatusCode.FAILED_PRECONDITION,
                    f"{what} has a key that cannot be a file name",
                )
            raw = binascii.a2b_base64(encoded, strict_mode=True)
            buffers[key] = SecretBuffer.from_bytes(raw)
            scrub_bytes(raw)
    except binascii.Error:
        _wipe(buffers)
        raise FetchError(grpc.StatusCode.INTERNAL, f"{what}: a value is not valid base64") from None
    except BaseException:
        _wipe(buffers)
        raise
    return buffers


def _wipe(buffers: dict[str, SecretBuffer]) -> None:
    for buffer in buffers.values():
        buffer.wipe()
