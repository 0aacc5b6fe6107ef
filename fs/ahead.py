"""Things made ahead of need, while the driver is quiet.

Two kinds of directory are made ahead so that a publish does not have to
make them: spare volume directories the kernel has already looked up
(secretfs.fs.session) and target directories to rename into place
(secretfs.csi.targets). Each kind is kept in a `MadeAhead`: at most `size`
of them, made by a thread of their own, and only once no CSI call has
started or ended for a moment, since making them during a burst of calls
slows each call down by about as much as it saves.
"""

from __future__ import annotations

import collections
import threading
from collections.abc import Callable
from typing import Generic, TypeVar

from .filesystem import wait_for_quiet

T = TypeVar("T")

# Things are made once no CSI call has started or ended for this long.
QUIET_SECONDS = 0.05


def until_quiet() -> None:
    """Return once no CSI call has started or ended for QUIET_SECONDS."""
    wait_for_quiet(QUIET_SECONDS)


class MadeAhead(Generic[T]):
    """Up to `size` things from `make`, ready to `take`.

    `make` returns a new thing, or None when no more can be made; it runs on
    the thread of `name`. `discard` undoes a thing that will not be used: one
    given back when there are enough already, or one left at `close`.
    """

    def __init__(
        self,
        name: str,
        make: Callable[[], T | None],
        discard: Callable[[T], None],
        size: int,
        quiet: Callable[[], None] = until_quiet,
    ) -> None:
        self._name = name
        self._make = make
        self._discard = discard
        self._size = size
        self._quiet = quiet
        self._ready: collections.deque[T] = collections.deque()
        self._changed = threading.Condition()
        self._closed = False

    def start(self) -> None:
        threading.Thread(target=self._keep_filled, name=self._name, daemon=True).start()

    @property
    def ready(self) -> int:
        with self._changed:
            return len(self._ready)

    @property
    def closed(self) -> bool:
        return self._closed

    def take(self) -> T | None:
        """A thing made ahead, or None if none is ready."""
        with self._changed:
            self._changed.notify()  # one fewer: time to make another
            return self._ready.popleft() if self._ready else None

    def give_back(self, thing: T) -> None:
        """Return a thing taken but not used; discarded if it is one too many."""
        with self._changed:
            if not self._closed and len(self._ready) < self._size:
                self._ready.appendleft(thing)
                return
        self._discard(thing)

    def close(self) -> None:
        """Stop making things, and discard those still ready."""
        with self._changed:
            self._closed = True
            ready, self._ready = list(self._ready), collections.deque()
            self._changed.notify()
        for thing in ready:
            self._discard(thing)

    def _keep_filled(self) -> None:
        while True:
            with self._changed:
                while len(self._ready) >= self._size and not self._closed:
                    self._changed.wait()
                if self._closed:
                    return
            self._quiet()
            with self._changed:
                if len(self._ready) >= self._size:
                    continue  # one given back meanwhile
            thing = self._make()
            if thing is None:
                return
            with self._changed:
                if not self._closed and len(self._ready) < self._size:
                    self._ready.append(thing)
                    continue
                closed = self._closed
            self._discard(thing)  # closed, or one given back meanwhile
            if closed:
                return
