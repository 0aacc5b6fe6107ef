"""The CSI Node service: publish a Secret at a pod's target path, and take it away.

NodePublishVolume goes: validate, check idempotency, send the request for
the Secret, make the target directory (or move one made ahead into place,
see secretfs.csi.targets) while the API server answers, add a volume
directory with the Secret's keys to the node's FUSE filesystem, bind-mount
it onto the target read-only. Each step that changes the node registers its
undo first, so a failure at any step unwinds the steps before it and leaves
no mount, directory or buffer behind.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import threading
from collections.abc import Iterator
from dataclasses import dataclass

import grpc

from secretfs.fs.buffer import SecretBuffer
from secretfs.fs.filesystem import FileSystemClosedError, yield_to_calls
from secretfs.fs.session import FuseSession
from secretfs.fs.tree import Layout, Owner

from . import mounts
from .errors import CsiError
from .kube import FetchError, PendingRead, SecretReader
from .pb import csi_pb2, csi_pb2_grpc
from .targets import TargetPool
from .validation import (
    POD_UID,
    SA_TOKENS,
    PublishSpec,
    check_publish,
    check_target_path,
    check_volume_id,
    pod_token,
)

log = logging.getLogger(__name__)

# The file system type our bind mounts show in /proc/self/mountinfo.
FSTYPE = "fuse.secretfs"

# Directories the driver creates for a target are private to root: the pod
# sees the volume through the mount on top, not through these.
TARGET_DIR_MODE = 0o750


# Locked memory one volume may take. A Secret holds at most 1 MiB; only items
# that list the same key again and again could reach more, and they would let
# one pod exhaust the driver's memory for every pod on the node.
MAX_VOLUME_BYTES = 2 * 1024 * 1024

# Publishes and unpublishes may wait: on the API server for a whole retry
# budget, or on a filesystem along the target's path that does not answer.
# At most this many run at once, and one more is refused at once rather than
# queued (a queued call holds a worker too), so that some of the server's
# workers always remain for probes (see server.WORKERS).
NODE_CALL_LIMIT = 24


@dataclass(frozen=True, slots=True)
class Publication:
    spec: PublishSpec
    host_target: str  # the target with the symlinks of its parents resolved
    volume_dir: str  # the volume's directory name inside the FUSE filesystem
    # Parents of the target that the driver made because they were missing
    # (the kubelet normally makes them), outermost first: unpublish removes
    # those that are empty again.
    made_parents: tuple[str, ...] = ()


class NodeService(csi_pb2_grpc.NodeServicer):  # type: ignore[misc]
    def __init__(
        self,
        node_id: str,
        kubelet_dir: str,
        session: FuseSession,
        reader: SecretReader,
        auth: Auth,
        targets: TargetPool | None = None,
    ) -> None:
        self._node_id = node_id
        self._targets = targets
        self._auth = auth
        self._pods_dir = os.path.join(kubelet_dir, "pods")
        # Where those paths really are: mountinfo records resolved paths.
        self._real_pods_dir = os.path.realpath(self._pods_dir)
        self._node_calls = threading.BoundedSemaphore(NODE_CALL_LIMIT)
        self._session = session
        self._reader = reader
        self._lock = threading.Lock()
        self._published: dict[str, Publication] = {}  # by volume id
        self._at: dict[str, Publication] = {}  # by host target
        self._inflight: set[tuple[str, str]] = set()  # volumes and targets being worked on

    # ---- information ----------------------------------------------------

    def NodeGetInfo(
        self, request: csi_pb2.NodeGetInfoRequest, context: grpc.ServicerContext
    ) -> csi_pb2.NodeGetInfoResponse:
        return csi_pb2.NodeGetInfoResponse(node_id=self._node_id)

    def NodeGetCapabilities(
        self, request: csi_pb2.NodeGetCapabilitiesRequest, context: grpc.ServicerContext
    ) -> csi_pb2.NodeGetCapabilitiesResponse:
        # VOLUME_MOUNT_GROUP: the kubelet hands over the pod's fsGroup instead
        # of trying to chown a read-only volume. No staging, stats or expansion.
        mount_group = csi_pb2.NodeServiceCapability(
            rpc=csi_pb2.NodeServiceCapability.RPC(
                type=csi_pb2.NodeServiceCapability.RPC.VOLUME_MOUNT_GROUP
            )
        )
        return csi_pb2.NodeGetCapabilitiesResponse(capabilities=[mount_group])

    def published_count(self) -> int:
        with self._lock:
            return len(self._published)

    # ---- publish --------------------------------------------------------

    def NodePublishVolume(
        self, request: csi_pb2.NodePublishVolumeRequest, context: grpc.ServicerContext
    ) -> csi_pb2.NodePublishVolumeResponse:
        spec = check_publish(request, self._pods_dir)
        if self._auth.pod_binding and not spec.pod_uid:
            raise CsiError(
                grpc.StatusCode.INVALID_ARGUMENT,
                f"volume_context has no {POD_UID}: pod binding needs podInfoOnMount: true",
            )
        with (
            _unavailable_when_closed(),
            self._node_call(),
            yield_to_calls(),
            self._credentials(request) as credentials,
        ):
            return self._publish_or_refresh(spec, credentials)

    def _publish_or_refresh(
        self, spec: PublishSpec, credentials: SecretBuffer | None
    ) -> csi_pb2.NodePublishVolumeResponse:
        host_target = self._on_host(spec.target_path)
        with self._claim(spec.volume_id, host_target):
            with self._lock:
                existing = self._published.get(spec.volume_id)
                holder = self._at.get(host_target)
            if existing is not None and self._still_published(existing, spec, host_target):
                self._refresh(existing, credentials)
                return csi_pb2.NodePublishVolumeResponse()
            if holder is not None and holder.spec.volume_id != spec.volume_id:
                raise CsiError(
                    grpc.StatusCode.ALREADY_EXISTS,
                    f"target {spec.target_path} already holds volume {holder.spec.volume_id}",
                )
            self._publish(spec, host_target, credentials)
        return csi_pb2.NodePublishVolumeResponse()

    def _on_host(self, target: str) -> str:
        """`target` with the symlinks of its existing ancestors resolved.

        The result must still lie inside the pods folder: a symlink along the
        way must not carry a mount, or a removal, anywhere else.
        """
        parent, name = os.path.split(target)
        real_parent = _resolved(parent)
        if not (real_parent + "/").startswith(self._real_pods_dir + "/"):
            raise CsiError(
                grpc.StatusCode.INVALID_ARGUMENT,
                f"target_path {target} resolves outside {self._pods_dir}",
            )
        return os.path.join(real_parent, name)

    def _still_published(self, existing: Publication, spec: PublishSpec, host_target: str) -> bool:
        """True if a repeated request is already satisfied; raises if it conflicts."""
        if existing.spec.target_path != spec.target_path:
            raise CsiError(
                grpc.StatusCode.FAILED_PRECONDITION,
                f"volume {spec.volume_id} is already published at {existing.spec.target_path}",
            )
        if existing.spec != spec:
            raise CsiError(
                grpc.StatusCode.ALREADY_EXISTS,
                f"volume {spec.volume_id} is published at {spec.target_path} "
                "with different attributes",
            )
        if mounts.is_mountpoint(host_target):
            return True
        # Someone unmounted it behind our back: drop the old copy, publish anew.
        log.warning(
            "volume %s lost its mount at %s; publishing again", spec.volume_id, spec.target_path
        )
        self._forget(existing)
        return False

    @contextlib.contextmanager
    def _credentials(
        self, request: csi_pb2.NodePublishVolumeRequest
    ) -> Iterator[SecretBuffer | None]:
        """The pod's token in pod mode (wiped after the call), None in driver mode."""
        if self._auth.mode != "pod":
            yield None
            return
        token = pod_token(request.volume_context.get(SA_TOKENS), self._auth.audience)
        try:
            yield token
        finally:
            token.wipe()

    def _fetch(
        self, spec: PublishSpec, credentials: SecretBuffer | None
    ) -> dict[str, SecretBuffer]:
        with self._reader.start(spec.namespace, spec.secret_name, credentials) as pending:
            return self._files(pending, spec)

    def _files(self, pending: PendingRead, spec: PublishSpec) -> dict[str, SecretBuffer]:
        """The volume's files, path to buffer: the Secret's keys, or its `items`."""
        try:
            buffers = pending.result()
        except FetchError as exc:
            if exc.code == grpc.StatusCode.NOT_FOUND and spec.optional:
                return {}
            raise CsiError(exc.code, self._explain(exc, spec)) from None
        return select_files(buffers, spec)

    def _explain(self, exc: FetchError, spec: PublishSpec) -> str:
        if exc.code != grpc.StatusCode.PERMISSION_DENIED or self._auth.mode != "pod":
            return str(exc)
        account = f"{spec.namespace}/{spec.service_account or 'default'}"
        return (
            f"service account {account} may not get secret {spec.secret_ref}: grant it the "
            f'verb "get" on resource "secrets" (resourceNames: ["{spec.secret_name}"]) in '
            f"namespace {spec.namespace} with a Role and RoleBinding. API server: {exc}"
        )

    def _layout(self, spec: PublishSpec) -> Layout:
        group = spec.mount_group
        # With an fsGroup the files belong to root and that group, and, as the
        # kubelet does for its own secret volumes, every mode gains group
        # read: the pod reads through the group, never as root.
        group_read = 0 if group is None else 0o040
        default_mode = 0o444 if group is None else 0o440
        file_mode = default_mode if spec.file_mode is None else spec.file_mode
        return Layout(
            file_mode=file_mode | group_read,
            dir_mode=0o555 if group is None else 0o550,
            gid=group or 0,
            modes={i.path: i.mode | group_read for i in spec.items or () if i.mode is not None},
            owner=Owner(spec.pod_uid, spec.volume_id) if self._auth.pod_binding else None,
        )

    def _refresh(self, publication: Publication, credentials: SecretBuffer | None) -> None:
        """A repeated publish (CSIDriver requiresRepublish): rotate if the Secret changed.

        If the Secret cannot be read the volume keeps its current files and
        the call reports why.
        """
        files = self._fetch(publication.spec, credentials)
        if self._session.rotate(publication.volume_dir, files, self._layout(publication.spec)):
            log.info(
                "rotated volume %s to the current %s",
                publication.spec.volume_id,
                publication.spec.secret_ref,
            )

    def _publish(
        self, spec: PublishSpec, host_target: str, credentials: SecretBuffer | None
    ) -> None:
        with contextlib.ExitStack() as undo:
            volume_dir = self._session.reserve()
            undo.callback(self._session.release, volume_dir)
            pending = undo.enter_context(
                self._reader.start(spec.namespace, spec.secret_name, credentials)
            )
            # The target is made ready while the API server answers.
            created = self._prepare_target(spec.target_path, host_target, undo)
            files = self._files(pending, spec)
            # From here on the filesystem owns the buffers, and wipes them if this fails.
            self._session.add_volume(volume_dir, files, self._layout(spec))
            undo.callback(self._session.remove_volume, volume_dir)
            try:
                mounts.bind_read_only(
                    os.path.join(self._session.mountpoint, volume_dir), host_target
                )
            except OSError as exc:
                raise CsiError(
                    grpc.StatusCode.INTERNAL, f"mounting volume {spec.volume_id}: {exc.strerror}"
                ) from None
            undo.pop_all()
        made_parents = tuple(d for d in created if d != host_target)
        publication = Publication(spec, host_target, volume_dir, made_parents)
        with self._lock:
            self._published[spec.volume_id] = publication
            self._at[host_target] = publication

    def _prepare_target(
        self, target_path: str, host_target: str, undo: contextlib.ExitStack
    ) -> list[str]:
        """Make the target directory, or check that the one there can take the mount.

        Returns the directories made, outermost first.
        """
        created = self._make_target(host_target)
        for directory in created:  # the undo runs last-in first-out: innermost first
            undo.callback(_rmdir_quietly, directory)
        if host_target in created:
            return created
        # Only a target that was there already can hold a mount.
        self._clear_stale_mount(host_target)
        if os.path.islink(host_target) or not os.path.isdir(host_target):
            raise CsiError(
                grpc.StatusCode.FAILED_PRECONDITION,
                f"target {target_path} exists and is not a directory",
            )
        if os.listdir(host_target):
            # Unpublish would refuse to remove it: refuse to hide it.
            raise CsiError(
                grpc.StatusCode.FAILED_PRECONDITION, f"target {target_path} is not empty"
            )
        return created

    def _clear_stale_mount(self, target: str) -> None:
        """Remove a SecretFS mount left at `target` by an earlier run of the driver."""
        stacked = mounts.mounts_at(target)
        if not stacked:
            return
        if any(m.fstype != FSTYPE for m in stacked):
            raise CsiError(
                grpc.StatusCode.FAILED_PRECONDITION,
                f"target {target} is already a mount point of another filesystem",
            )
        log.warning("removing a stale SecretFS mount at %s", target)
        self._unmount(target)

    def _make_target(self, target: str) -> list[str]:
        """Create `target` and any missing parents; returns the directories created.

        An existing target is left for the caller to inspect, and so is one
        that cannot even be looked at: a dead FUSE mount answers ENOTCONN.
        """
        if self._targets is not None and self._targets.take(target):
            return [target]
        missing: list[str] = []
        path = target
        while _absent(path):
            missing.append(path)
            path = os.path.dirname(path)
        created: list[str] = []
        try:
            for directory in reversed(missing):
                try:
                    os.mkdir(directory, TARGET_DIR_MODE)
                except FileExistsError:
                    continue  # made meanwhile by another call: not ours to remove
                created.append(directory)
        except OSError as exc:
            for directory in reversed(created):
                _rmdir_quietly(directory)
            raise CsiError(
                grpc.StatusCode.INTERNAL, f"creating target {target}: {exc.strerror}"
            ) from None
        return created

    # ---- unpublish ------------------------------------------------------

    def NodeUnpublishVolume(
        self, request: csi_pb2.NodeUnpublishVolumeRequest, context: grpc.ServicerContext
    ) -> csi_pb2.NodeUnpublishVolumeResponse:
        volume_id = check_volume_id(request.volume_id)
        target = check_target_path(request.target_path, self._pods_dir)
        with _unavailable_when_closed(), self._node_call(), yield_to_calls():
            self._unpublish(volume_id, target)
        return csi_pb2.NodeUnpublishVolumeResponse()

    def _unpublish(self, volume_id: str, target: str) -> None:
        host_target = self._on_host(target)
        with self._claim(volume_id, host_target):
            with self._lock:
                holder = self._at.get(host_target)
            if holder is not None and holder.spec.volume_id != volume_id:
                raise CsiError(
                    grpc.StatusCode.FAILED_PRECONDITION,
                    f"target {target} holds volume {holder.spec.volume_id}, not {volume_id}",
                )
            if any(m.fstype != FSTYPE for m in mounts.mounts_at(host_target)):
                raise CsiError(
                    grpc.StatusCode.FAILED_PRECONDITION,
                    f"target {target} is a mount point of another filesystem",
                )
            self._unmount(host_target)
            if holder is not None:
                self._forget(holder)
            self._remove_target(host_target)
            for directory in reversed(holder.made_parents if holder is not None else ()):
                try:
                    os.rmdir(directory)
                except OSError:
                    break  # not empty, or gone: the rest is someone else's

    def _unmount(self, target: str) -> None:
        try:
            mounts.unmount(target)
        except OSError as exc:
            raise CsiError(
                grpc.StatusCode.INTERNAL, f"unmounting {target}: {exc.strerror}"
            ) from None

    def _forget(self, publication: Publication) -> None:
        self._session.remove_volume(publication.volume_dir)
        with self._lock:
            self._published.pop(publication.spec.volume_id, None)
            if self._at.get(publication.host_target) is publication:
                del self._at[publication.host_target]

    def _remove_target(self, target: str) -> None:
        if os.path.islink(target):
            raise CsiError(
                grpc.StatusCode.FAILED_PRECONDITION, f"target {target} is a symlink; left alone"
            )
        try:
            os.rmdir(target)
        except FileNotFoundError:
            pass
        except OSError as exc:
            if exc.errno != errno.ENOTEMPTY:
                raise CsiError(
                    grpc.StatusCode.INTERNAL, f"removing target {target}: {exc.strerror}"
                ) from None
            # Files SecretFS did not put there: not ours to delete.
            raise CsiError(
                grpc.StatusCode.FAILED_PRECONDITION, f"target {target} is not empty after unmount"
            ) from None

    # ---- unsupported ----------------------------------------------------

    def NodeStageVolume(self, request: object, context: grpc.ServicerContext) -> None:
        raise _unsupported("NodeStageVolume")

    def NodeUnstageVolume(self, request: object, context: grpc.ServicerContext) -> None:
        raise _unsupported("NodeUnstageVolume")

    def NodeExpandVolume(self, request: object, context: grpc.ServicerContext) -> None:
        raise _unsupported("NodeExpandVolume")

    def NodeGetVolumeStats(self, request: object, context: grpc.ServicerContext) -> None:
        raise _unsupported("NodeGetVolumeStats")

    # ---- concurrency ----------------------------------------------------

    @contextlib.contextmanager
    def _node_call(self) -> Iterator[None]:
        """One of the NODE_CALL_LIMIT slots, or RESOURCE_EXHAUSTED at once.

        Waiting for a slot would hold a gRPC worker all the same, and some
        must stay free for probes.
        """
        if not self._node_calls.acquire(blocking=False):
            raise CsiError(
                grpc.StatusCode.RESOURCE_EXHAUSTED,
                f"{NODE_CALL_LIMIT} publishes and unpublishes are already under way; "
                "try again later",
            )
        try:
            yield
        finally:
            self._node_calls.release()

    @contextlib.contextmanager
    def _claim(self, volume_id: str, host_target: str) -> Iterator[None]:
        """Hold a volume and a target for one call; ABORTED if another call has either."""
        keys = {("volume", volume_id), ("target", host_target)}
        with self._lock:
            if any(key in self._inflight for key in keys):
                raise CsiError(
                    grpc.StatusCode.ABORTED,
                    "another operation on this volume or target is in progress",
                )
            self._inflight.update(keys)
        try:
            yield
        finally:
            with self._lock:
                self._inflight.difference_update(keys)


