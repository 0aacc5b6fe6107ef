"""Pod binding: only the processes of the pod that published a volume may open its files.

The FUSE request carries the caller's pid. The pod a process belongs to is
written in its cgroup path, which the kubelet's container runtime sets up:

    cgroupfs driver   /kubepods/burstable/pod8a4f...-...-.../<container>
    systemd driver    /kubepods.slice/kubepods-burstable.slice/
                      kubepods-burstable-pod8a4f..._..._....slice/cri-containerd-<id>.scope

Both forms are recognised, on cgroup v1 (one line per hierarchy) and v2
(a single `0::` line); see `pod_of_path` for what a path must look like to
count. A caller whose hierarchies disagree, or whose pid the
driver cannot see (pid 0: it lives in a pid namespace the driver is not an
ancestor of, as when the DaemonSet lacks hostPID), belongs to no pod.

Every open reads the caller's /proc/PID/cgroup afresh, one small read, and
nothing about a pid is remembered: a recycled pid or a process moved to
another cgroup is judged by where it is now. What is cached is the parsing,
by the file's text, which repeats for every process of a container.
"""

from __future__ import annotations

import itertools
import logging
import os
import re
import threading
from collections.abc import Callable

log = logging.getLogger(__name__)

_UUID = r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}"
_UUID_UNDERSCORED = r"[0-9a-f]{8}_[0-9a-f]{4}_[0-9a-f]{4}_[0-9a-f]{4}_[0-9a-f]{12}"
# A pod's own cgroup, as one whole path component, in the cgroupfs form
# (`pod<uid>`) or the systemd form (`kubepods-<qos>-pod<uid_with_underscores>.slice`,
# with a prefix such as `kubelet-` when the kubelet's cgroup root is nested).
_POD_COMPONENT = re.compile(
    rf"pod(?P<plain>{_UUID})"
    rf"|(?:[a-z0-9]+-)*kubepods(?:-[a-z]+)*-pod(?P<slice>{_UUID_UNDERSCORED})\.slice"
)

# The cgroups the kubelet puts above a pod's: its root and the QoS classes,
# in both naming schemes (`kubepods/burstable`, `kubepods-burstable.slice`).
_HIERARCHY = re.compile(
    r"kubepods|burstable|besteffort|guaranteed|(?:[a-z0-9]+-)*kubepods(?:-[a-z]+)*\.slice"
)

# Entries kept before a cache starts over.
CACHE_LIMIT = 4096


def pod_of_path(path: str, owned_by_root: Callable[[str], bool] | None = None) -> str | None:
    """The pod whose cgroup `path` lies in, or None.

    The first component naming a pod decides, so cgroups a pod nests inside
    its own cannot claim another pod. What lies above it must be the
    kubelet's hierarchy, so that a cgroup delegated to a user cannot pass for
    a pod just by its name:

    * a path seen whole (no `..`) needs a kubepods cgroup somewhere above the
      pod, and `owned_by_root` is asked about the pod's directory: users
      create cgroups they own, the kubelet's are root's;
    * a path seen from a private cgroup namespace starts with `..`, hiding
      the top of the tree, and cannot be checked for ownership: every
      component it does show above the pod must be a kubepods or QoS cgroup.
    """
    parts = [p for p in path.split("/") if p]
    for index, part in enumerate(parts):
        match = _POD_COMPONENT.fullmatch(part)
        if match is None:
            continue
        above = parts[:index]
        shown = list(itertools.dropwhile(lambda p: p == "..", above))
        if len(shown) < len(above):
            trusted = all(_HIERARCHY.fullmatch(p) for p in shown)
        else:
            trusted = ("kubepods" in part or any("kubepods" in p for p in above)) and (
                owned_by_root is None or owned_by_root("/" + "/".join(parts[: index + 1]))
            )
        if not trusted:
            return None
        return match["plain"] or match["slice"].replace("_", "-")
    return None


def pod_of_cgroups(text: str, owned_by_root: Callable[[str], bool] | None = None) -> str | None:
    """The pod uid named by the contents of a /proc/PID/cgroup file, if exactly one.

    Ownership is checked on the unified (v2) line only, the one whose
    hierarchy `owned_by_root` resolves paths in.
    """
    pods = set()
    for line in text.splitlines():
        hierarchy, _, path = line.partition(":")
        _, _, path = path.partition(":")
        pods.add(pod_of_path(path, owned_by_root if hierarchy == "0" else None))
    pods.discard(None)
    return pods.pop() if len(pods) == 1 else None


def cgroup2_mount(mounts: str = "/proc/self/mounts") -> str | None:
    try:
        with open(mounts) as f:
            for line in f:
                fields = line.split(" ")
                if fields[2] == "cgroup2":
                    return fields[1]
    except OSError:
        pass
    return None


def root_owned_in(mount: str | None) -> Callable[[str], bool] | None:
    """A check that a cgroup path (under `mount`) is a directory owned by root."""
    if mount is None:
        return None

    def owned_by_root(path: str) -> bool:
        try:
            return os.stat(mount + path).st_uid == 0
        except OSError:
            return False

    return owned_by_root


class PodBinding:
    def __init__(self, proc: str = "/proc", cgroup_mount: str | None = None) -> None:
        self._proc = proc
        self._owned_by_root = root_owned_in(cgroup_mount)
        self._pods: dict[str, str | None] = {}  # /proc/PID/cgroup text -> pod uid
        self._reported: set[tuple[int, str]] = set()
        self._lock = threading.Lock()
        self.refusals = 0

    def allows(self, pid: int, uid: int, pod: str, volume: str) -> bool:
        """True if process `pid` belongs to pod `pod`; a refusal is counted and logged once."""
        caller = self.pod_of(pid)
        if caller == pod:
            return True
        self._refuse(pid, uid, caller, volume)
        return False

    def pod_of(self, pid: int) -> str | None:
        if pid <= 0:
            return None
        try:
            with open(f"{self._proc}/{pid}/cgroup") as f:
                text = f.read()
        except OSError:
            return None
        if text not in self._pods:
            if len(self._pods) >= CACHE_LIMIT:
                self._pods.clear()
            self._pods[text] = pod_of_cgroups(text, self._owned_by_root)
        return self._pods[text]

    def _refuse(self, pid: int, uid: int, caller: str | None, volume: str) -> None:
        with self._lock:
            self.refusals += 1
            key = (pid, volume)
            if key in self._reported:
                return
            if len(self._reported) >= CACHE_LIMIT:
                self._reported.clear()
            self._reported.add(key)
        log.warning(
            "refused an open of volume %s: pid %d (uid %d, %s) is %s",
            volume,
            pid,
            uid,
            self._command(pid),
            f"in pod {caller}" if caller else "in no pod",
        )

    def _command(self, pid: int) -> str:
        try:
            with open(f"{self._proc}/{pid}/comm") as f:
                return f.read().strip()[:32].encode("unicode_escape").decode()
        except OSError:
            return "unknown command"
