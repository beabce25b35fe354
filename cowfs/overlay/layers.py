"""One layer directory and the only syscalls cowfs makes on layer contents.

Every call here is relative to a directory file descriptor and never follows a
symlink: a layer's contents are untrusted and the daemon runs as root, so a name
inside a layer must never lead outside it.  Directory fds are opened with
O_NOFOLLOW one component at a time, so no path with a symlink in it is ever
handed to the kernel.
"""
from __future__ import annotations

import ctypes
import fcntl
import os
import stat

DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC


class Layer:
    """A layer root: index 0 is the upper layer when there is one."""

    __slots__ = ("index", "path", "fd", "dev", "writable")

    def __init__(self, index: int, path: str, writable: bool) -> None:
        self.index = index
        self.path = path
        # The layer root itself may be named through a symlink by the user (that is
        # the user's choice, not layer content), so follow it here only.
        self.fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        self.dev = os.fstat(self.fd).st_dev
        self.writable = writable

    def close(self) -> None:
        os.close(self.fd)

    def __repr__(self) -> str:
        return f"Layer({self.index}, {self.path!r})"


def lstat_at(dir_fd: int, name: bytes) -> os.stat_result:
    return os.stat(name, dir_fd=dir_fd, follow_symlinks=False)


def lstat_or_none(dir_fd: int, name: bytes) -> os.stat_result | None:
    try:
        return os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
    except FileNotFoundError:
        return None


def open_dir_at(dir_fd: int, name: bytes) -> int:
    return os.open(name, DIR_FLAGS, dir_fd=dir_fd)


def open_file_at(dir_fd: int, name: bytes, flags: int, mode: int = 0o600) -> int:
    return os.open(name, flags | os.O_NOFOLLOW | os.O_CLOEXEC, mode, dir_fd=dir_fd)


def walk_dirs(root_fd: int, components: tuple[bytes, ...]) -> int | None:
    """Open the directory at components below root_fd, or None when it is not one."""
    fd = os.dup(root_fd)
    try:
        for name in components:
            try:
                nfd = open_dir_at(fd, name)
            except (FileNotFoundError, NotADirectoryError, OSError):
                return None
            os.close(fd)
            fd = nfd
        result, fd = fd, -1
        return result
    finally:
        if fd >= 0:
            os.close(fd)


def xattr_path(dir_fd: int, name: bytes) -> bytes:
    """A path for the *xattr calls on one entry, used with follow_symlinks=False.

    The /proc magic link of the parent fd is followed by the kernel without a
    lookup by name; the last component is never followed.  This reaches xattrs of
    symlinks and of O_PATH-only entries alike.
    """
    return b"/proc/self/fd/%d/%s" % (dir_fd, name)


RENAME_NOREPLACE = 1
RENAME_EXCHANGE = 2
RENAME_WHITEOUT = 4
_libc = ctypes.CDLL(None, use_errno=True)
_libc.renameat2.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p,
                            ctypes.c_uint]
_libc.fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64]
_libc.syncfs.argtypes = [ctypes.c_int]
_libc.statx.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_uint,
                        ctypes.c_char_p]
AT_SYMLINK_NOFOLLOW = 0x100
AT_EMPTY_PATH = 0x1000
STATX_SIZE = 256


def _check(ret: int, *names: bytes) -> None:
    if ret != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err), *names)


def renameat2(old_fd: int, old: bytes, new_fd: int, new: bytes, flags: int) -> None:
    """renameat(2) with flags (RENAME_EXCHANGE, RENAME_WHITEOUT...), names in one dir fd each."""
    _check(_libc.renameat2(old_fd, old, new_fd, new, flags), old, None, new)


def fallocate(fd: int, mode: int, offset: int, length: int) -> None:
    """fallocate(2) with its modes (keep size, punch hole, zero range...)."""
    _check(_libc.fallocate(fd, mode, offset, length))


def syncfs(fd: int) -> None:
    _check(_libc.syncfs(fd))


def statx_at(dir_fd: int, name: bytes, mask: int) -> bytearray:
    """The raw struct statx of one entry (never followed; name b"" for dir_fd
    itself): what stat does not tell, such as the birth time."""
    buf = ctypes.create_string_buffer(STATX_SIZE)
    flags = AT_SYMLINK_NOFOLLOW | (AT_EMPTY_PATH if not name else 0)
    _check(_libc.statx(dir_fd, name, flags, mask, buf), name)
    return bytearray(buf.raw)


def make_whiteout(dir_fd: int, name: bytes) -> None:
    """A kernel-form whiteout: character device 0/0, mode 0, as overlayfs makes it."""
    os.mknod(name, stat.S_IFCHR, os.makedev(0, 0), dir_fd=dir_fd)


# Inode flags (lsattr/chattr) and the ioctls that read and set them.
FS_IOC_GETFLAGS = 0x80086601
FS_IOC_SETFLAGS = 0x40086602
FS_IOC_FSGETXATTR = 0x801C581F
FS_IOC_FSSETXATTR = 0x401C5820
FS_IMMUTABLE_FL = 0x10
FS_APPEND_FL = 0x20


def inode_flags(fd: int) -> int:
    return int.from_bytes(fcntl.ioctl(fd, FS_IOC_GETFLAGS, bytes(8))[:4], "little")


def set_inode_flags(fd: int, flags: int) -> None:
    fcntl.ioctl(fd, FS_IOC_SETFLAGS, flags.to_bytes(8, "little"))
