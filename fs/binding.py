"""Pod binding: only the processes of the pod that published a volume may open its files.

The FUSE request carries the caller's pid. The pod a process belongs to is
written in its cgroup path, which the kubelet's container runtime sets up:

    cgroupfs driver   /kubepods/burstable/pod8a4f...-...-.../<container>
    systemd driver    /kubepods.slice/kubepods-burstable.slice/
                      kubepods-burstable-pod8a4f..._..._....slice/cri-containerd-<id>.scope

Both forms are recognised, on cgroup v1 (one line per hierarchy) and v2
(a single `0::` line). A caller whose hierarchies disagree, or whose pid the
driver cannot see (pid 0: it lives in a pid namespace the driver is not an
ancestor of, as when the DaemonSet lacks hostPID), belongs to no pod.

Every open reads the caller's /proc/PID/cgroup afresh, one small read, and
nothing about a pid is remembered: a recycled pid or a process moved to
another cgroup is judged by where it is now. What is cached is the parsing,
by the file's text, which repeats for every process of a container.
"""

from __future__ import annotations

import logging
import re
import threading

log = logging.getLogger(__name__)

_POD = re.compile(r"pod([0-9a-f]{8}[-_][0-9a-f]{4}[-_][0-9a-f]{4}[-_][0-9a-f]{4}[-_][0-9a-f]{12})")

# Entries kept before a cache starts over.
CACHE_LIMIT = 4096


def pod_of_cgroups(text: str) -> str | None:
    """The pod uid named by the contents of a /proc/PID/cgroup file, if exactly one."""
    pods = set()
    for line in text.splitlines():
        path = line.split(":", 2)[-1]
        found = _POD.findall(path)
        if found:
            pods.add(found[-1].replace("_", "-"))
    return pods.pop() if len(pods) == 1 else None


class PodBinding:
    def __init__(self, proc: str = "/proc") -> None:
        self._proc = proc
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
            self._pods[text] = pod_of_cgroups(text)
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
