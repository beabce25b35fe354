"""Counterexamples found by test_differential.py, kept as plain tests: the minimal
operation sequence, run on a kernel overlay and on cowfs, results compared.

A test marked xfail(strict=True) is a cowfs divergence still to be fixed in the
core; when it is fixed the test passes, strict makes that fail, and the mark
must go (and the matching mask in test_differential.KNOWN with it).
"""
from __future__ import annotations

import contextlib
import os
import stat
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests import overlaydiff as od
from tests.mountutil import cowfs_mount, kernel_mount

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="mounting needs root")

E = od.Entry
L = od.LayerSpec


def _file(data: bytes = b"lower\n", mode: int = 0o644, **kw) -> od.Entry:
    return E("file", content=("bytes", data), mode=mode, **kw)


def test_merged_dir_nlink() -> None:
    layers = [L({"d": E("dir"), "d/x": E("dir")}), L({"d": E("dir"), "d/y": E("dir")})]
    with od.Pair(layers) as p:
        p.check_trees()


def test_merged_dir_nlink_single_layer_dir_matches() -> None:
    # A directory from one layer only is not merged: both report its real nlink.
    with od.Pair([L({"d": E("dir"), "d/x": E("dir")}), L({})]) as p:
        p.check_trees()


def test_create_keeps_setuid() -> None:
    with od.Pair([L({"d": E("dir")}), L({})], od.Normalize(dir_nlink=False)) as p:
        p.do("create d/x 04755", od.op_create("d/x", 0o4755, True, False))
        p.do("stat d/x", od.op_stat("d/x"))
        p.check_trees()
        p.check_uppers()


def test_chmod_setuid_on_lower_file() -> None:
    # The same mode set by chmod (copy-up, then chmod) matches.
    with od.Pair([L({"a": _file(mode=0o755)})]) as p:
        p.do("chmod a 04755", od.op_chmod("a", 0o4755))
        p.do("stat a", od.op_stat("a"))
        p.check_trees()
        p.check_uppers()


def test_lone_lower_whiteout_is_invisible() -> None:
    # A whiteout in a lower directory that nothing below merges with: the kernel
    # lists the name in readdir but lookup says ENOENT (it reads such a directory
    # directly); cowfs hides it.  The harness treats the kernel's phantom as
    # absent; here cowfs must not list it at all.
    layers = [L({"d": E("dir"), "d/e": E("whiteout"), "d/x": _file()}, form="oci"),
              L({"d": _file()})]
    with od.Pair(layers) as p:
        assert sorted(os.listdir(p.c.p("d"))) == ["x"]
        assert "e" in os.listdir(p.k.p("d"))       # the kernel's quirk, documented
        assert not os.path.lexists(p.k.p("d/e"))
        p.check_trees()


def test_private_xattrs_are_refused_deliberately() -> None:
    # A deliberate difference, not a bug: root may set trusted.overlay.* through a
    # kernel overlay (stored escaped, 6.7+); cowfs refuses and hides every
    # overlay-private xattr.
    with od.Pair([L({"dd": E("dir"), "a": _file()})]) as p:
        rk, rc = p.both(od.op_setxattr("dd", "trusted.overlay.opaque", b"y"))
        assert rc == ("err", "EPERM")
        rk, rc = p.both(od.op_removexattr("a", "trusted.overlay.opaque"))
        assert rc == ("err", "EPERM")
        rk, rc = p.both(od.op_getxattr("a", "user.overlay.x"))
        assert rc == ("err", "ENODATA")


# Lower hard links, as the kernel's default (index=off): every name is its own
# file, showing the lower inode until a copy-up breaks the link (the copy is a
# new inode with nlink 1; the other names keep the lower one).
HARDLINKED = [L({"d": E("dir"), "d/a": _file(), "d/b": E("hardlink", target="d/a")})]


def _stat_ino(path: str):
    """st_ino identity and nlink of two names: are they one inode?"""
    def f(s: od.Side) -> tuple:
        sa, sb = os.lstat(s.p(path)), os.lstat(s.p("d/b"))
        return sa.st_ino == sb.st_ino, sa.st_nlink, sb.st_nlink
    return f


