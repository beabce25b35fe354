"""A snapshotter shaped like containerd's, on the cowfs layer store.

A snapshot is Active (a writable upper dir over its parent's layers), a View (a
read-only mount of its parent) or Committed (a layer others build on).  Keys
and names share one namespace; a parent must be committed; a snapshot with
children cannot be removed.  Committed snapshots made by `apply` are store
layers keyed by chain ID, shared with `cowfs image import`; the others keep
their tree in STORE/snapshots/ID/fs.  Every change is one atomic rename of a
record or directory under the store lock, so a crash leaves no half state.
"""
from __future__ import annotations

import contextlib
import os
import re
import secrets
import shutil
import subprocess
import sys
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field, replace
from enum import Enum
from typing import BinaryIO

from ..image.changes import Change, diff as tree_changes
from ..image.commit import LayerInfo, write_layer
from ..image.errors import ImageError
from ..image.oci import MT_OCI_LAYER, LayerRef, open_source, sha256_digest
from ..image.records import SnapshotRecord, save
from ..image.store import Store, now_iso, syncfs
from ..state import find_mount, wait_daemon_gone, wait_unlocked
from .errors import AlreadyExists, FailedPrecondition, InvalidArgument, NotFound, SnapshotError

MOUNT_TYPE = "fuse.cowfs"
# A runtime that just unmounted (containerd does, then commits or removes at
# once) finds the daemon still exiting: give it this many seconds.
UNMOUNT_GRACE = 5.0


class Kind(str, Enum):
    ACTIVE = "active"
    VIEW = "view"
    COMMITTED = "committed"


@dataclass(frozen=True)
class Info:
    """What stat() tells about a snapshot (containerd's snapshots.Info)."""
    name: str
    kind: Kind
    parent: str | None = None
    labels: dict[str, str] = field(default_factory=dict)
    created: str = ""
    updated: str = ""


@dataclass(frozen=True)
class Mount:
    """A mount a runtime can perform itself: `mount -t TYPE SOURCE TARGET -o OPTIONS`
    (mount.fuse runs `cowfs SOURCE TARGET -o OPTIONS` for the type fuse.cowfs)."""
    type: str
    source: str
    options: list[str]


@dataclass(frozen=True)
class Usage:
    """Disk use of the snapshot's own tree, its parents excluded."""
    size: int       # bytes of disk blocks
    inodes: int


def _info(rec: SnapshotRecord) -> Info:
    return Info(rec.key, Kind(rec.kind), rec.parent, dict(rec.labels), rec.created, rec.updated)


def _check_key(key: object, what: str = "key") -> str:
    if not isinstance(key, str) or not key or "\0" in key or len(key) > 4096:
        raise InvalidArgument(f"invalid snapshot {what} {key!r}")
    return key


