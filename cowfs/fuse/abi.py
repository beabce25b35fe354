"""The kernel's FUSE ABI (include/uapi/linux/fuse.h): opcodes, flags and the
structs cowfs reads and writes, as struct.Struct objects.  Pure data: no I/O.

Little-endian, natural alignment, as the kernel lays the structs out on the
architectures Debian ships; every struct is padded to 8 bytes there.
"""
from __future__ import annotations

import enum
import os
import stat
import struct

KERNEL_VERSION = 7
# The newest minor this module knows; INIT settles on the kernel's if older.
KERNEL_MINOR = 45
# Oldest minor served: Linux 5.10 speaks 7.32.
OLDEST_MINOR = 31
ROOT_ID = 1


class Op(enum.IntEnum):
    LOOKUP = 1
    FORGET = 2
    GETATTR = 3
    SETATTR = 4
    READLINK = 5
    SYMLINK = 6
    MKNOD = 8
    MKDIR = 9
    UNLINK = 10
    RMDIR = 11
    RENAME = 12
    LINK = 13
    OPEN = 14
    READ = 15
    WRITE = 16
    STATFS = 17
    RELEASE = 18
    FSYNC = 20
    SETXATTR = 21
    GETXATTR = 22
    LISTXATTR = 23
    REMOVEXATTR = 24
    FLUSH = 25
    INIT = 26
    OPENDIR = 27
    READDIR = 28
    RELEASEDIR = 29
    FSYNCDIR = 30
    GETLK = 31
    SETLK = 32
    SETLKW = 33
    ACCESS = 34
    CREATE = 35
    INTERRUPT = 36
    BMAP = 37
    DESTROY = 38
    IOCTL = 39
    POLL = 40
    NOTIFY_REPLY = 41
    BATCH_FORGET = 42
    FALLOCATE = 43
    READDIRPLUS = 44
    RENAME2 = 45
    LSEEK = 46
    COPY_FILE_RANGE = 47
    SETUPMAPPING = 48
    REMOVEMAPPING = 49
    SYNCFS = 50
    TMPFILE = 51
    STATX = 52
    COPY_FILE_RANGE_64 = 53


class Notify(enum.IntEnum):
    POLL = 1
    INVAL_INODE = 2
    INVAL_ENTRY = 3
    STORE = 4
    RETRIEVE = 5
    DELETE = 6


class Init(enum.IntFlag):
    """INIT flags; bits 32-63 travel in flags2 (with INIT_EXT)."""
    ASYNC_READ = 1 << 0
    POSIX_LOCKS = 1 << 1
    ATOMIC_O_TRUNC = 1 << 3
    EXPORT_SUPPORT = 1 << 4
    BIG_WRITES = 1 << 5
    DONT_MASK = 1 << 6
    SPLICE_WRITE = 1 << 7
    SPLICE_MOVE = 1 << 8
    SPLICE_READ = 1 << 9
    FLOCK_LOCKS = 1 << 10
    HAS_IOCTL_DIR = 1 << 11
    AUTO_INVAL_DATA = 1 << 12
    DO_READDIRPLUS = 1 << 13
    READDIRPLUS_AUTO = 1 << 14
    ASYNC_DIO = 1 << 15
    WRITEBACK_CACHE = 1 << 16
    NO_OPEN_SUPPORT = 1 << 17
    PARALLEL_DIROPS = 1 << 18
    HANDLE_KILLPRIV = 1 << 19
    POSIX_ACL = 1 << 20
    ABORT_ERROR = 1 << 21
    MAX_PAGES = 1 << 22
    CACHE_SYMLINKS = 1 << 23
    NO_OPENDIR_SUPPORT = 1 << 24
    EXPLICIT_INVAL_DATA = 1 << 25
    MAP_ALIGNMENT = 1 << 26
    SUBMOUNTS = 1 << 27
    HANDLE_KILLPRIV_V2 = 1 << 28
    SETXATTR_EXT = 1 << 29
    INIT_EXT = 1 << 30
    SECURITY_CTX = 1 << 32
    HAS_INODE_DAX = 1 << 33
    CREATE_SUPP_GROUP = 1 << 34
    HAS_EXPIRE_ONLY = 1 << 35
    DIRECT_IO_ALLOW_MMAP = 1 << 36
    PASSTHROUGH = 1 << 37
    NO_EXPORT_SUPPORT = 1 << 38
    HAS_RESEND = 1 << 39


