"""Finding the API server and the driver's credentials: in a pod, or from a kubeconfig."""

from __future__ import annotations

import base64
import json
import subprocess
import sys
from pathlib import Path

import pytest

from secretfs.csi import apiconfig


def kubeconfig(path: Path, cluster: dict[str, object], user: dict[str, object]) -> Path:
    path.write_text(
        json.dumps(
            {
                "apiVersion": "v1",
                "kind": "Config",
                "current-context": "c",
                "contexts": [{"name": "c", "context": {"cluster": "k", "user": "u"}}],
                "clusters": [{"name": "k", "cluster": cluster}],
                "users": [{"name": "u", "user": user}],
            }
        )
    )
    return path


def test_a_token_kubeconfig_is_read_without_the_kubernetes_client(tmp_path: Path) -> None:
    path = kubeconfig(
        tmp_path / "kc",
        {"server": "https://127.0.0.1:6443", "certificate-authority": "ca.crt"},
        {"token": "abc"},
    )
    program = (
        "import sys; from secretfs.csi import apiconfig;"
        f"c = apiconfig.load({str(path)!r});"
        "print(c.url, c.ca_file, c.authorization(), 'kubernetes' in sys.modules)"
    )

    out = subprocess.run([sys.executable, "-c", program], capture_output=True, text=True)

    assert out.stdout.split() == [
        "https://127.0.0.1:6443",
        str(tmp_path / "ca.crt"),
        "Bearer",
        "abc",
        "False",
    ]


def test_a_token_file_is_read_again_on_every_call(tmp_path: Path) -> None:
    (tmp_path / "token").write_text("one\n")
    config = apiconfig.from_kubeconfig(
        str(kubeconfig(tmp_path / "kc", {"server": "https://h"}, {"tokenFile": "token"}))
    )
    first = config.authorization()
    (tmp_path / "token").write_text("two\n")

    assert (first, config.authorization()) == ("Bearer one", "Bearer two")


def test_ca_data_and_client_certificates_are_taken_as_given(tmp_path: Path) -> None:
    pem = "-----BEGIN CERTIFICATE-----\nMIIB\n-----END CERTIFICATE-----\n"
    config = apiconfig.from_kubeconfig(
        str(
            kubeconfig(
                tmp_path / "kc",
                {
                    "server": "https://h",
                    "certificate-authority-data": base64.b64encode(pem.encode()).decode(),
                    "tls-server-name": "kubernetes",
                },
                {"client-certificate": "c.crt", "client-key": "c.key"},
            )
        )
    )

    assert config.ca_data == pem and config.server_name == "kubernetes"
    assert (config.cert_file, config.key_file) == (str(tmp_path / "c.crt"), str(tmp_path / "c.key"))
    assert config.authorization() is None


def test_in_a_pod_the_service_account_is_used(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "token").write_text("sa-token")
    (tmp_path / "ca.crt").write_text("pem")
    monkeypatch.setenv("KUBERNETES_SERVICE_HOST", "fd00::1")
    monkeypatch.setenv("KUBERNETES_SERVICE_PORT", "443")

    config = apiconfig.in_cluster(tmp_path)

    assert config.url == "https://[fd00::1]:443"
    assert config.ca_file == str(tmp_path / "ca.crt")
    assert config.authorization() == "Bearer sa-token"


def test_other_kubeconfigs_go_to_the_official_loader(tmp_path: Path) -> None:
    exec_user = {"exec": {"apiVersion": "client.authentication.k8s.io/v1", "command": "true"}}
    path = kubeconfig(tmp_path / "kc", {"server": "https://127.0.0.1:1"}, exec_user)
    program = (
        "import sys; from secretfs.csi import apiconfig;"
        f"c = apiconfig.from_kubeconfig({str(path)!r});"
        "print(c.url, 'kubernetes' in sys.modules)"
    )

    out = subprocess.run([sys.executable, "-c", program], capture_output=True, text=True)

    assert out.stdout.split() == ["https://127.0.0.1:1", "True"]


def test_a_kubeconfig_naming_a_missing_context_part_is_an_error(tmp_path: Path) -> None:
    path = tmp_path / "kc"
    path.write_text(json.dumps({"current-context": "nope", "contexts": []}))

    with pytest.raises(ValueError, match="no context named 'nope'"):
        apiconfig.from_kubeconfig(str(path))


def test_in_a_pod_without_a_token_the_driver_has_no_credentials_of_its_own(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "ca.crt").write_text("pem")  # only the CA, as the pod-mode DaemonSet mounts
    monkeypatch.setenv("KUBERNETES_SERVICE_HOST", "10.96.0.1")

    assert apiconfig.in_cluster(tmp_path).authorization() is None


def test_in_a_pod_without_the_cluster_ca_the_error_says_what_to_mount(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("KUBERNETES_SERVICE_HOST", "10.96.0.1")

    with pytest.raises(ValueError, match=r"kube-root-ca\.crt"):
        apiconfig.in_cluster(tmp_path)
