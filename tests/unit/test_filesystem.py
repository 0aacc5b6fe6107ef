"""The FUSE handlers, called directly: no mount, no kernel."""

from __future__ import annotations

import errno
import logging
import os
import stat
import sys
import threading
import time
from collections.abc import Coroutine
from typing import Any

import pyfuse3
import pytest

from secretfs.fs.buffer import SecretBuffer
from secretfs.fs.filesystem import SecretFS, wait_for_quiet, yield_to_calls
from secretfs.fs.tree import Layout, Owner

ROOT = pyfuse3.ROOT_INODE


def run(coroutine: Coroutine[Any, Any, Any]) -> Any:
    """Run a handler to completion; it must never await (it holds the FUSE thread)."""
    try:
        coroutine.send(None)
    except StopIteration as done:
        return done.value
    raise AssertionError("a handler awaited something")


def errno_of(coroutine: Coroutine[Any, Any, Any]) -> int:
    with pytest.raises(pyfuse3.FUSEError) as failure:
        run(coroutine)
    return failure.value.errno


@pytest.fixture
def fs() -> SecretFS:
    fs = SecretFS()
    fs.add_volume(
        "vol",
        {"password": SecretBuffer.from_bytes(b"hunter2"), "empty": SecretBuffer.from_bytes(b"")},
        Layout(),
    )
    return fs


def inode_of(fs: SecretFS, *names: str) -> int:
    inode = ROOT
    for name in names:
        inode = run(fs.lookup(inode, name.encode(), None)).st_ino
    return inode


def open_file(fs: SecretFS, *names: str) -> int:
    return run(fs.open(inode_of(fs, *names), os.O_RDONLY, None)).fh


def listing(
    fs: SecretFS, inode: int, monkeypatch: pytest.MonkeyPatch, page: int = 1000
) -> list[bytes]:
    """All names readdir returns when the kernel takes `page` entries per request."""
    names: list[bytes] = []
    batch: list[bytes] = []
    next_id = 0

    def reply(token: object, name: bytes, attrs: object, entry_id: int) -> bool:
        nonlocal next_id
        if len(batch) == page:
            return False
        batch.append(name)
        next_id = entry_id
        return True

    monkeypatch.setattr(pyfuse3, "readdir_reply", reply)
    fh = run(fs.opendir(inode, None))
    while True:
        batch.clear()
        run(fs.readdir(fh, next_id, None))
        if not batch:
            break
        names += batch
    run(fs.releasedir(fh))
    return names


def test_lookup_and_getattr_give_modes_sizes_and_owner(fs: SecretFS) -> None:
    attrs = run(fs.getattr(inode_of(fs, "vol", "password"), None))
    top = run(fs.getattr(inode_of(fs, "vol"), None))

    assert stat.S_ISREG(attrs.st_mode) and stat.S_IMODE(attrs.st_mode) == 0o444
    assert attrs.st_size == 7 and (attrs.st_uid, attrs.st_gid) == (0, 0)
    assert stat.S_ISDIR(top.st_mode) and stat.S_IMODE(top.st_mode) == 0o555


def test_a_missing_name_or_inode_is_enoent(fs: SecretFS) -> None:
    assert errno_of(fs.lookup(inode_of(fs, "vol"), b"nope", None)) == errno.ENOENT
    assert errno_of(fs.getattr(999_999, None)) == errno.ENOENT


def test_read_returns_a_view_of_the_buffer_clipped_at_the_end(fs: SecretFS) -> None:
    fh = open_file(fs, "vol", "password")

    assert bytes(run(fs.read(fh, 0, 4096))) == b"hunter2"
    assert bytes(run(fs.read(fh, 3, 2))) == b"te"
    assert bytes(run(fs.read(fh, 50, 10))) == b""
    assert isinstance(run(fs.read(fh, 0, 7)), memoryview)


def test_open_asks_for_direct_io_and_no_cache(fs: SecretFS) -> None:
    info = run(fs.open(inode_of(fs, "vol", "password"), os.O_RDONLY, None))

    assert info.direct_io and not info.keep_cache


@pytest.mark.parametrize("flags", [os.O_WRONLY, os.O_RDWR, os.O_RDONLY | os.O_TRUNC])
def test_opening_for_writing_is_erofs(fs: SecretFS, flags: int) -> None:
    assert errno_of(fs.open(inode_of(fs, "vol", "password"), flags, None)) == errno.EROFS