class Fopen(enum.IntFlag):
    DIRECT_IO = 1 << 0
    KEEP_CACHE = 1 << 1
    NONSEEKABLE = 1 << 2
    CACHE_DIR = 1 << 3
    STREAM = 1 << 4
    NOFLUSH = 1 << 5
    PARALLEL_DIRECT_WRITES = 1 << 6
    PASSTHROUGH = 1 << 7


# fuse_setattr_in.valid
FATTR_MODE = 1 << 0
FATTR_UID = 1 << 1
FATTR_GID = 1 << 2
FATTR_SIZE = 1 << 3
FATTR_ATIME = 1 << 4
FATTR_MTIME = 1 << 5
FATTR_FH = 1 << 6
FATTR_ATIME_NOW = 1 << 7
FATTR_MTIME_NOW = 1 << 8
FATTR_LOCKOWNER = 1 << 9
FATTR_CTIME = 1 << 10
FATTR_KILL_SUIDGID = 1 << 11

GETATTR_FH = 1 << 0
FSYNC_FDATASYNC = 1 << 0
IOCTL_UNRESTRICTED = 1 << 1
IOCTL_DIR = 1 << 4

# /dev/fuse ioctls: _IOR(229, 0, u32), _IOW(229, 1, fuse_backing_map), _IOW(229, 2, u32)
DEV_IOC_CLONE = 0x8004E500
DEV_IOC_BACKING_OPEN = 0x4010E501
DEV_IOC_BACKING_CLOSE = 0x4004E502
MAX_STACK_DEPTH = 1   # the backing files are on plain filesystems

IN_HEADER = struct.Struct("<IIQQIIIHH")       # len opcode unique nodeid uid gid pid extlen pad
OUT_HEADER = struct.Struct("<IiQ")            # len error unique
_ATTR = "QQQQQQIIIIIIIIII"
ATTR = struct.Struct("<" + _ATTR)
ENTRY_OUT = struct.Struct("<QQQQII" + _ATTR)  # nodeid generation entry_valid attr_valid nsecs attr
ATTR_OUT = struct.Struct("<QII" + _ATTR)      # attr_valid nsec dummy attr
ENTRY_HEAD = struct.Struct("<QQQQII")
ATTR_HEAD = struct.Struct("<QII")

INIT_IN = struct.Struct("<IIII")               # major minor max_readahead flags (+ flags2 at 16)
INIT_OUT = struct.Struct("<IIIIHHIIHHIIH22x")  # ... flags2 max_stack_depth request_timeout
FORGET_IN = struct.Struct("<Q")
BATCH_FORGET_IN = struct.Struct("<II")
FORGET_ONE = struct.Struct("<QQ")
GETATTR_IN = struct.Struct("<IIQ")
SETATTR_IN = struct.Struct("<IIQQQQQQIIIIIIII")
MKNOD_IN = struct.Struct("<IIII")              # mode rdev umask padding
MKDIR_IN = struct.Struct("<II")                # mode umask
RENAME_IN = struct.Struct("<Q")
RENAME2_IN = struct.Struct("<QII")
LINK_IN = struct.Struct("<Q")
OPEN_IN = struct.Struct("<II")                 # flags open_flags
CREATE_IN = struct.Struct("<IIII")             # flags mode umask open_flags
OPEN_OUT = struct.Struct("<QIi")               # fh open_flags backing_id
RELEASE_IN = struct.Struct("<QIIQ")
FLUSH_IN = struct.Struct("<QIIQ")
READ_IN = struct.Struct("<QQIIQII")            # fh offset size read_flags lock_owner flags pad
WRITE_IN = struct.Struct("<QQIIQII")
WRITE_OUT = struct.Struct("<II")
FSYNC_IN = struct.Struct("<QII")
STATFS_OUT = struct.Struct("<QQQQQIIII24x")
SETXATTR_IN_EXT = struct.Struct("<IIII")       # size flags setxattr_flags padding
SETXATTR_IN_OLD = struct.Struct("<II")
GETXATTR_IN = struct.Struct("<II")
GETXATTR_OUT = struct.Struct("<II")
ACCESS_IN = struct.Struct("<II")
INTERRUPT_IN = struct.Struct("<Q")
FALLOCATE_IN = struct.Struct("<QQQII")
LSEEK_IN = struct.Struct("<QQII")
LSEEK_OUT = struct.Struct("<Q")
COPY_FILE_RANGE_IN = struct.Struct("<QQQQQQQ")  # fh_in off_in nodeid_out fh_out off_out len flags
IOCTL_IN = struct.Struct("<QIIQII")             # fh flags cmd arg in_size out_size
IOCTL_OUT = struct.Struct("<iIII")
DIRENT = struct.Struct("<QQII")                 # ino off namelen type
NOTIFY_INVAL_INODE = struct.Struct("<Qqq")
NOTIFY_INVAL_ENTRY = struct.Struct("<QII")
BACKING_MAP = struct.Struct("<iIQ")             # fd flags padding
STATX_IN = struct.Struct("<IIQII")              # getattr_flags reserved fh sx_flags sx_mask
# fuse_statx_out: attr_valid nsec flags spare[2], then fuse_statx
STATX_OUT_HEAD = struct.Struct("<QII16x")
STATX = struct.Struct("<IIQIIIH2xQQQQqI4xqI4xqI4xqI4xIIII112x")


