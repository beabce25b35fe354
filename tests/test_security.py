"""Security: planted symlinks never lead the daemon outside its layers; permissions
hold for unprivileged users; overlay-private xattrs stay out of reach; malformed
layers give errnos, never a dead daemon."""
from __future__ import annotations

import contextlib
import errno
import os
import shutil
import stat
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path

import pytest

from tests.mountutil import cowfs_mount, kernel_mount
from tests.overlaydiff import SCRATCH, cowfs_pid, renameat2, stray_work_entries

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="mounting needs root")


@pytest.fixture
def root():
    SCRATCH.mkdir(parents=True, exist_ok=True)
    d = Path(tempfile.mkdtemp(prefix="sec-", dir=SCRATCH))
    os.chmod(d, 0o755)
    try:
        yield d
    finally:
        shutil.rmtree(d, ignore_errors=True)


def _dirs(root: Path, *names: str) -> list[Path]:
    out = []
    for n in names:
        (root / n).mkdir(parents=True, exist_ok=True)
        out.append(root / n)
    return out


def _tree_state(path: Path) -> dict:
    """Everything about a directory tree that an escape could change."""
    out = {}
    for dirpath, dirnames, filenames in os.walk(path):
        for name in [""] + dirnames + filenames:
            p = os.path.join(dirpath, name) if name else dirpath
            st = os.lstat(p)
            xattrs = sorted(os.listxattr(p, follow_symlinks=False))
            data = Path(p).read_bytes() if stat.S_ISREG(st.st_mode) else None
            out[os.path.relpath(p, path)] = (st.st_mode, st.st_uid, st.st_gid, st.st_size,
                                             st.st_mtime_ns, xattrs, data)
    return out


def _attempt(fn) -> str:
    try:
        fn()
        return "ok"
    except OSError as e:
        return errno.errorcode.get(e.errno or 0, str(e.errno))


def _alive(mnt: Path) -> None:
    pid = cowfs_pid(str(mnt))
    assert pid is not None, "the cowfs daemon died"
    os.stat(mnt)
    os.listdir(mnt)


