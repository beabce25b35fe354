"""The content-addressed layer store.

    STORE/layers/HEX/root         one unpacked layer, HEX = its chain ID (containerd's
    STORE/layers/HEX/layer.json   rule: the layer and everything below it)
    STORE/images/NAME.json        an image: manifest, config, diff_ids, chain IDs
    STORE/containers/ID/          an image mount's upper and work dirs and record
    STORE/snapshots/ID/           a snapshot of cowfs.snapshot (record, fs/, work/)
    STORE/blobs/sha256/HEX        blobs a pull keeps (cowfs.image.registry): its manifest,
                                  config and layer blobs, for push and commit --image
    STORE/tmp/                    layers being unpacked; renamed into layers/ whole
    STORE/lock                    flock: import, mount, rm and prune take turns

A layer is keyed by chain ID, not diff_id: how a layer unpacks depends on what
is below it (a directory it only implies takes the metadata of the one below),
so the same diff_id over another base is another store layer.

A layer appears under layers/ only once completely unpacked, verified and
synced to disk, and only after every layer of its image is, so an interrupted
or failed import leaves nothing behind that could be mounted.  Records are
versioned and parsed strictly; garbage collection fails closed: one record that
does not parse keeps every layer.  A live mount is known by the locks its daemon
holds (cowfs.state), not by reading mountinfo.
"""
from __future__ import annotations

import contextlib
import datetime
import fcntl
import hashlib
import os
import secrets
import shutil
import sys
import urllib.parse
from collections.abc import Iterator
from dataclasses import dataclass, field

from tqdm import tqdm

from .. import state
from ..overlay import layers
from .errors import ImageError
from .merged import Stack
from .oci import DECODE_ERRORS, ImageSource, LayerRef, VerifiedLayerStream, split_ref
from .records import (ContainerRecord, ImageRecord, LayerRecord, RecordError, SnapshotRecord,
                      load, save)
from .unpack import Unpacker

STORE_ENV = "COWFS_STORE"


def default_store() -> str:
    if os.environ.get(STORE_ENV):
        return os.environ[STORE_ENV]
    if os.geteuid() == 0:
        return "/var/lib/cowfs"
    data = os.environ.get("XDG_DATA_HOME") or os.path.expanduser("~/.local/share")
    return os.path.join(data, "cowfs")


def now_iso() -> str:
    return datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def _hex(digest: str) -> str:
    return digest.split(":", 1)[1]


def chain_ids(diff_ids: list[str]) -> list[str]:
    """ChainID(L0) = DiffID(L0); ChainID(Ln) = sha256(ChainID(Ln-1) + " " + DiffID(Ln))."""
    out: list[str] = []
    for d in diff_ids:
        out.append(d if not out else
                   "sha256:" + hashlib.sha256(f"{out[-1]} {d}".encode()).hexdigest())
    return out


