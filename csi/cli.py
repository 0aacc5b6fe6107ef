"""The `secretfs-csi` command."""

from __future__ import annotations

import argparse
import errno
import logging
import os
import re
import signal
import sys
import threading
from types import FrameType
from typing import TYPE_CHECKING

from secretfs.csi import __version__, logs
from secretfs.fs import memory

if TYPE_CHECKING:
    from secretfs.fs.session import FuseSession

log = logging.getLogger("secretfs")

DEFAULT_DRIVER_NAME = "secretfs.csi.io"


def parser() -> argparse.ArgumentParser:
    top = argparse.ArgumentParser(
        prog="secretfs-csi",
        description="Kubernetes CSI node plugin that serves Secrets as read-only files "
        "held only in locked memory.",
    )
    top.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    commands = top.add_subparsers(dest="command", required=True)
    serve = commands.add_parser(
        "serve",
        help="run the node plugin",
        description="Serve the CSI Identity and Node services on a unix socket and the "
        "node's SecretFS filesystem. SIGTERM or SIGINT stops serving, wipes "
        "every secret buffer, unmounts the filesystem and exits 0.",
    )
    serve.add_argument(
        "--endpoint",
        default="unix:///csi/csi.sock",
        help="unix socket the kubelet calls, as unix:///path "
        "(default: %(default)s); a stale socket file is replaced",
    )
    serve.add_argument("--node-id", required=True, help="this node's name, returned by NodeGetInfo")
    serve.add_argument(
        "--driver-name",
        default=DEFAULT_DRIVER_NAME,
        type=_driver_name,
        help="CSI driver name; must match the CSIDriver object (default: %(default)s)",
    )
    serve.add_argument(
        "--kubeconfig",
        help="kubeconfig for the API server; without it the in-cluster "
        "service account is used, else $KUBECONFIG or ~/.kube/config",
    )
    serve.add_argument(
        "--kubelet-dir",
        default="/var/lib/kubelet",
        help="the kubelet's root directory; targets must lie under its pods/ "
        "folder (default: %(default)s)",
    )
    serve.add_argument(
        "--auth-mode",
        choices=["pod", "driver"],
        default="pod",
        help="whose credentials read Secrets: `pod` uses the pod's own service-account "
        "token, which the kubelet passes when the CSIDriver sets tokenRequests, so RBAC "
        "decides; `driver` uses the driver's own. Either way only the pod's namespace is "
        "read (default: %(default)s)",
    )
    serve.add_argument(
        "--token-audience",
        default="",
        help="audience of the pod token to use, as listed in the CSIDriver's tokenRequests; "
        '"" is the API server\'s own audience (default: "")',
    )
    serve.add_argument(
        "--pod-binding",
        choices=["on", "off"],
        default="on",
        help="on: only processes of the pod that published a volume may open its files "
        "(the driver needs the host's pid namespace, hostPID); off: file modes alone "
        "decide (default: %(default)s)",
    )
    serve.add_argument(
        "--state-dir",
        default="/run/secretfs",
        help="where the FUSE filesystem is mounted; a dead mount left there by "
        "a crashed run is cleared at start (default: %(default)s)",
    )
    serve.add_argument(
        "--api-retry-budget",
        type=_positive_seconds,
        default=30.0,
        metavar="SECONDS",
        help="how long a publish keeps retrying an unreachable or failing API "
        "server before answering UNAVAILABLE (default: %(default)s)",
    )
    serve.add_argument(
        "--allow-unlocked-memory",
        action="store_true",
        help="UNSAFE: start even if memory cannot be locked (no CAP_IPC_LOCK and a small "
        "memlock limit); secrets may then be written to swap",
    )
    serve.add_argument(
        "--metrics-address",
        metavar="HOST:PORT",
        help="serve Prometheus metrics at /metrics, and /healthz and /readyz, on this "
        "address (default: off)",
    )
    serve.add_argument(
        "--health-address",
        metavar="HOST:PORT",
        help="serve /healthz (FUSE and gRPC answer) and /readyz (and not shutting down) "
        "on this address (default: off); may equal --metrics-address",
    )
    serve.add_argument(
        "--log-format",
        choices=["text", "json"],
        default="text",
        help="text for people, json for one object per line (default: %(default)s)",
    )
    serve.add_argument(
        "-v",
        "--verbose",
        action="count",
        default=0,
        help="debug logs; twice adds the libraries' own debug logs. "
        "Secret data and tokens are never logged",
    )
    return top


