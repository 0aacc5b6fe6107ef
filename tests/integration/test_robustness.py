"""Odd paths, odd callers and bad timing: the driver stays correct and leaves nothing behind."""

from __future__ import annotations

import concurrent.futures
import dataclasses
import json
import os
import shutil
import signal
import socket
import subprocess
import threading
import time
from pathlib import Path

import grpc
import pytest

from secretfs.csi.node import NODE_CALL_LIMIT
from secretfs.csi.pb import csi_pb2
from tests.fakeapi import FakeKubeAPI, Fault
from tests.harness import (
    Driver,
    Kubelet,
    Volume,
    code_of,
    crash_with_a_volume,
    mounts_below,
    read_as,
)

pytestmark = pytest.mark.fuse


@pytest.fixture(autouse=True)
def _secret(api: FakeKubeAPI) -> None:
    api.set_secret("default", "db", {"password": b"hunter2"})


def stop_during_publish(
    driver: Driver, kubelet: Kubelet, volume: Volume
) -> tuple[grpc.StatusCode, float]:
    """SIGTERM the driver half a second into a publish of `volume`: the code the
    publish ended with, and how long the driver took to exit (asserted 0)."""
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        publish = pool.submit(code_of, kubelet.publish, volume)
        time.sleep(0.5)
        start = time.monotonic()
        assert driver.stop() == 0
        stopped_in = time.monotonic() - start
        return publish.result(), stopped_in


def test_a_symlinked_kubelet_dir_publishes_once_and_unpublishes_cleanly(
    new_driver: Driver,
) -> None:
    real = new_driver.workdir / "real-kubelet"
    (real / "pods").mkdir(parents=True)
    new_driver.kubelet_dir.symlink_to(real)
    kubelet = Kubelet(new_driver.start())
    volume = kubelet.volume("db")

    for _ in range(3):
        kubelet.publish(volume)
    assert len(mounts_below(real)) == 1
    assert read_as(volume.target / "password", pod=volume.pod_uid) == b"hunter2"

    kubelet.unpublish(volume)
    assert mounts_below(real) == []
    assert not os.path.lexists(volume.target)


def test_a_symlinked_state_dir_survives_a_crash_and_restart(new_driver: Driver) -> None:
    real = new_driver.workdir / "real-state"
    real.mkdir()
    new_driver.state_dir.symlink_to(real)
    kubelet, volume = crash_with_a_volume(new_driver)

    new_driver.start()
    kubelet.unpublish(volume)

    assert mounts_below(volume.target) == []
    assert mounts_below(real) == [str(real)]


def test_a_target_with_unicode_white_space_publishes_once_and_unpublishes(
    new_driver: Driver,
) -> None:
    kubelet = Kubelet(new_driver.start())
    volume = kubelet.volume("db", pod_uid="pod\u00a0with\u2003spaces", name="a\u0085b")

    for _ in range(3):
        kubelet.publish(volume)
    assert mounts_below(volume.target) == [str(volume.target)]

    kubelet.unpublish(volume)
    assert mounts_below(volume.target.parent) == []


def test_unpublish_naming_another_volume_leaves_the_mount_alone(new_driver: Driver) -> None:
    kubelet = Kubelet(new_driver.start())
    volume = kubelet.volume("db")
    kubelet.publish(volume)
    impostor = csi_pb2.NodeUnpublishVolumeRequest(
        volume_id="csi-not-this-one", target_path=str(volume.target)
    )

    assert code_of(new_driver.node.NodeUnpublishVolume, impostor) == (
        grpc.StatusCode.FAILED_PRECONDITION
    )
    assert read_as(volume.target / "password", pod=volume.pod_uid) == b"hunter2"
    kubelet.unpublish(volume)


def test_unpublish_through_a_symlink_out_of_the_pods_folder_touches_nothing(
    new_driver: Driver,
) -> None:
    driver = new_driver.start()
    outside = driver.workdir / "outside"
    (outside / "victim").mkdir(parents=True)
    (driver.kubelet_dir / "pods" / "evil").symlink_to(outside)
    request = csi_pb2.NodeUnpublishVolumeRequest(
        volume_id="x", target_path=str(driver.kubelet_dir / "pods" / "evil" / "victim")
    )

    assert code_of(driver.node.NodeUnpublishVolume, request) == grpc.StatusCode.INVALID_ARGUMENT
    assert (outside / "victim").is_dir()


def test_probes_answer_while_publishes_wait_on_a_failing_api(
    new_driver: Driver, api: FakeKubeAPI
) -> None:
    new_driver.extra_args = ["--api-retry-budget", "6"]
    kubelet = Kubelet(new_driver.start())
    api.inject(Fault(status=503, times=100_000, path="/secrets/down"))
    volumes = [kubelet.volume("down") for _ in range(12)]

    with concurrent.futures.ThreadPoolExecutor(len(volumes)) as pool:
        publishes = [pool.submit(code_of, kubelet.publish, v) for v in volumes]
        time.sleep(0.5)
        start = time.monotonic()
        ready = new_driver.identity.Probe(csi_pb2.ProbeRequest(), timeout=5).ready.value
        probe_seconds = time.monotonic() - start
        codes = {p.result() for p in publishes}

    assert ready and probe_seconds < 1.0
    assert codes == {grpc.StatusCode.UNAVAILABLE}


