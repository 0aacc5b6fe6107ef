"""A minimal HTTPS/1.1 client whose response bytes land only in locked buffers.

General-purpose clients (urllib3 over http.client) pass a response through
buffers nobody can wipe: the socket file's read buffer, the `bytes` each
read returns, the joined body. This client reads with `recv_into` straight
into a `SecretBuffer`, de-chunks in place, and hands that buffer to the
caller, who decodes and wipes it. The TLS library is told to wipe its own
record buffer after every read (OpenSSL's SSL_OP_CLEANSE_PLAINTEXT).

It speaks just enough HTTP for GETs against the Kubernetes API: keep-alive
connections reused across calls, Content-Length and chunked bodies, and
nothing else (no redirects, no proxies, no compression). A request can be
sent first and its response read later (`send`), so that the caller works
while the server answers.
"""

from __future__ import annotations

import contextlib
import logging
import re
import select
import socket
import ssl
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from urllib.parse import urlsplit

from secretfs.fs.buffer import SecretBuffer

log = logging.getLogger(__name__)

# OpenSSL 3: wipe decrypted application data once it is handed over, and on
# SSL_free. Python's ssl module passes the raw bit through.
OP_CLEANSE_PLAINTEXT = getattr(ssl, "OP_CLEANSE_PLAINTEXT", 0x2)

MAX_HEADER = 64 * 1024
# One page: a Secret's GET response usually fits; a larger one grows the buffer.
FIRST_READ = 4096
# A Secret holds at most 1 MiB of data: base64, JSON and metadata fit well within this.
MAX_BODY = 8 * 1024 * 1024
IDLE_CONNECTIONS = 4

# Control characters: in a header value they would end it, or the request.
_CONTROL = re.compile(rb"[\x00-\x1f\x7f]")

_DIGITS = re.compile(r"[0-9]{1,12}")
_STATUS_LINE = re.compile(r"HTTP/1\.[01] [0-9]{3}( |$)")
# Headers that say where a response ends: one value each, or none at all.
_FRAMING = frozenset({"content-length", "transfer-encoding"})
# A chunk's size in hex, and extensions we ignore.
_CHUNK_SIZE = re.compile(rb"([0-9a-fA-F]{1,8})(?:;[^\r\n]*)?")


class HttpError(Exception):
    """The exchange failed at the transport level (connect, TLS, framing, timeout)."""


@dataclass(frozen=True, slots=True)
class Server:
    host: str
    port: int
    context: ssl.SSLContext
    server_hostname: str


def tls_context(
    ca_file: str | None,
    ca_data: str | None = None,
    cert_file: str | None = None,
    key_file: str | None = None,
    verify: bool = True,
) -> ssl.SSLContext:
    context = ssl.create_default_context(cafile=ca_file, cadata=ca_data)
    if not verify:
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
    if cert_file:
        context.load_cert_chain(cert_file, key_file)
    if ssl.OPENSSL_VERSION_INFO >= (3, 0):
        context.options |= OP_CLEANSE_PLAINTEXT
    else:
        log.warning(
            "%s cannot wipe its read buffers; plaintext may linger in its record "
            "buffer until overwritten",
            ssl.OPENSSL_VERSION,
        )
    return context


def server_from_url(url: str, context: ssl.SSLContext, server_name: str | None = None) -> Server:
    parts = urlsplit(url)
    if parts.scheme != "https" or not parts.hostname:
        raise ValueError(f"API server URL must be https://host[:port], not {url!r}")
    return Server(parts.hostname, parts.port or 443, context, server_name or parts.hostname)


@dataclass(slots=True)
class Response:
    """A status and a body held in `buffer[start:end]`; the receiver wipes `buffer`."""

    status: int
    buffer: SecretBuffer
    start: int
    end: int

    def body(self) -> memoryview:
        return self.buffer.view(self.start, self.end - self.start)


class _Connection:
    def __init__(self, sock: ssl.SSLSocket) -> None:
        self.sock = sock
        self.reused = False

    def readable(self) -> bool:
        if self.sock.pending():
            return True
        ready, _, _ = select.select([self.sock], [], [], 0)
        return bool(ready)

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.sock.close()


