"""`cowfs commit` and `cowfs image mount`: layer contents, and the round trip
import -> mount -> change -> commit -> umoci unpack == what the mount showed."""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import shutil
import stat
import subprocess
import tarfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from cowfs.image.changes import diff
from cowfs.image.commit import write_layer
from cowfs.image.errors import ImageError
from cowfs.image.store import Store

from .imageutil import (COWFS, assert_same_tree, build_umoci_image, cowfs, mount_kind,
                        needs_root, needs_umoci, recreate_dir, scratch, snapshot,
                        umoci_unpack)
from .mountutil import kernel_mount, mounted

__all__ = ["mount_kind", "scratch"]
ROOT = os.geteuid() == 0
OVL = "trusted.overlay." if ROOT else "user.overlay."


def members(path: Path) -> dict[str, tarfile.TarInfo]:
    with tarfile.open(path) as tf:
        return {m.name: m for m in tf.getmembers()}


def test_layer_contents(scratch: Path) -> None:
    lower, upper = scratch / "lower", scratch / "upper"
    for d in ("d/e", "r/sub", "keep"):
        (lower / d).mkdir(parents=True)
    for f in ("c", "d/e/f", "r/1", "r/sub/2", "meta", "keep/k"):
        (lower / f).write_text("lower " + f)
    os.link(lower / "r" / "1", lower / "r" / "1-link")
    upper.mkdir()
    (upper / ".wh.c").touch()
    (upper / "d").mkdir()
    os.setxattr(upper / "d", OVL + "opaque", b"y")
    (upper / "d" / "g").write_text("g")
    (upper / "moved").mkdir()
    os.setxattr(upper / "moved", OVL + "redirect", b"r")
    (upper / ".wh.r").touch()
    (upper / "moved" / "new").write_text("new")
    (upper / "meta").touch()
    os.chmod(upper / "meta", 0o600)
    os.setxattr(upper / "meta", OVL + "metacopy", b"")
    os.setxattr(upper / "meta", "user.tag", b"\xff\x01")
    (upper / "stale").mkdir()
    (upper / "stale" / ".wh.nothing").touch()
    info = write_layer(str(upper), [str(lower)], str(scratch / "layer.tar"))
    data = (scratch / "layer.tar").read_bytes()
    assert info.digest == info.diff_id == "sha256:" + hashlib.sha256(data).hexdigest()
    m = members(scratch / "layer.tar")
    assert sorted(m) == [".wh.c", ".wh.r", "d", "d/.wh..wh..opq", "d/g", "meta", "moved",
                         "moved/1", "moved/1-link", "moved/new", "moved/sub", "moved/sub/2",
                         "stale"]
    assert m["moved/1-link"].islnk() and m["moved/1-link"].linkname == "moved/1"
    assert stat.S_IMODE(m["meta"].mode) == 0o600
    assert m["meta"].pax_headers["SCHILY.xattr.user.tag"].encode("utf-8",
                                                                 "surrogateescape") == b"\xff\x01"
    with tarfile.open(scratch / "layer.tar") as tf:
        assert tf.extractfile("meta").read() == b"lower meta"  # type: ignore[union-attr]
        assert tf.extractfile("moved/sub/2").read() == b"lower r/sub/2"  # type: ignore
    # Compressed output: the digest is the blob's, the diff_id the tar's.
    gz = write_layer(str(upper), [str(lower)], str(scratch / "layer.tar.gz"))
    assert gz.diff_id == info.diff_id and gz.digest != gz.diff_id
    assert gz.media_type.endswith("+gzip")
    assert write_layer(str(upper), [str(lower)], str(scratch / "l.tar.zst")).diff_id == \
        info.diff_id


def test_commit_cli_needs_an_output(scratch: Path) -> None:
    (scratch / "u").mkdir()
    res = cowfs("commit", str(scratch / "u"), "--lower", str(scratch), store=scratch / "s",
                check=False)
    assert res.returncode == 2 and "-o" in res.stderr


# -- round trips through real mounts ----------------------------------------------------

