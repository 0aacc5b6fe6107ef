"""Checks on NodePublishVolume and NodeUnpublishVolume requests.

Every field is checked before anything is fetched or mounted, and a bad one
ends the call with INVALID_ARGUMENT and a message naming the field and the
rule. Messages never echo a value that could be secret.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass

import grpc

from .errors import CsiError
from .pb import csi_pb2

# Keys the kubelet puts into volume_context (podInfoOnMount, ephemeral
# volumes, tokenRequests). Their values describe the pod, never the volume.
POD_NAMESPACE = "csi.storage.k8s.io/pod.namespace"
POD_NAME = "csi.storage.k8s.io/pod.name"
POD_UID = "csi.storage.k8s.io/pod.uid"
SERVICE_ACCOUNT = "csi.storage.k8s.io/serviceAccount.name"
SA_TOKENS = "csi.storage.k8s.io/serviceAccount.tokens"
EPHEMERAL = "csi.storage.k8s.io/ephemeral"
KUBELET_PREFIX = "csi.storage.k8s.io/"

# Attributes a pod author may set in the volume's volumeAttributes.
SECRET_NAME = "secretName"  # noqa: S105 - an attribute name, not a password
USER_ATTRIBUTES = frozenset({SECRET_NAME})

# CSI caps identifiers at 128 bytes; the kubelet's ephemeral ids are 68.
MAX_VOLUME_ID = 128
PATH_MAX = 4096
NAME_MAX = 255

_DNS_SUBDOMAIN = re.compile(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*")
_DNS_LABEL = re.compile(r"[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?")
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")


@dataclass(frozen=True, slots=True)
class PublishSpec:
    """A validated NodePublishVolume request, with nothing secret in it."""

    volume_id: str
    target_path: str
    namespace: str
    secret_name: str
    pod_name: str
    pod_uid: str

    @property
    def secret_ref(self) -> str:
        return f"{self.namespace}/{self.secret_name}"


def _invalid(message: str) -> CsiError:
    return CsiError(grpc.StatusCode.INVALID_ARGUMENT, message)


def check_volume_id(volume_id: str) -> str:
    if not volume_id:
        raise _invalid("volume_id missing in request")
    if len(volume_id.encode()) > MAX_VOLUME_ID or _CONTROL.search(volume_id):
        raise _invalid(
            f"volume_id must be at most {MAX_VOLUME_ID} bytes without control characters"
        )
    return volume_id


def check_target_path(target_path: str, pods_dir: str) -> str:
    """`target_path` must be a normalised absolute path strictly below `pods_dir`."""
    if not target_path:
        raise _invalid("target_path missing in request")
    if (
        len(target_path.encode()) > PATH_MAX
        or _CONTROL.search(target_path)
        or not os.path.isabs(target_path)
        or os.path.normpath(target_path) != target_path
    ):
        raise _invalid("target_path must be a normalised absolute path")
    if any(len(part.encode()) > NAME_MAX for part in target_path.split("/")):
        raise _invalid(f"target_path has a component longer than {NAME_MAX} bytes")
    if not target_path.startswith(pods_dir.rstrip("/") + "/"):
        raise _invalid(f"target_path must lie under {pods_dir}")
    return target_path


def check_publish(request: csi_pb2.NodePublishVolumeRequest, pods_dir: str) -> PublishSpec:
    volume_id = check_volume_id(request.volume_id)
    target = check_target_path(request.target_path, pods_dir)

    if not request.HasField("volume_capability"):
        raise _invalid("volume_capability missing in request")
    capability = request.volume_capability
    if capability.HasField("block"):
        raise _invalid("block access is not supported: SecretFS volumes are filesystems")
    if not capability.HasField("mount"):
        raise _invalid("volume_capability must ask for mount access")

    context = dict(request.volume_context)
    unknown = sorted(
        k for k in context if k not in USER_ATTRIBUTES and not k.startswith(KUBELET_PREFIX)
    )
    if unknown:
        # Names only: a mistyped attribute is not secret, its value might be.
        raise _invalid(
            f"unknown volume attributes {', '.join(unknown)}; "
            f"valid attributes: {', '.join(sorted(USER_ATTRIBUTES))}"
        )

    namespace = context.get(POD_NAMESPACE, "")
    if not namespace:
        raise _invalid(
            f"volume_context has no {POD_NAMESPACE}: "
            "the CSIDriver object must set podInfoOnMount: true"
        )
    if not _DNS_LABEL.fullmatch(namespace):
        raise _invalid(f"{POD_NAMESPACE} is not a valid namespace name")

    secret_name = context.get(SECRET_NAME, "")
    if not secret_name:
        raise _invalid(f"volume attribute {SECRET_NAME} is required")
    if len(secret_name) > 253 or not _DNS_SUBDOMAIN.fullmatch(secret_name):
        raise _invalid(
            f"volume attribute {SECRET_NAME} must be a DNS subdomain "
            "(lowercase letters, digits, '-' and '.', at most 253 characters)"
        )

    return PublishSpec(
        volume_id=volume_id,
        target_path=target,
        namespace=namespace,
        secret_name=secret_name,
        pod_name=context.get(POD_NAME, ""),
        pod_uid=context.get(POD_UID, ""),
    )
