"""Proof that a Secret lives only in the driver's locked RAM, and only while published.

Each test plants a random marker as a Secret value and counts its copies in
the driver's whole address space (/proc/PID/maps and /proc/PID/mem), raw and
base64-encoded, while the volume is published and after it is gone.
"""

from __future__ import annotations

import base64
import ctypes
import errno
import json
import os
import re
import secrets
import signal
import string
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import BinaryIO

import grpc
import pytest

from tests.fakeapi import FakeKubeAPI
from tests.harness import Driver, Kubelet, Volume, code_of, in_pod, read_as

pytestmark = pytest.mark.fuse

CHUNK = 16 << 20


def marker() -> bytes:
    """48 random letters: their base64 form has no padding and no overlap with them."""
    return "".join(secrets.choice(string.ascii_letters) for _ in range(48)).encode()


def readable_regions(pid: int) -> Iterator[tuple[int, int]]:
    with open(f"/proc/{pid}/maps") as maps:
        for line in maps:
            fields = line.split()
            if fields[1].startswith("r") and not line.rstrip().endswith(("[vvar]", "[vsyscall]")):
                start, end = (int(x, 16) for x in fields[0].split("-"))
                yield start, end


def count_in_memory(pid: int, *needles: bytes) -> list[int]:
    """How often each needle occurs in the readable memory of process `pid`."""
    counts = [0] * len(needles)
    overlap = max(len(n) for n in needles) - 1
    with open(f"/proc/{pid}/mem", "rb", buffering=0) as mem:
        for start, end in readable_regions(pid):
            carried = b""  # the previous chunk's tail, so no needle is split in two
            for at in range(start, end, CHUNK):
                try:
                    mem.seek(at)
                    data = carried + mem.read(min(CHUNK, end - at))
                except OSError:
                    break
                for i, needle in enumerate(needles):
                    # what lies wholly inside `carried` was counted with the last chunk
                    counts[i] += data.count(needle) - carried.count(needle)
                carried = data[-overlap:]
    return counts


def eventually(check: Callable[[], bool], timeout: float = 3.0) -> bool:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.1)
    return True


def copies(driver: Driver, value: bytes) -> tuple[int, int]:
    """(raw copies, base64 copies) of `value` in the driver's memory."""
    assert driver.process is not None
    raw, encoded = count_in_memory(driver.process.pid, value, base64.b64encode(value))
    return raw, encoded


@pytest.fixture
def driver(new_driver: Driver) -> Driver:
    return new_driver.start()


@pytest.fixture
def kubelet(driver: Driver) -> Kubelet:
    return Kubelet(driver)


def test_the_scanner_finds_what_it_is_looking_for(driver: Driver) -> None:
    # The driver's own command line holds its state directory path: one or more copies.
    assert copies(driver, str(driver.state_dir).encode())[0] >= 1


def test_a_secret_has_one_plaintext_copy_while_published_and_none_after(
    kubelet: Kubelet, driver: Driver, api: FakeKubeAPI
) -> None:
    value = marker()
    api.set_secret("default", "scan", {"token": value})
    volume = kubelet.volume("scan")
    kubelet.publish(volume)
    for _ in range(20):
        assert read_as(volume.target / "token", pod=volume.pod_uid) == value

    assert copies(driver, value) == (1, 0)
    kubelet.unpublish(volume)
    assert copies(driver, value) == (0, 0)


def test_a_one_mebibyte_value_has_one_copy_while_published_and_none_after(
    kubelet: Kubelet, driver: Driver, api: FakeKubeAPI
) -> None:
    head, tail = marker(), marker()
    value = head + os.urandom((1 << 20) - 96) + tail
    api.set_secret("default", "big", {"blob": value})
    volume = kubelet.volume("big")
    kubelet.publish(volume)
    for _ in range(3):
        assert read_as(volume.target / "blob", pod=volume.pod_uid) == value

    assert copies(driver, head) == (1, 0)
    assert copies(driver, tail)[0] == 1
    kubelet.unpublish(volume)
    assert copies(driver, head) == (0, 0)
    assert copies(driver, tail)[0] == 0


def test_a_failed_publish_leaves_no_copy(
    kubelet: Kubelet, driver: Driver, api: FakeKubeAPI
) -> None:
    value = marker()
    # A valid key read first, then one that cannot be a file name.
    api.store.put(
        "default", "broken", {"a": base64.b64encode(value).decode(), "..": "eA=="}, create=True
    )
    volume = kubelet.volume("broken")

    assert code_of(kubelet.publish, volume) == grpc.StatusCode.FAILED_PRECONDITION
    assert copies(driver, value) == (0, 0)


def test_a_publish_that_fails_after_the_fetch_leaves_no_copy(
    kubelet: Kubelet, driver: Driver, api: FakeKubeAPI
) -> None:
    value = marker()
    api.set_secret("default", "unmountable", {"k": value})
    volume = kubelet.volume("unmountable")
    volume.target.write_text("a file where the mount should go")

    assert code_of(kubelet.publish, volume) == grpc.StatusCode.FAILED_PRECONDITION
    assert copies(driver, value) == (0, 0)


