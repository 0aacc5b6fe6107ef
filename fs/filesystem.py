"""The node's one FUSE filesystem: a directory per published volume.

Layout seen at the mount point (the driver's state directory)::

    /                     0700 root: only the driver walks it
    /<volume dir>/        one per publication, bind-mounted onto its target
    /<volume dir>/<key>   one read-only file per Secret key

Rules every handler keeps:

* It returns a value or raises `FUSEError`. Anything else is caught once, by
  `_guarded`, logged and answered EIO, because an exception escaping a handler
  would end `pyfuse3.main()` and with it every volume on the node.
* It never awaits: a handler runs start to finish on the FUSE thread, so
  the changes made on that thread (removal, rotation: `FuseSession.call`)
  never interleave with a request.
* It reads the tree without a lock. The one change made from other threads,
  adding a volume, becomes visible in a single step: the volume's inodes
  are all known before its name is. Writers take `_changes`, and hold it
  only for dictionary updates, never across a system call, so the FUSE
  thread waits on it for microseconds at most.
* It makes no system call that could touch the mount, and few at all: pod
  binding reads the caller's /proc/PID/cgroup on open, and while a CSI call
  is under way each request first yields the interpreter lock to it.
* It never logs file contents, only inode numbers, sizes and counts.

Spare directories: a bind mount of a volume directory the kernel has not
seen yet costs a LOOKUP round trip through this process. `add_spare` makes
an empty directory, root's only (0500), for the session to have the kernel
look up ahead of need; `add_volume` then turns it into the volume's top
directory, keeping its inode, and the caller tells the kernel to drop the
spare's cached attributes. Spares are not listed.

Rotation swaps a volume's whole file set in one step (`replace_volume`): the
volume's top directory keeps its inode, which is what the target's bind
mount shows, and gets new children with new inode numbers. A file opened
before the swap keeps reading the version it opened; that version's buffer
is wiped when its last handle closes, or when the volume goes, whichever
comes first.

Known limits:

* The kernel is not told when a volume disappears; its cached entries for
  that volume expire on their own and meanwhile lead to ENOENT or ESTALE.
* Lookup counts are not tracked: a volume's inodes live exactly as long as
  the volume, whatever the kernel still remembers.
"""

from __future__ import annotations

import contextlib
import errno
import functools
import itertools
import logging
import os
import stat
import threading
import time
from collections.abc import Callable, Coroutine, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, ParamSpec, TypeVar

import pyfuse3
from pyfuse3 import FUSEError

from .binding import PodBinding
from .buffer import SecretBuffer, WipedBufferError
from .tree import Directory, File, Layout, Node, build_tree, files_by_path, make_attrs, walk

log = logging.getLogger(__name__)

P = ParamSpec("P")
R = TypeVar("R")

# The root lists volumes that come and go; let the kernel recheck it often.
ROOT_TIMEOUT = 1.0


class _Waiting:
    """How many CSI calls are in progress. While any is, FUSE requests yield
    first; work that can wait for a quiet moment waits (see FuseSession)."""

    def __init__(self) -> None:
        self.count = 0
        self._last_change = 0.0
        self._lock = threading.Lock()

    @contextlib.contextmanager
    def during(self) -> Iterator[None]:
        with self._lock:
            self.count += 1
            self._last_change = time.monotonic()
        try:
            yield
        finally:
            with self._lock:
                self.count -= 1
                self._last_change = time.monotonic()

    def wait_quiet(self, seconds: float) -> None:
        """Return once no call has started or ended for `seconds`.

        A call that is under way but waiting (on the API server, on a
        filesystem that stopped answering) does not keep it from returning.
        It polls rather than being woken, so that the end of a call, when
        its answer is on the way out, wakes no other thread.
        """
        while True:
            with self._lock:
                left = self._last_change + seconds - time.monotonic()
            if left <= 0:
                return
            time.sleep(max(left, seconds / 4))


_calls_waiting = _Waiting()
yield_to_calls = _calls_waiting.during
wait_for_quiet = _calls_waiting.wait_quiet


class FileSystemClosedError(RuntimeError):
    """The filesystem is shutting down and takes no new volume."""


