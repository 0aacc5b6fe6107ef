"""NodePublishVolume and NodeUnpublishVolume against a real driver, mount and API."""

from __future__ import annotations

import concurrent.futures
import errno
import os
import shutil
import stat
import uuid
from pathlib import Path

import grpc
import pytest

from secretfs.csi.pb import csi_pb2
from tests.fakeapi import FakeKubeAPI, Fault
from tests.harness import Driver, Kubelet, code_of, in_pod, mounts_below, read_as

pytestmark = pytest.mark.fuse

OK = grpc.StatusCode.OK


def mount_options(target: os.PathLike[str] | str) -> set[str]:
    with open("/proc/self/mountinfo") as f:
        for line in f:
            fields = line.split()
            if fields[4] == str(target):
                return set(fields[5].split(","))
    raise AssertionError(f"{target} is not a mount point")


def volume_dirs(driver: Driver) -> list[str]:
    return sorted(os.listdir(driver.state_dir))


@pytest.fixture
def db(api: FakeKubeAPI) -> dict[str, bytes]:
    values = {
        "password": b"s3cr3t-\x00-\xff-binary\n",
        "empty": b"",
        "config.json": b'{"a": 1}',
    }
    api.set_secret("default", "db", values)
    return values


def test_a_non_root_reader_sees_each_key_as_a_file_with_its_exact_bytes(
    kubelet: Kubelet, db: dict[str, bytes]
) -> None:
    volume = kubelet.volume("db")
    kubelet.publish(volume)

    assert sorted(os.listdir(volume.target)) == sorted(db)
    for key, value in db.items():
        assert read_as(volume.target / key, pod=volume.pod_uid) == value
        assert os.stat(volume.target / key).st_size == len(value)
    kubelet.unpublish(volume)


def test_files_are_0444_and_directories_0555_owned_by_root(
    kubelet: Kubelet, db: dict[str, bytes]
) -> None:
    volume = kubelet.volume("db")
    kubelet.publish(volume)

    top = os.stat(volume.target)
    assert stat.S_ISDIR(top.st_mode) and stat.S_IMODE(top.st_mode) == 0o555
    for key in db:
        info = os.stat(volume.target / key)
        assert stat.S_ISREG(info.st_mode) and stat.S_IMODE(info.st_mode) == 0o444
        assert (info.st_uid, info.st_gid) == (0, 0)
    kubelet.unpublish(volume)


def test_the_target_is_a_read_only_nosuid_nodev_noexec_bind_mount(
    kubelet: Kubelet, db: dict[str, bytes]
) -> None:
    volume = kubelet.volume("db")
    kubelet.publish(volume)

    assert {"ro", "nosuid", "nodev", "noexec"} <= mount_options(volume.target)
    kubelet.unpublish(volume)


def test_the_state_dir_is_private_to_root(
    kubelet: Kubelet, driver: Driver, db: dict[str, bytes]
) -> None:
    volume = kubelet.volume("db")
    kubelet.publish(volume)
    inside = driver.state_dir / volume_dirs(driver)[0] / "password"

    assert stat.S_IMODE(os.stat(driver.state_dir).st_mode) == 0o700
    assert read_as(inside) == errno.EACCES
    kubelet.unpublish(volume)


MUTATIONS = {
    "open for writing": lambda p: open(p / "password", "wb"),
    "open for append": lambda p: open(p / "password", "ab"),
    "create": lambda p: open(p / "new", "xb"),
    "mkdir": lambda p: os.mkdir(p / "d"),
    "unlink": lambda p: os.unlink(p / "password"),
    "rmdir": lambda p: os.rmdir(p / "password"),
    "rename": lambda p: os.rename(p / "password", p / "moved"),
    "link": lambda p: os.link(p / "password", p / "hard"),
    "symlink": lambda p: os.symlink("password", p / "soft"),
    "chmod": lambda p: os.chmod(p / "password", 0o666),
    "chown": lambda p: os.chown(p / "password", 1000, 1000),
    "truncate": lambda p: os.truncate(p / "password", 0),
    "utime": lambda p: os.utime(p / "password", (0, 0)),
    "setxattr": lambda p: os.setxattr(p / "password", "user.x", b"1"),
    "removexattr": lambda p: os.removexattr(p / "password", "user.x"),
    "mknod": lambda p: os.mknod(p / "fifo", 0o600 | stat.S_IFIFO),
}