def test_the_pods_token_leaves_no_copy(kubelet: Kubelet, driver: Driver, api: FakeKubeAPI) -> None:
    token = marker()
    api.set_secret("default", "db", {"k": b"v"})
    # A real token of the pod's account: the driver reads the Secret with it.
    api.add_user("system:serviceaccount:default:default", token.decode())
    tokens = json.dumps(
        {"": {"token": token.decode(), "expirationTimestamp": "2030-01-01T00:00:00Z"}}
    )
    volume = kubelet.volume("db", attributes={"csi.storage.k8s.io/serviceAccount.tokens": tokens})
    kubelet.publish(volume)
    # The kubelet's connection has closed; the server frees it asynchronously.
    assert eventually(lambda: copies(driver, token) == (0, 0))

    kubelet.unpublish(volume)
    assert copies(driver, token) == (0, 0)


def test_secret_buffers_are_locked_in_ram(
    kubelet: Kubelet, driver: Driver, api: FakeKubeAPI
) -> None:
    value = marker() * 100  # several pages would show up unlocked if they were
    api.set_secret("default", "locked", {"k": value})
    volume = kubelet.volume("locked")
    kubelet.publish(volume)
    assert driver.process is not None

    status = Path(f"/proc/{driver.process.pid}/status").read_text()
    locked_kib = int(re.search(r"VmLck:\s+(\d+) kB", status)[1])  # type: ignore[index]
    region = smaps_of_address(driver.process.pid, address_of(driver.process.pid, value))

    assert locked_kib >= len(value) // 1024
    assert int(re.search(r"Locked:\s+(\d+) kB", region)[1]) * 1024 >= len(value)  # type: ignore[index]
    assert "dd" in re.search(r"VmFlags:(.*)", region)[1].split()  # type: ignore[index]
    kubelet.unpublish(volume)


def address_of(pid: int, needle: bytes) -> int:
    with open(f"/proc/{pid}/mem", "rb", buffering=0) as mem:
        for start, end in readable_regions(pid):
            try:
                mem.seek(start)
                at = mem.read(end - start).find(needle)
            except OSError:
                continue
            if at >= 0:
                return start + at
    raise AssertionError("value not found in the driver's memory")


def smaps_of_address(pid: int, address: int) -> str:
    """The /proc/PID/smaps block describing the mapping that holds `address`."""
    blocks = re.split(r"\n(?=[0-9a-f]+-[0-9a-f]+ )", Path(f"/proc/{pid}/smaps").read_text())
    for block in blocks:
        start, end = (int(x, 16) for x in block.split()[0].split("-"))
        if start <= address < end:
            return block
    raise AssertionError(f"no mapping holds {address:#x}")


def test_the_driver_is_not_dumpable_and_dumps_nothing(driver: Driver) -> None:
    assert driver.process is not None
    pid = driver.process.pid
    limits = Path(f"/proc/{pid}/limits").read_text()

    assert Path(f"/proc/{pid}/coredump_filter").read_text().strip() == "00000000"
    assert re.search(r"Max core file size\s+0\s+0", limits)
    # PR_GET_DUMPABLE answers only for the caller itself: the driver reports it.
    assert "memory protection: locked=True dumpable=False" in driver.logs


def test_freed_memory_is_wiped_by_the_allocator(driver: Driver) -> None:
    assert driver.process is not None
    environ = Path(f"/proc/{driver.process.pid}/environ").read_bytes()

    assert b"\0PYTHONMALLOC=malloc\0" in environ
    assert b"glibc.malloc.tcache_count=0" in environ and b"glibc.malloc.perturb=165" in environ


def test_nothing_is_written_to_disk_and_no_file_holds_the_secret(
    new_driver: Driver, api: FakeKubeAPI
) -> None:
    # The one thing publish must write is the empty target directory, in the
    # kubelet's folder: kept on tmpfs here so that write_bytes counts only
    # what the driver itself would write to a disk.
    new_driver.kubelet_dir.mkdir()
    subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=16m", "tmpfs", str(new_driver.kubelet_dir)], check=True
    )
    driver = new_driver.start()
    kubelet = Kubelet(driver)
    assert driver.process is not None
    value = marker()
    api.set_secret("default", "disk", {"k": value})
    written_before = write_bytes(driver.process.pid)
    volume = kubelet.volume("disk")
    kubelet.publish(volume)
    for _ in range(20):
        assert read_as(volume.target / "k", pod=volume.pod_uid) == value
    kubelet.unpublish(volume)

    assert write_bytes(driver.process.pid) == written_before
    places = ["/tmp", "/var/tmp", "/run", str(Path.cwd())]
    found = subprocess.run(
        ["grep", "-rlsF", "--devices=skip", value.decode(), *places], capture_output=True
    )
    assert found.stdout == b""


def write_bytes(pid: int) -> int:
    io = Path(f"/proc/{pid}/io").read_text()
    return int(re.search(r"^write_bytes:\s+(\d+)", io, re.M)[1])  # type: ignore[index]


