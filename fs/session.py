"""Run the one FUSE session of the process on a thread of its own.

pyfuse3 serves a single session per process, driven by trio. That loop gets
a dedicated thread, the FUSE thread; everything else (gRPC calls, signals,
mounts) runs elsewhere and reaches the filesystem through `call`, which runs
a function on the FUSE thread between two requests. Adding a volume is the
exception: it is built and added on the caller's thread (see SecretFS).

A new volume's directory is one the kernel already knows: spare
directories are made and looked up ahead of need (see secretfs.fs.ahead),
so the bind mount that follows a publish costs no round trip through this
process.

The split matters twice over. A system call that touches the mount (a bind
mount of a source inside it, a stat, an umount) needs the FUSE thread to
answer the kernel, so it must never run there. And tree changes made on the
FUSE thread can never interleave with a request being served.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import errno
import itertools
import logging
import os
import threading
import time
from collections.abc import Callable, Mapping
from typing import TypeVar

import pyfuse3
import trio

from .ahead import MadeAhead
from .buffer import SecretBuffer
from .filesystem import FileSystemClosedError, SecretFS
from .tree import Layout

log = logging.getLogger(__name__)

T = TypeVar("T")

# pyfuse3 starts one trio task per request in flight, up to this many.
MAX_TASKS = 64

# Spare volume directories kept looked up ahead of need: enough for a node
# filling up at once (the kubelet runs at most 110 pods by default), at a
# few hundred bytes each here and in the kernel. A burst beyond them gets new
# directories, each a lookup slower to mount.
SPARES = 256

# Pause before trying again when the kernel could not look a spare up.
SPARE_RETRY_SECONDS = 1.0


class FuseSession:
    def __init__(self, fs: SecretFS, mountpoint: str) -> None:
        self.fs = fs
        self.mountpoint = mountpoint
        self._token: trio.lowlevel.TrioToken | None = None
        self._ready = threading.Event()
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="fuse", daemon=True)
        self._prober = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="fuse-probe")
        self._probe: concurrent.futures.Future[bool] | None = None
        self._probe_lock = threading.Lock()
        self._names = itertools.count(1)  # volume directory names are never reused
        self._spares = MadeAhead("fuse-spares", self._make_spare, self.remove_volume, SPARES)

    def start(self, timeout: float = 10.0) -> None:
        """Mount and start serving; raises what the mount raised."""
        self._thread.start()
        if not self._ready.wait(timeout):
            raise TimeoutError(f"FUSE session at {self.mountpoint} did not start in {timeout}s")
        if self._error is not None:
            raise self._error
        self._spares.start()

    @property
    def alive(self) -> bool:
        return self._thread.is_alive() and self._token is not None

    @property
    def spares_ready(self) -> int:
        """Spare volume directories made and known to the kernel, waiting for a volume."""
        return self._spares.ready

    def responsive(self, timeout: float = 2.0) -> bool:
        """True if the mount answers a lookup within `timeout`.

        The lookup is of a name that never exists, so the kernel cannot answer
        from its cache: the FUSE thread must. It runs on a prober thread of
        its own; while an earlier probe still hangs, no new one is started.
        """
        with self._probe_lock:
            if self._probe is None or self._probe.done():
                self._probe = self._prober.submit(_lookup_nothing, self.mountpoint)
            probe = self._probe
        try:
            return probe.result(timeout)
        except concurrent.futures.TimeoutError:
            return False

    def call(self, fn: Callable[..., T], *args: object) -> T:
        """Run `fn(*args)` on the FUSE thread and return its result.

        FileSystemClosedError if the session is not running: then `fn` did not run.
        """
        token = self._token
        if token is None:
            raise FileSystemClosedError("the FUSE session is not running")
        try:
            return trio.from_thread.run_sync(fn, *args, trio_token=token)
        except trio.RunFinishedError:
            raise FileSystemClosedError("the FUSE session has ended") from None

    def reserve(self) -> str:
        """A name for a new volume: a spare's if one is ready. See `add_volume`, `release`."""
        return self._spares.take() or self._new_name()

    def release(self, name: str) -> None:
        """Give back a reserved name that never became a volume."""
        if self.fs.is_spare(name):
            self._spares.give_back(name)

    def add_volume(self, name: str, files: Mapping[str, SecretBuffer], layout: Layout) -> None:
        """Expose `files` as volume `name`, a name from `reserve`.

        Runs on the caller's thread. The buffers belong to the filesystem
        from here on, also when this fails.
        """
        spare = self.fs.is_spare(name)
        inode = self.fs.add_volume(name, files, layout)
        if spare:
            try:
                # The kernel cached the spare's attributes (0500, root's):
                # the volume's own take effect on the next access.
                _forget(pyfuse3.invalidate_inode, inode, True)
            except BaseException:
                self.remove_volume(name)
                raise

    def remove_volume(self, name: str) -> None:
        """Hide volume `name` and wipe its buffers; nothing if there is no such volume.

        Once the session has ended there is none: ending wiped them all.
        """
        with contextlib.suppress(FileSystemClosedError):
            self.call(self.fs.remove_volume, name)

    def rotate(self, name: str, files: Mapping[str, SecretBuffer], layout: Layout) -> bool:
        """Replace volume `name`'s files with `files`; False if they were the same.

        The swap happens on the FUSE thread; the kernel's cached entries for
        the old files are then dropped from this thread (never the FUSE
        thread: the kernel waits for lookups in flight, which that thread
        answers), and only then are the old files retired.
        """
        if threading.current_thread() is self._thread:
            raise RuntimeError("rotate() would deadlock on the FUSE thread")
        try:
            rotation = self.call(self.fs.replace_volume, name, files, layout)
        except FileSystemClosedError:
            for buffer in files.values():
                buffer.wipe()  # they never reached the filesystem, or it wiped them
            raise
        if rotation is None:
            return False
        try:
            for entry in rotation.names:
                _forget(pyfuse3.invalidate_entry, rotation.directory, entry)
            _forget(pyfuse3.invalidate_inode, rotation.directory, True)
        finally:
            self.call(self.fs.retire, rotation)
        return True

    def stop(self) -> None:
        """Wipe every volume, stop serving and unmount. Safe to call twice."""
        self._spares.close()
        if self._token is not None:
            try:
                wiped = self.call(self.fs.remove_all)
                log.info("wiped %d volumes", wiped)
                trio.from_thread.run_sync(pyfuse3.terminate, trio_token=self._token)
            except (RuntimeError, trio.RunFinishedError):
                log.warning("FUSE loop had already ended")
        self._thread.join(timeout=10)

    def join(self, timeout: float | None = None) -> None:
        self._thread.join(timeout)

    def _new_name(self) -> str:
        return str(next(self._names))

    def _make_spare(self) -> str | None:
        """A spare directory the kernel has cached; None once the session is gone."""
        while self.alive:
            name = self._new_name()
            try:
                self.fs.add_spare(name)
            except FileSystemClosedError:
                return None
            try:
                # The lookup that makes the kernel cache the directory: here,
                # on a thread of its own, never on the FUSE thread.
                os.stat(os.path.join(self.mountpoint, name))
            except OSError as exc:
                log.warning("making a spare directory failed: %s; trying again", exc.strerror)
                self.remove_volume(name)
                time.sleep(SPARE_RETRY_SECONDS)
                continue
            return name
        return None

    def _run(self) -> None:
        try:
            trio.run(self._serve)
        except BaseException as exc:
            if not self._ready.is_set():
                self._error = exc
            else:
                log.critical("FUSE loop ended with an error", exc_info=True)
        finally:
            self._token = None
            self._ready.set()

    async def _serve(self) -> None:
        options = set(pyfuse3.default_options)  # default_permissions: the kernel checks modes
        options |= {
            "fsname=secretfs",
            "subtype=secretfs",
            "allow_other",
            "ro",
            "nosuid",
            "nodev",
            "noexec",
        }
        pyfuse3.init(self.fs, self.mountpoint, options)
        try:
            self._token = trio.lowlevel.current_trio_token()
            self._ready.set()
            log.info("FUSE filesystem serving at %s", self.mountpoint)
            await pyfuse3.main(min_tasks=1, max_tasks=MAX_TASKS)
        finally:
            # Wipe whatever is left even when the loop died on its own.
            self.fs.remove_all()
            pyfuse3.close(unmount=True)
            log.info("FUSE filesystem unmounted from %s", self.mountpoint)


def _lookup_nothing(mountpoint: str) -> bool:
    try:
        os.stat(os.path.join(mountpoint, ".secretfs-probe"))
    except FileNotFoundError:
        return True  # answered
    except OSError:
        return False  # ENOTCONN and friends: the session is gone
    return True


def _forget(invalidate: Callable[..., None], *args: object) -> None:
    try:
        invalidate(*args)
    except OSError as exc:
        if exc.errno != errno.ENOENT:  # ENOENT: the kernel never cached it
            raise