@pytest.mark.parametrize("mutation", MUTATIONS, ids=list(MUTATIONS))
def test_every_change_fails_with_erofs_even_for_root(
    kubelet: Kubelet, db: dict[str, bytes], mutation: str
) -> None:
    volume = kubelet.volume("db")
    kubelet.publish(volume)

    with pytest.raises(OSError) as failure:
        MUTATIONS[mutation](volume.target)

    assert failure.value.errno == errno.EROFS
    assert read_as(volume.target / "password", pod=volume.pod_uid) == db["password"]
    kubelet.unpublish(volume)


def test_a_secret_without_data_is_an_empty_directory(kubelet: Kubelet, api: FakeKubeAPI) -> None:
    api.set_secret("default", "nothing", {})
    volume = kubelet.volume("nothing")
    kubelet.publish(volume)

    assert os.listdir(volume.target) == []
    kubelet.unpublish(volume)


def test_a_large_value_and_thousands_of_keys_are_served_completely(
    kubelet: Kubelet, api: FakeKubeAPI
) -> None:
    values = {f"key-{i:05d}": f"value {i}".encode() for i in range(3000)}
    values["big"] = os.urandom(1 << 20)
    api.set_secret("default", "many", values)
    volume = kubelet.volume("many")
    kubelet.publish(volume)

    assert sorted(os.listdir(volume.target)) == sorted(values)
    assert sorted(os.listdir(volume.target)) == sorted(os.listdir(volume.target))
    assert read_as(volume.target / "big", pod=volume.pod_uid) == values["big"]
    assert read_as(volume.target / "key-02999", pod=volume.pod_uid) == b"value 2999"
    kubelet.unpublish(volume)


def test_unpublish_removes_the_mount_the_target_and_the_volume(
    kubelet: Kubelet, driver: Driver, db: dict[str, bytes]
) -> None:
    before = volume_dirs(driver)
    volume = kubelet.volume("db")
    kubelet.publish(volume)
    assert len(volume_dirs(driver)) == len(before) + 1

    kubelet.unpublish(volume)

    assert mounts_below(volume.target) == []
    assert not os.path.lexists(volume.target)
    assert volume_dirs(driver) == before


def test_publishing_the_same_request_twice_mounts_once(
    kubelet: Kubelet, db: dict[str, bytes]
) -> None:
    volume = kubelet.volume("db")
    kubelet.publish(volume)
    kubelet.publish(volume)

    assert mounts_below(volume.target) == [str(volume.target)]
    kubelet.unpublish(volume)


def test_another_secret_for_a_published_target_is_already_exists(
    kubelet: Kubelet, api: FakeKubeAPI, db: dict[str, bytes]
) -> None:
    api.set_secret("default", "other", {"k": b"v"})
    volume = kubelet.volume("db")
    kubelet.publish(volume)
    volume.request.volume_context["secretName"] = "other"

    assert code_of(kubelet.publish, volume) == grpc.StatusCode.ALREADY_EXISTS
    assert read_as(volume.target / "password", pod=volume.pod_uid) == db["password"]
    kubelet.unpublish(volume)


def test_concurrent_publishes_of_one_target_end_with_one_mount(
    kubelet: Kubelet, api: FakeKubeAPI, db: dict[str, bytes]
) -> None:
    api.inject(Fault(delay=0.3, path="/secrets/db"))
    volume = kubelet.volume("db")

    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        codes = list(pool.map(lambda _: code_of(kubelet.publish, volume), range(4)))

    assert OK in codes
    assert set(codes) <= {OK, grpc.StatusCode.ABORTED}
    assert mounts_below(volume.target) == [str(volume.target)]
    kubelet.unpublish(volume)


