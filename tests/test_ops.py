"""Operations the transport serves beyond the classic set, each run on kernel
overlayfs and on cowfs over identical layers (tests/test_write.py's `both`):
copy_file_range, fallocate, lseek SEEK_DATA/SEEK_HOLE, O_TMPFILE, fsyncdir,
syncfs and the inode-flag ioctls (lsattr/chattr)."""
from __future__ import annotations

import ctypes
import errno
import fcntl
import os
import subprocess
from pathlib import Path

import pytest

from .mountutil import cowfs_mount
from .test_write import attempt, both

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="mounting needs root")

libc = ctypes.CDLL(None, use_errno=True)
libc.fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64]
FALLOC_FL_KEEP_SIZE = 1
FALLOC_FL_PUNCH_HOLE = 2
FS_IOC_GETFLAGS = 0x80086601
FS_IOC_SETFLAGS = 0x40086602
FS_APPEND_FL = 0x20


def _fallocate(fd: int, mode: int, off: int, length: int) -> None:
    if libc.fallocate(fd, mode, off, length) != 0:
        e = ctypes.get_errno()
        raise OSError(e, os.strerror(e))


def _holes(fd: int, size: int) -> list[tuple[str, int]]:
    """The data/hole map of a file, as lseek reports it."""
    out, pos = [], 0
    while pos < size:
        try:
            data = os.lseek(fd, pos, os.SEEK_DATA)
        except OSError as e:
            if e.errno == errno.ENXIO:
                break
            raise
        hole = os.lseek(fd, data, os.SEEK_HOLE)
        out.append(("data", data))
        out.append(("hole", hole))
        pos = hole
    return out


def test_copy_file_range_from_lower_and_within_upper(tmp_path):
    def script(m: Path) -> list:
        res = []
        with open(m / "data/big", "rb") as src, open(m / "data/copy", "wb") as dst:
            res.append(os.copy_file_range(src.fileno(), dst.fileno(), 1 << 20, 0, 0))
        with open(m / "data/copy", "rb") as src, open(m / "etc/hosts", "r+b") as dst:
            res.append(os.copy_file_range(src.fileno(), dst.fileno(), 4, 65536, 3))
        res.append(attempt(lambda: os.copy_file_range(
            os.open(m / "etc/passwd", os.O_RDONLY), os.open(m / "etc/shadow", os.O_RDONLY), 4)))
        res.append((m / "data/copy").read_bytes() == (m / "data/big").read_bytes())
        res.append((m / "etc/hosts").read_bytes())
        return res
    both(tmp_path, script)


def test_fallocate_modes_and_hole_map(tmp_path):
    def script(m: Path) -> list:
        fd = os.open(m / "data/sparse", os.O_CREAT | os.O_RDWR, 0o644)
        try:
            res = [attempt(lambda: _fallocate(fd, 0, 0, 1 << 20))]
            os.pwrite(fd, b"x" * 8192, 0)
            res.append(attempt(lambda: _fallocate(
                fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, 4096 * 64, 4096 * 64)))
            res.append(attempt(lambda: _fallocate(fd, FALLOC_FL_PUNCH_HOLE, 0, 4096)))
            res.append(os.fstat(fd).st_size)
            res.append(_holes(fd, os.fstat(fd).st_size))
        finally:
            os.close(fd)
        ro = os.open(m / "etc/passwd", os.O_RDONLY)
        try:
            res.append(attempt(lambda: _fallocate(ro, 0, 0, 4096)))
        finally:
            os.close(ro)
        return res
    both(tmp_path, script)


def test_lseek_data_and_holes_of_a_sparse_lower_file(tmp_path):
    def script(m: Path) -> list:
        res = []
        for name in ("data/holey", "etc/hosts"):
            fd = os.open(m / name, os.O_RDONLY)
            try:
                res.append(_holes(fd, os.fstat(fd).st_size))
                res.append(attempt(lambda: os.lseek(fd, 1 << 30, os.SEEK_DATA)))
            finally:
                os.close(fd)
        return res

    def layers_hook(bot: Path) -> None:
        with open(bot / "data/holey", "wb") as f:
            f.truncate(1 << 22)
            f.seek(1 << 21)
            f.write(b"middle")
    both(tmp_path, script, prepare_lowest=layers_hook)


