"""Safe layer extraction (cowfs.image.unpack): metadata, whiteout forms, hostile archives."""
from __future__ import annotations

import io
import os
import stat
import tarfile
from pathlib import Path

import pytest

from cowfs.image.merged import Stack
from cowfs.image.unpack import UnpackStats, UnsafeEntry, Unpacker, split_name, times_ns

from .imageutil import (MTIME, Member, directory, file, hardlink, member, needs_root,
                        scratch, symlink, tar_bytes)

__all__ = ["scratch"]  # the fixture, imported for pytest


def unpack(members: list[Member] | bytes, dest: Path, privileged: bool | None = None,
           below: list[Path] | None = None) -> UnpackStats:
    root = os.geteuid() == 0
    dest.mkdir(parents=True, exist_ok=True)
    fd = os.open(dest, os.O_RDONLY | os.O_DIRECTORY)
    stack = Stack([str(p) for p in below]) if below else None
    u = Unpacker(fd, privileged=root if privileged is None else privileged, below=stack)
    data = members if isinstance(members, bytes) else tar_bytes(members)
    try:
        with tarfile.open(fileobj=io.BytesIO(data), mode="r|") as tf:
            return u.extract(tf)
    finally:
        u.close()
        os.close(fd)
        if stack is not None:
            stack.close()


def test_split_name() -> None:
    assert split_name("./a//b/./c/") == (b"a", b"b", b"c")
    assert split_name("./") == ()
    warnings: list[str] = []
    assert split_name("/etc/passwd", warnings.append) == (b"etc", b"passwd")
    assert "absolute" in warnings[0]
    with pytest.raises(UnsafeEntry, match=r"'\.\.'"):
        split_name("a/../../b")


def test_pax_times_keep_nanoseconds() -> None:
    ti, _ = file("f")
    ti.pax_headers = {"mtime": "1700000000.123456789"}
    assert times_ns(ti) == (1700000000123456789, 1700000000123456789)
    ti.pax_headers = {**ti.pax_headers, "atime": "1600000000.5"}
    assert times_ns(ti)[0] == 1600000000500000000


@needs_root
def test_metadata_is_kept(scratch: Path) -> None:
    frac, _ = file("d/f", b"data", mode=0o4755, uid=1000, gid=1001,
                   xattrs={"user.color": b"blue", "trusted.t": b"\xff\x00bin"})
    frac.pax_headers = {**frac.pax_headers, "mtime": "1700000000.123456789"}
    stats = unpack([
        directory("d", mode=0o555, uid=7, gid=8, mtime=MTIME - 100),
        (frac, b"data"),
        hardlink("d/f-link", "d/f"),
        symlink("d/sym", "../nowhere"),
        member("d/fifo", tarfile.FIFOTYPE, mode=0o640),
        member("d/null", tarfile.CHRTYPE, mode=0o666, dev=(1, 3)),
        member("d/blk", tarfile.BLKTYPE, mode=0o660, dev=(7, 0)),
    ], scratch / "l")
    d = scratch / "l" / "d"
    st = d.lstat()
    # Directory mode and time survive the entries written into it afterwards.
    assert (stat.S_IMODE(st.st_mode), st.st_uid, st.st_gid) == (0o555, 7, 8)
    assert st.st_mtime_ns == (MTIME - 100) * 10**9
    f = (d / "f").lstat()
    assert (stat.S_IMODE(f.st_mode), f.st_uid, f.st_gid) == (0o4755, 1000, 1001)
    assert f.st_mtime_ns == 1700000000123456789
    assert (d / "f").read_bytes() == b"data" and f.st_nlink == 2
    assert (d / "f-link").lstat().st_ino == f.st_ino
    assert os.getxattr(d / "f", "user.color") == b"blue"
    assert os.getxattr(d / "f", "trusted.t") == b"\xff\x00bin"
    assert os.readlink(d / "sym") == "../nowhere"
    assert (d / "sym").lstat().st_mtime_ns == MTIME * 10**9
    assert stat.S_ISFIFO((d / "fifo").lstat().st_mode)
    assert stat.S_IMODE((d / "fifo").lstat().st_mode) == 0o640
    null = (d / "null").lstat()
    assert stat.S_ISCHR(null.st_mode) and null.st_rdev == os.makedev(1, 3)
    assert stat.S_IMODE(null.st_mode) == 0o666
    assert stat.S_ISBLK((d / "blk").lstat().st_mode)
    assert stats.file_bytes == 4 and not stats.warnings


