"""The writable upper layer, each behaviour run on kernel overlayfs and on cowfs
over identical layers: same results and errnos, same merged view, same upper dir."""
from __future__ import annotations

import ctypes
import errno
import os
import socket
import stat
import subprocess
from collections.abc import Callable
from pathlib import Path

import pytest

from .conftest import build_standard_layers, write
from .mountutil import cowfs_mount, kernel_mount
from .treeutil import snapshot, upper_snapshot

KERNEL_OPTS = "redirect_dir=on,metacopy=on"
libc = ctypes.CDLL(None, use_errno=True)


def renameat2(old: Path, new: Path, flags: int) -> None:
    if libc.renameat2(-100, bytes(old), -100, bytes(new), flags) != 0:
        e = ctypes.get_errno()
        raise OSError(e, os.strerror(e))


def attempt(fn: Callable[[], object]) -> object:
    try:
        r = fn()
        return ("ok", r if isinstance(r, (int, str, bytes, bool, type(None))) else None)
    except OSError as e:
        return ("err", errno.errorcode.get(e.errno, e.errno))


def both(tmp_path: Path, script: Callable[[Path], list], *, compare_upper: bool = True,
         kernel_opts: str = KERNEL_OPTS, cowfs_opts: str = "",
         prepare_lowest: Callable[[Path], None] | None = None) -> tuple[Path, Path]:
    """Run script on a kernel mount and a cowfs mount of copies of the standard layers
    (prepare_lowest may add to the bottom layer first)."""
    layers = build_standard_layers(tmp_path / "layers")
    if prepare_lowest is not None:
        prepare_lowest(layers[-1])
    results, views, uppers = [], [], []
    for name, mount, extra in (("kernel", kernel_mount, kernel_opts),
                               ("cowfs", cowfs_mount, cowfs_opts)):
        up, work, mnt = (tmp_path / name / d for d in ("upper", "work", "mnt"))
        for d in (up, work, mnt):
            d.mkdir(parents=True)
        with mount(layers, up, work, mnt, extra) as m:
            results.append(script(m))
            views.append(snapshot(m))
        uppers.append(upper_snapshot(up))
    assert results[1] == results[0]
    assert views[1] == views[0]
    if compare_upper:
        assert uppers[1] == uppers[0]
    return tmp_path / "kernel" / "upper", tmp_path / "cowfs" / "upper"


def dirs(tmp_path: Path) -> tuple[Path, Path, Path]:
    """Fresh upper, work and mount dirs."""
    out = tuple(tmp_path / d for d in ("u", "w", "m"))
    for d in out:
        d.mkdir()
    return out  # type: ignore[return-value]


def test_copy_up_on_append_keeps_metadata(tmp_path):
    def script(m: Path) -> list:
        p = m / "etc/passwd"
        st0 = os.lstat(p)
        with open(p, "a") as f:
            f.write("user:x:1000:1000\n")
        st1 = os.lstat(p)
        return [st0.st_ino == st1.st_ino, oct(st1.st_mode), st1.st_uid,
                os.getxattr(p, "user.tag"), p.read_text()]
    ku, cu = both(tmp_path, script)
    assert os.getxattr(cu / "etc/passwd", "user.tag") == b"base"
    assert os.lstat(cu / "etc").st_mode == os.lstat(ku / "etc").st_mode


def test_read_only_open_does_not_copy_up(tmp_path):
    def script(m: Path) -> list:
        return [(m / "etc/hosts").read_text(), sorted(os.listdir(m / "etc"))]
    ku, cu = both(tmp_path, script)
    assert list(cu.iterdir()) == []