def test_o_tmpfile_then_linkat(tmp_path):
    def script(m: Path) -> list:
        res = []
        fd = os.open(m / "etc", os.O_TMPFILE | os.O_RDWR, 0o640)
        try:
            os.write(fd, b"anonymous\n")
            res.append(os.fstat(fd).st_nlink)
            res.append(sorted(os.listdir(m / "etc")))
            d = os.open(m / "etc", os.O_RDONLY | os.O_DIRECTORY)
            try:
                os.link(f"/proc/self/fd/{fd}", "named", dst_dir_fd=d)
                res.append(attempt(lambda: os.link(f"/proc/self/fd/{fd}", "hosts", dst_dir_fd=d)))
            finally:
                os.close(d)
            res.append(os.fstat(fd).st_nlink)
        finally:
            os.close(fd)
        # One never linked leaves nothing behind.
        os.close(os.open(m / "app", os.O_TMPFILE | os.O_WRONLY, 0o600))
        res.append((m / "etc/named").read_bytes())
        res.append(oct(os.stat(m / "etc/named").st_mode))
        res.append(sorted(os.listdir(m / "app")))
        excl = os.open(m / "app", os.O_TMPFILE | os.O_EXCL | os.O_WRONLY, 0o600)
        try:
            res.append(attempt(lambda: os.link(f"/proc/self/fd/{excl}", m / "app/never",
                                               follow_symlinks=True)))
        finally:
            os.close(excl)
        return res
    both(tmp_path, script)


def test_fsyncdir_and_syncfs(tmp_path):
    libc.syncfs.argtypes = [ctypes.c_int]

    def script(m: Path) -> list:
        (m / "etc/new").write_text("x")
        d = os.open(m / "etc", os.O_RDONLY | os.O_DIRECTORY)
        try:
            res = [attempt(lambda: os.fsync(d)), libc.syncfs(d)]
        finally:
            os.close(d)
        low = os.open(m / "deep/a/b", os.O_RDONLY | os.O_DIRECTORY)
        try:
            res.append(attempt(lambda: os.fsync(low)))
        finally:
            os.close(low)
        return res
    both(tmp_path, script)


def test_inode_flags_lsattr_chattr(tmp_path):
    def flags(p: Path) -> int:
        fd = os.open(p, os.O_RDONLY | os.O_NONBLOCK)
        try:
            return int.from_bytes(fcntl.ioctl(fd, FS_IOC_GETFLAGS, bytes(8))[:4], "little")
        finally:
            os.close(fd)

    def script(m: Path) -> list:
        res = [flags(m / "etc/passwd") & FS_APPEND_FL, flags(m / "etc") & FS_APPEND_FL]
        res.append(subprocess.run(["chattr", "+a", str(m / "etc/passwd")],
                                  capture_output=True).returncode)
        res.append(flags(m / "etc/passwd") & FS_APPEND_FL)
        res.append(attempt(lambda: open(m / "etc/passwd", "w")))
        with open(m / "etc/passwd", "a") as f:
            f.write("appended\n")
        res.append(subprocess.run(["chattr", "-a", str(m / "etc/passwd")],
                                  capture_output=True).returncode)
        res.append(flags(m / "etc/passwd") & FS_APPEND_FL)
        res.append((m / "etc/passwd").read_text())
        return res
    both(tmp_path, script)


def test_statx_birth_time_of_the_real_file(tmp_path):
    """statx: the birth time is the real file's (the layer's, or the upper copy's
    after copy-up), with the merged view's inode number and link count."""
    def birth(p: Path) -> list[str]:
        out = subprocess.run(["stat", "-c", "%W %h", str(p)], capture_output=True, text=True,
                             check=True).stdout.split()
        return out

    def script(m: Path) -> list:
        res = [birth(m / "etc/passwd")[1], birth(m / "deep")[1]]
        (m / "etc/passwd").chmod(0o600)
        res.append(birth(m / "etc/passwd")[0] != "0")
        return res
    kernel_upper, cowfs_upper = both(tmp_path, script)
    layers = tmp_path / "layers"
    lower_birth = birth(layers / "l3/etc/shadow")[0]
    assert lower_birth != "0"     # (the filesystem here records birth times)
    with cowfs_mount_same(tmp_path) as m:
        assert birth(m / "etc/shadow")[0] == lower_birth
        assert birth(m / "etc/passwd")[0] == birth(cowfs_upper / "etc/passwd")[0]
        assert birth(m / "deep")[1] == "1"       # merged: not counted, as overlayfs


def cowfs_mount_same(tmp_path: Path):
    """cowfs again over the layers and upper `both` left behind."""
    base = tmp_path / "cowfs"
    lowers = [tmp_path / "layers" / n for n in ("l1", "l2", "l3")]
    return cowfs_mount(lowers, base / "upper", base / "work", base / "mnt")