# ------------------------------------------------------------ symlinks
def test_planted_symlinks_never_escape(root: Path) -> None:
    sentinel = root / "sentinel"
    sentinel.mkdir()
    (sentinel / "secret").write_bytes(b"secret\n")
    (sentinel / "sub").mkdir()
    low, low2, up, work, mnt = _dirs(root, "low", "low2", "up", "work", "mnt")
    # lower layer: symlinks at /, at the sentinel, at .., nested
    os.symlink("/", low / "to_root")
    os.symlink(str(sentinel), low / "to_sentinel")
    os.symlink("..", low / "to_dotdot")
    os.symlink("../../sentinel", low / "rel_sentinel")
    (low / "d").mkdir()
    os.symlink(str(sentinel / "secret"), low / "d" / "secret_link")
    (low / "d" / "f").write_bytes(b"f\n")
    # a deeper layer has a symlink where the top lower layer has a directory
    os.symlink(str(sentinel), low2 / "d")
    (low / "m").mkdir()
    os.symlink(str(sentinel), low2 / "m2")
    # upper layer: a planted symlink, and a directory redirected through a symlink
    os.symlink(str(sentinel), up / "up_link")
    (up / "redir").mkdir()
    os.setxattr(up / "redir", "trusted.overlay.redirect", b"/to_sentinel")
    (up / "redir2").mkdir()
    # From a lower layer's root, /../sentinel is the sentinel: '..' must be refused.
    os.setxattr(up / "redir2", "trusted.overlay.redirect", b"/../sentinel")
    (up / "redir3").mkdir()
    os.setxattr(up / "redir3", "trusted.overlay.redirect", b"..")
    # user.overlay.* is anyone's to set: a trusted (root) mount must not follow it.
    (up / "redir4").mkdir()
    os.setxattr(up / "redir4", "user.overlay.redirect", b"/../sentinel")
    before = _tree_state(sentinel)
    before_root = sorted(os.listdir("/"))
    with cowfs_mount([low, low2], up, work, mnt):
        m = str(mnt)
        results = {}
        for name in ("to_root", "to_sentinel", "to_dotdot", "rel_sentinel", "up_link",
                     "d/secret_link"):
            p = os.path.join(m, name)
            results[name] = (
                _attempt(lambda: os.chown(p, 1000, 1000, follow_symlinks=False)),
                _attempt(lambda: os.utime(p, ns=(1, 1), follow_symlinks=False)),
                _attempt(lambda: os.setxattr(p, "user.x", b"1", follow_symlinks=False)),
                _attempt(lambda: os.setxattr(p, "trusted.x", b"1", follow_symlinks=False)),
                _attempt(lambda: os.link(p, p + ".hl", follow_symlinks=False)),
                _attempt(lambda: os.rename(p, p + ".moved")),
                _attempt(lambda: os.unlink(p + ".moved")),
            )
        # A merged directory whose lower part below is a symlink: create, write,
        # chmod and rename in it; all must stay inside the layers.
        (mnt / "d" / "new").write_bytes(b"new\n")
        with open(mnt / "d" / "f", "ab") as f:
            f.write(b"more\n")
        os.chmod(mnt / "d" / "f", 0o600)
        os.rename(mnt / "d" / "f", mnt / "d" / "g")
        os.mkdir(mnt / "m" / "x")
        renameat2(str(mnt / "m"), str(mnt / "m2"), 2)   # exchange a dir with a symlink
        renameat2(str(mnt / "m2"), str(mnt / "m"), 2)
        os.rename(mnt / "d", mnt / "d_moved")
        # Redirected directories must not show the sentinel's contents.
        # A redirect through a symlink finds no directory: the directory is empty.
        assert os.listdir(mnt / "redir") == [] and os.listdir(mnt / "redir4") == []
        assert _attempt(lambda: (mnt / "redir" / "secret").read_bytes()) == "ENOENT"
        # '..' in a redirect: the kernel refuses the lookup with EACCES.
        for r in ("redir2", "redir3"):
            assert _attempt(lambda: os.listdir(mnt / r)) == "EACCES"
            assert _attempt(lambda: (mnt / r / "secret").read_bytes()) == "EACCES"
        assert sorted(os.listdir(mnt / "d_moved")) == ["g", "new", "secret_link.hl"]
        assert (mnt / "d_moved" / "g").read_bytes() == b"f\nmore\n"
        # Symlinks read back as planted.
        assert os.readlink(mnt / "d_moved" / "secret_link.hl") == str(sentinel / "secret")
        _alive(mnt)
    assert _tree_state(sentinel) == before, f"the sentinel changed: {results}"
    assert sorted(os.listdir("/")) == before_root
    assert not os.path.lexists("/to_root.hl") and not os.path.lexists("/x")
    assert stray_work_entries(work) == []


# ------------------------------------------------------- unprivileged
def _as_nobody(code: str) -> subprocess.CompletedProcess:
    return subprocess.run(["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups",
                           sys.executable, "-c", textwrap.dedent(code)],
                          capture_output=True, text=True, timeout=60)


@pytest.mark.parametrize("backend", ["cowfs", "kernel"])
def test_unprivileged_user_is_confined(root: Path, backend: str) -> None:
    low, up, work, mnt = _dirs(root, "low", "up", "work", "mnt")
    os.chmod(mnt, 0o755)
    (low / "private").write_bytes(b"private\n")
    os.chmod(low / "private", 0o600)
    (low / "readonly").write_bytes(b"ro\n")
    os.chmod(low / "readonly", 0o644)
    (low / "rodir").mkdir(mode=0o755)
    (low / "rodir" / "f").write_bytes(b"f\n")
    (low / "shared").mkdir()
    os.chmod(low / "shared", 0o1777)
    mount = cowfs_mount if backend == "cowfs" else kernel_mount
    with mount([low], up, work, mnt):
        res = _as_nobody(f"""
            import errno, os
            m = {str(mnt)!r}
            def t(fn):
                try:
                    fn(); return "ok"
                except OSError as e:
                    return errno.errorcode[e.errno]
            print(t(lambda: open(m + "/private", "rb").read()))
            print(t(lambda: open(m + "/readonly", "ab").write(b"x")))
            print(t(lambda: os.truncate(m + "/readonly", 0)))
            print(t(lambda: os.chmod(m + "/readonly", 0o666)))
            print(t(lambda: os.unlink(m + "/rodir/f")))
            print(t(lambda: open(m + "/rodir/new", "wb")))
            print(t(lambda: os.setxattr(m + "/readonly", "user.x", b"1")))
            print(t(lambda: open(m + "/readonly", "rb").read()))
            print(t(lambda: open(m + "/shared/mine", "wb").write(b"mine")))
        """)
        assert res.returncode == 0, res.stderr
        assert res.stdout.split() == ["EACCES", "EACCES", "EACCES", "EPERM", "EACCES",
                                      "EACCES", "EACCES", "ok", "ok"]
        assert (mnt / "readonly").read_bytes() == b"ro\n"
        assert os.stat(mnt / "shared" / "mine").st_uid == 65534
        if backend == "cowfs":
            _alive(mnt)
    assert not (up / "readonly").exists() and not (up / "private").exists()
    assert (low / "private").read_bytes() == b"private\n"


