"""The HTTPS client's response reader, fed hand-made bytes: framing must be exact."""

from __future__ import annotations

import socket
import time

import pytest

from secretfs.csi.https import HttpError, _Connection, _receive

BODY = b'{"kind": "Secret", "data": {"k": "c2VjcmV0LXZhbHVl"}}'


class _Plain:
    """One end of a socket pair, with the one call of an SSL socket the reader uses."""

    def __init__(self, sock: socket.socket) -> None:
        self._sock = sock

    def __getattr__(self, name: str) -> object:
        return getattr(self._sock, name)

    def pending(self) -> int:
        return 0


def receive(response: bytes) -> bytes:
    ours, theirs = socket.socketpair()
    with ours, theirs:
        theirs.sendall(response)
        theirs.shutdown(socket.SHUT_WR)
        got, _ = _receive(_Connection(_Plain(ours)), time.monotonic() + 2)  # type: ignore[arg-type]
        try:
            return bytes(got.body())
        finally:
            got.buffer.wipe()


def test_a_well_framed_answer_is_read_whole_either_way() -> None:
    length = b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % len(BODY) + BODY
    chunked = (
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
        + b"a;ext=1\r\n"
        + BODY[:10]
        + b"\r\n"
        + b"%x\r\n" % len(BODY[10:])
        + BODY[10:]
        + b"\r\n0\r\n\r\n"
    )

    assert receive(length) == BODY and receive(chunked) == BODY


@pytest.mark.parametrize(
    "response",
    [
        # a first chunk's size understated: the body's text is where a size should be
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\na\r\n"
        + BODY[:10]
        + b"\r\n"
        + BODY[10:]
        + b"\r\n0\r\n\r\n",
        # a chunk not followed by CRLF
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n%x\r\n" % len(BODY)
        + BODY
        + b"XX0\r\n\r\n",
        # a Content-Length that understates the body
        b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % (len(BODY) - 10) + BODY,
        # two Content-Lengths that disagree
        b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\nContent-Length: 5\r\n\r\n" % len(BODY) + BODY,
        b"HTTP/1.1 200 OK\r\nContent-Length: -5\r\n\r\n" + BODY,
        b"HTTP/1.1 200 OK\r\n\r\n" + BODY,
        b"HTTP/1.1 2000 OK\r\nContent-Length: %d\r\n\r\n" % len(BODY) + BODY,
        b"HTTP/2 200\r\nContent-Length: %d\r\n\r\n" % len(BODY) + BODY,
    ],
    ids=[
        "chunk-size-understated",
        "chunk-without-crlf",
        "length-understated",
        "two-lengths",
        "negative-length",
        "no-length",
        "four-digit-status",
        "not-http-1",
    ],
)
def test_broken_framing_fails_with_a_fixed_message_that_quotes_nothing(response: bytes) -> None:
    with pytest.raises(HttpError) as failure:
        receive(response)

    assert "c2VjcmV0" not in str(failure.value) and "Secret" not in str(failure.value)
