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
    name = session.add_volume({"k": SecretBuffer.from_bytes(b"v")}, layout)
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


def test_spares_are_made_only_while_no_call_is_under_way(session: FuseSession) -> None:
    wait_for_spares(session)
    layout = Layout()
    names = []
    with yield_to_calls():
        for _ in range(SPARES + 2):  # more than there are spares
            names.append(session.add_volume({"k": SecretBuffer.from_bytes(b"x")}, layout))
        time.sleep(0.1)
        waiting = session.spares_ready

    try:
        assert waiting == 0
        assert sorted(session.fs.volume_names()) == sorted(names)
        for name in names:
            assert Path(session.mountpoint, name, "k").read_bytes() == b"x"
        wait_for_spares(session)
    finally:
        for name in names:
            session.remove_volume(name)
