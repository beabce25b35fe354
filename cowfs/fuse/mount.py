"""Mounting a FUSE filesystem without libfuse: mount(2) as root, fusermount3's
fd-passing handshake otherwise."""
from __future__ import annotations

import array
import ctypes
import errno
import os
import shutil
import socket
import stat
import subprocess
from dataclasses import dataclass, field

MS_RDONLY = 1
MS_NOSUID = 2
MS_NODEV = 4
MS_NOEXEC = 8
MS_NOATIME = 1024
MNT_DETACH = 2
_FLAG_BITS = {"ro": MS_RDONLY, "nosuid": MS_NOSUID, "nodev": MS_NODEV,
              "noexec": MS_NOEXEC, "noatime": MS_NOATIME}

_libc = ctypes.CDLL(None, use_errno=True)
_libc.mount.argtypes = [ctypes.c_char_p, ctypes.c_char_p, ctypes.c_char_p, ctypes.c_ulong,
                        ctypes.c_char_p]
_libc.umount2.argtypes = [ctypes.c_char_p, ctypes.c_int]


@dataclass
class MountSpec:
    mountpoint: str
    fsname: str = "cowfs"
    subtype: str = "cowfs"
    flags: set[str] = field(default_factory=set)   # ro nosuid nodev noexec noatime
    allow_other: bool = False
    default_permissions: bool = True
    max_read: int = 0


def _check(ret: int, what: str) -> None:
    if ret != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"{what}: {os.strerror(err)}")


def mount(spec: MountSpec) -> int:
    """Mount and return the connected /dev/fuse fd."""
    if os.geteuid() == 0:
        return _mount_root(spec)
    return _mount_fusermount(spec)


def _kernel_opts(spec: MountSpec) -> list[str]:
    opts = []
    if spec.default_permissions:
        opts.append("default_permissions")
    if spec.allow_other:
        opts.append("allow_other")
    if spec.max_read:
        opts.append(f"max_read={spec.max_read}")
    return opts


def _mount_root(spec: MountSpec) -> int:
    fd = os.open("/dev/fuse", os.O_RDWR | os.O_CLOEXEC)
    try:
        root_mode = stat.S_IFMT(os.stat(spec.mountpoint).st_mode)
        data = ",".join([f"fd={fd}", f"rootmode={root_mode:o}", f"user_id={os.getuid()}",
                         f"group_id={os.getgid()}", *_kernel_opts(spec)])
        flags = 0
        for f in spec.flags:
            flags |= _FLAG_BITS.get(f, 0)
        fstype = f"fuse.{spec.subtype}" if spec.subtype else "fuse"
        _check(_libc.mount(spec.fsname.encode(), os.fsencode(spec.mountpoint), fstype.encode(),
                           flags, data.encode()), f"mount {spec.mountpoint}")
        return fd
    except BaseException:
        os.close(fd)
        raise


def _fusermount() -> str:
    exe = shutil.which("fusermount3") or shutil.which("fusermount")
    if exe is None:
        raise OSError(errno.ENOENT, "fusermount3 is not installed (Debian package fuse3)")
    return exe


def _mount_fusermount(spec: MountSpec) -> int:
    """fusermount3 (setuid root) mounts and hands the fd back over a socket
    named by _FUSE_COMMFD."""
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        opts = [f"fsname={spec.fsname}", f"subtype={spec.subtype}", *_kernel_opts(spec),
                *sorted(spec.flags)]
        env = dict(os.environ, _FUSE_COMMFD=str(theirs.fileno()))
        proc = subprocess.run([_fusermount(), "-o", ",".join(opts), "--", spec.mountpoint],
                              env=env, pass_fds=(theirs.fileno(),), capture_output=True,
                              text=True)
        theirs.close()
        if proc.returncode != 0:
            raise OSError(errno.EPERM, proc.stderr.strip() or "fusermount3 failed")
        fds = array.array("i")
        _msg, anc, _flags, _addr = ours.recvmsg(1, socket.CMSG_LEN(fds.itemsize))
        for level, kind, data in anc:
            if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                fds.frombytes(data[:fds.itemsize])
        if not fds:
            raise OSError(errno.EIO, "fusermount3 passed no /dev/fuse fd")
        os.set_inheritable(fds[0], False)
        return fds[0]
    finally:
        ours.close()
        theirs.close()


def unmount(mountpoint: str, lazy: bool = False) -> None:
    if os.geteuid() == 0:
        _check(_libc.umount2(os.fsencode(mountpoint), MNT_DETACH if lazy else 0),
               f"umount {mountpoint}")
        return
    cmd = [_fusermount(), "-u", *(["-z"] if lazy else []), "--", mountpoint]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise OSError(errno.EBUSY, proc.stderr.strip() or "fusermount3 -u failed")
