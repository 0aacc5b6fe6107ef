"""Target directories made ahead of need, and moved into place at publish.

CSI leaves making the target directory to the plugin, and on a busy ext4 a
mkdir is no small thing: the allocator searches the block groups for a home
for every new directory, which costs 0.1 to 0.5 ms of kernel time on the
machine the benchmarks ran on. Directories made ahead, while the driver is
quiet, in a folder of the kubelet's, reduce that to a rename(2), which
allocates nothing.

A rename only works within one mount. The folder lives under the kubelet's
`plugins/` folder, which is on the pods' mount when the node plugin mounts
the whole kubelet folder, as the shipped DaemonSet does. Where it is not,
the pool does not start and every target is made with mkdir, as without
it; a single target on a mount of its own is made with mkdir too.
"""

from __future__ import annotations

import collections
import ctypes
import ctypes.util
import errno
import itertools
import logging
import os
import threading
import time
from collections.abc import Callable

from . import mounts

log = logging.getLogger(__name__)

_libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
_libc.renameat2.argtypes = (
    ctypes.c_int,
    ctypes.c_char_p,
    ctypes.c_int,
    ctypes.c_char_p,
    ctypes.c_uint,
)

AT_FDCWD = -100
RENAME_NOREPLACE = 1  # fail with EEXIST rather than replace an empty directory

# Directories kept ready: as many as spare volume directories (see
# secretfs.fs.session), a node's worth of publishes.
SIZE = 256

# Pause before trying again when a directory cannot be made.
RETRY_SECONDS = 5.0


class TargetPool:
    """Empty directories in `folder`, kept `size` strong by a thread of their own."""

    def __init__(
        self,
        folder: str,
        pods: str,
        mode: int,
        wait_for_quiet: Callable[[], None],
        size: int = SIZE,
    ) -> None:
        self.folder = folder
        self._pods = pods
        self._mode = mode
        self._wait_for_quiet = wait_for_quiet
        self._size = size
        self._ready: collections.deque[str] = collections.deque()
        self._low = threading.Condition()
        self._names = itertools.count(1)
        self._enabled = True
        self._stopping = False

    def start(self) -> TargetPool:
        """Clear what an earlier run left in the folder, then keep it filled.

        OSError if the folder cannot be made or is not on the pods' mount.
        """
        if mounts.mount_of(self.folder) != mounts.mount_of(self._pods):
            raise OSError(errno.EXDEV, f"{self.folder} is not on the mount of {self._pods}")
        os.makedirs(self.folder, mode=0o700, exist_ok=True)
        os.chmod(self.folder, 0o700)
        for name in os.listdir(self.folder):
            _rmdir_quietly(os.path.join(self.folder, name))
        threading.Thread(target=self._keep_filled, name="csi-targets", daemon=True).start()
        return self

    @property
    def ready(self) -> int:
        with self._low:
            return len(self._ready)

    def take(self, target: str) -> bool:
        """Move a ready directory to `target`; False if none could be moved there.

        Nothing is ever replaced: an existing `target`, even an empty
        directory, stays as it is and the answer is False.
        """
        with self._low:
            if not self._ready:
                return False
            source = self._ready.popleft()
            self._low.notify()
        if _rename_noreplace(source, target) == 0:
            return True
        self._give_back(source)  # unused: the problem was the target's
        return False

    def close(self) -> None:
        self._disable()

    def _give_back(self, path: str) -> None:
        if not os.path.isdir(path):
            return
        with self._low:
            if self._enabled and len(self._ready) < self._size:
                self._ready.appendleft(path)
                return
        _rmdir_quietly(path)  # replaced meanwhile: one too many

    def _disable(self) -> None:
        with self._low:
            self._enabled = False
            self._stopping = True
            ready, self._ready = list(self._ready), collections.deque()
            self._low.notify()
        for path in ready:
            _rmdir_quietly(path)

    def _keep_filled(self) -> None:
        while True:
            with self._low:
                while len(self._ready) >= self._size and not self._stopping:
                    self._low.wait()
                if self._stopping:
                    return
            self._wait_for_quiet()
            with self._low:
                if len(self._ready) >= self._size:
                    continue  # one given back meanwhile
            path = os.path.join(self.folder, str(next(self._names)))
            try:
                os.mkdir(path, self._mode)
            except FileExistsError:
                continue  # something an earlier run left and could not remove
            except OSError as exc:
                # A full disk, say: publishes make their own meanwhile.
                log.warning("cannot make target directories ahead in %s: %s", self.folder, exc)
                time.sleep(RETRY_SECONDS)
                continue
            with self._low:
                if self._enabled and len(self._ready) < self._size:
                    self._ready.append(path)
                    continue
                enabled = self._enabled
            _rmdir_quietly(path)  # turned off, or one given back meanwhile
            if not enabled:
                return


def _rename_noreplace(source: str, target: str) -> int:
    return int(
        _libc.renameat2(AT_FDCWD, source.encode(), AT_FDCWD, target.encode(), RENAME_NOREPLACE)
    )


def _rmdir_quietly(path: str) -> None:
    try:
        os.rmdir(path)
    except OSError as exc:
        if exc.errno != errno.ENOENT:
            log.warning("cannot remove %s: %s", path, exc.strerror)
