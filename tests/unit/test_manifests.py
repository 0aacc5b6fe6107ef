"""The Kubernetes manifests, examples and Dockerfile, checked offline."""

from __future__ import annotations

import json
import shlex
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]


def documents(*paths: Path) -> list[dict[str, Any]]:
    found = []
    for path in paths:
        found += [d for d in yaml.safe_load_all(path.read_text()) if d]
    return found


def kustomize(folder: Path) -> list[dict[str, Any]]:
    """The objects a kustomization lists (patches aside), resolving nested bases."""
    config = yaml.safe_load((folder / "kustomization.yaml").read_text())
    objects: list[dict[str, Any]] = []
    for resource in config["resources"]:
        path = (folder / resource).resolve()
        objects += kustomize(path) if path.is_dir() else documents(path)
    return objects


def one(objects: list[dict[str, Any]], kind: str) -> dict[str, Any]:
    matching = [o for o in objects if o["kind"] == kind]
    assert len(matching) == 1, f"expected one {kind}, found {len(matching)}"
    return matching[0]


BASE = kustomize(ROOT / "manifests")


def test_the_csidriver_asks_for_what_the_driver_relies_on() -> None:
    spec = one(BASE, "CSIDriver")["spec"]

    assert spec["attachRequired"] is False and spec["podInfoOnMount"] is True
    assert spec["volumeLifecycleModes"] == ["Ephemeral"]
    assert spec["tokenRequests"] == [{"audience": ""}]
    assert spec["requiresRepublish"] is True
    assert spec["fsGroupPolicy"] == "File"


