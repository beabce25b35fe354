"""Open files: handles that follow their inode through copy-up."""
from __future__ import annotations

import errno
import os
from typing import TYPE_CHECKING

from .copy_up import copy_up, open_lower_data
from .inode import check_write_open, upper_ref
from .inodes import Node
from . import layers
from .layers import open_file_at

if TYPE_CHECKING:
    from .super import Overlay

WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_TRUNC | os.O_APPEND


class Handle:
    __slots__ = ("node", "fd", "gen", "writable", "append")

    def __init__(self, node: Node, fd: int, writable: bool, append: bool = False) -> None:
        self.node = node
        self.fd = fd
        self.gen = node.gen
        self.writable = writable
        self.append = append     # (an append-only file refuses other write opens)


def open_real(ov: Overlay, node: Node, writable: bool, trunc: bool = False,
              append: bool = False) -> int:
    """An fd on the file that holds node's data now: upper, or lower until copy-up."""
    assert node.parent is not None
    if node.layer == 0 and not node.metacopy:
        # O_RDWR also for write-only opens: one handle serves reads after refresh().
        flags = (os.O_RDWR if writable else os.O_RDONLY) | (os.O_TRUNC if trunc else 0) \
            | (os.O_APPEND if append else 0)
        # (a deleted file is reached as its orphan, never by a name that may
        # already stand for a whiteout or another file)
        return ov.table.opening(open_file_at, *upper_ref(ov, node), flags)
    return ov.table.opening(open_lower_data, ov, node)


def open_file(ov: Overlay, node: Node, flags: int) -> Handle:
    if node.is_dir:
        raise OSError(errno.EISDIR, "is a directory")
    writable = bool(flags & WRITE_FLAGS)
    if writable and (node.layer != 0 or node.metacopy):
        check_write_open(ov, node, flags)
    if writable:
        copy_up(ov, node, data=True, truncate=bool(flags & os.O_TRUNC))
    append = bool(flags & os.O_APPEND)
    return Handle(node, open_real(ov, node, writable, bool(flags & os.O_TRUNC), append),
                  writable, append)


def attach(node: Node, fd: int) -> Handle:
    """A handle for a file just created in the upper layer."""
    return Handle(node, fd, True)


def refresh(ov: Overlay, h: Handle) -> None:
    """Re-resolve a handle opened before its file was copied up (POSIX: readers
    see what writers wrote, whichever layer they opened)."""
    fd = open_real(ov, h.node, h.writable, append=h.append)
    # The same fd number now names the new file: a read running unlocked on
    # the old one finishes there, and nothing else can get that number.
    os.dup2(fd, h.fd, inheritable=False)
    os.close(fd)
    h.gen = h.node.gen


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
        ov.unlocked(os.fdatasync if datasync else os.fsync, h.fd)


def _writable(h: Handle) -> None:
    if not h.writable:
        raise OSError(errno.EBADF, "not open for writing")


def fallocate(ov: Overlay, h: Handle, mode: int, offset: int, length: int) -> None:
    _writable(h)
    ov.unlocked(layers.fallocate, h.fd, mode, offset, length)


def copy_range(ov: Overlay, src: Handle, src_off: int, dst: Handle, dst_off: int,
               length: int) -> int:
    """copy_file_range between the real files: a reflink or an in-kernel copy
    where their filesystems can."""
    _writable(dst)
    return ov.unlocked(os.copy_file_range, src.fd, dst.fd, length, src_off, dst_off)


def syncfs(ov: Overlay) -> None:
    if ov.upper is not None and not ov.volatile:
        ov.unlocked(layers.syncfs, ov.upper.fd)


def release(h: Handle) -> None:
    os.close(h.fd)