@pytest.mark.parametrize(
    ("secret", "namespace", "fault", "expected"),
    [
        ("missing", "default", None, grpc.StatusCode.NOT_FOUND),
        ("db", "locked", None, grpc.StatusCode.PERMISSION_DENIED),
        ("db", "default", Fault(status=401, times=99), grpc.StatusCode.UNAUTHENTICATED),
        ("db", "default", Fault(status=503, times=999), grpc.StatusCode.UNAVAILABLE),
        ("db", "default", Fault(status=500, times=999), grpc.StatusCode.UNAVAILABLE),
        ("db", "default", Fault(drop=True, times=999), grpc.StatusCode.UNAVAILABLE),
    ],
    ids=["404", "403", "401", "503", "500", "dropped"],
)
def test_api_failures_answer_their_code_and_leave_nothing_behind(
    kubelet: Kubelet,
    driver: Driver,
    api: FakeKubeAPI,
    db: dict[str, bytes],
    secret: str,
    namespace: str,
    fault: Fault | None,
    expected: grpc.StatusCode,
) -> None:
    api.set_secret("locked", "db", {"k": b"v"})
    if fault is not None:
        api.inject(fault)
    before = volume_dirs(driver)
    volume = kubelet.volume(secret, namespace=namespace)

    assert code_of(kubelet.publish, volume) == expected

    assert mounts_below(volume.target.parent) == []
    assert not os.path.lexists(volume.target)
    assert volume_dirs(driver) == before


def test_a_transient_api_failure_is_retried(
    kubelet: Kubelet, api: FakeKubeAPI, db: dict[str, bytes]
) -> None:
    api.inject(Fault(status=503, times=2, path="/secrets/db"))
    gets_before = api.count("GET", "/secrets/db")
    volume = kubelet.volume("db")

    kubelet.publish(volume)

    assert api.count("GET", "/secrets/db") - gets_before == 3
    assert read_as(volume.target / "password", pod=volume.pod_uid) == db["password"]
    kubelet.unpublish(volume)


def test_a_namespace_attribute_is_refused_and_never_honoured(
    kubelet: Kubelet, api: FakeKubeAPI
) -> None:
    api.set_secret("locked", "db", {"k": b"v"})
    volume = kubelet.volume("db", attributes={"namespace": "locked"})

    assert code_of(kubelet.publish, volume) == grpc.StatusCode.INVALID_ARGUMENT
    assert not os.path.lexists(volume.target)


def test_unpublish_of_an_unknown_volume_or_a_missing_target_succeeds(kubelet: Kubelet) -> None:
    volume = kubelet.volume("db")

    kubelet.unpublish(volume)

    assert not os.path.lexists(volume.target)


def test_an_open_file_of_an_unpublished_volume_reads_estale_and_others_keep_serving(
    kubelet: Kubelet, db: dict[str, bytes]
) -> None:
    doomed, survivor = kubelet.volume("db"), kubelet.volume("db")
    kubelet.publish(doomed)
    kubelet.publish(survivor)
    with in_pod(doomed.pod_uid):
        fd = os.open(doomed.target / "password", os.O_RDONLY)
    try:
        kubelet.unpublish(doomed)
        with pytest.raises(OSError) as failure:
            os.read(fd, 100)
    finally:
        os.close(fd)

    assert failure.value.errno == errno.ESTALE
    assert read_as(survivor.target / "password", pod=survivor.pod_uid) == db["password"]
    kubelet.unpublish(survivor)


def test_reads_racing_an_unpublish_get_an_errno_and_the_driver_survives(
    kubelet: Kubelet, driver: Driver, db: dict[str, bytes]
) -> None:
    volume = kubelet.volume("db")
    kubelet.publish(volume)
    outcomes: set[str] = set()

    def hammer() -> None:
        for _ in range(300):
            try:
                with open(volume.target / "password", "rb") as f:
                    data = f.read()
                outcomes.add("ok" if data == db["password"] else "wrong bytes")
            except OSError as exc:
                outcomes.add(errno.errorcode.get(exc.errno or 0, "?"))

    with in_pod(volume.pod_uid), concurrent.futures.ThreadPoolExecutor(2) as pool:
        readers = [pool.submit(hammer) for _ in range(2)]
        kubelet.unpublish(volume)
        for reader in readers:
            reader.result()

    assert "wrong bytes" not in outcomes
    assert driver.process is not None and driver.process.poll() is None
    assert driver.identity.Probe(csi_pb2.ProbeRequest()).ready.value


