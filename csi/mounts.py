"""Bind mounts onto the kubelet's target paths, and the mount table.

Everything here issues system calls that may touch the FUSE mount, so it
must only ever run on a gRPC worker or the main thread, never on the FUSE
thread (see secretfs.fs.session). Whether a path is a mount point is read
from /proc/self/mountinfo rather than found by stat(2), which blocks or
fails with ENOTCONN on a dead FUSE mount.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import logging
import os
import re
from dataclasses import dataclass

log = logging.getLogger(__name__)

_libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
_libc.mount.argtypes = (
    ctypes.c_char_p,
    ctypes.c_char_p,
    ctypes.c_char_p,
    ctypes.c_ulong,
    ctypes.c_void_p,
)
_libc.umount2.argtypes = (ctypes.c_char_p, ctypes.c_int)
_libc.renameat2.argtypes = (
    ctypes.c_int,
    ctypes.c_char_p,
    ctypes.c_int,
    ctypes.c_char_p,
    ctypes.c_uint,
)

AT_FDCWD = -100
RENAME_NOREPLACE = 1  # fail with EEXIST rather than replace an empty directory

MS_RDONLY = 0x1
MS_NOSUID = 0x2
MS_NODEV = 0x4
MS_NOEXEC = 0x8
MS_REMOUNT = 0x20
MS_BIND = 0x1000
MNT_DETACH = 0x2
UMOUNT_NOFOLLOW = 0x8  # never unmount what a symlink at the path points to

# The FUSE mount itself is already read-only, nosuid, nodev and noexec; the
# bind mount repeats the flags so the target is safe on its own.
TARGET_FLAGS = MS_RDONLY | MS_NOSUID | MS_NODEV | MS_NOEXEC

# Errors that mean the FUSE server behind a mount is gone or wedged: such a
# mount cannot be unmounted normally, only detached.
_DETACH_ON = (errno.ENOTCONN, errno.EIO, errno.EBUSY, errno.ESTALE)

_ESCAPE = re.compile(r"\\([0-7]{3})")

# More mounts than this stacked on one target is not our doing; stop there.
_MAX_STACK = 16


@dataclass(frozen=True, slots=True)
class MountInfo:
    mount_id: int
    root: str
    mountpoint: str
    fstype: str
    source: str
    options: frozenset[str]


def _escape(path: str) -> str:
    return "".join(f"\\{ord(c):03o}" if c in " \t\n\\" else c for c in path)


def _unescape(field: str) -> str:
    # mountinfo writes space, tab, newline and backslash as \ooo octal escapes.
    return _ESCAPE.sub(lambda match: chr(int(match[1], 8)), field)


def mount_table(path: str = "/proc/self/mountinfo", at: str | None = None) -> list[MountInfo]:
    """The mount table; only the mounts at mount point `at`, if given.

    With thousands of volumes the table has thousands of lines: when `at` is
    given, the text is searched for it and only the lines that name it are
    parsed.
    """
    with open(path, encoding="utf-8", errors="surrogateescape") as f:
        text = f.read()
    if at is None:
        lines = text.splitlines()
    else:
        lines = []
        needle = f" {_escape(at)} "
        found = text.find(needle)
        while found >= 0:
            start = text.rfind("\n", 0, found) + 1
            end = text.find("\n", found)
            end = len(text) if end < 0 else end
            lines.append(text[start:end])
            found = text.find(needle, end)
    return [_parse(line) for line in lines]


def _parse(line: str) -> MountInfo:
    # Single spaces separate the fields; any other white space is a name's own.
    fields = line.split(" ")
    sep = fields.index("-")
    return MountInfo(
        mount_id=int(fields[0]),
        root=_unescape(fields[3]),
        mountpoint=_unescape(fields[4]),
        options=frozenset(fields[5].split(",")),
        fstype=fields[sep + 1],
        source=_unescape(fields[sep + 2]),
    )


def mounts_at(path: str) -> list[MountInfo]:
    """Every mount stacked on `path`, bottom first."""
    return [m for m in mount_table(at=path) if m.mountpoint == path]


def is_mountpoint(path: str) -> bool:
    return bool(mounts_at(path))


def mount_of(path: str) -> int:
    """The id of the mount that `path` (symlinks resolved) lies on."""
    real = os.path.realpath(path)
    best, best_length = -1, -1
    for mount in mount_table():
        point = mount.mountpoint.rstrip("/")
        inside = real == point or real.startswith(point + "/")
        # The longest mount point wins; among mounts stacked on it, the last.
        if inside and len(point) >= best_length:
            best, best_length = mount.mount_id, len(point)
    return best


def _check(result: int, what: str, path: str) -> None:
    if result != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"{what} {path}: {os.strerror(err)}")


def rename_noreplace(source: str, target: str) -> None:
    """Move `source` to `target`, which must not exist: nothing is ever replaced."""
    _check(
        _libc.renameat2(AT_FDCWD, source.encode(), AT_FDCWD, target.encode(), RENAME_NOREPLACE),
        "rename onto",
        target,
    )


def bind_read_only(source: str, target: str) -> None:
    """Bind-mount `source` onto `target`, then make that mount read-only.

    A bind mount takes its flags only on a second, remounting call; if that
    call fails the half-made writable mount is removed before raising.
    """
    _check(
        _libc.mount(source.encode(), target.encode(), None, MS_BIND, None),
        "bind mount onto",
        target,
    )
    try:
        _check(
            _libc.mount(None, target.encode(), None, MS_BIND | MS_REMOUNT | TARGET_FLAGS, None),
            "read-only remount of",
            target,
        )
    except OSError:
        _libc.umount2(target.encode(), MNT_DETACH)
        raise


def unmount(path: str) -> int:
    """Unmount everything stacked on `path`; returns how many mounts went.

    The kernel itself says when nothing is left (EINVAL: not a mount point;
    ENOENT: no such path), so the mount table is never read here. A mount
    whose FUSE server died or is busy is detached lazily: the kernel removes
    it from the tree now and frees it once its last user leaves.
    """
    count = 0
    target = path.encode()
    for _ in range(_MAX_STACK):
        if _libc.umount2(target, UMOUNT_NOFOLLOW) == 0:
            count += 1
            continue
        err = ctypes.get_errno()
        if err in (errno.EINVAL, errno.ENOENT):
            return count
        if err not in _DETACH_ON:
            raise OSError(err, f"unmount {path}: {os.strerror(err)}")
        log.warning("detaching mount at %s lazily: %s", path, os.strerror(err))
        _check(_libc.umount2(target, MNT_DETACH | UMOUNT_NOFOLLOW), "detach of", path)
        count += 1
    raise OSError(errno.EBUSY, f"unmount {path}: still mounted after {_MAX_STACK} unmounts")
