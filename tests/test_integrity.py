"""Nothing lost, nothing escaped (issue #10): lower hard links after the kernel
forgets them, copy-ups that cannot keep what they copy, a full upper layer,
POSIX ACLs, an fd limit, exclusive use of upper and work, mountpoints inside
layers, and a daemon killed with SIGKILL.  Each compared with the kernel where
the kernel has the behaviour."""
from __future__ import annotations

import contextlib
import errno
import os
import signal
import struct
import subprocess
import sys
import textwrap
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from cowfs.overlay import Overlay, file
from cowfs.overlay.params import parse_mount_options
from tests.mountutil import COWFS, cowfs_mount, kernel_mount, mounted, overlay_opts, unmount
from tests.overlaydiff import cowfs_pid, stray_work_entries
from tests.test_core import walk
from tests.test_security import root as shared  # a dir other users can traverse

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="mounting needs root")

MiB = 1 << 20
USER = 1001


def _dirs(base: Path, *names: str) -> list[Path]:
    out = []
    for n in names:
        (base / n).mkdir(parents=True, exist_ok=True)
        out.append(base / n)
    return out


def _core(base: Path, lower: Path | str) -> Overlay:
    up, work, mnt = _dirs(base, "u", "w", "m")
    return Overlay(parse_mount_options(
        [f"lowerdir={lower},upperdir={up},workdir={work}"], str(mnt)))


def _read(ov: Overlay, path: str) -> bytes:
    h = file.open_file(ov, walk(ov, path), os.O_RDONLY)
    try:
        return os.pread(h.fd, 100, 0)
    finally:
        file.release(h)


# ------------------------------------------------------- lower hard links
def test_lower_hardlink_names_after_the_kernel_forgets(tmp_path: Path) -> None:
    # Was: after a forget, both names showed the old lower file although the
    # change was in the upper layer.  The core without a mount: forget = drop.
    lower = tmp_path / "l"
    (lower / "d").mkdir(parents=True)
    (lower / "d" / "a").write_bytes(b"old\n")
    os.link(lower / "d" / "a", lower / "d" / "b")
    ov = _core(tmp_path, lower)
    try:
        with ov.lock:
            walk(ov, "d/b")
            h = file.open_file(ov, walk(ov, "d/a"), os.O_WRONLY | os.O_APPEND)
            os.pwrite(h.fd, b"new\n", 4)
            file.release(h)
            for node in [n for n in ov.table.nodes.values() if n is not ov.root]:
                ov.table.drop(node)
            assert _read(ov, "d/b") == b"old\n"
            assert _read(ov, "d/a") == b"old\nnew\n"
            assert sorted(os.listdir(tmp_path / "u" / "d")) == ["a"]
    finally:
        ov.close()


# ------------------------------------------------ xattrs a copy-up must keep
def _cap_v2(bits: int) -> bytes:
    """A security.capability value (VFS_CAP_REVISION_2, effective)."""
    return struct.pack("<IIIII", 0x02000001, bits, 0, 0, 0)


