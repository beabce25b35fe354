"""Inode attributes: what stat shows, and setattr (which copies up first)."""
from __future__ import annotations

import errno
import fcntl
import os
import stat
from typing import TYPE_CHECKING

from .copy_up import copy_up
from .inodes import Node
from .format import OPAQUE_MARKER, overlay_xattr
from .layers import lstat_at, lstat_or_none, open_file_at, xattr_path

if TYPE_CHECKING:
    from .super import Overlay


def upper_ref(ov: Overlay, node: Node) -> tuple[int, bytes]:
    """(dir fd, name) of node's upper entry; the root is its own layer root, a
    deleted file still known to the kernel is its orphan in work/."""
    if node.unlinked:
        if node.orphan is None:
            raise OSError(errno.ENOENT, "deleted")
        return ov.work_fd, node.orphan
    if node.parent is None:
        return ov.layers[0].fd, b"."  # type: ignore[union-attr]
    return ov.table.dir_fd(node.parent, 0), node.name


def is_merged(ov: Overlay, node: Node) -> bool:
    """A directory that more than one layer contributes to.  Decided as overlayfs
    does at lookup, without reading the directory: its layers are the ones it is
    a directory in, so only an opaque top layer keeps it from being merged (the
    upper one is checked when the node is made)."""
    if len(node.layers) <= 1 or node.index is not None:
        return len(node.layers) > 1     # (building the index drops opaqued layers)
    top = node.layers[0]
    return top == 0 or not _opaque_in(ov, node, top)


def _opaque_in(ov: Overlay, node: Node, layer: int) -> bool:
    """Is node's directory in this lower layer opaque (xattr, or OCI's marker)?"""
    if node.parent is None:
        dfd, name = ov.layers[layer].fd, b"."  # type: ignore[union-attr]
    else:
        dfd, name = ov.table.dir_fd(node.parent, layer), node.name
    return overlay_xattr(xattr_path(dfd, name), "opaque") == b"y" \
        or lstat_or_none(dfd, name + b"/" + OPAQUE_MARKER) is not None


def getattr_(ov: Overlay, node: Node) -> os.stat_result:
    if node.layer != 0:
        # (the adapter keeps the encoded reply of lower nodes: they never change)
        if node.parent is None:
            return os.fstat(ov.layers[node.layer].fd)  # type: ignore[union-attr]
        return lstat_at(ov.table.dir_fd(node.parent, node.layer), node.name)
    dir_fd, name = upper_ref(ov, node)
    return lstat_at(dir_fd, name)


def setattr_(ov: Overlay, node: Node, *, mode: int | None = None,
                   uid: int | None = None, gid: int | None = None, size: int | None = None,
                   atime_ns: int | None = None, mtime_ns: int | None = None,
                   fd: int | None = None) -> os.stat_result:
    ov.check_writable()
    if node.unlinked and node.layer != 0:
        # A deleted lower file still open: nowhere to keep a change.
        return getattr_(ov, node)
    if size is not None and node.is_dir:
        raise OSError(errno.EISDIR, "is a directory")
    copy_up(ov, node, data=size is not None)
    dir_fd, name = upper_ref(ov, node)
    if (mode is None and uid is None and gid is None and size is None
            and atime_ns is None and mtime_ns is None):
        # A change of nothing (chown(f, -1, -1)) still marks the inode changed.
        os.chown(name, -1, -1, dir_fd=dir_fd, follow_symlinks=False)
    if size is not None:
        if fd is not None:
            os.ftruncate(fd, size)
        else:
            tfd = open_file_at(dir_fd, name, os.O_WRONLY)
            try:
                os.ftruncate(tfd, size)
            finally:
                os.close(tfd)
    if uid is not None or gid is not None:
        os.chown(name, -1 if uid is None else uid, -1 if gid is None else gid,
                 dir_fd=dir_fd, follow_symlinks=False)
    if mode is not None and not stat.S_ISLNK(node.mode):
        os.chmod(b"/proc/self/fd/%d/%s" % (dir_fd, name), stat.S_IMODE(mode))
    if atime_ns is not None or mtime_ns is not None:
        atime_ns, mtime_ns = _complete_times(lstat_at(dir_fd, name), atime_ns, mtime_ns)
        os.utime(name, ns=(atime_ns, mtime_ns), dir_fd=dir_fd, follow_symlinks=False)
    return getattr_(ov, node)


def _complete_times(cur: os.stat_result, atime_ns: int | None,
                    mtime_ns: int | None) -> tuple[int, int]:
    """UTIME_OMIT for one of the two: keep its current value."""
    return (cur.st_atime_ns if atime_ns is None else atime_ns,
            cur.st_mtime_ns if mtime_ns is None else mtime_ns)


def readlink(ov: Overlay, node: Node) -> bytes:
    if node.layer == 0:
        dfd, name = upper_ref(ov, node)
    else:
        assert node.parent is not None
        dfd, name = ov.table.dir_fd(node.parent, node.layer), node.name
    return os.readlink(name, dir_fd=dfd)


def upper_dir_fd(ov: Overlay, node: Node) -> int:
    """The fd of an upper directory (cached by the inode table)."""
    if node.parent is None:
        return ov.layers[0].fd  # type: ignore[union-attr]
    return ov.table.dir_fd(node, 0)


# lsattr/chattr (and the VFS's fileattr calls behind them) on the real entry.
FS_IOC_GETFLAGS = 0x80086601
FS_IOC_SETFLAGS = 0x40086602
FS_IOC_FSGETXATTR = 0x801C581F
FS_IOC_FSSETXATTR = 0x401C5820
ATTR_IOCTLS = {FS_IOC_GETFLAGS: False, FS_IOC_SETFLAGS: True,
               FS_IOC_FSGETXATTR: False, FS_IOC_FSSETXATTR: True}


def _flags_fd(ov: Overlay, node: Node) -> int:
    """An fd on the entry holding node's metadata, for the flags ioctls."""
    if node.is_dir:
        if node.parent is None:
            return os.dup(ov.layers[node.layer].fd)  # type: ignore[union-attr]
        return os.dup(ov.table.dir_fd(node, node.layer))
    if node.layer == 0:
        return open_file_at(*upper_ref(ov, node), os.O_RDONLY | os.O_NONBLOCK)
    assert node.parent is not None
    return open_file_at(ov.table.dir_fd(node.parent, node.layer), node.name,
                        os.O_RDONLY | os.O_NONBLOCK)


def attr_ioctl(ov: Overlay, node: Node, cmd: int, data: bytes, out_size: int) -> bytes:
    """One of ATTR_IOCTLS on the entry that holds node; a change copies the
    entry up first (metadata only), as overlayfs does."""
    if not (node.is_dir or stat.S_ISREG(node.mode)):
        raise OSError(errno.ENOTTY, "no inode flags on this file type")
    if ATTR_IOCTLS[cmd]:
        ov.check_writable()
        copy_up(ov, node, data=False)
    fd = _flags_fd(ov, node)
    try:
        buf = bytearray(data.ljust(max(out_size, 32), b"\0"))
        fcntl.ioctl(fd, cmd, buf, True)
    finally:
        os.close(fd)
    return bytes(buf[:out_size])
