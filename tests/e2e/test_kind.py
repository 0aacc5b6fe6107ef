"""End to end on a real kind cluster: image, manifests, real pods, a real kubelet.

Runs where docker (with a reachable daemon), kind and kubectl are installed:
it creates a cluster, builds the image and loads it, applies manifests/ and
checks the product with real pods. Anywhere else every test skips, saying
which tool is missing. `make e2e` runs only this suite.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

pytestmark = pytest.mark.e2e

ROOT = Path(__file__).resolve().parents[2]
CLUSTER = "secretfs-e2e"
IMAGE = "secretfs:0.1.0"
NAMESPACE = "e2e"


def missing_tools() -> str | None:
    for tool in ("docker", "kind", "kubectl"):
        if shutil.which(tool) is None:
            return f"{tool} is not installed"
    info = subprocess.run(["docker", "info"], capture_output=True, text=True, check=False)
    if info.returncode != 0:
        return "the docker daemon is not reachable (docker info failed)"
    return None


def run(*command: str, check: bool = True, stdin: str | None = None) -> str:
    out = subprocess.run(
        command, capture_output=True, text=True, check=False, input=stdin, timeout=600
    )
    if check and out.returncode != 0:
        raise AssertionError(f"{' '.join(command)} failed:\n{out.stdout}\n{out.stderr}")
    return out.stdout + out.stderr


def kubectl(*args: str, check: bool = True, stdin: str | None = None) -> str:
    return run("kubectl", "--context", f"kind-{CLUSTER}", *args, check=check, stdin=stdin)


def wait_for(condition: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return
        time.sleep(2)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


@pytest.fixture(scope="module")
def cluster() -> Iterator[None]:
    reason = missing_tools()
    if reason:
        pytest.skip(reason)
    run("kind", "create", "cluster", "--name", CLUSTER, "--wait", "120s")
    try:
        run("docker", "build", "-t", IMAGE, str(ROOT))
        run("kind", "load", "docker-image", IMAGE, "--name", CLUSTER)
        kubectl("apply", "-k", str(ROOT / "manifests"))
        kubectl("-n", "secretfs", "rollout", "status", "daemonset/secretfs-node", "--timeout=180s")
        kubectl("create", "namespace", NAMESPACE)
        kubectl(
            "-n",
            NAMESPACE,
            "create",
            "secret",
            "generic",
            "db",
            "--from-literal=password=e2e-hunter2",
        )
        yield
    finally:
        run("kind", "delete", "cluster", "--name", CLUSTER, check=False)


def pod_manifest(name: str, account: str, *, grant: bool, command: str) -> str:
    objects: list[dict[str, object]] = [
        {
            "apiVersion": "v1",
            "kind": "ServiceAccount",
            "metadata": {"name": account, "namespace": NAMESPACE},
        },
    ]
    if grant:
        objects += [
            {
                "apiVersion": "rbac.authorization.k8s.io/v1",
                "kind": "Role",
                "metadata": {"name": f"{account}-db", "namespace": NAMESPACE},
                "rules": [
                    {
                        "apiGroups": [""],
                        "resources": ["secrets"],
                        "resourceNames": ["db"],
                        "verbs": ["get"],
                    }
                ],
            },
            {
                "apiVersion": "rbac.authorization.k8s.io/v1",
                "kind": "RoleBinding",
                "metadata": {"name": f"{account}-db", "namespace": NAMESPACE},
                "roleRef": {
                    "apiGroup": "rbac.authorization.k8s.io",
                    "kind": "Role",
                    "name": f"{account}-db",
                },
                "subjects": [{"kind": "ServiceAccount", "name": account, "namespace": NAMESPACE}],
            },
        ]
    objects.append(
        {
            "apiVersion": "v1",
            "kind": "Pod",
            "metadata": {"name": name, "namespace": NAMESPACE},
            "spec": {
                "serviceAccountName": account,
                "securityContext": {
                    "runAsNonRoot": True,
                    "runAsUser": 1000,
                    "runAsGroup": 1000,
                    "fsGroup": 2000,
                },
                "containers": [
                    {
                        "name": "app",
                        "image": "busybox:1.36",
                        "command": ["sh", "-c", command],
                        "volumeMounts": [{"name": "db", "mountPath": "/secrets", "readOnly": True}],
                    }
                ],
                "volumes": [
                    {
                        "name": "db",
                        "csi": {
                            "driver": "secretfs.csi.io",
                            "readOnly": True,
                            "volumeAttributes": {"secretName": "db"},
                        },
                    }
                ],
            },
        }
    )
    return "\n---\n".join(json.dumps(o) for o in objects)


def start_pod(grant: bool = True, command: str = "sleep 3600") -> str:
    name = f"app-{uuid.uuid4().hex[:8]}"
    kubectl("apply", "-f", "-", stdin=pod_manifest(name, name, grant=grant, command=command))
    return name


def phase(name: str) -> str:
    return kubectl(
        "-n", NAMESPACE, "get", "pod", name, "-o", "jsonpath={.status.phase}", check=False
    )


def node_mounts() -> str:
    return run("docker", "exec", f"{CLUSTER}-control-plane", "cat", "/proc/self/mountinfo")


def test_a_non_root_pod_with_fsgroup_reads_its_secret(cluster: None) -> None:
    name = start_pod(command="cat /secrets/password; ls -ln /secrets; sleep 3600")
    wait_for(lambda: phase(name) == "Running", 180, f"pod {name} to run")

    logs = kubectl("-n", NAMESPACE, "logs", name)

    assert "e2e-hunter2" in logs
    assert " 0 2000 " in logs  # root:2000, from fsGroup through VOLUME_MOUNT_GROUP


def test_a_pod_without_rbac_waits_with_a_permission_denied_event(cluster: None) -> None:
    name = start_pod(grant=False)

    def denied() -> bool:
        events = kubectl(
            "-n", NAMESPACE, "get", "events", "--field-selector", f"involvedObject.name={name}"
        )
        return "PermissionDenied" in events or "PERMISSION_DENIED" in events

    wait_for(denied, 180, f"a permission-denied event for {name}")
    assert phase(name) == "Pending"


def test_writes_fail_with_a_read_only_file_system(cluster: None) -> None:
    name = start_pod()
    wait_for(lambda: phase(name) == "Running", 180, f"pod {name} to run")

    out = kubectl(
        "-n", NAMESPACE, "exec", name, "--", "sh", "-c", "echo x > /secrets/password", check=False
    )

    assert "Read-only file system" in out


def test_deleting_the_pod_leaves_no_mount_on_the_node(cluster: None) -> None:
    name = start_pod()
    wait_for(lambda: phase(name) == "Running", 180, f"pod {name} to run")
    uid = kubectl("-n", NAMESPACE, "get", "pod", name, "-o", "jsonpath={.metadata.uid}")
    assert uid in node_mounts()

    kubectl("-n", NAMESPACE, "delete", "pod", name, "--wait=true", "--timeout=120s")

    wait_for(lambda: uid not in node_mounts(), 60, "the pod's mount to go")


def test_the_driver_restarts_cleanly_and_serves_new_pods(cluster: None) -> None:
    kubectl("-n", "secretfs", "rollout", "restart", "daemonset/secretfs-node")
    kubectl("-n", "secretfs", "rollout", "status", "daemonset/secretfs-node", "--timeout=180s")

    name = start_pod(command="cat /secrets/password; sleep 3600")
    wait_for(lambda: phase(name) == "Running", 180, f"pod {name} to run after the restart")
    assert "e2e-hunter2" in kubectl("-n", NAMESPACE, "logs", name)
