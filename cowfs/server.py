"""The overlay served over FUSE: each request of cowfs.fuse mapped to the core.

No overlay semantics live here, and no protocol: this module turns core nodes
into entries and attributes, keeps file and directory handles, and decides
which opens the kernel serves itself (passthrough).  Replies carry long cache
timeouts: lower layers are immutable while mounted and the upper layer changes
only through this mount, so the kernel may keep entries, attributes, symlinks,
listings and page cache.
"""
from __future__ import annotations

import errno
import logging
import os
import stat
import time
from collections.abc import Iterator
from dataclasses import dataclass

from .fuse import NOW, Ctx, DirEntry, Entry, Opened, Operations, Session, SetAttr
from .fuse.abi import Fopen, Init, Op, dirent_type, pack_attr, pack_statx, statx_nlink
from .overlay import Overlay
from .overlay import dir as dir_ops
from .overlay import file, inode, xattrs
from .overlay.inode import ATTR_IOCTLS
from .overlay.inodes import Node
from .overlay.namei import lookup, lookup_listed
from .overlay.readdir import merged_names

log = logging.getLogger("cowfs")

BIG_IO = 256 * 1024     # reads and writes at least this big run without the core lock


@dataclass
class Backing:
    """The file the kernel reads and writes itself for the passthrough opens of
    one kernel inode: it takes one backing file per inode at a time."""
    id: int
    gen: int        # node.gen when registered: the real file it stands for
    opens: int = 0


class View:
    """What the kernel knows as one inode: a core node, until the node's data
    moves (copy-up) while the kernel still reads the old file through
    passthrough opens.  Then the node gets a new view (a new kernel inode) and
    the old one lives on for those opens."""
    __slots__ = ("node", "backing")

    def __init__(self, node: Node) -> None:
        self.node = node
        self.backing: Backing | None = None


@dataclass
class OpenFile:
    handle: file.Handle
    view: View
    passthrough: bool = False


@dataclass
class OpenDir:
    node: Node
    names: list[bytes]


