"""Checks on NodePublishVolume and NodeUnpublishVolume requests.

Every field is checked before anything is fetched or mounted, and a bad one
ends the call with INVALID_ARGUMENT and a message naming the field and the
rule. Messages never echo a value that could be secret; names of attributes
and item paths are not secret and are named.

The volume attributes mirror the kubelet's own secret volume, so that a pod
author finds the same knobs: `secretName`, `items` (KeyToPath: key, path,
mode), `fileMode` (defaultMode) and `optional`.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass

import grpc

from secretfs.fs.buffer import SecretBuffer, scrub_bytes, scrub_str

from .errors import CsiError
from .pb import csi_pb2

# Keys the kubelet puts into volume_context (podInfoOnMount, ephemeral
# volumes, tokenRequests). Their values describe the pod, never the volume.
POD_NAMESPACE = "csi.storage.k8s.io/pod.namespace"
POD_NAME = "csi.storage.k8s.io/pod.name"
POD_UID = "csi.storage.k8s.io/pod.uid"
SERVICE_ACCOUNT = "csi.storage.k8s.io/serviceAccount.name"
SA_TOKENS = "csi.storage.k8s.io/serviceAccount.tokens"
KUBELET_PREFIX = "csi.storage.k8s.io/"

# Attributes a pod author may set in the volume's volumeAttributes.
SECRET_NAME = "secretName"  # noqa: S105 - an attribute name, not a password
ITEMS = "items"
FILE_MODE = "fileMode"
OPTIONAL = "optional"
USER_ATTRIBUTES = (SECRET_NAME, ITEMS, FILE_MODE, OPTIONAL)

# CSI caps identifiers at 128 bytes; the kubelet's ephemeral ids are 68.
MAX_VOLUME_ID = 128
PATH_MAX = 4096
NAME_MAX = 255
MAX_DEPTH = 64  # folders in an item path; deeper is a mistake or an attack
MAX_ITEMS_TEXT = 256 * 1024

# Modes may only grant reading: the volume is read-only whatever they say,
# and execute or set-id bits have no business on a secret.
READ_BITS = 0o444

_DNS_SUBDOMAIN = re.compile(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*")
_DNS_LABEL = re.compile(r"[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?")
_SECRET_KEY = re.compile(r"[-._a-zA-Z0-9]{1,253}")
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")
_OCTAL = re.compile(r"0?[0-7]{1,3}")
_GROUP = re.compile(r"[0-9]{1,10}")  # ASCII digits only: int() also takes "١٢٣"

BEARER = b"Bearer "
# Bearer tokens (JWTs and the like) are visible ASCII and nothing else.
_TOKEN = re.compile(r"[\x21-\x7e]{1,16384}")


@dataclass(frozen=True, slots=True)
class Item:
    """One KeyToPath entry: Secret key `key` appears at `path`, with `mode` if set."""

    key: str
    path: str
    mode: int | None = None


@dataclass(frozen=True, slots=True)
class PublishSpec:
    """A validated NodePublishVolume request, with nothing secret in it."""

    volume_id: str
    target_path: str
    namespace: str
    secret_name: str
    pod_name: str = ""
    pod_uid: str = ""
    service_account: str = ""
    items: tuple[Item, ...] | None = None
    file_mode: int | None = None
    optional: bool = False
    mount_group: int | None = None

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
    mount_group = _check_capability(request)

    context = request.volume_context
    unknown = sorted(
        k for k in context if k not in USER_ATTRIBUTES and not k.startswith(KUBELET_PREFIX)
    )
    if unknown:
        # Names only: a mistyped attribute is not secret, its value might be.
        raise _invalid(
            f"unknown volume attributes {', '.join(unknown)}; "
            f"valid attributes: {', '.join(USER_ATTRIBUTES)}"
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
        service_account=context.get(SERVICE_ACCOUNT, ""),
        items=_check_items(context[ITEMS]) if ITEMS in context else None,
        file_mode=_check_mode(context[FILE_MODE], FILE_MODE) if FILE_MODE in context else None,
        optional=_check_optional(context.get(OPTIONAL, "false")),
        mount_group=mount_group,
    )


def _check_capability(request: csi_pb2.NodePublishVolumeRequest) -> int | None:
    """Mount access is required; returns the fsGroup the kubelet delegated, if any."""
    if not request.HasField("volume_capability"):
        raise _invalid("volume_capability missing in request")
    capability = request.volume_capability
    if capability.HasField("block"):
        raise _invalid("block access is not supported: SecretFS volumes are filesystems")
    if not capability.HasField("mount"):
        raise _invalid("volume_capability must ask for mount access")
    group = capability.mount.volume_mount_group
    if not group:
        return None
    if not _GROUP.fullmatch(group) or int(group) > 0xFFFFFFFE:
        raise _invalid("volume_mount_group must be a numeric group id")
    return int(group)


def _check_mode(value: object, what: str) -> int:
    """A mode with read bits only: an octal string ("0440") or a number."""
    if isinstance(value, str) and _OCTAL.fullmatch(value):
        mode = int(value, 8)
    elif isinstance(value, int) and not isinstance(value, bool) and 0 <= value <= 0o7777:
        mode = value
    else:
        raise _invalid(f"{what} must be an octal mode such as 0440")
    if mode & ~READ_BITS:
        raise _invalid(f"{what} may only grant read permission (bits of 0444), not {mode:04o}")
    return mode


def _check_optional(value: str) -> bool:
    if value not in ("true", "false"):
        raise _invalid(f"volume attribute {OPTIONAL} must be true or false")
    return value == "true"


def _check_items(text: str) -> tuple[Item, ...]:
    """Parse and check `items`: a JSON list of {key, path, mode} objects."""
    if len(text) > MAX_ITEMS_TEXT:
        raise _invalid(f"volume attribute {ITEMS} is longer than {MAX_ITEMS_TEXT} characters")
    try:
        entries = json.loads(text)
    except (ValueError, RecursionError):
        raise _invalid(f"volume attribute {ITEMS} is not JSON") from None
    if not isinstance(entries, list):
        raise _invalid(f"volume attribute {ITEMS} must be a JSON list of {{key, path, mode}}")
    items: list[Item] = []
    for index, entry in enumerate(entries):
        where = f"{ITEMS}[{index}]"
        if not isinstance(entry, dict) or set(entry) - {"key", "path", "mode"}:
            raise _invalid(f"{where} must be an object with key, path and an optional mode")
        key, path = entry.get("key"), entry.get("path")
        if not isinstance(key, str) or not _SECRET_KEY.fullmatch(key) or key in (".", ".."):
            raise _invalid(f"{where}.key is not a valid Secret key")
        if not isinstance(path, str):
            raise _invalid(f"{where}.path must be a string")
        _check_item_path(path, where)
        mode = None
        if "mode" in entry:
            # As in a KeyToPath: a number (JSON has no octal; 256 is 0400).
            if not isinstance(entry["mode"], int) or isinstance(entry["mode"], bool):
                raise _invalid(f"{where}.mode must be a number, such as 256 for 0400")
            mode = _check_mode(entry["mode"], f"{where}.mode")
        items.append(Item(key, path, mode))
    _check_no_collisions(items)
    return tuple(items)


def _check_item_path(path: str, where: str) -> None:
    if not path:
        raise _invalid(f"{where}.path is empty")
    try:
        size = len(path.encode())
    except UnicodeEncodeError:
        raise _invalid(f"{where}.path is not valid UTF-8") from None
    if size > PATH_MAX or _CONTROL.search(path):
        raise _invalid(f"{where}.path must be at most {PATH_MAX} bytes without control characters")
    if path.startswith("/"):
        raise _invalid(f"{where}.path must be relative")
    parts = path.split("/")
    if {".", "..", ""} & set(parts) or os.path.normpath(path) != path:
        raise _invalid(f"{where}.path must be normalised, without '.', '..' or empty segments")
    if path.startswith(".."):
        # As in the kubelet, whose secret volumes keep their own `..data` there.
        raise _invalid(f"{where}.path must not start with '..'")
    if len(parts) > MAX_DEPTH:
        raise _invalid(f"{where}.path is more than {MAX_DEPTH} folders deep")
    if any(len(part.encode()) > NAME_MAX for part in parts):
        raise _invalid(f"{where}.path has a segment longer than {NAME_MAX} bytes")


def _check_no_collisions(items: list[Item]) -> None:
    """No two items at one path, and no item under another item's file."""
    paths = {item.path for item in items}
    if len(paths) != len(items):
        raise _invalid(f"two {ITEMS} share a path")
    for path in paths:
        parent = path
        while "/" in parent:
            parent = parent.rsplit("/", 1)[0]
            if parent in paths:
                raise _invalid(f"{ITEMS} path {path} lies under the file {parent}")


