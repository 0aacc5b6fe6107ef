"""Test harness: a real `secretfs-csi serve` process and a kubelet that calls it.

`Driver` runs the installed command as a child process against the stand-in
API server, waits until its Probe answers ready, and on `close()` stops it
and removes every mount left under its directories, whatever state the test
left it in. `Kubelet` builds NodePublishVolume and NodeUnpublishVolume calls
exactly as the kubelet does for a CSI ephemeral inline volume: volume id
`csi-<sha256>`, target `<kubelet-dir>/pods/<uid>/volumes/kubernetes.io~csi/
<name>/mount` with its parent prepared, and the `csi.storage.k8s.io/*` keys
in volume_context.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc

from secretfs.csi.pb import csi_pb2, csi_pb2_grpc

NOBODY = 65534

# cat(1) reports a failure as "cat: PATH: <strerror>"; this maps the text back.
_ERRNO_OF = {os.strerror(code): code for code in errno.errorcode}


def mounts_below(path: Path | str) -> list[str]:
    """Mount points at or below `path`, deepest first."""
    prefix = str(path).rstrip("/")
    points = []
    with open("/proc/self/mountinfo") as f:
        for line in f:
            point = re.sub(r"\\([0-7]{3})", lambda m: chr(int(m[1], 8)), line.split(" ")[4])
            if point == prefix or point.startswith(prefix + "/"):
                points.append(point)
    return sorted(points, key=len, reverse=True)


def unmount_below(path: Path | str) -> None:
    for point in mounts_below(path):
        subprocess.run(["umount", "-l", point], capture_output=True, check=False)


def cgroup2_root() -> Path:
    """Where the cgroup v2 hierarchy is mounted, from /proc/mounts."""
    with open("/proc/mounts") as f:
        for line in f:
            fields = line.split(" ")
            if fields[2] == "cgroup2":
                return Path(fields[1])
    raise RuntimeError("no cgroup2 hierarchy is mounted")


# Test pods live in cgroups below this one, named as the kubelet's cgroupfs
# driver names them, so the driver's pod binding recognises them. One tree
# per test process, so that runs side by side never remove each other's.
TEST_CGROUPS = f"secretfs-tests-{os.getpid()}"


def pod_cgroup(pod_uid: str) -> Path:
    path = cgroup2_root() / TEST_CGROUPS / "kubepods" / "besteffort" / f"pod{pod_uid}"
    path.mkdir(parents=True, exist_ok=True)
    return path


def remove_test_cgroups() -> None:
    """Remove every test pod cgroup; their processes have exited by now."""
    top = cgroup2_root() / TEST_CGROUPS
    if top.exists():
        for directory in sorted(top.rglob("*"), key=lambda p: len(p.parts), reverse=True):
            if directory.is_dir():
                directory.rmdir()
        top.rmdir()


def in_pod_command(pod_uid: str, command: list[str]) -> list[str]:
    """`command`, wrapped so that it runs inside the pod's cgroup."""
    procs = pod_cgroup(pod_uid) / "cgroup.procs"
    return ["sh", "-c", 'echo $$ > "$0" && exec "$@"', str(procs), *command]


@contextlib.contextmanager
def in_pod(pod_uid: str) -> Iterator[None]:
    """Run the test process itself inside a pod's cgroup for the block."""
    with open("/proc/self/cgroup") as f:
        home = next(line for line in f if line.startswith("0::")).strip()[3:]
    (pod_cgroup(pod_uid) / "cgroup.procs").write_text(str(os.getpid()))
    try:
        yield
    finally:
        (cgroup2_root() / home.lstrip("/") / "cgroup.procs").write_text(str(os.getpid()))


