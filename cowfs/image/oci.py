"""Reading images: OCI image layouts, `docker save` archives and plain root
filesystem tarballs (one layer, as `docker import` makes of them).

Every blob is checked against its sha256: small JSON blobs when read, layers
while they stream through the unpacker (see `VerifiedLayerStream`).
"""
from __future__ import annotations

import bz2
import datetime
import gzip
import hashlib
import io
import json
import lzma
import os
import platform
import re
import tarfile
import zlib
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import BinaryIO

import zstandard

from .errors import ImageError

MT_OCI_INDEX = "application/vnd.oci.image.index.v1+json"
MT_OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
MT_OCI_CONFIG = "application/vnd.oci.image.config.v1+json"
MT_OCI_LAYER = "application/vnd.oci.image.layer.v1.tar"
MT_DOCKER_LIST = "application/vnd.docker.distribution.manifest.list.v2+json"
MT_DOCKER_MANIFEST = "application/vnd.docker.distribution.manifest.v2+json"
REF_NAME = "org.opencontainers.image.ref.name"
# Where a docker archive keeps a layer: recorded so commit --image can copy it.
ARCHIVE_MEMBER = "x-cowfs-archive-member"
# What a corrupt blob raises from the decompressors and the tar reader.
DECODE_ERRORS = (OSError, EOFError, zlib.error, zstandard.ZstdError, lzma.LZMAError,
                 tarfile.TarError)
_DIGEST = re.compile(r"sha256:[0-9a-f]{64}")


def check_digest(digest: object, what: str) -> str:
    """A sha256 digest string, validated before it ever becomes part of a path."""
    if not isinstance(digest, str) or not _DIGEST.fullmatch(digest):
        raise ImageError(f"{what}: unsupported or malformed digest {digest!r}")
    return digest