@pytest.mark.parametrize("privileged", [True, False])
def test_whiteouts_in_kernel_form(scratch: Path, privileged: bool) -> None:
    """Root or not, whiteouts are char 0/0 and opaque dirs carry overlay.opaque
    (trusted. as root, user. otherwise): one form, whoever imports."""
    if privileged and os.geteuid() != 0:
        pytest.skip("trusted. xattrs need root")
    unpack([directory("d"), file("d/.wh.gone"), file("d/.wh..wh..opq"), file("d/kept", b"k"),
            file("d/.wh..wh.plnk"), member("d/.wh.weird", tarfile.CHRTYPE)],
           scratch / "l", privileged=privileged)
    d = scratch / "l" / "d"
    assert sorted(os.listdir(d)) == ["gone", "kept", "weird"]
    for name in ("gone", "weird"):
        st = (d / name).lstat()
        assert stat.S_ISCHR(st.st_mode) and st.st_rdev == 0
    ns = "trusted." if privileged else "user."
    assert os.getxattr(d, ns + "overlay.opaque") == b"y"


WH_AND_DIR = [directory("d"), file("d/new", b"new")]


@pytest.mark.parametrize("order", ["whiteout-first", "dir-first", "implied-dir"])
def test_whiteout_and_directory_in_one_layer(scratch: Path, order: str) -> None:
    """`.wh.d` + `d/` in one layer: the lower d is deleted, the layer's d stays
    and is opaque, whatever the member order (the OCI rule)."""
    unpack([directory("d"), file("d/old", b"old")], scratch / "base")
    members = {"whiteout-first": [file(".wh.d"), *WH_AND_DIR],
               "dir-first": [*WH_AND_DIR, file(".wh.d")],
               "implied-dir": [file(".wh.d"), file("d/new", b"new")]}[order]
    unpack(members, scratch / "top", below=[scratch / "base"])
    d = scratch / "top" / "d"
    assert d.is_dir() and sorted(os.listdir(d)) == ["new"]
    ns = "trusted." if os.geteuid() == 0 else "user."
    assert os.getxattr(d, ns + "overlay.opaque") == b"y"
    if order == "implied-dir":  # nothing inherited from the deleted lower d
        assert stat.S_IMODE(d.lstat().st_mode) == 0o755


def test_whiteout_of_a_file_of_the_same_layer_keeps_it(scratch: Path) -> None:
    unpack([file("f", b"mine"), file(".wh.f"), file(".wh.g"), file("g", b"also mine")],
           scratch / "l")
    assert (scratch / "l" / "f").read_bytes() == b"mine"
    assert (scratch / "l" / "g").read_bytes() == b"also mine"


def test_later_entries_replace_earlier(scratch: Path) -> None:
    unpack([directory("x"), file("x/inner", b"1"), file("x", b"now a file"),
            file("y", b"file"), directory("y"), file("y/z", b"z"),
            file("w", b"old"), file("w", b"new")], scratch / "l")
    l = scratch / "l"
    assert (l / "x").read_bytes() == b"now a file"
    assert (l / "y" / "z").read_bytes() == b"z"
    assert (l / "w").read_bytes() == b"new"


def test_device_nodes_skipped_unprivileged(scratch: Path) -> None:
    stats = unpack([member("dev/sda", tarfile.BLKTYPE, dev=(8, 0)),
                    member("dev/null", tarfile.CHRTYPE, dev=(1, 3))],
                   scratch / "l", privileged=False)
    assert os.listdir(scratch / "l" / "dev") == []
    assert any("device node" in w and "dev/sda" in w for w in stats.warnings)


def test_implied_directories_inherit_from_below(scratch: Path) -> None:
    unpack([directory("tmp", mode=0o1777, mtime=MTIME - 5), file("tmp/a")], scratch / "base")
    unpack([file("tmp/b"), file("new/c")], scratch / "top", below=[scratch / "base"])
    tmp = (scratch / "top" / "tmp").lstat()
    assert stat.S_IMODE(tmp.st_mode) == 0o1777 and tmp.st_mtime_ns == (MTIME - 5) * 10**9
    assert stat.S_IMODE((scratch / "top" / "new").lstat().st_mode) == 0o755


