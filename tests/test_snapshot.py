"""cowfs.snapshot: containerd's snapshotter semantics, bookkeeping, concurrency, crashes."""
from __future__ import annotations

import io
import json
import os
import signal
import subprocess
import sys
import tarfile
import textwrap
import time
from pathlib import Path

import pytest

from cowfs.image.oci import open_source
from cowfs.image.store import chain_ids
from cowfs.snapshot import (MOUNT_TYPE, AlreadyExists, FailedPrecondition, Info, InvalidArgument,
                            Kind, NotFound, SnapshotError, Snapshotter)

from .imageutil import (COWFS, cowfs_unready, directory, file, needs_root, scratch, sha,
                        tar_bytes, write_layout)
from .mountutil import unmount

__all__ = ["scratch"]

BASE = tar_bytes([directory("etc"), file("etc/os-release", b"ID=test\n"), directory("tmp", mode=0o1777),
                  file("gone", b"x")])
TOP = tar_bytes([directory("etc"), file("etc/motd", b"hi\n"), file(".wh.gone")])


def snap(tmp: Path) -> Snapshotter:
    return Snapshotter(str(tmp / "store"))


def layered(sn: Snapshotter) -> str:
    base = sn.apply(None, io.BytesIO(BASE))
    return sn.apply(base.name, io.BytesIO(TOP)).name


# -- semantics ---------------------------------------------------------------------

def test_apply_names_layers_by_chain_id_and_shares_them(scratch: Path) -> None:
    sn = snap(scratch)
    top = layered(sn)
    assert top == chain_ids([sha(BASE), sha(TOP)])[1]
    info = sn.stat(top)
    assert info.kind == Kind.COMMITTED and info.parent == sha(BASE)
    assert sn.apply(sn.stat(top).parent, io.BytesIO(TOP)).name == top  # the same layer again
    with pytest.raises(SnapshotError, match="mismatch"):
        sn.apply(None, io.BytesIO(TOP), name="x", diff_id=sha(b"another layer"))
    assert "x" not in [i.name for i in sn.walk()]


def test_kinds_parents_and_errors(scratch: Path) -> None:
    sn = snap(scratch)
    top = layered(sn)
    (m,) = sn.prepare("c1", top, labels={"app": "web"})
    assert m.type == MOUNT_TYPE and m.options[1].startswith("upperdir=") and "ro" not in m.options
    assert m.options[0] == "lowerdir=" + ":".join(
        [sn.tree(sn._get(top)), sn.tree(sn._get(sha(BASE)))])
    (v,) = sn.view("v1", top)
    assert "ro" in v.options and not any(o.startswith("upperdir=") for o in v.options)
    with pytest.raises(AlreadyExists):
        sn.prepare("c1", top)
    with pytest.raises(AlreadyExists):
        sn.prepare(top)  # names and keys: one namespace
    with pytest.raises(NotFound):
        sn.prepare("c2", "nope")
    with pytest.raises(FailedPrecondition, match="not committed"):
        sn.prepare("c2", "c1")
    with pytest.raises(FailedPrecondition, match="committed"):
        sn.mounts(top)
    with pytest.raises(FailedPrecondition, match="has children"):
        sn.remove(top)
    with pytest.raises(InvalidArgument):
        sn.prepare("")
    Path(sn.tree(sn._get("c1")), "etc").mkdir()
    Path(sn.tree(sn._get("c1")), "etc", "new").write_text("n")
    info = sn.commit("app-v2", "c1", labels={"v": "2"})
    assert info == Info("app-v2", Kind.COMMITTED, top, {"app": "web", "v": "2"},
                        info.created, info.updated)
    with pytest.raises(NotFound):
        sn.stat("c1")
    with pytest.raises(FailedPrecondition, match="not active"):
        sn.commit("again", "app-v2")
    sn.prepare("c3", "app-v2")
    assert sorted(str(c) for c in sn.changes("c3")) == []
    sn.remove("c3")
    sn.remove("v1")
    sn.remove("app-v2")
    assert sorted(i.name for i in sn.walk()) == sorted([top, sha(BASE)])


