"""Writing an upper dir as an OCI layer tarball, and as a new image in an OCI layout.

The layer holds the merged tree's changes: upper entries with their metadata and
xattrs, `.wh.NAME` for whiteouts, `.wh..wh..opq` for opaque directories.  A
redirected (renamed) directory is written out with its full contents, since the
layer format has no renames; the whiteout the rename left at the old path
deletes the old one.  A metacopy file takes its data from the lower file.
"""
from __future__ import annotations

import contextlib
import gzip
import hashlib
import io
import json
import os
import platform
import shutil
import stat
import tarfile
from collections.abc import Iterator
from dataclasses import dataclass
from typing import BinaryIO

import zstandard

from .errors import ImageError
from .merged import Entry, Parts, Source, Stack, close_sources, list_merged
from .oci import (ARCHIVE_MEMBER, MT_OCI_CONFIG, MT_OCI_LAYER, MT_OCI_MANIFEST, REF_NAME,
                  check_digest, sha256_digest, split_ref)
from ..overlay.format import OPAQUE_MARKER, WH_PREFIX, dir_marks, public_xattrs
from .store import now_iso, write_json_atomic

COPY_CHUNK = 1 << 20
COMPRESSIONS = {"gzip": "+gzip", "zstd": "+zstd", None: ""}


def compression_for(path: str) -> str | None:
    if path.endswith((".gz", ".tgz")):
        return "gzip"
    if path.endswith((".zst", ".zstd")):
        return "zstd"
    return None


class HashingWriter(io.RawIOBase):
    def __init__(self, raw: BinaryIO) -> None:
        self.raw = raw
        self.sha = hashlib.sha256()
        self.count = 0

    def writable(self) -> bool:
        return True

    def write(self, b: bytes | bytearray | memoryview) -> int:  # type: ignore[override]
        self.sha.update(b)
        self.count += len(b)
        self.raw.write(b)
        return len(b)

    @property
    def digest(self) -> str:
        return "sha256:" + self.sha.hexdigest()


@dataclass
class LayerInfo:
    path: str
    digest: str          # of the blob as written
    diff_id: str         # of the uncompressed tar
    size: int
    media_type: str


class LayerWriter:
    """A layer tarball: PAX tar, optionally gzip (reproducible header) or zstd."""

    def __init__(self, path: str, compression: str | None) -> None:
        self.path = path
        self.compression = compression
        self.file = open(path, "wb")
        self.blob = HashingWriter(self.file)  # type: ignore[arg-type]
        if compression == "gzip":
            self.comp: BinaryIO | None = gzip.GzipFile(  # type: ignore[assignment]
                fileobj=self.blob, mode="wb", mtime=0)
        elif compression == "zstd":
            self.comp = zstandard.ZstdCompressor().stream_writer(  # type: ignore[assignment]
                self.blob, closefd=False)  # type: ignore[arg-type]
        else:
            self.comp = None
        self.tar_hash = HashingWriter(self.comp or self.blob)  # type: ignore[arg-type]
        self.tar = tarfile.open(fileobj=self.tar_hash, mode="w|",  # type: ignore[call-overload]
                                format=tarfile.PAX_FORMAT)

    def add(self, ti: tarfile.TarInfo, data: BinaryIO | None = None) -> None:
        self.tar.addfile(ti, data)

    def marker(self, parts: Parts) -> None:
        """An empty regular file: a whiteout or the opaque marker."""
        ti = tarfile.TarInfo(os.fsdecode(b"/".join(parts)))
        ti.mode, ti.uname, ti.gname = 0o644, "", ""
        self.add(ti)

    def close(self) -> LayerInfo:
        self.tar.close()
        if self.comp is not None:
            self.comp.close()
        self.file.close()
        return LayerInfo(self.path, self.blob.digest, self.tar_hash.digest, self.blob.count,
                         MT_OCI_LAYER + COMPRESSIONS[self.compression])


class _Exact(io.RawIOBase):
    """Exactly n bytes of a file: a file that changes while it is read must not
    break the tar stream (short reads are padded with zeros)."""

    def __init__(self, fd: int, n: int) -> None:
        self.fd, self.left = fd, n

    def readable(self) -> bool:
        return True

    def readinto(self, b: bytearray | memoryview) -> int:  # type: ignore[override]
        want = min(len(b), self.left)
        data = os.read(self.fd, want) or bytes(want)
        b[:len(data)] = data
        self.left -= len(data)
        return len(data)


