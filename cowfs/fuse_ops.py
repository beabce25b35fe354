"""The FUSE adapter: decode a request, call the overlay core, encode the reply.

No semantics live here.  Core errors are OSErrors; one decorator turns them
into FUSE errnos.  Replies carry long cache timeouts: lower layers are
immutable while mounted and the upper layer changes only through this mount,
so the kernel may keep entries, attributes and page cache.
"""
from __future__ import annotations

import errno
import functools
import logging
import os
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import pyfuse3
from pyfuse3 import FUSEError

from .overlay import dir as dir_ops, file, inode as inode_attrs, xattrs
from .overlay.inodes import Node
from .overlay.namei import lookup, lookup_listed
from .overlay import Overlay
from .overlay.readdir import merged_names

log = logging.getLogger("cowfs")

TIMEOUT = 86400.0
F = TypeVar("F", bound=Callable[..., Awaitable[Any]])


def errno_boundary(fn: F) -> F:
    @functools.wraps(fn)
    async def wrapper(*args: Any) -> Any:
        try:
            return await fn(*args)
        except OSError as e:
            if log.isEnabledFor(logging.DEBUG):
                log.debug("%s%r: %s", fn.__name__, args[1:], e)
            raise FUSEError(e.errno or errno.EIO) from None
        except KeyError:
            raise FUSEError(errno.ESTALE) from None
        except FUSEError:
            raise
        except Exception:
            log.exception("cowfs: %s failed", fn.__name__)
            raise FUSEError(errno.EIO) from None
    return wrapper  # type: ignore[return-value]


def _attrs(ino: int, st: os.stat_result) -> pyfuse3.EntryAttributes:
    a = pyfuse3.EntryAttributes()
    a.st_ino = ino
    a.st_mode = st.st_mode
    a.st_nlink = st.st_nlink
    a.st_uid = st.st_uid
    a.st_gid = st.st_gid
    a.st_rdev = st.st_rdev
    a.st_size = st.st_size
    a.st_blksize = st.st_blksize
    a.st_blocks = st.st_blocks
    a.st_atime_ns = st.st_atime_ns
    a.st_mtime_ns = st.st_mtime_ns
    a.st_ctime_ns = st.st_ctime_ns
    a.entry_timeout = TIMEOUT
    a.attr_timeout = TIMEOUT
    return a


class DirHandle:
    __slots__ = ("node", "names")

    def __init__(self, node: Node) -> None:
        self.node = node
        self.names: list[bytes] = []