def test_without_cap_ipc_lock_and_a_small_memlock_limit_serve_refuses_to_start(
    new_driver: Driver,
) -> None:
    command = [
        "prlimit",
        "--memlock=65536:65536",
        "--",
        "setpriv",
        "--inh-caps=-ipc_lock",
        "--bounding-set=-ipc_lock",
        *new_driver.command(),
    ]
    out = subprocess.run(command, capture_output=True, text=True, timeout=60)

    assert out.returncode == 2
    assert "CAP_IPC_LOCK" in out.stderr and "memlock" in out.stderr


def test_allow_unlocked_memory_starts_with_a_warning(new_driver: Driver) -> None:
    new_driver.extra_args = ["--allow-unlocked-memory"]
    command = [
        "prlimit",
        "--memlock=65536:65536",
        "--",
        "setpriv",
        "--inh-caps=-ipc_lock",
        "--bounding-set=-ipc_lock",
        *new_driver.command(),
    ]
    process = subprocess.Popen(command, stderr=subprocess.PIPE, text=True)
    try:
        assert process.stderr is not None
        lines = []
        for line in process.stderr:
            lines.append(line)
            if "ready:" in line or "cannot start" in line:
                break
    finally:
        process.send_signal(signal.SIGTERM)
        process.wait(20)

    text = "".join(lines)
    assert "--allow-unlocked-memory" in text and "WARNING" in text
    assert "ready:" in text


def rotate_under_a_reader(
    kubelet: Kubelet, api: FakeKubeAPI, name: str
) -> tuple[bytes, bytes, Volume, BinaryIO]:
    """Publish value `old`, open it from the pod, then rotate the Secret to `new`."""
    old, new = marker(), marker()
    api.set_secret("default", name, {"k": old})
    volume = kubelet.volume(name)
    kubelet.publish(volume)
    with in_pod(volume.pod_uid):
        reader = open(volume.target / "k", "rb")
    api.set_secret("default", name, {"k": new})
    kubelet.publish(volume)
    return old, new, volume, reader


def test_a_rotated_out_value_leaves_no_copy_once_its_last_reader_closes(
    kubelet: Kubelet, driver: Driver, api: FakeKubeAPI
) -> None:
    old, new, volume, reader = rotate_under_a_reader(kubelet, api, "rotor")
    assert copies(driver, old) == (1, 0)  # still served to the reader that opened it
    assert reader.read() == old
    reader.close()

    assert eventually(lambda: copies(driver, old) == (0, 0))
    assert copies(driver, new) == (1, 0)
    kubelet.unpublish(volume)
    assert copies(driver, new) == (0, 0)


class _CachestatRange(ctypes.Structure):
    _fields_ = [("offset", ctypes.c_uint64), ("length", ctypes.c_uint64)]


class _Cachestat(ctypes.Structure):
    _fields_ = [
        (name, ctypes.c_uint64)
        for name in ("cache", "dirty", "writeback", "evicted", "recently_evicted")
    ]


def cached_pages(path: Path) -> int:
    """Pages of `path` in the page cache, from cachestat(2) (Linux 6.5)."""
    libc = ctypes.CDLL(None, use_errno=True)
    fd = os.open(path, os.O_RDONLY)
    try:
        whole, result = _CachestatRange(0, 0), _Cachestat()
        if libc.syscall(451, fd, ctypes.byref(whole), ctypes.byref(result), 0) != 0:
            err = ctypes.get_errno()
            if err == errno.ENOSYS:
                pytest.skip("the kernel has no cachestat(2)")
            raise OSError(err, os.strerror(err))
        return int(result.cache)
    finally:
        os.close(fd)


def test_reads_leave_no_page_in_the_page_cache(
    kubelet: Kubelet, api: FakeKubeAPI, tmp_path: Path
) -> None:
    value = os.urandom(256 << 10)
    api.set_secret("default", "uncached", {"k": value})
    volume = kubelet.volume("uncached")
    kubelet.publish(volume)
    control = tmp_path / "control"
    control.write_bytes(value)
    with in_pod(volume.pod_uid):
        for _ in range(20):
            assert (volume.target / "k").read_bytes() == value
            assert control.read_bytes() == value

    assert cached_pages(control) > 0  # the measurement sees a cached file
    with in_pod(volume.pod_uid):
        assert cached_pages(volume.target / "k") == 0
    kubelet.unpublish(volume)


def test_unpublish_wipes_a_rotated_out_value_even_while_a_reader_holds_it(
    kubelet: Kubelet, driver: Driver, api: FakeKubeAPI
) -> None:
    old, new, volume, reader = rotate_under_a_reader(kubelet, api, "held")

    kubelet.unpublish(volume)

    assert copies(driver, old) == (0, 0) and copies(driver, new) == (0, 0)
    with pytest.raises(OSError) as failure:
        reader.read()
    assert failure.value.errno == errno.ESTALE
    reader.close()
