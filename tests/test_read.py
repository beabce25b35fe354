"""The merged read-only view, compared with kernel overlayfs over the same layers."""
from __future__ import annotations

import errno
import os
import stat

import pytest

from .conftest import write
from .mountutil import cowfs_mount, kernel_mount
from .treeutil import snapshot


def test_merged_view_equals_kernel(layers, scratch):
    with kernel_mount(layers, None, None, scratch("k")) as k, \
            cowfs_mount(layers, None, None, scratch("c")) as c:
        assert snapshot(c) == snapshot(k)
        assert (c / "etc/hosts").read_text() == "127.0.0.1 mid\n"
        assert not (c / "gone").exists()
        assert sorted(os.listdir(c / "replaced")) == ["new"]
        assert sorted(os.listdir(c / "deep/a")) == sorted(os.listdir(k / "deep/a"))


def test_merged_view_with_upper_equals_kernel(layers, scratch):
    ku, kw, cu, cw = (scratch(n) for n in ("ku", "kw", "cu", "cw"))
    with kernel_mount(layers, ku, kw, scratch("k")) as k, \
            cowfs_mount(layers, cu, cw, scratch("c")) as c:
        assert snapshot(c) == snapshot(k)


def test_oci_whiteouts_read_like_kernel_form(tmp_path, scratch):
    top, bot = tmp_path / "top", tmp_path / "bot"
    write(bot / "a/keep", "k")
    write(bot / "a/drop", "d")
    write(bot / "b/old", "o")
    write(bot / "c", "c")
    write(top / "a/.wh.drop")
    write(top / "b/.wh..wh..opq")
    write(top / "b/new", "n")
    write(top / ".wh.c")
    with cowfs_mount([top, bot], None, None, scratch("c")) as c:
        assert sorted(os.listdir(c)) == ["a", "b"]
        assert sorted(os.listdir(c / "a")) == ["keep"]
        assert sorted(os.listdir(c / "b")) == ["new"]
        assert not (c / "c").exists()
        assert not (c / "a/.wh.drop").exists()
        with pytest.raises(OSError) as e:
            os.stat(c / "b/.wh..wh..opq")
        assert e.value.errno == errno.ENOENT


def test_readdir_dots_types_and_rewind(layers, scratch):
    with cowfs_mount(layers, None, None, scratch("c")) as c:
        fd = os.open(c / "etc", os.O_RDONLY | os.O_DIRECTORY)
        try:
            names = [e.name for e in os.scandir(fd)]
            again = [e.name for e in os.scandir(fd)]   # scandir(fd) rewinds
        finally:
            os.close(fd)
        assert sorted(names) == sorted(again) == ["hosts", "hosts.link", "passwd", "pw", "shadow"]
        import subprocess
        out = subprocess.run(["ls", "-a", str(c / "etc")], capture_output=True, text=True).stdout
        assert out.split()[:2] == [".", ".."]
        kinds = {e.name: (e.is_dir(follow_symlinks=False), e.is_symlink())
                 for e in os.scandir(c)}
        assert kinds["etc"] == (True, False)
        assert {e.name: e.is_symlink() for e in os.scandir(c / "etc")}["pw"]


def test_inode_numbers(layers, scratch):
    with cowfs_mount(layers, None, None, scratch("c")) as c:
        seen = {}
        for dirpath, dirnames, filenames in os.walk(c):
            for n in dirnames + filenames:
                st = os.lstat(os.path.join(dirpath, n))
                seen.setdefault(st.st_ino, []).append(os.path.join(dirpath, n))
        # etc/hosts of the middle layer hides the bottom one's hard link partner
        assert [paths for paths in seen.values() if len(paths) > 1] == []
        a, b = os.lstat(c / "etc/hosts.link"), os.lstat(c / "etc/passwd")
        assert a.st_ino != b.st_ino
        assert os.lstat(c / "etc/hosts.link").st_nlink == 2
        dev = os.lstat(c).st_dev
        assert all(os.lstat(p[0]).st_dev == dev for p in seen.values())
        # stable: the same number after the kernel forgot everything
        before = os.lstat(c / "deep/a/b/c/file").st_ino
        with open("/proc/sys/vm/drop_caches", "w") as f:
            f.write("2")
        assert os.lstat(c / "deep/a/b/c/file").st_ino == before


