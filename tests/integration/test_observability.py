"""Prometheus metrics and health endpoints of a running driver."""

from __future__ import annotations

import re
import socket
import subprocess
import urllib.error
import urllib.request

import pytest

from tests.fakeapi import FakeKubeAPI
from tests.harness import Driver, Kubelet, code_of, mounts_below, read_as

pytestmark = pytest.mark.fuse


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def get(url: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url, timeout=10) as response:  # noqa: S310 - loopback
            return response.status, response.read().decode()
    except urllib.error.HTTPError as error:
        return error.code, error.read().decode()


def sample(metrics: str, name: str, labels: str = "") -> float:
    pattern = rf"^{re.escape(name)}{re.escape('{' + labels + '}') if labels else ''} (\S+)$"
    found = re.search(pattern, metrics, re.M)
    assert found, f"{name}{{{labels}}} not in metrics"
    return float(found[1])


@pytest.fixture
def observed(new_driver: Driver) -> tuple[Driver, str]:
    address = f"127.0.0.1:{free_port()}"
    new_driver.extra_args = ["--metrics-address", address, "--health-address", address]
    return new_driver.start(), f"http://{address}"


def test_metrics_count_calls_volumes_bytes_refusals_and_api_errors_without_names(
    observed: tuple[Driver, str], api: FakeKubeAPI
) -> None:
    driver, url = observed
    api.set_secret("team-a", "metered", {"k": b"0123456789"})
    kubelet = Kubelet(driver, namespace="team-a")
    volume = kubelet.volume("metered")
    kubelet.publish(volume)
    read_as(volume.target / "k")  # outside the pod: refused
    code_of(kubelet.publish, kubelet.volume("no-such-secret"))

    status, metrics = get(f"{url}/metrics")

    assert status == 200
    assert sample(metrics, "secretfs_csi_calls_total", 'code="OK",method="NodePublishVolume"') == 1
    assert (
        sample(metrics, "secretfs_csi_calls_total", 'code="NOT_FOUND",method="NodePublishVolume"')
        == 1
    )
    assert (
        sample(metrics, "secretfs_csi_call_duration_seconds_count", 'method="NodePublishVolume"')
        == 2
    )
    assert sample(metrics, "secretfs_volumes_published") == 1
    assert sample(metrics, "secretfs_secret_bytes_locked") >= 10
    assert sample(metrics, "secretfs_opens_refused_total") == 1
    assert sample(metrics, "secretfs_api_errors_total", 'kind="not_found"') == 1
    for private in ("team-a", "metered", "no-such-secret", volume.pod_uid, volume.volume_id, "app"):
        assert private not in metrics

    kubelet.unpublish(volume)
    _, after = get(f"{url}/metrics")
    assert sample(after, "secretfs_volumes_published") == 0
    assert sample(after, "secretfs_secret_bytes_locked") == 0


def test_health_and_readiness_answer_ok_and_fail_once_the_filesystem_is_gone(
    observed: tuple[Driver, str],
) -> None:
    driver, url = observed

    assert get(f"{url}/healthz")[0] == 200
    assert get(f"{url}/readyz")[0] == 200
    assert get(f"{url}/nothing")[0] == 404

    subprocess.run(["umount", "-l", str(driver.state_dir)], check=True)

    status, body = get(f"{url}/healthz")
    assert status == 503 and "failing" in body
    assert get(f"{url}/readyz")[0] == 503


def test_a_taken_metrics_address_stops_the_start_with_a_reason(new_driver: Driver) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        address = f"127.0.0.1:{taken.getsockname()[1]}"
        new_driver.extra_args = ["--metrics-address", address]

        out = subprocess.run(new_driver.command(), capture_output=True, text=True, timeout=60)

    assert out.returncode == 2 and f"cannot serve HTTP on {address}" in out.stderr
    assert mounts_below(new_driver.state_dir) == []  # the FUSE mount was undone
    assert not new_driver.socket.exists()
