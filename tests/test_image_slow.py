"""Slow tier: a real Debian root filesystem as an image layer.

debootstrap -> import -> mount -> apt-get install in a chroot on the mount ->
commit -> umoci unpack of base + committed layer == the mount; then a runc
container on the mount.  Needs root, debootstrap, umoci and Debian's mirror.
"""
from __future__ import annotations

import json
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from cowfs.image.store import Store

from .imageutil import (assert_same_tree, cowfs, mount_kind, needs_root, needs_umoci, scratch,
                        tree_diffs, umoci_unpack, write_layout)
from .mountutil import kernel_mount
from .test_image_commit import image_mount

__all__ = ["mount_kind", "scratch"]
pytestmark = [pytest.mark.slow, needs_root, needs_umoci]
MIRROR = "http://deb.debian.org/debian"


@pytest.fixture(scope="module")
def debian_layout() -> Iterator[Path]:
    """An OCI layout holding a minbase bookworm as one layer (built once per run)."""
    if shutil.which("debootstrap") is None:
        pytest.skip("debootstrap is not installed")
    base = Path("/tmp/image-helper")
    base.mkdir(exist_ok=True)
    work = Path(subprocess.run(["mktemp", "-d", "-p", str(base), "debian-XXXX"],
                               capture_output=True, text=True, check=True).stdout.strip())
    try:
        rootfs = work / "rootfs"
        subprocess.run(["debootstrap", "--variant=minbase", "bookworm", str(rootfs), MIRROR],
                       check=True, capture_output=True, timeout=1800)
        layer = subprocess.run(["tar", "--xattrs", "--xattrs-include=*", "--numeric-owner",
                                "--format=pax", "-C", str(rootfs), "-cf", "-", "."],
                               check=True, capture_output=True, timeout=600).stdout
        shutil.rmtree(rootfs)
        write_layout(work / "oci", "bookworm", [layer], "gzip")  # umoci 0.4 reads no zstd
        yield work / "oci"
    finally:
        shutil.rmtree(work, ignore_errors=True)


def chroot(mnt: Path, script: str, timeout: int = 900) -> str:
    res = subprocess.run(["chroot", str(mnt), "/bin/sh", "-ec", script], capture_output=True,
                         text=True, timeout=timeout,
                         env={"PATH": "/usr/sbin:/usr/bin:/sbin:/bin",
                              "DEBIAN_FRONTEND": "noninteractive"})
    assert res.returncode == 0, f"{script}\n{res.stdout[-2000:]}\n{res.stderr[-2000:]}"
    return res.stdout


def test_debian_apt_install_commit_round_trip(debian_layout: Path, scratch: Path,
                                              mount_kind: str) -> None:
    store = scratch / "store"
    cowfs("image", "import", f"{debian_layout}:bookworm", "--name", "deb", store=store)
    layout = scratch / "oci"
    shutil.copytree(debian_layout, layout)
    with image_mount(mount_kind, store, "deb", scratch / "mnt", scratch / "upper") as mnt:
        assert_same_tree(mnt, umoci_unpack(f"{layout}:bookworm", scratch / "b0"))
        shutil.copy("/etc/resolv.conf", mnt / "etc" / "resolv.conf")
        chroot(mnt, "apt-get update -q && apt-get install -y -q --no-install-recommends hello"
                    " && rm -rf /var/lib/apt/lists/* && rm /etc/resolv.conf")
        assert chroot(mnt, "hello").strip() == "Hello, world!"
        changes = cowfs("diff", str(mnt), store=store).stdout.splitlines()
        assert "A /usr/bin/hello" in changes
        cowfs("commit", str(mnt), "-o", str(scratch / "layer.tar.gz"),
              "--image", f"{layout}:hello", store=store)
        got = umoci_unpack(f"{layout}:hello", scratch / "b1")
        mount_diffs = tree_diffs(got, mnt, file_mtimes=mount_kind == "kernel")
        if shutil.which("runc"):
            run_in_runc(mnt, scratch / "b1" / "config.json", scratch / "runc")
    # What the kernel makes of the upper dir is what the committed layer holds.
    s = Store(str(store))
    lowers = [Path(p) for p in s.lower_dirs(s.image("deb"))]
    with kernel_mount([scratch / "upper", *lowers], None, None, scratch / "mnt2",
                      "redirect_dir=follow,metacopy=on") as mnt2:
        assert_same_tree(got, mnt2)
    assert not mount_diffs, mount_diffs


def run_in_runc(mnt: Path, umoci_config: Path, bundle: Path) -> None:
    """runc with the mount as the container's root filesystem."""
    bundle.mkdir()
    config = json.loads(umoci_config.read_text())
    config["root"] = {"path": str(mnt), "readonly": False}
    config["process"]["args"] = ["/usr/bin/hello"]
    config["process"]["terminal"] = False
    (bundle / "config.json").write_text(json.dumps(config))
    name = f"cowfs-test-{bundle.parent.name[-8:]}"
    try:
        res = subprocess.run(["runc", "run", "--bundle", str(bundle), name],
                             capture_output=True, text=True, timeout=120)
        assert res.returncode == 0 and res.stdout.strip() == "Hello, world!", res
    finally:
        subprocess.run(["runc", "delete", "--force", name], capture_output=True)