MUTATIONS = {
    "setattr": lambda fs, i: fs.setattr(i, None, None, None, None),
    "mknod": lambda fs, i: fs.mknod(i, b"n", 0o644, 0, None),
    "mkdir": lambda fs, i: fs.mkdir(i, b"d", 0o755, None),
    "unlink": lambda fs, i: fs.unlink(i, b"password", None),
    "rmdir": lambda fs, i: fs.rmdir(i, b"password", None),
    "symlink": lambda fs, i: fs.symlink(i, b"s", b"password", None),
    "rename": lambda fs, i: fs.rename(i, b"password", i, b"x", 0, None),
    "link": lambda fs, i: fs.link(i, i, b"x", None),
    "write": lambda fs, i: fs.write(1, 0, b"x"),
    "create": lambda fs, i: fs.create(i, b"new", 0o644, os.O_WRONLY, None),
    "setxattr": lambda fs, i: fs.setxattr(i, b"user.x", b"1", None),
    "removexattr": lambda fs, i: fs.removexattr(i, b"user.x", None),
}


@pytest.mark.parametrize("mutation", MUTATIONS, ids=list(MUTATIONS))
def test_every_mutation_handler_answers_erofs(fs: SecretFS, mutation: str) -> None:
    assert errno_of(MUTATIONS[mutation](fs, inode_of(fs, "vol"))) == errno.EROFS


def test_a_read_after_the_volume_is_removed_is_estale(fs: SecretFS) -> None:
    fh = open_file(fs, "vol", "password")

    assert fs.remove_volume("vol")

    assert errno_of(fs.read(fh, 0, 10)) == errno.ESTALE
    assert errno_of(fs.lookup(ROOT, b"vol", None)) == errno.ENOENT


def test_removing_a_volume_wipes_its_buffers(fs: SecretFS) -> None:
    buffer = SecretBuffer.from_bytes(b"secret")
    fs.add_volume("other", {"k": buffer}, Layout())

    fs.remove_volume("other")

    assert buffer.wiped
    assert fs.volume_names() == ["vol"]


