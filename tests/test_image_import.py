"""`cowfs image import/ls/rm`: formats, the shared layer store, digest checks, hostile input."""
from __future__ import annotations

import io
import json
import lzma
import os
import stat
import subprocess
import tarfile
from pathlib import Path

import pytest

from cowfs.image.errors import ImageError
from cowfs.image.oci import LayerRef, open_source
from cowfs.image.store import Store, chain_ids

from .imageutil import (COWFS, assert_same_tree, build_umoci_image, compress, cowfs, directory, file,
                        member, needs_root, needs_umoci, put_blob, scratch, sha, snapshot, symlink,
                        tar_bytes, umoci_unpack, write_docker_archive, write_layout)
from .mountutil import kernel_mount

__all__ = ["scratch"]

BASE = tar_bytes([directory("etc"), file("etc/os-release", b"ID=test\n"),
                  directory("usr"), directory("usr/bin"),
                  file("usr/bin/tool", b"#!/bin/sh\n", mode=0o755),
                  symlink("bin", "usr/bin"), directory("tmp", mode=0o1777)])
TOP = tar_bytes([directory("etc"), file("etc/.wh.os-release"), file("etc/motd", b"hi\n")])


def store_state(store: Path) -> tuple:
    """What an import may change: layer dirs, image records, leftovers in tmp."""
    def ls(d: str) -> list[str]:
        p = store / d
        return sorted(os.listdir(p)) if p.exists() else []
    return ls("layers"), ls("images"), ls("tmp")


def layer_tree(store: Store, *tars: bytes) -> Path:
    """The store layer of the last tar, unpacked over the ones before it."""
    return Path(store.layer_root(chain_ids([sha(t) for t in tars])[-1]))


# -- formats -------------------------------------------------------------------------

@pytest.mark.parametrize("compression", ["gzip", "zstd", None, ["zstd", None]])
def test_oci_layout_compressions(scratch: Path, compression: object) -> None:
    write_layout(scratch / "oci", "v1", [BASE, TOP], compression)  # type: ignore[arg-type]
    res = cowfs("image", "import", f"{scratch}/oci:v1", store=scratch / "store")
    assert "2 layers, 2 new, 0 reused" in res.stdout
    store = Store(str(scratch / "store"))
    image = store.image("oci:v1")
    assert (layer_tree(store, BASE) / "usr/bin/tool").read_bytes() == b"#!/bin/sh\n"
    assert (layer_tree(store, BASE, TOP) / "etc/motd").read_bytes() == b"hi\n"
    assert store.lower_dirs(image)[0] == str(layer_tree(store, BASE, TOP))


@pytest.mark.parametrize("blob_names", [False, True])
def test_docker_save_archive(scratch: Path, blob_names: bool) -> None:
    write_docker_archive(scratch / "img.tar", "example/app:1.0", [BASE, TOP], blob_names)
    res = cowfs("image", "import", str(scratch / "img.tar"), store=scratch / "store")
    assert "imported example/app:1.0" in res.stdout
    store = Store(str(scratch / "store"))
    assert store.image("example/app:1.0").kind == "docker-archive"
    assert (layer_tree(store, BASE) / "etc/os-release").exists()


def test_tag_selection(scratch: Path) -> None:
    write_layout(scratch / "oci", "one", [BASE])
    write_layout(scratch / "oci", "two", [BASE, TOP])
    res = cowfs("image", "import", str(scratch / "oci"), store=scratch / "store", check=False)
    assert res.returncode == 1 and "one, two" in res.stderr
    res = cowfs("image", "import", f"{scratch}/oci:three", store=scratch / "store", check=False)
    assert res.returncode == 1 and "no image tagged 'three'" in res.stderr
    assert len(open_source(f"{scratch}/oci:two").layers) == 2


# -- the shared store ------------------------------------------------------------------

