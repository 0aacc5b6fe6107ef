"""Where the API server is, and how the driver proves who it is.

The two common cases are read here directly, because importing the
`kubernetes` client costs the driver some 20 MiB of resident memory for its
whole life:

* in a pod: KUBERNETES_SERVICE_HOST/PORT and the service account's files;
* a kubeconfig whose user has a token, a token file or client certificate
  files, and whose cluster names a CA file or CA data.

Everything else a kubeconfig can say (exec plugins, auth providers, client
keys embedded as data) is handed to the official client's loader.

In pod mode the driver's own credentials are never used: requests carry the
pod's token. They matter in driver mode only.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

SERVICE_ACCOUNT = Path("/var/run/secrets/kubernetes.io/serviceaccount")

_SIMPLE_USER = {"token", "tokenFile", "client-certificate", "client-key"}
_SIMPLE_CLUSTER = {
    "server",
    "certificate-authority",
    "certificate-authority-data",
    "insecure-skip-tls-verify",
    "tls-server-name",
}


@dataclass(frozen=True)
class ApiConfig:
    url: str
    ca_file: str | None = None
    ca_data: str | None = None  # PEM text
    cert_file: str | None = None
    key_file: str | None = None
    verify: bool = True
    server_name: str | None = None
    # The value of the driver's Authorization header, read anew on each call
    # (token files rotate); None when the driver authenticates by certificate.
    authorization: Callable[[], str | None] = lambda: None


def load(kubeconfig: str | None) -> ApiConfig:
    """`kubeconfig` if given, else the pod's service account, else $KUBECONFIG or ~/.kube/config."""
    if kubeconfig:
        return from_kubeconfig(kubeconfig)
    if os.environ.get("KUBERNETES_SERVICE_HOST"):
        return in_cluster()
    default = os.environ.get("KUBECONFIG", "").split(os.pathsep)[0] or "~/.kube/config"
    return from_kubeconfig(os.path.expanduser(default))


def in_cluster(root: Path = SERVICE_ACCOUNT) -> ApiConfig:
    host = os.environ["KUBERNETES_SERVICE_HOST"]
    port = os.environ.get("KUBERNETES_SERVICE_PORT", "443")
    if ":" in host:
        host = f"[{host}]"  # IPv6
    token_file = root / "token"
    ca_file = root / "ca.crt"
    if not ca_file.is_file():
        raise ValueError(
            f"{ca_file} is missing: mount the cluster's CA there (the kube-root-ca.crt "
            "ConfigMap, as manifests/ does) to verify the API server"
        )
    return ApiConfig(
        url=f"https://{host}:{port}",
        ca_file=str(ca_file),
        # Pod mode needs no token of the driver's own: none may be mounted.
        authorization=lambda: _bearer_from(token_file) if token_file.exists() else None,
    )


def from_kubeconfig(path: str) -> ApiConfig:
    with open(path) as f:
        document = yaml.safe_load(f) or {}
    context = _named(document, "contexts", document.get("current-context"))
    cluster = _named(document, "clusters", context.get("cluster"))
    user = _named(document, "users", context.get("user"))
    if not set(user) <= _SIMPLE_USER or not set(cluster) <= _SIMPLE_CLUSTER:
        return _from_official_loader(path)
    base = Path(path).parent
    token, token_file = user.get("token"), user.get("tokenFile")

    def authorization() -> str | None:
        if token:
            return f"Bearer {token}"
        return _bearer_from(base / token_file) if token_file else None

    ca_data = cluster.get("certificate-authority-data")
    return ApiConfig(
        url=str(cluster["server"]),
        ca_file=_relative(base, cluster.get("certificate-authority")),
        ca_data=_decode_pem(ca_data) if ca_data else None,
        cert_file=_relative(base, user.get("client-certificate")),
        key_file=_relative(base, user.get("client-key")),
        verify=not cluster.get("insecure-skip-tls-verify", False),
        server_name=cluster.get("tls-server-name"),
        authorization=authorization,
    )


def _named(document: dict[str, Any], section: str, name: object) -> dict[str, Any]:
    for entry in document.get(section) or ():
        if entry.get("name") == name:
            key = section.rstrip("s")  # clusters -> cluster, users -> user ...
            return dict(entry.get(key) or {})
    raise ValueError(f"kubeconfig has no {section[:-1]} named {name!r}")


def _relative(base: Path, path: str | None) -> str | None:
    return str(base / path) if path else None


def _decode_pem(data: str) -> str:
    import base64

    return base64.b64decode(data).decode("ascii")


def _bearer_from(token_file: Path) -> str | None:
    token = token_file.read_text().strip()
    return f"Bearer {token}" if token else None


def _from_official_loader(path: str) -> ApiConfig:
    """Exec plugins, auth providers and embedded keys: the kubernetes client's loader."""
    from kubernetes import client, config

    configuration = client.Configuration()
    config.load_kube_config(
        config_file=path, client_configuration=configuration, persist_config=False
    )

    def authorization() -> str | None:
        if configuration.refresh_api_key_hook is not None:
            configuration.refresh_api_key_hook(configuration)  # plugins hand out fresh tokens
        for setting in configuration.auth_settings().values():
            if setting.get("in") == "header" and setting.get("key") == "authorization":
                return str(setting["value"])
        return None

    return ApiConfig(
        url=configuration.host,
        ca_file=configuration.ssl_ca_cert,
        cert_file=configuration.cert_file,
        key_file=configuration.key_file,
        verify=configuration.verify_ssl,
        server_name=configuration.tls_server_name,
        authorization=authorization,
    )
