"""The command line, the server's helpers and the mount table parser."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from secretfs.csi import cli, mounts
from secretfs.csi.pb import csi_pb2
from secretfs.csi.server import call_fields, printable, socket_path, unexpected
from secretfs.fs import memory

FLAGS = [
    "--endpoint",
    "--node-id",
    "--driver-name",
    "--kubeconfig",
    "--kubelet-dir",
    "--auth-mode",
    "--state-dir",
    "--log-format",
    "--verbose",
    "--api-retry-budget",
]


def test_serve_help_explains_every_flag() -> None:
    out = subprocess.run(
        [sys.executable, "-m", "secretfs.csi", "serve", "--help"],
        capture_output=True,
        text=True,
        check=True,
    )

    for flag in FLAGS:
        assert flag in out.stdout
    assert "SIGTERM" in out.stdout


def test_serve_without_root_exits_2_with_the_reason(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setattr(cli.os, "geteuid", lambda: 1000)
    # Present the environment the driver restarts itself into, so it does not.
    monkeypatch.setenv("PYTHONMALLOC", "malloc")
    monkeypatch.setenv("GLIBC_TUNABLES", memory.WIPING_TUNABLES)

    assert cli.main(["serve", "--node-id", "n"]) == 2
    assert "serve needs root" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("endpoint", "path"),
    [
        ("unix:///csi/csi.sock", "/csi/csi.sock"),
        ("unix:/csi/csi.sock", "/csi/csi.sock"),
    ],
)
def test_unix_endpoints_name_a_socket_path(endpoint: str, path: str) -> None:
    assert socket_path(endpoint) == path


@pytest.mark.parametrize("endpoint", ["tcp://127.0.0.1:10000", "unix://relative.sock", "/x"])
def test_other_endpoints_are_refused(endpoint: str) -> None:
    with pytest.raises(ValueError):
        socket_path(endpoint)


def test_a_call_log_names_the_volume_target_and_pod_but_nothing_secret() -> None:
    request = csi_pb2.NodePublishVolumeRequest(
        volume_id="csi-1",
        target_path="/var/lib/kubelet/pods/u/v/mount",
        secrets={"password": "hunter2"},
        volume_context={
            "csi.storage.k8s.io/pod.namespace": "ns",
            "csi.storage.k8s.io/pod.name": "app",
            "csi.storage.k8s.io/serviceAccount.tokens": '{"": {"token": "eyJ"}}',
            "secretName": "db",
        },
    )

    fields = call_fields(request)

    assert fields == {
        "volume_id": "csi-1",
        "target_path": "/var/lib/kubelet/pods/u/v/mount",
        "pod": "ns/app",
    }


def test_the_mount_table_parser_unescapes_paths(tmp_path: Path) -> None:
    table = tmp_path / "mountinfo"
    table.write_text(
        "36 25 0:32 /vol\\040dir /var/lib/kubelet/pods/u/a\\040b/mount ro,nosuid - "
        "fuse.secretfs secretfs ro,user_id=0\n"
        "37 25 0:33 / /run/secretfs rw shared:1 - fuse.secretfs secretfs rw\n"
    )

    first, second = mounts.mount_table(str(table))

    assert first.mountpoint == "/var/lib/kubelet/pods/u/a b/mount"
    assert first.root == "/vol dir"
    assert (first.fstype, first.options) == ("fuse.secretfs", frozenset({"ro", "nosuid"}))
    assert (second.mountpoint, second.fstype) == ("/run/secretfs", "fuse.secretfs")


@pytest.mark.parametrize("budget", ["-5", "0", "abc", "500"])
def test_a_retry_budget_outside_the_kubelets_deadline_is_refused(budget: str) -> None:
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "secretfs.csi",
            "serve",
            "--node-id",
            "n",
            "--api-retry-budget",
            budget,
        ],
        capture_output=True,
        text=True,
        check=False,
    )

    assert out.returncode == 2 and "--api-retry-budget" in out.stderr


@pytest.mark.parametrize(
    ("value", "logged"),
    [
        ("csi-1234", "csi-1234"),
        ("app\nFORGED", "app\\nFORGED"),
        ("a\u2028b", "a\\u2028b"),
        ("x" * 300, "x" * 256 + "...(300 characters)"),
    ],
)
def test_logged_request_values_are_escaped_and_cut(value: str, logged: str) -> None:
    assert printable(value) == logged


def test_an_unexpected_error_is_told_by_type_and_place_never_by_message() -> None:
    def parse(body: bytes) -> int:
        return int(body, 16)

    try:
        parse(b'"password": "aHVudGVyMg=="')
    except ValueError as exc:
        text = unexpected(exc)

    assert text.startswith("ValueError at test_cli.py:")
    assert "parse" in text and "aHVudGVyMg" not in text


@pytest.mark.parametrize("name", ["../..", "a/b", "-secretfs", "x" * 64, "", "secretfs.csi.io."])
def test_a_driver_name_that_is_not_a_csi_name_is_refused(name: str) -> None:
    with pytest.raises(SystemExit) as exit_:
        cli.parser().parse_args(["serve", "--node-id", "n", "--driver-name", name])

    assert exit_.value.code == 2


def test_a_csi_driver_name_is_taken_as_given() -> None:
    args = cli.parser().parse_args(
        ["serve", "--node-id", "n", "--driver-name", "Secrets-2.example.com"]
    )

    assert args.driver_name == "Secrets-2.example.com"
