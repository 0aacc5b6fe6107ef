"""SecretBuffer: locked, non-dumpable, zero-copy, and useless once wiped."""

from __future__ import annotations

import mmap

import pytest

from secretfs.fs import buffer, memory
from secretfs.fs.buffer import SecretBuffer, WipedBufferError, scrub_bytes


def test_views_hold_the_exact_bytes_without_copying() -> None:
    buffer = SecretBuffer.from_bytes(b"\x00binary\xffdata")

    view = buffer.view(1, 6)

    assert bytes(view) == b"binary"
    assert view.readonly
    assert isinstance(view.obj, mmap.mmap)  # a window on the locked mapping, not a copy
    assert bytes(buffer.view(7, 100)) == b"\xffdata"
    assert bytes(buffer.view(100, 5)) == b""


def test_an_empty_value_is_an_empty_buffer() -> None:
    buffer = SecretBuffer.from_bytes(b"")

    assert len(buffer) == 0
    assert bytes(buffer.view()) == b""


def test_a_wiped_buffer_raises_instead_of_serving_zeros() -> None:
    buffer = SecretBuffer.from_bytes(b"hunter2")

    buffer.wipe()
    buffer.wipe()

    assert buffer.wiped
    with pytest.raises(WipedBufferError):
        buffer.view()
    with pytest.raises(WipedBufferError):
        buffer.writable()


def test_wipe_zeroes_the_bytes_even_while_a_view_is_held() -> None:
    buffer = SecretBuffer.from_bytes(b"hunter2")
    held = buffer.view()

    buffer.wipe()

    assert bytes(held) == bytes(7)


def test_the_repr_tells_size_and_state_but_never_the_contents() -> None:
    buffer = SecretBuffer.from_bytes(b"hunter2")

    text = repr(buffer) + str(buffer)

    assert "hunter2" not in text and "7 bytes" in text


def test_buffers_are_locked_in_memory_when_the_memlock_limit_allows() -> None:
    import resource

    soft, _ = resource.getrlimit(resource.RLIMIT_MEMLOCK)
    buffer = SecretBuffer.from_bytes(b"x" * 100)

    expected = soft == resource.RLIM_INFINITY or soft >= 4096
    assert buffer.locked is expected


def test_under_a_process_wide_lock_a_buffer_makes_no_lock_call_of_its_own(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    def refuse(mapping: mmap.mmap) -> bool:
        raise AssertionError("mlock called although every page is locked already")

    monkeypatch.setattr(memory, "_all_locked", True)
    monkeypatch.setattr(buffer, "_lock", refuse)

    assert SecretBuffer.from_bytes(b"k" * 10).locked


def test_scrub_bytes_zeroes_a_temporary_in_place() -> None:
    temporary = bytes(bytearray(b"secret!"))  # a fresh object, not an interned constant

    scrub_bytes(temporary)

    assert temporary == bytes(7)


def test_scrub_bytes_leaves_the_shared_single_byte_objects_alone() -> None:
    single = bytes(bytearray(b"v"))  # CPython hands out its cached b"v"

    scrub_bytes(single)

    assert single == b"v" and bytes([118]) == b"v"