def test_an_unexpected_error_is_logged_and_answered_eio(
    fs: SecretFS, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    fh = open_file(fs, "vol", "password")

    def explode(*args: object) -> None:
        raise ZeroDivisionError("boom")

    monkeypatch.setattr(SecretBuffer, "view", explode)
    with caplog.at_level(logging.ERROR):
        assert errno_of(fs.read(fh, 0, 10)) == errno.EIO

    assert "read failed unexpectedly" in caplog.text


def test_readdir_of_thousands_of_keys_is_complete_sorted_and_stable_across_pages(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    fs = SecretFS()
    names = [f"key-{i}" for i in range(5000)]
    fs.add_volume("big", {n: SecretBuffer.from_bytes(n.encode()) for n in names}, Layout())

    first = listing(fs, inode_of(fs, "big"), monkeypatch, page=97)
    second = listing(fs, inode_of(fs, "big"), monkeypatch, page=1000)

    assert first == second == sorted(n.encode() for n in names)


def test_the_root_listing_is_a_snapshot_unaffected_by_volumes_coming_and_going(
    fs: SecretFS, monkeypatch: pytest.MonkeyPatch
) -> None:
    fs.add_volume("b", {}, Layout())
    monkeypatch.setattr(pyfuse3, "readdir_reply", lambda *a: True)
    fh = run(fs.opendir(ROOT, None))

    fs.remove_volume("b")
    fs.add_volume("a", {}, Layout())
    seen: list[bytes] = []
    monkeypatch.setattr(pyfuse3, "readdir_reply", lambda t, n, a, i: seen.append(n) or True)
    run(fs.readdir(fh, 0, None))

    assert seen == [b"b", b"vol"]


def test_a_directory_cannot_be_opened_as_a_file_nor_a_file_as_a_directory(fs: SecretFS) -> None:
    assert errno_of(fs.open(inode_of(fs, "vol"), os.O_RDONLY, None)) == errno.EISDIR
    assert errno_of(fs.opendir(inode_of(fs, "vol", "password"), None)) == errno.ENOTDIR


def test_adding_a_volume_under_a_taken_name_fails(fs: SecretFS) -> None:
    with pytest.raises(FileExistsError):
        fs.add_volume("vol", {}, Layout())


def test_a_spare_is_root_only_unlisted_and_becomes_the_volumes_top_with_its_inode(
    fs: SecretFS, monkeypatch: pytest.MonkeyPatch
) -> None:
    spare = fs.add_spare("7")
    before = run(fs.lookup(ROOT, b"7", None))

    assert before.st_ino == spare and stat.S_IMODE(before.st_mode) == 0o500
    assert listing(fs, ROOT, monkeypatch) == [b"vol"] and fs.volume_names() == ["vol"]

    layout = Layout(file_mode=0o440, dir_mode=0o550, gid=4321)
    top = fs.add_volume("7", {"k": SecretBuffer.from_bytes(b"v")}, layout)
    after = run(fs.getattr(spare, None))

    assert top == spare and stat.S_IMODE(after.st_mode) == 0o550 and after.st_gid == 4321
    assert run(fs.read(open_file(fs, "7", "k"), 0, 10)) == b"v"
    assert listing(fs, ROOT, monkeypatch) == [b"7", b"vol"]


def test_remove_all_counts_volumes_not_spares(fs: SecretFS) -> None:
    fs.add_spare("s")

    assert fs.remove_all() == 1
    assert errno_of(fs.lookup(ROOT, b"s", None)) == errno.ENOENT


def test_volumes_added_from_another_thread_appear_whole_to_handlers(
    fs: SecretFS, monkeypatch: pytest.MonkeyPatch
) -> None:
    count, keys = 400, 100  # many files per volume: a long window for a torn update
    done = threading.Event()
    empty = SecretBuffer(0)

    def add() -> None:
        for i in range(count):
            files = {f"k{j}": empty for j in range(keys)}
            fs.add_volume(f"new-{i}", files, Layout())
        done.set()

    monkeypatch.setattr(pyfuse3, "readdir_reply", lambda *a: True)
    interval = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)  # switch threads as often as the interpreter can
    adder = threading.Thread(target=add)
    adder.start()
    try:
        found = 0
        while found < count:
            # The next volume, looked up as the kernel does, without a lock:
            # once its name resolves, so does every file in it.
            try:
                top = inode_of(fs, f"new-{found}")
            except pyfuse3.FUSEError:
                assert not done.is_set()
                continue
            assert all(inode_of(fs, f"new-{found}", f"k{j}") > top for j in range(keys))
            run(fs.releasedir(run(fs.opendir(ROOT, None))))
            found += 1
    finally:
        adder.join()
        sys.setswitchinterval(interval)

    assert sorted(fs.volume_names()) == sorted(["vol", *(f"new-{i}" for i in range(count))])


def test_inode_numbers_are_never_reused(fs: SecretFS) -> None:
    old = inode_of(fs, "vol", "password")
    fs.remove_volume("vol")
    fs.add_volume("vol", {"password": SecretBuffer.from_bytes(b"new")}, Layout())

    assert inode_of(fs, "vol", "password") > old


def test_rotation_swaps_the_files_and_keeps_the_volumes_directory(fs: SecretFS) -> None:
    top = inode_of(fs, "vol")

    rotation = fs.replace_volume(
        "vol",
        {"password": SecretBuffer.from_bytes(b"new"), "added": SecretBuffer.from_bytes(b"+")},
        Layout(),
    )
    assert rotation is not None
    fs.retire(rotation)

    assert inode_of(fs, "vol") == top
    assert bytes(run(fs.read(open_file(fs, "vol", "password"), 0, 10))) == b"new"
    assert errno_of(fs.lookup(top, b"empty", None)) == errno.ENOENT
    assert sorted(rotation.names) == [b"empty", b"password"]


def test_an_open_file_keeps_its_version_until_closed_then_it_is_wiped(fs: SecretFS) -> None:
    fh = open_file(fs, "vol", "password")
    old_buffer = fs._files[fh].buffer

    rotation = fs.replace_volume("vol", {"password": SecretBuffer.from_bytes(b"rotated")}, Layout())
    assert rotation is not None
    fs.retire(rotation)

    assert bytes(run(fs.read(fh, 0, 10))) == b"hunter2"
    assert not old_buffer.wiped
    run(fs.release(fh))
    assert old_buffer.wiped


def test_rotating_to_identical_contents_changes_nothing_and_wipes_the_copies(fs: SecretFS) -> None:
    before = inode_of(fs, "vol", "password")
    copies = {
        "password": SecretBuffer.from_bytes(b"hunter2"),
        "empty": SecretBuffer.from_bytes(b""),
    }

    assert fs.replace_volume("vol", copies, Layout()) is None

    assert inode_of(fs, "vol", "password") == before
    assert all(buffer.wiped for buffer in copies.values())


def test_a_failed_add_wipes_the_buffers_it_was_given(fs: SecretFS) -> None:
    buffer = SecretBuffer.from_bytes(b"orphan")

    with pytest.raises(FileExistsError):
        fs.add_volume("vol", {"k": buffer}, Layout())

    assert buffer.wiped


class _Binding:
    """A stand-in for PodBinding: pid 100 is in pod p1, every other pid in none."""

    def __init__(self) -> None:
        self.asked: list[tuple[int, str]] = []

    def allows(self, pid: int, uid: int, pod: str, volume: str) -> bool:
        self.asked.append((pid, pod))
        return pid == 100 and pod == "p1"


class _Ctx:
    def __init__(self, pid: int, uid: int = 0) -> None:
        self.pid, self.uid = pid, uid


def test_a_bound_volume_opens_only_for_its_pods_processes() -> None:
    binding = _Binding()
    fs = SecretFS(binding)  # type: ignore[arg-type]
    fs.add_volume("v", {"k": SecretBuffer.from_bytes(b"x")}, Layout(owner=Owner("p1", "vol-1")))
    inode = inode_of(fs, "v", "k")

    assert run(fs.open(inode, os.O_RDONLY, _Ctx(100))).fh > 0
    assert errno_of(fs.open(inode, os.O_RDONLY, _Ctx(200))) == errno.EACCES
    assert errno_of(fs.open(inode, os.O_RDONLY, _Ctx(0))) == errno.EACCES
    assert binding.asked == [(100, "p1"), (200, "p1"), (0, "p1")]


def test_modes_come_from_the_layout_per_path() -> None:
    fs = SecretFS()
    layout = Layout(file_mode=0o440, dir_mode=0o550, gid=1234, modes={"d/k": 0o400})
    fs.add_volume(
        "v", {"d/k": SecretBuffer.from_bytes(b"x"), "j": SecretBuffer.from_bytes(b"y")}, layout
    )

    nested = run(fs.getattr(inode_of(fs, "v", "d", "k"), None))
    plain = run(fs.getattr(inode_of(fs, "v", "j"), None))
    directory = run(fs.getattr(inode_of(fs, "v", "d"), None))

    assert stat.S_IMODE(nested.st_mode) == 0o400 and stat.S_IMODE(plain.st_mode) == 0o440
    assert stat.S_IMODE(directory.st_mode) == 0o550
    assert (plain.st_uid, plain.st_gid, directory.st_gid) == (0, 1234, 1234)


def test_unpublish_wipes_a_rotated_out_version_that_a_reader_still_holds(fs: SecretFS) -> None:
    fh = open_file(fs, "vol", "password")
    old_buffer = fs._files[fh].buffer
    rotation = fs.replace_volume("vol", {"password": SecretBuffer.from_bytes(b"new")}, Layout())
    assert rotation is not None
    fs.retire(rotation)

    fs.remove_volume("vol")

    assert old_buffer.wiped
    assert errno_of(fs.read(fh, 0, 10)) == errno.ESTALE


def test_a_path_thousands_of_folders_deep_builds_and_wipes_without_recursion() -> None:
    fs = SecretFS()
    buffer = SecretBuffer.from_bytes(b"deep")

    fs.add_volume("deep", {"/".join(["d"] * 3000): buffer}, Layout())
    fs.remove_volume("deep")

    assert buffer.wiped


def test_handlers_yield_the_interpreter_only_while_a_csi_call_is_under_way(
    fs: SecretFS, monkeypatch: pytest.MonkeyPatch
) -> None:
    import secretfs.fs.filesystem as filesystem

    yields: list[float] = []
    monkeypatch.setattr(filesystem.time, "sleep", yields.append)
    inode = inode_of(fs, "vol")

    run(fs.getattr(inode, None))
    with yield_to_calls():
        run(fs.getattr(inode, None))
    run(fs.getattr(inode, None))

    assert yields == [0]


def test_quiet_means_no_call_started_or_ended_lately_even_with_one_still_waiting() -> None:
    quiet = 0.05
    with yield_to_calls():
        start = time.monotonic()
        wait_for_quiet(quiet)  # the call goes on, but nothing started or ended since
        waited = time.monotonic() - start

    assert quiet * 0.9 <= waited < quiet * 4