def test_lower_hardlink_write_breaks_link() -> None:
    with od.Pair(HARDLINKED) as p:
        p.do("stat d/a d/b", _stat_ino("d/a"))        # one inode, nlink 2
        p.do("append d/a X", od.op_write("d/a", 0, b"X", append=True))
        p.do("stat d/a d/b", _stat_ino("d/a"))        # two inodes, nlink 1 and 2
        p.do("read d/a", od.op_read("d/a"))
        p.do("read d/b", od.op_read("d/b"))           # the old data
        p.check_trees()
        p.check_uppers()                               # the copy is at d/a, not d/b
        p.remount()
        p.check_trees("after remount")


def test_lower_hardlink_lookup_order_does_not_move_write() -> None:
    # Was: one node for both names, remembering the last one looked up, so the
    # write to d/a landed in the upper layer as d/b.
    with od.Pair(HARDLINKED) as p:
        p.do("stat d/a", od.op_stat("d/a"))
        p.do("stat d/b", od.op_stat("d/b"))
        p.do("pwrite d/a @0 XX", od.op_write("d/a", 0, b"XX"))
        p.check_uppers()
        p.remount()
        p.check_trees("after remount")


def test_lower_hardlink_change_then_remove_other_name() -> None:
    # Was: chmod of d/a then rm d/b left the only copy in work/ as an orphan.
    with od.Pair(HARDLINKED) as p:
        p.do("chmod d/a 04755", od.op_chmod("d/a", 0o4755))
        p.do("append d/a X", od.op_write("d/a", 0, b"X", append=True))
        p.do("unlink d/b", od.op_unlink("d/b"))
        p.check_trees()
        p.check_uppers()
        p.check_workdir_clean()
        p.remount()
        p.check_trees("after remount")


def test_exchange_lower_file_with_lower_hardlink() -> None:
    layers = [L({"b": _file(b"B" * 9000, 0o444, xattrs=(("user.low", b"v"),))}),
              L({"d": E("dir"), "d/a": _file(), "d/b": E("hardlink", target="d/a")})]
    with od.Pair(layers) as p:
        p.do("exchange b d/b", od.op_rename("b", "d/b", od.RENAME_EXCHANGE))
        p.check_trees()


def test_rename_onto_other_name_of_lower_hardlink() -> None:
    # Two overlay inodes (index=off): the rename happens, unlike one of a real link.
    with od.Pair(HARDLINKED) as p:
        p.do("rename d/a d/b", od.op_rename("d/a", "d/b"))
        p.check_trees()
        p.check_uppers()


@pytest.mark.parametrize("form", ["kernel", "oci"])
def test_opaque_dir_nlink(form: str) -> None:
    layers = [L({"d": E("opaque"), "d/x": E("dir")}, form=form),
              L({"d": E("dir"), "d/y": E("dir")})]
    with od.Pair(layers) as p:
        p.check_trees()


def test_setxattr_replace_on_lower_file_then_noreplace_renames() -> None:
    layers = [L({"d": _file(b"L" * 70000, 0o444, xattrs=(("user.low", b"v"),))}),
              L({"d": E("dir"), "d/e": E("dir")})]
    with od.Pair(layers, od.Normalize(dir_nlink=False)) as p:
        p.do("setxattr d user.k1 REPLACE", od.op_setxattr("d", "user.k1", b"", os.XATTR_REPLACE))
        p.do("rename d/e d NOREPLACE", od.op_rename("d/e", "d", od.RENAME_NOREPLACE))
        p.check_trees()
        p.check_uppers()


def _reopen_after_unlink(name: str):
    """Hold an O_PATH fd, unlink the name, open the inode again through
    /proc/self/fd: what a process racing an unlink does (found by
    test_faults.test_parallel_namespace_changes and the soak test as ENXIO)."""
    def op(s: od.Side) -> bytes:
        fd = os.open(s.p(name), os.O_PATH)
        try:
            os.unlink(s.p(name))
            fd2 = os.open(f"/proc/self/fd/{fd}", os.O_RDONLY)
            try:
                return os.read(fd2, 100)
            finally:
                os.close(fd2)
        finally:
            os.close(fd)
    return op