def syncfs(path: str) -> None:
    """Flush the whole filesystem holding path: a layer is on disk before it is published."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        layers.syncfs(fd)
    finally:
        os.close(fd)


def fsync_dir(path: str) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@dataclass
class ImportSummary:
    name: str
    image_id: str
    new: list[str] = field(default_factory=list)       # chain IDs unpacked now
    reused: list[str] = field(default_factory=list)
    blob_bytes: int = 0
    file_bytes: int = 0
    warnings: list[str] = field(default_factory=list)

    def __str__(self) -> str:
        return (f"imported {self.name} ({self.image_id[7:19]}): "
                f"{len(self.new) + len(self.reused)} layers, {len(self.new)} new, "
                f"{len(self.reused)} reused; read {human_size(self.blob_bytes)}, "
                f"unpacked {human_size(self.file_bytes)}")


def human_size(n: float) -> str:
    for unit in ("B", "kB", "MB", "GB"):
        if n < 1000 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return ""


@dataclass
class Usage:
    """Who uses which layer, and the records that did not parse (which pin everything)."""
    users: dict[str, str] = field(default_factory=dict)   # chain ID -> who
    problems: list[str] = field(default_factory=list)


class Store:
    def __init__(self, root: str | None = None) -> None:
        self.root = os.path.abspath(root or default_store())
        self.layers_dir = os.path.join(self.root, "layers")
        self.images_dir = os.path.join(self.root, "images")
        self.containers_dir = os.path.join(self.root, "containers")
        self.snapshots_dir = os.path.join(self.root, "snapshots")
        self.tmp_dir = os.path.join(self.root, "tmp")
        self.blobs_dir = os.path.join(self.root, "blobs", "sha256")

    def ensure(self) -> None:
        # Layers hold setuid binaries and device nodes: only the owner may reach them.
        os.makedirs(self.root, mode=0o700, exist_ok=True)
        for d in (self.layers_dir, self.images_dir, self.containers_dir, self.snapshots_dir,
                  self.tmp_dir):
            os.makedirs(d, mode=0o700, exist_ok=True)

    @contextlib.contextmanager
    def lock(self) -> Iterator[None]:
        """The store lock (CLOEXEC: a mount daemon started under it does not keep it)."""
        self.ensure()
        fd = os.open(os.path.join(self.root, "lock"), os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)

    # -- layers ----------------------------------------------------------------
    def layer_dir(self, chain_id: str) -> str:
        return os.path.join(self.layers_dir, _hex(chain_id))

    def layer_root(self, chain_id: str) -> str:
        return os.path.join(self.layer_dir(chain_id), "root")

    def has_layer(self, chain_id: str) -> bool:
        return os.path.exists(os.path.join(self.layer_dir(chain_id), "layer.json"))

    def layer_record(self, chain_id: str) -> LayerRecord:
        return load(LayerRecord, os.path.join(self.layer_dir(chain_id), "layer.json"))

    def layer_ids(self) -> list[str]:
        try:
            return sorted("sha256:" + n for n in os.listdir(self.layers_dir))
        except FileNotFoundError:
            return []

    def chain_of_root(self, path: str) -> str | None:
        """The chain ID of a store layer root path, None for any other dir."""
        real = os.path.realpath(path)
        parent, leaf = os.path.split(real)
        if leaf == "root" and os.path.dirname(parent) == os.path.realpath(self.layers_dir):
            return "sha256:" + os.path.basename(parent)
        return None

    # -- images ----------------------------------------------------------------
    def _image_file(self, name: str) -> str:
        return os.path.join(self.images_dir, urllib.parse.quote(name, safe="") + ".json")

    def _scan(self, d: str, cls: type, leaf: str | None) -> tuple[list, list[str]]:
        try:
            names = sorted(os.listdir(d))
        except FileNotFoundError:
            return [], []
        recs, problems = [], []
        for n in names:
            if leaf is None and not n.endswith(".json"):
                continue  # a temporary file of an atomic write
            try:
                recs.append(load(cls, os.path.join(d, n, leaf) if leaf else os.path.join(d, n)))
            except RecordError as e:
                problems.append(str(e))
            except FileNotFoundError:  # removed meanwhile (gone whole), or never complete
                if leaf is not None and os.path.isdir(os.path.join(d, n)):
                    problems.append(f"{os.path.join(d, n)}: no {leaf}")
        return recs, problems

    def scan_images(self) -> tuple[list[ImageRecord], list[str]]:
        return self._scan(self.images_dir, ImageRecord, None)

    def images(self) -> list[ImageRecord]:
        return self.scan_images()[0]

    def find_image(self, ref: str) -> ImageRecord | None:
        """An image by the name import printed, the DIR:TAG import was given, the
        name without ':latest', the bare tag or a unique id prefix; None if no image
        matches, ImageError if several do."""
        images = self.images()
        given = {ref, normalize_spec(ref)}
        for match in (lambda r: r.name == ref,
                      lambda r: bool(given & set(r.aliases)),
                      lambda r: r.name == ref + ":latest",
                      lambda r: ":" not in ref and r.name.rpartition(":")[2] == ref,
                      lambda r: len(ref.removeprefix("sha256:")) >= 4 and
                      r.id[7:].startswith(ref.removeprefix("sha256:"))):
            hits = {r.name: r for r in images if match(r)}
            if len(hits) == 1:
                return next(iter(hits.values()))
            if len({r.id for r in hits.values()}) > 1:
                raise ImageError(f"{ref!r} names several images: {', '.join(sorted(hits))}")
            if hits:
                return sorted(hits.values(), key=lambda r: r.name)[0]
        return None

    def image(self, ref: str) -> ImageRecord:
        rec = self.find_image(ref)
        if rec is None:
            raise ImageError(f"no image {ref!r} in the store {self.root} "
                             "(see 'cowfs image ls')")
        return rec

    def lower_dirs(self, image: ImageRecord) -> list[str]:
        """The image's layer roots, top layer first, as lowerdir= wants them."""
        return [self.layer_root(c) for c in reversed(image.chain)]

    def image_for_lowers(self, lowers: list[str]) -> ImageRecord | None:
        real = [os.path.realpath(p) for p in lowers]
        for rec in self.images():
            if [os.path.realpath(p) for p in self.lower_dirs(rec)] == real:
                return rec
        return None

    # -- import ----------------------------------------------------------------
    def import_image(self, src: ImageSource, name: str | None = None,
                     progress: bool | None = None, spec: str | None = None) -> ImportSummary:
        """Unpack src's missing layers and record it as name; spec (what the user
        gave as the source) becomes an alias that finds it again."""
        name = name or src.name
        summary = ImportSummary(name, src.config_digest)
        diff_ids = [lr.diff_id for lr in src.layers]
        chain = chain_ids(diff_ids)
        self.ensure()
        with self.lock():
            self._clean_tmp()
            staged: list[tuple[str, str]] = []
            where: dict[str, str] = {}  # chain ID -> layer root, staged or stored
            try:
                for i, (lr, cid) in enumerate(zip(src.layers, chain)):
                    if cid in where:
                        continue
                    if self.has_layer(cid):
                        self._check_reuse(cid, summary)
                        summary.reused.append(cid)
                        where[cid] = self.layer_root(cid)
                        continue
                    below = [where[c] for c in reversed(chain[:i])]
                    tmp = self._unpack(lr, cid, chain[i - 1] if i else None, below, summary,
                                       progress)
                    staged.append((tmp, cid))
                    where[cid] = os.path.join(tmp, "root")
                if staged:
                    syncfs(self.tmp_dir)
                # Every layer checked out: only now does any of them become visible.
                while staged:
                    tmp, cid = staged.pop(0)
                    os.rename(tmp, self.layer_dir(cid))
                    summary.new.append(cid)
                fsync_dir(self.layers_dir)
            finally:
                for tmp, _ in staged:
                    self._discard(tmp)
            aliases = sorted({a for a in (spec, normalize_spec(spec) if spec else None)
                              if a and a != name})
            save(ImageRecord(name=name, id=src.config_digest, source=src.path, kind=src.kind,
                             imported=now_iso(), manifest=src.manifest,
                             config=src.config.decode("utf-8"), layers=diff_ids, chain=chain,
                             aliases=aliases), self._image_file(name))
        return summary

    def _check_reuse(self, cid: str, summary: ImportSummary) -> None:
        rec = self.layer_record(cid)  # a bad record stops the import: never build on it
        if os.geteuid() == 0 and not rec.owners:
            summary.warnings.append(f"layer {cid[7:19]} was unpacked without root: its files "
                                    "belong to the importing user and it has no device nodes")

    def apply_layer(self, lr: LayerRef, parent: str | None, below: list[str],
                    progress: bool | None = False) -> tuple[str, ImportSummary]:
        """Unpack one layer over the store layer parent (whose stack, top first, is
        below) and publish it; returns its chain ID.  lr.diff_id "" means the
        stream names no diff_id (a bare layer tar): it is computed while unpacking.
        The caller holds the lock."""
        summary = ImportSummary("", "")
        self._clean_tmp()
        chain = chain_ids([parent, lr.diff_id])[1] if parent and lr.diff_id else lr.diff_id
        if chain and self.has_layer(chain):
            summary.reused.append(chain)
            return chain, summary
        tmp = self._unpack(lr, chain or None, parent, below, summary, progress)
        try:
            rec = load(LayerRecord, os.path.join(tmp, "layer.json"))
            if self.has_layer(rec.chain_id):  # known only now that the diff_id is
                summary.reused.append(rec.chain_id)
                return rec.chain_id, summary
            syncfs(tmp)
            os.rename(tmp, self.layer_dir(rec.chain_id))
            fsync_dir(self.layers_dir)
        finally:
            self._discard(tmp)
        summary.new.append(rec.chain_id)
        return rec.chain_id, summary

    def _unpack(self, lr: LayerRef, chain_id: str | None, parent: str | None, below: list[str],
                summary: ImportSummary, progress: bool | None) -> str:
        """Unpack lr into a new dir in tmp/; chain_id None: compute it (and the
        diff_id) from the stream."""
        privileged = os.geteuid() == 0
        tmp = os.path.join(self.tmp_dir, secrets.token_hex(8))
        os.mkdir(tmp, 0o700)
        try:
            os.mkdir(os.path.join(tmp, "root"), 0o755)
            with contextlib.ExitStack() as cleanup:
                root_fd = os.open(os.path.join(tmp, "root"), os.O_RDONLY | os.O_DIRECTORY)
                cleanup.callback(os.close, root_fd)
                bar = cleanup.enter_context(tqdm(
                    total=lr.size, unit="B", unit_scale=True, file=sys.stderr, leave=True,
                    desc=lr.diff_id[7:19],
                    disable=(not sys.stderr.isatty()) if progress is None else not progress))
                stack = cleanup.enter_context(Stack(below)) if below else None
                unpacker = Unpacker(root_fd, privileged=privileged, below=stack)
                cleanup.callback(unpacker.close)
                stream = VerifiedLayerStream(lr, bar.update)
                cleanup.callback(stream.close)
                try:
                    with stream.open_tar() as tf:
                        stats = unpacker.extract(tf)
                except (*DECODE_ERRORS, ImageError) as e:
                    raise stream.failed(e) from None
                if lr.diff_id:
                    stream.verify()
                else:
                    stream.drain()
            diff_id = lr.diff_id or stream.tar.digest
            if chain_id is None:
                chain_id = chain_ids([parent, diff_id])[1] if parent else diff_id
            summary.blob_bytes += stream.blob.count
            summary.file_bytes += stats.file_bytes
            summary.warnings += [f"{lr.what}: {w}" for w in stats.warnings]
            save(LayerRecord(chain_id=chain_id, diff_id=diff_id, parent=parent,
                             digest=lr.digest, media_type=lr.media_type,
                             blob_size=stream.blob.count, file_bytes=stats.file_bytes,
                             entries=stats.entries, owners=privileged, created=now_iso()),
                 os.path.join(tmp, "layer.json"))
            return tmp
        except BaseException:
            self._discard(tmp)
            raise

    def _discard(self, path: str) -> None:
        shutil.rmtree(path, ignore_errors=True)

    def _clean_tmp(self) -> None:
        """Leftovers of interrupted imports; callers hold the lock, so none is live."""
        for n in os.listdir(self.tmp_dir):
            self._discard(os.path.join(self.tmp_dir, n))

    # -- containers (image mounts) ------------------------------------------------
    def new_container(self, image: ImageRecord, upper: str | None,
                      mountpoint: str) -> ContainerRecord:
        """A container dir with its record, made in tmp/ and renamed into place whole."""
        self.ensure()
        cid = secrets.token_hex(6)
        cdir = os.path.join(self.containers_dir, cid)
        tmp = os.path.join(self.tmp_dir, "c-" + cid)
        os.mkdir(tmp, 0o700)
        try:
            if upper is None:
                os.mkdir(os.path.join(tmp, "upper"), 0o755)
                os.mkdir(os.path.join(tmp, "work"), 0o700)
                upper, work = os.path.join(cdir, "upper"), os.path.join(cdir, "work")
            else:
                upper = os.path.abspath(upper)
                os.makedirs(upper, exist_ok=True)
                work = os.path.join(os.path.dirname(upper),
                                    "." + os.path.basename(upper) + ".work")
                os.makedirs(work, mode=0o700, exist_ok=True)
            rec = ContainerRecord(id=cid, image=image.name, image_id=image.id,
                                  chain=list(image.chain), upper=upper, work=work,
                                  mountpoint=os.path.abspath(mountpoint), created=now_iso())
            save(rec, os.path.join(tmp, "container.json"))
            os.rename(tmp, cdir)
        except BaseException:
            self._discard(tmp)
            raise
        return rec

    def discard_container(self, cid: str) -> None:
        """Forget a container and delete its dir (an --upper outside it stays)."""
        self._discard(os.path.join(self.containers_dir, cid))

    def scan_containers(self) -> tuple[list[ContainerRecord], list[str]]:
        return self._scan(self.containers_dir, ContainerRecord, "container.json")

    def containers(self) -> list[ContainerRecord]:
        return self.scan_containers()[0]

    def scan_snapshots(self) -> tuple[list[SnapshotRecord], list[str]]:
        return self._scan(self.snapshots_dir, SnapshotRecord, "snapshot.json")

    def container_for_upper(self, upper: str) -> ContainerRecord | None:
        real = os.path.realpath(upper)
        for rec in self.containers():
            if os.path.realpath(rec.upper) == real:
                return rec
        return None

    # -- removal -----------------------------------------------------------------
    def layers_in_use(self) -> Usage:
        """chain ID -> who uses it: an image, a container, a live mount; and the
        records that did not parse, each of which keeps every layer."""
        usage = Usage()
        images, problems = self.scan_images()
        containers, cproblems = self.scan_containers()
        snapshots, sproblems = self.scan_snapshots()
        usage.problems = problems + cproblems + sproblems
        for srec in snapshots:
            if srec.layer is not None:
                usage.users.setdefault(srec.layer, f"snapshot {srec.key}")
        for rec in images:
            for c in rec.chain:
                usage.users.setdefault(c, f"image {rec.name}")
        for crec in containers:
            for c in crec.chain:
                usage.users.setdefault(c, f"container {crec.id}")
        for c in self.layer_ids():
            if state.is_locked(self.layer_root(c)):
                usage.users.setdefault(c, "a cowfs mount")
        for c in _kernel_overlay_lowers(self):
            usage.users.setdefault(c, "a kernel overlay mount")
        for mrec in state.live_mount_records():
            for p in mrec.get("lowerdirs") or []:
                c = self.chain_of_root(p)
                if c is not None:
                    usage.users.setdefault(c, f"the mount at {mrec.get('mountpoint')}")
        return usage

    def remove(self, ref: str) -> str:
        """Remove an image or a container record (not its mount); returns what went."""
        with self.lock():
            rec = self.find_image(ref)
            if rec is not None:
                os.unlink(self._image_file(rec.name))
                return f"image {rec.name}"
            for c in self.containers():
                if c.id == ref:
                    if state.is_locked(c.work):
                        raise ImageError(f"container {ref} is mounted at {c.mountpoint}; "
                                         "unmount it first")
                    self.discard_container(ref)
                    return f"container {ref}"
        raise ImageError(f"no image or container {ref!r} in the store {self.root}")

    def prune_layers(self) -> tuple[list[str], Usage]:
        """Delete every layer nothing uses; returns (deleted, usage).  Nothing is
        deleted while any record is unreadable (usage.problems says which)."""
        with self.lock():
            usage = self.layers_in_use()
            if usage.problems:
                return [], usage
            deleted = []
            for c in self.layer_ids():
                if c in usage.users:
                    continue
                # Out of layers/ first, so no one mounts a half-deleted layer; the
                # exclusive lock keeps a mount from starting on it meanwhile.
                tmp = os.path.join(self.tmp_dir, "rm-" + _hex(c))
                try:
                    with state.exclusive(self.layer_root(c)):
                        os.rename(self.layer_dir(c), tmp)
                except BlockingIOError:
                    usage.users[c] = "a cowfs mount"
                    continue
                except FileNotFoundError:  # a layer dir without root: half-deleted
                    os.rename(self.layer_dir(c), tmp)
                self._discard(tmp)
                deleted.append(c)
        return deleted, usage