@dataclass(frozen=True, slots=True)
class Rotation:
    """What `replace_volume` swapped out, for the kernel to forget and then `retire`."""

    volume: str
    directory: int  # inode of the volume's top directory
    names: list[bytes]  # its entries before the swap
    replaced: list[Node]


@contextlib.contextmanager
def _owning(files: Mapping[str, SecretBuffer]) -> Iterator[None]:
    """Wipe `files` if the block fails: nobody else will."""
    try:
        yield
    except BaseException:
        for buffer in files.values():
            buffer.wipe()
        raise


def _same_contents(
    current: dict[bytes, File], files: Mapping[str, SecretBuffer], layout: Layout
) -> bool:
    if set(current) != {path.encode() for path in files}:
        return False
    for path, buffer in files.items():
        old = current[path.encode()]
        # memoryview equality compares the bytes in place, without copies
        if old.buffer.view() != buffer.view() or old.owner != layout.owner:
            return False
        owner = (stat.S_IMODE(old.attrs.st_mode), old.attrs.st_uid, old.attrs.st_gid)
        if owner != (layout.mode_of(path), layout.uid, layout.gid):
            return False
    return True


def _guarded(handler: Callable[P, Coroutine[Any, Any, R]]) -> Callable[P, Coroutine[Any, Any, R]]:
    """Turn any unexpected exception of a handler into EIO, once, here."""

    @functools.wraps(handler)
    async def guarded(*args: P.args, **kwargs: P.kwargs) -> R:
        if _calls_waiting.count:
            # A CSI call is under way on another thread: hand it the
            # interpreter lock now rather than after the switch interval.
            time.sleep(0)
        try:
            return await handler(*args, **kwargs)
        except FUSEError:
            raise
        except Exception:
            log.exception("FUSE %s failed unexpectedly; answering EIO", handler.__name__)
            raise FUSEError(errno.EIO) from None

    return guarded


async def _read_only(*_: Any, **__: Any) -> Any:
    raise FUSEError(errno.EROFS)