def test_reopen_unlinked_copied_up_file() -> None:
    with od.Pair([L({"a": _file()})]) as p:
        p.do("append a X", od.op_write("a", 0, b"X", append=True))
        # kernel: ('ok', b'lower\nX'); cowfs: ('err', 'ENOENT') (before e6aaab3: ENXIO)
        p.do("O_PATH a; unlink a; reopen", _reopen_after_unlink("a"))


def test_reopen_unlinked_upper_file() -> None:
    with od.Pair([L({})]) as p:
        p.do("create b", od.op_create("b", 0o644, True, False))
        p.do("O_PATH b; unlink b; reopen", _reopen_after_unlink("b"))


def test_reads_kernel_metacopy_redirect_rename() -> None:
    with od.Pair([L({"a": E("file", content=("fill", b"L", 9000))})]) as p:
        p.do("chmod a 0600", od.op_chmod("a", 0o600))      # kernel: metacopy copy-up
        p.do("rename a b", od.op_rename("a", "b"))           # kernel: redirect "a" on b
        p.check_cowfs_reads_kernel_upper()


def test_reads_kernel_metacopy_redirect_link() -> None:
    with od.Pair([L({"a": E("file", content=("fill", b"L", 9000))})]) as p:
        p.do("link a f", od.op_link("a", "f"))
        p.do("unlink a", od.op_unlink("a"))
        p.check_cowfs_reads_kernel_upper()


def test_metacopy_with_big_xattr_survives_remount() -> None:
    # Fixed in cowfs/lookup.py: an ext4 xattr block counts in st_blocks, so a
    # metacopy placeholder with a large xattr looked fully allocated and was
    # read as its (zero) placeholder data after a remount.
    with od.Pair([L({"b": _file()})]) as p:
        p.do("setxattr b user.big=3000 bytes", od.op_setxattr("b", "user.big", b"x" * 3000))
        p.remount()
        p.check_trees("after remount")


def test_reads_kernel_metacopy_small_file() -> None:
    # Same fix: the kernel's metacopy upper file carries an origin xattr that
    # often spills into an xattr block.
    with od.Pair([L({"d": E("dir"), "d/b": _file()})], od.Normalize(dir_nlink=False)) as p:
        p.do("setxattr d/b user.k1", od.op_setxattr("d/b", "user.k1", b"v1"))
        p.check_cowfs_reads_kernel_upper()


def test_redirect_stops_at_non_dir_layer() -> None:
    layers = [L({"d": E("dir"), "d/e": E("dir")}), L({"d": E("fifo")}),
              L({"d": E("dir"), "d/e": E("dir"), "d/e/a": _file()})]
    with od.Pair(layers) as p:
        p.do("rename d/e f", od.op_rename("d/e", "f"))
        p.check_trees()
        p.remount()
        # kernel: f is empty; cowfs: f/a from the third layer
        p.check_trees("after remount")



def test_moved_upper_dir_gets_opaque() -> None:
    # Found by the default differential run: an upper-only directory renamed into
    # a merged directory is marked opaque by the kernel (so a lower directory of
    # the same name can never merge into it); cowfs did not mark it (fixed in 9e0bb4a).
    with od.Pair([L({})]) as p:
        p.do("mkdir a", od.op_mkdir("a"))
        p.do("mkdir d", od.op_mkdir("d"))
        p.do("mkdir d/a", od.op_mkdir("d/a"))
        p.do("rename d/a a", od.op_rename("d/a", "a"))
        p.check_trees()
        p.check_uppers()


def test_failed_setxattr_on_lower_dir_nlink() -> None:
    with od.Pair([L({}), L({"e": E("dir"), "e/a": _file()})]) as p:
        p.do("setxattr e user.k1 REPLACE", od.op_setxattr("e", "user.k1", b"", os.XATTR_REPLACE))
        p.check_trees()   # kernel: e nlink 1; cowfs: e nlink 2


# ------------------------------------------------- the on-disk format (format.py)
# Kernel and cowfs mount the very same layer directories read-only (a lower-only
# mount writes nothing) and must show the same tree.
OVL = "trusted.overlay."