def test_the_daemonset_runs_everywhere_with_fuse_mounts_memory_locking_and_host_pids() -> None:
    daemonset = one(BASE, "DaemonSet")
    pod = daemonset["spec"]["template"]["spec"]
    driver = next(c for c in pod["containers"] if c["name"] == "secretfs")
    mounts = {m["mountPath"]: m for m in driver["volumeMounts"]}

    assert pod["hostPID"] is True
    assert pod["priorityClassName"] == "system-node-critical"
    assert {"operator": "Exists"} in pod["tolerations"]
    assert driver["securityContext"]["privileged"] is True
    assert "IPC_LOCK" in driver["securityContext"]["capabilities"]["add"]
    assert mounts["/var/lib/kubelet"]["mountPropagation"] == "Bidirectional"
    assert "/dev/fuse" in mounts and "/csi" in mounts
    assert {"requests", "limits"} <= driver["resources"].keys()
    assert driver["livenessProbe"]["httpGet"]["path"] == "/healthz"
    assert driver["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert "--metrics-address=:9090" in driver["args"]
    assert "--auth-mode=pod" in driver["args"]
    assert daemonset["spec"]["updateStrategy"]["rollingUpdate"]["maxUnavailable"] == 1
    sidecars = {c["name"] for c in pod["containers"]} - {"secretfs"}
    assert sidecars == {"node-driver-registrar", "liveness-probe"}


def test_pod_mode_grants_the_driver_nothing() -> None:
    kinds = {o["kind"] for o in BASE}

    assert not kinds & {"ClusterRole", "ClusterRoleBinding", "Role", "RoleBinding"}
    assert one(BASE, "ServiceAccount")["automountServiceAccountToken"] is False


def test_the_driver_mode_overlay_grants_only_get_on_secrets_and_switches_the_flag() -> None:
    folder = ROOT / "manifests" / "overlays" / "driver-mode"
    objects = kustomize(folder)
    rules = one(objects, "ClusterRole")["rules"]
    patch = yaml.safe_load(
        yaml.safe_load((folder / "kustomization.yaml").read_text())["patches"][0]["patch"]
    )
    args = one(BASE, "DaemonSet")["spec"]["template"]["spec"]["containers"][0]["args"]

    assert rules == [{"apiGroups": [""], "resources": ["secrets"], "verbs": ["get"]}]
    flag = next(op for op in patch if op["path"].endswith("/args/2"))
    assert args[2] == "--auth-mode=pod" and flag["value"] == "--auth-mode=driver"


def test_the_example_is_a_non_root_pod_with_fsgroup_items_optional_and_its_rbac() -> None:
    objects = documents(ROOT / "examples" / "pod.yaml")
    pod = one(objects, "Pod")["spec"]
    role = one(objects, "Role")
    binding = one(objects, "RoleBinding")
    attributes = [v["csi"]["volumeAttributes"] for v in pod["volumes"]]

    assert pod["securityContext"]["runAsNonRoot"] is True and pod["securityContext"]["fsGroup"]
    assert role["rules"][0]["verbs"] == ["get"]
    mounted = {a["secretName"] for a in attributes}
    assert mounted <= set(role["rules"][0]["resourceNames"])
    assert binding["subjects"][0]["name"] == pod["serviceAccountName"]
    assert any("items" in a for a in attributes) and any(a.get("optional") for a in attributes)
    for items in (json.loads(a["items"]) for a in attributes if "items" in a):
        assert all({"key", "path"} <= item.keys() for item in items)


def dockerfile() -> list[tuple[str, str]]:
    """(instruction, arguments) pairs, continuation lines joined, comments dropped."""
    joined = (ROOT / "Dockerfile").read_text().replace("\\\n", " ")
    steps = []
    for line in joined.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            instruction, _, rest = line.partition(" ")
            steps.append((instruction.upper(), rest.strip()))
    return steps


def test_the_dockerfile_is_multi_stage_pinned_and_copies_only_files_that_exist() -> None:
    steps = dockerfile()
    bases = [rest.split()[0] for op, rest in steps if op == "FROM"]
    copies = [shlex.split(rest) for op, rest in steps if op == "COPY"]

    known = {"FROM", "RUN", "ENV", "WORKDIR", "COPY", "LABEL", "ENTRYPOINT", "CMD", "ARG"}
    assert {op for op, _ in steps} <= known
    assert len(bases) == 2 and all(":" in b and not b.endswith(":latest") for b in bases)
    for words in copies:
        if any(w.startswith("--from") for w in words):
            continue
        for source in words[:-1]:
            assert (ROOT / source).exists(), f"COPY names a missing file: {source}"
    assert json.loads(next(rest for op, rest in steps if op == "ENTRYPOINT")) == ["secretfs-csi"]
    labels = " ".join(rest for op, rest in steps if op == "LABEL")
    for label in ("title", "description", "licenses", "version"):
        assert f"org.opencontainers.image.{label}=" in labels


def test_pod_mode_mounts_the_cluster_ca_without_a_token() -> None:
    pod = one(BASE, "DaemonSet")["spec"]["template"]["spec"]
    driver = pod["containers"][0]
    ca = next(v for v in pod["volumes"] if v["name"] == "api-ca")
    mount = next(m for m in driver["volumeMounts"] if m["name"] == "api-ca")

    assert pod["automountServiceAccountToken"] is False
    assert ca["projected"]["sources"][0]["configMap"]["name"] == "kube-root-ca.crt"
    assert mount["mountPath"] == "/var/run/secrets/kubernetes.io/serviceaccount"


@pytest.mark.parametrize("folder", ["manifests", "manifests/overlays/driver-mode"])
def test_kustomize_renders_the_base_and_the_overlay(folder: str) -> None:
    kubectl = shutil.which("kubectl")
    if kubectl is None:
        pytest.skip("kubectl is not installed")
    out = subprocess.run(
        [kubectl, "kustomize", str(ROOT / folder)], capture_output=True, text=True, check=False
    )

    assert out.returncode == 0, out.stderr
    objects = [d for d in yaml.safe_load_all(out.stdout) if d]
    pod = one(objects, "DaemonSet")["spec"]["template"]["spec"]
    args = pod["containers"][0]["args"]
    if folder.endswith("driver-mode"):
        assert "--auth-mode=driver" in args and pod["automountServiceAccountToken"] is True
        assert "api-ca" not in {v["name"] for v in pod["volumes"]}
        assert "api-ca" not in {m["name"] for m in pod["containers"][0]["volumeMounts"]}
    else:
        assert "--auth-mode=pod" in args and "ClusterRole" not in {o["kind"] for o in objects}


@pytest.mark.parametrize("path", sorted((ROOT / "manifests").rglob("*.yaml")), ids=str)
def test_every_manifest_is_valid_yaml_with_a_kind(path: Path) -> None:
    for document in documents(path):
        assert "kind" in document and "apiVersion" in document
