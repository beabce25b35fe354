"""The overlay (overlayfs' super.c): its layers, its inodes, and the state every operation shares.

The FUSE adapter (fuse_ops) only translates requests; the semantics live in the
modules named after overlayfs' own split: lookup, readdir, copyup, dir_ops,
inode_attrs, file, xattrs.
"""
from __future__ import annotations

import errno
import itertools
import os
import resource
import shutil

import trio

from .events import EventBus
from .inodes import ROOT_INO, InodeNumbers, InodeTable, Node
from .layers import DIR_FLAGS, Layer
from .params import MountConfig

WORK_SUBDIR = "work"


class Overlay:
    def __init__(self, cfg: MountConfig) -> None:
        self.cfg = cfg
        self.events = EventBus()
        # Modes arrive with the caller's umask applied by the kernel; the daemon's
        # own umask must not strip them a second time.
        os.umask(0)
        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        if soft < hard:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
        self.layers: list[Layer | None] = [Layer(0, cfg.upperdir, True) if cfg.upperdir else None]
        self.layers += [Layer(i + 1, p, False) for i, p in enumerate(cfg.lowerdirs)]
        self.lower_indexes = tuple(range(1, len(self.layers)))
        self.upper = self.layers[0]
        self.read_only = cfg.read_only or self.upper is None
        self.volatile = cfg.volatile
        self.metacopy = cfg.metacopy
        self.redirect_dir = cfg.redirect_dir
        self.euid = os.geteuid()
        # Where mknod of a 0/0 whiteout is refused, deletions fall back to .wh.NAME.
        self.wh_fallback = self.euid != 0
        self.numbers = InodeNumbers()
        # Keep half the fd limit for open files; the rest may cache directory fds.
        self.table = InodeTable(self, max(256, resource.getrlimit(resource.RLIMIT_NOFILE)[0] // 2))
        self.work_fd = self._open_work() if self.upper else -1
        self._tmp_seq = itertools.count()
        self._copy_locks: dict[int, trio.Lock] = {}
        top = 0 if self.upper else 1
        root_st = os.fstat(self.layers[top].fd)
        self.root = Node(ROOT_INO, None, b"", root_st.st_mode, top, None,
                         tuple(i for i, layer in enumerate(self.layers) if layer))
        self.root.lookups = 1
        self.numbers.keep(root_st, ROOT_INO)
        self.table.add(self.root)

    def _open_work(self) -> int:
        """workdir/work, emptied: leftovers of an interrupted copy-up never show."""
        assert self.cfg.workdir is not None
        path = os.path.join(self.cfg.workdir, WORK_SUBDIR)
        if os.path.lexists(path):
            shutil.rmtree(path)
        os.mkdir(path, 0o700)
        return os.open(path, DIR_FLAGS)

    def tmp_name(self) -> bytes:
        return b"#cowfs-%d-%d" % (os.getpid(), next(self._tmp_seq))

    def check_writable(self) -> None:
        if self.read_only:
            raise OSError(errno.EROFS, "read-only overlay")

    def copy_lock(self, node: Node) -> trio.Lock:
        lock = self._copy_locks.get(node.ino)
        if lock is None:
            lock = self._copy_locks[node.ino] = trio.Lock()
        return lock

    def release_copy_lock(self, node: Node) -> None:
        lock = self._copy_locks.get(node.ino)
        if lock is not None and not lock.locked() and not lock.statistics().tasks_waiting:
            del self._copy_locks[node.ino]

    def close(self) -> None:
        self.table.close_all()
        for layer in self.layers:
            if layer:
                layer.close()
        if self.work_fd >= 0:
            os.close(self.work_fd)
