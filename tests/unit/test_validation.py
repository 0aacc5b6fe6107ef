"""NodePublishVolume request checks: every bad field is INVALID_ARGUMENT, before any work."""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

import grpc
import pytest

from secretfs.csi.errors import CsiError
from secretfs.csi.pb import csi_pb2
from secretfs.csi.validation import Item, check_publish, check_target_path, pod_token

PODS = "/var/lib/kubelet/pods"
TARGET = f"{PODS}/1234/volumes/kubernetes.io~csi/secrets/mount"


def request(**changes: Any) -> csi_pb2.NodePublishVolumeRequest:
    context = {
        "secretName": "db",
        "csi.storage.k8s.io/pod.namespace": "default",
        "csi.storage.k8s.io/pod.name": "app",
        "csi.storage.k8s.io/pod.uid": "1234",
        "csi.storage.k8s.io/ephemeral": "true",
    }
    context.update(changes.pop("context", {}))
    for key in changes.pop("drop", ()):
        context.pop(key)
    fields: dict[str, Any] = {
        "volume_id": "csi-" + "a" * 64,
        "target_path": TARGET,
        "readonly": True,
        "volume_capability": csi_pb2.VolumeCapability(mount=csi_pb2.VolumeCapability.MountVolume()),
        "volume_context": context,
    }
    fields.update(changes)
    return csi_pb2.NodePublishVolumeRequest(**fields)


def block() -> csi_pb2.VolumeCapability:
    return csi_pb2.VolumeCapability(block=csi_pb2.VolumeCapability.BlockVolume())


INVALID: dict[str, Callable[[], csi_pb2.NodePublishVolumeRequest]] = {
    "no volume id": lambda: request(volume_id=""),
    "volume id over 128 bytes": lambda: request(volume_id="v" * 129),
    "volume id with a newline": lambda: request(volume_id="csi-\nx"),
    "no target": lambda: request(target_path=""),
    "relative target": lambda: request(target_path="pods/x/mount"),
    "target outside pods": lambda: request(target_path="/etc/secretfs"),
    "target is the pods folder": lambda: request(target_path=PODS),
    "target beside pods": lambda: request(target_path=PODS + "-evil/x"),
    "target with ..": lambda: request(target_path=f"{PODS}/x/../../../../etc"),
    "target not normalised": lambda: request(target_path=f"{PODS}//x/mount"),
    "target component over 255 bytes": lambda: request(target_path=f"{PODS}/{'x' * 256}/mount"),
    "no capability": lambda: csi_pb2.NodePublishVolumeRequest(
        volume_id="v", target_path=TARGET, volume_context={"secretName": "db"}
    ),
    "block access": lambda: request(volume_capability=block()),
    "no access type": lambda: request(volume_capability=csi_pb2.VolumeCapability()),
    "no pod namespace": lambda: request(drop=["csi.storage.k8s.io/pod.namespace"]),
    "bad pod namespace": lambda: request(context={"csi.storage.k8s.io/pod.namespace": "A_B"}),
    "no secretName": lambda: request(drop=["secretName"]),
    "secretName uppercase": lambda: request(context={"secretName": "DB"}),
    "secretName with slash": lambda: request(context={"secretName": "a/b"}),
    "secretName too long": lambda: request(context={"secretName": "a" * 254}),
    "namespace attribute": lambda: request(context={"namespace": "kube-system"}),
    "secretNamespace attribute": lambda: request(context={"secretNamespace": "kube-system"}),
    "misspelt attribute": lambda: request(context={"secretname": "db"}),
    "items not JSON": lambda: items("[{"),
    "items not a list": lambda: items('{"key": "a", "path": "a"}'),
    "item not an object": lambda: items('["a"]'),
    "item with an unknown field": lambda: items('[{"key": "a", "path": "a", "x": 1}]'),
    "item without a path": lambda: items('[{"key": "a"}]'),
    "item key invalid": lambda: items('[{"key": "a/b", "path": "a"}]'),
    "item path absolute": lambda: items('[{"key": "a", "path": "/etc/passwd"}]'),
    "item path empty": lambda: items('[{"key": "a", "path": ""}]'),
    "item path with ..": lambda: items('[{"key": "a", "path": "../../etc"}]'),
    "item path with .. inside": lambda: items('[{"key": "a", "path": "x/../y"}]'),
    "item path with an empty segment": lambda: items('[{"key": "a", "path": "x//y"}]'),
    "item path with a trailing slash": lambda: items('[{"key": "a", "path": "x/"}]'),
    "item path with a dot segment": lambda: items('[{"key": "a", "path": "./x"}]'),
    "item path over 4096 bytes": lambda: item_at("/".join(["d" * 200] * 21)),
    "item path segment over 255": lambda: item_at("x" * 256),
    "item path with a newline": lambda: items('[{"key": "a", "path": "x\\ny"}]'),
    "items collide": lambda: items('[{"key": "a", "path": "x"}, {"key": "b", "path": "x"}]'),
    "item under another file": lambda: items(
        '[{"key": "a", "path": "x"}, {"key": "b", "path": "x/y"}]'
    ),
    "item mode with write": lambda: items('[{"key": "a", "path": "x", "mode": 420}]'),
    "item mode with exec": lambda: items('[{"key": "a", "path": "x", "mode": 365}]'),
    "item mode a string": lambda: items('[{"key": "a", "path": "x", "mode": "0400"}]'),
    "item mode a boolean": lambda: items('[{"key": "a", "path": "x", "mode": true}]'),
    "fileMode with write": lambda: request(context={"fileMode": "0644"}),
    "fileMode setuid": lambda: request(context={"fileMode": "4444"}),
    "fileMode not octal": lambda: request(context={"fileMode": "0999"}),
    "optional not a boolean": lambda: request(context={"optional": "yes"}),
    "mount group not numeric": lambda: request(volume_capability=mount(group="wheel")),
    "mount group negative": lambda: request(volume_capability=mount(group="-1")),
    "mount group in other digits": lambda: request(volume_capability=mount(group="\u0661\u0662")),
    "mount group superscript": lambda: request(volume_capability=mount(group="\u00b2")),
    "item path a dot": lambda: item_at("."),
    "item path starting with ..": lambda: item_at("..data"),
    "item path with a dot segment inside": lambda: item_at("a/./b"),
    "item path too deep": lambda: item_at("/".join(["a"] * 65)),
    "item path a lone surrogate": lambda: item_at("a\ud800"),
    "items nested too deep": lambda: items("[" * 100_000),
    "items too long": lambda: items(json.dumps([{"key": "a", "path": "p" * 200}] * 2000)),
}