def mutate(mnt: Path, mount_kind: str) -> None:
    """Every kind of change an upper dir can record."""
    (mnt / "etc" / "hostname").write_text("changed\n")            # copy-up, owner kept
    os.chmod(mnt / "etc" / "big", 0o600)                          # metacopy (kernel)
    os.setxattr(mnt / "etc" / "hostname", "user.note", b"n")
    os.unlink(mnt / "data" / "sym")
    os.rename(mnt / "data", mnt / "moved")                        # redirected dir
    shutil.rmtree(mnt / "opq")
    recreate_dir(mnt / "opq", mount_kind)                         # opaque dir
    (mnt / "opq" / "z").write_text("z\n")
    (mnt / "new" / "deep").mkdir(parents=True)
    (mnt / "new" / "f").write_text("f\n")
    os.link(mnt / "new" / "f", mnt / "new" / "deep" / "f-link")
    os.symlink("/etc/hostname", mnt / "new" / "abs-link")
    os.mkfifo(mnt / "new" / "fifo")
    os.mknod(mnt / "new" / "null", stat.S_IFCHR | 0o666, os.makedev(1, 3))
    os.setxattr(mnt / "new" / "f", "user.k", b"v")
    os.chown(mnt / "new" / "f", 123, 456)
    os.utime(mnt / "new" / "deep", ns=(10**18, 10**18))
    os.unlink(mnt / "moved" / "a-link")
    # The mount is a root filesystem: a shell runs in it (only builtins: no coreutils).
    out = subprocess.run(["chroot", str(mnt), "/bin/sh", "-c",
                          "read -r h </etc/hostname && echo $h && echo made >/tmp/made"],
                         capture_output=True, text=True, timeout=30)
    assert out.returncode == 0 and out.stdout == "changed\n", out


@contextlib.contextmanager
def image_mount(kind: str, store: Path, image: str, mnt: Path, upper: Path) -> Iterator[Path]:
    if kind == "kernel":
        s = Store(str(store))
        work = upper.parent / f".{upper.name}.work"
        upper.mkdir()
        work.mkdir()
        with kernel_mount([Path(p) for p in s.lower_dirs(s.image(image))], upper, work, mnt,
                          "redirect_dir=on,metacopy=on") as m:
            yield m
    else:
        with mounted([*COWFS, "image", "mount", "--store", str(store), image, str(mnt),
                      "--upper", str(upper)], mnt) as m:
            yield m


@needs_root
@needs_umoci
def test_round_trip(scratch: Path, mount_kind: str) -> None:
    image = build_umoci_image(scratch, shell=True)
    store = scratch / "store"
    cowfs("image", "import", image, "--name", "t", store=store)
    want = umoci_unpack(image, scratch / "bundle0")
    layer = scratch / "layer.tar.gz"
    with image_mount(mount_kind, store, "t", scratch / "mnt", scratch / "upper") as mnt:
        assert_same_tree(mnt, want)
        mutate(mnt, mount_kind)
        changes = cowfs("diff", str(mnt), store=store).stdout.splitlines()
        for line in ("C /etc/hostname", "C /etc/big", "D /data", "A /moved", "A /moved/a",
                     "C /opq", "D /opq/fresh", "A /opq/z", "A /new/deep/f-link", "A /tmp/made"):
            assert line in changes, changes
        res = cowfs("commit", str(mnt), "-o", str(layer), "--image", f"{scratch}/oci:new",
                    "-m", "test", store=store)
        got = umoci_unpack(f"{scratch}/oci:new", scratch / "bundle1")
        assert_same_tree(got, mnt)
        stale = [p for p, (a, b) in _pairs(snapshot(got), snapshot(mnt)) if a != b]
    digest = "sha256:" + hashlib.sha256(layer.read_bytes()).hexdigest()
    assert f"digest: {digest}" in res.stdout and "diff_id: sha256:" in res.stdout
    index = json.loads((scratch / "oci" / "index.json").read_text())
    assert {d["annotations"]["org.opencontainers.image.ref.name"] for d in index["manifests"]} \
        == {"t", "new"}
    if shutil.which("skopeo"):
        out = subprocess.run(["skopeo", "inspect", f"oci:{scratch}/oci:new"],
                             capture_output=True, text=True, timeout=60)
        assert out.returncode == 0, out.stderr
        assert json.loads(out.stdout)["Layers"][-1] == digest
    # The kernel reads the upper dir as the mount wrote it, the same tree again.
    s = Store(str(store))
    lowers = [Path(p) for p in s.lower_dirs(s.image("t"))]
    with kernel_mount([scratch / "upper", *lowers], None, None, scratch / "mnt2",
                      "redirect_dir=follow,metacopy=on") as mnt2:
        assert_same_tree(mnt2, got)
    # The committed image imports again and shows the same tree.
    cowfs("image", "import", f"{scratch}/oci:new", "--name", "new", store=store)
    with kernel_mount([Path(p) for p in s.lower_dirs(s.image("new"))], None, None,
                      scratch / "mnt3") as mnt3:
        assert_same_tree(mnt3, got)
    assert not stale, f"cowfs shows other mtimes than its upper dir has for {stale}"


