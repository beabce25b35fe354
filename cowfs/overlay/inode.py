"""Inode attributes: what stat shows, and setattr (which copies up first)."""
from __future__ import annotations

import errno
import fcntl
import os
import stat
from typing import TYPE_CHECKING

from .copy_up import copy_up
from .inodes import Node
from .layers import (FS_APPEND_FL, FS_IMMUTABLE_FL, FS_IOC_FSGETXATTR, FS_IOC_FSSETXATTR,
                     FS_IOC_GETFLAGS, FS_IOC_SETFLAGS, inode_flags, lstat_at, open_file_at, statx_at)

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
    """A directory that more than one layer contributes to.  Known without
    reading the directory, as overlayfs knows it at lookup: its layers were
    settled when its node was made (namei), an opaque layer ending them."""
    return len(node.layers) > 1


def getattr_(ov: Overlay, node: Node) -> os.stat_result:
    if node.layer != 0:
        # (the adapter keeps the encoded reply of lower nodes: they never change)
        if node.parent is None:
            return os.fstat(ov.layers[node.layer].fd)  # type: ignore[union-attr]
        return lstat_at(ov.table.dir_fd(node.parent, node.layer), node.name)
    dir_fd, name = upper_ref(ov, node)
    return lstat_at(dir_fd, name)


def shown_nlink(ov: Overlay, node: Node, real: int) -> int:
    """The link count programs see, from the real entry's."""
    if node.unlinked:
        return 0     # (an orphan's real link is work/'s, not a name)
    if node.is_dir and is_merged(ov, node):
        # A merged directory's link count is unknowable without reading every
        # layer; like overlayfs, report 1 ("not counted": find and fts cope).
        return 1
    return real


def statx_(ov: Overlay, node: Node, mask: int) -> bytearray:
    """The struct statx of the entry that holds node now (for its birth time)."""
    if node.parent is None:
        return statx_at(ov.layers[node.layer].fd, b"", mask)  # type: ignore[union-attr]
    if node.layer != 0:
        return statx_at(ov.table.dir_fd(node.parent, node.layer), node.name, mask)
    return statx_at(*upper_ref(ov, node), mask)


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


def check_write_open(ov: Overlay, node: Node, flags: int) -> None:
    """Before a copy-up for a write open: an append-only or immutable file
    refuses it (EPERM) as the real file would, before anything is copied."""
    if not stat.S_ISREG(node.mode):
        return
    fd = _flags_fd(ov, node)
    try:
        attrs = inode_flags(fd)
    except OSError as e:
        if e.errno in (errno.ENOTTY, errno.EOPNOTSUPP, errno.EINVAL):
            return
        raise
    finally:
        os.close(fd)
    if attrs & FS_IMMUTABLE_FL or (attrs & FS_APPEND_FL
                                   and (flags & os.O_TRUNC or not flags & os.O_APPEND)):
        raise OSError(errno.EPERM, "append-only or immutable file")


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