def _layers(tmp: Path, specs: list[od.LayerSpec]) -> list[Path]:
    out = []
    for i, spec in enumerate(specs):
        od.materialize(spec, tmp / f"l{i}", "kernel")
        out.append(tmp / f"l{i}")
    return out


@contextlib.contextmanager
def _read_only_pair(tmp: Path, lowers: list[Path], kernel_extra: str = "redirect_dir=on",
                    cowfs_extra: str = "") -> Iterator[tuple[Path, Path]]:
    with kernel_mount(lowers, None, None, tmp / "kmnt", kernel_extra) as k, \
            cowfs_mount(lowers, None, None, tmp / "cmnt", cowfs_extra) as c:
        yield k, c


def _same_tree(k: Path, c: Path) -> None:
    d = od.diff_snapshots(od.snapshot(str(k), skip_phantoms=True), od.snapshot(str(c)))
    assert not d, "kernel and cowfs differ:\n" + "\n".join(d)


def _dir_with(redirect: bytes, **kw) -> od.Entry:
    return E("dir", xattrs=((OVL + "redirect", redirect),), **kw)


def test_lower_redirects_are_followed(tmp_path: Path) -> None:
    # b and c were renamed from a in an earlier mount (absolute and relative
    # redirect); n names /x/y where x itself was renamed from z below it.
    layers = _layers(tmp_path, [
        L({"b": _dir_with(b"/a"), "b/own": _file(), "c": _dir_with(b"a"), "n": _dir_with(b"/x/y")}),
        L({"a": E("dir"), "a/f": _file(b"f\n"), "x": _dir_with(b"/z"), "x/y": E("dir"),
           "x/y/e": _file(b"e\n")}),
        L({"a": E("dir"), "a/h": _file(b"h\n"), "z": E("dir"), "z/y": E("dir"),
           "z/y/g": _file(b"g\n")}),
    ])
    with _read_only_pair(tmp_path, layers) as (k, c):
        assert sorted(os.listdir(c / "b")) == ["f", "h", "own"]
        assert sorted(os.listdir(c / "n")) == ["e", "g"]
        _same_tree(k, c)


def test_renamed_dir_shows_its_contents_when_its_upper_is_a_lower(tmp_path: Path) -> None:
    # Rename in one mount, then stack that upper as a lower layer: the way
    # container layers and stacked test layers are reused.
    spec = L({"a": E("dir"), "a/f": _file(), "a/s": E("dir"), "a/s/t": _file(b"t\n")})
    with od.Pair([spec]) as p:
        p.do("rename a b", od.op_rename("a", "b"))
        p.do("rename b/s s2", od.op_rename("b/s", "s2"))
        p.check_trees()
        pair_dir = Path(p.dir)
        p.stack.close()   # unmount both; the layers stay until the Pair closes
        trees = []
        for side in ("kernel", "cowfs"):
            base = pair_dir / side
            lowers = [base / "upper", base / "l0"]
            with _read_only_pair(tmp_path / side, lowers) as (k, c):
                assert sorted(os.listdir(c / "b")) == ["f"] and os.listdir(c / "s2") == ["t"]
                _same_tree(k, c)
                trees.append(od.snapshot(str(c)))
        assert trees[0] == trees[1], "cowfs reads the kernel's upper and its own alike"


@pytest.mark.parametrize("value,err", [
    (b"//a", "EINVAL"), (b"/a/", "EINVAL"), (b"a/", "EINVAL"), (b"", "EINVAL"), (b"/", "EINVAL"),
    (b".", "EACCES"), (b"..", "EACCES"), (b"/./a", "EACCES"), (b"/../out", "EACCES"),
    (b"/a", "ok")])
def test_redirects_are_validated_as_the_kernel_does(tmp_path: Path, value: bytes,
                                                    err: str) -> None:
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "secret").write_bytes(b"s\n")
    layers = _layers(tmp_path, [L({"r": _dir_with(value)}), L({"a": E("dir"), "a/f": _file()})])
    with _read_only_pair(tmp_path, layers) as (k, c):
        rk = od.attempt(lambda: sorted(os.listdir(k / "r")))
        rc = od.attempt(lambda: sorted(os.listdir(c / "r")))
        assert rk == rc and rc[0] == ("ok" if err == "ok" else "err")
        assert err == "ok" or rc[1] == err
        assert "secret" not in str(rc)