def test_a_target_that_is_a_file_is_refused_and_nothing_is_left_behind(
    kubelet: Kubelet, driver: Driver, db: dict[str, bytes]
) -> None:
    before = volume_dirs(driver)
    volume = kubelet.volume("db")
    volume.target.write_text("not a directory")

    assert code_of(kubelet.publish, volume) == grpc.StatusCode.FAILED_PRECONDITION

    assert volume.target.read_text() == "not a directory"
    assert mounts_below(volume.target) == []
    assert volume_dirs(driver) == before


def test_a_target_reached_through_a_symlink_out_of_the_pods_folder_is_refused(
    kubelet: Kubelet, driver: Driver, db: dict[str, bytes], tmp_path: Path
) -> None:
    volume = kubelet.volume("db")
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    shutil.rmtree(volume.target.parent)
    volume.target.parent.symlink_to(outside)

    assert code_of(kubelet.publish, volume) == grpc.StatusCode.INVALID_ARGUMENT

    assert list(outside.iterdir()) == []
    assert mounts_below(outside) == []


def test_a_repeated_publish_rotates_a_changed_secret_and_open_files_keep_their_version(
    kubelet: Kubelet, api: FakeKubeAPI
) -> None:
    api.set_secret("default", "rotating", {"password": b"first", "old-only": b"x"})
    volume = kubelet.volume("rotating")
    kubelet.publish(volume)
    with in_pod(volume.pod_uid), open(volume.target / "password", "rb") as before:
        api.set_secret("default", "rotating", {"password": b"second", "new-only": b"y"})
        kubelet.publish(volume)

        assert before.read() == b"first"
        assert read_as(volume.target / "password", pod=volume.pod_uid) == b"second"
        assert sorted(os.listdir(volume.target)) == ["new-only", "password"]
        assert mounts_below(volume.target) == [str(volume.target)]
    kubelet.unpublish(volume)


def test_a_target_holding_files_is_refused_and_left_as_it_was(
    kubelet: Kubelet, driver: Driver, db: dict[str, bytes]
) -> None:
    before = volume_dirs(driver)
    volume = kubelet.volume("db")
    volume.target.mkdir()
    (volume.target / "stray").write_text("not ours")

    assert code_of(kubelet.publish, volume) == grpc.StatusCode.FAILED_PRECONDITION

    assert (volume.target / "stray").read_text() == "not ours"
    assert mounts_below(volume.target) == [] and volume_dirs(driver) == before


def test_parents_the_driver_had_to_make_go_at_unpublish_and_no_further(
    kubelet: Kubelet, db: dict[str, bytes]
) -> None:
    volume = kubelet.volume("db")
    pod = volume.target.parents[3]  # .../pods/<uid>: the kubelet made that much
    shutil.rmtree(pod / "volumes")
    (pod / "keep").mkdir()

    kubelet.publish(volume)
    # The folders the driver made are root's (0750): read as root, from the pod.
    with in_pod(volume.pod_uid), open(volume.target / "password", "rb") as f:
        assert f.read() == db["password"]
    kubelet.unpublish(volume)

    assert sorted(p.name for p in pod.iterdir()) == ["keep"]


def test_a_failed_publish_removes_every_parent_it_made(kubelet: Kubelet) -> None:
    volume = kubelet.volume("no-such-secret")
    pod = volume.target.parents[3]
    shutil.rmtree(pod / "volumes")

    assert code_of(kubelet.publish, volume) == grpc.StatusCode.NOT_FOUND

    assert list(pod.iterdir()) == []


def test_volumes_of_one_pod_published_at_once_share_the_parents_made_for_them(
    kubelet: Kubelet, db: dict[str, bytes]
) -> None:
    codes = []
    for _ in range(5):  # the race for a shared parent is won or lost in microseconds
        pod_uid = str(uuid.uuid4())
        volumes = [kubelet.volume("db", pod_uid=pod_uid, name=f"v{i}") for i in range(16)]
        shutil.rmtree(volumes[0].target.parents[3] / "volumes")
        with concurrent.futures.ThreadPoolExecutor(len(volumes)) as pool:
            codes += pool.map(lambda v: code_of(kubelet.publish, v), volumes)
        for volume in volumes:
            code_of(kubelet.unpublish, volume)

    assert set(codes) == {grpc.StatusCode.OK}
