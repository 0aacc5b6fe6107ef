"""Least privilege and pod isolation, end to end: whose token reads, who may open, what modes."""

from __future__ import annotations

import base64
import errno
import json
import os
import stat

import grpc
import pytest

from tests.fakeapi import FakeKubeAPI, Fault
from tests.harness import Driver, Kubelet, code_of, mounts_below, read_as

pytestmark = pytest.mark.fuse


@pytest.fixture(autouse=True)
def _secret(api: FakeKubeAPI) -> None:
    api.set_secret("default", "db", {"password": b"hunter2", "user": b"app"})


def error_of(kubelet: Kubelet, volume: object) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as failure:
        kubelet.publish(volume)  # type: ignore[arg-type]
    return failure.value


# ---- identity ----------------------------------------------------------------


def test_the_secret_is_read_with_the_pods_own_token(kubelet: Kubelet, api: FakeKubeAPI) -> None:
    before = len(api.requests)
    volume = kubelet.volume("db")

    kubelet.publish(volume)

    users = {r.user for r in api.requests[before:] if r.path.endswith("/secrets/db")}
    assert users == {"system:serviceaccount:default:default"}
    kubelet.unpublish(volume)


def test_a_pod_whose_account_may_not_read_the_secret_is_told_what_to_grant(
    kubelet: Kubelet, api: FakeKubeAPI
) -> None:
    api.set_secret("locked", "vault", {"k": b"v"})
    volume = kubelet.volume("vault", namespace="locked")

    failure = error_of(kubelet, volume)

    assert failure.code() == grpc.StatusCode.PERMISSION_DENIED
    message = failure.details() or ""
    assert "service account locked/default" in message
    assert "secret locked/vault" in message and '"get"' in message
    assert not os.path.lexists(volume.target)


def test_without_a_token_publish_is_refused_and_never_falls_back_to_the_driver(
    new_driver: Driver, api: FakeKubeAPI
) -> None:
    new_driver.tokens = None  # the CSIDriver lacks tokenRequests
    kubelet = Kubelet(new_driver.start())
    gets_before = api.count("GET", "/secrets/db")

    failure = error_of(kubelet, kubelet.volume("db"))

    assert failure.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "tokenRequests" in (failure.details() or "")
    assert api.count("GET", "/secrets/db") == gets_before  # nothing read at all


def test_driver_mode_reads_with_the_drivers_identity_in_the_pods_namespace(
    new_driver: Driver, api: FakeKubeAPI
) -> None:
    new_driver.tokens = None
    new_driver.extra_args = ["--auth-mode", "driver"]
    kubelet = Kubelet(new_driver.start())
    before = len(api.requests)
    volume = kubelet.volume("db")

    kubelet.publish(volume)

    users = {r.user for r in api.requests[before:] if "/secrets/" in r.path}
    assert users == {"system:serviceaccount:secretfs:secretfs-node"}
    assert read_as(volume.target / "password", pod=volume.pod_uid) == b"hunter2"
    kubelet.unpublish(volume)


# ---- pod binding ---------------------------------------------------------------


def test_only_the_pods_processes_may_open_its_files(kubelet: Kubelet, driver: Driver) -> None:
    volume = kubelet.volume("db")
    kubelet.publish(volume)
    path = volume.target / "password"

    assert read_as(path, pod=volume.pod_uid) == b"hunter2"
    assert read_as(path, pod=volume.pod_uid, uid=0, gid=0) == b"hunter2"
    assert read_as(path, uid=0, gid=0) == errno.EACCES  # host root, outside the pod
    assert read_as(path) == errno.EACCES  # the pod's uid, outside the pod
    assert read_as(path, pod="11111111-2222-3333-4444-555555555555") == errno.EACCES
    assert f"refused an open of volume {volume.volume_id}" in driver.logs
    kubelet.unpublish(volume)


def test_a_refusal_is_logged_once_per_process_and_volume(kubelet: Kubelet, driver: Driver) -> None:
    volume = kubelet.volume("db")
    kubelet.publish(volume)

    for _ in range(3):
        with pytest.raises(PermissionError):
            (volume.target / "password").read_bytes()  # the same test process each time

    lines = [
        line
        for line in driver.logs.splitlines()
        if f"volume {volume.volume_id}: pid {os.getpid()}" in line
    ]
    assert len(lines) == 1
    kubelet.unpublish(volume)


def test_pod_binding_off_lets_the_file_modes_decide(new_driver: Driver) -> None:
    new_driver.extra_args = ["--pod-binding", "off"]
    kubelet = Kubelet(new_driver.start())
    volume = kubelet.volume("db")
    kubelet.publish(volume)

    assert read_as(volume.target / "password") == b"hunter2"
    assert (volume.target / "password").read_bytes() == b"hunter2"
    kubelet.unpublish(volume)


# ---- ownership and modes -------------------------------------------------------


def test_with_an_fsgroup_files_are_root_group_0440_and_directories_0550(
    kubelet: Kubelet,
) -> None:
    volume = kubelet.volume("db", fs_group=4321)
    kubelet.publish(volume)
    top = os.stat(volume.target)
    info = os.stat(volume.target / "password")

    assert (stat.S_IMODE(top.st_mode), top.st_gid) == (0o550, 4321)
    assert (stat.S_IMODE(info.st_mode), info.st_uid, info.st_gid) == (0o440, 0, 4321)
    path = volume.target / "password"
    assert read_as(path, pod=volume.pod_uid, uid=1000, gid=1000, groups=(4321,)) == b"hunter2"
    assert read_as(path, pod=volume.pod_uid, uid=1000, gid=1000) == errno.EACCES
    kubelet.unpublish(volume)