def pod_token(tokens: str | None, audience: str) -> SecretBuffer:
    """The pod's service-account token for `audience`, as an Authorization value.

    `tokens` is the kubelet's `serviceAccount.tokens` attribute, present only
    when the CSIDriver asks for tokens. Every temporary that held the token
    is zeroed before this returns.
    """
    if not tokens:
        raise _invalid(
            "volume_context carries no service-account token: the CSIDriver object must "
            f'request one (spec.tokenRequests: [{{audience: "{audience}"}}]); '
            "SecretFS never falls back to its own identity in pod mode"
        )
    try:
        parsed = json.loads(tokens)
    except (ValueError, RecursionError):
        parsed = None
    finally:
        scrub_str(tokens)
    found = [
        entry["token"]
        for entry in (parsed.values() if isinstance(parsed, dict) else ())
        if isinstance(entry, dict) and isinstance(entry.get("token"), str)
    ]
    try:
        entry = parsed.get(audience) if isinstance(parsed, dict) else None
        token = entry.get("token") if isinstance(entry, dict) else None
        if not isinstance(token, str) or not token:
            raise _invalid(
                f"{SA_TOKENS} has no token for audience {audience!r}: the CSIDriver's "
                "tokenRequests must list that audience"
            )
        if not _TOKEN.fullmatch(token):
            # A line break would smuggle a second request into the HTTP stream.
            raise _invalid(f"{SA_TOKENS} holds a token with characters a token never has")
        raw = token.encode()
        value = SecretBuffer(len(BEARER) + len(raw))
        view = value.writable()
        view[: len(BEARER)] = BEARER
        view[len(BEARER) :] = raw
        scrub_bytes(raw)
        return value
    finally:
        for text in found:
            scrub_str(text)