def read_as(
    path: Path | str,
    pod: str | None = None,
    uid: int = NOBODY,
    gid: int = NOBODY,
    groups: tuple[int, ...] = (),
) -> bytes | int:
    """The file's bytes as read by `uid` from inside pod `pod`, or the errno it failed with."""
    credentials = [f"--reuid={uid}", f"--regid={gid}"]
    credentials.append(f"--groups={','.join(map(str, groups))}" if groups else "--clear-groups")
    # cat rather than Python: the test's interpreter may sit where `uid` cannot reach.
    reader = ["setpriv", *credentials, "cat", "--", str(path)]
    if pod is not None:
        reader = in_pod_command(pod, reader)
    out = subprocess.run(reader, capture_output=True, check=False, timeout=30)
    if out.returncode == 0:
        return out.stdout
    reason = out.stderr.decode().strip().rsplit(": ", 1)[-1]
    return _ERRNO_OF[reason]


@dataclass
class Driver:
    workdir: Path
    kubeconfig: Path
    extra_args: list[str] = field(default_factory=list)
    process: subprocess.Popen[bytes] | None = None
    # Mints a service-account token, (namespace, account) -> token, as the
    # kubelet does for a CSIDriver with tokenRequests; None sends none.
    tokens: Callable[[str, str], str] | None = None

    def __post_init__(self) -> None:
        self.kubelet_dir = self.workdir / "kubelet"
        self.state_dir = self.workdir / "state"
        self.socket = self.workdir / "csi" / "csi.sock"
        self._log_lines: list[str] = []
        self._channel: grpc.Channel | None = None

    @property
    def endpoint(self) -> str:
        return f"unix://{self.socket}"

    def command(self) -> list[str]:
        return [
            sys.executable,
            "-m",
            "secretfs.csi",
            "serve",
            "--endpoint",
            self.endpoint,
            "--node-id",
            "node-1",
            "--kubeconfig",
            str(self.kubeconfig),
            "--kubelet-dir",
            str(self.kubelet_dir),
            "--state-dir",
            str(self.state_dir),
            "--api-retry-budget",
            "3",
            *self.extra_args,
        ]

    def start(self, timeout: float = 20.0) -> Driver:
        (self.kubelet_dir / "pods").mkdir(parents=True, exist_ok=True)
        # Logs come through a pipe, not a file: a test can then tell that the
        # driver itself writes nothing to any disk.
        self.process = subprocess.Popen(
            self.command(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
        )
        threading.Thread(target=self._collect, args=(self.process,), daemon=True).start()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"driver exited with {self.process.returncode}:\n{self.logs}")
            if self.socket.exists() and self._ready():
                return self
            time.sleep(0.05)
        raise TimeoutError(f"driver not ready in {timeout}s:\n{self.logs}")

    def _ready(self) -> bool:
        try:
            reply = self.identity.Probe(csi_pb2.ProbeRequest(), timeout=2)
        except grpc.RpcError:
            return False
        return bool(reply.ready.value)

    @property
    def channel(self) -> grpc.Channel:
        if self._channel is None:
            self._channel = grpc.insecure_channel(self.endpoint)
        return self._channel

    @property
    def node(self) -> Any:
        return csi_pb2_grpc.NodeStub(self.channel)

    @property
    def identity(self) -> Any:
        return csi_pb2_grpc.IdentityStub(self.channel)

    def _collect(self, process: subprocess.Popen[bytes]) -> None:
        assert process.stderr is not None
        for line in process.stderr:
            self._log_lines.append(line.decode(errors="replace"))

    @property
    def logs(self) -> str:
        return "".join(self._log_lines)

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 20.0) -> int:
        """Signal the driver and wait; returns its exit code."""
        if self._channel is not None:
            self._channel.close()
            self._channel = None
        assert self.process is not None
        if self.process.poll() is None:
            self.process.send_signal(sig)
        return self.process.wait(timeout)

    def close(self) -> None:
        if self.process is not None and self.process.poll() is None:
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.stop()
            if self.process.poll() is None:
                self.process.kill()
                self.process.wait(10)
        unmount_below(self.kubelet_dir)
        unmount_below(self.state_dir)


@dataclass
class Volume:
    volume_id: str
    target: Path
    request: Any
    pod_uid: str


