"""The content-addressed layer store.

    STORE/layers/HEX/root         one unpacked layer, HEX = its diff_id (the sha256
    STORE/layers/HEX/layer.json   of the uncompressed tar), shared by every image
    STORE/images/NAME.json        an image: manifest, config, its layers' diff_ids
    STORE/containers/ID/          an image mount's upper and work dirs and record
    STORE/tmp/                    layers being unpacked; renamed into layers/ whole

A layer appears under layers/ only once completely unpacked and verified, and
only after every layer of its image is, so an interrupted or failed import
leaves nothing behind that could be mounted.
"""
from __future__ import annotations

import contextlib
import datetime
import fcntl
import json
import os
import secrets
import shutil
import sys
import urllib.parse
from collections.abc import Iterator
from dataclasses import dataclass, field

from tqdm import tqdm

from .errors import ImageError
from .merged import Stack
from .oci import DECODE_ERRORS, ImageSource, LayerRef, VerifiedLayerStream
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


def _hex(diff_id: str) -> str:
    return diff_id.split(":", 1)[1]


def write_json_atomic(path: str, data: object) -> None:
    tmp = f"{path}.{secrets.token_hex(4)}.tmp"
    with open(tmp, "w") as f:
        json.dump(data, f, indent=1)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _read_json(path: str) -> dict | None:
    try:
        with open(path) as f:
            return json.load(f)
    except (FileNotFoundError, ValueError):
        return None


@dataclass
class ImportSummary:
    name: str
    image_id: str
    new: list[str] = field(default_factory=list)       # diff_ids unpacked now
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