def test_truncate_chmod_chown_utime_xattr(tmp_path):
    def script(m: Path) -> list:
        out = []
        out.append(attempt(lambda: os.truncate(m / "etc/hosts", 4)))
        out.append(attempt(lambda: os.chmod(m / "bin", 0o700)))
        out.append(attempt(lambda: os.chown(m / "etc/shadow", 42, 43)))
        out.append(attempt(lambda: os.utime(m / "app/main.py", ns=(10**18, 2 * 10**18))))
        out.append(attempt(lambda: os.utime(m / "deep/a/top", ns=(5, 6), follow_symlinks=False)))
        out.append(attempt(lambda: os.setxattr(m / "etc/passwd", "user.new", b"v")))
        out.append(attempt(lambda: os.removexattr(m / "etc/passwd", "user.tag")))
        out.append(attempt(lambda: os.removexattr(m / "etc/passwd", "user.none")))
        st = os.lstat(m / "app/main.py")
        out.append((st.st_atime_ns, st.st_mtime_ns))
        return out
    both(tmp_path, script)


def test_metacopy_then_data_write(tmp_path):
    def script(m: Path) -> list:
        p = m / "data/big"
        os.chmod(p, 0o640)
        before = p.read_bytes()[-4:]
        with open(p, "r+b") as f:
            f.seek(10)
            f.write(b"XY")
        return [before, p.read_bytes()[8:14], p.read_bytes()[-4:], oct(os.lstat(p).st_mode)]
    ku, cu = both(tmp_path, script)
    for attr in ("trusted.overlay.metacopy",):
        with pytest.raises(OSError):
            os.getxattr(cu / "data/big", attr)


def test_chmod_is_metadata_only(tmp_path):
    def script(m: Path) -> list:
        os.chmod(m / "data/big", 0o600)
        return [(m / "data/big").read_bytes()[-4:]]
    ku, cu = both(tmp_path, script)
    assert os.getxattr(cu / "data/big", "trusted.overlay.metacopy") is not None
    assert os.lstat(cu / "data/big").st_blocks == 0


def test_deletions_and_opaque_dirs(tmp_path):
    def script(m: Path) -> list:
        return [
            attempt(lambda: os.unlink(m / "etc/hosts")),
            attempt(lambda: os.unlink(m / "etc/nothing")),
            attempt(lambda: os.unlink(m / "etc")),
            attempt(lambda: os.rmdir(m / "deep/a")),
            attempt(lambda: os.rmdir(m / "etc/passwd")),
            attempt(lambda: subprocess.run(["rm", "-rf", str(m / "deep")], check=True) and None),
            attempt(lambda: os.makedirs(m / "deep/a")),
            attempt(lambda: os.listdir(m / "deep/a")),
            attempt(lambda: os.mkdir(m / "etc/hosts")),
            attempt(lambda: os.listdir(m / "etc")),
            attempt(lambda: os.rmdir(m / "app")),
            attempt(lambda: os.mkdir(m / "app")),
        ]
    both(tmp_path, script)


def test_create_kinds(tmp_path):
    def script(m: Path) -> list:
        out = [attempt(lambda: write(m / "new/file", "n") and None),
               attempt(lambda: os.symlink("../etc/passwd", m / "new/link")),
               attempt(lambda: os.mkfifo(m / "new/fifo")),
               attempt(lambda: os.mknod(m / "new/null", stat.S_IFCHR | 0o666, os.makedev(1, 3))),
               attempt(lambda: os.mknod(m / "new/blk", stat.S_IFBLK | 0o600, os.makedev(7, 0))),
               attempt(lambda: os.mkdir(m / "new")),
               attempt(lambda: os.mkdir(m / ("n" * 256))),
               attempt(lambda: os.mkdir(m / ("n" * 255)))]
        s = socket.socket(socket.AF_UNIX)
        try:
            s.bind(str(m / "new/sock"))
        finally:
            s.close()
        return out
    both(tmp_path, script)