def test_layers_are_shared_and_removed_when_unused(scratch: Path) -> None:
    st = scratch / "store"
    write_layout(scratch / "oci", "a", [BASE])
    write_layout(scratch / "oci", "b", [BASE, TOP])
    cowfs("image", "import", f"{scratch}/oci:a", store=st)
    res = cowfs("image", "import", f"{scratch}/oci:b", "--name", "bee", store=st)
    assert "2 layers, 1 new, 1 reused" in res.stdout
    ls = cowfs("image", "ls", "--layers", store=st).stdout
    assert "oci:a" in ls and "bee" in ls
    store = Store(str(st))
    container = store.new_container(store.image("bee"), None, str(scratch))
    cowfs("image", "rm", "oci:a", store=st)
    assert len(store.layer_ids()) == 2  # BASE is still bee's
    cowfs("image", "rm", "bee", store=st)
    assert len(store.layer_ids()) == 2  # ... and the container's
    res = cowfs("image", "rm", container.id, store=st)
    assert "deleted 2 unused layer(s)" in res.stdout
    assert store.layer_ids() == [] and store.images() == []
    res = cowfs("image", "rm", "nope", store=st, check=False)
    assert res.returncode == 1 and "no image or container 'nope'" in res.stderr


@needs_root
def test_layers_of_a_live_mount_are_kept(scratch: Path) -> None:
    write_layout(scratch / "oci", "a", [BASE])
    store = Store(str(scratch / "store"))
    src = open_source(f"{scratch}/oci:a")
    store.import_image(src, progress=False)
    lowers = [Path(p) for p in store.lower_dirs(store.image("oci:a"))]
    with kernel_mount(lowers, None, None, scratch / "mnt"):
        store.remove("oci:a")
        deleted, used = store.prune_layers()
        assert deleted == [] and list(used.users.values()) == ["a kernel overlay mount"]
    assert len(store.prune_layers()[0]) == 1


# -- verification -------------------------------------------------------------------------

def _blob(layout: Path, digest: str) -> Path:
    return layout / "blobs" / "sha256" / digest[7:]


def _tamper_layer(layout: Path, m: dict) -> str:
    """Replace the top layer's blob with another valid one: only the digest tells."""
    d = m["layers"][-1]["digest"]
    _blob(layout, d).write_bytes(compress(tar_bytes([file("etc/motd", b"evil\n")]), "gzip"))
    return d