class Snapshotter:
    def __init__(self, root: str) -> None:
        self.store = Store(root)
        self.root = self.store.root
        self.store.ensure()

    # -- records -----------------------------------------------------------------
    def _records(self) -> list[SnapshotRecord]:
        recs, problems = self.store.scan_snapshots()
        if problems:
            raise SnapshotError("unreadable snapshot records: " + "; ".join(problems))
        return recs

    def _find(self, key: str) -> SnapshotRecord | None:
        _check_key(key)
        return next((r for r in self._records() if r.key == key), None)

    def _get(self, key: str) -> SnapshotRecord:
        rec = self._find(key)
        if rec is None:
            raise NotFound(f"snapshot {key!r} does not exist")
        return rec

    def _dir(self, rec: SnapshotRecord) -> str:
        return os.path.join(self.store.snapshots_dir, rec.id)

    def _save(self, rec: SnapshotRecord) -> None:
        save(rec, os.path.join(self._dir(rec), "snapshot.json"))

    def tree(self, rec: SnapshotRecord) -> str:
        """The directory holding the snapshot's own files (an upper dir or a layer)."""
        if rec.layer is not None:
            return self.store.layer_root(rec.layer)
        return os.path.join(self._dir(rec), "fs")

    def _lowers(self, parent: str | None) -> list[str]:
        """The trees of parent and its ancestors, top first."""
        out: list[str] = []
        seen: set[str] = set()
        while parent is not None:
            if parent in seen:
                raise SnapshotError(f"snapshot {parent!r}: its parents form a loop")
            seen.add(parent)
            rec = self._get(parent)
            out.append(self.tree(rec))
            parent = rec.parent
        return out

    def _committed_parent(self, parent: str | None) -> SnapshotRecord | None:
        if parent is None or parent == "":
            return None
        rec = self._find(parent)
        if rec is None:
            raise NotFound(f"parent snapshot {parent!r} does not exist")
        if rec.kind != Kind.COMMITTED:
            raise FailedPrecondition(f"parent {parent!r} is {rec.kind}, not committed")
        return rec

    def _new(self, key: str, kind: Kind, parent: str | None, labels: dict[str, str] | None,
             layer: str | None = None) -> SnapshotRecord:
        """A snapshot dir made in tmp/ and renamed into place whole (under the lock)."""
        if self._find(key) is not None:
            raise AlreadyExists(f"snapshot {key!r} already exists")
        prec = self._committed_parent(parent)
        now = now_iso()
        rec = SnapshotRecord(id=secrets.token_hex(8), key=key, kind=kind.value,
                             parent=prec.key if prec else None, labels=dict(labels or {}),
                             created=now, updated=now, layer=layer)
        tmp = os.path.join(self.store.tmp_dir, "s-" + rec.id)
        os.mkdir(tmp, 0o700)
        try:
            if kind == Kind.ACTIVE:
                os.mkdir(os.path.join(tmp, "fs"), 0o755)
                os.mkdir(os.path.join(tmp, "work"), 0o700)
            save(rec, os.path.join(tmp, "snapshot.json"))
            os.rename(tmp, self._dir(rec))
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        return rec

    # -- containerd's Snapshotter interface --------------------------------------
    def stat(self, key: str) -> Info:
        return _info(self._get(key))

    def update(self, info: Info, fieldpaths: Iterable[str] | None = None) -> Info:
        """Change labels (all of them, or those named "labels.KEY" in fieldpaths)."""
        with self.store.lock():
            rec = self._get(info.name)
            labels = dict(rec.labels)
            paths = list(fieldpaths or [])
            if not paths:
                labels = dict(info.labels)
            for p in paths:
                if p == "labels":
                    labels = dict(info.labels)
                elif p.startswith("labels."):
                    k = p[len("labels."):]
                    if k in info.labels:
                        labels[k] = info.labels[k]
                    else:
                        labels.pop(k, None)
                else:
                    raise InvalidArgument(f"cannot update field {p!r} (only labels)")
            rec = replace(rec, labels=labels, updated=now_iso())
            self._save(rec)
        return _info(rec)

    def usage(self, key: str) -> Usage:
        rec = self._get(key)
        if rec.kind == Kind.VIEW:
            return Usage(0, 0)
        size = inodes = 0
        seen: set[tuple[int, int]] = set()
        for dirpath, dirnames, filenames in os.walk(self.tree(rec)):
            for name in [".", *dirnames, *filenames]:
                st = os.lstat(os.path.join(dirpath, name))
                if (st.st_dev, st.st_ino) not in seen:
                    seen.add((st.st_dev, st.st_ino))
                    size += st.st_blocks * 512
                    inodes += 1
        return Usage(size, inodes)

    def mounts(self, key: str) -> list[Mount]:
        rec = self._get(key)
        if rec.kind == Kind.COMMITTED:
            raise FailedPrecondition(f"snapshot {key!r} is committed: prepare or view it")
        lowers = self._lowers(rec.parent)
        lowers = lowers or [self._empty()]  # a mount needs one lower; an empty one adds nothing
        opts = ["lowerdir=" + ":".join(p.replace(":", "\\:") for p in lowers)]
        if rec.kind == Kind.ACTIVE:
            opts += [f"upperdir={self.tree(rec)}", f"workdir={os.path.join(self._dir(rec), 'work')}"]
        else:
            opts.append("ro")
        return [Mount(MOUNT_TYPE, "cowfs", opts)]

    def prepare(self, key: str, parent: str | None = None,
                labels: dict[str, str] | None = None) -> list[Mount]:
        with self.store.lock():
            self._new(_check_key(key), Kind.ACTIVE, parent, labels)
            return self.mounts(key)

    def view(self, key: str, parent: str | None = None,
             labels: dict[str, str] | None = None) -> list[Mount]:
        with self.store.lock():
            self._new(_check_key(key), Kind.VIEW, parent, labels)
            return self.mounts(key)

    def commit(self, name: str, key: str, labels: dict[str, str] | None = None) -> Info:
        """The active snapshot key becomes the committed snapshot name (it must be
        unmounted); its upper dir, synced, is the new layer."""
        _check_key(name, "name")
        with self.store.lock():
            rec = self._get(key)
            if rec.kind != Kind.ACTIVE:
                raise FailedPrecondition(f"snapshot {key!r} is {rec.kind}, not active")
            if self._find(name) is not None:
                raise AlreadyExists(f"snapshot {name!r} already exists")
            work = os.path.join(self._dir(rec), "work")
            if not wait_unlocked(work, UNMOUNT_GRACE):
                raise FailedPrecondition(f"snapshot {key!r} is mounted: unmount it first")
            shutil.rmtree(work, ignore_errors=True)  # overlay scratch, not content
            syncfs(self.tree(rec))
            rec = replace(rec, key=name, kind=Kind.COMMITTED.value, updated=now_iso(),
                          labels={**rec.labels, **(labels or {})})
            self._save(rec)  # one atomic rename: the key is gone and the name is there
        return _info(rec)

    def remove(self, key: str) -> None:
        with self.store.lock():
            rec = self._get(key)
            children = sorted(r.key for r in self._records() if r.parent == rec.key)
            if children:
                raise FailedPrecondition(f"snapshot {key!r} has children: {', '.join(children)}")
            if rec.kind == Kind.ACTIVE and \
                    not wait_unlocked(os.path.join(self._dir(rec), "work"), UNMOUNT_GRACE):
                raise FailedPrecondition(f"snapshot {key!r} is mounted: unmount it first")
            # Out of snapshots/ in one rename, then deleted (a crash leaves only tmp/).
            trash = os.path.join(self.store.tmp_dir, "rm-" + rec.id)
            os.rename(self._dir(rec), trash)
            shutil.rmtree(trash, ignore_errors=True)

    def walk(self, filters: Iterable[str] = ()) -> Iterator[Info]:
        """Every snapshot matching any of the filters (containerd's syntax, in part:
        `kind==active`, `name!=x`, `parent==p`, `labels."k"==v`, `labels.k`; a comma
        joins conditions that must all hold)."""
        matchers = [_parse_filter(f) for f in filters if f]
        for rec in sorted(self._records(), key=lambda r: r.key):
            info = _info(rec)
            if not matchers or any(all(c(info) for c in m) for m in matchers):
                yield info

    def cleanup(self) -> list[str]:
        """Delete what interrupted operations left and layers nothing uses; returns
        the chain IDs of the deleted layers."""
        with self.store.lock():
            self.store._clean_tmp()
        deleted, usage = self.store.prune_layers()
        if usage.problems:
            raise SnapshotError("unreadable records, no layer deleted: " +
                                "; ".join(usage.problems))
        return deleted

    # -- layers in and out ----------------------------------------------------------
    def apply(self, parent: str | None, layer_stream: BinaryIO, name: str | None = None,
              labels: dict[str, str] | None = None, diff_id: str | None = None) -> Info:
        """Unpack a layer tar (any compression) over parent into a new committed
        snapshot, named by default by its chain ID; the same layer over the same
        parent is the same snapshot.  diff_id, if the caller knows it, is checked."""
        with self.store.lock():
            prec = self._committed_parent(parent)
            below = self._lowers(prec.key) if prec else []
            base = None if prec is None else prec.layer or \
                sha256_digest(f"snapshot {prec.id}".encode())
            lr = LayerRef(what="layer stream", diff_id=diff_id or "", digest=None,
                          media_type=MT_OCI_LAYER, size=None, opener=lambda: layer_stream)
            with _as_snapshot_error():
                chain, _ = self.store.apply_layer(lr, base, below)
            name = _check_key(name or chain, "name")
            rec = self._find(name)
            if rec is not None:
                if rec.layer != chain:
                    raise AlreadyExists(f"snapshot {name!r} already exists")
                return _info(rec)
            return _info(self._new(name, Kind.COMMITTED, prec.key if prec else None, labels,
                                   layer=chain))

    def import_image(self, spec: str, name: str | None = None) -> Info:
        """Import an image (OCI layout DIR[:TAG], docker archive or rootfs tarball)
        into the store; each of its layers is a committed snapshot named by chain
        ID.  Returns the top one, the parent for prepare()."""
        with _as_snapshot_error():
            src = open_source(spec)
            try:
                self.store.import_image(src, name, progress=False, spec=spec)
            finally:
                src.close()
        image = self.store.image(name or src.name)
        with self.store.lock():
            parent: str | None = None
            for chain in image.chain:
                if self._find(chain) is None:
                    self._new(chain, Kind.COMMITTED, parent, {"cowfs.image": image.name},
                              layer=chain)
                parent = chain
        if parent is None:
            raise SnapshotError(f"image {image.name} has no layers")
        return self.stat(parent)

    def diff(self, key: str, out: str, compression: str | None | bool = True) -> LayerInfo:
        """The snapshot's changes over its parent as an OCI layer tarball at out."""
        rec = self._get(key)
        if rec.kind == Kind.VIEW:
            raise FailedPrecondition(f"snapshot {key!r} is a view: it has no changes")
        return write_layer(self.tree(rec), self._lowers(rec.parent) or [self._empty()],
                           out, compression)

    def changes(self, key: str) -> list[Change]:
        """A/C/D per path, as `docker diff` shows them."""
        rec = self._get(key)
        if rec.kind == Kind.VIEW:
            return []
        return tree_changes(self.tree(rec), self._lowers(rec.parent) or [self._empty()])

    def _empty(self) -> str:
        empty = os.path.join(self.root, "empty")
        os.makedirs(empty, exist_ok=True)
        return empty

    # -- conveniences ------------------------------------------------------------
    def mount(self, key: str, target: str) -> None:
        """Mount the snapshot at target with the cowfs command (under the store lock,
        so no remove or commit runs while it comes up)."""
        with self.store.lock():
            (m,) = self.mounts(key)
            res = subprocess.run([sys.executable, "-m", "cowfs", "-o", ",".join(m.options),
                                  target], capture_output=True, text=True)
        if res.returncode != 0:
            raise SnapshotError(f"cannot mount snapshot {key!r} at {target}: "
                                f"{res.stderr.strip() or 'cowfs failed'}")

    @staticmethod
    def unmount(target: str) -> None:
        """Unmount target and wait for its daemon to finish (then the snapshot can
        be committed or removed)."""
        rec = find_mount(target)
        res = subprocess.run(["umount", target], capture_output=True, text=True)
        if res.returncode != 0:
            raise SnapshotError(f"cannot unmount {target}: {res.stderr.strip()}")
        if rec is not None and not wait_daemon_gone(rec):
            raise SnapshotError(f"unmounted {target}, but its cowfs daemon "
                                f"(pid {rec.get('pid')}) has not exited")


