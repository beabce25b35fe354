"""Writing an upper dir as an OCI layer tarball, and as a new image in an OCI layout.

The layer holds the merged tree's changes: upper entries with their metadata and
xattrs, `.wh.NAME` for whiteouts, `.wh..wh..opq` for opaque directories.  A
redirected (renamed) directory is written out with its full contents, since the
layer format has no renames; the whiteout the rename left at the old path
deletes the old one.  A metacopy file takes its data from the lower file.
"""
from __future__ import annotations

import contextlib
import fcntl
import hashlib
import io
import json
import os
import platform
import secrets
import stat
import tarfile
from collections.abc import Iterator
from dataclasses import dataclass
from typing import BinaryIO

import zstandard
from zlib_ng import gzip_ng_threaded

from .errors import ImageError
from .merged import Entry, Parts, Source, Stack, close_sources, list_merged
from .oci import (ARCHIVE_MEMBER, MT_OCI_CONFIG, MT_OCI_LAYER, MT_OCI_MANIFEST, REF_NAME,
                  check_digest, sha256_digest, split_ref)
from ..overlay.format import OPAQUE_MARKER, WH_PREFIX, dir_marks, public_xattrs
from .records import ImageRecord, write_json_atomic
from .store import now_iso

COPY_CHUNK = 1 << 20
COMPRESSIONS = {"gzip": "+gzip", "zstd": "+zstd", None: ""}
# gzip level 6 (zlib's default) on every core, through zlib-ng: a few per cent
# bigger than level 9 at several times the speed; zstd level 3 likewise.
GZIP_LEVEL = 6
ZSTD_LEVEL = 3
THREADS = max(1, min(8, os.cpu_count() or 1))


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
    """A layer tarball written to a temporary name beside path and renamed to path
    when complete: PAX tar, optionally gzip (reproducible header) or zstd."""

    def __init__(self, path: str, compression: str | None) -> None:
        self.path = path
        self.tmp = f"{path}.{secrets.token_hex(6)}.tmp"
        self.compression = compression
        self.file = open(self.tmp, "wb")
        self.blob = HashingWriter(self.file)  # type: ignore[arg-type]
        if compression == "gzip":
            self.comp: BinaryIO | None = gzip_ng_threaded.open(  # type: ignore[assignment]
                self.blob, "wb", compresslevel=GZIP_LEVEL, threads=THREADS)
        elif compression == "zstd":
            self.comp = zstandard.ZstdCompressor(  # type: ignore[assignment]
                level=ZSTD_LEVEL, threads=-1).stream_writer(
                self.blob, closefd=False)  # type: ignore[arg-type]
        else:
            self.comp = None
        self.tar_hash = HashingWriter(self.comp or self.blob)  # type: ignore[arg-type]
        self.tar = tarfile.open(fileobj=self.tar_hash, mode="w|",  # type: ignore[call-overload]
                                format=tarfile.PAX_FORMAT, bufsize=1 << 20)

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
        self.file.flush()
        os.fsync(self.file.fileno())
        self.file.close()
        os.replace(self.tmp, self.path)
        return LayerInfo(self.path, self.blob.digest, self.tar_hash.digest, self.blob.count,
                         MT_OCI_LAYER + COMPRESSIONS[self.compression])

    def abort(self) -> None:
        # The streams first (their buffers are dropped), so that nothing writes
        # into the closed file later, when they are collected.
        for stream in (self.tar, self.comp):
            if stream is not None:
                with contextlib.suppress(Exception):
                    stream.close()
        self.file.close()
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.tmp)


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


def write_layer(upper: str, lowers: list[str], out: str,
                compression: str | None | bool = True) -> LayerInfo:
    """Write the changes of upper over lowers to the layer tarball out (compression
    True: as out's name says); out appears only once complete."""
    writer = LayerWriter(out, compression_for(out) if compression is True
                         else compression or None)
    try:
        Committer(upper, lowers, writer).run()
    except BaseException:
        writer.abort()
        raise
    return writer.close()


# -- OCI layout output ----------------------------------------------------------

def _blob_path(layout: str, digest: str) -> str:
    return os.path.join(layout, "blobs", "sha256", digest[7:])


def _write_blob(layout: str, data: bytes) -> dict:
    digest = sha256_digest(data)
    path = _blob_path(layout, digest)
    if not os.path.exists(path):
        tmp = f"{path}.{secrets.token_hex(6)}.tmp"
        with open(tmp, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    return {"digest": digest, "size": len(data)}


@contextlib.contextmanager
def base_blob(base: ImageRecord, desc: dict, kept: str) -> Iterator[BinaryIO | None]:
    """A base layer's blob where the image came from, if it is still there: its
    OCI layout, tarball or docker archive, or for a pulled image the blobs the
    store kept (kept: Store.blobs_dir)."""
    digest = desc["digest"]
    if base.kind == "docker-archive":
        member = desc.get(ARCHIVE_MEMBER)
        if not member or not os.path.isfile(base.source):
            yield None
            return
        with tarfile.open(base.source, "r:*") as tf:
            try:
                yield tf.extractfile(member)  # type: ignore[misc]
            except KeyError:
                yield None
        return
    path = {"oci": os.path.join(base.source, "blobs", "sha256", digest[7:]),
            "tarball": base.source,
            "registry": os.path.join(kept, digest[7:])}.get(base.kind)
    if path is None or not os.path.isfile(path):
        yield None
        return
    with open(path, "rb") as f:
        yield f


def _hash_file(f: BinaryIO, out: BinaryIO | None = None) -> str:
    sha = hashlib.sha256()
    while chunk := f.read(COPY_CHUNK):
        sha.update(chunk)
        if out is not None:
            out.write(chunk)
    return "sha256:" + sha.hexdigest()


def _copy_blob(layout: str, desc: dict, base: ImageRecord, kept: str) -> None:
    """Put a base layer's blob into layout, checked against its digest: a hard link
    to the source's file when it can be (no second copy), else one streamed copy."""
    digest = check_digest(desc.get("digest"), "base layer blob")
    dst = _blob_path(layout, digest)
    if os.path.exists(dst):
        return
    tmp = f"{dst}.{secrets.token_hex(6)}.tmp"
    try:
        with base_blob(base, desc, kept) as src:
            if src is None:
                where = f"the store's kept blobs ({kept}); pull {base.source} again" \
                    if base.kind == "registry" else \
                    f"{base.source}, where the base image came from"
                raise ImageError(f"base layer blob {digest} is in neither {layout} nor {where}")
            name = getattr(src, "name", None)
            linked = False
            if isinstance(name, str) and base.kind != "docker-archive":
                try:
                    os.link(name, tmp)
                    linked = True
                except OSError:
                    pass
            if linked:
                got = _hash_file(src)
            else:
                with open(tmp, "wb") as out:
                    got = _hash_file(src, out)  # type: ignore[arg-type]
        if got != digest:
            raise ImageError(f"base layer blob {digest} in {base.source} has changed "
                             "since the import (sha256 mismatch)")
        os.replace(tmp, dst)
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)


