"""Start, stop, crash and restart of the driver process."""

from __future__ import annotations

import errno
import json
import os
import signal
import time

import grpc
import pytest

from secretfs.csi.pb import csi_pb2
from tests.fakeapi import FakeKubeAPI
from tests.harness import Driver, Kubelet, code_of, crash_with_a_volume, in_pod, mounts_below

pytestmark = pytest.mark.fuse


@pytest.fixture(autouse=True)
def _secret(api: FakeKubeAPI) -> None:
    api.set_secret("default", "db", {"password": b"hunter2"})


def test_identity_answers_name_version_no_controller_and_ready(new_driver: Driver) -> None:
    driver = new_driver.start()

    info = driver.identity.GetPluginInfo(csi_pb2.GetPluginInfoRequest())
    capabilities = driver.identity.GetPluginCapabilities(csi_pb2.GetPluginCapabilitiesRequest())
    probe = driver.identity.Probe(csi_pb2.ProbeRequest())

    assert (info.name, info.vendor_version) == ("secretfs.csi.io", "0.1.0")
    assert list(capabilities.capabilities) == []
    assert probe.ready.value is True


def test_node_info_names_the_node_and_unsupported_calls_are_unimplemented(
    new_driver: Driver,
) -> None:
    driver = new_driver.start()
    node = driver.node

    assert node.NodeGetInfo(csi_pb2.NodeGetInfoRequest()).node_id == "node-1"
    capabilities = node.NodeGetCapabilities(csi_pb2.NodeGetCapabilitiesRequest()).capabilities
    assert [c.rpc.type for c in capabilities] == [
        csi_pb2.NodeServiceCapability.RPC.VOLUME_MOUNT_GROUP
    ]
    for call, request in [
        (node.NodeStageVolume, csi_pb2.NodeStageVolumeRequest()),
        (node.NodeUnstageVolume, csi_pb2.NodeUnstageVolumeRequest()),
        (node.NodeExpandVolume, csi_pb2.NodeExpandVolumeRequest()),
        (node.NodeGetVolumeStats, csi_pb2.NodeGetVolumeStatsRequest()),
    ]:
        assert code_of(call, request) == grpc.StatusCode.UNIMPLEMENTED


def test_sigterm_unmounts_the_filesystem_removes_the_socket_and_exits_0(new_driver: Driver) -> None:
    driver = new_driver.start()
    kubelet = Kubelet(driver)
    volume = kubelet.volume("db")
    kubelet.publish(volume)

    assert driver.stop(signal.SIGTERM) == 0

    assert mounts_below(driver.state_dir) == []
    assert not driver.socket.exists()
    assert "wiped 1 volumes" in driver.logs
    # The pod's mount outlives the driver but serves nothing any more.
    with pytest.raises(OSError) as failure:
        os.listdir(volume.target)
    assert failure.value.errno in (errno.ENOTCONN, errno.ENOENT, errno.EIO)


def test_a_crashed_run_leaves_nothing_that_stops_a_new_start_and_its_volumes_unpublish(
    new_driver: Driver,
) -> None:
    driver = new_driver
    kubelet, volume = crash_with_a_volume(driver)

    assert driver.socket.exists()
    assert mounts_below(driver.state_dir) == [str(driver.state_dir)]

    driver.start()
    kubelet.unpublish(volume)

    assert mounts_below(volume.target) == []
    assert not os.path.lexists(volume.target)
    fresh = kubelet.volume("db")
    kubelet.publish(fresh)
    with in_pod(fresh.pod_uid), open(fresh.target / "password", "rb") as f:
        assert f.read() == b"hunter2"
    kubelet.unpublish(fresh)


def test_publish_over_a_dead_mount_of_a_crashed_run_replaces_it(new_driver: Driver) -> None:
    driver = new_driver
    kubelet, volume = crash_with_a_volume(driver)

    driver.start()
    kubelet.publish(volume)

    assert mounts_below(volume.target) == [str(volume.target)]
    with in_pod(volume.pod_uid), open(volume.target / "password", "rb") as f:
        assert f.read() == b"hunter2"
    kubelet.unpublish(volume)


def test_json_logs_are_one_object_per_line_with_the_calls_fields(new_driver: Driver) -> None:
    new_driver.extra_args = ["--log-format", "json"]
    driver = new_driver.start()
    kubelet = Kubelet(driver)
    volume = kubelet.volume("db")
    kubelet.publish(volume)
    kubelet.unpublish(volume)
    driver.stop()

    entries = [json.loads(line) for line in driver.logs.splitlines() if line.strip()]

    assert all({"time", "level", "logger", "message"} <= entry.keys() for entry in entries)
    publish = [e for e in entries if e.get("method") == "NodePublishVolume"]
    assert len(publish) == 1
    assert publish[0]["code"] == "OK" and publish[0]["volume_id"] == volume.volume_id
    assert publish[0]["pod"] == "default/app"


def test_targets_are_directories_made_ahead_and_none_outlives_the_driver(
    new_driver: Driver,
) -> None:
    driver = new_driver.start()
    pool = driver.kubelet_dir / "plugins" / "secretfs.csi.io" / "targets"
    deadline = time.monotonic() + 10
    while not (pool / "1").exists():
        assert time.monotonic() < deadline, "no target directory made ahead"
        time.sleep(0.01)
    kubelet = Kubelet(driver)
    volume = kubelet.volume("db")

    kubelet.publish(volume)

    assert not (pool / "1").exists()  # moved: it is the target now
    with in_pod(volume.pod_uid), open(volume.target / "password", "rb") as f:
        assert f.read() == b"hunter2"
    kubelet.unpublish(volume)
    assert not os.path.lexists(volume.target)
    assert driver.stop() == 0
    assert list(pool.iterdir()) == []
