"""protos/csi.proto speaks CSI v1 on the wire, and the installed stubs match it."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import grpc_tools
import pytest
from google.protobuf import descriptor_pb2

from secretfs.csi.pb import csi_pb2

PROTO = Path(__file__).resolve().parents[2] / "protos" / "csi.proto"

# Field numbers and types from the CSI v1 specification.
SPEC_FIELDS = {
    "NodePublishVolumeRequest": {
        "volume_id": (1, "string"),
        "publish_context": (2, "map"),
        "staging_target_path": (3, "string"),
        "target_path": (4, "string"),
        "volume_capability": (5, "message"),
        "readonly": (6, "bool"),
        "secrets": (7, "map"),
        "volume_context": (8, "map"),
    },
    "NodeUnpublishVolumeRequest": {"volume_id": (1, "string"), "target_path": (2, "string")},
    "VolumeCapability": {
        "block": (1, "message"),
        "mount": (2, "message"),
        "access_mode": (3, "message"),
    },
    "VolumeCapability.MountVolume": {
        "fs_type": (1, "string"),
        "mount_flags": (2, "string"),
        "volume_mount_group": (3, "string"),
    },
    "GetPluginInfoResponse": {
        "name": (1, "string"),
        "vendor_version": (2, "string"),
        "manifest": (3, "map"),
    },
    "GetPluginCapabilitiesResponse": {"capabilities": (1, "message")},
    "ProbeResponse": {"ready": (1, "message")},
    "NodeGetInfoResponse": {
        "node_id": (1, "string"),
        "max_volumes_per_node": (2, "int64"),
        "accessible_topology": (3, "message"),
    },
    "NodeGetCapabilitiesResponse": {"capabilities": (1, "message")},
    "NodeServiceCapability.RPC": {"type": (1, "enum")},
}

SPEC_METHODS = {
    "Identity": ["GetPluginInfo", "GetPluginCapabilities", "Probe"],
    "Node": [
        "NodeStageVolume",
        "NodeUnstageVolume",
        "NodePublishVolume",
        "NodeUnpublishVolume",
        "NodeGetVolumeStats",
        "NodeExpandVolume",
        "NodeGetCapabilities",
        "NodeGetInfo",
    ],
}


def type_name(field: object) -> str:
    from google.protobuf.descriptor import FieldDescriptor as F

    if field.type == F.TYPE_MESSAGE and field.message_type.GetOptions().map_entry:  # type: ignore[attr-defined]
        return "map"
    return {
        F.TYPE_STRING: "string",
        F.TYPE_BOOL: "bool",
        F.TYPE_INT64: "int64",
        F.TYPE_MESSAGE: "message",
        F.TYPE_ENUM: "enum",
    }[field.type]  # type: ignore[attr-defined]


def message(path: str) -> object:
    descriptor = csi_pb2.DESCRIPTOR.message_types_by_name[path.split(".")[0]]
    for part in path.split(".")[1:]:
        descriptor = descriptor.nested_types_by_name[part]
    return descriptor


def test_the_package_is_csi_v1() -> None:
    assert csi_pb2.DESCRIPTOR.package == "csi.v1"


@pytest.mark.parametrize("name", SPEC_FIELDS)
def test_field_numbers_and_types_match_the_spec(name: str) -> None:
    fields = {f.name: (f.number, type_name(f)) for f in message(name).fields}  # type: ignore[attr-defined]

    assert fields == SPEC_FIELDS[name]


def test_services_declare_the_spec_methods() -> None:
    for service, methods in SPEC_METHODS.items():
        declared = csi_pb2.DESCRIPTOR.services_by_name[service]
        assert sorted(m.name for m in declared.methods) == sorted(methods)
        assert declared.full_name == f"csi.v1.{service}"


def test_the_secrets_field_is_marked_secret() -> None:
    field = message("NodePublishVolumeRequest").fields_by_name["secrets"]  # type: ignore[attr-defined]

    assert field.GetOptions().Extensions[csi_pb2.csi_secret] is True


def test_the_installed_stubs_were_built_from_this_checkouts_proto(tmp_path: Path) -> None:
    out = tmp_path / "set.pb"
    well_known = Path(grpc_tools.__file__).parent / "_proto"
    subprocess.run(
        [
            sys.executable,
            "-m",
            "grpc_tools.protoc",
            f"-I{PROTO.parent}",
            f"-I{well_known}",
            f"--descriptor_set_out={out}",
            str(PROTO),
        ],
        check=True,
    )
    fresh = descriptor_pb2.FileDescriptorSet.FromString(out.read_bytes()).file[0]
    _drop_json_names(fresh.message_type)  # the Python stubs never embed them
    for extension in fresh.extension:
        extension.ClearField("json_name")
    installed = descriptor_pb2.FileDescriptorProto()
    csi_pb2.DESCRIPTOR.CopyToProto(installed)

    assert fresh == installed, "reinstall the package: the stubs predate protos/csi.proto"


def _drop_json_names(messages: object) -> None:
    for proto in messages:  # type: ignore[attr-defined]
        for field in proto.field:
            field.ClearField("json_name")
        _drop_json_names(proto.nested_type)