@pytest.mark.parametrize("mode,followed", [("on", True), ("follow", True), ("off", True),
                                           ("nofollow", False)])
def test_redirect_dir_modes(tmp_path: Path, mode: str, followed: bool) -> None:
    layers = _layers(tmp_path, [L({"b": _dir_with(b"/a")}), L({"a": E("dir"), "a/f": _file()})])
    with _read_only_pair(tmp_path, layers, f"redirect_dir={mode}",
                         f"redirect_dir={mode},metacopy=off") as (k, c):
        rk, rc = od.attempt(lambda: os.listdir(k / "b")), od.attempt(lambda: os.listdir(c / "b"))
        assert rk == rc == (("ok", ["f"]) if followed else ("err", "EPERM"))


def _metacopy(size: int, redirect: bytes | None = None, mode: int = 0o600) -> od.Entry:
    xattrs = ((OVL + "metacopy", b""),) + (((OVL + "redirect", redirect),) if redirect else ())
    return E("file", content=("sparse", size, ()), mode=mode, xattrs=xattrs)


def test_lower_metacopy_files_take_data_from_below(tmp_path: Path) -> None:
    layers = _layers(tmp_path, [
        L({"m": _metacopy(9000), "m2": _metacopy(9000, b"/data/real"),
           "d": E("dir"), "d/m3": _metacopy(9000, b"real3")}),
        L({"m": E("file", content=("fill", b"L", 9000)), "data": E("dir"),
           "data/real": E("file", content=("fill", b"R", 9000)),
           "d": E("dir"), "d/real3": E("file", content=("fill", b"3", 9000))}),
    ])
    with _read_only_pair(tmp_path, layers, "redirect_dir=on,metacopy=on") as (k, c):
        assert (c / "m").read_bytes() == b"L" * 9000 and (c / "m2").read_bytes() == b"R" * 9000
        assert stat.S_IMODE(os.stat(c / "m").st_mode) == 0o600
        _same_tree(k, c)


def test_lower_metacopy_without_data_or_with_metacopy_off(tmp_path: Path) -> None:
    layers = _layers(tmp_path, [L({"m": _metacopy(9000), "lone": _metacopy(10)}),
                                L({"m": E("file", content=("fill", b"L", 9000))})])
    with _read_only_pair(tmp_path, layers, "redirect_dir=on,metacopy=on") as (k, c):
        for name, want in (("lone", ("err", "EIO")), ("m", ("ok", 9000))):
            rk = od.attempt(lambda: os.stat(k / name).st_size)
            rc = od.attempt(lambda: os.stat(c / name).st_size)
            assert rk == rc == want, name
    with _read_only_pair(tmp_path, layers, "metacopy=off", "metacopy=off") as (k, c):
        rk, rc = od.attempt(lambda: os.stat(k / "m")), od.attempt(lambda: os.stat(c / "m"))
        assert rk == rc == ("err", "EPERM")


def test_data_only_layers(tmp_path: Path) -> None:
    layers = _layers(tmp_path, [L({"m": _metacopy(9000, b"/blobs/b1"), "n": _metacopy(9000)}),
                                L({"x": _file()}),
                                L({"blobs": E("dir"), "blobs/b1": E("file", content=("fill", b"D", 9000)),
                                   "n": E("file", content=("fill", b"N", 9000))})])
    # lowerdir=l0:l1::l2 (the last layer data-only)
    stack = [layers[0], layers[1], Path(":" + str(layers[2]))]
    with _read_only_pair(tmp_path, stack, "redirect_dir=on,metacopy=on") as (k, c):
        assert (c / "m").read_bytes() == b"D" * 9000
        # (the kernel lists n although its lookup fails; cowfs' READDIRPLUS leaves
        # out names it cannot look up)
        assert {"m", "x"} <= set(os.listdir(k)) & set(os.listdir(c))
        # only an absolute redirect reaches a data-only layer
        rk, rc = od.attempt(lambda: os.stat(k / "n")), od.attempt(lambda: os.stat(c / "n"))
        assert rk[0] == rc[0] == "err" and rk == rc
        assert not os.path.lexists(c / "blobs")


