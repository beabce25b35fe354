"""Open files: handles that follow their inode through copy-up."""
from __future__ import annotations

import errno
import os
from typing import TYPE_CHECKING

from .copyup import copy_up, open_lower_data
from .inodes import Node
from .layers import open_file_at

if TYPE_CHECKING:
    from .overlay import Overlay

WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_TRUNC | os.O_APPEND


class Handle:
    __slots__ = ("node", "fd", "gen", "writable")

    def __init__(self, node: Node, fd: int, writable: bool) -> None:
        self.node = node
        self.fd = fd
        self.gen = node.gen
        self.writable = writable


def open_real(ov: Overlay, node: Node, writable: bool, trunc: bool = False) -> int:
    """An fd on the file that holds node's data now: upper, or lower until copy-up."""
    assert node.parent is not None
    if node.unlinked and node.layer == 0:
        # Deleted after the opener looked it up: its name may already stand for a
        # whiteout or another file. Only an open fd still reaches the inode.
        # (A deleted lower file is still where it was, and never changes.)
        if not node.open_fds:
            raise OSError(errno.ENOENT, "deleted")
        return os.open(f"/proc/self/fd/{node.open_fds[0]}",
                       (os.O_RDWR if writable else os.O_RDONLY) | os.O_CLOEXEC)
    if node.layer == 0 and not node.metacopy:
        # O_RDWR also for write-only opens: one handle serves reads after refresh().
        flags = (os.O_RDWR if writable else os.O_RDONLY) | (os.O_TRUNC if trunc else 0)
        return open_file_at(ov.table.dir_fd(node.parent, 0), node.name, flags)
    return open_lower_data(ov, node)


async def open_file(ov: Overlay, node: Node, flags: int) -> Handle:
    if node.is_dir:
        raise OSError(errno.EISDIR, "is a directory")
    writable = bool(flags & WRITE_FLAGS)
    if writable:
        await copy_up(ov, node, data=True, truncate=bool(flags & os.O_TRUNC))
    h = Handle(node, open_real(ov, node, writable, bool(flags & os.O_TRUNC)), writable)
    _track(node, h.fd)
    return h


def _track(node: Node, fd: int) -> None:
    if node.open_fds is None:
        node.open_fds = []
    node.open_fds.append(fd)


def _untrack(node: Node, fd: int) -> None:
    assert node.open_fds is not None
    node.open_fds.remove(fd)
    if not node.open_fds:
        node.open_fds = None


def attach(node: Node, fd: int) -> Handle:
    """A handle for a file just created in the upper layer."""
    h = Handle(node, fd, True)
    _track(node, fd)
    return h


def refresh(ov: Overlay, h: Handle) -> None:
    """Re-resolve a handle opened before its file was copied up (POSIX: readers
    see what writers wrote, whichever layer they opened)."""
    fd = open_real(ov, h.node, h.writable)
    _untrack(h.node, h.fd)
    os.close(h.fd)
    h.fd, h.gen = fd, h.node.gen
    _track(h.node, fd)


def read(ov: Overlay, h: Handle, off: int, size: int) -> bytes:
    if h.gen != h.node.gen:
        refresh(ov, h)
    return os.pread(h.fd, size, off)


def write(ov: Overlay, h: Handle, off: int, data: bytes) -> int:
    if h.gen != h.node.gen:
        refresh(ov, h)
    return os.pwrite(h.fd, data, off)


def fsync(ov: Overlay, h: Handle, datasync: bool) -> None:
    if h.writable and not ov.volatile:
        (os.fdatasync if datasync else os.fsync)(h.fd)


def release(h: Handle) -> None:
    _untrack(h.node, h.fd)
    os.close(h.fd)
