"""The store's invariants under real mounts and concurrent writers: live mounts are
known by their daemon's locks, stale records expire, OCI layout writes lose nothing."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import tarfile
import time
from pathlib import Path

import pytest

from cowfs import state
from cowfs.image.oci import open_source
from cowfs.image.records import ImageRecord, RecordError, SCHEMA, parse
from cowfs.image.store import Store, chain_ids

from .imageutil import (COWFS, cowfs, cowfs_unready, directory, file, needs_root, scratch, sha,
                        tar_bytes, write_layout)
from .mountutil import is_mountpoint, unmount

__all__ = ["scratch"]

BASE = tar_bytes([directory("etc"), file("etc/os-release", b"ID=test\n")])
TOP = tar_bytes([directory("etc"), file("etc/motd", b"hi\n")])


def test_chain_ids_follow_containerd() -> None:
    a, b = "sha256:" + "a" * 64, "sha256:" + "b" * 64
    import hashlib
    assert chain_ids([a, b]) == [a, "sha256:" + hashlib.sha256(f"{a} {b}".encode()).hexdigest()]


def test_records_are_parsed_strictly() -> None:
    good = {"name": "n", "id": "sha256:x", "source": "/s", "kind": "oci", "imported": "t",
            "manifest": {}, "config": "{}", "layers": [], "chain": [], "aliases": [],
            "schema": SCHEMA}
    assert parse(ImageRecord, good, "r").name == "n"
    for bad, why in (({**good, "schema": 1}, "schema 1"), ({**good, "extra": 1}, "unexpected"),
                     ({k: v for k, v in good.items() if k != "chain"}, "missing"),
                     ({**good, "layers": "sha256:x"}, "field 'layers'"),
                     ({**good, "chain": [1]}, "field 'chain'")):
        with pytest.raises(RecordError, match=why):
            parse(ImageRecord, bad, "r")


def _needs_cowfs() -> None:
    if os.geteuid() != 0:
        pytest.skip("mounting needs root")
    if reason := cowfs_unready():
        pytest.skip(reason)


@needs_root
def test_live_mount_is_known_by_its_lock_and_a_dead_one_expires(scratch: Path) -> None:
    _needs_cowfs()
    write_layout(scratch / "oci", "a", [BASE, TOP])
    store = Store(str(scratch / "store"))
    store.import_image(open_source(f"{scratch}/oci:a"), progress=False)
    lowers = store.lower_dirs(store.image("oci:a"))
    mnt = scratch / "mnt"
    mnt.mkdir()
    subprocess.run([*COWFS, "-o", "lowerdir=" + ":".join(lowers), str(mnt)], check=True,
                   timeout=60)
    pid = None
    try:
        rec = state.find_mount(str(mnt))
        assert rec is not None
        pid = rec["pid"]
        assert all(state.is_locked(p) for p in lowers)
        store.remove("oci:a")
        deleted, usage = store.prune_layers()
        assert deleted == [] and set(usage.users.values()) == {"a cowfs mount"}
        os.kill(pid, signal.SIGKILL)  # the daemon dies; its locks go with it
        for _ in range(100):
            if not state.is_locked(lowers[0]):
                break
            time.sleep(0.05)
    finally:
        unmount(mnt)
        if pid is not None and not is_mountpoint(mnt):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
    assert not state.is_locked(lowers[0])
    # The record the dead daemon left is stale: not a live mount, and it is dropped.
    assert state.find_mount(str(mnt)) is None
    assert all(r["mountpoint"] != str(mnt) for r in state.live_mount_records())
    assert not os.path.exists(state._state_file(str(mnt)))
    deleted, _ = store.prune_layers()
    assert len(deleted) == 2


@needs_root
def test_a_mounted_container_cannot_be_removed(scratch: Path) -> None:
    _needs_cowfs()
    write_layout(scratch / "oci", "a", [BASE])
    st = scratch / "store"
    cowfs("image", "import", f"{scratch}/oci:a", store=st)
    mnt = scratch / "mnt"
    mnt.mkdir()
    try:
        cowfs("image", "mount", f"{scratch}/oci:a", str(mnt), store=st)
        (mnt / "new").write_text("x")
        cid = Store(str(st)).containers()[0].id
        res = cowfs("image", "rm", cid, store=st, check=False)
        assert res.returncode == 1 and "unmount it first" in res.stderr
    finally:
        unmount(mnt)
    assert "removed container" in cowfs("image", "rm", cid, store=st).stdout


def test_concurrent_commits_into_one_layout_lose_nothing(scratch: Path) -> None:
    lower, layout = scratch / "lower", scratch / "layout"
    (lower / "etc").mkdir(parents=True)
    uppers = []
    for i in range(4):
        u = scratch / f"upper{i}"
        (u / "etc").mkdir(parents=True)
        (u / "etc" / f"f{i}").write_bytes(os.urandom(200_000))
        uppers.append(u)
    env = {**os.environ, "COWFS_STORE": str(scratch / "store")}
    procs = [subprocess.Popen([*COWFS, "commit", str(u), "--lower", str(lower),
                               "--image", f"{layout}:t{i}"], env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE)
             for i, u in enumerate(uppers)]
    for p in procs:
        assert p.wait(timeout=120) == 0, p.stderr.read()  # type: ignore[union-attr]
    index = json.loads((layout / "index.json").read_text())
    tags = sorted(d["annotations"]["org.opencontainers.image.ref.name"]
                  for d in index["manifests"])
    assert tags == ["t0", "t1", "t2", "t3"]
    blobs = os.listdir(layout / "blobs" / "sha256")
    assert not [b for b in blobs if b.endswith(".tmp") or b.startswith("new-")]
    for i in range(4):
        src = open_source(f"{layout}:t{i}")
        with tarfile.open(fileobj=src.layers[-1].opener(), mode="r|*") as tf:
            assert f"etc/f{i}" in [m.name for m in tf]


@pytest.mark.parametrize("how", ["gzip", "zstd", "none"])
def test_commit_compression_and_base_blobs_linked(scratch: Path, how: str) -> None:
    write_layout(scratch / "oci", "a", [BASE])
    st = scratch / "store"
    cowfs("image", "import", f"{scratch}/oci:a", store=st)
    store = Store(str(st))
    upper = scratch / "upper"
    (upper / "etc").mkdir(parents=True)
    (upper / "etc" / "new").write_bytes(b"n" * 100_000)
    cowfs("commit", str(upper), "--lower", store.lower_dirs(store.image("oci:a"))[0],
          "--image", f"{scratch}/oci:b", "--compression", how, store=st)
    src = open_source(f"{scratch}/oci:b")
    top = src.manifest["layers"][-1]
    assert top["mediaType"].endswith({"gzip": "+gzip", "zstd": "+zstd", "none": "tar"}[how])
    base_blob = scratch / "oci" / "blobs" / "sha256" / src.layers[0].digest[7:]  # type: ignore
    assert base_blob.stat().st_nlink == 1  # same layout: nothing to copy
    store2 = Store(str(scratch / "store2"))
    store2.import_image(src, progress=False)
    assert (Path(store2.lower_dirs(store2.image("oci:b"))[0]) / "etc/new").stat().st_size \
        == 100_000
    # Into another layout on the same filesystem the base blob is linked, not copied.
    cowfs("commit", str(upper), "--lower", store.lower_dirs(store.image("oci:a"))[0],
          "--image", f"{scratch}/other:b", store=st)
    assert base_blob.stat().st_nlink == 2
    assert sha(BASE) == src.layers[0].diff_id
