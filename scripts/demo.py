"""End-to-end demo: a pod's secret volume, published and torn down as the kubelet does it.

Starts the stand-in API server with sample Secrets, starts `secretfs-csi serve`,
calls NodePublishVolume over the unix socket exactly as the kubelet would for
an inline CSI volume, shows the files as an unprivileged user, shows a write
refused, unpublishes, and shows the mount gone. Needs root and /dev/fuse.
"""

from __future__ import annotations

import os
import shlex
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tests.conftest import make_workdir, remove_workdir
from tests.fakeapi import FakeKubeAPI
from tests.harness import Driver, Kubelet, in_pod_command, mounts_below, remove_test_cgroups

NAMESPACE = "shop"
SAMPLE = {
    "username": b"app",
    "password": b"correct horse battery staple",
    "tls.key": b"-----BEGIN PRIVATE KEY-----\nMIIEvQIBADANBg...\n-----END PRIVATE KEY-----\n",
}


def step(title: str) -> None:
    print(f"\n\033[1m== {title}\033[0m", flush=True)


def show(command: list[str], as_nobody: bool = False, pod: str | None = None) -> None:
    """Run `command` and print it with its output: as root on the host, or as the
    unprivileged user nobody, inside pod `pod`'s cgroup when one is given."""
    if as_nobody:
        command_line = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", *command]
    else:
        command_line = list(command)
    if pod is not None:
        command_line = in_pod_command(pod, command_line)
    who = "nobody" if as_nobody else "root"
    where = "in the pod" if pod else "on the host"
    print(f"{who} {where}$ {shlex.join(command)}", flush=True)
    out = subprocess.run(command_line, capture_output=True, text=True, check=False)
    sys.stdout.write(out.stdout + out.stderr)
    if out.returncode:
        print(f"(exit status {out.returncode})")


def main() -> int:
    if os.geteuid() != 0:
        print("the demo mounts a FUSE filesystem: run it as root", file=sys.stderr)
        return 2
    workdir = make_workdir()
    api = FakeKubeAPI(workdir / "api").start()
    driver: Driver | None = None
    try:
        step("A stand-in Kubernetes API with a Secret that one pod's account may read")
        account = f"system:serviceaccount:{NAMESPACE}:app"
        pod_token = api.add_user(account)
        api.grant(account, NAMESPACE, "get", "db")  # a Role with resourceNames: [db]
        driver_token = api.add_user("system:serviceaccount:secretfs:secretfs-node")  # no grants
        api.set_secret(NAMESPACE, "db", SAMPLE)
        print(f"API server {api.url}: secret {NAMESPACE}/db with keys {', '.join(SAMPLE)}")
        print(f"RBAC: only {account} may get it; the driver's own account may read nothing")
        driver = Driver(
            workdir,
            api.write_kubeconfig(workdir / "kubeconfig", driver_token),
            tokens=lambda namespace, name: pod_token,
        )
        driver.start()
        print("driver:", shlex.join(driver.command()[2:]))

        step("NodePublishVolume, as the kubelet calls it for an inline volume")
        kubelet = Kubelet(driver, namespace=NAMESPACE)
        volume = kubelet.volume("db")
        kubelet.publish(volume)
        print(f"volume_id   {volume.volume_id}\ntarget_path {volume.target}")
        print("read with the pod's own service-account token (from the kubelet's tokenRequests)")
        show(["findmnt", "-no", "FSTYPE,OPTIONS", str(volume.target)])

        step("The pod's view: its unprivileged process lists and reads the files")
        show(["ls", "-l", str(volume.target)], as_nobody=True, pod=volume.pod_uid)
        show(["cat", str(volume.target / "password")], as_nobody=True, pod=volume.pod_uid)

        step("Anyone outside the pod is refused, host root included")
        show(["cat", str(volume.target / "password")])
        show(["cat", str(volume.target / "password")], as_nobody=True)

        step("Writes are refused: read-only file system, even for root")
        show(
            ["sh", "-c", f"echo stolen > {shlex.quote(str(volume.target / 'password'))}"],
            as_nobody=True,
            pod=volume.pod_uid,
        )
        show(["touch", str(volume.target / "new-file")])
        show(["rm", "-f", str(volume.target / "password")])

        step("NodeUnpublishVolume: the mount and the target are gone, the bytes wiped")
        kubelet.unpublish(volume)
        print("mounts under the pod:", mounts_below(volume.target.parent) or "none")
        print("target exists:", volume.target.exists())

        step("SIGTERM: the driver wipes every buffer, unmounts and exits")
        print("exit status:", driver.stop())
        print(driver.logs.rstrip().splitlines()[-1])
        return 0
    finally:
        if driver is not None:
            driver.close()
        api.stop()
        remove_workdir(workdir)
        remove_test_cgroups()


if __name__ == "__main__":
    raise SystemExit(main())