def normalize_spec(spec: str) -> str:
    """A source spec as DIR:TAG with DIR absolute, so './oci:l3' and 'oci:l3' from
    the same directory name the same import."""
    path, tag = split_ref(spec)
    if not os.path.exists(path):
        return spec
    return os.path.abspath(path) + (f":{tag}" if tag else "")


def _kernel_overlay_lowers(store: Store) -> set[str]:
    """Store layers a kernel overlay mount in this namespace uses (kernel mounts
    take no locks; this is the best the store can see of them)."""
    out: set[str] = set()
    try:
        with open("/proc/self/mountinfo") as f:
            lines = f.read().splitlines()
    except OSError:
        return out
    for line in lines:
        fields = line.split(" - ", 1)
        if len(fields) != 2 or not fields[1].startswith("overlay "):
            continue
        for opt in fields[1].split(" ")[-1].split(","):
            key, _, value = opt.partition("=")
            if key != "lowerdir":
                continue
            for p in value.replace("\\:", "\0").split(":"):
                c = store.chain_of_root(unescape_mountinfo(p.replace("\0", ":")))
                if c is not None:
                    out.add(c)
    return out


def unescape_mountinfo(s: str) -> str:
    """mountinfo's octal escapes (\\040 for a space and so on)."""
    return s.encode().decode("unicode_escape").encode("latin-1").decode(
        "utf-8", "surrogateescape")