class HttpsClient:
    """GETs over a small pool of keep-alive connections to one server."""

    def __init__(self, server: Server, user_agent: str = "secretfs") -> None:
        self._server = server
        self._user_agent = user_agent
        self._idle: list[_Connection] = []
        self._busy: set[socket.socket] = set()  # connecting, or carrying an exchange
        self._closed = False
        self._lock = threading.Lock()

    def get(self, path: str, authorization: SecretBuffer | None, timeout: float) -> Response:
        """GET `path`; `authorization` holds the header value (e.g. `Bearer <token>`)."""
        return self.send(path, authorization, timeout).response()

    def send(self, path: str, authorization: SecretBuffer | None, timeout: float) -> Exchange:
        """Send GET `path` now and return; the exchange's `response()` reads the answer.

        Every exchange ends with `response()` or `abandon()`. `authorization`
        is copied into the request: the caller may wipe it once this returns.
        """
        exchange = Exchange(self, self._request(path, authorization), time.monotonic() + timeout)
        try:
            exchange.send()
        except BaseException:
            exchange.abandon()
            raise
        return exchange

    @property
    def closed(self) -> bool:
        return self._closed

    def close(self) -> None:
        """Close the idle connections and cut the busy ones short: their
        exchanges fail at once instead of waiting for their answers. No
        exchange starts after this."""
        with self._lock:
            self._closed = True
            idle, self._idle = self._idle, []
            busy = list(self._busy)
        for connection in idle:
            connection.close()
        for sock in busy:
            # Under the thread that is using it: its connect, handshake,
            # send or read fails at once. The TLS layer is left alone.
            with contextlib.suppress(OSError):
                socket.socket.shutdown(sock, socket.SHUT_RDWR)

    def _request(self, path: str, authorization: SecretBuffer | None) -> SecretBuffer:
        """The request's bytes, in a buffer of their own: they may carry a token."""
        head = (
            f"GET {path} HTTP/1.1\r\nHost: {self._server.server_hostname}\r\n"
            f"User-Agent: {self._user_agent}\r\nAccept: application/json\r\n"
        ).encode()
        parts: list[bytes | memoryview] = [head]
        if authorization is not None:
            if _CONTROL.search(authorization.view()):
                raise ValueError("an Authorization value must not hold control characters")
            parts += [b"Authorization: ", authorization.view(), b"\r\n"]
        parts.append(b"\r\n")
        request = SecretBuffer(sum(len(part) for part in parts))
        out, at = request.writable(), 0
        for part in parts:
            out[at : at + len(part)] = part
            at += len(part)
        return request

    def _connection(self, deadline: float) -> _Connection:
        while True:
            with self._lock:
                if self._closed:
                    raise HttpError("the client is closed")
                if not self._idle:
                    break
                connection = self._idle.pop()
            # An idle connection has nothing to say. If it is readable, the
            # server closed it, or sent bytes no request asked for: either
            # way it must not carry the next request.
            if not connection.readable():
                connection.reused = True
                return connection
            connection.close()
        return self._open(deadline)

    def _open(self, deadline: float) -> _Connection:
        server = self._server
        failure: OSError | None = None
        try:
            addresses = socket.getaddrinfo(server.host, server.port, type=socket.SOCK_STREAM)
        except OSError as exc:
            raise HttpError(f"resolving {server.host}: {exc}") from None
        for family, kind, proto, _, address in addresses:
            raw = socket.socket(family, kind, proto)
            try:
                raw.settimeout(max(0.05, deadline - time.monotonic()))
                with self.cuttable(raw):
                    raw.connect(address)
                raw.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                sock = server.context.wrap_socket(
                    raw, server_hostname=server.server_hostname, do_handshake_on_connect=False
                )
                try:
                    with self.cuttable(sock):
                        sock.do_handshake()
                except BaseException:
                    sock.close()
                    raise
                return _Connection(sock)
            except OSError as exc:  # ssl.SSLError included
                raw.close()
                failure = exc
            except BaseException:
                raw.close()
                raise
        raise HttpError(f"connecting to {server.host}:{server.port}: {failure}")

    @contextlib.contextmanager
    def cuttable(self, sock: socket.socket) -> Iterator[None]:
        """Let `close` cut `sock` short while the block uses it; HttpError once closed."""
        with self._lock:
            if self._closed:
                raise HttpError("the client is closed")
            self._busy.add(sock)
        try:
            yield
        finally:
            with self._lock:
                self._busy.discard(sock)

    def _release(self, connection: _Connection) -> None:
        with self._lock:
            if len(self._idle) < IDLE_CONNECTIONS:
                self._idle.append(connection)
                return
        connection.close()


class Exchange:
    """One GET on the wire: sent, its response not yet read."""

    def __init__(self, client: HttpsClient, request: SecretBuffer, deadline: float) -> None:
        self._client = client
        self._request = request  # wiped when the exchange ends
        self._deadline = deadline
        self._connection: _Connection | None = None

    def send(self) -> None:
        while True:
            connection = self._client._connection(self._deadline)
            try:
                connection.sock.settimeout(max(0.05, self._deadline - time.monotonic()))
                with self._client.cuttable(connection.sock):
                    connection.sock.sendall(self._request.view())
            except (OSError, HttpError) as exc:
                self._retry_or_raise(connection, exc)
                continue
            self._connection = connection
            return

    def response(self) -> Response:
        """Read the response; the connection goes back to the pool if it can carry another."""
        try:
            while True:
                connection = self._connection
                if connection is None:
                    raise RuntimeError("the exchange has ended")
                try:
                    with self._client.cuttable(connection.sock):
                        response, keep = _receive(connection, self._deadline)
                except (OSError, HttpError) as exc:
                    self._connection = None
                    self._retry_or_raise(connection, exc)
                    self.send()
                    continue
                self._connection = None
                if keep:
                    self._client._release(connection)
                else:
                    connection.close()
                return response
        finally:
            self.abandon()

    def abandon(self) -> None:
        """End the exchange without reading its response. Idempotent."""
        if self._connection is not None:
            # The answer may still arrive: the connection can carry nothing else.
            self._connection.close()
            self._connection = None
        self._request.wipe()

    def _retry_or_raise(self, connection: _Connection, exc: Exception) -> None:
        connection.close()
        # A kept-alive connection the server has since closed: try once more
        # on another, within the same deadline. Never after `close`.
        if not connection.reused or isinstance(exc, TimeoutError) or self._client.closed:
            raise HttpError(f"{type(exc).__name__}: {exc}") from None