def _pairs(a: dict, b: dict) -> list[tuple[str, tuple]]:
    return [(k, (a.get(k), b.get(k))) for k in sorted(a.keys() | b.keys())]


@needs_root
def test_commit_a_container_upper(scratch: Path) -> None:
    """An upper dir the store made for an image mount finds its layers by itself."""
    from .imageutil import directory, file, tar_bytes, write_layout
    write_layout(scratch / "oci", "v1", [tar_bytes([directory("etc"), file("etc/a", b"a")])])
    store = scratch / "store"
    cowfs("image", "import", f"{scratch}/oci:v1", store=store)
    s = Store(str(store))
    c = s.new_container(s.image("oci:v1"), None, str(scratch / "mnt"))
    os.mknod(os.path.join(c.upper, "etc"), stat.S_IFCHR, 0)
    assert cowfs("diff", c.upper, store=store).stdout == "D /etc\n"
    res = cowfs("commit", c.upper, "-o", str(scratch / "l.tar"), store=store)
    assert "diff_id" in res.stdout and list(members(scratch / "l.tar")) == [".wh.etc"]
    shutil.rmtree(scratch / "oci")  # where the base layer's blob was
    res = cowfs("commit", c.upper, "--image", f"{scratch}/out:v2", store=store, check=False)
    assert res.returncode == 1 and "base layer blob sha256:" in res.stderr


@pytest.mark.parametrize("value", [b"/../outside", b"../outside", b"a/../../outside", b".."])
def test_hostile_redirects_stay_inside(scratch: Path, value: bytes) -> None:
    """A redirect never leads out of the layers, whatever an upper dir says: a
    bad one fails diff and commit with one line naming it (the kernel fails the
    lookup: EINVAL, or EACCES for '..')."""
    outside, lower, upper = scratch / "outside", scratch / "lower", scratch / "upper"
    for d in (outside, lower / "a", upper / "evil"):
        d.mkdir(parents=True)
    (outside / "secret").write_text("secret")
    os.setxattr(upper / "evil", OVL + "redirect", value)
    (upper / "meta").touch()
    os.setxattr(upper / "meta", OVL + "metacopy", b"")
    os.setxattr(upper / "meta", OVL + "redirect", b"/../outside/secret")
    bad = "leaves its layer" if value in (b"/../outside", b"..") else "invalid redirect"
    where = re.escape(f"/evil in {upper}: ")
    with pytest.raises(ImageError, match=where + ".*" + bad):
        diff(str(upper), [str(lower)])
    with pytest.raises(ImageError, match=where + ".*" + bad):
        write_layer(str(upper), [str(lower)], str(scratch / "l.tar"))
    os.rmdir(upper / "evil")
    with pytest.raises(ImageError, match="/meta in .*leaves its layer"):
        write_layer(str(upper), [str(lower)], str(scratch / "l.tar"))
    os.unlink(upper / "meta")
    write_layer(str(upper), [str(lower)], str(scratch / "l.tar"))
    assert list(members(scratch / "l.tar")) == []


@needs_root
@needs_umoci
def test_commit_on_a_docker_archive_base(scratch: Path) -> None:
    """--image copies the base layers out of the archive the image came from."""
    from .imageutil import directory, file, tar_bytes, write_docker_archive
    base = tar_bytes([directory("etc"), file("etc/a", b"a\n"), file("etc/b", b"b\n")])
    write_docker_archive(scratch / "img.tar", "app:1", [base])
    store = scratch / "store"
    cowfs("image", "import", str(scratch / "img.tar"), store=store)
    with image_mount("kernel", store, "app:1", scratch / "mnt", scratch / "upper") as mnt:
        os.unlink(mnt / "etc" / "a")
        (mnt / "etc" / "c").write_text("c\n")
        assert cowfs("diff", str(mnt), store=store).stdout.splitlines() == \
            ["C /etc", "D /etc/a", "A /etc/c"]
        cowfs("commit", str(mnt), "--image", f"{scratch}/out:v2", store=store)
        assert_same_tree(umoci_unpack(f"{scratch}/out:v2", scratch / "bundle"), mnt)
    manifest_digest = json.loads((scratch / "out" / "index.json").read_text())["manifests"][0]
    manifest = json.loads((scratch / "out" / "blobs" / "sha256" /
                           manifest_digest["digest"][7:]).read_text())
    assert len(manifest["layers"]) == 2 and all(set(d) == {"mediaType", "digest", "size"}
                                                 for d in manifest["layers"])
