"""The FUSE session in this process, mounted for real: spares and volume additions."""

from __future__ import annotations

import os
import stat
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pyfuse3
import pytest

from secretfs.csi import mounts
from secretfs.fs.buffer import SecretBuffer
from secretfs.fs.filesystem import SecretFS, yield_to_calls
from secretfs.fs.session import SPARES, FuseSession
from secretfs.fs.tree import Layout

pytestmark = pytest.mark.fuse


@pytest.fixture(scope="module")
def session(tmp_path_factory: pytest.TempPathFactory) -> Iterator[FuseSession]:
    mountpoint = tmp_path_factory.mktemp("fuse")
    session = FuseSession(SecretFS(), str(mountpoint))
    session.start()
    try:
        yield session
    finally:
        session.stop()


def wait_for_spares(session: FuseSession, count: int = SPARES) -> None:
    deadline = time.monotonic() + 10
    while session.spares_ready < count:
        assert time.monotonic() < deadline, f"{session.spares_ready} spares after 10 s"
        time.sleep(0.01)


def test_a_volume_binds_without_a_lookup_and_shows_its_own_modes_at_once(
    session: FuseSession, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    wait_for_spares(session)
    looked_up: list[bytes] = []
    lookup = session.fs.lookup

    async def counting(parent: int, name: bytes, ctx: Any) -> pyfuse3.EntryAttributes:
        looked_up.append(name)
        return await lookup(parent, name, ctx)

    monkeypatch.setattr(session.fs, "lookup", counting)
    layout = Layout(file_mode=0o440, dir_mode=0o550, gid=4321)
    name = session.reserve()
    session.add_volume(name, {"k": SecretBuffer.from_bytes(b"v")}, layout)
    target = tmp_path / "target"
    target.mkdir()

    mounts.bind_read_only(os.path.join(session.mountpoint, name), str(target))
    try:
        assert name.encode() not in looked_up  # the kernel knew the directory already
        top = os.stat(target)
        assert stat.S_IMODE(top.st_mode) == 0o550 and top.st_gid == 4321
        assert (target / "k").read_bytes() == b"v"
    finally:
        mounts.unmount(str(target))
        session.remove_volume(name)


def test_spares_wait_while_calls_come_and_a_burst_beyond_them_gets_new_names(
    session: FuseSession,
) -> None:
    wait_for_spares(session)
    with yield_to_calls():  # a call has just started: no spare is made for a while
        names = [session.reserve() for _ in range(SPARES + 2)]  # more than there are spares
        waiting = session.spares_ready
    for name in names:
        session.add_volume(name, {"k": SecretBuffer.from_bytes(name.encode())}, Layout())

    try:
        assert waiting == 0 and len(set(names)) == len(names)
        assert sorted(session.fs.volume_names()) == sorted(names)
        for name in names:
            assert Path(session.mountpoint, name, "k").read_bytes() == name.encode()
        wait_for_spares(session)
    finally:
        for name in names:
            session.remove_volume(name)


def test_a_reserved_name_given_back_unused_is_the_next_one_handed_out(
    session: FuseSession,
) -> None:
    wait_for_spares(session)
    name = session.reserve()

    session.release(name)

    assert session.spares_ready == SPARES
    assert session.reserve() == name
    session.release(name)
