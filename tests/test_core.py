"""The overlay core without a mount: the same calls the FUSE adapter makes,
each test ending with an fsck-style invariant check."""
from __future__ import annotations

import errno
import os
from pathlib import Path

import threading

import pytest

from cowfs.overlay import dir as dir_ops, file, inode as inode_attrs, xattrs
from cowfs.overlay.namei import lookup
from cowfs.overlay.params import parse_mount_options
from cowfs.overlay import Overlay
from cowfs.overlay.readdir import merged_names

from .conftest import build_standard_layers
from .fsck import check_invariants


@pytest.fixture
def ov(tmp_path: Path):
    layers = build_standard_layers(tmp_path / "layers")
    for d in ("u", "w", "m"):
        (tmp_path / d).mkdir()
    cfg = parse_mount_options(
        [f"lowerdir={':'.join(map(str, layers))},upperdir={tmp_path}/u,workdir={tmp_path}/w"],
        str(tmp_path / "m"))
    overlay = Overlay(cfg)
    # The transport calls the core holding its lock; so do these tests.
    with overlay.lock:
        yield overlay
        check_invariants(overlay)
    overlay.close()


def walk(ov: Overlay, path: str):
    node = ov.root
    for comp in path.split("/"):
        node = lookup(ov, node, comp.encode())
        assert node is not None, path
    return node


def test_lookup_and_listing(ov):
    assert sorted(merged_names(ov, ov.root)) == sorted(
        [b"etc", b"bin", b"data", b"replaced", b"deep", b"fifo", b"app"])
    assert lookup(ov, walk(ov, "bin"), b"tool") is None          # whited out
    assert merged_names(ov, walk(ov, "replaced")) == [b"new"]    # opaque
    assert sorted(merged_names(ov, walk(ov, "deep/a"))) == [b"b", b"top"]
    assert lookup(ov, ov.root, b".wh.gone") is None


def test_copy_up_keeps_inode_and_content(ov):
    node = walk(ov, "etc/passwd")
    ino = node.ino
    h = file.open_file(ov, node, os.O_WRONLY | os.O_APPEND)
    file.write(ov, h, 11, b"more\n")
    file.release(h)
    assert node.layer == 0 and node.ino == ino
    assert (Path(ov.upper.path) / "etc/passwd").read_bytes() == b"root:x:0:0\nmore\n"
    assert walk(ov, "etc/passwd") is node


def test_concurrent_writers_share_one_copy_up(ov):
    node = walk(ov, "data/big")
    handles = []
    copies = []
    real_copy = ov.unlocked

    def counting(fn, *args):
        copies.append(fn.__name__)
        return real_copy(fn, *args)
    ov.unlocked = counting

    def opener():
        with ov.lock:
            handles.append(file.open_file(ov, node, os.O_RDWR))
    threads = [threading.Thread(target=opener) for _ in range(5)]
    ov.lock.release()
    try:
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    finally:
        ov.lock.acquire()
    for h in handles:
        file.release(h)
    assert len(handles) == 5
    assert node.layer == 0 and not node.metacopy
    assert copies.count("copy_data") == 1


def test_metacopy_then_data(ov):
    node = walk(ov, "data/big")
    inode_attrs.setattr_(ov, node, mode=0o600)
    assert node.metacopy
    up = Path(ov.upper.path) / "data/big"
    assert os.lstat(up).st_blocks == 0
    h = file.open_file(ov, node, os.O_RDONLY)
    assert file.read(ov, h, 65536, 10) == b"tail"
    inode_attrs.setattr_(ov, node, size=10)
    assert not node.metacopy and up.read_bytes() == b"\0" * 10
    assert file.read(ov, h, 0, 100) == b"\0" * 10    # the reader followed the copy-up
    file.release(h)


def test_unlink_rmdir_mkdir(ov):
    dir_ops.unlink(ov, walk(ov, "etc"), b"hosts")
    assert lookup(ov, walk(ov, "etc"), b"hosts") is None
    with pytest.raises(OSError) as e:
        dir_ops.rmdir(ov, walk(ov, "deep"), b"a")
    assert e.value.errno == errno.ENOTEMPTY
    for path, name in (("deep/a/b/c", b"file"), ("deep/a/b", b"mid"), ("deep/a", b"top")):
        dir_ops.unlink(ov, walk(ov, path), name)
    dir_ops.rmdir(ov, walk(ov, "deep/a/b"), b"c")
    dir_ops.rmdir(ov, walk(ov, "deep/a"), b"b")
    dir_ops.rmdir(ov, walk(ov, "deep"), b"a")
    assert merged_names(ov, walk(ov, "deep")) == []
    dir_ops.mkdir(ov, walk(ov, "deep"), b"a", 0o755, 0, 0)
    assert merged_names(ov, walk(ov, "deep/a")) == []
    assert os.getxattr(Path(ov.upper.path) / "deep/a", "trusted.overlay.opaque") == b"y"


def test_rename_lower_dir_redirects(ov):
    dir_ops.rename(ov, walk(ov, "deep"), b"a", ov.root, b"moved", 0)
    assert sorted(merged_names(ov, walk(ov, "moved"))) == [b"b", b"top"]
    assert lookup(ov, walk(ov, "deep"), b"a") is None
    assert os.getxattr(Path(ov.upper.path) / "moved", "trusted.overlay.redirect") == b"/deep/a"


def test_private_xattrs(ov):
    node = walk(ov, "replaced")
    assert not [n for n in xattrs.listxattr(ov, node) if "overlay" in n]
    with pytest.raises(OSError) as e:
        xattrs.setxattr(ov, node, "trusted.overlay.opaque", b"n")
    assert e.value.errno == errno.EPERM