def test_whiteout_names_cannot_be_created(tmp_path):
    """Deliberate difference: the kernel lets a program create `.wh.NAME`; cowfs
    reads that name as a whiteout in layers, so it refuses it (EINVAL)."""
    layers = build_standard_layers(tmp_path / "layers")
    up, work, mnt = dirs(tmp_path)
    with cowfs_mount(layers, up, work, mnt) as c:
        for op in (lambda: os.mkdir(c / "etc/.wh.x"), lambda: open(c / ".wh.foo", "w"),
                   lambda: os.rename(c / "etc/hosts", c / "etc/.wh.hosts")):
            with pytest.raises(OSError) as e:
                op()
            assert e.value.errno == errno.EINVAL


def test_rename_files_and_dirs(tmp_path):
    def script(m: Path) -> list:
        return [
            attempt(lambda: os.rename(m / "etc/hosts", m / "etc/hosts2")),
            attempt(lambda: os.rename(m / "app/main.py", m / "main.py")),
            attempt(lambda: os.rename(m / "etc/passwd", m / "etc/shadow")),
            attempt(lambda: os.rename(m / "deep", m / "app/deep")),
            attempt(lambda: sorted(os.listdir(m / "app/deep/a"))),
            attempt(lambda: os.rename(m / "etc", m / "app")),
            attempt(lambda: os.rename(m / "fifo", m / "app")),
            attempt(lambda: os.rename(m / "app", m / "fifo")),
            attempt(lambda: renameat2(m / "etc/pw", m / "etc/hosts2", 1)),
            attempt(lambda: renameat2(m / "etc/pw", m / "etc/hosts2", 2)),
            attempt(lambda: renameat2(m / "etc/pw", m / "etc/nothing", 2)),
            attempt(lambda: renameat2(m / "etc/pw", m / "etc/pw2", 1)),
            attempt(lambda: os.mkdir(m / "empty")),
            attempt(lambda: os.rename(m / "replaced", m / "empty")),
            attempt(lambda: os.rename(m / "gone2", m / "x")),
        ]
    both(tmp_path, script)


def test_cowfs_written_upper_reads_the_same_in_kernel(tmp_path):
    """An upper dir written by cowfs (redirects, metacopy, whiteouts, opaque dirs)
    mounts under the kernel with the same view, and again under cowfs."""
    layers = build_standard_layers(tmp_path / "layers")
    up, work, mnt = dirs(tmp_path)
    with cowfs_mount(layers, up, work, mnt) as c:
        os.rename(c / "deep/a", c / "moved")
        write(c / "moved/b/added", "+")
        os.unlink(c / "moved/top")
        os.chmod(c / "data/big", 0o600)            # metacopy
        os.chown(c / "etc/shadow", 7, 7)
        with open(c / "etc/hosts", "a") as f:      # full copy-up
            f.write("x\n")
        subprocess.run(["rm", "-rf", str(c / "app")], check=True)
        os.makedirs(c / "app/fresh")
        view = snapshot(c)
    assert os.getxattr(up / "moved", "trusted.overlay.redirect") == b"/deep/a"
    with kernel_mount(layers, up, work, mnt, KERNEL_OPTS) as k:
        assert snapshot(k) == view
    with cowfs_mount(layers, up, work, mnt) as c:
        assert snapshot(c) == view


def test_kernel_written_upper_reads_the_same_in_cowfs(tmp_path):
    layers = build_standard_layers(tmp_path / "layers")
    up, work, mnt = dirs(tmp_path)
    with kernel_mount(layers, up, work, mnt, KERNEL_OPTS) as k:
        with open(k / "etc/hosts", "a") as f:
            f.write("more\n")
        os.chmod(k / "data/big", 0o600)
        os.unlink(k / "etc/passwd")
        subprocess.run(["rm", "-rf", str(k / "deep")], check=True)
        os.makedirs(k / "deep/new")
        os.rename(k / "app", k / "application")
        view = snapshot(k)
    with cowfs_mount(layers, up, work, mnt) as c:
        assert snapshot(c) == view


