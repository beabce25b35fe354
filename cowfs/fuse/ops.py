"""What a filesystem implements to be served by cowfs.fuse, and the records it
exchanges with the transport.

The filesystem names its inodes by its own objects (any hashable object); the
transport gives each one a node id and generation, counts the kernel's lookups
and calls forget(obj) once the kernel holds no reference any more.  Errors are
OSErrors; their errno goes to the kernel.
"""
from __future__ import annotations

import errno
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any


@dataclass(slots=True)
class Ctx:
    """Who asks: the caller's ids as the kernel sends them."""
    uid: int
    gid: int
    pid: int


@dataclass(slots=True)
class Entry:
    """A name's inode: the filesystem's object and its fuse_attr (abi.pack_attr)."""
    obj: Any
    attr: bytes


@dataclass(slots=True)
class Opened:
    """An open file or directory: the filesystem's handle, FOPEN_* flags, and
    the backing file (Session.backing_open) the kernel should read and write
    itself (passthrough)."""
    fh: int
    flags: int = 0
    backing_id: int | None = None


@dataclass(slots=True)
class SetAttr:
    """The changes a SETATTR asks for; None leaves a field alone.  A time of
    NOW means the current time."""
    mode: int | None = None
    uid: int | None = None
    gid: int | None = None
    size: int | None = None
    atime_ns: int | None = None
    mtime_ns: int | None = None
    ctime_ns: int | None = None
    fh: int | None = None
    kill_suidgid: bool = False


NOW = -1


@dataclass(slots=True)
class DirEntry:
    """One readdir entry: next_off is the offset a later READDIR resumes from."""
    name: bytes
    ino: int
    dtype: int
    next_off: int
    entry: Entry | None = None   # READDIRPLUS: the looked-up inode (None: names only)


def _nosys(*_: Any) -> Any:
    raise OSError(errno.ENOSYS, "not implemented")


class Operations:
    """Every request the transport forwards.  The defaults answer ENOSYS, which
    the kernel remembers for most operations and stops sending."""

    root: Any = None

    def init(self, caps: int) -> None:
        """After INIT: caps are the Init flags both sides agreed on."""

    def destroy(self) -> None:
        pass

    def lookup(self, parent: Any, name: bytes, ctx: Ctx) -> Entry | None:
        raise OSError(errno.ENOENT, "no such entry")

    def forget(self, obj: Any) -> None:
        pass

    getattr = setattr = readlink = mknod = mkdir = symlink = unlink = rmdir = _nosys
    rename = link = open = read = write = statfs = release = fsync = _nosys
    setxattr = getxattr = listxattr = removexattr = opendir = releasedir = _nosys
    fsyncdir = access = create = fallocate = lseek = copy_file_range = _nosys
    tmpfile = ioctl = syncfs = statx = _nosys

    def flush(self, obj: Any, fh: int) -> None:
        pass

    def readdir(self, obj: Any, fh: int, offset: int, plus: bool) -> Iterator[DirEntry]:
        """Entries from offset on.  With plus, entries carry their inode; one
        that does not fit the reply is forgotten again unless the kernel
        already holds it."""
        raise OSError(errno.ENOSYS, "not implemented")