class Store:
    def __init__(self, root: str | None = None) -> None:
        self.root = os.path.abspath(root or default_store())
        self.layers_dir = os.path.join(self.root, "layers")
        self.images_dir = os.path.join(self.root, "images")
        self.containers_dir = os.path.join(self.root, "containers")
        self.tmp_dir = os.path.join(self.root, "tmp")

    def ensure(self) -> None:
        # Layers hold setuid binaries and device nodes: only the owner may reach them.
        os.makedirs(self.root, mode=0o700, exist_ok=True)
        for d in (self.layers_dir, self.images_dir, self.containers_dir, self.tmp_dir):
            os.makedirs(d, mode=0o700, exist_ok=True)

    @contextlib.contextmanager
    def lock(self) -> Iterator[None]:
        self.ensure()
        fd = os.open(os.path.join(self.root, "lock"), os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)

    # -- layers ----------------------------------------------------------------
    def layer_dir(self, diff_id: str) -> str:
        return os.path.join(self.layers_dir, _hex(diff_id))

    def layer_root(self, diff_id: str) -> str:
        return os.path.join(self.layer_dir(diff_id), "root")

    def has_layer(self, diff_id: str) -> bool:
        return os.path.exists(os.path.join(self.layer_dir(diff_id), "layer.json"))

    def layer_info(self, diff_id: str) -> dict | None:
        return _read_json(os.path.join(self.layer_dir(diff_id), "layer.json"))

    def layer_ids(self) -> list[str]:
        try:
            return sorted("sha256:" + n for n in os.listdir(self.layers_dir))
        except FileNotFoundError:
            return []

    def diff_id_of_root(self, path: str) -> str | None:
        """The diff_id of a store layer root path, None for any other dir."""
        real = os.path.realpath(path)
        parent, leaf = os.path.split(real)
        if leaf == "root" and os.path.dirname(parent) == os.path.realpath(self.layers_dir):
            return "sha256:" + os.path.basename(parent)
        return None

    # -- images ----------------------------------------------------------------
    def _image_file(self, name: str) -> str:
        return os.path.join(self.images_dir, urllib.parse.quote(name, safe="") + ".json")

    def images(self) -> list[dict]:
        try:
            names = sorted(os.listdir(self.images_dir))
        except FileNotFoundError:
            return []
        out = []
        for n in names:
            if n.endswith(".json"):
                rec = _read_json(os.path.join(self.images_dir, n))
                if rec is not None:
                    out.append(rec)
        return out

    def find_image(self, ref: str) -> dict | None:
        """An image by name, by name without ':latest', or by a unique id prefix."""
        images = self.images()
        for want in (ref, ref + ":latest"):
            for rec in images:
                if rec["name"] == want:
                    return rec
        prefix = ref.removeprefix("sha256:")
        if len(prefix) >= 4:
            hits = [r for r in images if r["id"][7:].startswith(prefix)]
            if len({r["id"] for r in hits}) == 1:
                return hits[0]
        return None

    def image(self, ref: str) -> dict:
        rec = self.find_image(ref)
        if rec is None:
            raise ImageError(f"no image {ref!r} in the store {self.root} "
                             "(see 'cowfs image ls')")
        return rec

    def lower_dirs(self, image: dict) -> list[str]:
        """The image's layer roots, top layer first, as lowerdir= wants them."""
        return [self.layer_root(d) for d in reversed(image["layers"])]

    def image_for_lowers(self, lowers: list[str]) -> dict | None:
        real = [os.path.realpath(p) for p in lowers]
        for rec in self.images():
            if [os.path.realpath(p) for p in self.lower_dirs(rec)] == real:
                return rec
        return None

    # -- import ----------------------------------------------------------------
    def import_image(self, src: ImageSource, name: str | None = None,
                     progress: bool | None = None) -> ImportSummary:
        name = name or src.name
        summary = ImportSummary(name, src.config_digest)
        self.ensure()
        with self.lock():
            self._clean_tmp()
            todo: dict[str, LayerRef] = {}
            for lr in src.layers:
                if self.has_layer(lr.diff_id) or lr.diff_id in todo:
                    summary.reused.append(lr.diff_id)
                else:
                    todo[lr.diff_id] = lr
            staged: list[tuple[str, str]] = []
            where: dict[str, str] = {}  # diff_id -> layer root, staged or stored
            try:
                for i, lr in enumerate(src.layers):
                    if lr.diff_id in todo and lr.diff_id not in where:
                        below = [where.get(d) or self.layer_root(d)
                                 for d in reversed([x.diff_id for x in src.layers[:i]])]
                        tmp = self._unpack(lr, below, summary, progress)
                        staged.append((tmp, lr.diff_id))
                        where[lr.diff_id] = os.path.join(tmp, "root")
                # Every layer checked out: only now does any of them become visible.
                while staged:
                    tmp, diff_id = staged.pop()
                    os.rename(tmp, self.layer_dir(diff_id))
                    summary.new.append(diff_id)
            finally:
                for tmp, _ in staged:
                    self._discard(tmp)
            write_json_atomic(self._image_file(name), {
                "name": name, "id": src.config_digest, "source": src.path, "kind": src.kind,
                "imported": now_iso(), "manifest": src.manifest,
                "config": src.config.decode("utf-8"),
                "layers": [lr.diff_id for lr in src.layers]})
        summary.new.reverse()
        return summary

    def _unpack(self, lr: LayerRef, below: list[str], summary: ImportSummary,
                progress: bool | None) -> str:
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
                unpacker = Unpacker(root_fd, privileged=privileged,
                                    overlay_whiteouts=privileged, below=stack)
                cleanup.callback(unpacker.close)
                stream = VerifiedLayerStream(lr, bar.update)
                cleanup.callback(stream.close)
                try:
                    with stream.open_tar() as tf:
                        stats = unpacker.extract(tf)
                except (*DECODE_ERRORS, ImageError) as e:
                    raise stream.failed(e) from None
                stream.verify()
            summary.blob_bytes += stream.blob.count
            summary.file_bytes += stats.file_bytes
            summary.warnings += [f"{lr.what}: {w}" for w in stats.warnings]
            write_json_atomic(os.path.join(tmp, "layer.json"), {
                "diff_id": lr.diff_id, "digest": lr.digest, "media_type": lr.media_type,
                "blob_size": stream.blob.count, "file_bytes": stats.file_bytes,
                "entries": stats.entries, "whiteouts": "overlay" if privileged else "oci",
                "created": now_iso()})
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
    def new_container(self, image: dict, upper: str | None, mountpoint: str) -> dict:
        self.ensure()
        cid = secrets.token_hex(6)
        cdir = os.path.join(self.containers_dir, cid)
        os.mkdir(cdir, 0o700)
        if upper is None:
            upper = os.path.join(cdir, "upper")
            os.mkdir(upper, 0o755)
            work = os.path.join(cdir, "work")
        else:
            upper = os.path.abspath(upper)
            os.makedirs(upper, exist_ok=True)
            work = os.path.join(os.path.dirname(upper), "." + os.path.basename(upper) + ".work")
        os.makedirs(work, mode=0o700, exist_ok=True)
        rec = {"id": cid, "image": image["name"], "image_id": image["id"],
               "layers": image["layers"], "upper": upper, "work": work,
               "mountpoint": os.path.abspath(mountpoint), "created": now_iso()}
        write_json_atomic(os.path.join(cdir, "container.json"), rec)
        return rec

    def discard_container(self, cid: str) -> None:
        """Forget a container and delete its dir (an --upper outside it stays)."""
        self._discard(os.path.join(self.containers_dir, cid))

    def containers(self) -> list[dict]:
        try:
            ids = sorted(os.listdir(self.containers_dir))
        except FileNotFoundError:
            return []
        recs = (_read_json(os.path.join(self.containers_dir, i, "container.json")) for i in ids)
        return [r for r in recs if r is not None]

    def container_for_upper(self, upper: str) -> dict | None:
        real = os.path.realpath(upper)
        for rec in self.containers():
            if os.path.realpath(rec["upper"]) == real:
                return rec
        return None

    # -- removal -----------------------------------------------------------------
    def layers_in_use(self) -> dict[str, str]:
        """diff_id -> who uses it: an image, a container, or any live mount."""
        used: dict[str, str] = {}
        for rec in self.images():
            for d in rec["layers"]:
                used.setdefault(d, f"image {rec['name']}")
        for rec in self.containers():
            for d in rec["layers"]:
                used.setdefault(d, f"container {rec['id']}")
        try:
            with open("/proc/self/mountinfo") as f:
                mountinfo = f.read()
        except OSError:
            mountinfo = ""
        for d in self.layer_ids():
            if d not in used and self.layer_root(d) in mountinfo:
                used[d] = "a mount"
        for rec in live_mount_records():
            for p in rec.get("lowerdirs", []):
                d = self.diff_id_of_root(p)
                if d is not None:
                    used.setdefault(d, f"the mount at {rec.get('mountpoint')}")
        return used

    def remove(self, ref: str) -> str:
        """Remove an image or a container record (not its mount); returns what went."""
        with self.lock():
            rec = self.find_image(ref)
            if rec is not None:
                os.unlink(self._image_file(rec["name"]))
                return f"image {rec['name']}"
            for c in self.containers():
                if c["id"] == ref:
                    if any(os.path.realpath(m.get("upperdir") or "") ==
                           os.path.realpath(c["upper"]) for m in live_mount_records()):
                        raise ImageError(f"container {ref} is mounted at {c['mountpoint']}; "
                                         "unmount it first")
                    self.discard_container(ref)
                    return f"container {ref}"
        raise ImageError(f"no image or container {ref!r} in the store {self.root}")

    def prune_layers(self) -> tuple[list[str], dict[str, str]]:
        """Delete every layer nothing uses; returns (deleted, kept -> user)."""
        with self.lock():
            used = self.layers_in_use()
            deleted = []
            for d in self.layer_ids():
                if d in used:
                    continue
                # Out of layers/ first, so no one mounts a half-deleted layer.
                tmp = os.path.join(self.tmp_dir, "rm-" + _hex(d))
                os.rename(self.layer_dir(d), tmp)
                self._discard(tmp)
                deleted.append(d)
        return deleted, used


def live_mount_records() -> list[dict]:
    from .. import state
    return state.live_mounts()