class Committer:
    """Walks [upper, *lowers] against the lowers, writing the difference as tar entries."""

    def __init__(self, upper: str, lowers: list[str], writer: LayerWriter) -> None:
        self.stack = Stack([upper, *lowers])
        self.writer = writer
        self.links: dict[tuple[int, int], str] = {}

    def run(self) -> None:
        new, old = self.stack.root_sources(0), self.stack.root_sources(1)
        try:
            self._dir((), new, old, full=False)
        finally:
            close_sources(new)
            close_sources(old)
            self.stack.close()

    def _dir(self, path: Parts, new_src: list[Source], old_src: list[Source],
             full: bool) -> None:
        """full: the layer must carry the whole directory (it is new, opaque or moved)."""
        new = list_merged(new_src, self.stack.fmt)
        old = {} if full else list_merged(old_src, self.stack.fmt)
        for name in sorted(old.keys() - new.keys()):
            self.writer.marker(path + (WH_PREFIX + name,))
        for name in sorted(new):
            n, o = new[name], old.get(name)
            if not full and o is not None and n.layer != 0 and n.same_as(o):
                continue  # untouched lower entry
            p = path + (name,)
            self._entry(p, n)
            if not n.is_dir:
                continue
            sub_full = full or o is None or not o.is_dir
            if not sub_full and n.layer == 0:
                nfd = os.open(name, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW,
                              dir_fd=n.dir_fd)
                try:
                    sub_full = dir_marks(self.stack.fmt, nfd).opaque or \
                        self.stack.redirect(n.layer, n.dir_fd, p) is not None
                finally:
                    os.close(nfd)
                if sub_full:
                    self.writer.marker(p + (OPAQUE_MARKER,))
            cn = self.stack.child_sources(new_src, path, name)
            co = [] if sub_full else self.stack.child_sources(old_src, path, name)
            try:
                self._dir(p, cn, co, sub_full)
            finally:
                close_sources(cn)
                close_sources(co)

    def _entry(self, p: Parts, e: Entry) -> None:
        st = e.st
        ti = tarfile.TarInfo(os.fsdecode(b"/".join(p)))
        ti.uid, ti.gid, ti.mode = st.st_uid, st.st_gid, stat.S_IMODE(st.st_mode)
        ti.uname = ti.gname = ""
        ti.mtime = st.st_mtime_ns // 10**9
        ti.pax_headers = {"mtime": f"{st.st_mtime_ns // 10**9}.{st.st_mtime_ns % 10**9:09d}"}
        for k, v in public_xattrs(e.dir_fd, e.name).items():
            ti.pax_headers["SCHILY.xattr." + k] = v.decode("utf-8", "surrogateescape")
        key = (st.st_dev, st.st_ino)
        if not stat.S_ISDIR(st.st_mode) and st.st_nlink > 1 and key in self.links:
            ti.type, ti.linkname = tarfile.LNKTYPE, self.links[key]
            self.writer.add(ti)
            return
        if stat.S_ISDIR(st.st_mode):
            ti.type = tarfile.DIRTYPE
        elif stat.S_ISLNK(st.st_mode):
            ti.type = tarfile.SYMTYPE
            ti.linkname = os.fsdecode(os.readlink(e.name, dir_fd=e.dir_fd))
        elif stat.S_ISCHR(st.st_mode) or stat.S_ISBLK(st.st_mode):
            ti.type = tarfile.CHRTYPE if stat.S_ISCHR(st.st_mode) else tarfile.BLKTYPE
            ti.devmajor, ti.devminor = os.major(st.st_rdev), os.minor(st.st_rdev)
        elif stat.S_ISFIFO(st.st_mode):
            ti.type = tarfile.FIFOTYPE
        elif stat.S_ISREG(st.st_mode):
            self._file(p, e, ti)
            self.links[key] = ti.name
            return
        else:
            return  # sockets belong to a running system, not to a layer
        self.links[key] = ti.name
        self.writer.add(ti)

    def _file(self, p: Parts, e: Entry, ti: tarfile.TarInfo) -> None:
        fd = self._open_data(p, e)
        try:
            ti.type, ti.size = tarfile.REGTYPE, os.fstat(fd).st_size
            self.writer.add(ti, _Exact(fd, ti.size))  # type: ignore[arg-type]
        finally:
            os.close(fd)

    def _open_data(self, p: Parts, e: Entry) -> int:
        """The file holding e's data: e itself, or for a metacopy upper file the
        lower file it names by overlay.redirect (or the same path below)."""
        flags = os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC
        found = self.stack.data_entry(p, e)
        if found is None:
            raise ImageError(f"{os.fsdecode(b'/'.join(p))}: metacopy file whose data "
                             "is in no lower layer")
        lower, sources = found
        try:
            return os.open(lower.name, flags, dir_fd=lower.dir_fd)
        finally:
            close_sources(sources)


def write_layer(upper: str, lowers: list[str], out: str) -> LayerInfo:
    """Write the changes of upper over lowers to the layer tarball out."""
    writer = LayerWriter(out, compression_for(out))
    try:
        Committer(upper, lowers, writer).run()
    except BaseException:
        writer.close()
        os.unlink(out)
        raise
    return writer.close()


# -- OCI layout output ----------------------------------------------------------

def _write_blob(layout: str, data: bytes) -> dict:
    digest = sha256_digest(data)
    path = os.path.join(layout, "blobs", "sha256", digest[7:])
    if not os.path.exists(path):
        with open(path + ".tmp", "wb") as f:
            f.write(data)
        os.replace(path + ".tmp", path)
    return {"digest": digest, "size": len(data)}