def items(text: str) -> csi_pb2.NodePublishVolumeRequest:
    return request(context={"items": text})


def item_at(path: str) -> csi_pb2.NodePublishVolumeRequest:
    return items(json.dumps([{"key": "a", "path": path}]))


def mount(group: str = "") -> csi_pb2.VolumeCapability:
    return csi_pb2.VolumeCapability(
        mount=csi_pb2.VolumeCapability.MountVolume(volume_mount_group=group)
    )


@pytest.mark.parametrize("case", INVALID, ids=list(INVALID))
def test_a_bad_request_is_invalid_argument(case: str) -> None:
    with pytest.raises(CsiError) as failure:
        check_publish(INVALID[case](), PODS)

    assert failure.value.code == grpc.StatusCode.INVALID_ARGUMENT


def test_an_unknown_attribute_error_names_it_and_lists_the_valid_ones() -> None:
    with pytest.raises(CsiError) as failure:
        check_publish(request(context={"secretname": "top-secret-value"}), PODS)

    assert "secretname" in failure.value.message
    assert "valid attributes: secretName, items, fileMode, optional" in failure.value.message
    assert "top-secret-value" not in failure.value.message


def test_a_good_request_yields_the_pods_namespace_and_the_secret_name() -> None:
    spec = check_publish(request(), PODS)

    assert (spec.namespace, spec.secret_name, spec.secret_ref) == ("default", "db", "default/db")
    assert (spec.pod_name, spec.pod_uid, spec.target_path) == ("app", "1234", TARGET)


def test_any_access_mode_is_accepted_since_the_volume_is_always_read_only() -> None:
    capability = csi_pb2.VolumeCapability(
        mount=csi_pb2.VolumeCapability.MountVolume(),
        access_mode=csi_pb2.VolumeCapability.AccessMode(
            mode=csi_pb2.VolumeCapability.AccessMode.SINGLE_NODE_WRITER
        ),
    )

    assert check_publish(request(volume_capability=capability), PODS).secret_name == "db"


def test_a_pods_dir_with_a_trailing_slash_is_the_same_rule() -> None:
    assert check_target_path(TARGET, PODS + "/") == TARGET


def test_items_modes_and_options_are_read_as_the_kubelets_secret_volume_reads_them() -> None:
    spec = check_publish(
        request(
            context={
                "items": '[{"key": "tls.crt", "path": "certs/tls.crt"},'
                ' {"key": "tls.key", "path": "certs/private/tls.key", "mode": 256},'
                ' {"key": "tls.crt", "path": "copy.crt"}]',
                "fileMode": "0440",
                "optional": "true",
            },
            volume_capability=mount(group="1234"),
        ),
        PODS,
    )

    assert spec.items == (
        Item("tls.crt", "certs/tls.crt"),
        Item("tls.key", "certs/private/tls.key", 0o400),
        Item("tls.crt", "copy.crt"),
    )
    assert (spec.file_mode, spec.optional, spec.mount_group) == (0o440, True, 1234)


TOKENS = {"": {"token": "eyJ.pod.token", "expirationTimestamp": "2030-01-01T00:00:00Z"}}


def test_the_pods_token_becomes_a_bearer_authorization() -> None:
    token = pod_token(json.dumps(TOKENS), "")

    assert bytes(token.view()) == b"Bearer eyJ.pod.token"


@pytest.mark.parametrize(
    ("tokens", "audience", "words"),
    [
        (None, "", "tokenRequests"),
        ("", "", "tokenRequests"),
        ("not json", "", "no token for audience"),
        (json.dumps(TOKENS), "vault", "no token for audience 'vault'"),
        (json.dumps({"": {"expirationTimestamp": "x"}}), "", "no token for audience"),
        (json.dumps({"": {"token": "eyJ\r\n\r\nGET / HTTP/1.1"}}), "", "characters a token"),
        (json.dumps({"": {"token": "eyJ \u00e9"}}), "", "characters a token"),
        (json.dumps({"": {"token": "eyJ\ud800"}}), "", "characters a token"),
        ("[" * 100_000 + "]" * 100_000, "", "no token for audience"),
    ],
    ids=[
        "absent",
        "empty",
        "not JSON",
        "other audience",
        "no token field",
        "line breaks",
        "not ASCII",
        "a lone surrogate",
        "nested too deep",
    ],
)
def test_without_a_usable_token_publish_is_invalid_and_names_the_csidriver_setting(
    tokens: str | None, audience: str, words: str
) -> None:
    with pytest.raises(CsiError) as failure:
        pod_token(tokens, audience)

    assert failure.value.code == grpc.StatusCode.INVALID_ARGUMENT
    assert words in failure.value.message
    assert "eyJ" not in failure.value.message