@pytest.mark.parametrize("mark", [(OVL + "opaque", b"x"), (OVL + "whiteouts", b"")])
def test_xattr_whiteouts(tmp_path: Path, mark: tuple[str, bytes]) -> None:
    # A zero-size file with overlay.whiteout: the kernel's lookup takes it for a
    # whiteout in any directory, its readdir (6.8+) only in one marked
    # overlay.opaque=x (6.7's overlay.whiteouts does not count) and lists it
    # otherwise.  cowfs never lists a name its lookup refuses.
    wh = ((OVL + "whiteout", b""),)
    layers = _layers(tmp_path, [
        L({"d": E("dir", xattrs=(mark,)), "d/a": E("file", xattrs=wh)}),
        L({"d": E("dir"), "d/a": _file(), "d/b": _file()}),
    ])
    with _read_only_pair(tmp_path, layers) as (k, c):
        assert sorted(os.listdir(c / "d")) == ["b"] and not os.path.lexists(c / "d" / "a")
        assert sorted(os.listdir(k / "d")) == (["b"] if mark[1] == b"x" else ["a", "b"])
        _same_tree(k, c)


@pytest.mark.parametrize("userxattr", [False, True])
def test_one_xattr_namespace_per_mount(tmp_path: Path, userxattr: bool) -> None:
    # user.overlay.* is anyone's to set: a trusted mount ignores it, a userxattr
    # mount reads nothing else.
    layers = _layers(tmp_path, [
        L({"u": E("dir", xattrs=(("user.overlay.opaque", b"y"),)),
           "t": E("dir", xattrs=((OVL + "opaque", b"y"),))}),
        L({"u": E("dir"), "u/x": _file(), "t": E("dir"), "t/y": _file()}),
    ])
    opt = "userxattr" if userxattr else ""
    with _read_only_pair(tmp_path, layers, opt, opt) as (k, c):
        for d in ("u", "t"):
            assert sorted(os.listdir(k / d)) == sorted(os.listdir(c / d)), d
        assert os.listdir(c / ("t" if userxattr else "u")) != []


def test_upper_oci_whiteout_and_opaque_marker(tmp_path: Path) -> None:
    # cowfs reads the OCI form in every layer (README): in the upper layer a
    # `.wh.NAME` hides NAME for lookup as for readdir, and `.wh..wh..opq` makes
    # its directory opaque.  The kernel knows neither form, so no comparison.
    low, up, work = tmp_path / "low", tmp_path / "up", tmp_path / "work"
    for d in (low / "d", up / "d", work):
        d.mkdir(parents=True)
    for name in ("x", "y", "d/z"):
        (low / name).write_bytes(b"lower\n")
    (up / ".wh.x").touch()
    (up / "d" / ".wh..wh..opq").touch()
    with cowfs_mount([low], up, work, tmp_path / "mnt") as m:
        assert sorted(os.listdir(m)) == ["d", "y"] and not os.path.lexists(m / "x")
        assert os.listdir(m / "d") == [] and not os.path.lexists(m / "d" / "z")
        (m / "x").write_bytes(b"new\n")      # created over the whiteout
        assert sorted(os.listdir(m)) == ["d", "x", "y"] and not (up / ".wh.x").exists()
        assert (m / "x").read_bytes() == b"new\n"