class SecretFS(pyfuse3.Operations):
    """pyfuse3 operations over all volumes of the node."""

    # Lookups of "." and ".." are not answered; the kernel handles them.
    supports_dot_lookup = False

    def __init__(self, binding: PodBinding | None = None) -> None:
        super().__init__()
        self.binding = binding  # None: any process the file modes allow may open
        self._changes = threading.Lock()  # held by writers, see "Rules" above
        self._inodes = itertools.count(pyfuse3.ROOT_INODE + 1)
        self._inode_lock = threading.Lock()
        self._next_fh = 1
        now = time.time_ns()
        self._root = Directory(
            pyfuse3.ROOT_INODE,
            make_attrs(pyfuse3.ROOT_INODE, stat.S_IFDIR | 0o700, 0, 0, 0, now, ROOT_TIMEOUT),
        )
        self._nodes: dict[int, Node] = {pyfuse3.ROOT_INODE: self._root}
        self._spares: dict[bytes, Directory] = {}  # empty, unlisted: see add_spare
        self._closed = False  # see remove_all
        self._files: dict[int, File] = {}  # open file handles
        self._listings: dict[int, list[tuple[bytes, Node]]] = {}  # open directory handles
        # Rotated-out files that handles still read, by volume: see `retire`.
        self._lingering: dict[str, set[File]] = {}

    # ---- changes ---------------------------------------------------------------
    # add_spare and add_volume may run on any thread, the others on the FUSE
    # thread only: they touch open handles, which only handlers count.

    def add_spare(self, name: str) -> int:
        """Make `/<name>`, an empty directory for `add_volume` to fill; returns its inode."""
        key = name.encode()
        inode = self._allocate_inode()
        spare = Directory(inode, make_attrs(inode, stat.S_IFDIR | 0o500, 0, 0, 0, time.time_ns()))
        with self._changes:
            if self._closed:
                raise FileSystemClosedError(name)
            if key in self._root.entries:
                raise FileExistsError(name)
            self._nodes[inode] = spare
            self._spares[key] = spare
            self._root.entries[key] = spare
        return inode

    def add_volume(self, name: str, files: Mapping[str, SecretBuffer], layout: Layout) -> int:
        """Expose `files` under `/<name>`; returns the inode of its top directory.

        `/<name>` must not exist, or be a spare, which becomes the top
        directory. The filesystem owns the buffers from this call on, also
        when it fails: it then wipes them.
        """
        with _owning(files):
            key = name.encode()
            spare = self._spares.get(key)
            top = build_tree(
                files,
                layout,
                self._allocate_inode,
                time.time_ns(),
                top_inode=None if spare is None else spare.inode,
            )
            with self._changes:
                if self._closed:
                    raise FileSystemClosedError(name)
                if self._root.entries.get(key) is not spare:
                    raise FileExistsError(name)
                self._nodes.update((node.inode, node) for node in walk(top))
                self._root.entries[key] = top
                self._spares.pop(key, None)
        return top.inode

    def remove_volume(self, name: str) -> bool:
        """Hide `/<name>` and wipe its buffers. False if there was no such volume."""
        key = name.encode()
        with self._changes:
            top = self._root.entries.pop(key, None)
            spare = self._spares.pop(key, None)
            nodes = list(walk(top)) if isinstance(top, Directory) else []
            for node in nodes:
                del self._nodes[node.inode]
        # Old versions still open since a rotation go with the volume.
        for file in self._lingering.pop(name, ()):
            file.buffer.wipe()
        for node in nodes:
            if isinstance(node, File):
                node.buffer.wipe()
        return top is not None and top is not spare

    def replace_volume(
        self, name: str, files: Mapping[str, SecretBuffer], layout: Layout
    ) -> Rotation | None:
        """Swap `/<name>`'s files for `files` at once; None if nothing would change.

        Takes ownership of the buffers as `add_volume` does. The old files
        stay known until `retire` is called with the result, so that the
        caller can first make the kernel forget its cached entries.
        """
        with _owning(files):
            if self._closed:
                raise FileSystemClosedError(name)
            top = self._root.entries.get(name.encode())
            if not isinstance(top, Directory):
                raise FileNotFoundError(name)
            unchanged = _same_contents(files_by_path(top), files, layout)
            if not unchanged:
                fresh = build_tree(files, layout, self._allocate_inode, time.time_ns())
        if unchanged:
            for buffer in files.values():
                buffer.wipe()
            return None
        old = [node for node in walk(top) if node is not top]
        with self._changes:
            self._nodes.update((node.inode, node) for node in walk(fresh) if node is not fresh)
        rotation = Rotation(name, top.inode, list(top.entries), old)
        top.entries, top.listing = fresh.entries, fresh.listing
        return rotation

    def retire(self, rotation: Rotation) -> None:
        """Forget the files a rotation replaced; wipe those no handle still reads."""
        with self._changes:
            for node in rotation.replaced:
                self._nodes.pop(node.inode, None)
        for node in rotation.replaced:
            if isinstance(node, File):
                node.retired = True
                if node.handles == 0:
                    node.buffer.wipe()
                else:
                    self._lingering.setdefault(rotation.volume, set()).add(node)

    def remove_all(self) -> int:
        """Remove every volume and spare, for good: what is added later is refused
        (and its buffers wiped). Returns how many volumes there were."""
        with self._changes:
            self._closed = True
            names = [name.decode() for name in self._root.entries]
        return sum(self.remove_volume(name) for name in names)

    def is_spare(self, name: str) -> bool:
        return name.encode() in self._spares

    def volume_names(self) -> list[str]:
        with self._changes:
            return [name.decode() for name in self._root.entries if name not in self._spares]

    def _allocate_inode(self) -> int:
        with self._inode_lock:
            return next(self._inodes)

    def _node(self, inode: int) -> Node:
        node = self._nodes.get(inode)
        if node is None:
            raise FUSEError(errno.ENOENT)
        return node

    # ---- lookups and attributes --------------------------------------------

    @_guarded
    async def lookup(
        self, parent_inode: int, name: bytes, ctx: pyfuse3.RequestContext
    ) -> pyfuse3.EntryAttributes:
        parent = self._node(parent_inode)
        if not isinstance(parent, Directory):
            raise FUSEError(errno.ENOTDIR)
        child = parent.entries.get(name)
        if child is None:
            raise FUSEError(errno.ENOENT)
        return child.attrs

    @_guarded
    async def getattr(self, inode: int, ctx: pyfuse3.RequestContext) -> pyfuse3.EntryAttributes:
        return self._node(inode).attrs

    async def forget(self, inode_list: Sequence[tuple[int, int]]) -> None:
        # Inodes live as long as their volume, not as long as the kernel's
        # references; see "Known limits" above. Nothing here can fail.
        return None

    @_guarded
    async def statfs(self, ctx: pyfuse3.RequestContext) -> pyfuse3.StatvfsData:
        data = pyfuse3.StatvfsData()
        data.f_bsize = data.f_frsize = 4096
        data.f_files = len(self._nodes)
        data.f_namemax = 255
        return data

    @_guarded
    async def getxattr(self, inode: int, name: bytes, ctx: pyfuse3.RequestContext) -> bytes:
        self._node(inode)
        raise FUSEError(errno.ENODATA)

    @_guarded
    async def listxattr(self, inode: int, ctx: pyfuse3.RequestContext) -> list[bytes]:
        self._node(inode)
        return []

    # ---- directories -----------------------------------------------------

    @_guarded
    async def opendir(self, inode: int, ctx: pyfuse3.RequestContext) -> int:
        directory = self._node(inode)
        if not isinstance(directory, Directory):
            raise FUSEError(errno.ENOTDIR)
        # The root changes as volumes come and go, so each listing works on
        # a snapshot; a volume's own directories never change.
        listing = directory.listing if directory is not self._root else self._root_listing()
        fh = self._new_fh()
        self._listings[fh] = listing
        return fh

    def _root_listing(self) -> list[tuple[bytes, Node]]:
        with self._changes:
            entries = self._root.entries.items()
            return sorted((name, node) for name, node in entries if name not in self._spares)

    @_guarded
    async def readdir(self, fh: int, start_id: int, token: pyfuse3.ReaddirToken) -> None:
        listing = self._listings.get(fh)
        if listing is None:
            raise FUSEError(errno.EBADF)
        for index in range(start_id, len(listing)):
            name, node = listing[index]
            if not pyfuse3.readdir_reply(token, name, node.attrs, index + 1):
                return

    @_guarded
    async def releasedir(self, fh: int) -> None:
        self._listings.pop(fh, None)

    # ---- files -------------------------------------------------------------

    @_guarded
    async def open(self, inode: int, flags: int, ctx: pyfuse3.RequestContext) -> pyfuse3.FileInfo:
        node = self._node(inode)
        if isinstance(node, Directory):
            raise FUSEError(errno.EISDIR)
        if flags & os.O_ACCMODE != os.O_RDONLY or flags & os.O_TRUNC:
            raise FUSEError(errno.EROFS)
        owner = node.owner
        if (
            owner is not None
            and self.binding is not None
            and not self.binding.allows(ctx.pid, ctx.uid, owner.pod_uid, owner.volume)
        ):
            raise FUSEError(errno.EACCES)
        if node.buffer.wiped:
            raise FUSEError(errno.ESTALE)
        fh = self._new_fh()
        self._files[fh] = node
        node.handles += 1
        # direct_io: every read comes here, nothing lands in the page cache.
        return pyfuse3.FileInfo(fh=fh, direct_io=True, keep_cache=False)

    # pyfuse3 declares bytes but takes any buffer: a view of the locked
    # mapping goes to the kernel with no copy in between.
    @_guarded
    async def read(self, fh: int, off: int, size: int) -> memoryview:  # type: ignore[override]
        node = self._files.get(fh)
        if node is None:
            raise FUSEError(errno.EBADF)
        try:
            return node.buffer.view(off, size)
        except WipedBufferError:
            # The volume was unpublished while this file was open.
            raise FUSEError(errno.ESTALE) from None

    @_guarded
    async def release(self, fh: int) -> None:
        node = self._files.pop(fh, None)
        if node is None:
            return
        node.handles -= 1
        if node.retired and node.handles == 0:
            node.buffer.wipe()  # the last reader of a rotated-out version is gone
            for lingering in self._lingering.values():
                lingering.discard(node)

    def _new_fh(self) -> int:
        fh = self._next_fh
        self._next_fh += 1
        return fh

    # ---- every change is refused --------------------------------------------

    setattr = mknod = mkdir = unlink = rmdir = symlink = rename = link = _read_only
    write = create = setxattr = removexattr = _read_only

    # No flush handler on purpose: the base class answers ENOSYS once and the
    # kernel stops sending flush on every close.