@dataclass(frozen=True, slots=True)
class Auth:
    """Whose identity reads Secrets, and who may open the files."""

    mode: str = "pod"  # "pod": the pod's service-account token; "driver": our own
    audience: str = ""  # the token audience the CSIDriver requests ("" = the API server's)
    pod_binding: bool = True


def select_files(buffers: dict[str, SecretBuffer], spec: PublishSpec) -> dict[str, SecretBuffer]:
    """Map a Secret's keys to file paths: all keys, or the `items` asked for.

    Buffers of keys not asked for are wiped. A key listed twice gets a copy
    of its own, so each file's buffer has a single owner.
    """
    if spec.items is None:
        return buffers
    missing = sorted({item.key for item in spec.items} - set(buffers))
    if missing and not spec.optional:
        for buffer in buffers.values():
            buffer.wipe()
        raise CsiError(
            grpc.StatusCode.NOT_FOUND, f"secret {spec.secret_ref} has no key {missing[0]}"
        )
    size = sum(len(buffers[item.key]) for item in spec.items if item.key in buffers)
    if size > MAX_VOLUME_BYTES:
        for buffer in buffers.values():
            buffer.wipe()
        raise CsiError(
            grpc.StatusCode.RESOURCE_EXHAUSTED,
            f"items would put {size} bytes of secret {spec.secret_ref} in locked memory; "
            f"a volume holds at most {MAX_VOLUME_BYTES}",
        )
    files: dict[str, SecretBuffer] = {}
    used: set[str] = set()
    for item in spec.items:
        if item.key not in buffers:
            continue
        source = buffers[item.key]
        files[item.path] = SecretBuffer.from_bytes(source.view()) if item.key in used else source
        used.add(item.key)
    for key, buffer in buffers.items():
        if key not in used:
            buffer.wipe()
    return files


def _unsupported(name: str) -> CsiError:
    return CsiError(grpc.StatusCode.UNIMPLEMENTED, f"{name} is not supported by SecretFS")


@contextlib.contextmanager
def _unavailable_when_closed() -> Iterator[None]:
    """A call that meets the filesystem shutting down answers UNAVAILABLE."""
    try:
        yield
    except FileSystemClosedError:
        raise CsiError(grpc.StatusCode.UNAVAILABLE, "the driver is shutting down") from None


def _resolved(directory: str) -> str:
    """`directory` with every symlink on the way resolved.

    The kernel does it in one open; a directory that does not exist yet
    leaves it to realpath, which resolves the part that does.
    """
    try:
        fd = os.open(directory, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
    except OSError:
        return os.path.realpath(directory)
    try:
        return os.readlink(f"/proc/self/fd/{fd}")
    finally:
        os.close(fd)


def _absent(path: str) -> bool:
    try:
        os.lstat(path)
    except FileNotFoundError:
        return True
    except OSError:
        pass
    return False


def _rmdir_quietly(path: str) -> None:
    with contextlib.suppress(OSError):
        os.rmdir(path)