def test_sigterm_ends_a_publish_that_is_retrying_the_api(
    new_driver: Driver, api: FakeKubeAPI
) -> None:
    new_driver.extra_args = ["--api-retry-budget", "60"]
    kubelet = Kubelet(new_driver.start())
    api.inject(Fault(status=503, times=100_000, path="/secrets/down"))

    code, stopped_in = stop_during_publish(new_driver, kubelet, kubelet.volume("down"))

    assert code == grpc.StatusCode.UNAVAILABLE

    assert stopped_in < 8.0


def test_sigterm_cuts_a_publish_waiting_for_the_api_to_answer_and_nothing_is_added_late(
    new_driver: Driver, api: FakeKubeAPI
) -> None:
    new_driver.extra_args = ["--api-retry-budget", "60"]
    kubelet = Kubelet(new_driver.start())
    api.set_secret("default", "slow", {"k": b"v"})
    api.inject(Fault(delay=8, path="/secrets/slow"))
    volume = kubelet.volume("slow")

    code, stopped_in = stop_during_publish(new_driver, kubelet, volume)

    assert code == grpc.StatusCode.UNAVAILABLE
    assert stopped_in < 3.0  # not the 8 s the answer would have taken
    assert mounts_below(volume.target.parent) == []
    last = new_driver.logs.strip().splitlines()[-1]
    assert "stopped" in last and "NodePublishVolume" not in new_driver.logs.split("stopped")[-1]


def test_a_second_driver_on_a_live_socket_refuses_to_start_and_disturbs_nothing(
    new_driver: Driver,
) -> None:
    kubelet = Kubelet(new_driver.start())
    volume = kubelet.volume("db")
    kubelet.publish(volume)
    second = Driver(new_driver.workdir, new_driver.kubeconfig)

    out = subprocess.run(second.command(), capture_output=True, text=True, timeout=60)

    assert out.returncode == 2 and "another driver is serving" in out.stderr
    assert read_as(volume.target / "password", pod=volume.pod_uid) == b"hunter2"
    assert new_driver.identity.Probe(csi_pb2.ProbeRequest()).ready.value
    kubelet.unpublish(volume)


def test_probe_is_not_ready_once_the_filesystem_is_unmounted_behind_its_back(
    new_driver: Driver,
) -> None:
    driver = new_driver.start()

    os.system(f"umount -l {driver.state_dir}")  # noqa: S605 - a path the test made

    assert driver.identity.Probe(csi_pb2.ProbeRequest()).ready.value is False


def test_request_values_cannot_forge_log_lines_or_flood_them(new_driver: Driver) -> None:
    kubelet = Kubelet(new_driver.start())
    volume = kubelet.volume("db")
    volume.request.volume_context["csi.storage.k8s.io/pod.name"] = "app\nFORGED CRITICAL line"
    kubelet.publish(volume)
    huge = csi_pb2.NodeUnpublishVolumeRequest(volume_id="v" * 100_000, target_path="/x")
    code_of(new_driver.node.NodeUnpublishVolume, huge)
    kubelet.unpublish(volume)
    new_driver.stop()

    lines = new_driver.logs.splitlines()
    assert not any(line.startswith("FORGED") for line in lines)
    assert any("app\\nFORGED" in line for line in lines)
    assert max(len(line) for line in lines) < 2000


def test_the_harness_cleans_up_what_a_test_leaves_mounted(new_driver: Driver) -> None:
    kubelet = Kubelet(new_driver.start())
    volume = kubelet.volume("db")
    kubelet.publish(volume)
    workdir = new_driver.workdir

    new_driver.close()

    assert mounts_below(workdir) == []
    shutil.rmtree(workdir / "kubelet")  # nothing mounted, so removable


def test_publishes_beyond_the_limit_are_refused_at_once_and_probes_still_answer(
    new_driver: Driver, api: FakeKubeAPI
) -> None:
    kubelet = Kubelet(new_driver.start())
    api.set_secret("default", "slow", {"k": b"v"})
    api.inject(Fault(delay=1.5, times=100, path="/secrets/slow"))  # within the 3 s budget
    volumes = [kubelet.volume("slow") for _ in range(NODE_CALL_LIMIT + 8)]

    with concurrent.futures.ThreadPoolExecutor(len(volumes)) as pool:
        publishes = [pool.submit(code_of, kubelet.publish, v) for v in volumes]
        time.sleep(0.7)
        start = time.monotonic()
        ready = new_driver.identity.Probe(csi_pb2.ProbeRequest(), timeout=2).ready.value
        probe_seconds = time.monotonic() - start
        codes = [p.result() for p in publishes]

    assert ready and probe_seconds < 1.0
    assert codes.count(grpc.StatusCode.OK) == NODE_CALL_LIMIT
    assert codes.count(grpc.StatusCode.RESOURCE_EXHAUSTED) == 8
    for volume, code in zip(volumes, codes, strict=True):
        if code == grpc.StatusCode.OK:
            kubelet.unpublish(volume)
        else:
            assert not os.path.lexists(volume.target)


