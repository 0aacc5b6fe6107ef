"""TargetPool: target directories made ahead and moved into place."""

from __future__ import annotations

import os
import shutil
import stat
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from secretfs.csi.targets import TargetPool

SIZE = 4


def new_pool(folder: Path, pods: Path) -> TargetPool:
    """A pool of SIZE that makes its directories without waiting for a quiet moment."""
    return TargetPool(str(folder), str(pods), 0o750, size=SIZE, quiet=lambda: None)


def wait_until_ready(pool: TargetPool, count: int = SIZE) -> None:
    deadline = time.monotonic() + 5
    while pool.ready < count:
        assert time.monotonic() < deadline, f"{pool.ready} ready after 5 s"
        time.sleep(0.01)


def settled(folder: Path) -> int:
    """How many directories the pool's folder holds once the pool has settled."""
    deadline = time.monotonic() + 5
    while len(list(folder.iterdir())) != SIZE and time.monotonic() < deadline:
        time.sleep(0.01)
    return len(list(folder.iterdir()))


@pytest.fixture
def pool(tmp_path: Path) -> Iterator[TargetPool]:
    pool = new_pool(tmp_path / "pool", tmp_path).start()
    wait_until_ready(pool)
    yield pool
    pool.close()


def test_start_clears_what_an_earlier_run_left_and_fills_the_folder(tmp_path: Path) -> None:
    (tmp_path / "pool" / "old").mkdir(parents=True)
    pool = new_pool(tmp_path / "pool", tmp_path).start()
    try:
        wait_until_ready(pool)
        made = sorted((tmp_path / "pool").iterdir())
        assert "old" not in [p.name for p in made] and len(made) == SIZE
        assert all(stat.S_IMODE(p.stat().st_mode) == 0o750 for p in made)
        assert stat.S_IMODE((tmp_path / "pool").stat().st_mode) == 0o700
    finally:
        pool.close()

    assert list((tmp_path / "pool").iterdir()) == []


def test_a_ready_directory_is_moved_to_the_target_and_replaced(
    pool: TargetPool, tmp_path: Path
) -> None:
    first = tmp_path / "pool" / "1"
    inode = first.stat().st_ino
    target = tmp_path / "pod" / "mount"
    target.parent.mkdir()

    assert pool.take(str(target))

    assert target.stat().st_ino == inode and not first.exists()
    wait_until_ready(pool)


@pytest.mark.parametrize("existing", ["directory", "file"])
def test_an_existing_target_is_never_replaced(
    pool: TargetPool, tmp_path: Path, existing: str
) -> None:
    target = tmp_path / "mount"
    if existing == "directory":
        target.mkdir()
    else:
        target.write_text("mine")
    inode = target.stat().st_ino

    assert not pool.take(str(target))

    assert target.stat().st_ino == inode
    assert settled(tmp_path / "pool") == SIZE  # given back, or replaced


def test_a_target_whose_parent_is_missing_is_left_to_the_caller(
    pool: TargetPool, tmp_path: Path
) -> None:
    assert not pool.take(str(tmp_path / "no" / "such" / "mount"))
    assert settled(tmp_path / "pool") == SIZE  # given back, or replaced


@pytest.fixture
def other_mount(tmp_path: Path) -> Iterator[Path]:
    other = tmp_path / "other"
    other.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "other", str(other)], check=True)
    try:
        yield other
    finally:
        subprocess.run(["umount", str(other)], check=True)


def test_a_target_on_a_mount_of_its_own_is_left_to_the_caller_and_the_pool_stays_on(
    pool: TargetPool, tmp_path: Path, other_mount: Path
) -> None:
    for name in "abcd":
        assert not pool.take(str(other_mount / name))

    assert pool.take(str(tmp_path / "here"))
    assert not any(os.path.exists(other_mount / name) for name in "abcd")


def test_a_pool_whose_folder_is_not_on_the_pods_mount_does_not_start(
    tmp_path: Path, other_mount: Path
) -> None:
    pool = new_pool(tmp_path / "pool", other_mount)

    with pytest.raises(OSError, match="not on the mount"):
        pool.start()
    pool.close()

    assert pool.ready == 0 and not pool.take(str(other_mount / "mount"))


def test_the_pool_never_holds_more_than_its_size(pool: TargetPool, tmp_path: Path) -> None:
    occupied = tmp_path / "occupied"
    occupied.mkdir()
    for _ in range(200):  # each take finds the target taken and gives its directory back
        assert not pool.take(str(occupied))
        assert pool.ready <= SIZE

    assert settled(tmp_path / "pool") == SIZE


def test_a_folder_removed_behind_the_pools_back_is_made_again(
    pool: TargetPool, tmp_path: Path
) -> None:
    shutil.rmtree(tmp_path / "pool")
    for _ in range(SIZE):  # the directories it had are gone with the folder
        assert not pool.take(str(tmp_path / "gone"))

    wait_until_ready(pool)
    assert pool.take(str(tmp_path / "here"))
    assert (tmp_path / "here").is_dir() and (tmp_path / "pool").is_dir()