class OverlayServer(Operations):
    def __init__(self, ov: Overlay, passthrough: bool) -> None:
        self.ov = ov
        self.session: Session | None = None
        self.want_passthrough = passthrough
        self.passthrough = False
        self.files: dict[int, OpenFile] = {}
        self.dirs: dict[int, OpenDir] = {}
        # The kernel's inodes: the current view of each node it holds, and how
        # many superseded views of a node it still holds.
        self.views: dict[Node, View] = {}
        self.stale: dict[Node, int] = {}
        self.root = self._view(ov.root)
        self._next_fh = 0
        ov.is_held = self._held
        # Test hook: names starting with $COWFS_FAULT make lookup ("...lookup")
        # or forget ("...forget") raise, to show the daemon survives a bug.
        self._fault = os.fsencode(os.environ.get("COWFS_FAULT", "")) or None
        ov.copied_up = self._copied_up

    def attach(self, session: Session) -> None:
        self.session = session
        self.ov.before_block = session.hand_off
        self.ov.events.request_counts = lambda: {
            _op_name(op): n for op, n in list(session.counters.items())}

    def init(self, caps: int) -> None:
        self.passthrough = bool(caps & Init.PASSTHROUGH)

    def _held(self, node: Node) -> bool:
        return node in self.views or node in self.stale

    def _copied_up(self, node: Node, renumbered: bool) -> None:
        # The kernel caches st_ino and st_nlink with the other attributes, and
        # d_ino in the parent's cached listing.
        assert self.session is not None
        v = self.views.get(node)
        if v is not None:
            self.session.inval_inode_now(v)
        parent = self.views.get(node.parent) if renumbered and node.parent else None
        if parent is not None:
            self.session.inval_inode_now(parent, 0, 0)

    def _view(self, node: Node) -> View:
        v = self.views.get(node)
        if v is None:
            v = self.views[node] = View(node)
        return v

    def _fh(self) -> int:
        self._next_fh += 1
        return self._next_fh

    # -- attributes --------------------------------------------------------
    def _attr(self, node: Node) -> bytes:
        if node.layer != 0:
            # Lower entries never change while mounted: encode them once.
            if node.attr is None:
                node.attr = self._encode(node)
            else:
                self.ov.events.count_cache_hit()
            return node.attr
        return self._encode(node)

    def _encode(self, node: Node) -> bytes:
        st = inode.getattr_(self.ov, node)
        return pack_attr(node.ino, st, inode.shown_nlink(self.ov, node, st.st_nlink))

    def statx(self, v: View, fh: int | None, mask: int, ctx: Ctx) -> bytes:
        node = v.node
        sx = inode.statx_(self.ov, node, mask)
        return pack_statx(sx, node.ino, inode.shown_nlink(self.ov, node, statx_nlink(sx)))

    def _entry(self, node: Node) -> Entry:
        return Entry(self._view(node), self._attr(node))

    # -- names -------------------------------------------------------------
    def lookup(self, parent: View, name: bytes, ctx: Ctx) -> Entry | None:
        if self._fault and name.startswith(self._fault + b"lookup"):
            raise RuntimeError(f"fault injected: lookup {name!r}")
        node = lookup(self.ov, parent.node, name)
        # None: a negative entry the kernel may cache; creation through the
        # mount replaces it, and nothing else changes the layers.
        return None if node is None else self._entry(node)

    def forget(self, v: View) -> None:
        self._drop_backing(v)
        node = v.node
        if self._fault and node.name.startswith(self._fault + b"forget"):
            raise RuntimeError(f"fault injected: forget {node.name!r}")
        if self.views.get(node) is v:
            del self.views[node]
        else:
            left = self.stale[node] - 1
            if left:
                self.stale[node] = left
            else:
                del self.stale[node]
        if not self._held(node):
            self.ov.table.drop(node)

    def getattr(self, v: View, fh: int | None, ctx: Ctx) -> bytes:
        return self._attr(v.node)

    def setattr(self, v: View, ch: SetAttr, ctx: Ctx) -> bytes:
        node = v.node
        of = self.files.get(ch.fh) if ch.fh is not None else None
        h = of.handle if of is not None else None
        now = time.time_ns() if NOW in (ch.atime_ns, ch.mtime_ns) else 0
        inode.setattr_(
            self.ov, node, mode=ch.mode, uid=ch.uid, gid=ch.gid, size=ch.size,
            atime_ns=now if ch.atime_ns == NOW else ch.atime_ns,
            mtime_ns=now if ch.mtime_ns == NOW else ch.mtime_ns,
            fd=h.fd if h is not None and h.writable and h.gen == node.gen else None)
        return self._encode(node)

    def readlink(self, v: View, ctx: Ctx) -> bytes:
        return inode.readlink(self.ov, v.node)

    def mknod(self, parent: View, name: bytes, mode: int, rdev: int, umask: int,
              ctx: Ctx) -> Entry:
        with _umask(umask):
            node = dir_ops.mknod(self.ov, parent.node, name, mode, rdev, ctx.uid, ctx.gid)
        return self._entry(node)

    def mkdir(self, parent: View, name: bytes, mode: int, umask: int, ctx: Ctx) -> Entry:
        with _umask(umask):
            node = dir_ops.mkdir(self.ov, parent.node, name, mode, ctx.uid, ctx.gid)
        return self._entry(node)

    def symlink(self, parent: View, name: bytes, target: bytes, ctx: Ctx) -> Entry:
        return self._entry(dir_ops.symlink(self.ov, parent.node, name, target,
                                           ctx.uid, ctx.gid))

    def link(self, v: View, new_parent: View, new_name: bytes, ctx: Ctx) -> Entry:
        return self._entry(dir_ops.link(self.ov, v.node, new_parent.node, new_name))

    def unlink(self, parent: View, name: bytes, ctx: Ctx) -> None:
        dir_ops.unlink(self.ov, parent.node, name)

    def rmdir(self, parent: View, name: bytes, ctx: Ctx) -> None:
        dir_ops.rmdir(self.ov, parent.node, name)

    def rename(self, old_parent: View, old: bytes, new_parent: View, new: bytes,
               flags: int, ctx: Ctx) -> None:
        dir_ops.rename(self.ov, old_parent.node, old, new_parent.node, new, flags)

    # -- files -------------------------------------------------------------
    def _opened(self, v: View, h: file.Handle) -> Opened:
        node = v.node
        fh = self._fh()
        of = self.files[fh] = OpenFile(h, v)
        if not (self.passthrough and stat.S_ISREG(node.mode)):
            return Opened(fh, Fopen.KEEP_CACHE | Fopen.NOFLUSH)
        b = v.backing
        if b is not None and b.gen != node.gen and b.opens == 0:
            self._drop_backing(v)       # (kept from earlier opens of the old copy)
            b = None
        if b is None:
            assert self.session is not None
            b = v.backing = Backing(self.session.backing_open(h.fd), node.gen)
        elif b.gen != node.gen:
            # This kernel inode reads the file's old (lower) copy through
            # passthrough opens, and the kernel allows one backing file per
            # inode: give the node a new kernel inode and have the kernel
            # look the name up again (ESTALE makes the VFS retry the open).
            del self.files[fh]
            file.release(h)
            if self.views.get(node) is v:
                del self.views[node]
                self.stale[node] = self.stale.get(node, 0) + 1
                parent = self.views.get(node.parent) if node.parent is not None else None
                if parent is not None and self.session is not None:
                    # (other cached names of it are looked up again too)
                    self.session.inval_entry(parent, node.name)
            raise OSError(errno.ESTALE, "file copied up under passthrough readers")
        b.opens += 1
        of.passthrough = True
        self.ov.events.count_passthrough_open()
        # (no FLUSH requests: nothing is buffered here, and no locks are kept)
        return Opened(fh, Fopen.NOFLUSH, b.id)

    def open(self, v: View, flags: int, ctx: Ctx) -> Opened:
        if self.views.get(v.node) is not v and stat.S_ISREG(v.node.mode) and self.passthrough:
            raise OSError(errno.ESTALE, "superseded kernel inode")
        return self._opened(v, file.open_file(self.ov, v.node, flags))

    def create(self, parent: View, name: bytes, mode: int, flags: int, umask: int,
               ctx: Ctx) -> tuple[Entry, Opened]:
        with _umask(umask):
            h, node = dir_ops.create(self.ov, parent.node, name, mode, flags, ctx.uid, ctx.gid)
        entry = self._entry(node)
        return entry, self._opened(entry.obj, h)

    def tmpfile(self, parent: View, mode: int, flags: int, umask: int,
                ctx: Ctx) -> tuple[Entry, Opened]:
        with _umask(umask):
            h, node = dir_ops.tmpfile(self.ov, parent.node, mode, ctx.uid, ctx.gid)
        entry = self._entry(node)
        return entry, self._opened(entry.obj, h)

    def _handle(self, fh: int) -> file.Handle:
        h = self.files[fh].handle
        if h.gen != h.node.gen:
            file.refresh(self.ov, h)
        return h

    def read(self, fh: int, off: int, size: int) -> bytes:
        fd = self._handle(fh).fd
        if size < BIG_IO:
            return os.pread(fd, size, off)     # (a page-cache hit: handing off costs more)
        return self.ov.unlocked(os.pread, fd, size, off)

    def write(self, fh: int, off: int, data: memoryview) -> int:
        fd = self._handle(fh).fd
        if len(data) < BIG_IO:
            return os.pwrite(fd, data, off)
        return self.ov.unlocked(os.pwrite, fd, data, off)

    def release(self, v: View, fh: int) -> None:
        of = self.files.pop(fh)
        file.release(of.handle)
        if of.passthrough and v.backing is not None:
            # The backing file stays registered while the kernel knows the inode:
            # the next open needs no ioctls.
            v.backing.opens -= 1

    def _drop_backing(self, v: View) -> None:
        b, v.backing = v.backing, None
        if b is not None and self.session is not None:
            self.session.backing_close(b.id)

    def fsync(self, fh: int, datasync: bool) -> None:
        file.fsync(self.ov, self._handle(fh), datasync)

    def fallocate(self, fh: int, mode: int, off: int, length: int) -> None:
        file.fallocate(self.ov, self._handle(fh), mode, off, length)

    def lseek(self, fh: int, off: int, whence: int) -> int:
        return os.lseek(self._handle(fh).fd, off, whence)

    def copy_file_range(self, fh_in: int, off_in: int, fh_out: int, off_out: int,
                        length: int, flags: int) -> int:
        return file.copy_range(self.ov, self._handle(fh_in), off_in, self._handle(fh_out),
                               off_out, length)

    def ioctl(self, v: View, fh: int, cmd: int, data: bytes, out_size: int
              ) -> tuple[int, bytes]:
        if cmd in ATTR_IOCTLS:
            return 0, inode.attr_ioctl(self.ov, v.node, cmd, data, out_size)
        raise OSError(errno.ENOTTY, f"ioctl {cmd:#x} not supported")

    # -- directories -------------------------------------------------------
    def opendir(self, v: View, flags: int, ctx: Ctx) -> Opened:
        if not v.node.is_dir:
            raise OSError(errno.ENOTDIR, "not a directory")
        fh = self._fh()
        self.dirs[fh] = OpenDir(v.node, [])
        # The kernel may keep the listing: every change to it goes through
        # this mount, which tells the kernel the directory changed.
        return Opened(fh, Fopen.CACHE_DIR | Fopen.KEEP_CACHE)

    def readdir(self, v: View, fh: int, offset: int, plus: bool) -> Iterator[DirEntry]:
        d = self.dirs[fh]
        if offset == 0:
            # A fresh listing at offset 0 (opendir or rewinddir); later offsets
            # index this snapshot, so they stay stable while the directory changes.
            d.names = [b".", b".."] + merged_names(self.ov, d.node)
        names = d.names
        for i in range(offset, len(names)):
            name = names[i]
            if i < 2:
                n = d.node if i == 0 else (d.node.parent or d.node)
                yield DirEntry(name, n.ino, stat.S_IFDIR >> 12, i + 1)
                continue
            child = lookup_listed(self.ov, d.node, name)
            if child is None:
                continue
            if plus:
                yield DirEntry(name, child.ino, dirent_type(child.mode), i + 1,
                               self._entry(child))
            else:
                if not self._held(child):
                    self.ov.table.drop(child)
                yield DirEntry(name, child.ino, dirent_type(child.mode), i + 1)

    def releasedir(self, v: View, fh: int) -> None:
        del self.dirs[fh]

    def fsyncdir(self, v: View, fh: int, datasync: bool) -> None:
        if v.node.layer == 0 and not self.ov.volatile:
            self.ov.unlocked(os.fsync, inode.upper_dir_fd(self.ov, v.node))

    def syncfs(self) -> None:
        file.syncfs(self.ov)

    def statfs(self, v: View) -> os.statvfs_result:
        layer = self.ov.upper or self.ov.layers[1]
        assert layer is not None
        return os.fstatvfs(layer.fd)

    def access(self, v: View, mask: int, ctx: Ctx) -> None:
        # With default_permissions the kernel checks modes; existence is ours.
        pass

    # -- xattrs ------------------------------------------------------------
    def getxattr(self, v: View, name: bytes, ctx: Ctx) -> bytes:
        return xattrs.getxattr(self.ov, v.node, os.fsdecode(name))

    def listxattr(self, v: View, ctx: Ctx) -> list[bytes]:
        return [os.fsencode(n) for n in xattrs.listxattr(self.ov, v.node, ctx.uid)]

    def setxattr(self, v: View, name: bytes, value: bytes, flags: int, ctx: Ctx) -> None:
        xattrs.setxattr(self.ov, v.node, os.fsdecode(name), value, flags)

    def removexattr(self, v: View, name: bytes, ctx: Ctx) -> None:
        xattrs.removexattr(self.ov, v.node, os.fsdecode(name))


def _op_name(opcode: int) -> str:
    try:
        return Op(opcode).name.lower()
    except ValueError:
        return str(opcode)


class _umask:
    """The caller's umask for one creation: the upper filesystem applies it
    unless the parent has a default ACL (the kernel leaves that to us)."""
    __slots__ = ("mask",)

    def __init__(self, mask: int) -> None:
        self.mask = mask

    def __enter__(self) -> None:
        os.umask(self.mask)

    def __exit__(self, *exc: object) -> None:
        os.umask(0)

