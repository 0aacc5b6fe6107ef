"""The in-memory file tree of one published volume.

A volume's tree is built whole, off to the side, and never changes once the
filesystem exposes it: the files, their modes and their buffers stay as they
were built until the volume is removed. Every node carries its reply to
getattr and lookup prebuilt, so those requests cost a dictionary lookup.
Inode numbers are never reused, so an inode the kernel still remembers can
never come to name another volume's file.
"""

from __future__ import annotations

import stat
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field

import pyfuse3

from .buffer import SecretBuffer

# Entries and attributes never change while a tree is live, so the kernel
# may cache them for long; a change of tree (removal today, rotation later)
# gets a new set of inode numbers rather than relying on expiry.
CACHE_TIMEOUT = 3600.0


@dataclass(frozen=True, slots=True)
class Owner:
    """The pod whose processes alone may open a volume's files."""

    pod_uid: str
    volume: str  # the volume id, for logs


@dataclass(frozen=True, slots=True)
class Layout:
    """Ownership, permission bits and pod binding for every node of one volume."""

    file_mode: int = 0o444
    dir_mode: int = 0o555
    uid: int = 0
    gid: int = 0
    modes: Mapping[str, int] = field(default_factory=dict)  # per-path file modes
    owner: Owner | None = None

    def mode_of(self, path: str) -> int:
        return self.modes.get(path, self.file_mode)


@dataclass(eq=False, slots=True)
class File:
    inode: int
    buffer: SecretBuffer
    attrs: pyfuse3.EntryAttributes
    # Rotation: a replaced file stays readable through the handles opened
    # before the swap, and its buffer is wiped when the last one closes.
    handles: int = 0
    retired: bool = False
    owner: Owner | None = None


@dataclass(eq=False, slots=True)
class Directory:
    inode: int
    attrs: pyfuse3.EntryAttributes
    entries: dict[bytes, File | Directory] = field(default_factory=dict)
    # Sorted once the tree is complete: readdir offsets index into it.
    listing: list[tuple[bytes, File | Directory]] = field(default_factory=list)

    def seal(self) -> None:
        self.listing = sorted(self.entries.items())


Node = File | Directory


def make_attrs(
    inode: int,
    mode: int,
    size: int,
    uid: int,
    gid: int,
    stamp_ns: int,
    timeout: float = CACHE_TIMEOUT,
) -> pyfuse3.EntryAttributes:
    attrs = pyfuse3.EntryAttributes()
    attrs.st_ino = inode
    attrs.generation = 0
    attrs.st_mode = mode
    attrs.st_nlink = 2 if stat.S_ISDIR(mode) else 1
    attrs.st_uid = uid
    attrs.st_gid = gid
    attrs.st_size = size
    attrs.st_blksize = 4096
    attrs.st_blocks = (size + 511) // 512
    attrs.st_atime_ns = attrs.st_mtime_ns = attrs.st_ctime_ns = stamp_ns
    attrs.entry_timeout = timeout
    attrs.attr_timeout = timeout
    return attrs


def build_tree(
    files: Mapping[str, SecretBuffer],
    layout: Layout,
    allocate: Callable[[], int],
    stamp_ns: int,
    top_inode: int | None = None,
) -> Directory:
    """Build a volume's tree from relative paths (`a`, `dir/b`) to buffers.

    The top directory gets `top_inode` if given. Paths must already be
    validated; a collision between a file and a directory of the same name
    is a programming error and raises ValueError.
    """

    def new_dir(inode: int | None = None) -> Directory:
        inode = allocate() if inode is None else inode
        return Directory(
            inode,
            make_attrs(inode, stat.S_IFDIR | layout.dir_mode, 0, layout.uid, layout.gid, stamp_ns),
        )

    top = new_dir(top_inode)
    for path, buffer in files.items():
        *parents, leaf = path.encode().split(b"/")
        parent = top
        for name in parents:
            child = parent.entries.get(name)
            if child is None:
                child = parent.entries[name] = new_dir()
            if not isinstance(child, Directory):
                raise ValueError(f"path {path!r} nests under a file")
            parent = child
        if leaf in parent.entries:
            raise ValueError(f"path {path!r} appears twice")
        inode = allocate()
        mode = stat.S_IFREG | layout.mode_of(path)
        attrs = make_attrs(inode, mode, len(buffer), layout.uid, layout.gid, stamp_ns)
        parent.entries[leaf] = File(inode, buffer, attrs, owner=layout.owner)
    for directory in walk_dirs(top):
        directory.seal()
    return top


def walk(top: Directory) -> Iterator[Node]:
    """Every node of a tree, `top` included; iterative, for trees of any depth."""
    pending: list[Node] = [top]
    while pending:
        node = pending.pop()
        yield node
        if isinstance(node, Directory):
            pending.extend(node.entries.values())


def walk_dirs(top: Directory) -> Iterator[Directory]:
    return (node for node in walk(top) if isinstance(node, Directory))


def files_by_path(top: Directory) -> dict[bytes, File]:
    """Every file below `top`, by its relative path."""
    found: dict[bytes, File] = {}
    pending: list[tuple[bytes, Directory]] = [(b"", top)]
    while pending:
        prefix, directory = pending.pop()
        for name, child in directory.entries.items():
            if isinstance(child, Directory):
                pending.append((prefix + name + b"/", child))
            else:
                found[prefix + name] = child
    return found