@contextlib.contextmanager
def _as_snapshot_error() -> Iterator[None]:
    """The store's errors (a corrupt or hostile layer, a bad image) as SnapshotError."""
    try:
        yield
    except SnapshotError:
        raise
    except ImageError as e:
        raise SnapshotError(str(e)) from e


_FILTER = re.compile(r'^(kind|name|parent|labels\.(?:"[^"]*"|[^=!~,]+))(?:(==|!=)(.*))?$')


def _parse_filter(text: str) -> list[Callable[[Info], bool]]:
    conds: list[Callable[[Info], bool]] = []
    for part in text.split(","):
        m = _FILTER.match(part.strip())
        if m is None:
            raise InvalidArgument(f"unsupported filter {part!r}")
        fieldname, op, value = m.group(1), m.group(2), m.group(3)
        if value is not None and len(value) >= 2 and value[0] == value[-1] == '"':
            value = value[1:-1]

        def get(info: Info, f: str = fieldname) -> str | None:
            if f.startswith("labels."):
                return info.labels.get(f[len("labels."):].strip('"'))
            return {"kind": info.kind.value, "name": info.name, "parent": info.parent}[f]

        if op is None:
            conds.append(lambda i, g=get: g(i) is not None)
        elif op == "==":
            conds.append(lambda i, g=get, v=value: g(i) == v)
        else:
            conds.append(lambda i, g=get, v=value: g(i) != v)
    return conds