class CowfsOperations(pyfuse3.Operations):
    supports_dot_lookup = True
    # No writeback cache: with it the kernel keeps its own mtimes and sends them
    # before the data they describe, so the upper dir would disagree with the
    # mount. Reads are still served from the page cache (keep_cache).
    enable_writeback_cache = False

    def __init__(self, overlay: Overlay) -> None:
        super().__init__()
        self.ov = overlay
        self.table = overlay.table
        self.handles: dict[int, file.Handle] = {}
        self.dirs: dict[int, DirHandle] = {}
        self._next_fh = 1

    def _fh(self) -> int:
        self._next_fh += 1
        return self._next_fh

    def _entry(self, node: Node) -> pyfuse3.EntryAttributes:
        if node.layer != 0:
            # Lower entries never change while mounted: encode them once.
            if node.attr is None:
                node.attr = self._encode(node)
            return node.attr
        return self._encode(node)

    def _encode(self, node: Node) -> pyfuse3.EntryAttributes:
        attr = _attrs(node.ino, inode_attrs.getattr_(self.ov, node))
        if node.unlinked:
            attr.st_nlink = 0     # (an orphan's real link is work/'s, not a name)
        elif node.extra_links:
            attr.st_nlink += node.extra_links
        elif node.is_dir and inode_attrs.is_merged(self.ov, node):
            # A merged directory's link count is unknowable without reading every
            # layer; like overlayfs, report 1 ("not counted": find and fts cope).
            attr.st_nlink = 1
        return attr

    def _looked_up(self, node: Node) -> pyfuse3.EntryAttributes:
        attr = self._entry(node)
        node.lookups += 1
        return attr

    # -- names -------------------------------------------------------------
    @errno_boundary
    async def lookup(self, parent_inode: int, name: bytes, ctx: Any) -> pyfuse3.EntryAttributes:
        node = lookup(self.ov, self.table.get(parent_inode), name)
        if node is None:
            # A negative entry the kernel may cache: creation through the mount
            # replaces it, and nothing else changes the layers.
            neg = pyfuse3.EntryAttributes()
            neg.st_ino = 0
            neg.entry_timeout = TIMEOUT
            return neg
        return self._looked_up(node)

    async def forget(self, inode_list: Any) -> None:
        for ino, count in inode_list:
            self.table.forget(ino, count)

    @errno_boundary
    async def getattr(self, inode: int, ctx: Any) -> pyfuse3.EntryAttributes:
        return self._entry(self.table.get(inode))

    @errno_boundary
    async def setattr(self, inode: int, attr: Any, fields: Any, fh: int | None,
                      ctx: Any) -> pyfuse3.EntryAttributes:
        node = self.table.get(inode)
        h = self.handles.get(fh) if fh is not None else None
        await inode_attrs.setattr_(
            self.ov, node,
            mode=attr.st_mode if fields.update_mode else None,
            uid=attr.st_uid if fields.update_uid else None,
            gid=attr.st_gid if fields.update_gid else None,
            size=attr.st_size if fields.update_size else None,
            atime_ns=attr.st_atime_ns if fields.update_atime else None,
            mtime_ns=attr.st_mtime_ns if fields.update_mtime else None,
            fd=h.fd if h is not None and h.writable and h.gen == node.gen else None)
        return self._entry(node)

    @errno_boundary
    async def readlink(self, inode: int, ctx: Any) -> bytes:
        node = self.table.get(inode)
        if node.layer == 0:
            dfd, name = inode_attrs.upper_ref(self.ov, node)
        else:
            assert node.parent is not None
            dfd, name = self.table.dir_fd(node.parent, node.layer), node.name
        return os.readlink(name, dir_fd=dfd)

    @errno_boundary
    async def mknod(self, parent_inode: int, name: bytes, mode: int, rdev: int,
                    ctx: Any) -> pyfuse3.EntryAttributes:
        node = dir_ops.mknod(self.ov, self.table.get(parent_inode), name, mode, rdev,
                             ctx.uid, ctx.gid)
        return self._looked_up(node)

    @errno_boundary
    async def mkdir(self, parent_inode: int, name: bytes, mode: int,
                    ctx: Any) -> pyfuse3.EntryAttributes:
        node = dir_ops.mkdir(self.ov, self.table.get(parent_inode), name, mode, ctx.uid, ctx.gid)
        return self._looked_up(node)

    @errno_boundary
    async def symlink(self, parent_inode: int, name: bytes, target: bytes,
                      ctx: Any) -> pyfuse3.EntryAttributes:
        node = dir_ops.symlink(self.ov, self.table.get(parent_inode), name, target,
                               ctx.uid, ctx.gid)
        return self._looked_up(node)

    @errno_boundary
    async def link(self, inode: int, new_parent_inode: int, new_name: bytes,
                   ctx: Any) -> pyfuse3.EntryAttributes:
        node = await dir_ops.link(self.ov, self.table.get(inode),
                                  self.table.get(new_parent_inode), new_name)
        return self._looked_up(node)

    @errno_boundary
    async def unlink(self, parent_inode: int, name: bytes, ctx: Any) -> None:
        dir_ops.unlink(self.ov, self.table.get(parent_inode), name)

    @errno_boundary
    async def rmdir(self, parent_inode: int, name: bytes, ctx: Any) -> None:
        dir_ops.rmdir(self.ov, self.table.get(parent_inode), name)

    @errno_boundary
    async def rename(self, parent_inode_old: int, name_old: bytes, parent_inode_new: int,
                     name_new: bytes, flags: int, ctx: Any) -> None:
        await dir_ops.rename(self.ov, self.table.get(parent_inode_old), name_old,
                             self.table.get(parent_inode_new), name_new, flags)

    # -- files -------------------------------------------------------------
    @errno_boundary
    async def open(self, inode: int, flags: int, ctx: Any) -> pyfuse3.FileInfo:
        h = await file.open_file(self.ov, self.table.get(inode), flags)
        fh = self._fh()
        self.handles[fh] = h
        return pyfuse3.FileInfo(fh=fh, keep_cache=True)

    @errno_boundary
    async def create(self, parent_inode: int, name: bytes, mode: int, flags: int,
                     ctx: Any) -> tuple[pyfuse3.FileInfo, pyfuse3.EntryAttributes]:
        h, node = dir_ops.create(self.ov, self.table.get(parent_inode), name, mode, flags,
                                 ctx.uid, ctx.gid)
        fh = self._fh()
        self.handles[fh] = h
        return pyfuse3.FileInfo(fh=fh, keep_cache=True), self._looked_up(node)

    @errno_boundary
    async def read(self, fh: int, off: int, size: int) -> bytes:
        return file.read(self.ov, self.handles[fh], off, size)

    @errno_boundary
    async def write(self, fh: int, off: int, buf: bytes) -> int:
        return file.write(self.ov, self.handles[fh], off, buf)

    async def flush(self, fh: int) -> None:
        pass

    @errno_boundary
    async def fsync(self, fh: int, datasync: bool) -> None:
        file.fsync(self.ov, self.handles[fh], datasync)

    @errno_boundary
    async def release(self, fh: int) -> None:
        file.release(self.handles.pop(fh))

    # -- directories -------------------------------------------------------
    @errno_boundary
    async def opendir(self, inode: int, ctx: Any) -> int:
        node = self.table.get(inode)
        if not node.is_dir:
            raise FUSEError(errno.ENOTDIR)
        fh = self._fh()
        self.dirs[fh] = DirHandle(node)
        return fh

    @errno_boundary
    async def readdir(self, fh: int, start_id: int, token: Any) -> None:
        d = self.dirs[fh]
        if start_id == 0:
            # A fresh listing at offset 0 (opendir or rewinddir); later offsets
            # index this snapshot, so they stay stable while the directory changes.
            d.names = [b".", b".."] + merged_names(self.ov, d.node)
        names = d.names
        for i in range(start_id, len(names)):
            name = names[i]
            if i < 2:
                node = d.node if i == 0 else (d.node.parent or d.node)
                # The kernel keeps no reference for . and .., so count no lookup.
                if not pyfuse3.readdir_reply(token, name, self._entry(node), i + 1):
                    return
                continue
            node = lookup_listed(self.ov, d.node, name)
            if node is None:
                continue
            if not pyfuse3.readdir_reply(token, name, self._entry(node), i + 1):
                if node.lookups == 0:
                    self.table.forget(node.ino, 0)
                return
            node.lookups += 1

    async def releasedir(self, fh: int) -> None:
        del self.dirs[fh]

    @errno_boundary
    async def fsyncdir(self, fh: int, datasync: bool) -> None:
        pass

    @errno_boundary
    async def statfs(self, ctx: Any) -> pyfuse3.StatvfsData:
        layer = self.ov.upper or self.ov.layers[1]
        assert layer is not None
        sv = os.fstatvfs(layer.fd)
        out = pyfuse3.StatvfsData()
        for key in ("f_bsize", "f_frsize", "f_blocks", "f_bfree", "f_bavail",
                    "f_files", "f_ffree", "f_favail", "f_namemax"):
            setattr(out, key, getattr(sv, key))
        return out

    # -- xattrs ------------------------------------------------------------
    @errno_boundary
    async def getxattr(self, inode: int, name: bytes, ctx: Any) -> bytes:
        return xattrs.getxattr(self.ov, self.table.get(inode), os.fsdecode(name))

    @errno_boundary
    async def listxattr(self, inode: int, ctx: Any) -> list[bytes]:
        return [os.fsencode(n) for n in xattrs.listxattr(self.ov, self.table.get(inode))]

    @errno_boundary
    async def setxattr(self, inode: int, name: bytes, value: bytes, ctx: Any) -> None:
        await xattrs.setxattr(self.ov, self.table.get(inode), os.fsdecode(name), value)

    @errno_boundary
    async def removexattr(self, inode: int, name: bytes, ctx: Any) -> None:
        await xattrs.removexattr(self.ov, self.table.get(inode), os.fsdecode(name))

    @errno_boundary
    async def access(self, inode: int, mode: int, ctx: Any) -> bool:
        # With default_permissions the kernel checks modes; existence is ours.
        self.table.get(inode)
        return True