def test_hard_links_across_copy_up(tmp_path):
    def script(m: Path) -> list:
        os.link(m / "etc/shadow", m / "etc/shadow.bak")
        a = os.lstat(m / "etc/shadow")
        b = os.lstat(m / "etc/shadow.bak")
        with open(m / "etc/shadow.bak", "a") as f:
            f.write("more\n")
        return [a.st_ino == b.st_ino, a.st_nlink, (m / "etc/shadow").read_text(),
                os.lstat(m / "etc/shadow").st_nlink]
    both(tmp_path, script)


def test_unlinked_open_file_stays_readable(tmp_path):
    def script(m: Path) -> list:
        out = []
        for name in ("etc/hosts", "app/config.toml"):
            fd = os.open(m / name, os.O_RDONLY)
            os.unlink(m / name)
            # (nlink differs on purpose: the kernel shows the lower inode's 1,
            # cowfs the 0 that POSIX promises after the last unlink)
            out.append(os.pread(fd, 100, 0))
            os.close(fd)
        fd = os.open(m / "new", os.O_CREAT | os.O_RDWR, 0o644)
        os.write(fd, b"data")
        os.unlink(m / "new")
        out.append((os.fstat(fd).st_nlink, os.pread(fd, 10, 0)))
        os.close(fd)
        return out
    both(tmp_path, script)


def _read_write_read(m: Path) -> list:
    r = open(m / "etc/hosts", "rb")
    first = r.read()
    with open(m / "etc/hosts", "r+b") as w:
        w.write(b"CHANGED!")
    r.seek(0)
    second = r.read()
    r.close()
    with open(m / "etc/hosts", "rb") as again:
        third = again.read()
    return [first, second, third]


def test_reader_sees_data_written_after_copy_up(tmp_path):
    # Without passthrough the daemon serves the reader, which follows the copy-up.
    both(tmp_path, _read_write_read, cowfs_opts="passthrough=off")


def test_passthrough_reader_keeps_lower_data_after_copy_up(tmp_path):
    """The documented difference of passthrough=on: a descriptor opened on the
    lower file before another one's copy-up keeps reading the lower copy (the
    kernel reads it itself); the writer and every later open see the upper one."""
    layers = build_standard_layers(tmp_path / "layers")
    up, work, mnt = (tmp_path / d for d in ("upper", "work", "mnt"))
    for d in (up, work, mnt):
        d.mkdir()
    with cowfs_mount(layers, up, work, mnt, "passthrough=on") as m:
        first, second, third = _read_write_read(m)
    assert first == second == b"127.0.0.1 mid\n"
    assert third == b"CHANGED!1 mid\n" == (up / "etc/hosts").read_bytes()


def test_sparse_file_stays_sparse(tmp_path):
    bot = tmp_path / "bot"
    bot.mkdir()
    with open(bot / "sparse", "wb") as f:
        f.truncate(64 << 20)
        f.seek(32 << 20)
        f.write(b"middle")
    up, work, mnt = dirs(tmp_path)
    with cowfs_mount([bot], up, work, mnt) as c:
        with open(c / "sparse", "ab") as f:
            f.write(b"end")
        assert os.lstat(up / "sparse").st_blocks * 512 < (1 << 20)
        with open(c / "sparse", "rb") as f:
            f.seek(32 << 20)
            assert f.read(6) == b"middle"


def test_fsync_and_statfs_of_upper(tmp_path):
    layers = build_standard_layers(tmp_path / "layers")
    up, work, mnt = dirs(tmp_path)
    with cowfs_mount(layers, up, work, mnt) as c:
        fd = os.open(c / "f", os.O_CREAT | os.O_WRONLY, 0o644)
        os.write(fd, b"x")
        os.fsync(fd)
        os.fdatasync(fd)
        os.close(fd)
        assert os.statvfs(c).f_blocks == os.statvfs(up).f_blocks


def test_long_paths(tmp_path):
    layers = build_standard_layers(tmp_path / "layers")
    up, work, mnt = dirs(tmp_path)
    with cowfs_mount(layers, up, work, mnt) as c:
        p = c
        depth = 0
        while len(str(p)) < 3800:
            p = p / ("d" * 200)
            depth += 1
        os.makedirs(p)
        write(p / "leaf", "deep")
        assert (p / "leaf").read_text() == "deep"