def test_labels_walk_and_usage(scratch: Path) -> None:
    sn = snap(scratch)
    top = layered(sn)
    sn.prepare("a", top, labels={"team": "x", "tier": "1"})
    sn.prepare("b", None, labels={"team": "y"})
    info = sn.update(Info("a", Kind.ACTIVE, labels={"tier": "2"}), ["labels.tier", "labels.team"])
    assert info.labels == {"tier": "2"}
    assert sn.update(Info("b", Kind.ACTIVE, labels={"z": "1"})).labels == {"z": "1"}
    with pytest.raises(InvalidArgument):
        sn.update(Info("b", Kind.ACTIVE), ["parent"])
    names = lambda *f: sorted(i.name for i in sn.walk(f))  # noqa: E731
    assert names("kind==active") == ["a", "b"]
    assert names('labels."tier"==2') == ["a"]
    assert names("labels.z", "name==a") == ["a", "b"]
    assert names("kind==committed,parent!=" + sha(BASE)) == [sha(BASE)]
    with pytest.raises(InvalidArgument):
        list(sn.walk(["bogus~=x"]))
    upper = Path(sn.tree(sn._get("a")))
    before = sn.usage("a")
    (upper / "big").write_bytes(b"x" * 100_000)
    after = sn.usage("a")
    assert after.inodes == before.inodes + 1 and after.size - before.size >= 100_000
    assert sn.usage(top).inodes == 4  # root, etc, etc/motd, the whiteout: parents excluded


def test_diff_is_an_oci_layer(scratch: Path) -> None:
    sn = snap(scratch)
    top = layered(sn)
    sn.prepare("c", top)
    upper = Path(sn.tree(sn._get("c")))
    (upper / "etc").mkdir()
    (upper / "etc" / "added").write_text("a")
    os.mknod(upper / "tmp", 0o020000, 0)  # a kernel-form whiteout: /tmp deleted
    assert sorted(str(c) for c in sn.changes("c")) == ["A /etc/added", "C /etc", "D /tmp"]
    layer = sn.diff("c", str(scratch / "c.tar.gz"))
    with tarfile.open(layer.path) as tf:
        assert sorted(tf.getnames()) == [".wh.tmp", "etc", "etc/added"]
    # The layer applied over the same parent is the same tree, as a committed snapshot.
    with open(layer.path, "rb") as f:
        again = sn.apply(top, f)
    assert again.name == chain_ids([top, layer.diff_id])[1]


def test_import_image_and_cleanup(scratch: Path) -> None:
    write_layout(scratch / "oci", "v1", [BASE, TOP])
    sn = snap(scratch)
    top = sn.import_image(f"{scratch}/oci:v1")
    assert top.name == chain_ids([sha(BASE), sha(TOP)])[1] and top.parent == sha(BASE)
    assert top.labels == {"cowfs.image": "oci:v1"}
    # Layers applied by the snapshotter and by the image import are the same store layers.
    assert sn.apply(None, io.BytesIO(BASE)).name == sha(BASE)
    assert len(sn.store.layer_ids()) == 2
    os.mkdir(os.path.join(sn.store.tmp_dir, "leftover"))
    assert sn.cleanup() == []  # everything is in use
    assert os.listdir(sn.store.tmp_dir) == []


def test_corrupt_snapshot_record_is_reported(scratch: Path) -> None:
    sn = snap(scratch)
    sn.prepare("a")
    rec = sn._get("a")
    Path(sn._dir(rec), "snapshot.json").write_text("{}")
    with pytest.raises(SnapshotError, match="unreadable snapshot records"):
        sn.stat("a")
    with pytest.raises(SnapshotError, match="no layer deleted"):
        sn.cleanup()


# -- concurrency and crashes ---------------------------------------------------------

WORKER = textwrap.dedent("""
    import io, sys
    from cowfs.snapshot import Snapshotter, SnapshotError
    sn = Snapshotter(sys.argv[1])
    me = sys.argv[2]
    top = sn.import_image(sys.argv[3])
    for i in range(15):
        key = f"{me}-{i}"
        sn.prepare(key, top.name)
        if i % 2:
            sn.commit(f"{key}-done", key)
            sn.remove(f"{key}-done")
        else:
            sn.remove(key)
    sn.prepare(f"{me}-kept", top.name)
""")


def test_two_processes_at_once(scratch: Path) -> None:
    write_layout(scratch / "oci", "v1", [BASE, TOP])
    store = scratch / "store"
    procs = [subprocess.Popen([sys.executable, "-c", WORKER, str(store), me, f"{scratch}/oci:v1"],
                              stderr=subprocess.PIPE, text=True) for me in ("p", "q")]
    for p in procs:
        assert p.wait(timeout=300) == 0, p.stderr.read()  # type: ignore[union-attr]
    sn = Snapshotter(str(store))
    assert sorted(i.name for i in sn.walk(["kind==active"])) == ["p-kept", "q-kept"]
    assert len(sn.store.layer_ids()) == 2 and os.listdir(sn.store.tmp_dir) == []
    assert len(os.listdir(sn.store.snapshots_dir)) == 4


KILLED_APPLY = textwrap.dedent("""
    import sys
    from cowfs.snapshot import Snapshotter
    Snapshotter(sys.argv[1]).apply(None, sys.stdin.buffer)
""")