def test_a_target_named_through_a_symlink_in_the_pods_folder_is_the_same_target(
    new_driver: Driver, api: FakeKubeAPI
) -> None:
    kubelet = Kubelet(new_driver.start())
    api.set_secret("default", "other", {"k": b"not for pod a"})
    first = kubelet.volume("db")
    kubelet.publish(first)
    pods = new_driver.kubelet_dir / "pods"
    (pods / "alias").symlink_to(first.pod_uid)
    second = kubelet.volume("other")
    aliased = Path(str(first.target).replace(first.pod_uid, "alias"))
    second.request.target_path = str(aliased)
    second = dataclasses.replace(second, target=aliased)

    assert code_of(kubelet.publish, second) == grpc.StatusCode.ALREADY_EXISTS
    assert code_of(kubelet.unpublish, second) == grpc.StatusCode.FAILED_PRECONDITION

    assert read_as(first.target / "password", pod=first.pod_uid) == b"hunter2"
    kubelet.unpublish(first)
    assert mounts_below(pods) == []


def test_calls_stuck_on_a_filesystem_that_stopped_answering_neither_starve_probes_nor_stop_exit(
    new_driver: Driver,
) -> None:
    new_driver.start()
    # A FUSE filesystem that stops answering: another driver's, its process stopped.
    other = Driver(new_driver.workdir / "other", new_driver.kubeconfig)
    other.workdir.mkdir()
    other.start()
    assert other.process is not None
    hung = new_driver.kubelet_dir / "pods" / "hung"
    hung.mkdir()
    subprocess.run(["mount", "--bind", str(other.state_dir), str(hung)], check=True)
    # Stopped mid-lookup, the other driver would hold its root's inode lock,
    # which the kernel waits for without a way to be killed: let it finish
    # making its spare directories first.
    time.sleep(1.0)
    other.process.send_signal(signal.SIGSTOP)
    try:
        requests = [
            csi_pb2.NodeUnpublishVolumeRequest(
                volume_id=f"v{i}", target_path=str(hung / f"p{i}" / "mount")
            )
            for i in range(NODE_CALL_LIMIT + 1)
        ]
        with concurrent.futures.ThreadPoolExecutor(len(requests)) as pool:
            stuck = [
                pool.submit(code_of, new_driver.node.NodeUnpublishVolume, r, timeout=60)
                for r in requests[:-1]
            ]
            time.sleep(1.0)
            start = time.monotonic()
            ready = new_driver.identity.Probe(csi_pb2.ProbeRequest(), timeout=2).ready.value
            probe_seconds = time.monotonic() - start
            one_more = code_of(new_driver.node.NodeUnpublishVolume, requests[-1], timeout=2)
            # The driver stops with its workers still stuck: they cannot be joined.
            start = time.monotonic()
            exit_code = new_driver.stop()
            stopped_in = time.monotonic() - start
            codes = {s.result() for s in stuck}
    finally:
        other.process.send_signal(signal.SIGCONT)
        subprocess.run(["umount", "-l", str(hung)], check=False)
        other.close()

    assert ready and probe_seconds < 1.0
    assert one_more == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert exit_code == 0 and stopped_in < 10.0
    assert grpc.StatusCode.OK not in codes


def test_sigterm_cuts_a_publish_whose_tls_handshake_never_ends(
    new_driver: Driver, api: FakeKubeAPI
) -> None:
    # An "API server" that takes the connection and never answers the handshake.
    silent = socket.create_server(("127.0.0.1", 0))
    accepted: list[socket.socket] = []
    threading.Thread(target=lambda: accepted.append(silent.accept()[0]), daemon=True).start()
    config = json.loads(new_driver.kubeconfig.read_text())
    config["clusters"][0]["cluster"]["server"] = f"https://127.0.0.1:{silent.getsockname()[1]}"
    new_driver.kubeconfig.write_text(json.dumps(config))
    new_driver.extra_args = ["--api-retry-budget", "60"]
    kubelet = Kubelet(new_driver.start())
    volume = kubelet.volume("db")
    try:
        code, stopped_in = stop_during_publish(new_driver, kubelet, volume)
    finally:
        for sock in [silent, *accepted]:
            sock.close()

    assert code == grpc.StatusCode.UNAVAILABLE
    assert accepted  # the handshake had begun
    assert stopped_in < 3.0  # not the 10 s a request may take
    assert mounts_below(volume.target.parent) == []