def test_items_place_only_the_listed_keys_at_their_paths_with_their_modes(
    kubelet: Kubelet,
) -> None:
    items = [
        {"key": "password", "path": "db/credentials/password", "mode": 0o400},
        {"key": "user", "path": "username"},
    ]
    volume = kubelet.volume("db", attributes={"items": json.dumps(items), "fileMode": "0440"})
    kubelet.publish(volume)

    assert sorted(os.listdir(volume.target)) == ["db", "username"]
    nested = volume.target / "db" / "credentials" / "password"
    assert stat.S_IMODE(os.stat(nested).st_mode) == 0o400
    assert stat.S_IMODE(os.stat(volume.target / "username").st_mode) == 0o440
    assert stat.S_IMODE(os.stat(volume.target / "db").st_mode) == 0o555
    assert read_as(nested, pod=volume.pod_uid, uid=0, gid=0) == b"hunter2"
    kubelet.unpublish(volume)


def test_a_listed_key_missing_from_the_secret_is_not_found_unless_optional(
    kubelet: Kubelet,
) -> None:
    items = json.dumps([{"key": "password", "path": "p"}, {"key": "nope", "path": "n"}])
    strict = kubelet.volume("db", attributes={"items": items})
    lenient = kubelet.volume("db", attributes={"items": items, "optional": "true"})

    failure = error_of(kubelet, strict)
    kubelet.publish(lenient)

    assert failure.code() == grpc.StatusCode.NOT_FOUND and "no key nope" in (
        failure.details() or ""
    )
    assert not os.path.lexists(strict.target)
    assert os.listdir(lenient.target) == ["p"]
    kubelet.unpublish(lenient)


def test_an_optional_volume_of_a_missing_secret_is_an_empty_directory(kubelet: Kubelet) -> None:
    volume = kubelet.volume("does-not-exist", attributes={"optional": "true"})

    kubelet.publish(volume)

    assert os.listdir(volume.target) == []
    kubelet.unpublish(volume)


# ---- hostile input -------------------------------------------------------------

HOSTILE = {
    "item escaping with ..": {"items": '[{"key": "password", "path": "../../../../etc/x"}]'},
    "absolute item path": {"items": '[{"key": "password", "path": "/etc/shadow"}]'},
    "colliding items": {
        "items": '[{"key": "password", "path": "a"}, {"key": "user", "path": "a"}]'
    },
    "writable mode": {"fileMode": "0666"},
    "another namespace": {"namespace": "kube-system"},
    "bad secret name": {"secretName": "../db"},
}


@pytest.mark.parametrize("case", HOSTILE, ids=list(HOSTILE))
def test_hostile_attributes_are_invalid_before_anything_is_read_or_mounted(
    kubelet: Kubelet, api: FakeKubeAPI, case: str
) -> None:
    gets_before = api.count("GET", "/secrets/")
    volume = kubelet.volume("db", attributes=HOSTILE[case])

    assert code_of(kubelet.publish, volume) == grpc.StatusCode.INVALID_ARGUMENT
    assert api.count("GET", "/secrets/") == gets_before
    assert mounts_below(volume.target.parent) == []
    assert not os.path.lexists(volume.target)


# ---- logs ----------------------------------------------------------------------


def test_no_secret_value_or_token_reaches_the_logs_at_the_highest_verbosity(
    new_driver: Driver, api: FakeKubeAPI
) -> None:
    value, token = (
        b"Sup3r-S3cret-V4lue-" + os.urandom(6).hex().encode(),
        "tok-" + os.urandom(8).hex(),
    )
    api.add_user("system:serviceaccount:team-a:default", token)
    api.set_secret("team-a", "planted", {"planted-key": value})
    new_driver.extra_args = ["-v", "-v"]
    new_driver.tokens = lambda namespace, account: token
    kubelet = Kubelet(new_driver.start(), namespace="team-a")
    volume = kubelet.volume("planted")
    kubelet.publish(volume)
    kubelet.publish(volume)  # a republish reads again
    assert read_as(volume.target / "planted-key", pod=volume.pod_uid) == value
    read_as(volume.target / "planted-key")  # refused, and logged
    code_of(kubelet.publish, kubelet.volume("absent"))
    api.inject(Fault(status=500, times=2, path="/secrets/planted"))
    code_of(kubelet.publish, kubelet.volume("planted"))
    kubelet.unpublish(volume)
    for extra in ({"items": "[{"}, {"fileMode": "0777"}, {"bogus": value.decode()}):
        code_of(kubelet.publish, kubelet.volume("planted", attributes=extra))
    new_driver.stop()

    logs = new_driver.logs
    assert "NodePublishVolume" in logs and "DEBUG" in logs  # the highest verbosity ran
    for forbidden in (value, base64.b64encode(value), token.encode(), b"Bearer"):
        assert forbidden.decode() not in logs


def test_with_an_fsgroup_an_owner_only_mode_still_reads_through_the_group(
    kubelet: Kubelet,
) -> None:
    items = [{"key": "password", "path": "private/key", "mode": 0o400}]
    volume = kubelet.volume("db", fs_group=2000, attributes={"items": json.dumps(items)})
    kubelet.publish(volume)
    path = volume.target / "private" / "key"

    assert stat.S_IMODE(os.stat(path).st_mode) == 0o440
    assert read_as(path, pod=volume.pod_uid, uid=1000, gid=1000, groups=(2000,)) == b"hunter2"
    kubelet.unpublish(volume)
