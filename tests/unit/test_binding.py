"""Pod binding: which pod a process belongs to, from its cgroup paths."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest

from secretfs.fs.binding import PodBinding, pod_of_cgroups

UID = "8a4f2c1e-93b7-4d2a-b5e6-0f1e2d3c4b5a"
SYSTEMD_UID = UID.replace("-", "_")
OTHER = "11111111-2222-3333-4444-555555555555"

CGROUPS = {
    "cgroup v2, cgroupfs driver": (f"0::/kubepods/burstable/pod{UID}/0123abcd\n", UID),
    "cgroup v2, systemd driver": (
        "0::/kubepods.slice/kubepods-besteffort.slice/"
        f"kubepods-besteffort-pod{SYSTEMD_UID}.slice/cri-containerd-0123abcd.scope\n",
        UID,
    ),
    "cgroup v2, guaranteed QoS": (f"0::/kubepods/pod{UID}/ctr\n", UID),
    "cgroup v1, every hierarchy agrees": (
        f"12:memory:/kubepods/besteffort/pod{UID}/c\n"
        f"11:cpu,cpuacct:/kubepods/besteffort/pod{UID}/c\n"
        f"1:name=systemd:/kubepods/besteffort/pod{UID}/c\n",
        UID,
    ),
    "hybrid, pod only on the unified line": (f"5:memory:/\n0::/kubepods/pod{UID}/c\n", UID),
    "hierarchies disagree": (f"12:memory:/kubepods/pod{UID}/c\n0::/kubepods/pod{OTHER}/c\n", None),
    "host process": ("0::/system.slice/sshd.service\n", None),
    "root cgroup": ("0::/\n", None),
    "not a uuid": ("0::/kubepods/podnotauuid/c\n", None),
    "a name that merely ends in pod<uid>": (f"0::/kubepods/mypod{UID}/c\n", None),
    "a user's delegated cgroup named like a pod": (
        f"0::/user.slice/user-65534.slice/user@65534.service/pod{UID}\n",
        None,
    ),
    "a cgroup a pod nests in its own": (f"0::/kubepods/pod{OTHER}/ctr/pod{UID}\n", OTHER),
    "seen from a private cgroup namespace": (f"0::/../../pod{UID}/ctr\n", UID),
    "another QoS class, seen from a private namespace": (
        f"0::/../../../besteffort/pod{UID}/ctr\n",
        UID,
    ),
    "a systemd pod slice, seen from a private namespace": (
        f"0::/../../kubepods-besteffort-pod{SYSTEMD_UID}.slice/cri-containerd-1.scope\n",
        UID,
    ),
    "a user's delegated cgroup, seen from a private namespace": (
        f"0::/../../../../user.slice/user-1000.slice/user@1000.service/kubepods/pod{UID}\n",
        None,
    ),
    "kind's nested kubelet, systemd driver": (
        "0::/kubelet.slice/kubelet-kubepods.slice/kubelet-kubepods-besteffort.slice/"
        f"kubelet-kubepods-besteffort-pod{SYSTEMD_UID}.slice/cri-containerd-1.scope\n",
        UID,
    ),
}


@pytest.mark.parametrize("case", CGROUPS, ids=list(CGROUPS))
def test_the_pod_is_read_from_the_cgroup_path(case: str) -> None:
    text, expected = CGROUPS[case]

    assert pod_of_cgroups(text) == expected


def test_a_pod_cgroup_not_owned_by_root_is_no_pod(tmp_path: Path) -> None:
    owned = {"/kubepods/pod" + UID: 0, "/kubepods/pod" + OTHER: 65534}

    def owned_by_root(path: str) -> bool:
        return owned.get(path) == 0

    assert pod_of_cgroups(f"0::/kubepods/pod{UID}/c\n", owned_by_root) == UID
    assert pod_of_cgroups(f"0::/kubepods/pod{OTHER}/c\n", owned_by_root) is None
    # v1 hierarchies are not resolved against the v2 mount: no check there
    assert pod_of_cgroups(f"4:pids:/kubepods/pod{OTHER}/c\n", owned_by_root) == OTHER


@pytest.fixture
def proc(tmp_path: Path) -> Path:
    for pid, text, comm in [
        (100, f"0::/kubepods/pod{UID}/c\n", "app"),
        (200, "0::/user.slice\n", "cat\nFORGED"),
    ]:
        (tmp_path / str(pid)).mkdir()
        (tmp_path / str(pid) / "cgroup").write_text(text)
        (tmp_path / str(pid) / "comm").write_text(comm)
    return tmp_path


def test_a_process_of_the_pod_may_open_and_others_may_not(proc: Path) -> None:
    binding = PodBinding(str(proc))

    assert binding.allows(100, 1000, UID, "vol")
    assert not binding.allows(200, 0, UID, "vol")
    assert not binding.allows(100, 1000, OTHER, "vol")
    assert binding.refusals == 2


def test_an_invisible_or_vanished_caller_is_refused(proc: Path) -> None:
    binding = PodBinding(str(proc))

    assert not binding.allows(0, 0, UID, "vol")
    assert not binding.allows(999, 0, UID, "vol")


def test_a_process_moved_to_another_cgroup_is_judged_by_where_it_is_now(proc: Path) -> None:
    binding = PodBinding(str(proc))
    assert binding.allows(100, 1000, UID, "vol")

    (proc / "100" / "cgroup").write_text("0::/user.slice\n")

    assert not binding.allows(100, 1000, UID, "vol")


def test_a_refusal_is_logged_once_per_process_and_volume_with_an_escaped_command(
    proc: Path, caplog: pytest.LogCaptureFixture
) -> None:
    binding = PodBinding(str(proc))

    with caplog.at_level(logging.WARNING):
        for _ in range(3):
            binding.allows(200, 0, UID, "vol-a")
        binding.allows(200, 0, UID, "vol-b")

    refusals = [r.getMessage() for r in caplog.records]
    assert len(refusals) == 2 and binding.refusals == 4
    assert "pid 200 (uid 0, cat\\nFORGED)" in refusals[0] and "vol-a" in refusals[0]