def _oci_layer_type(media_type: str) -> str:
    """Docker media types as their OCI equivalents, which every OCI tool reads."""
    if media_type.startswith("application/vnd.docker.image.rootfs"):
        return MT_OCI_LAYER + ("+gzip" if media_type.endswith("gzip") else "")
    return media_type


def new_config(base: ImageRecord | None, diff_id: str, comment: str) -> dict:
    if base is not None:
        config = json.loads(base.config)
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


@contextlib.contextmanager
def layout_lock(layout: str) -> Iterator[None]:
    """An OCI layout, created if needed and locked (flock on its directory):
    two commits into one layout take turns on index.json and lose nothing."""
    os.makedirs(os.path.join(layout, "blobs", "sha256"), exist_ok=True)
    fd = os.open(layout, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        if not os.path.exists(os.path.join(layout, "oci-layout")):
            write_json_atomic(os.path.join(layout, "oci-layout"), {"imageLayoutVersion": "1.0.0"})
        yield
    finally:
        os.close(fd)


def layer_into_layout(layout: str, path: str, digest: str) -> None:
    """Put a layer file written elsewhere into layout's blobs: a hard link if it
    can be, else a copy."""
    dst = _blob_path(layout, digest)
    if os.path.exists(dst):
        return
    tmp = f"{dst}.{secrets.token_hex(6)}.tmp"
    try:
        try:
            os.link(path, tmp)
        except OSError:
            with open(path, "rb") as src, open(tmp, "wb") as out:
                while chunk := src.read(COPY_CHUNK):
                    out.write(chunk)
        os.replace(tmp, dst)
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)


def commit_to_layout(spec: str, upper: str, lowers: list[str], base: ImageRecord | None,
                     kept: str, comment: str = "", compression: str | None = "gzip",
                     output: str | None = None) -> tuple[LayerInfo, str]:
    """Commit upper's changes as an image (base's layers + the new layer) tagged
    TAG in the OCI layout DIR (spec 'DIR:TAG').  The layer streams straight into
    the layout's blobs (and, with output, into that file, linked into the layout).
    kept is the store's Store.blobs_dir, where a pulled base's blobs are.
    Returns the layer and the manifest digest."""
    layout, _ = split_ref(spec)
    with layout_lock(layout):
        if output is not None:
            layer = write_layer(upper, lowers, output)
            layer_into_layout(layout, output, layer.digest)
        else:
            staging = os.path.join(layout, "blobs", "sha256", f"new-{secrets.token_hex(6)}")
            layer = write_layer(upper, lowers, staging, compression)
            os.replace(staging, _blob_path(layout, layer.digest))
            layer.path = _blob_path(layout, layer.digest)
        return layer, _add_image(spec, layer, base, kept, comment)


def _add_image(spec: str, layer: LayerInfo, base: ImageRecord | None, kept: str,
               comment: str) -> str:
    """Under the layout lock, with the layer's blob in place: config, manifest, index."""
    layout, tag = split_ref(spec)
    tag = tag or "latest"
    layers = []
    if base is not None:
        for d in base.manifest["layers"]:
            _copy_blob(layout, d, base, kept)
            layers.append({"mediaType": _oci_layer_type(d["mediaType"]),
                           "digest": d["digest"], "size": d.get("size") or os.path.getsize(
                               _blob_path(layout, d["digest"]))})
    layers.append({"mediaType": layer.media_type, "digest": layer.digest, "size": layer.size})
    config = json.dumps(new_config(base, layer.diff_id, comment), separators=(",", ":")).encode()
    manifest = {"schemaVersion": 2, "mediaType": MT_OCI_MANIFEST,
                "config": {"mediaType": MT_OCI_CONFIG, **_write_blob(layout, config)},
                "layers": layers}
    mdesc = {"mediaType": MT_OCI_MANIFEST,
             **_write_blob(layout, json.dumps(manifest, separators=(",", ":")).encode()),
             "annotations": {REF_NAME: tag}}
    index_path = os.path.join(layout, "index.json")
    try:
        with open(index_path) as f:
            index = json.load(f)
    except FileNotFoundError:
        index = {"schemaVersion": 2, "manifests": []}
    index["manifests"] = [d for d in index.get("manifests", [])
                          if d.get("annotations", {}).get(REF_NAME) != tag] + [mdesc]
    write_json_atomic(index_path, index)
    return mdesc["digest"]