# ---------------------------------------------------- private xattrs
def test_private_xattrs_unreachable(root: Path) -> None:
    low, up, work, mnt = _dirs(root, "low", "up", "work", "mnt")
    (low / "opq").mkdir()
    os.setxattr(low / "opq", "trusted.overlay.opaque", b"y")
    (low / "f").write_bytes(b"f\n")
    os.setxattr(low / "f", "user.overlay.origin", b"planted")
    os.setxattr(low / "f", "user.ok", b"1")
    with cowfs_mount([low], up, work, mnt):
        for rel in ("opq", "f", ""):
            p = str(mnt / rel) if rel else str(mnt)
            for name in ("trusted.overlay.opaque", "trusted.overlay.redirect",
                         "trusted.overlay.metacopy", "user.overlay.origin",
                         "user.overlay.opaque", "trusted.overlay.overlay.opaque"):
                assert _attempt(lambda: os.getxattr(p, name)) == "ENODATA", (rel, name)
                assert _attempt(lambda: os.setxattr(p, name, b"y")) == "EPERM", (rel, name)
                assert _attempt(lambda: os.removexattr(p, name)) == "EPERM", (rel, name)
            assert not any(n.startswith(("trusted.overlay.", "user.overlay."))
                           for n in os.listxattr(p)), rel
        assert os.getxattr(mnt / "f", "user.ok") == b"1"
        # A chmod copies f up: the planted private xattr must not come along.
        os.chmod(mnt / "f", 0o600)
        _alive(mnt)
    assert os.getxattr(low / "opq", "trusted.overlay.opaque") == b"y"
    names = os.listxattr(up / "f")
    assert "user.overlay.origin" not in names and "user.ok" in names
    assert not os.path.exists(up / "opq") or \
        os.getxattr(up / "opq", "trusted.overlay.opaque", follow_symlinks=False) != b"y"