def test_hard_links_in_lower_share_inode(tmp_path, scratch):
    bot = tmp_path / "bot"
    write(bot / "x/one", "data")
    os.link(bot / "x/one", bot / "two")
    with cowfs_mount([bot], None, None, scratch("c")) as c:
        s1, s2 = os.lstat(c / "x/one"), os.lstat(c / "two")
        assert s1.st_ino == s2.st_ino and s1.st_nlink == 2


def test_xattrs_and_private_ones_hidden(layers, scratch):
    opq = layers[1] / "replaced"
    assert os.getxattr(opq, "trusted.overlay.opaque") == b"y"
    with cowfs_mount(layers, None, None, scratch("c")) as c:
        assert os.getxattr(c / "etc/passwd", "user.tag") == b"base"
        assert "user.tag" in os.listxattr(c / "etc/passwd")
        assert not [n for n in os.listxattr(c / "replaced") if "overlay" in n]
        with pytest.raises(OSError) as e:
            os.getxattr(c / "replaced", "trusted.overlay.opaque")
        assert e.value.errno in (errno.ENODATA, errno.EOPNOTSUPP)


def test_private_xattrs_cannot_be_set(layers, scratch):
    """Deliberate difference: the kernel (6.7+) escapes trusted.overlay.* set through
    a mount into trusted.overlay.overlay.*; cowfs refuses them (EPERM)."""
    with cowfs_mount(layers, scratch("u"), scratch("w"), scratch("c")) as c:
        for name in ("trusted.overlay.opaque", "user.overlay.redirect"):
            with pytest.raises(OSError) as e:
                os.setxattr(c / "etc", name, b"y")
            assert e.value.errno == errno.EPERM
            with pytest.raises(OSError) as e:
                os.removexattr(c / "replaced", name)
            assert e.value.errno == errno.EPERM


def test_read_only_mount_refuses_writes(layers, scratch):
    with cowfs_mount(layers, None, None, scratch("c")) as c:
        for op in (lambda: (c / "new").write_text("x"),
                   lambda: open(c / "etc/hosts", "a"),
                   lambda: os.chmod(c / "etc/hosts", 0o600),
                   lambda: os.unlink(c / "etc/hosts"),
                   lambda: os.mkdir(c / "d")):
            with pytest.raises(OSError) as e:
                op()
            assert e.value.errno == errno.EROFS


def test_single_lower_read_only(tmp_path, scratch):
    bot = tmp_path / "bot"
    write(bot / "f", "one")
    with cowfs_mount([bot], None, None, scratch("c")) as c:
        assert (c / "f").read_text() == "one"
        with pytest.raises(OSError) as e:
            (c / "g").write_text("x")
        assert e.value.errno == errno.EROFS


def test_statfs_readlink_access(layers, scratch):
    with cowfs_mount(layers, None, None, scratch("c")) as c:
        assert os.readlink(c / "etc/pw") == "passwd"
        assert os.statvfs(c).f_namemax == 255
        assert os.access(c / "bin", os.R_OK | os.X_OK)
        assert stat.S_ISFIFO(os.lstat(c / "fifo").st_mode)


def test_symlinked_directory_in_layer_is_not_followed(tmp_path, scratch):
    """A layer whose directory is a symlink to outside: the merged view shows the
    symlink, and nothing is read through it by the daemon."""
    outside = tmp_path / "outside"
    write(outside / "secret", "s")
    bot, top = tmp_path / "bot", tmp_path / "top"
    write(bot / "d/real", "r")
    top.mkdir()
    os.symlink(str(outside), top / "d")
    with cowfs_mount([top, bot], None, None, scratch("c")) as c:
        assert os.path.islink(c / "d")
        assert os.readlink(c / "d") == str(outside)


def test_lookup_through_many_layers(tmp_path, scratch):
    layers = []
    for i in range(30):
        d = tmp_path / f"l{i}"
        write(d / "shared" / f"f{i}", str(i))
        layers.append(d)
    write(layers[-1] / "bottom-only", "b")
    with cowfs_mount(layers, None, None, scratch("c")) as c:
        assert len(os.listdir(c / "shared")) == 30
        assert (c / "bottom-only").read_text() == "b"
        assert (c / "shared/f17").read_text() == "17"