@pytest.mark.parametrize("mode", ["follow", "off"])
def test_redirect_dir_follow_reads_the_kernels_renamed_dirs(tmp_path: Path, mode: str) -> None:
    # redirect_dir=follow once turned following off: a kernel-written upper
    # mounted so showed every renamed directory empty.
    with od.Pair([L({"a": E("dir"), "a/f": _file()})]) as p:
        p.do("rename a b", od.op_rename("a", "b"))
        p.stack.close()   # unmount both: the kernel's upper is cowfs' alone now
        _, lowers, base, _ = p.mounts[0]
        work, mnt = tmp_path / "work", tmp_path / "mnt"
        work.mkdir()
        with cowfs_mount(lowers, base / "upper", work, mnt, f"redirect_dir={mode}") as c:
            assert os.listdir(c / "b") == ["f"] and not os.path.lexists(c / "a")
            # following is not writing: renaming a lower directory is EXDEV
            assert od.attempt(lambda: os.rename(c / "b", c / "c")) == ("err", "EXDEV")


def test_userxattr_upper_mounts_with_the_kernels_userxattr(tmp_path: Path) -> None:
    # -o userxattr (the rootless default) writes neither redirects nor metacopy
    # files, as the kernel: its upper then mounts with the kernel's -o userxattr
    # (which refuses to follow a redirect and a metacopy file with EPERM).
    spec = L({"a": E("file", content=("fill", b"L", 9000)), "d": E("dir"), "d/f": _file()})
    with od.Pair([spec], kernel_extra="userxattr", cowfs_extra="userxattr") as p:
        p.do("chmod a 0600", od.op_chmod("a", 0o600))
        p.do("rename d e", od.op_rename("d", "e"))     # EXDEV on both: no redirects
        p.do("setxattr a user.k", od.op_setxattr("a", "user.k", b"v"))
        p.check_trees()
        # a full copy, and nothing in trusted.: (upper_snapshot counts the kernel's
        # user.overlay.origin as a user xattr, so check_uppers cannot compare)
        up = od.upper_snapshot(p.c.upper)
        assert up["a"][5] != "metacopy" and "e" not in up
        assert not any(n.startswith("trusted.") for n in os.listxattr(Path(p.c.upper) / "a"))
        p.stack.close()
        _, lowers, base, _ = p.mounts[1]
        (base / "kwork").mkdir()
        with kernel_mount(lowers, base / "upper", base / "kwork", tmp_path / "k",
                          "userxattr") as k:
            assert (k / "a").read_bytes() == b"L" * 9000
            assert stat.S_IMODE(os.stat(k / "a").st_mode) == 0o600


        p.check_trees()   # both copy e up first: merged, nlink 1 (was: cowfs 2)


def test_copied_up_dir_nlink_after_stat() -> None:
    # Found by the differential run once directory nlink was compared: the kernel
    # cached d's attributes from before the copy-up (real nlink 3); after it d is
    # merged (nlink 1).  Fixed: a copy-up drops the kernel's cached attributes.
    layers = [L({"a": _file(b""), "d": E("dir", mode=0o744), "d/a": _file(b""),
                 "d/e/b": _file(b"", 0o755)})]
    with od.Pair(layers) as p:
        p.check_trees("before")
        p.do("mkfifo a", od.op_mkfifo("a"))
        p.check_trees("before")
        p.do("chmod d/e/b 0644", od.op_chmod("d/e/b", 0o644))
        p.check_trees("after copy-up")


def test_orphan_goes_once_closed() -> None:
    # The work/ check counts orphans whose fds are all closed (it ignored every
    # orphan, so one never deleted at the kernel's forget went unseen).
    with od.Pair([L({"a": _file()})]) as p:
        p.do("open a rw", od.op_open("a", os.O_RDWR))
        p.do("fd0 write", od.op_fd_write(0, 0, b"X"))
        p.do("unlink a", od.op_unlink("a"))
        p.do("fd0 read", od.op_fd_read(0, 0, 10))
        p.do("close fd0", od.op_fd_close(0))
        p.check_workdir_clean()


def test_broken_lower_hardlink_d_ino_after_listing() -> None:
    # Found by the differential run: a copy-up gives one name of a lower hard link
    # its upper inode number; the kernel's cached listing of the parent kept the
    # old d_ino.  Fixed: that listing is dropped too.
    layers = [L({"f": _file(b""), "a": E("hardlink", target="f")})]
    with od.Pair(layers) as p:
        p.check_trees("before")
        p.do("chmod a 0644", od.op_chmod("a", 0o644))
        p.check_trees("after copy-up")