def test_modes_under_umask_and_truncating_open(tmp_path):
    def script(m: Path) -> list:
        old = os.umask(0)
        try:
            os.mkdir(m / "wide", 0o777)
            os.close(os.open(m / "wide/f", os.O_CREAT | os.O_WRONLY, 0o666))
            os.umask(0o077)
            os.mkdir(m / "narrow", 0o777)
        finally:
            os.umask(old)
        with open(m / "data/big", "w") as f:     # O_TRUNC of a lower file
            f.write("t")
        return [oct(os.lstat(m / p).st_mode) for p in ("wide", "wide/f", "narrow")] + \
            [(m / "data/big").read_text()]
    both(tmp_path, script)


def test_lower_hard_link_names_after_copy_up(tmp_path):
    """A write through one name of a lower hard link breaks the link, as in the
    kernel's default (index=off): the other names keep the lower file."""
    results = []
    for name, mount in (("kernel", kernel_mount), ("cowfs", cowfs_mount)):
        bot = tmp_path / name / "bot"
        write(bot / "a", "old")
        os.link(bot / "a", bot / "b")
        up, work, mnt = (tmp_path / name / d for d in ("u", "w", "m"))
        for d in (up, work, mnt):
            d.mkdir()
        with mount([bot], up, work, mnt) as c:
            out = []
            sa, sb = os.lstat(c / "a"), os.lstat(c / "b")
            out.append((sa.st_ino == sb.st_ino, sa.st_nlink, sb.st_nlink))   # one inode
            with open(c / "a", "a") as f:
                f.write("+new")
            sa, sb = os.lstat(c / "a"), os.lstat(c / "b")
            out.append((sa.st_ino == sb.st_ino, sa.st_nlink, sb.st_nlink))   # two now
            out.append(((c / "a").read_text(), (c / "b").read_text()))
            os.rename(c / "b", c / "c")
            out.append(((c / "c").read_text(), os.lstat(c / "c").st_nlink))
            os.unlink(c / "c")
            out.append((os.lstat(c / "a").st_nlink, (c / "b").exists()))
        out.append(sorted(os.listdir(up)))
        results.append(out)
    assert results[1] == results[0]
    assert results[1][1] == (False, 1, 2)


def test_upper_hard_links_and_reused_inode_numbers(tmp_path):
    def script(m: Path) -> list:
        out = []
        write(m / "one", "1")
        os.link(m / "one", m / "two")
        os.unlink(m / "one")
        out.append(((m / "two").read_text(), os.lstat(m / "two").st_nlink))
        os.rename(m / "two", m / "three")
        out.append(((m / "three").read_text(), os.lstat(m / "three").st_nlink))
        # churn: the filesystem hands freed inode numbers to new files
        for i in range(30):
            write(m / f"c{i}", str(i))
            fd = os.open(m / f"c{i}", os.O_RDONLY)
            os.unlink(m / f"c{i}")
            write(m / f"d{i}", "d" + str(i))
            out.append((os.pread(fd, 10, 0), (m / f"d{i}").read_text()))
            os.close(fd)
        out.append(sorted(os.listdir(m))[:5])
        return out
    both(tmp_path, script)


def test_upper_dir_moved_into_merged_parent_is_opaque(tmp_path):
    """Found by the differential test: a directory with no lower part moved into a
    merged parent is marked opaque, as overlayfs does."""
    def script(m: Path) -> list:
        os.mkdir(m / "a")
        os.mkdir(m / "app/sub")            # app is merged: sub is made opaque
        os.mkdir(m / "app/sub/inner")      # sub is upper only: inner is not
        os.rename(m / "app/sub/inner", m / "a/inner")
        os.rename(m / "a/inner", m / "moved")
        return sorted(os.listdir(m / "moved"))
    both(tmp_path, script)
