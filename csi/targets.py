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

import errno
import itertools
import logging
import os
import time
from collections.abc import Callable

from secretfs.fs.ahead import MadeAhead, until_quiet

from . import mounts

log = logging.getLogger(__name__)

# Directories kept ready: as many as spare volume directories (see
# secretfs.fs.session), a node's worth of publishes.
SIZE = 256

# Pause before trying again when a directory cannot be made.
RETRY_SECONDS = 5.0


class TargetPool:
    """Empty directories in `folder`, kept `size` strong (see secretfs.fs.ahead)."""

    def __init__(
        self,
        folder: str,
        pods: str,
        mode: int,
        size: int = SIZE,
        quiet: Callable[[], None] = until_quiet,
    ) -> None:
        self.folder = folder
        self._pods = pods
        self._mode = mode
        self._names = itertools.count(1)
        self._ready = MadeAhead("csi-targets", self._make, _rmdir_quietly, size, quiet)

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
        self._ready.start()
        return self

    @property
    def ready(self) -> int:
        return self._ready.ready

    def take(self, target: str) -> bool:
        """Move a ready directory to `target`; False if none could be moved there.

        Nothing is ever replaced: an existing `target`, even an empty
        directory, stays as it is and the answer is False.
        """
        source = self._ready.take()
        if source is None:
            return False
        try:
            mounts.rename_noreplace(source, target)
        except OSError:
            if os.path.isdir(source):
                self._ready.give_back(source)  # unused: the problem was the target's
            return False
        return True

    def close(self) -> None:
        self._ready.close()

    def _make(self) -> str | None:
        while not self._ready.closed:
            path = os.path.join(self.folder, str(next(self._names)))
            try:
                os.mkdir(path, self._mode)
                return path
            except FileExistsError:
                continue  # something an earlier run left and could not remove
            except FileNotFoundError:
                try:
                    os.makedirs(self.folder, mode=0o700, exist_ok=True)  # removed behind our back
                    continue
                except OSError as exc:
                    failure = exc
            except OSError as exc:
                failure = exc
            # A full disk, say: publishes make their own meanwhile.
            log.warning("cannot make target directories ahead in %s: %s", self.folder, failure)
            time.sleep(RETRY_SECONDS)
        return None


def _rmdir_quietly(path: str) -> None:
    try:
        os.rmdir(path)
    except OSError as exc:
        if exc.errno != errno.ENOENT:
            log.warning("cannot remove %s: %s", path, exc.strerror)
