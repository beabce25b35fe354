"""The on-disk format module without a mount: entry classification, redirect
parsing, and the image tools' merged view reading layers by the same rules."""
from __future__ import annotations

import errno
import os
import stat
from pathlib import Path

import pytest

from cowfs.image.errors import ImageError
from cowfs.image.merged import Stack, list_merged
from cowfs.overlay.format import (TRUSTED, USER, Format, Kind, Redirect, classify, dir_marks,
                                  oci_form, parse_redirect, whited_out_at)

needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="trusted.* xattrs and 0/0 devices")
T = Format(TRUSTED)


@pytest.mark.parametrize("value,parsed", [
    (b"/a", Redirect(True, (b"a",))),
    (b"/a/b c/d", Redirect(True, (b"a", b"b c", b"d"))),
    (b"a", Redirect(False, (b"a",))),
    (b"..a", Redirect(False, (b"..a",))),
])
def test_parse_redirect_valid(value: bytes, parsed: Redirect) -> None:
    assert parse_redirect(value) == parsed
    assert parsed.value() == value


@pytest.mark.parametrize("value,err", [
    (b"", errno.EINVAL), (b"/", errno.EINVAL), (b"//a", errno.EINVAL), (b"/a/", errno.EINVAL),
    (b"/a//b", errno.EINVAL), (b"a/b", errno.EINVAL), (b"a/", errno.EINVAL),
    (b"a\0b", errno.EINVAL),
    (b".", errno.EACCES), (b"..", errno.EACCES), (b"/..", errno.EACCES),
    (b"/a/../../x", errno.EACCES), (b"/./a", errno.EACCES),
])
def test_parse_redirect_refuses_what_the_kernel_refuses(value: bytes, err: int) -> None:
    with pytest.raises(OSError) as e:
        parse_redirect(value)
    assert e.value.errno == err


def test_redirect_resolves_against_the_parent() -> None:
    assert parse_redirect(b"x").resolve((b"p", b"q")) == (b"p", b"q", b"x")
    assert parse_redirect(b"/x/y").resolve((b"p",)) == (b"x", b"y")


@pytest.mark.parametrize("name,kind,target", [
    (b"f", None, None), (b".wh.f", Kind.WHITEOUT, b"f"), (b".wh..wh..opq", Kind.MARKER, None),
    (b".wh..wh.plnk", Kind.MARKER, None), (b".wh.", Kind.MARKER, None), (b".whx", None, None),
])
def test_oci_form(name: bytes, kind: Kind | None, target: bytes | None) -> None:
    c = oci_form(name)
    assert (c and c.kind) == kind
    if target is not None:
        assert c is not None and c.target == target


@needs_root
def test_classify_every_form(tmp_path: Path) -> None:
    d = tmp_path / "d"
    d.mkdir()
    os.mknod(d / "cw", stat.S_IFCHR, 0)                         # kernel whiteout
    os.mknod(d / "null", stat.S_IFCHR | 0o600, os.makedev(1, 3))  # a device, not one
    (d / ".wh.oci").touch()
    (d / "xw").touch()
    os.setxattr(d / "xw", TRUSTED + "whiteout", b"")            # xattr whiteout
    (d / "uw").touch()
    os.setxattr(d / "uw", USER + "whiteout", b"")               # the other namespace
    (d / "big").write_bytes(b"x")
    os.setxattr(d / "big", TRUSTED + "whiteout", b"")           # not zero-size: a file
    (d / "sub").mkdir()
    fd = os.open(d, os.O_RDONLY | os.O_DIRECTORY)
    try:
        def kinds(marks, fmt=T):
            with os.scandir(fd) as it:
                return {e.name: classify(fmt, fd, os.fsencode(e.name), e, marks).kind.value
                        for e in it}
        plain = dir_marks(T, fd)
        assert plain.opaque is False and plain.xwhiteouts is False
        # a listing of an unmarked directory: no xattr whiteouts
        assert kinds(plain) == {"cw": "whiteout", "null": "entry", ".wh.oci": "whiteout",
                                "xw": "entry", "uw": "entry", "big": "entry", "sub": "entry"}
        # a lookup by name, or a listing of an opaque=x directory: xattr whiteouts count
        assert kinds(None)["xw"] == "whiteout" and kinds(None)["uw"] == "entry"
        os.setxattr(fd, TRUSTED + "opaque", b"x")
        marks = dir_marks(T, fd)
        assert marks.xwhiteouts and not marks.opaque
        assert kinds(marks)["xw"] == "whiteout"
        assert kinds(dir_marks(Format(USER), fd), Format(USER))["xw"] == "entry"
        assert whited_out_at(T, fd, b"oci") and whited_out_at(T, fd, b"cw")
        assert not whited_out_at(T, fd, b"null") and not whited_out_at(T, fd, b"x" * 255)
    finally:
        os.close(fd)


@needs_root
@pytest.mark.parametrize("how", ["xattr", "marker", "user-xattr"])
def test_dir_marks_opaque(tmp_path: Path, how: str) -> None:
    if how == "marker":
        (tmp_path / ".wh..wh..opq").touch()
    else:
        os.setxattr(tmp_path, (TRUSTED if how == "xattr" else USER) + "opaque", b"y")
    fd = os.open(tmp_path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        assert dir_marks(T, fd).opaque is (how != "user-xattr")
        assert dir_marks(Format(USER), fd).opaque is (how != "xattr")
    finally:
        os.close(fd)


# -------------------------------------------- the image tools' merged view
def _names(stack: Stack, path: tuple[bytes, ...]) -> list[str]:
    sources = stack.dir_sources(path)
    try:
        return sorted(os.fsdecode(n) for n in list_merged(sources, stack.fmt))
    finally:
        for s in sources:
            os.close(s.fd)


@needs_root
def test_merged_view_follows_lower_redirects_in_one_namespace(tmp_path: Path) -> None:
    up, l1, l2 = (tmp_path / n for n in ("up", "l1", "l2"))
    for d in (up, l1 / "b", l1 / "u", l2 / "a", l2 / "u"):
        d.mkdir(parents=True)
    os.setxattr(l1 / "b", TRUSTED + "redirect", b"/a")    # a renamed in an earlier mount
    (l2 / "a" / "f").touch()
    os.setxattr(l1 / "u", USER + "opaque", b"y")          # anyone's to set: not on a trusted stack
    (l2 / "u" / "g").touch()
    (up / ".wh..wh..opq").touch()                         # (the root's own marker: no effect)
    with Stack([str(up), str(l1), str(l2)], T) as s:
        assert _names(s, (b"b",)) == ["f"] and _names(s, (b"u",)) == ["g"]
    with Stack([str(up), str(l1), str(l2)], Format(USER)) as s:
        assert _names(s, (b"b",)) == [] and _names(s, (b"u",)) == []


@needs_root
def test_merged_view_refuses_a_bad_redirect(tmp_path: Path) -> None:
    up, low = tmp_path / "up", tmp_path / "low"
    (up / "d").mkdir(parents=True)
    (low / "x").mkdir(parents=True)
    os.setxattr(up / "d", TRUSTED + "redirect", b"/../x")
    with Stack([str(up), str(low)], T) as s, pytest.raises(ImageError, match="/d in .*leaves"):
        s.dir_sources((b"d",))
