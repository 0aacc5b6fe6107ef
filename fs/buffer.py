"""Secret bytes in memory the driver owns, locks and wipes.

Lifecycle of a `SecretBuffer`::

    allocate ──fill──▶ sealed ──view()…──▶ wipe() ──▶ wiped (every use raises)

* allocate: a private anonymous mapping of its own, never backed by a file,
  excluded from core dumps (MADV_DONTDUMP) and locked into RAM so the kernel
  never writes it to swap: by the process-wide mlockall that `serve` sets up
  (see secretfs.fs.memory), or else by an mlock of its own.
* fill: the publishing thread writes the decoded secret into it, once.
* sealed: from then on it is only read, through zero-copy `memoryview`s.
* wipe: the bytes are overwritten with zeros and the mapping is unmapped.
  A wiped buffer is not an empty buffer: `view()` raises `WipedBufferError`,
  so a stale reference can never serve zeros as if they were the secret.

The buffer does no locking of its own. The filesystem mutates and reads its
buffers on one thread only (the FUSE thread), so a wipe can never interleave
with a read that is between checking the buffer and replying from it.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import logging
import mmap
import os
import sys
import threading

from . import memory

log = logging.getLogger(__name__)

_libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
_libc.mlock.argtypes = (ctypes.c_void_p, ctypes.c_size_t)

PAGE_SIZE = mmap.PAGESIZE

# `bytes` and ASCII `str` objects store their payload after a fixed header;
# knowing the header's size lets the scrub functions zero a temporary in
# place before it is freed. The header is the object's size minus its payload
# and the trailing NUL byte that CPython keeps after every payload.
_BYTES_HEADER = sys.getsizeof(b"") - 1
_ASCII_HEADER = sys.getsizeof("") - 1


# Bytes held by live buffers, for the driver's metrics.
_live_bytes = 0
_live_lock = threading.Lock()


def live_bytes() -> int:
    """Bytes held by buffers not yet wiped (values, tokens, responses in flight)."""
    return _live_bytes


def _count(delta: int) -> None:
    global _live_bytes
    with _live_lock:
        _live_bytes += delta


class WipedBufferError(RuntimeError):
    """A secret buffer was used after it had been wiped."""


class SecretBuffer:
    """A fixed-size block of secret bytes in locked, non-dumpable memory."""

    __slots__ = ("_locked", "_map", "_size", "_wiped")

    def __init__(self, size: int) -> None:
        if size < 0:
            raise ValueError("a buffer cannot have a negative size")
        self._size = size
        self._wiped = False
        self._locked = False
        self._map: mmap.mmap | None = None
        if size:
            self._map = mmap.mmap(
                -1, _round_to_pages(size), flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS
            )
            self._map.madvise(mmap.MADV_DONTDUMP)
            self._locked = memory.all_locked() or _lock(self._map)
            _count(size)

    @classmethod
    def from_bytes(cls, data: bytes | bytearray | memoryview) -> SecretBuffer:
        """Copy `data` into a new buffer. The caller still owns `data`."""
        view = memoryview(data).cast("B")
        buf = cls(len(view))
        if buf._map is not None:
            buf._map[: len(view)] = view
        return buf

    def __len__(self) -> int:
        return self._size

    def __repr__(self) -> str:
        state = "wiped" if self._wiped else ("locked" if self._locked else "unlocked")
        return f"<SecretBuffer {self._size} bytes, {state}>"

    @property
    def locked(self) -> bool:
        return self._locked

    @property
    def wiped(self) -> bool:
        return self._wiped

    def writable(self) -> memoryview:
        """A writable view of the whole buffer, for filling it once."""
        self._check()
        if self._map is None:
            return memoryview(b"")
        return memoryview(self._map)[: self._size]

    def view(self, offset: int = 0, size: int | None = None) -> memoryview:
        """A read-only, zero-copy view of `size` bytes from `offset` (clipped to the end)."""
        self._check()
        end = self._size if size is None else min(self._size, offset + size)
        if self._map is None or offset >= end:
            return memoryview(b"")
        return memoryview(self._map)[offset:end].toreadonly()

    def find(self, needle: bytes, start: int = 0, end: int | None = None) -> int:
        """Offset of `needle` within [start, end), or -1; searches in place, without a copy."""
        self._check()
        if self._map is None:
            return -1
        return self._map.find(needle, start, self._size if end is None else end)

    def move(self, dest: int, src: int, count: int) -> None:
        """Copy `count` bytes from `src` to `dest` within the buffer; the ranges may overlap."""
        self._check()
        if count:
            if self._map is None or max(dest, src) + count > self._size:
                raise ValueError("move outside the buffer")
            self._map.move(dest, src, count)

    def wipe(self) -> None:
        """Zero and unmap the buffer (which unlocks it). Idempotent."""
        if self._wiped:
            return
        self._wiped = True
        mapping, self._map = self._map, None
        if mapping is None:
            return
        _count(-self._size)
        mapping[:] = bytes(len(mapping))
        try:
            mapping.close()
        except BufferError:
            # A view is still exported somewhere; the bytes are already zero,
            # and the mapping goes away with the last view.
            log.debug("secret buffer wiped; unmapping deferred to its last view")

    def _check(self) -> None:
        if self._wiped:
            raise WipedBufferError("secret buffer used after it was wiped")


def scrub_bytes(data: bytes) -> None:
    """Overwrite an immutable `bytes` temporary with zeros before it is freed.

    Only for objects the caller created itself and holds the only reference
    to: a shared object would change under its other users. CPython shares
    every bytes object of length 0 and 1 (one cached object per byte value),
    so those are left alone; one byte of a secret is not worth corrupting the
    interpreter's constants for.
    """
    if len(data) > 1:
        ctypes.memset(id(data) + _BYTES_HEADER, 0, len(data))


def scrub_str(text: str) -> None:
    """`scrub_bytes` for an ASCII `str` temporary, such as a base64 value.

    The same rules apply; the object's cached hash goes stale, so it must not
    be, or become, a dictionary key. Non-ASCII strings are left alone: their
    layout differs, and base64 and tokens are ASCII.
    """
    if len(text) > 1 and text.isascii():
        ctypes.memset(id(text) + _ASCII_HEADER, 0, len(text))


def _round_to_pages(size: int) -> int:
    return (size + PAGE_SIZE - 1) // PAGE_SIZE * PAGE_SIZE


def _address(mapping: mmap.mmap) -> tuple[int, int]:
    anchor = ctypes.c_char.from_buffer(mapping)
    try:
        return ctypes.addressof(anchor), len(mapping)
    finally:
        del anchor


def _lock(mapping: mmap.mmap) -> bool:
    address, length = _address(mapping)
    if _libc.mlock(address, length) == 0:
        return True
    # Only reachable when `serve` was told to run without locked memory
    # (--allow-unlocked-memory), which it already warned about at start.
    err = ctypes.get_errno()
    log.debug("mlock of a secret buffer failed: %s", os.strerror(err or errno.ENOMEM))
    return False