# CSI: domain name notation, at most 63 characters, alphanumeric at both ends.
_DRIVER_NAME = re.compile(r"[A-Za-z0-9]([-.A-Za-z0-9]{0,61}[A-Za-z0-9])?")


def _driver_name(text: str) -> str:
    # The name also becomes a folder under the kubelet's plugins/.
    if not _DRIVER_NAME.fullmatch(text):
        raise argparse.ArgumentTypeError(
            f"{text!r} is not a CSI driver name: at most 63 letters, digits, dashes and "
            "dots, beginning and ending with a letter or digit"
        )
    return text


def _positive_seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number of seconds: {text!r}") from None
    if not 0 < value <= 110:
        # The kubelet gives NodePublishVolume two minutes in all.
        raise argparse.ArgumentTypeError("must be more than 0 and at most 110 seconds")
    return value


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = parser().parse_args(argv)
    if args.command == "serve":
        # Before anything can touch a secret: restart so freed memory is wiped.
        memory.restart_with_wiping_allocator(["-m", "secretfs.csi", *argv])
    logs.setup(args.log_format, args.verbose)
    # Hand the interpreter lock over every 0.5 ms instead of every 5: a FUSE
    # thread busy serving a reading pod then delays a publish by little.
    sys.setswitchinterval(0.0005)
    try:
        code = serve(args)
    except StartupError as exc:
        log.error("cannot start: %s", exc)
        return 2
    # Everything is wiped and unmounted. A worker still stuck in a system
    # call on a filesystem that stopped answering (a hung FUSE mount on a
    # target's path) can be neither interrupted nor joined: leave without it.
    logging.shutdown()
    os._exit(code)


# How long calls in progress may take to finish once the driver is told to stop.
STOP_GRACE_SECONDS = 5


class StartupError(Exception):
    """A problem in the environment or the flags; reported without a traceback."""


def prepare_state_dir(path: str) -> None:
    """Make `path` an empty private directory, clearing a mount left by a crashed run."""
    from secretfs.csi import mounts

    if mounts.is_mountpoint(path):
        log.warning("clearing a mount left at %s by an earlier run", path)
        mounts.unmount(path)
    try:
        os.makedirs(path, mode=0o700, exist_ok=True)
        leftovers = os.listdir(path)
    except OSError as exc:
        raise StartupError(f"state dir {path}: {exc.strerror}") from None
    if leftovers:
        raise StartupError(f"state dir {path} is not empty")


