"""`cowfs diff`: classifying an upper dir's changes, on hand-made uppers in both
whiteout forms and on uppers the kernel's overlayfs wrote."""
from __future__ import annotations

import os
import shutil
import stat
from pathlib import Path

import pytest

from cowfs.image.changes import diff

from .imageutil import cowfs, mount_kind, recreate_dir, scratch
from .mountutil import cowfs_mount, kernel_mount

__all__ = ["mount_kind", "scratch"]
ROOT = os.geteuid() == 0
OVL = "trusted.overlay." if ROOT else "user.overlay."


def build_lower(lower: Path) -> None:
    for d in ("a", "b", "d/e", "r/deep", "keep"):
        (lower / d).mkdir(parents=True)
    for f in ("a/x", "a/y", "c", "d/e/f", "r/1", "r/deep/2", "keep/k"):
        (lower / f).write_text(f)


def whiteout(upper: Path, rel: str, form: str) -> None:
    p = upper / rel
    if form == "kernel":
        os.mknod(p, stat.S_IFCHR, 0)
    else:
        p.with_name(".wh." + p.name).touch()


def copy_dir(lower: Path, upper: Path, rel: str) -> None:
    """A directory as the kernel copies it up: same mode, owner and times."""
    (upper / rel).mkdir(parents=True, exist_ok=True)
    shutil.copystat(lower / rel, upper / rel)


@pytest.mark.parametrize("form", ["kernel", "oci"])
def test_classification(scratch: Path, form: str) -> None:
    if form == "kernel" and not ROOT:
        pytest.skip("char device whiteouts need root")
    lower, upper = scratch / "lower", scratch / "upper"
    build_lower(lower)
    upper.mkdir()
    copy_dir(lower, upper, "a")
    (upper / "a" / "x").write_text("changed")                      # C /a/x
    (upper / "a" / "y").write_text("a/y")                          # metacopy: C /a/y
    os.chmod(upper / "a" / "y", 0o600)
    os.setxattr(upper / "a" / "y", OVL + "metacopy", b"")
    whiteout(upper, "c", form)                                     # D /c, C / is not shown
    whiteout(upper, "never-existed", form)                         # stale: nothing
    (upper / "n").write_text("new")                                # A /n
    (upper / "d").mkdir()                                          # opaque: C /d
    os.setxattr(upper / "d", OVL + "opaque", b"y")
    (upper / "d" / "g").write_text("g")                            # A /d/g, D /d/e
    (upper / "moved").mkdir()                                      # renamed from /r
    os.setxattr(upper / "moved", OVL + "redirect", b"/r")
    whiteout(upper, "r", form)
    copy_dir(lower, upper, "keep")                                 # copied up, unchanged
    (upper / "newdir" / "sub").mkdir(parents=True)
    for d in ("a", "keep"):  # the kernel keeps a copied-up dir's times as they were
        shutil.copystat(lower / d, upper / d)
    got = [str(c) for c in diff(str(upper), [str(lower)])]
    assert got == ["C /a/x", "C /a/y", "D /c", "C /d", "D /d/e", "A /d/g",
                   "A /moved", "A /moved/1", "A /moved/deep", "A /moved/deep/2", "A /n",
                   "A /newdir", "A /newdir/sub", "D /r"]


def test_parent_of_added_or_deleted_is_changed(scratch: Path) -> None:
    lower, upper = scratch / "lower", scratch / "upper"
    build_lower(lower)
    copy_dir(lower, upper, "a")
    (upper / "a" / "new").write_text("n")
    copy_dir(lower, upper, "d/e")
    (upper / "d" / "e" / ".wh.f").touch()
    shutil.copystat(lower / "d", upper / "d")
    got = [str(c) for c in diff(str(upper), [str(lower)])]
    assert got == ["C /a", "A /a/new", "C /d/e", "D /d/e/f"]


def test_layers_below_are_merged(scratch: Path) -> None:
    """Whiteouts and opaque dirs in lower layers shape the tree the diff is against."""
    l1, l2, upper = scratch / "l1", scratch / "l2", scratch / "upper"
    build_lower(l2)
    (l1 / "d").mkdir(parents=True)
    (l1 / "d" / ".wh..wh..opq").touch()     # l1 hides l2's d/e
    (l1 / ".wh.c").touch()                   # and c
    (upper / "d" / "e").mkdir(parents=True)  # so d/e is new
    (upper / "c").write_text("again")        # and so is c
    got = [str(c) for c in diff(str(upper), [str(l1), str(l2)])]
    assert got == ["A /c", "C /d", "A /d/e"]


def test_upper_written_by_a_mount(scratch: Path, mount_kind: str) -> None:
    """Kernel overlayfs writes the reference format; cowfs must write the same."""
    lower, upper, work = scratch / "lower", scratch / "upper", scratch / "work"
    build_lower(lower)
    os.symlink("a/x", lower / "link")
    upper.mkdir()
    work.mkdir()
    mount = kernel_mount if mount_kind == "kernel" else cowfs_mount
    with mount([lower], upper, work, scratch / "mnt", "redirect_dir=on,metacopy=on") as mnt:
        (mnt / "a" / "x").write_text("changed")
        os.chmod(mnt / "a" / "y", 0o600)                 # metacopy copy-up
        os.unlink(mnt / "c")
        shutil.rmtree(mnt / "d")
        recreate_dir(mnt / "d", mount_kind)             # opaque
        (mnt / "d" / "g").write_text("g")
        os.rename(mnt / "r", mnt / "moved")             # redirect
        os.unlink(mnt / "link")
        os.symlink("elsewhere", mnt / "link")
        (mnt / "n").write_text("n")
        os.link(mnt / "n", mnt / "keep" / "n-link")
        os.sync()  # cowfs: what the writeback cache holds reaches the upper dir
        if mount_kind == "kernel":
            assert os.getxattr(upper / "a" / "y", "trusted.overlay.metacopy") is not None
            assert os.getxattr(upper / "moved", "trusted.overlay.redirect")
        want = ["C /a/x", "C /a/y", "D /c", "C /d", "D /d/e", "A /d/g", "C /keep",
                "A /keep/n-link", "C /link", "A /moved", "A /moved/1", "A /moved/deep",
                "A /moved/deep/2", "A /n", "D /r"]
        got = [str(c) for c in diff(str(upper), [str(lower)])]
        assert got == want, " ".join(got)
        # The CLI finds the layers from the mount, or is told them.
        by_mount = cowfs("diff", str(mnt), store=scratch / "store").stdout.splitlines()
        by_upper = cowfs("diff", str(upper), "--lower", str(lower),
                         store=scratch / "store").stdout.splitlines()
        assert by_mount == by_upper == want
        if mount_kind == "cowfs":  # the mount record names the lowers of its upper
            assert cowfs("diff", str(upper), store=scratch / "store").stdout.splitlines() == want


def test_cli_needs_the_lowers(scratch: Path) -> None:
    (scratch / "upper").mkdir()
    res = cowfs("diff", str(scratch / "upper"), store=scratch / "store", check=False)
    assert res.returncode == 2 and "--lower" in res.stderr