def test_archive_without_end_blocks(scratch: Path) -> None:
    """umoci 0.4 ends a layer right after the last file's data."""
    data = tar_bytes([directory("d"), file("d/a", b"abc")])
    end = data.index(b"abc") + 3
    unpack(data[:end], scratch / "l")
    assert (scratch / "l" / "d" / "a").read_bytes() == b"abc"


def test_overlay_xattrs_from_the_archive_are_dropped(scratch: Path) -> None:
    stats = unpack([directory("d", xattrs={"trusted.overlay.redirect": b"/etc",
                                           "user.overlay.opaque": b"y"})], scratch / "l")
    assert not [n for n in os.listdir(scratch / "l")
                if os.listxattr(scratch / "l" / n)]
    assert any("overlay xattr" in w for w in stats.warnings)


# -- hostile archives ---------------------------------------------------------------

def _outside(scratch: Path) -> Path:
    out = scratch / "outside"
    out.mkdir()
    (out / "secret").write_bytes(b"secret")
    return out


HOSTILE = {
    "dotdot": lambda o: [file("../evil", b"x")],
    "dotdot-inside": lambda o: [directory("a"), file("a/../../evil", b"x")],
    "through-abs-symlink": lambda o: [symlink("link", str(o)), file("link/evil", b"x")],
    "through-rel-symlink": lambda o: [symlink("link", ".."), file("link/outside/evil", b"x")],
    "through-symlink-deep": lambda o: [directory("a"), symlink("a/b", str(o)),
                                       directory("a/b/c"), file("a/b/c/evil", b"x")],
    "hardlink-dotdot": lambda o: [hardlink("h", "../outside/secret")],
    "hardlink-absolute": lambda o: [hardlink("h", str(o / "secret"))],
    "hardlink-through-symlink": lambda o: [symlink("l", str(o)), hardlink("h", "l/secret")],
    "hardlink-to-dir": lambda o: [directory("d"), hardlink("h", "d")],
    "whiteout-through-symlink": lambda o: [symlink("l", str(o)), file("l/.wh.secret")],
    "opaque-through-symlink": lambda o: [symlink("l", str(o)), file("l/.wh..wh..opq")],
}


@pytest.mark.parametrize("case", sorted(HOSTILE))
def test_hostile_archive_is_refused(scratch: Path, case: str) -> None:
    outside = _outside(scratch)
    before = sorted(os.listdir(outside))
    with pytest.raises(UnsafeEntry) as err:
        unpack(HOSTILE[case](outside), scratch / "l")
    assert "refusing" in str(err.value)
    assert sorted(os.listdir(outside)) == before
    assert (outside / "secret").read_bytes() == b"secret"
    assert os.listxattr(outside) == [] or "trusted.overlay.opaque" not in os.listxattr(outside)
    assert not (scratch / "evil").exists()


def test_absolute_names_stay_inside(scratch: Path) -> None:
    outside = _outside(scratch)
    stats = unpack([file(str(outside / "secret"), b"overwritten?")], scratch / "l")
    assert (outside / "secret").read_bytes() == b"secret"
    inside = scratch / "l" / str(outside).lstrip("/") / "secret"
    assert inside.read_bytes() == b"overwritten?"
    assert any("absolute" in w for w in stats.warnings)


@pytest.mark.parametrize("replacement", ["file", "hardlink", "symlink", "dir"])
def test_entry_replacing_a_symlink_does_not_follow_it(scratch: Path, replacement: str) -> None:
    outside = _outside(scratch)
    new = {"file": file("s", b"mine"), "hardlink": hardlink("s", "plain"),
           "symlink": symlink("s", "elsewhere"), "dir": directory("s")}[replacement]
    unpack([file("plain", b"mine"), symlink("s", str(outside / "secret")), new], scratch / "l")
    assert (outside / "secret").read_bytes() == b"secret"
    assert not (scratch / "l" / "s").is_symlink() or replacement == "symlink"