def serve(args: argparse.Namespace) -> int:
    from secretfs.csi import metrics, mounts
    from secretfs.csi.identity import IdentityService
    from secretfs.csi.kube import SecretReader, connect
    from secretfs.csi.node import TARGET_DIR_MODE, Auth, NodeService
    from secretfs.csi.server import claim_socket
    from secretfs.csi.server import serve as serve_grpc
    from secretfs.csi.targets import TargetPool
    from secretfs.fs.binding import PodBinding, cgroup2_mount
    from secretfs.fs.buffer import live_bytes
    from secretfs.fs.filesystem import SecretFS
    from secretfs.fs.session import FuseSession

    if os.geteuid() != 0:
        raise StartupError("serve needs root: it mounts a FUSE filesystem and bind mounts")
    if not os.path.exists("/dev/fuse"):
        raise StartupError("/dev/fuse is missing; the container needs the host's /dev/fuse")
    try:
        memory.forbid_dumps()
        locked = memory.lock_all_memory(args.allow_unlocked_memory)
    except memory.MemoryProtectionError as exc:
        raise StartupError(str(exc)) from None
    log.info("memory protection: locked=%s dumpable=%s", locked, memory.is_dumpable())

    # Checks that can fail come before anything is changed on the node.
    try:
        claim_socket(args.endpoint)
    except (OSError, ValueError) as exc:
        raise StartupError(str(exc)) from None
    try:
        client, credentials = connect(args.kubeconfig)
    except Exception as exc:  # the config loaders raise a variety of types
        raise StartupError(f"no usable Kubernetes configuration: {exc}") from None
    reader = SecretReader(client, credentials, budget=args.api_retry_budget)

    # Resolved, because /proc/self/mountinfo names mounts by their real paths.
    state_dir = os.path.realpath(args.state_dir)
    prepare_state_dir(state_dir)
    binding = PodBinding(cgroup_mount=cgroup2_mount()) if args.pod_binding == "on" else None
    session = FuseSession(SecretFS(binding), state_dir)
    try:
        session.start()
    except (OSError, RuntimeError, TimeoutError) as exc:
        raise StartupError(f"cannot mount the FUSE filesystem at {state_dir}: {exc}") from None

    auth = Auth(args.auth_mode, args.token_audience, pod_binding=binding is not None)
    kubelet_dir = os.path.abspath(args.kubelet_dir)
    targets = TargetPool(
        os.path.join(kubelet_dir, "plugins", args.driver_name, "targets"),
        os.path.join(kubelet_dir, "pods"),
        TARGET_DIR_MODE,
    )
    node = NodeService(args.node_id, kubelet_dir, session, reader, auth, targets)
    identity = IdentityService(
        args.driver_name,
        lambda: session.alive and mounts.is_mountpoint(state_dir) and session.responsive(),
    )
    stop = threading.Event()

    def on_signal(signum: int, frame: FrameType | None) -> None:
        log.info("received %s; shutting down", signal.Signals(signum).name)
        stop.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    try:
        server = serve_grpc(args.endpoint, identity, node)
    except (OSError, ValueError) as exc:
        session.stop()
        raise StartupError(str(exc)) from None
    metrics.watch(
        node.published_count,
        live_bytes,
        (lambda: binding.refusals) if binding is not None else (lambda: 0),
    )
    checks = HealthChecks(session, args.endpoint, stop)
    for address in dict.fromkeys(a for a in (args.metrics_address, args.health_address) if a):
        try:
            metrics.serve_http(address, checks.healthy, checks.ready)
        except (OSError, ValueError) as exc:
            server.stop(grace=0)
            session.stop()
            raise StartupError(f"cannot serve HTTP on {address}: {exc}") from None
    try:
        targets.start()
    except OSError as exc:
        log.warning("no target directories made ahead (%s); each publish makes its own", exc)
        targets.close()
    log.info(
        "secretfs %s ready: driver %s on node %s, auth mode %s, pod binding %s",
        __version__,
        args.driver_name,
        args.node_id,
        args.auth_mode,
        args.pod_binding,
    )

    while not stop.wait(1.0):
        if not session.alive:
            log.critical("the FUSE session ended; exiting so the node plugin restarts")
            break
    fuse_died = not stop.is_set()

    reader.cancel()  # publishes waiting to retry the API give up now
    # Calls get a few seconds to finish, then are cancelled; one stuck in a
    # system call (on a hung filesystem) never finishes, so this waits for
    # the server no longer than that.
    server.stop(grace=STOP_GRACE_SECONDS).wait(STOP_GRACE_SECONDS + 1)
    session.stop()  # secrets first: the kubelet's disk may be slow to answer below
    targets.close()
    _remove_socket(args.endpoint)
    log.info("stopped; the %d volumes published at the time are wiped", node.published_count())
    return 1 if fuse_died else 0


class HealthChecks:
    """What /healthz and /readyz report: the driver's own view, end to end."""

    def __init__(self, session: FuseSession, endpoint: str, stopping: threading.Event) -> None:
        self._session = session
        self._endpoint = endpoint
        self._stopping = stopping

    def healthy(self) -> tuple[bool, str]:
        import grpc

        from secretfs.csi.pb import csi_pb2, csi_pb2_grpc

        if not self._session.alive:
            return False, "the FUSE session has ended"
        if not self._session.responsive():
            return False, "the FUSE session does not answer"
        try:
            with grpc.insecure_channel(self._endpoint) as channel:
                reply = csi_pb2_grpc.IdentityStub(channel).Probe(csi_pb2.ProbeRequest(), timeout=3)
        except grpc.RpcError as exc:
            return False, f"the CSI server does not answer Probe ({exc.code().name})"
        if not reply.ready.value:
            return False, "Probe answers not ready"
        return True, "FUSE and the CSI server answer"

    def ready(self) -> tuple[bool, str]:
        if self._stopping.is_set():
            return False, "shutting down"
        return self.healthy()


def _remove_socket(endpoint: str) -> None:
    from secretfs.csi.server import socket_path

    try:
        os.unlink(socket_path(endpoint))
    except OSError as exc:
        if exc.errno != errno.ENOENT:
            log.warning("could not remove the socket: %s", exc.strerror)