def _corrupt_layer(layout: Path, m: dict) -> str:
    d = m["layers"][-1]["digest"]
    data = bytearray(_blob(layout, d).read_bytes())
    data[len(data) // 2] ^= 0xFF
    _blob(layout, d).write_bytes(bytes(data))
    return d


def _tamper_config(layout: Path, m: dict) -> str:
    d = m["config"]["digest"]
    cfg = json.loads(_blob(layout, d).read_text())
    cfg["config"]["Env"] = ["EVIL=1"]
    _blob(layout, d).write_text(json.dumps(cfg))
    return d


def _tamper_manifest(layout: Path, m: dict) -> str:
    index = json.loads((layout / "index.json").read_text())
    d = index["manifests"][0]["digest"]
    _blob(layout, d).write_text(_blob(layout, d).read_text().replace('"layers"', '"layers" '))
    return d


@pytest.mark.parametrize("tamper", [_tamper_layer, _corrupt_layer, _tamper_config,
                                    _tamper_manifest])
def test_digest_mismatch_names_the_blob_and_leaves_the_store(scratch: Path, tamper) -> None:
    st = scratch / "store"
    write_layout(scratch / "good", "v1", [BASE])
    cowfs("image", "import", f"{scratch}/good:v1", store=st)
    before = store_state(st)
    m = write_layout(scratch / "oci", "v1", [BASE, TOP])
    digest = tamper(scratch / "oci", m)
    res = cowfs("image", "import", f"{scratch}/oci:v1", store=st, check=False)
    assert res.returncode == 1
    assert digest in res.stderr and "mismatch" in res.stderr, res.stderr
    assert store_state(st) == before


def test_wrong_diff_id_in_the_config(scratch: Path) -> None:
    """Layers unpacked before the failing one must not appear either."""
    m = write_layout(scratch / "oci", "v1", [TOP, BASE], None)
    cdesc = m["config"]
    cfg = json.loads(_blob(scratch / "oci", cdesc["digest"]).read_text())
    cfg["rootfs"]["diff_ids"][1] = "sha256:" + "0" * 64
    # Rewrite the image consistently around the lying config.
    data = json.dumps(cfg).encode()
    m["config"] = {**cdesc, "digest": put_blob(scratch / "oci", data), "size": len(data)}
    mb = json.dumps(m).encode()
    index = {"schemaVersion": 2, "manifests": [{
        "mediaType": m["mediaType"], "digest": put_blob(scratch / "oci", mb), "size": len(mb),
        "annotations": {"org.opencontainers.image.ref.name": "v1"}}]}
    (scratch / "oci" / "index.json").write_text(json.dumps(index))
    res = cowfs("image", "import", f"{scratch}/oci:v1", store=scratch / "store", check=False)
    assert res.returncode == 1 and "(uncompressed)" in res.stderr and "0" * 64 in res.stderr
    assert store_state(scratch / "store") == ([], [], [])


def test_hostile_layer_import_fails_cleanly(scratch: Path) -> None:
    evil = tar_bytes([symlink("etc", "/etc"), file("etc/cowfs-test-evil", b"x")])
    write_layout(scratch / "oci", "v1", [BASE, evil])
    res = cowfs("image", "import", f"{scratch}/oci:v1", store=scratch / "store", check=False)
    assert res.returncode == 1 and "refusing" in res.stderr and "symlink" in res.stderr
    assert not os.path.exists("/etc/cowfs-test-evil")
    assert store_state(scratch / "store") == ([], [], [])


def test_interrupted_import_leaves_nothing(scratch: Path) -> None:
    class Boom(io.RawIOBase):
        def __init__(self) -> None:
            self.left = 3000

        def readable(self) -> bool:
            return True

        def readinto(self, b: bytearray) -> int:  # type: ignore[override]
            if self.left <= 0:
                raise KeyboardInterrupt
            n = min(len(b), self.left, len(BASE))
            b[:n] = BASE[:n]
            self.left -= n
            return n

    write_layout(scratch / "oci", "v1", [TOP, BASE])
    src = open_source(f"{scratch}/oci:v1")
    src.layers[1] = LayerRef("layer blob boom", src.layers[1].diff_id, None, "", None,
                             Boom)  # type: ignore[arg-type]
    store = Store(str(scratch / "store"))
    os.makedirs(store.tmp_dir)
    os.mkdir(os.path.join(store.tmp_dir, "left-by-a-killed-import"))
    with pytest.raises(KeyboardInterrupt):
        store.import_image(src, progress=False)
    assert store_state(scratch / "store") == ([], [], [])


def test_missing_source(scratch: Path) -> None:
    with pytest.raises(ImageError, match="no such image"):
        open_source(str(scratch / "nothing:tag"))


# -- against umoci --------------------------------------------------------------------------

@needs_root
@needs_umoci
def test_import_mount_matches_umoci_unpack(scratch: Path) -> None:
    image = build_umoci_image(scratch)
    cowfs("image", "import", image, "--name", "t", store=scratch / "store")
    store = Store(str(scratch / "store"))
    lowers = [Path(p) for p in store.lower_dirs(store.image("t"))]
    want = umoci_unpack(image, scratch / "bundle")
    with kernel_mount(lowers, None, None, scratch / "mnt") as mnt:
        assert_same_tree(mnt, want)
        assert "sub" not in os.listdir(mnt / "data") and os.listdir(mnt / "opq") == ["fresh"]
        assert snapshot(mnt)["data/a"] == snapshot(want)["data/a"]


def test_multi_platform_index_picks_this_host(scratch: Path) -> None:
    layout = scratch / "oci"
    m = write_layout(layout, "x", [BASE])
    index = json.loads((layout / "index.json").read_text())
    own = index["manifests"][0]
    other = {**own, "digest": put_blob(layout, json.dumps({**m, "layers": []}).encode())}
    other.pop("annotations")
    own = {k: v for k, v in own.items() if k != "annotations"}
    sub = {"schemaVersion": 2, "mediaType": "application/vnd.oci.image.index.v1+json",
           "manifests": [{**other, "platform": {"os": "linux", "architecture": "s390x"}},
                         {**own, "platform": {"os": "linux", "architecture": "amd64"}}]}
    data = json.dumps(sub).encode()
    index["manifests"] = [{"mediaType": sub["mediaType"], "digest": put_blob(layout, data),
                           "size": len(data),
                           "annotations": {"org.opencontainers.image.ref.name": "multi"}}]
    (layout / "index.json").write_text(json.dumps(index))
    if os.uname().machine != "x86_64":
        pytest.skip("the index is written for amd64")
    assert len(open_source(f"{layout}:multi").layers) == 1


def test_mount_errors(scratch: Path) -> None:
    res = cowfs("image", "mount", "nope", str(scratch), store=scratch / "s", check=False)
    assert res.returncode == 1 and "no image 'nope'" in res.stderr
    write_layout(scratch / "oci", "v1", [BASE])
    cowfs("image", "import", f"{scratch}/oci:v1", store=scratch / "s")
    res = cowfs("image", "mount", "oci:v1", str(scratch / "missing"), store=scratch / "s",
                check=False)
    assert res.returncode == 2 and "does not exist" in res.stderr


@needs_root
def test_unprivileged_import_is_canonical(scratch: Path) -> None:
    """As a normal user: the same tree as root's (kernel-form whiteouts, opaque
    dirs marked in user. xattrs), except owners and device nodes, which need root."""
    evil_dev = tar_bytes([directory("dev"), member("dev/null", tarfile.CHRTYPE, dev=(1, 3)),
                          file("dev/.wh.old"), directory("opq"), file("opq/.wh..wh..opq"),
                          file("opq/x", b"x"), file(".wh.gone"), directory("gone"),
                          file("gone/new", b"n")])
    write_layout(scratch / "oci", "v1", [BASE, evil_dev])
    os.chmod(scratch, 0o755)
    store_dir = scratch / "store"
    store_dir.mkdir()
    os.chown(store_dir, 65534, 65534)
    pid = os.fork()
    if pid == 0:  # the child drops to nobody and imports
        code = 1
        try:
            os.setgroups([])
            os.setgid(65534)
            os.setuid(65534)
            src = open_source(f"{scratch}/oci:v1")
            summary = Store(str(store_dir)).import_image(src, progress=False)
            code = 0 if any("device node" in w for w in summary.warnings) else 3
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    Store(str(scratch / "rootstore")).import_image(open_source(f"{scratch}/oci:v1"),
                                                   progress=False)
    user = layer_tree(Store(str(store_dir)), BASE, evil_dev)
    root = layer_tree(Store(str(scratch / "rootstore")), BASE, evil_dev)
    assert sorted(os.listdir(user / "dev")) == ["old"]
    assert sorted(os.listdir(root / "dev")) == ["null", "old"]
    assert stat.S_ISCHR((user / "dev" / "old").lstat().st_mode)
    for d in ("opq", "gone"):
        assert os.getxattr(user / d, "user.overlay.opaque") == b"y"
        assert os.getxattr(root / d, "trusted.overlay.opaque") == b"y"
    assert (user / "opq" / "x").stat().st_uid == 65534
    assert Store(str(store_dir)).layer_record(chain_ids([sha(BASE), sha(evil_dev)])[1]).owners \
        is False


def test_chain_ids_keep_layers_over_different_bases_apart(scratch: Path) -> None:
    """The same layer over two bases is two store layers: an implied directory
    takes each base's metadata (here /tmp, 0700 in one, 1777 in the other)."""
    base_a = tar_bytes([directory("tmp", mode=0o700), file("a")])
    base_b = tar_bytes([directory("tmp", mode=0o1777), file("b")])
    app = tar_bytes([file("tmp/app.sock-dir-marker", b"x")])
    write_layout(scratch / "oci", "a", [base_a, app])
    write_layout(scratch / "oci", "b", [base_b, app])
    st = scratch / "store"
    cowfs("image", "import", f"{scratch}/oci:a", store=st)
    res = cowfs("image", "import", f"{scratch}/oci:b", store=st)
    assert "2 new, 0 reused" in res.stdout
    store = Store(str(st))
    for base, mode in ((base_a, 0o700), (base_b, 0o1777)):
        top = layer_tree(store, base, app)
        assert stat.S_IMODE((top / "tmp").lstat().st_mode) == mode
    assert len(store.layer_ids()) == 4


def test_corrupt_record_pins_every_layer(scratch: Path) -> None:
    st = scratch / "store"
    write_layout(scratch / "oci", "a", [BASE])
    write_layout(scratch / "oci", "b", [BASE, TOP])
    cowfs("image", "import", f"{scratch}/oci:a", store=st)
    cowfs("image", "import", f"{scratch}/oci:b", store=st)
    (st / "images" / "broken.json").write_text('{"schema": 2, "name": "broken"')
    cowfs("image", "rm", "oci:a", store=st, check=False)
    res = cowfs("image", "rm", "oci:b", store=st, check=False)
    assert res.returncode == 1 and "broken.json" in res.stderr and "deleted no layers" in res.stdout
    assert len(Store(str(st)).layer_ids()) == 2
    (st / "images" / "broken.json").write_text(json.dumps({"schema": 1, "name": "old"}))
    res = cowfs("image", "ls", store=st)
    assert "schema 1" in res.stderr
    (st / "images" / "broken.json").unlink()
    assert "deleted 2 unused" in cowfs("image", "rm", store=st).stdout


def test_image_names(scratch: Path) -> None:
    """mount/rm take what import was given (DIR:TAG), the printed name, or the bare tag."""
    write_layout(scratch / "oci", "l3", [BASE])
    write_layout(scratch / "oci2", "l3", [BASE, TOP])
    st = scratch / "store"
    store = Store(str(st))
    res = subprocess.run([*COWFS, "image", "import", "./oci:l3"], cwd=scratch, text=True,
                         capture_output=True, env={**os.environ, "COWFS_STORE": str(st)})
    assert "imported oci:l3" in res.stdout, res.stderr
    for ref in ("oci:l3", f"{scratch}/oci:l3"):
        assert store.image(ref).name == "oci:l3"
    assert store.image("l3").name == "oci:l3"  # the bare tag, while unambiguous
    cowfs("image", "import", f"{scratch}/oci2:l3", store=st)
    with pytest.raises(ImageError, match="several images"):
        store.image("l3")
    assert store.image(f"{scratch}/oci2:l3").name == "oci2:l3"


@pytest.mark.parametrize("ext", [".tar", ".tar.gz", ".tar.xz", ".tar.zst"])
def test_rootfs_tarball_is_a_one_layer_image(scratch: Path, ext: str) -> None:
    data = tar_bytes([directory("etc"), file("etc/hostname", b"seed\n"), directory("tmp", mode=0o1777)])
    blob = {".tar": lambda d: d, ".tar.gz": lambda d: compress(d, "gzip"),
            ".tar.xz": lzma.compress, ".tar.zst": lambda d: compress(d, "zstd")}[ext](data)
    (scratch / f"rootfs{ext}").write_bytes(blob)
    res = cowfs("image", "import", str(scratch / f"rootfs{ext}"), store=scratch / "store")
    assert "imported rootfs:latest" in res.stdout and "1 layers, 1 new" in res.stdout
    store = Store(str(scratch / "store"))
    image = store.image("rootfs")
    assert image.kind == "tarball" and image.layers == [sha(data)]
    assert (Path(store.lower_dirs(image)[0]) / "etc/hostname").read_bytes() == b"seed\n"


def test_docker_archive_with_a_tampered_layer(scratch: Path) -> None:
    write_docker_archive(scratch / "img.tar", "x:1", [BASE, TOP], blob_names=True)
    with tarfile.open(scratch / "img.tar") as tf:
        members = [(m, tf.extractfile(m).read()) for m in tf.getmembers()]  # type: ignore
    with tarfile.open(scratch / "bad.tar", "w") as tf:
        for m, data in members:
            if m.name == "blobs/sha256/" + sha(TOP)[7:]:
                data = data.replace(b"hi\n", b"ho\n")
            tf.addfile(m, io.BytesIO(data))
    res = cowfs("image", "import", str(scratch / "bad.tar"), store=scratch / "store", check=False)
    assert res.returncode == 1 and sha(TOP) in res.stderr and "mismatch" in res.stderr
    assert store_state(scratch / "store") == ([], [], [])


def test_layers_shared_across_formats(scratch: Path) -> None:
    """The store keys layers by diff_id: gzip, zstd and docker archives share them."""
    write_layout(scratch / "oci", "gz", [BASE, TOP], "gzip")
    write_layout(scratch / "oci", "zst", [BASE, TOP], "zstd")
    write_docker_archive(scratch / "img.tar", "d:1", [BASE, TOP])
    st = scratch / "store"
    assert "2 new, 0 reused" in cowfs("image", "import", f"{scratch}/oci:gz", store=st).stdout
    assert "0 new, 2 reused" in cowfs("image", "import", f"{scratch}/oci:zst", store=st).stdout
    assert "0 new, 2 reused" in cowfs("image", "import", str(scratch / "img.tar"),
                                      store=st).stdout