@dataclass
class Kubelet:
    driver: Driver
    namespace: str = "default"

    def volume(
        self,
        secret: str = "db",
        *,
        pod_uid: str | None = None,
        name: str = "secrets",
        attributes: dict[str, str] | None = None,
        namespace: str | None = None,
        mount: bool = True,
        fs_group: int | None = None,
    ) -> Volume:
        """A publish request for one inline volume, with its parent directory prepared."""
        pod_uid = pod_uid or str(uuid.uuid4())
        volume_id = "csi-" + hashlib.sha256(f"{pod_uid}{name}".encode()).hexdigest()
        parent = self.driver.kubelet_dir / "pods" / pod_uid / "volumes" / "kubernetes.io~csi" / name
        parent.mkdir(parents=True, exist_ok=True)
        for directory in (parent, *parent.parents):
            if directory == self.driver.workdir:
                break
            directory.chmod(0o755)  # so a test can read as an unprivileged user
        (parent / "vol_data.json").write_text(
            json.dumps(
                {
                    "driverName": "secretfs.csi.io",
                    "volumeHandle": volume_id,
                    "volumeLifecycleMode": "Ephemeral",
                }
            )
        )
        context = {
            "csi.storage.k8s.io/pod.name": "app",
            "csi.storage.k8s.io/pod.namespace": namespace or self.namespace,
            "csi.storage.k8s.io/pod.uid": pod_uid,
            "csi.storage.k8s.io/serviceAccount.name": "default",
            "csi.storage.k8s.io/ephemeral": "true",
            "secretName": secret,
        }
        if self.driver.tokens is not None:
            token = self.driver.tokens(context["csi.storage.k8s.io/pod.namespace"], "default")
            expiry = "2099-01-01T00:00:00Z"
            context["csi.storage.k8s.io/serviceAccount.tokens"] = json.dumps(
                {"": {"token": token, "expirationTimestamp": expiry}}
            )
        context.update(attributes or {})
        capability = csi_pb2.VolumeCapability(
            access_mode=csi_pb2.VolumeCapability.AccessMode(
                mode=csi_pb2.VolumeCapability.AccessMode.SINGLE_NODE_WRITER
            )
        )
        if mount:
            capability.mount.SetInParent()
            if fs_group is not None:
                capability.mount.volume_mount_group = str(fs_group)
        else:
            capability.block.SetInParent()
        request = csi_pb2.NodePublishVolumeRequest(
            volume_id=volume_id,
            target_path=str(parent / "mount"),
            readonly=True,
            volume_capability=capability,
            volume_context=context,
        )
        return Volume(volume_id, parent / "mount", request, pod_uid)

    # The kubelet dials the plugin's socket for each call and closes the
    # connection afterwards; so does this helper. (A local subchannel pool
    # keeps gRPC from quietly sharing one connection between channels.)

    def _channel(self) -> grpc.Channel:
        return grpc.insecure_channel(
            self.driver.endpoint, options=[("grpc.use_local_subchannel_pool", 1)]
        )

    def publish(self, volume: Volume, timeout: float = 30.0) -> None:
        with self._channel() as channel:
            csi_pb2_grpc.NodeStub(channel).NodePublishVolume(volume.request, timeout=timeout)

    def unpublish(self, volume: Volume, timeout: float = 30.0) -> None:
        request = csi_pb2.NodeUnpublishVolumeRequest(
            volume_id=volume.volume_id, target_path=str(volume.target)
        )
        with self._channel() as channel:
            csi_pb2_grpc.NodeStub(channel).NodeUnpublishVolume(request, timeout=timeout)


def code_of(call: Any, *args: Any, **kwargs: Any) -> grpc.StatusCode:
    """The status code a gRPC call ends with (OK when it succeeds)."""
    try:
        call(*args, **kwargs)
    except grpc.RpcError as exc:
        return exc.code()  # type: ignore[no-any-return]
    return grpc.StatusCode.OK


def crash_with_a_volume(driver: Driver, secret: str = "db") -> tuple[Kubelet, Volume]:
    """Start `driver`, publish a volume, kill the driver with SIGKILL: a crash."""
    kubelet = Kubelet(driver.start())
    volume = kubelet.volume(secret)
    kubelet.publish(volume)
    driver.stop(signal.SIGKILL)
    return kubelet, volume