def sha256_digest(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def mismatch(what: str, expected: str, got: str) -> ImageError:
    """The error for data that does not hash to the digest that names it."""
    return ImageError(f"{what}: sha256 mismatch (expected {expected}, got {got}); "
                      "the image is corrupt or was tampered with")


def verified_json(data: bytes, digest: str | None, what: str) -> dict:
    if digest is not None and sha256_digest(data) != digest:
        raise mismatch(what, digest, sha256_digest(data))
    try:
        value = json.loads(data)
    except ValueError as e:
        raise ImageError(f"{what}: not valid JSON ({e})") from None
    if not isinstance(value, dict):
        raise ImageError(f"{what}: expected a JSON object")
    return value


class HashingReader(io.RawIOBase):
    """Passes a stream through while hashing it and counting its bytes."""

    def __init__(self, raw: BinaryIO, progress: Callable[[int], object] | None = None) -> None:
        self.raw = raw
        self.sha = hashlib.sha256()
        self.count = 0
        self.progress = progress

    def readable(self) -> bool:
        return True

    def readinto(self, b: bytearray | memoryview) -> int:  # type: ignore[override]
        data = self.raw.read(len(b))
        n = len(data)
        b[:n] = data
        self.sha.update(data)
        self.count += n
        if self.progress is not None and n:
            self.progress(n)
        return n

    def drain(self) -> None:
        while self.read(1 << 20):
            pass

    @property
    def digest(self) -> str:
        return "sha256:" + self.sha.hexdigest()


@dataclass
class LayerRef:
    """One layer of an image, as the manifest and the config describe it."""
    what: str                       # the blob, as messages name it
    diff_id: str                    # sha256 of the uncompressed tar (from the config)
    digest: str | None              # sha256 of the blob itself, when the source names it
    media_type: str
    size: int | None
    opener: Callable[[], BinaryIO]


def compression_of(magic: bytes) -> str | None:
    """gzip, zstd, xz, bzip2 or None (a plain tar), from a blob's first bytes."""
    for name, prefix in (("gzip", b"\x1f\x8b"), ("zstd", b"\x28\xb5\x2f\xfd"),
                         ("xz", b"\xfd7zXZ\x00"), ("bzip2", b"BZh")):
        if magic.startswith(prefix):
            return name
    return None


def decompressed(buffered: io.BufferedReader) -> BinaryIO:
    """The uncompressed stream of a blob, whatever its compression."""
    how = compression_of(buffered.peek(6)[:6])
    if how == "gzip":
        return gzip.GzipFile(fileobj=buffered, mode="rb")  # type: ignore[return-value]
    if how == "zstd":
        return zstandard.ZstdDecompressor().stream_reader(  # type: ignore[return-value]
            buffered, read_across_frames=True)
    if how == "xz":
        return lzma.LZMAFile(buffered)  # type: ignore[return-value]
    if how == "bzip2":
        return bz2.BZ2File(buffered)  # type: ignore[return-value]
    return buffered  # type: ignore[return-value]


class VerifiedLayerStream:
    """A layer blob decompressed (gzip, zstd, xz, bzip2 or none, by magic) while
    both the blob and the tar are hashed; `verify()` after reading checks both digests."""

    def __init__(self, layer: LayerRef, progress: Callable[[int], object] | None = None) -> None:
        self.layer = layer
        self._raw = layer.opener()
        self.blob = HashingReader(self._raw, progress)
        self.tar = HashingReader(decompressed(io.BufferedReader(self.blob, 1 << 16)))

    def open_tar(self) -> tarfile.TarFile:
        return tarfile.open(fileobj=self.tar, mode="r|",  # type: ignore[call-overload]
                            bufsize=1 << 16)

    def check_blob(self) -> None:
        """Hash the rest of the blob; raise if it is not the one the manifest names."""
        self.blob.drain()
        if self.layer.digest is not None and self.blob.digest != self.layer.digest:
            raise mismatch(self.layer.what, self.layer.digest, self.blob.digest)

    def failed(self, e: BaseException) -> ImageError:
        """The error to report when unpacking broke: a corrupt blob shows up as
        a broken tar or stream, so name the digest mismatch if that is the cause."""
        try:
            self.check_blob()
        except ImageError as wrong:
            return wrong
        except Exception:  # an unreadable blob: report the first error
            pass
        if isinstance(e, ImageError):
            return e
        return ImageError(f"{self.layer.what}: cannot unpack ({e})")

    def drain(self) -> None:
        """Read what the tar reader left and check the blob: for a stream whose
        diff_id is not known beforehand (it is `self.tar.digest` afterwards)."""
        try:
            self.tar.drain()
        except DECODE_ERRORS as e:
            raise self.failed(e) from None
        self.check_blob()

    def verify(self) -> None:
        """Read what the tar reader left, then check the blob and the diff_id."""
        self.drain()
        if self.tar.digest != self.layer.diff_id:
            raise mismatch(f"{self.layer.what} (uncompressed)", self.layer.diff_id,
                            self.tar.digest)

    def close(self) -> None:
        self._raw.close()


@dataclass
class ImageSource:
    """An image ready to import: its verified manifest and config, its layers."""
    kind: str                       # "oci", "docker-archive", "tarball" or "registry"
    path: str                       # where from: a file or dir; a pull's REGISTRY/REPO@DIGEST
    name: str                       # suggested store name
    manifest: dict
    config: bytes
    config_digest: str
    layers: list[LayerRef]          # bottom layer first, as in the manifest
    _closers: list[Callable[[], None]] = field(default_factory=list)

    def close(self) -> None:
        for c in self._closers:
            c()


def split_ref(spec: str) -> tuple[str, str | None]:
    """'DIR:TAG' -> (DIR, TAG); a spec that exists as a path has no tag."""
    if os.path.exists(spec) or ":" not in spec:
        return spec, None
    path, _, tag = spec.rpartition(":")
    return path, tag or None


def open_source(spec: str) -> ImageSource:
    path, tag = split_ref(spec)
    if os.path.isdir(path):
        if not os.path.exists(os.path.join(path, "index.json")):
            raise ImageError(f"{path}: not an OCI image layout (no index.json)")
        return _open_oci_layout(path, tag)
    if os.path.isfile(path):
        if not _is_docker_archive(path):
            return _open_rootfs_tarball(path, tag)
        return _open_docker_archive(path, tag)
    raise ImageError(f"{spec}: no such image layout, archive or tarball")


def diff_ids(config: dict, n_layers: int, what: str) -> list[str]:
    """An image config's rootfs.diff_ids, checked: one valid digest per layer."""
    ids = config.get("rootfs", {}).get("diff_ids")
    if not isinstance(ids, list) or len(ids) != n_layers:
        raise ImageError(f"{what}: rootfs.diff_ids does not list one id per layer")
    return [check_digest(d, f"{what} diff_id") for d in ids]


def host_platform() -> tuple[str, str]:
    """(os, architecture) of this host, as image configs and indexes name them."""
    machine = platform.machine().lower()
    arch = {"x86_64": "amd64", "aarch64": "arm64", "armv7l": "arm", "i686": "386"}.get(
        machine, machine)
    return "linux", arch


# -- OCI image layout ---------------------------------------------------------

def _blob_path(layout: str, digest: str) -> str:
    return os.path.join(layout, "blobs", "sha256", digest.split(":", 1)[1])


def _read_blob(layout: str, desc: dict, what: str) -> dict:
    digest = check_digest(desc.get("digest"), what)
    try:
        with open(_blob_path(layout, digest), "rb") as f:
            data = f.read()
    except FileNotFoundError:
        raise ImageError(f"{what}: blob {digest} is missing from {layout}") from None
    return verified_json(data, digest, f"{what} {digest}")


def _select(descs: list[dict], tag: str | None, layout: str) -> dict:
    if tag is not None:
        hits = [d for d in descs if d.get("annotations", {}).get(REF_NAME) == tag]
        if not hits:
            tags = sorted({d.get("annotations", {}).get(REF_NAME, "") for d in descs} - {""})
            raise ImageError(f"{layout}: no image tagged {tag!r} "
                             f"(tags: {', '.join(tags) or 'none'})")
        return hits[-1]
    if len(descs) != 1:
        tags = sorted({d.get("annotations", {}).get(REF_NAME, "?") for d in descs})
        raise ImageError(f"{layout} holds {len(descs)} images; pick one as "
                         f"{layout}:TAG (tags: {', '.join(tags)})")
    return descs[0]


def _resolve_manifest(layout: str, desc: dict, what: str) -> tuple[dict, dict]:
    """Follow image indexes (multi-platform) down to one manifest for this host."""
    for _ in range(4):
        doc = _read_blob(layout, desc, what)
        mt = desc.get("mediaType") or doc.get("mediaType")
        if mt not in (MT_OCI_INDEX, MT_DOCKER_LIST) and "manifests" not in doc:
            return desc, doc
        os_, arch = host_platform()
        hits = [d for d in doc.get("manifests", [])
                if d.get("platform", {}).get("os", os_) == os_
                and d.get("platform", {}).get("architecture", arch) == arch]
        if not hits:
            raise ImageError(f"{what}: no manifest for {os_}/{arch}")
        desc = hits[0]
    raise ImageError(f"{what}: image indexes nested too deeply")


def _file_opener(path: str) -> Callable[[], BinaryIO]:
    return lambda: open(path, "rb")


def _open_oci_layout(layout: str, tag: str | None) -> ImageSource:
    with open(os.path.join(layout, "index.json"), "rb") as f:
        index = verified_json(f.read(), None, f"{layout}/index.json")
    desc = _select(index.get("manifests", []), tag, layout)
    ref = desc.get("annotations", {}).get(REF_NAME, tag or "latest")
    desc, manifest = _resolve_manifest(layout, desc, f"{layout} manifest")
    cdesc = manifest.get("config", {})
    cdigest = check_digest(cdesc.get("digest"), f"{layout} config")
    try:
        with open(_blob_path(layout, cdigest), "rb") as f:
            config_bytes = f.read()
    except FileNotFoundError:
        raise ImageError(f"{layout}: config blob {cdigest} is missing") from None
    config = verified_json(config_bytes, cdigest, f"config blob {cdigest}")
    ldescs = manifest.get("layers", [])
    ids = diff_ids(config, len(ldescs), f"config blob {cdigest}")
    layers = []
    for ld, diff_id in zip(ldescs, ids):
        digest = check_digest(ld.get("digest"), f"{layout} layer")
        p = _blob_path(layout, digest)
        if not os.path.isfile(p):
            raise ImageError(f"{layout}: layer blob {digest} is missing")
        layers.append(LayerRef(what=f"layer blob {digest}", diff_id=diff_id, digest=digest,
                               media_type=ld.get("mediaType", MT_OCI_LAYER),
                               size=ld.get("size"),
                               opener=_file_opener(p)))
    name = ref if (":" in ref or "/" in ref) else \
        f"{os.path.basename(os.path.abspath(layout))}:{ref}"
    return ImageSource("oci", os.path.abspath(layout), name, manifest, config_bytes,
                       cdigest, layers)


# -- docker save archives -----------------------------------------------------

def _open_docker_archive(path: str, tag: str | None) -> ImageSource:
    try:
        tf = tarfile.open(path, "r:*")
    except tarfile.TarError as e:
        raise ImageError(f"{path}: not an image archive ({e})") from None
    try:
        return _docker_archive(tf, path, tag)
    except BaseException:
        tf.close()
        raise


def _member_bytes(tf: tarfile.TarFile, name: str, what: str) -> bytes:
    try:
        f = tf.extractfile(name)
    except KeyError:
        f = None
    if f is None:
        raise ImageError(f"{what}: {name!r} is missing from the archive")
    return f.read()


def _docker_archive(tf: tarfile.TarFile, path: str, tag: str | None) -> ImageSource:
    raw = _member_bytes(tf, "manifest.json", path)
    try:
        entries = json.loads(raw)
    except ValueError as e:
        raise ImageError(f"{path}: manifest.json is not valid JSON ({e})") from None
    if not isinstance(entries, list) or not entries:
        raise ImageError(f"{path}: manifest.json lists no image")
    if tag is not None:
        hits = [e for e in entries
                if any(t == tag or t.endswith(":" + tag) for t in e.get("RepoTags") or [])]
        if not hits:
            raise ImageError(f"{path}: no image tagged {tag!r}")
        entry = hits[0]
    elif len(entries) == 1:
        entry = entries[0]
    else:
        raise ImageError(f"{path} holds {len(entries)} images; pick one as {path}:TAG")
    cname = entry.get("Config", "")
    config_bytes = _member_bytes(tf, cname, path)
    # The config is named by its digest: blobs/sha256/HEX (docker 25+) or HEX.json.
    hexname = os.path.basename(cname).removesuffix(".json")
    cdigest = sha256_digest(config_bytes)
    if re.fullmatch(r"[0-9a-f]{64}", hexname) and cdigest != "sha256:" + hexname:
        raise mismatch(f"config {cname}", "sha256:" + hexname, cdigest)
    config = verified_json(config_bytes, None, f"config {cname}")
    lnames = entry.get("Layers", [])
    ids = diff_ids(config, len(lnames), f"config {cname}")
    layers = []
    for lname, diff_id in zip(lnames, ids):
        base = os.path.basename(lname)
        digest = "sha256:" + base if re.fullmatch(r"[0-9a-f]{64}", base) else None
        try:
            member = tf.getmember(lname)
        except KeyError:
            raise ImageError(f"{path}: layer {lname!r} is missing from the archive") from None
        layers.append(LayerRef(what=f"layer {lname}", diff_id=diff_id, digest=digest,
                               media_type=MT_OCI_LAYER, size=member.size,
                               opener=lambda m=member: tf.extractfile(m)))  # type: ignore
    repo_tags = entry.get("RepoTags") or []
    name = repo_tags[0] if repo_tags else \
        f"{os.path.basename(path).split('.')[0]}:{tag or 'latest'}"
    manifest = {"schemaVersion": 2, "mediaType": MT_OCI_MANIFEST,
                "config": {"mediaType": MT_OCI_CONFIG, "digest": cdigest,
                           "size": len(config_bytes)},
                "layers": [{"mediaType": MT_OCI_LAYER, "digest": lr.digest or lr.diff_id,
                            "size": lr.size, ARCHIVE_MEMBER: lname}
                           for lr, lname in zip(layers, lnames)]}
    return ImageSource("docker-archive", os.path.abspath(path), name, manifest, config_bytes,
                       cdigest, layers, [tf.close])


# -- root filesystem tarballs --------------------------------------------------

MT_BY_COMPRESSION = {None: MT_OCI_LAYER, "gzip": MT_OCI_LAYER + "+gzip",
                     "zstd": MT_OCI_LAYER + "+zstd", "xz": MT_OCI_LAYER + "+xz",
                     "bzip2": MT_OCI_LAYER + "+bzip2"}


def _is_docker_archive(path: str) -> bool:
    """A `docker save` archive is an uncompressed tar with manifest.json at its top."""
    with open(path, "rb") as f:
        if compression_of(f.read(6)) is not None:
            return False
    try:
        with tarfile.open(path, "r:") as tf:
            for m in tf:
                if m.name.lstrip("./") == "manifest.json":
                    return True
    except tarfile.TarError as e:
        raise ImageError(f"{path}: not an image archive or tarball ({e})") from None
    return False


def _open_rootfs_tarball(path: str, tag: str | None) -> ImageSource:
    """A root filesystem tarball (.tar, .tar.gz, .tar.xz, .tar.zst...) as a
    one-layer image.  Its diff_id is not written anywhere: a first pass computes it
    (and the blob digest), the import then checks the data against both."""
    with open(path, "rb") as raw:
        blob = HashingReader(raw)  # type: ignore[arg-type]
        buffered = io.BufferedReader(blob, 1 << 16)
        how = compression_of(buffered.peek(6)[:6])
        tar = HashingReader(decompressed(buffered))
        try:
            tar.drain()
            blob.drain()
        except DECODE_ERRORS as e:
            raise ImageError(f"{path}: cannot read the tarball ({e})") from None
    if tar.count == 0:
        raise ImageError(f"{path}: empty file")
    diff_id = tar.digest
    created = datetime.datetime.fromtimestamp(
        os.stat(path).st_mtime, datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
    os_, arch = host_platform()
    config_bytes = json.dumps(
        {"architecture": arch, "os": os_, "created": created, "config": {},
         "rootfs": {"type": "layers", "diff_ids": [diff_id]},
         "history": [{"created": created,
                      "created_by": f"cowfs image import {os.path.basename(path)}"}]},
        separators=(",", ":"), sort_keys=True).encode()
    cdigest = sha256_digest(config_bytes)
    media_type = MT_BY_COMPRESSION[how]
    layer = LayerRef(what=f"tarball {path}", diff_id=diff_id, digest=blob.digest,
                     media_type=media_type, size=blob.count, opener=_file_opener(path))
    manifest = {"schemaVersion": 2, "mediaType": MT_OCI_MANIFEST,
                "config": {"mediaType": MT_OCI_CONFIG, "digest": cdigest,
                           "size": len(config_bytes)},
                "layers": [{"mediaType": media_type, "digest": blob.digest, "size": blob.count}]}
    base = os.path.basename(path)
    for ext in (".gz", ".tgz", ".xz", ".txz", ".zst", ".zstd", ".bz2", ".tar"):
        base = base.removesuffix(ext)
    return ImageSource("tarball", os.path.abspath(path), f"{base}:{tag or 'latest'}", manifest,
                       config_bytes, cdigest, [layer])
