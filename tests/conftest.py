"""Fixtures shared by every tier, and the rule that CI never skips a FUSE test."""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.fakeapi import FakeKubeAPI
from tests.harness import Driver, Kubelet, remove_test_cgroups, unmount_below

# The driver's own identity in the stand-in, and the namespaces it may read.
DRIVER_USER = "system:serviceaccount:secretfs:secretfs-node"
READABLE_NAMESPACES = ("default", "team-a")


def fuse_unavailable() -> str | None:
    if os.geteuid() != 0:
        return "needs root to mount FUSE and bind mounts"
    if not os.path.exists("/dev/fuse"):
        return "needs /dev/fuse"
    if shutil.which("fusermount3") is None and shutil.which("fusermount") is None:
        return "needs the fuse3 package"
    return None


def pytest_runtest_setup(item: pytest.Item) -> None:
    if item.get_closest_marker("fuse") is not None:
        reason = fuse_unavailable()
        if reason:
            pytest.skip(reason)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Iterator[None]:
    outcome = yield
    report = outcome.get_result()
    # Under CI a skipped FUSE test is a failure: the real-mount tier must run.
    if (
        report.skipped
        and os.environ.get("CI") == "true"
        and item.get_closest_marker("fuse") is not None
    ):
        report.outcome = "failed"
        report.longrepr = f"FUSE test skipped under CI=true: {report.longrepr}"


@pytest.fixture(scope="session")
def api() -> Iterator[FakeKubeAPI]:
    workdir = Path(tempfile.mkdtemp(prefix="secretfs-api-"))
    server = FakeKubeAPI(workdir).start()
    try:
        yield server
    finally:
        server.stop()
        shutil.rmtree(workdir, ignore_errors=True)


@pytest.fixture(scope="session")
def driver_token(api: FakeKubeAPI) -> str:
    token = api.add_user(DRIVER_USER)
    for namespace in READABLE_NAMESPACES:
        api.grant(DRIVER_USER, namespace, "get")
    return token


@pytest.fixture(scope="session")
def pod_tokens(api: FakeKubeAPI) -> Callable[[str, str], str]:
    """Service-account tokens for pods; `default` accounts may read their namespace."""
    minted: dict[tuple[str, str], str] = {}
    for namespace in READABLE_NAMESPACES:
        api.grant(f"system:serviceaccount:{namespace}:default", namespace, "get")

    def mint(namespace: str, account: str) -> str:
        if (namespace, account) not in minted:
            minted[namespace, account] = api.add_user(
                f"system:serviceaccount:{namespace}:{account}"
            )
        return minted[namespace, account]

    return mint


@pytest.fixture(scope="session", autouse=True)
def _no_leftover_cgroups() -> Iterator[None]:
    yield
    if fuse_unavailable() is None:
        remove_test_cgroups()


@pytest.fixture(autouse=True)
def _no_leftover_faults(api: FakeKubeAPI) -> Iterator[None]:
    yield
    api.clear_faults()


def make_workdir(parent: str = "/tmp") -> Path:
    """A private directory whose path an unprivileged reader can traverse."""
    workdir = Path(tempfile.mkdtemp(prefix="secretfs-test-", dir=parent))
    workdir.chmod(0o755)
    return workdir


def remove_workdir(workdir: Path) -> None:
    unmount_below(workdir)
    shutil.rmtree(workdir, ignore_errors=True)


@pytest.fixture
def new_driver(
    api: FakeKubeAPI, driver_token: str, pod_tokens: Callable[[str, str], str]
) -> Iterator[Driver]:
    """A driver of the test's own, not yet started: for restarts, kills and flags."""
    workdir = make_workdir()
    kubeconfig = api.write_kubeconfig(workdir / "kubeconfig", driver_token)
    driver = Driver(workdir, kubeconfig, tokens=pod_tokens)
    try:
        yield driver
    finally:
        driver.close()
        remove_workdir(workdir)


@pytest.fixture(scope="module")
def driver(
    api: FakeKubeAPI, driver_token: str, pod_tokens: Callable[[str, str], str]
) -> Iterator[Driver]:
    """One running driver shared by a test module."""
    if fuse_unavailable():
        pytest.skip(fuse_unavailable() or "")
    workdir = make_workdir()
    kubeconfig = api.write_kubeconfig(workdir / "kubeconfig", driver_token)
    shared = Driver(workdir, kubeconfig, tokens=pod_tokens)
    try:
        yield shared.start()
    finally:
        shared.close()
        remove_workdir(workdir)


@pytest.fixture
def kubelet(driver: Driver) -> Kubelet:
    return Kubelet(driver)