# ---------------------------------------------------- malformed layers
def test_malformed_layers_give_errnos(root: Path) -> None:
    low, low2, up, work, mnt = _dirs(root, "low", "low2", "up", "work", "mnt")
    (low2 / "a").write_bytes(b"a\n")
    (low2 / "b").write_bytes(b"b\n")
    (low2 / "c").mkdir()
    (low2 / "c" / "x").write_bytes(b"x\n")
    (low2 / "ok").write_bytes(b"ok\n")
    os.mknod(low / "a", stat.S_IFCHR | 0o600, os.makedev(1, 3))   # a device, not a whiteout
    os.mknod(low / "blk", stat.S_IFBLK | 0o600, 0)                # block 0/0: odd type
    (low / ".wh.b").mkdir()                                        # a .wh. that is a directory
    (low / "c").mkdir()
    (low / "c" / ".wh..wh..opq").mkdir()                           # opaque marker as a dir
    (low / "opqfile").write_bytes(b"o\n")
    os.setxattr(low / "opqfile", "trusted.overlay.opaque", b"y")  # opaque mark on a file
    (low / "meta").write_bytes(b"")
    os.truncate(low / "meta", 1 << 20)
    os.setxattr(low / "meta", "trusted.overlay.metacopy", b"")     # metacopy in a lower layer
    (low / "badredir").mkdir()
    os.setxattr(low / "badredir", "trusted.overlay.redirect", b"\xff" * 300)
    (low / "locked").mkdir(mode=0o000)
    (low / "locked" / "in").write_bytes(b"in\n")
    (low / "nofile").write_bytes(b"n\n")
    os.chmod(low / "nofile", 0o000)
    os.symlink("loop", low / "loop")
    os.mkfifo(low / "fifo")
    # the upper layer: a whiteout of an odd type and a bad redirect
    os.mknod(up / "ok2", stat.S_IFCHR | 0o600, os.makedev(0, 1))
    (up / "badup").mkdir()
    os.setxattr(up / "badup", "trusted.overlay.redirect", b"relative/../../x")
    with cowfs_mount([low, low2], up, work, mnt):
        m = str(mnt)
        seen = {}
        for name in sorted(os.listdir(m)):
            p = os.path.join(m, name)
            seen[name] = (_attempt(lambda: os.lstat(p)),
                          _attempt(lambda: os.listdir(p)) if os.path.isdir(p) else "-",
                          _attempt(lambda: open(p, "rb", buffering=0).read(10))
                          if not stat.S_ISFIFO(os.lstat(p).st_mode) else "-")
        # Every call above answered with an errno or a result; the daemon lives on.
        _alive(mnt)
        changed = {}
        for name in ("opqfile", "meta", "nofile", "a"):
            p = os.path.join(m, name)
            changed[name] = (_attempt(lambda: os.chmod(p, 0o644)),
                             _attempt(lambda: open(p, "ab").close() if name != "a" else None))
        for d in ("c", "badredir", "locked", "badup"):
            p = os.path.join(m, d)
            changed[d] = (_attempt(lambda: Path(p, "new").write_bytes(b"n")),
                          _attempt(lambda: os.rename(p, p + ".moved")),
                          _attempt(lambda: os.listdir(p + ".moved")))
        changed["loop"] = _attempt(lambda: os.unlink(os.path.join(m, "loop")))
        changed["c.moved"] = _attempt(lambda: os.rmdir(os.path.join(m, "c.moved")))
        _alive(mnt)
        assert (mnt / "ok").read_bytes() == b"ok\n"
    # What each odd entry gives (was only printed): as a plain file, directory or
    # device; none is taken for overlay markup it is not.
    assert seen == MALFORMED_SEEN, seen
    assert changed == MALFORMED_CHANGED, changed


# (lstat, listdir, read 10 bytes) per name the mount lists; "-" = not tried.
# Not listed: b (low's directory .wh.b whites it out) and .wh.b itself; meta (a
# lower metacopy file with no data below: EIO, as the kernel) and badup (a redirect
# that climbs out: EINVAL, as the kernel), whose lookups fail (see README).
MALFORMED_SEEN = {
    "a": ("ok", "-", "ok"),             # a char device 1/3 is a device, not a whiteout
    "badredir": ("ok", "ok", "EISDIR"),  # a redirect in the lowest layer leads nowhere
    "blk": ("ok", "-", "ENXIO"),
    "c": ("ok", "ok", "EISDIR"),         # a .wh..wh..opq directory still makes it opaque
    "fifo": ("ok", "-", "-"),
    "locked": ("ok", "ok", "EISDIR"),
    "loop": ("ok", "-", "ELOOP"),
    "nofile": ("ok", "-", "ok"),
    "ok": ("ok", "-", "ok"),
    "ok2": ("ok", "-", "ENXIO"),         # a char device 0/1 in the upper is a device
    "opqfile": ("ok", "-", "ok"),        # an opaque mark on a file means nothing
}
# chmod and append per file; create inside, rename, list the moved one per dir.
MALFORMED_CHANGED = {
    "opqfile": ("ok", "ok"), "meta": ("EIO", "EIO"), "nofile": ("ok", "ok"), "a": ("ok", "ok"),
    "c": ("ok", "ok", "ok"), "badredir": ("ok", "ok", "ok"), "locked": ("ok", "ok", "ok"),
    "badup": ("EINVAL", "EINVAL", "ENOENT"), "loop": "ok", "c.moved": "ENOTEMPTY",
}