def test_sigkill_during_apply_leaves_nothing_half_visible(scratch: Path) -> None:
    big = tar_bytes([file(f"f{i}", os.urandom(50_000)) for i in range(40)])
    store = scratch / "store"
    p = subprocess.Popen([sys.executable, "-c", KILLED_APPLY, str(store)], stdin=subprocess.PIPE)
    try:
        p.stdin.write(big[:len(big) // 2])  # type: ignore[union-attr]
        p.stdin.flush()  # type: ignore[union-attr]
        tmp = store / "tmp"
        for _ in range(400):  # until the unpacker has written files
            if tmp.exists() and any((d / "root").exists() and os.listdir(d / "root")
                                    for d in tmp.iterdir()):
                break
            time.sleep(0.05)
        else:
            pytest.fail("the apply never started")
    finally:
        p.send_signal(signal.SIGKILL)
        p.wait()
    sn = Snapshotter(str(store))
    assert list(sn.walk()) == [] and sn.store.layer_ids() == []
    assert sn.cleanup() == [] and os.listdir(store / "tmp") == []
    assert sn.apply(None, io.BytesIO(big)).name == sha(big)


KILLED_COMMIT = textwrap.dedent("""
    import os, sys, time
    from cowfs.image import commit
    real = commit._Exact.readinto
    n = [0]
    def slow(self, b):
        n[0] += 1
        if n[0] == 20:
            open(sys.argv[4], "w").close()
            time.sleep(600)
        return real(self, b)
    commit._Exact.readinto = slow
    from cowfs.cli import main
    sys.exit(main(["commit", sys.argv[1], "--lower", sys.argv[2], "--image", sys.argv[3]]))
""")


def test_sigkill_during_commit_leaves_the_layout_consistent(scratch: Path) -> None:
    lower, upper, layout = scratch / "lower", scratch / "upper", scratch / "layout"
    lower.mkdir()
    upper.mkdir()
    for i in range(40):
        (upper / f"f{i}").write_bytes(os.urandom(300_000))
    subprocess.run([*COWFS, "commit", str(upper), "--lower", str(lower), "--image",
                    f"{layout}:first"], check=True, capture_output=True,
                   env={**os.environ, "COWFS_STORE": str(scratch / "store")})
    index_before = (layout / "index.json").read_bytes()
    flag = scratch / "reading"
    p = subprocess.Popen([sys.executable, "-c", KILLED_COMMIT, str(upper), str(lower),
                          f"{layout}:second", str(flag)],
                         env={**os.environ, "COWFS_STORE": str(scratch / "store")})
    try:
        for _ in range(600):
            if flag.exists() or p.poll() is not None:
                break
            time.sleep(0.05)
        assert flag.exists(), "the commit never got to the files"
    finally:
        p.send_signal(signal.SIGKILL)
        p.wait()
    assert (layout / "index.json").read_bytes() == index_before
    blobs = layout / "blobs" / "sha256"
    for b in blobs.iterdir():  # a blob under a digest name is that digest, whole
        if len(b.name) == 64:
            assert sha(b.read_bytes()) == "sha256:" + b.name
    src = open_source(f"{layout}:first")
    assert len(src.layers) == 1
    # Another commit afterwards works and loses nothing.
    subprocess.run([*COWFS, "commit", str(upper), "--lower", str(lower), "--image",
                    f"{layout}:second"], check=True, capture_output=True,
                   env={**os.environ, "COWFS_STORE": str(scratch / "store")})
    tags = [d["annotations"]["org.opencontainers.image.ref.name"]
            for d in json.loads((layout / "index.json").read_text())["manifests"]]
    assert sorted(tags) == ["first", "second"]


# -- mounted ------------------------------------------------------------------------

@needs_root
def test_prepare_mount_commit_view(scratch: Path) -> None:
    if reason := cowfs_unready():
        pytest.skip(reason)
    sn = snap(scratch)
    top = layered(sn)
    sn.prepare("c", top)
    mnt = scratch / "mnt"
    mnt.mkdir()
    try:
        sn.mount("c", str(mnt))
        assert sorted(os.listdir(mnt)) == ["etc", "tmp"]
        (mnt / "etc" / "written").write_text("w\n")
        os.unlink(mnt / "etc" / "os-release")
        with pytest.raises(FailedPrecondition, match="mounted"):
            sn.commit("x", "c")
        with pytest.raises(FailedPrecondition, match="mounted"):
            sn.remove("c")
        sn.unmount(str(mnt))
        assert sorted(str(c) for c in sn.changes("c")) == \
            ["A /etc/written", "C /etc", "D /etc/os-release"]
        sn.commit("v2", "c")
        sn.view("look", "v2")
        sn.mount("look", str(mnt))
        assert sorted(os.listdir(mnt / "etc")) == ["motd", "written"]
        with pytest.raises(OSError):
            (mnt / "etc" / "nope").write_text("x")
        sn.unmount(str(mnt))
    finally:
        unmount(mnt)
    sn.remove("look")
    sn.remove("v2")