def pack_attr(ino: int, st: os.stat_result, nlink: int | None = None) -> bytes:
    """fuse_attr for a stat result, st_ino replaced by the filesystem's number."""
    return ATTR.pack(ino, st.st_size, st.st_blocks, int(st.st_atime), int(st.st_mtime),
                     int(st.st_ctime), st.st_atime_ns % 1_000_000_000,
                     st.st_mtime_ns % 1_000_000_000, st.st_ctime_ns % 1_000_000_000,
                     st.st_mode, st.st_nlink if nlink is None else nlink, st.st_uid,
                     st.st_gid, _encode_dev(st.st_rdev), st.st_blksize, 0)


def _encode_dev(rdev: int) -> int:
    """The kernel's new_encode_dev: the 32-bit form FUSE carries."""
    major, minor = os.major(rdev), os.minor(rdev)
    return (minor & 0xFF) | (major << 8) | ((minor & ~0xFF) << 12)


def decode_dev(rdev: int) -> int:
    major = (rdev & 0xFFF00) >> 8
    minor = (rdev & 0xFF) | ((rdev >> 12) & 0xFFF00)
    return os.makedev(major, minor)


def dirent_type(mode: int) -> int:
    """DT_* of a mode, as readdir reports it."""
    return stat.S_IFMT(mode) >> 12


def align8(n: int) -> int:
    return (n + 7) & ~7


def pack_dirent(ino: int, off: int, name: bytes, dtype: int) -> bytes:
    pad = align8(DIRENT.size + len(name)) - DIRENT.size - len(name)
    return DIRENT.pack(ino, off, len(name), dtype) + name + b"\0" * pad


def direntplus_size(name: bytes) -> int:
    return align8(ENTRY_OUT.size + DIRENT.size + len(name))


# struct statx and fuse_statx share their first 144 bytes (mask to dev_minor).
STATX_SHARED = 144
STATX_NLINK = struct.Struct("<I")       # at offset 16
STATX_INO = struct.Struct("<Q")         # at offset 32


def statx_nlink(sx: bytes | bytearray) -> int:
    return STATX_NLINK.unpack_from(sx, 16)[0]


def pack_statx(sx: bytearray, ino: int, nlink: int) -> bytes:
    """fuse_statx from a struct statx, with the filesystem's inode number and
    link count; the device fields are the kernel's to fill."""
    STATX_INO.pack_into(sx, 32, ino)
    STATX_NLINK.pack_into(sx, 16, nlink)
    return bytes(sx[:STATX_SHARED]) + bytes(STATX.size - STATX_SHARED)