@contextlib.contextmanager
def _base_blob(base: dict, desc: dict) -> Iterator[BinaryIO | None]:
    """A base layer's blob where the image was imported from, if it is still there."""
    digest = desc["digest"]
    if base.get("kind") == "oci":
        src = os.path.join(base["source"], "blobs", "sha256", digest[7:])
        if not os.path.isfile(src):
            yield None
            return
        with open(src, "rb") as f:
            yield f
        return
    member = desc.get(ARCHIVE_MEMBER)
    if base.get("kind") != "docker-archive" or not member or not os.path.isfile(base["source"]):
        yield None
        return
    with tarfile.open(base["source"], "r:*") as tf:
        try:
            yield tf.extractfile(member)  # type: ignore[misc]
        except KeyError:
            yield None


def _copy_blob(layout: str, desc: dict, base: dict) -> None:
    """Put a base layer's blob into layout (checked against its digest)."""
    digest = check_digest(desc.get("digest"), "base layer blob")
    dst = os.path.join(layout, "blobs", "sha256", digest[7:])
    if os.path.exists(dst):
        return
    sha = hashlib.sha256()
    with _base_blob(base, desc) as src:
        if src is None:
            raise ImageError(f"base layer blob {digest} is in neither {layout} nor "
                             f"{base.get('source')}, where the base image came from")
        with open(dst + ".tmp", "wb") as out:
            while chunk := src.read(COPY_CHUNK):
                sha.update(chunk)
                out.write(chunk)
    if "sha256:" + sha.hexdigest() != digest:
        os.unlink(dst + ".tmp")
        raise ImageError(f"base layer blob {digest} in {base.get('source')} has changed "
                         "since the import (sha256 mismatch)")
    os.replace(dst + ".tmp", dst)


def _oci_layer_type(media_type: str) -> str:
    """Docker media types as their OCI equivalents, which every OCI tool reads."""
    if media_type.startswith("application/vnd.docker.image.rootfs"):
        return MT_OCI_LAYER + ("+gzip" if media_type.endswith("gzip") else "")
    return media_type


def new_config(base: dict | None, diff_id: str, comment: str) -> dict:
    if base is not None:
        config = json.loads(base["config"])
    else:
        arch = {"x86_64": "amd64", "aarch64": "arm64"}.get(platform.machine(), platform.machine())
        config = {"architecture": arch, "os": "linux", "config": {},
                  "rootfs": {"type": "layers", "diff_ids": []}, "history": []}
    created = now_iso()
    config["created"] = created
    config.setdefault("rootfs", {"type": "layers", "diff_ids": []})["diff_ids"].append(diff_id)
    config.setdefault("history", []).append(
        {"created": created, "created_by": "cowfs commit", "comment": comment})
    return config


def append_image(spec: str, layer: LayerInfo, base: dict | None, comment: str = "") -> str:
    """Add an image (base's layers + layer) to the OCI layout DIR, tagged TAG, as
    spec 'DIR:TAG' says; creates the layout if needed.  Returns the manifest digest."""
    layout, tag = split_ref(spec)
    tag = tag or "latest"
    os.makedirs(os.path.join(layout, "blobs", "sha256"), exist_ok=True)
    if not os.path.exists(os.path.join(layout, "oci-layout")):
        write_json_atomic(os.path.join(layout, "oci-layout"), {"imageLayoutVersion": "1.0.0"})
    index_path = os.path.join(layout, "index.json")
    try:
        with open(index_path) as f:
            index = json.load(f)
    except FileNotFoundError:
        index = {"schemaVersion": 2, "manifests": []}
    layers = []
    if base is not None:
        for d in base["manifest"]["layers"]:
            _copy_blob(layout, d, base)
            layers.append({"mediaType": _oci_layer_type(d["mediaType"]),
                           "digest": d["digest"], "size": d.get("size") or os.path.getsize(
                               os.path.join(layout, "blobs", "sha256", d["digest"][7:]))})
    dst = os.path.join(layout, "blobs", "sha256", layer.digest[7:])
    shutil.copyfile(layer.path, dst + ".tmp")
    os.replace(dst + ".tmp", dst)
    layers.append({"mediaType": layer.media_type, "digest": layer.digest, "size": layer.size})
    config = json.dumps(new_config(base, layer.diff_id, comment), separators=(",", ":")).encode()
    manifest = {"schemaVersion": 2, "mediaType": MT_OCI_MANIFEST,
                "config": {"mediaType": MT_OCI_CONFIG, **_write_blob(layout, config)},
                "layers": layers}
    mdesc = {"mediaType": MT_OCI_MANIFEST,
             **_write_blob(layout, json.dumps(manifest, separators=(",", ":")).encode()),
             "annotations": {REF_NAME: tag}}
    index["manifests"] = [d for d in index.get("manifests", [])
                          if d.get("annotations", {}).get(REF_NAME) != tag] + [mdesc]
    write_json_atomic(index_path, index)
    return mdesc["digest"]
