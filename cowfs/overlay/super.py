"""The overlay (overlayfs' super.c): its layers, its inodes, and the state every operation shares.

The FUSE adapter (fuse_ops) only translates requests; the semantics live in the
modules named after overlayfs' own split: lookup, readdir, copyup, dir_ops,
inode_attrs, file, xattrs.
"""
from __future__ import annotations

import contextlib
import errno
import fcntl
import itertools
import os
import resource
import shutil
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any, TypeVar


from .format import Format
from .events import EventBus
from .inodes import KEEP_ON_EMFILE, ROOT_INO, InodeNumbers, InodeTable, Node
from .layers import DIR_FLAGS, Layer, make_whiteout
from .params import MountConfig

WORK_SUBDIR = "work"
T = TypeVar("T")


# A daemon just unmounted may still be on its way out, holding its lock.
CLAIM_WAIT = 3.0


def _lock_or_busy(fd: int, what: str) -> None:
    deadline = time.monotonic() + CLAIM_WAIT
    while True:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return
        except BlockingIOError:
            if time.monotonic() > deadline:
                raise OSError(errno.EBUSY, f"{what} is in use by another mount") from None
            time.sleep(0.02)


class Overlay:
    def __init__(self, cfg: MountConfig) -> None:
        self.cfg = cfg
        self.events = EventBus()
        if cfg.index:
            # Lower hard links are broken at copy-up (overlayfs' default, index=off);
            # keeping them linked needs the kernel's index directory, not written yet.
            raise OSError(errno.EOPNOTSUPP, "index=on is not supported (cowfs breaks "
                          "lower hard links at copy-up, as overlayfs with index=off)")
        # Modes arrive with the caller's umask applied by the kernel; the daemon's
        # own umask must not strip them a second time.
        os.umask(0)
        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        if soft < hard:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
        self.layers: list[Layer | None] = [Layer(0, cfg.upperdir, True) if cfg.upperdir else None]
        self.layers += [Layer(i + 1, p, False) for i, p in enumerate(cfg.lowerdirs)]
        self.lower_indexes = tuple(range(1, len(self.layers)))
        # Data-only layers (lowerdir=a:b::data) merge into no directory: only a
        # metacopy file's absolute redirect reaches them.
        self.merge_lowers = self.lower_indexes[:len(self.lower_indexes) - cfg.data_layers]
        self.data_lowers = self.lower_indexes[len(self.merge_lowers):]
        self.bottom_layer = self.merge_lowers[-1]
        self.fmt = Format.for_mount(cfg.userxattr)
        self.follow_redirects = cfg.follow_redirects
        self.upper = self.layers[0]
        self.read_only = cfg.read_only or self.upper is None
        self.volatile = cfg.volatile
        self.metacopy = cfg.metacopy
        self.redirect_dir = cfg.redirect_dir == "on"
        self.euid = os.geteuid()
        self.numbers = InodeNumbers()
        # Directory fds may fill half the fd limit; the rest is for open files
        # (callers' handles are never closed under them).
        self.table = InodeTable(self, max(KEEP_ON_EMFILE * 2,
                                          resource.getrlimit(resource.RLIMIT_NOFILE)[0] // 2))
        self._claim_fd = self._claim_dirs() if self.upper else -1
        self.work_fd = self._open_work() if self.upper else -1
        self._tmp_seq = itertools.count()
        # Where mknod of a 0/0 whiteout is refused (users before Linux 5.8),
        # deletions fall back to .wh.NAME.
        self.wh_fallback = self.upper is not None and not self._can_make_whiteouts()
        # The core runs one operation at a time under this lock; long blocking
        # work (copying data, fsync) runs unlocked(), so other requests go on.
        self.lock = threading.Lock()
        self._copy_done = threading.Condition(self.lock)
        self._copying: set[Node] = set()   # (by node: copy-up may renumber one)
        top = 0 if self.upper else 1
        root_st = os.fstat(self.layers[top].fd)
        self.root = Node(ROOT_INO, None, b"", root_st.st_mode, top, None,
                         (0,) * (self.upper is not None) + self.merge_lowers)
        self.numbers.keep(root_st, ROOT_INO)
        self.table.add(self.root)
        # Does whoever serves the overlay still hold node (the kernel's lookup
        # count)?  A deleted file it holds lives on as an orphan in work/.
        self.is_held: Callable[[Node], bool] = lambda node: False
        # Told before blocking work, so the server can go on serving meanwhile.
        self.before_block: Callable[[], None] = lambda: None
        # Told after a copy-up: what stat shows may change with it (a merged
        # directory's nlink; renumbered: a broken lower hard link's st_ino and
        # nlink), so whoever serves the overlay drops what it handed out.
        self.copied_up: Callable[[Node, bool], None] = lambda node, renumbered: None

    def _claim_dirs(self) -> int:
        """Hold upperdir and workdir for the life of the overlay (flock: gone with
        the process, however it ends): a second mount on either would empty work/
        under this one.  (The kernel refuses the same with EBUSY under index=on.)"""
        assert self.upper is not None and self.cfg.workdir is not None
        work = os.open(self.cfg.workdir, DIR_FLAGS)
        try:
            for fd, what in ((self.upper.fd, "upperdir"), (work, "workdir")):
                _lock_or_busy(fd, what)
        except BaseException:
            os.close(work)
            raise
        return work

    def _open_work(self) -> int:
        """workdir/work, emptied: leftovers of an interrupted copy-up never show."""
        assert self.cfg.workdir is not None
        path = os.path.join(self.cfg.workdir, WORK_SUBDIR)
        if os.path.lexists(path):
            if not os.path.islink(path) and os.stat(path).st_uid == self.euid:
                os.chmod(path, 0o700)   # (the kernel leaves work/ mode 0: a user could not empty it)
            shutil.rmtree(path)
        os.mkdir(path, 0o700)
        return os.open(path, DIR_FLAGS)

    def _can_make_whiteouts(self) -> bool:
        name = self.tmp_name()
        try:
            make_whiteout(self.work_fd, name)
        except PermissionError:
            return False
        os.unlink(name, dir_fd=self.work_fd)
        return True

    def tmp_name(self) -> bytes:
        return b"#cowfs-%d-%d" % (os.getpid(), next(self._tmp_seq))

    def check_writable(self) -> None:
        if self.read_only:
            raise OSError(errno.EROFS, "read-only overlay")

    def unlocked(self, fn: Callable[..., T], *args: Any) -> T:
        """Run blocking work without the core lock (the caller holds it)."""
        self.before_block()
        self.lock.release()
        try:
            return fn(*args)
        finally:
            self.lock.acquire()

    @contextlib.contextmanager
    def copying(self, node: Node) -> Iterator[None]:
        """One copy-up per inode: later writers wait for the first one's result."""
        while node in self._copying:
            self.before_block()     # (waiting is blocking too: let others be served)
            self._copy_done.wait()
        self._copying.add(node)
        try:
            yield
        finally:
            self._copying.discard(node)
            self._copy_done.notify_all()

    def close(self) -> None:
        self.table.close_all()
        for layer in self.layers:
            if layer:
                layer.close()
        if self.work_fd >= 0:
            os.close(self.work_fd)
        if self._claim_fd >= 0:
            os.close(self._claim_fd)