def test_copy_up_fails_rather_than_drop_security_capability(shared: Path) -> None:
    # A daemon that may not set security.capability (not root: EPERM) must fail
    # the copy-up, as overlayfs does, not make a copy without the capability.
    lower = shared / "l"
    lower.mkdir()
    (lower / "ping").write_bytes(b"#!\n")
    (lower / "plain").write_bytes(b"p\n")
    for f in ("ping", "plain"):            # a rootless daemon's own layer
        os.chown(lower / f, USER, USER)
    os.chmod(lower / "ping", 0o755)
    os.setxattr(lower / "ping", "security.capability", _cap_v2(1 << 13))
    for d in ("u", "w", "m"):
        (shared / d).mkdir()
        os.chown(shared / d, USER, USER)
    code = f"""
        import errno, os, sys
        sys.path.insert(0, {str(Path(__file__).parent.parent)!r})
        from cowfs.overlay import Overlay
        from cowfs.overlay.copy_up import copy_up
        from cowfs.overlay.namei import lookup
        from cowfs.overlay.params import parse_mount_options
        os.setgid({USER}); os.setuid({USER})
        t = {str(shared)!r}
        ov = Overlay(parse_mount_options(
            [f"lowerdir={{t}}/l,upperdir={{t}}/u,workdir={{t}}/w"], t + "/m"))
        with ov.lock:
            copy_up(ov, lookup(ov, ov.root, b"plain"))
            try:
                copy_up(ov, lookup(ov, ov.root, b"ping"))
                print("copied")
            except OSError as e:
                print(errno.errorcode[e.errno])
        print(sorted(os.listdir(t + "/u")), sorted(os.listdir(t + "/w/work")))
    """
    res = subprocess.run([sys.executable, "-c", textwrap.dedent(code)],
                         capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, res.stderr
    assert res.stdout.split("\n")[:2] == ["EPERM", "['plain'] []"], res.stdout


# ------------------------------------------------------------ a full upper
@contextlib.contextmanager
def _small_fs(path: Path, size: str = "20M") -> Iterator[Path]:
    """A small ext4 loop-mounted at path (for ENOSPC)."""
    img = path.with_suffix(".img")
    subprocess.run(["truncate", "-s", size, str(img)], check=True)
    subprocess.run(["mkfs.ext4", "-q", str(img)], check=True)
    path.mkdir()
    subprocess.run(["mount", "-o", "loop", str(img), str(path)], check=True)
    try:
        yield path
    finally:
        unmount(path)
        img.unlink()


def _free_blocks(path: Path) -> int:
    return os.statvfs(path).f_bfree


@pytest.mark.parametrize("side", ["kernel", "cowfs"])
def test_enospc_copy_up_leaves_nothing(tmp_path: Path, side: str) -> None:
    lower, = _dirs(tmp_path, "l")
    with open(lower / "big", "wb") as f:
        for _ in range(30):
            f.write(b"B" * MiB)
    (lower / "small").write_bytes(b"s\n")
    with _small_fs(tmp_path / "fs") as fs:
        up, work = _dirs(fs, "u", "w")
        mnt = tmp_path / "mnt"
        mount = kernel_mount if side == "kernel" else cowfs_mount
        with mount([lower], up, work, mnt):
            free = _free_blocks(fs)
            with pytest.raises(OSError) as e:
                with open(mnt / "big", "ab") as f:
                    f.write(b"x")
            assert e.value.errno == errno.ENOSPC
            # The partial copy is gone at once: the space is free again.
            assert _free_blocks(fs) >= free - 8
            assert os.listdir(work / "work") == [] if side == "kernel" \
                else stray_work_entries(work) == []
            with open(mnt / "small", "ab") as f:
                f.write(b"more\n")
            assert (mnt / "small").read_bytes() == b"s\nmore\n"
            assert (mnt / "big").stat().st_size == 30 * MiB
        assert sorted(os.listdir(up)) == ["small"]


# ----------------------------------------------------------- POSIX ACLs
ACL_USER_OBJ, ACL_USER, ACL_GROUP_OBJ, ACL_MASK, ACL_OTHER = 1, 2, 4, 0x10, 0x20
ACL = "system.posix_acl_access"


def _acl(owner: int, user_perm: int, group: int, other: int) -> bytes:
    """system.posix_acl_access: owner/group/other bits and u:USER:user_perm."""
    undefined = 0xFFFFFFFF
    ents = [(ACL_USER_OBJ, owner, undefined), (ACL_USER, user_perm, USER),
            (ACL_GROUP_OBJ, group, undefined), (ACL_MASK, 7, undefined),
            (ACL_OTHER, other, undefined)]
    return struct.pack("<I", 2) + b"".join(struct.pack("<HHI", *e) for e in ents)


def _acl_layer(lower: Path) -> None:
    for name, mode, acl in (("noread", 0o644, _acl(6, 0, 4, 4)),
                            ("nowrite", 0o666, _acl(6, 4, 6, 6)),
                            ("granted", 0o600, _acl(6, 6, 0, 0))):
        (lower / name).write_bytes(name.encode() + b"\n")
        os.chmod(lower / name, mode)
        os.setxattr(lower / name, ACL, acl)


def _as_user(mnt: Path) -> list[str]:
    """What uid USER may do with the ACL files, run in a child that drops root."""
    code = f"""
        import os
        os.setgroups([]); os.setgid({USER}); os.setuid({USER})
        m = {str(mnt)!r}
        for name, flags in (("noread", os.O_RDONLY), ("nowrite", os.O_WRONLY),
                            ("granted", os.O_RDWR)):
            try:
                fd = os.open(m + "/" + name, flags)
                if flags != os.O_RDONLY:
                    os.pwrite(fd, b"W", 0)
                os.close(fd)
                print(name, "ok")
            except OSError as e:
                print(name, e.strerror)
    """
    res = subprocess.run([sys.executable, "-c", textwrap.dedent(code)],
                         capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, res.stderr
    return res.stdout.splitlines()


def _default_acl_dir(lower: Path) -> None:
    (lower / "shared").mkdir()
    os.setxattr(lower / "shared", "system.posix_acl_default", _acl(7, 7, 5, 5))


def _create_with_umask(path: Path) -> tuple:
    old = os.umask(0o022)
    try:
        os.close(os.open(path, os.O_CREAT | os.O_WRONLY, 0o666))
        os.mkdir(str(path) + ".d", 0o777)
    finally:
        os.umask(old)
    return tuple((oct(os.lstat(p).st_mode), os.getxattr(p, ACL))
                 for p in (path, Path(str(path) + ".d")))


def _on_both(base: Path, make_layer: Callable[[Path], None],
             run: Callable[[Path, Path], tuple]) -> dict[str, tuple]:
    """run(mnt, upper) on a kernel and a cowfs mount of one layer made by make_layer."""
    seen = {}
    for side, mount in (("kernel", kernel_mount), ("cowfs", cowfs_mount)):
        lower, up, work = _dirs(base / side, "l", "u", "w")
        make_layer(lower)
        with mount([lower], up, work, base / side / "mnt") as mnt:
            seen[side] = run(mnt, up)
    assert seen["cowfs"] == seen["kernel"]
    return seen


def test_default_acl_applies_to_new_files(shared: Path) -> None:
    # A parent's default ACL replaces the umask (the kernel leaves that to us).
    _on_both(shared, _default_acl_dir, lambda mnt, up: _create_with_umask(mnt / "shared" / "new"))


def test_posix_acls_enforced_and_kept_on_copy_up(shared: Path) -> None:
    def run(mnt: Path, up: Path) -> tuple:
        return (_as_user(mnt), os.getxattr(mnt / "granted", ACL),
                (mnt / "granted").read_bytes(),
                os.getxattr(up / "granted", ACL) if (up / "granted").exists() else None)
    seen = _on_both(shared, _acl_layer, run)
    assert seen["cowfs"][0] == ["noread Permission denied", "nowrite Permission denied",
                                "granted ok"]
    assert seen["cowfs"][3] == _acl(6, 6, 0, 0)      # kept on copy-up


# ------------------------------------------------------------- fd budget
def test_fd_limit_of_256_never_runs_out(tmp_path: Path) -> None:
    lower, up, work, mnt = _dirs(tmp_path, "l", "u", "w", "mnt")
    for i in range(3000):
        (lower / f"d{i}").mkdir()
        (lower / f"d{i}" / "f").write_bytes(b"%d\n" % i)
    cmd = ["prlimit", "--nofile=256", *COWFS, "-o", overlay_opts([lower], up, work), str(mnt)]
    with mounted(cmd, mnt):
        held = [open(mnt / f"d{i}" / "f", "rb") for i in range(150)]
        try:
            for i in range(3000):
                assert os.listdir(mnt / f"d{i}") == ["f"]
            assert len(os.listdir(mnt)) == 3000
            assert (mnt / "d2999" / "f").read_bytes() == b"2999\n"
            (mnt / "d7" / "new").write_bytes(b"new\n")
            with open(mnt / "d8" / "f", "ab") as f:
                f.write(b"more\n")
            # Files callers hold open were never closed under them.
            for i, f in enumerate(held):
                assert f.read() == b"%d\n" % i
        finally:
            for f in held:
                f.close()
    assert (up / "d8" / "f").read_bytes() == b"8\nmore\n"


# ------------------------------------------------------------ exclusive use
def test_second_mount_on_same_upper_is_refused(tmp_path: Path) -> None:
    lower, up, work = _dirs(tmp_path, "l", "u", "w")
    (lower / "f").write_bytes(b"f\n")
    with cowfs_mount([lower], up, work, tmp_path / "m1") as m1:
        fd = os.open(m1 / "f", os.O_RDWR | os.O_APPEND)
        try:
            os.write(fd, b"x")
            os.unlink(m1 / "f")         # lives on in work/ while fd is open
            for other_work in (work, tmp_path / "w2"):
                other_work.mkdir(exist_ok=True)
                m2 = tmp_path / "m2"
                m2.mkdir(exist_ok=True)
                try:
                    res = subprocess.run([*COWFS, "-o", overlay_opts([lower], up, other_work),
                                          str(m2)], capture_output=True, text=True, timeout=60)
                    assert res.returncode != 0
                    assert "in use by another mount" in res.stderr
                    assert len(res.stderr.strip().splitlines()) == 1, res.stderr
                finally:
                    unmount(m2)
            assert os.pread(fd, 10, 0) == b"f\nx"     # its work/ was left alone
        finally:
            os.close(fd)


# ------------------------------------------------- mountpoint inside a layer
@pytest.mark.parametrize("where", ["lower", "upper"])
def test_mountpoint_inside_a_layer_is_refused(tmp_path: Path, where: str) -> None:
    lower, up, work = _dirs(tmp_path, "l", "u", "w")
    mnt = (lower if where == "lower" else up) / "sub"
    mnt.mkdir()
    res = subprocess.run([*COWFS, "-o", overlay_opts([lower], up, work), str(mnt)],
                         capture_output=True, text=True, timeout=30)
    try:
        assert res.returncode != 0
        assert f"is inside {where}dir" in res.stderr
        assert len(res.stderr.strip().splitlines()) == 1, res.stderr
    finally:
        unmount(mnt)


def test_mountpoint_on_the_lower_root_works(tmp_path: Path) -> None:
    # The kernel's trick of mounting over the lower directory itself.
    lower, up, work = _dirs(tmp_path, "l", "u", "w")
    (lower / "f").write_bytes(b"f\n")
    with cowfs_mount([lower], up, work, lower) as mnt:
        assert os.listdir(mnt) == ["f"]


# ------------------------------------------------------ a killed daemon
def test_sigkilled_daemon_leaves_no_record(tmp_path: Path) -> None:
    from cowfs.state import find_mount
    lower, up, work, store = _dirs(tmp_path, "l", "u", "w", "store")
    mnt = tmp_path / "mnt"
    env = dict(os.environ, COWFS_STORE=str(store))
    with cowfs_mount([lower], up, work, mnt):
        assert find_mount(str(mnt)) is not None
        pid = cowfs_pid(str(mnt))
        assert pid is not None
        os.kill(pid, signal.SIGKILL)
        for _ in range(200):
            if not os.path.exists(f"/proc/{pid}"):
                break
            time.sleep(0.02)
        res = subprocess.run([*COWFS, "diff", str(mnt)], capture_output=True, text=True,
                             env=env, timeout=30)
        assert res.returncode != 0
        assert "Transport endpoint is not connected" in res.stderr, res.stderr
        assert "not a directory" not in res.stderr
        assert find_mount(str(mnt)) is None     # the stale record is gone


# ------------------------------------------------ merged, without reading
@pytest.mark.parametrize("form", ["xattr", "oci", "none"])
def test_is_merged_does_not_read_the_directory(tmp_path: Path, form: str) -> None:
    # READDIRPLUS asks it of every child directory: answering by building the
    # child's lower index read every grandchild (20 names read 30,060 entries).
    from cowfs.overlay.inode import is_merged
    top, bottom = tmp_path / "top", tmp_path / "bottom"
    (top / "d").mkdir(parents=True)
    (bottom / "d" / "x").mkdir(parents=True)
    if form == "xattr":
        os.setxattr(top / "d", "trusted.overlay.opaque", b"y")
    elif form == "oci":
        (top / "d" / ".wh..wh..opq").touch()
    ov = _core(tmp_path, f"{top}:{bottom}")
    try:
        with ov.lock:
            d = walk(ov, "d")
            assert is_merged(ov, d) is (form == "none")
            assert d.index is None
    finally:
        ov.close()


# ------------------------------------------------------ failure-atomic rename
@pytest.mark.parametrize("side", ["kernel", "cowfs"])
def test_failed_rename_changes_nothing(tmp_path: Path, side: str) -> None:
    # The last step fails (the source's directory is immutable) after cowfs has
    # prepared the replaced file's orphan: the replaced file must still be there.
    # (Was: it was moved to work/ first, then the rename failed.)
    lower, up, work = _dirs(tmp_path, "l", "u", "w")
    for d, name in (("d1", "src"), ("d2", "dst")):
        (lower / d).mkdir()
        (lower / d / name).write_bytes(name.encode())
    mount = kernel_mount if side == "kernel" else cowfs_mount
    with mount([lower], up, work, tmp_path / "mnt") as mnt:
        for p in ("d1/src", "d2/dst"):
            with open(mnt / p, "ab") as f:
                f.write(b"+")
        fd = os.open(mnt / "d2" / "dst", os.O_RDONLY)     # held: an orphan if replaced
        subprocess.run(["chattr", "+i", str(up / "d1")], check=True)
        try:
            with pytest.raises(PermissionError):
                os.rename(mnt / "d1" / "src", mnt / "d2" / "dst")
        finally:
            subprocess.run(["chattr", "-i", str(up / "d1")], check=True)
            os.close(fd)
        assert (mnt / "d2" / "dst").read_bytes() == b"dst+"
        assert (mnt / "d1" / "src").read_bytes() == b"src+"
        if side == "cowfs":
            assert stray_work_entries(work, orphans=True) == []


# -------------------------------------------------------------- deep trees
def test_copy_up_at_depth_beyond_the_recursion_limit(tmp_path: Path) -> None:
    # 2,100 levels (a 4,200-byte path): copy-up walked and copied parents by
    # recursion, and failed with RecursionError past ~1,000.
    depth = 2100
    lower = tmp_path / "l"
    lower.mkdir()
    try:
        fd = os.open(lower, os.O_RDONLY | os.O_DIRECTORY)
        try:
            for _ in range(depth):
                os.mkdir("d", dir_fd=fd)
                nfd = os.open("d", os.O_RDONLY | os.O_DIRECTORY, dir_fd=fd)
                os.close(fd)
                fd = nfd
            with open(os.open("f", os.O_CREAT | os.O_WRONLY, 0o644, dir_fd=fd), "wb") as f:
                f.write(b"deep\n")
        finally:
            os.close(fd)
        ov = _core(tmp_path, lower)
        try:
            with ov.lock:
                node = walk(ov, "/".join(["d"] * depth + ["f"]))
                h = file.open_file(ov, node, os.O_WRONLY)
                os.pwrite(h.fd, b"DEEP", 0)
                file.release(h)
                assert node.layer == 0
                for n in [n for n in ov.table.nodes.values() if n is not ov.root]:
                    ov.table.drop(n)
                assert _read(ov, "/".join(["d"] * depth + ["f"])) == b"DEEP\n"
        finally:
            ov.close()
    finally:
        # (shutil.rmtree, pytest's too, recurses too deep for this tree)
        subprocess.run(["rm", "-rf", str(tmp_path / "u"), str(lower)], check=True, timeout=60)