def _receive(connection: _Connection, deadline: float) -> tuple[Response, bool]:
    sock = connection.sock
    reader = _Reader(sock, deadline)
    try:
        status, headers, body_start = reader.head()
        if headers.get("transfer-encoding", "").lower() == "chunked":
            end = reader.dechunk(body_start)
        else:
            length = headers.get("content-length", "")
            if not _DIGITS.fullmatch(length):
                raise HttpError("response has neither a valid Content-Length nor chunked encoding")
            end = reader.fill_to(body_start + int(length))
        # Bytes beyond the response mean its framing is off (a Content-Length
        # that understates the body, say): the answer is not to be trusted.
        if reader.filled != reader.consumed or connection.sock.pending():
            raise HttpError("bytes beyond the end of the response")
    except BaseException:
        reader.buffer.wipe()
        raise
    keep = headers.get("connection", "").lower() != "close"
    return Response(status, reader.buffer, body_start, end), keep


class _Reader:
    """Reads one response into a growing locked buffer."""

    def __init__(self, sock: ssl.SSLSocket, deadline: float) -> None:
        self.sock = sock
        self.deadline = deadline
        self.buffer = SecretBuffer(FIRST_READ)
        self.filled = 0
        self.consumed = 0  # where the response ends in what was received

    def _receive(self) -> None:
        if self.filled == len(self.buffer):
            self._grow(len(self.buffer) * 2)
        remaining = self.deadline - time.monotonic()
        if remaining <= 0:
            raise TimeoutError("response not complete before the deadline")
        self.sock.settimeout(remaining)
        got = self.sock.recv_into(self.buffer.writable()[self.filled :])
        if not got:
            raise HttpError("connection closed mid-response")
        self.filled += got

    def _grow(self, size: int) -> None:
        if size > MAX_BODY:
            raise HttpError(f"response larger than {MAX_BODY} bytes")
        bigger = SecretBuffer(size)
        bigger.writable()[: self.filled] = self.buffer.view(0, self.filled)
        self.buffer.wipe()
        self.buffer = bigger

    def _find(self, needle: bytes, start: int) -> int:
        return self.buffer.find(needle, start, self.filled)

    def head(self) -> tuple[int, dict[str, str], int]:
        """Status, headers (lower-case names) and where the body starts."""
        while (end := self._find(b"\r\n\r\n", 0)) < 0:
            if self.filled > MAX_HEADER:
                raise HttpError("response headers too large")
            self._receive()
        # Headers carry no secret: decoding them into Python objects is fine.
        lines = bytes(self.buffer.view(0, end)).decode("latin-1").split("\r\n")
        if not _STATUS_LINE.match(lines[0]):
            raise HttpError("not an HTTP/1.x response")
        headers: dict[str, str] = {}
        for line in lines[1:]:
            name, _, value = line.partition(":")
            name, value = name.strip().lower(), value.strip()
            if name in _FRAMING and headers.get(name, value) != value:
                raise HttpError(f"conflicting {name} headers")
            headers[name] = value
        return int(lines[0][9:12]), headers, end + 4

    def _expect_crlf(self, at: int) -> None:
        if self.buffer.find(b"\r\n", at, at + 2) != at:
            raise HttpError("malformed chunked encoding")

    def fill_to(self, end: int) -> int:
        if end > len(self.buffer):
            self._grow(max(end, 2 * len(self.buffer)))
        while self.filled < end:
            self._receive()
        self.consumed = end
        return end

    def dechunk(self, start: int) -> int:
        """Decode a chunked body in place from `start`; returns the body's end."""
        out = pos = start
        while True:
            while (line_end := self._find(b"\r\n", pos)) < 0:
                self._receive()
            # The size line holds no secret when the framing is right, and may
            # hold any part of the body when it is not: never put it in an error.
            match = _CHUNK_SIZE.fullmatch(self.buffer.view(pos, line_end - pos))
            if match is None:
                raise HttpError("malformed chunked encoding")
            size = int(match[1], 16)
            data = line_end + 2
            if size == 0:
                self.fill_to(data + 2)  # the final CRLF (no trailers from the API server)
                self._expect_crlf(data)
                return out
            self.fill_to(data + size + 2)
            self._expect_crlf(data + size)
            self.buffer.move(out, data, size)
            out += size
            pos = data + size + 2
