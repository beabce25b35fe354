"""One FUSE connection: INIT negotiation, the request loop, node ids, backing
files and notifications.

Requests are read by a few worker threads, each on its own clone of the
/dev/fuse fd (replies go back on the fd a request came from), one at a time:
the worker that reads keeps reading until the filesystem is about to block
(hand_off()), and only then does a waiting worker take over.  Idle threads all
waiting in read(2) cost twice the CPU per request (measured: bench/PROFILE.md).
Each request is handled holding the filesystem's lock, so the filesystem sees
one request at a time and may release the lock around blocking work; the node
table is kept under the same lock.  Notifications are sent by a thread of their own: the
kernel may block them on locks held by callers whose requests are still
queued here.
"""
from __future__ import annotations

import errno
import fcntl
import logging
import os
import queue
import struct
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from . import abi
from .abi import Init, Op
from .ops import NOW, Ctx, Entry, Opened, Operations, SetAttr

log = logging.getLogger("cowfs.fuse")

@dataclass
class Config:
    """What the filesystem asks of the connection."""
    entry_timeout: float = 86400.0
    attr_timeout: float = 86400.0
    negative_timeout: float = 86400.0
    passthrough: bool = False        # ask for FUSE_PASSTHROUGH (root, 6.9+)
    posix_acl: bool = False
    max_pages: int = 256             # 1 MiB requests
    threads: int = int(os.environ.get("COWFS_THREADS", "4"))


@dataclass
class Negotiated:
    """What INIT settled."""
    minor: int = 0
    caps: int = 0
    max_write: int = 0

    def has(self, flag: int) -> bool:
        return bool(self.caps & flag)


class _Node:
    __slots__ = ("obj", "lookups", "gen")

    def __init__(self, obj: Any, gen: int) -> None:
        self.obj = obj
        self.lookups = 0
        self.gen = gen


def _split_time(t: float) -> tuple[int, int]:
    sec = int(t)
    return sec, int((t - sec) * 1e9)


class Session:
    def __init__(self, fs: Operations, fd: int, cfg: Config, lock: threading.Lock) -> None:
        self.fs = fs
        self.fd = fd
        self.cfg = cfg
        self.lock = lock
        self.proto = Negotiated()
        self.bufsize = cfg.max_pages * 4096 + 4096
        # node id -> node; obj -> node id.  Ids are reused with a new generation.
        self._nodes: dict[int, _Node] = {abi.ROOT_ID: _Node(fs.root, 0)}
        self._nodes[abi.ROOT_ID].lookups = 1
        self._ids: dict[Any, int] = {fs.root: abi.ROOT_ID}
        self._free: list[tuple[int, int]] = []
        self._next_id = abi.ROOT_ID + 1
        self._notes: queue.SimpleQueue[bytes | None] = queue.SimpleQueue()
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        # The worker reading /dev/fuse now (the others wait for the role).
        self._role = threading.Condition(threading.Lock())
        self._reader: threading.Thread | None = None
        self._worker_fds: list[int] = []
        self.counters: dict[int, int] = {}     # requests served, by opcode
        ev, ea = _split_time(cfg.entry_timeout)
        av, aa = _split_time(cfg.attr_timeout)
        nv, na = _split_time(cfg.negative_timeout)
        self._entry_times = (ev, av, ea, aa)
        self._neg_entry = abi.ENTRY_OUT.pack(0, 0, nv, 0, na, 0, *([0] * 16))
        self._attr_times = (av, aa)
        self._handlers: dict[int, Callable[[memoryview, int, Ctx], bytes | None]] = {
            Op.LOOKUP: self._lookup, Op.FORGET: self._forget, Op.GETATTR: self._getattr,
            Op.SETATTR: self._setattr, Op.READLINK: self._readlink, Op.SYMLINK: self._symlink,
            Op.MKNOD: self._mknod, Op.MKDIR: self._mkdir, Op.UNLINK: self._unlink,
            Op.RMDIR: self._rmdir, Op.RENAME: self._rename, Op.RENAME2: self._rename2,
            Op.LINK: self._link, Op.OPEN: self._open, Op.READ: self._read,
            Op.WRITE: self._write, Op.STATFS: self._statfs, Op.RELEASE: self._release,
            Op.FSYNC: self._fsync, Op.SETXATTR: self._setxattr, Op.GETXATTR: self._getxattr,
            Op.LISTXATTR: self._listxattr, Op.REMOVEXATTR: self._removexattr,
            Op.FLUSH: self._flush, Op.OPENDIR: self._opendir, Op.READDIR: self._readdir,
            Op.READDIRPLUS: self._readdirplus, Op.RELEASEDIR: self._releasedir,
            Op.FSYNCDIR: self._fsyncdir, Op.ACCESS: self._access, Op.CREATE: self._create,
            Op.INTERRUPT: self._interrupt, Op.DESTROY: self._destroy,
            Op.BATCH_FORGET: self._batch_forget, Op.FALLOCATE: self._fallocate,
            Op.LSEEK: self._lseek, Op.COPY_FILE_RANGE: self._copy_file_range,
            Op.SYNCFS: self._syncfs, Op.TMPFILE: self._tmpfile, Op.IOCTL: self._ioctl,
            Op.STATX: self._statx,
        }

    # -- the loop ------------------------------------------------------------
    def handshake(self) -> None:
        """Answer INIT (the first request) before anything else is served."""
        buf = bytearray(self.bufsize)
        while True:
            n = os.readv(self.fd, [buf])
            view = memoryview(buf)[:n]
            length, opcode, unique, _nodeid, _u, _g, _p, _x, _pad = abi.IN_HEADER.unpack_from(view)
            if opcode != Op.INIT:
                self._send(self.fd, unique, -errno.EIO, b"")
                continue
            if self._init(view[abi.IN_HEADER.size:length], unique):
                return

    def _init(self, body: memoryview, unique: int) -> bool:
        major, minor, max_readahead, flags = abi.INIT_IN.unpack_from(body)
        if major > abi.KERNEL_VERSION:
            # The kernel retries INIT with the major we name.
            self._send(self.fd, unique, 0, abi.INIT_OUT.pack(
                abi.KERNEL_VERSION, abi.KERNEL_MINOR, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0))
            return False
        if major < abi.KERNEL_VERSION or minor < abi.OLDEST_MINOR:
            self._send(self.fd, unique, -errno.EPROTO, b"")
            raise OSError(errno.EPROTO, f"kernel FUSE protocol {major}.{minor} is too old")
        if flags & Init.INIT_EXT and len(body) >= 20:
            flags |= struct.unpack_from("<I", body, 16)[0] << 32
        want = (Init.ASYNC_READ | Init.ATOMIC_O_TRUNC | Init.EXPORT_SUPPORT | Init.BIG_WRITES
                | Init.DONT_MASK | Init.DO_READDIRPLUS | Init.READDIRPLUS_AUTO
                | Init.PARALLEL_DIROPS | Init.MAX_PAGES | Init.CACHE_SYMLINKS
                | Init.SETXATTR_EXT | Init.INIT_EXT | Init.HAS_IOCTL_DIR | Init.ABORT_ERROR
                | Init.EXPLICIT_INVAL_DATA)
        if self.cfg.posix_acl:
            want |= Init.POSIX_ACL
        if self.cfg.passthrough:
            want |= Init.PASSTHROUGH
        caps = flags & want
        minor = min(minor, abi.KERNEL_MINOR)
        max_pages = self.cfg.max_pages if caps & Init.MAX_PAGES else 32
        max_write = max_pages * 4096
        self.bufsize = max_write + 4096
        self.proto = Negotiated(minor, int(caps), max_write)
        stack = abi.MAX_STACK_DEPTH if caps & Init.PASSTHROUGH else 0
        out = abi.INIT_OUT.pack(abi.KERNEL_VERSION, minor, max_readahead, caps & 0xFFFFFFFF,
                                64, 48, max_write, 1, max_pages, 0, caps >> 32, stack, 0)
        if minor < 23:
            out = out[:24]
        self.fs.init(int(caps))
        self._send(self.fd, unique, 0, out)
        return True

    def start(self) -> None:
        """Serve on worker threads until the connection ends (see wait())."""
        self._threads.append(threading.Thread(target=self._notifier, name="fuse-notify",
                                              daemon=True))
        for i in range(self.cfg.threads):
            fd = self.fd if i == 0 else self._clone()
            if fd < 0:
                break
            self._worker_fds.append(fd)
            self._threads.append(threading.Thread(target=self._worker, args=(fd,),
                                                  name=f"fuse-{i}", daemon=True))
        for t in self._threads:
            t.start()

    def wait(self) -> None:
        self._stop.wait()

    def stop(self) -> None:
        self._stop.set()
        self._notes.put(None)
        with self._role:
            self._role.notify_all()

    def hand_off(self) -> None:
        """The calling worker is about to block: let another one read meanwhile."""
        if self._reader is threading.current_thread():
            with self._role:
                self._reader = None
                self._role.notify()

    def _take_role(self, me: threading.Thread) -> bool:
        with self._role:
            while self._reader is not None and not self._stop.is_set():
                self._role.wait()
            self._reader = me
        return not self._stop.is_set()

    def _clone(self) -> int:
        try:
            fd = os.open("/dev/fuse", os.O_RDWR | os.O_CLOEXEC)
        except OSError:
            return -1
        try:
            fcntl.ioctl(fd, abi.DEV_IOC_CLONE, struct.pack("<I", self.fd))
        except OSError as e:
            log.info("cannot clone the /dev/fuse fd (%s): one reader thread", e)
            os.close(fd)
            return -1
        return fd

    def _worker(self, fd: int) -> None:
        buf = bytearray(self.bufsize)
        view = memoryview(buf)
        hsize = abi.IN_HEADER.size
        handlers = self._handlers
        counters = self.counters
        me = threading.current_thread()
        while not self._stop.is_set():
            if self._reader is not me and not self._take_role(me):
                return
            try:
                n = os.readv(fd, [buf])
            except OSError as e:
                if e.errno in (errno.EINTR, errno.EAGAIN):
                    continue
                if e.errno == errno.ENOENT:     # the request was interrupted
                    continue
                # ENODEV: unmounted; anything else ends the connection too.
                if e.errno != errno.ENODEV:
                    log.error("reading /dev/fuse failed: %s", e)
                self.stop()
                return
            if n == 0:
                self.stop()
                return
            length, opcode, unique, nodeid, uid, gid, pid, _x, _p = abi.IN_HEADER.unpack_from(buf)
            handler = handlers.get(opcode)
            error, reply = 0, b""
            try:
                if handler is None:
                    raise OSError(errno.ENOSYS, "unknown opcode")
                with self.lock:
                    counters[opcode] = counters.get(opcode, 0) + 1
                    out = handler(view[hsize:length], nodeid, Ctx(uid, gid, pid))
                if out is None:
                    continue                    # FORGET and friends: no reply
                reply = out
            except OSError as e:
                if opcode in _NO_REPLY:
                    continue
                error = -(e.errno or errno.EIO)
                if log.isEnabledFor(logging.DEBUG):
                    log.debug("%s on node %d: %s", _op_name(opcode), nodeid, e)
            except Exception:                   # a bug: answer EIO, log, keep serving
                log.exception("%s on node %d failed", _op_name(opcode), nodeid)
                if opcode in _NO_REPLY:
                    continue
                error = -errno.EIO
            if opcode == Op.DESTROY:
                self._send(fd, unique, error, reply)
                self.stop()
                return
            self._send(fd, unique, error, reply)

    def _send(self, fd: int, unique: int, error: int, body: bytes | list[bytes]) -> None:
        try:
            if type(body) is bytes and len(body) < 4096:
                # (one small buffer: cheaper than gathering)
                os.write(fd, _OUT_HEADER_PACK(_OUT_SIZE + len(body), error, unique) + body)
                return
            parts = body if isinstance(body, list) else [body]
            size = _OUT_SIZE + sum(len(p) for p in parts)
            os.writev(fd, [_OUT_HEADER_PACK(size, error, unique), *parts])
        except OSError as e:
            # ENOENT: the request was interrupted and is gone; ENODEV: unmounted.
            if e.errno not in (errno.ENOENT, errno.ENODEV):
                log.error("replying to request %d failed: %s", unique, e)

    def _notifier(self) -> None:
        while True:
            msg = self._notes.get()
            if msg is None:
                return
            try:
                os.write(self.fd, msg)
            except OSError as e:
                # ENOENT: the kernel no longer has what we invalidate.
                if e.errno not in (errno.ENOENT, errno.ENODEV):
                    log.warning("notification failed: %s", e)

    # -- nodes -----------------------------------------------------------------
    def _obj(self, nodeid: int) -> Any:
        node = self._nodes.get(nodeid)
        if node is None:
            raise OSError(errno.ESTALE, "unknown node id")
        return node.obj

    def _entry_out(self, e: Entry) -> bytes:
        """Register one kernel reference to e.obj; its fuse_entry_out."""
        nodeid = self._ids.get(e.obj)
        if nodeid is None:
            if self._free:
                nodeid, gen = self._free.pop()
            else:
                nodeid, gen = self._next_id, 0
                self._next_id += 1
            node = _Node(e.obj, gen)
            self._nodes[nodeid] = node
            self._ids[e.obj] = nodeid
        else:
            node = self._nodes[nodeid]
        node.lookups += 1
        ev, av, ea, aa = self._entry_times
        return abi.ENTRY_HEAD.pack(nodeid, node.gen, ev, av, ea, aa) + e.attr

    def _drop(self, nodeid: int, count: int) -> None:
        node = self._nodes.get(nodeid)
        if node is None or nodeid == abi.ROOT_ID:
            return
        node.lookups -= count
        if node.lookups <= 0:
            del self._nodes[nodeid]
            del self._ids[node.obj]
            self._free.append((nodeid, node.gen + 1))
            self.fs.forget(node.obj)

    def known(self, obj: Any) -> bool:
        """Does the kernel hold a reference to obj?"""
        return obj in self._ids

    def node_id(self, obj: Any) -> int | None:
        return self._ids.get(obj)

    # -- notifications (queued; sent by the notifier thread) ------------------
    def inval_inode(self, obj: Any, off: int = 0, length: int = 0) -> None:
        """Drop the kernel's cached attributes (and data in [off, off+length),
        all of it for length -1) of obj."""
        nodeid = self._ids.get(obj)
        if nodeid is not None:
            self._notify(abi.Notify.INVAL_INODE, abi.NOTIFY_INVAL_INODE.pack(nodeid, off, length))

    def inval_inode_now(self, obj: Any, off: int = -1, length: int = 0) -> None:
        """inval_inode, sent before this call returns (before the reply of the
        request that made the attributes stale), not queued.  Safe from a
        request: the kernel takes no lock a request waits under, for attributes
        (off -1) or a directory's cached listing (off 0)."""
        nodeid = self._ids.get(obj)
        if nodeid is None:
            return
        body = abi.NOTIFY_INVAL_INODE.pack(nodeid, off, length)
        try:
            os.write(self.fd, abi.OUT_HEADER.pack(abi.OUT_HEADER.size + len(body),
                                                  abi.Notify.INVAL_INODE, 0) + body)
        except OSError as e:
            if e.errno not in (errno.ENOENT, errno.ENODEV):
                raise

    def inval_entry(self, parent: Any, name: bytes) -> None:
        """Drop the kernel's cached dentry parent/name (a negative one too)."""
        nodeid = self._ids.get(parent)
        if nodeid is not None:
            self._notify(abi.Notify.INVAL_ENTRY,
                         abi.NOTIFY_INVAL_ENTRY.pack(nodeid, len(name), 0) + name + b"\0")

    def _notify(self, code: int, body: bytes) -> None:
        self._notes.put(abi.OUT_HEADER.pack(abi.OUT_HEADER.size + len(body), code, 0) + body)

    # -- passthrough -----------------------------------------------------------
    def backing_open(self, fd: int) -> int:
        """Register fd as a backing file; the id goes in Opened replies."""
        arg = bytearray(abi.BACKING_MAP.pack(fd, 0, 0))
        return fcntl.ioctl(self.fd, abi.DEV_IOC_BACKING_OPEN, arg)

    def backing_close(self, backing_id: int) -> None:
        fcntl.ioctl(self.fd, abi.DEV_IOC_BACKING_CLOSE, struct.pack("<I", backing_id))

    # -- request handlers ----------------------------------------------------
    # Each gets (body, nodeid, ctx) and returns the reply body, or None for none.
    def _lookup(self, body: memoryview, nodeid: int, ctx: Ctx) -> bytes:
        e = self.fs.lookup(self._obj(nodeid), _name(body), ctx)
        return self._neg_entry if e is None else self._entry_out(e)

    def _forget(self, body: memoryview, nodeid: int, ctx: Ctx) -> None:
        self._drop(nodeid, abi.FORGET_IN.unpack_from(body)[0])

    def _batch_forget(self, body: memoryview, nodeid: int, ctx: Ctx) -> None:
        count = abi.BATCH_FORGET_IN.unpack_from(body)[0]
        off = abi.BATCH_FORGET_IN.size
        for _ in range(count):
            nid, n = abi.FORGET_ONE.unpack_from(body, off)
            off += abi.FORGET_ONE.size
            try:
                self._drop(nid, n)
            except Exception:        # one bad forget must not leak the rest
                log.exception("forget of node %d failed", nid)

    def _attr_out(self, attr: bytes) -> bytes:
        return abi.ATTR_HEAD.pack(self._attr_times[0], self._attr_times[1], 0) + attr

    def _getattr(self, body: memoryview, nodeid: int, ctx: Ctx) -> bytes:
        flags, _, fh = abi.GETATTR_IN.unpack_from(body)
        attr = self.fs.getattr(self._obj(nodeid), fh if flags & abi.GETATTR_FH else None, ctx)
        return self._attr_out(attr)

    def _setattr(self, body: memoryview, nodeid: int, ctx: Ctx) -> bytes:
        (valid, _, fh, size, _lo, atime, mtime, ctime, atimens, mtimens, ctimens, mode,
         _u4, uid, gid, _u5) = abi.SETATTR_IN.unpack_from(body)
        ch = SetAttr()
        if valid & abi.FATTR_MODE:
            ch.mode = mode
        if valid & abi.FATTR_UID:
            ch.uid = uid
        if valid & abi.FATTR_GID:
            ch.gid = gid
        if valid & abi.FATTR_SIZE:
            ch.size = size
        if valid & abi.FATTR_ATIME_NOW:
            ch.atime_ns = NOW
        elif valid & abi.FATTR_ATIME:
            ch.atime_ns = _signed(atime) * 1_000_000_000 + atimens
        if valid & abi.FATTR_MTIME_NOW:
            ch.mtime_ns = NOW
        elif valid & abi.FATTR_MTIME:
            ch.mtime_ns = _signed(mtime) * 1_000_000_000 + mtimens
        if valid & abi.FATTR_CTIME:
            ch.ctime_ns = _signed(ctime) * 1_000_000_000 + ctimens
        if valid & abi.FATTR_FH:
            ch.fh = fh
        ch.kill_suidgid = bool(valid & abi.FATTR_KILL_SUIDGID)
        return self._attr_out(self.fs.setattr(self._obj(nodeid), ch, ctx))

    def _readlink(self, body: memoryview, nodeid: int, ctx: Ctx) -> bytes:
        return self.fs.readlink(self._obj(nodeid), ctx)

    def _symlink(self, body: memoryview, nodeid: int, ctx: Ctx) -> bytes:
        name, rest = _two_names(body)
        return self._entry_out(self.fs.symlink(self._obj(nodeid), name, rest, ctx))

    def _mknod(self, body: memoryview, nodeid: int, ctx: Ctx) -> bytes:
        mode, rdev, umask, _ = abi.MKNOD_IN.unpack_from(body)
        name = _name(body[abi.MKNOD_IN.size:])
        return self._entry_out(self.fs.mknod(self._obj(nodeid), name, mode,
                                             abi.decode_dev(rdev), umask, ctx))

    def _mkdir(self, body: memoryview, nodeid: int, ctx: Ctx) -> bytes:
        mode, umask = abi.MKDIR_IN.unpack_from(body)
        name = _name(body[abi.MKDIR_IN.size:])
        return self._entry_out(self.fs.mkdir(self._obj(nodeid), name, mode, umask, ctx))

    def _unlink(self, body: memoryview, nodeid: int, ctx: Ctx) -> bytes:
        self.fs.unlink(self._obj(nodeid), _name(body), ctx)
        return b""

    def _rmdir(self, body: memoryview, nodeid: int, ctx: Ctx) -> bytes:
        self.fs.rmdir(self._obj(nodeid), _name(body), ctx)
        return b""

    def _rename(self, body: memoryview, nodeid: int, ctx: Ctx) -> bytes:
        newdir = abi.RENAME_IN.unpack_from(body)[0]
        old, new = _two_names(body[abi.RENAME_IN.size:])
        self.fs.rename(self._obj(nodeid), old, self._obj(newdir), new, 0, ctx)
        return b""

    def _rename2(self, body: memoryview, nodeid: int, ctx: Ctx) -> bytes:
        newdir, flags, _ = abi.RENAME2_IN.unpack_from(body)
        old, new = _two_names(body[abi.RENAME2_IN.size:])
        self.fs.rename(self._obj(nodeid), old, self._obj(newdir), new, flags, ctx)
        return b""

    def _link(self, body: memoryview, nodeid: int, ctx: Ctx) -> bytes:
        old = abi.LINK_IN.unpack_from(body)[0]
        name = _name(body[abi.LINK_IN.size:])
        return self._entry_out(self.fs.link(self._obj(old), self._obj(nodeid), name, ctx))

    def _open_out(self, o: Opened) -> bytes:
        if o.backing_id is None:
            return abi.OPEN_OUT.pack(o.fh, o.flags, 0)
        return abi.OPEN_OUT.pack(o.fh, o.flags | abi.Fopen.PASSTHROUGH, o.backing_id)

    def _open(self, body: memoryview, nodeid: int, ctx: Ctx) -> bytes:
        flags, _ = abi.OPEN_IN.unpack_from(body)
        return self._open_out(self.fs.open(self._obj(nodeid), flags, ctx))

    def _create(self, body: memoryview, nodeid: int, ctx: Ctx) -> list[bytes]:
        flags, mode, umask, _ = abi.CREATE_IN.unpack_from(body)
        name = _name(body[abi.CREATE_IN.size:])
        entry, opened = self.fs.create(self._obj(nodeid), name, mode, flags, umask, ctx)
        return [self._entry_out(entry), self._open_out(opened)]

    def _tmpfile(self, body: memoryview, nodeid: int, ctx: Ctx) -> list[bytes]:
        flags, mode, umask, _ = abi.CREATE_IN.unpack_from(body)
        entry, opened = self.fs.tmpfile(self._obj(nodeid), mode, flags, umask, ctx)
        return [self._entry_out(entry), self._open_out(opened)]

    def _read(self, body: memoryview, nodeid: int, ctx: Ctx) -> bytes:
        fh, offset, size, _rf, _lo, _fl, _ = abi.READ_IN.unpack_from(body)
        return self.fs.read(fh, offset, size)

    def _write(self, body: memoryview, nodeid: int, ctx: Ctx) -> bytes:
        fh, offset, size, _wf, _lo, _fl, _ = abi.WRITE_IN.unpack_from(body)
        data = body[abi.WRITE_IN.size:abi.WRITE_IN.size + size]
        return abi.WRITE_OUT.pack(self.fs.write(fh, offset, data), 0)

    def _statfs(self, body: memoryview, nodeid: int, ctx: Ctx) -> bytes:
        sv = self.fs.statfs(self._obj(nodeid))
        return abi.STATFS_OUT.pack(sv.f_blocks, sv.f_bfree, sv.f_bavail, sv.f_files,
                                   sv.f_ffree, sv.f_bsize, sv.f_namemax, sv.f_frsize, 0)

    def _release(self, body: memoryview, nodeid: int, ctx: Ctx) -> bytes:
        fh = abi.RELEASE_IN.unpack_from(body)[0]
        self.fs.release(self._obj(nodeid), fh)
        return b""

    def _flush(self, body: memoryview, nodeid: int, ctx: Ctx) -> bytes:
        self.fs.flush(self._obj(nodeid), abi.FLUSH_IN.unpack_from(body)[0])
        return b""

    def _fsync(self, body: memoryview, nodeid: int, ctx: Ctx) -> bytes:
        fh, flags, _ = abi.FSYNC_IN.unpack_from(body)
        self.fs.fsync(fh, bool(flags & abi.FSYNC_FDATASYNC))
        return b""

    def _setxattr(self, body: memoryview, nodeid: int, ctx: Ctx) -> bytes:
        if self.proto.has(Init.SETXATTR_EXT):
            size, flags, _sxf, _ = abi.SETXATTR_IN_EXT.unpack_from(body)
            rest = body[abi.SETXATTR_IN_EXT.size:]
        else:
            size, flags = abi.SETXATTR_IN_OLD.unpack_from(body)
            rest = body[abi.SETXATTR_IN_OLD.size:]
        end = bytes(rest).index(b"\0")
        name, value = bytes(rest[:end]), bytes(rest[end + 1:end + 1 + size])
        self.fs.setxattr(self._obj(nodeid), name, value, flags, ctx)
        return b""

    def _getxattr(self, body: memoryview, nodeid: int, ctx: Ctx) -> bytes:
        size, _ = abi.GETXATTR_IN.unpack_from(body)
        value = self.fs.getxattr(self._obj(nodeid), _name(body[abi.GETXATTR_IN.size:]), ctx)
        return _sized(value, size)

    def _listxattr(self, body: memoryview, nodeid: int, ctx: Ctx) -> bytes:
        size, _ = abi.GETXATTR_IN.unpack_from(body)
        names = self.fs.listxattr(self._obj(nodeid), ctx)
        return _sized(b"".join(n + b"\0" for n in names), size)

    def _removexattr(self, body: memoryview, nodeid: int, ctx: Ctx) -> bytes:
        self.fs.removexattr(self._obj(nodeid), _name(body), ctx)
        return b""

    def _opendir(self, body: memoryview, nodeid: int, ctx: Ctx) -> bytes:
        flags, _ = abi.OPEN_IN.unpack_from(body)
        return self._open_out(self.fs.opendir(self._obj(nodeid), flags, ctx))

    def _readdir(self, body: memoryview, nodeid: int, ctx: Ctx) -> bytes:
        fh, offset, size, _rf, _lo, _fl, _ = abi.READ_IN.unpack_from(body)
        out: list[bytes] = []
        used = 0
        for d in self.fs.readdir(self._obj(nodeid), fh, offset, False):
            rec = abi.pack_dirent(d.ino, d.next_off, d.name, d.dtype)
            if used + len(rec) > size:
                break
            out.append(rec)
            used += len(rec)
        return b"".join(out)

    def _readdirplus(self, body: memoryview, nodeid: int, ctx: Ctx) -> bytes:
        fh, offset, size, _rf, _lo, _fl, _ = abi.READ_IN.unpack_from(body)
        out: list[bytes] = []
        used = 0
        for d in self.fs.readdir(self._obj(nodeid), fh, offset, True):
            need = abi.direntplus_size(d.name)
            if used + need > size:
                if d.entry is not None and d.entry.obj not in self._ids:
                    self.fs.forget(d.entry.obj)
                break
            if d.entry is None or d.name in (b".", b".."):
                # The kernel takes no reference from these (nor from . and ..).
                head = bytes(abi.ENTRY_OUT.size)
            else:
                head = self._entry_out(d.entry)
            name_pad = need - abi.ENTRY_OUT.size - abi.DIRENT.size - len(d.name)
            out.append(head + abi.DIRENT.pack(d.ino, d.next_off, len(d.name), d.dtype)
                       + d.name + b"\0" * name_pad)
            used += need
        return b"".join(out)

    def _releasedir(self, body: memoryview, nodeid: int, ctx: Ctx) -> bytes:
        fh = abi.RELEASE_IN.unpack_from(body)[0]
        self.fs.releasedir(self._obj(nodeid), fh)
        return b""

    def _fsyncdir(self, body: memoryview, nodeid: int, ctx: Ctx) -> bytes:
        fh, flags, _ = abi.FSYNC_IN.unpack_from(body)
        self.fs.fsyncdir(self._obj(nodeid), fh, bool(flags & abi.FSYNC_FDATASYNC))
        return b""

    def _access(self, body: memoryview, nodeid: int, ctx: Ctx) -> bytes:
        mask, _ = abi.ACCESS_IN.unpack_from(body)
        self.fs.access(self._obj(nodeid), mask, ctx)
        return b""

    def _interrupt(self, body: memoryview, nodeid: int, ctx: Ctx) -> None:
        # Requests here finish quickly or not at all (a copy-up in progress is
        # shared by other callers); the interrupted one is simply answered.
        return None

    def _destroy(self, body: memoryview, nodeid: int, ctx: Ctx) -> bytes:
        self.fs.destroy()
        return b""

    def _fallocate(self, body: memoryview, nodeid: int, ctx: Ctx) -> bytes:
        fh, offset, length, mode, _ = abi.FALLOCATE_IN.unpack_from(body)
        self.fs.fallocate(fh, mode, offset, length)
        return b""

    def _lseek(self, body: memoryview, nodeid: int, ctx: Ctx) -> bytes:
        fh, offset, whence, _ = abi.LSEEK_IN.unpack_from(body)
        return abi.LSEEK_OUT.pack(self.fs.lseek(fh, offset, whence))

    def _copy_file_range(self, body: memoryview, nodeid: int, ctx: Ctx) -> bytes:
        fh_in, off_in, _nodeid_out, fh_out, off_out, length, flags = \
            abi.COPY_FILE_RANGE_IN.unpack_from(body)
        n = self.fs.copy_file_range(fh_in, off_in, fh_out, off_out, length, flags)
        return abi.WRITE_OUT.pack(n, 0)

    def _syncfs(self, body: memoryview, nodeid: int, ctx: Ctx) -> bytes:
        self.fs.syncfs()
        return b""

    def _ioctl(self, body: memoryview, nodeid: int, ctx: Ctx) -> bytes:
        fh, flags, cmd, _arg, in_size, out_size = abi.IOCTL_IN.unpack_from(body)
        if not flags & abi.IOCTL_UNRESTRICTED:
            data = bytes(body[abi.IOCTL_IN.size:abi.IOCTL_IN.size + in_size])
            result, out = self.fs.ioctl(self._obj(nodeid), fh, cmd, data, out_size)
            return abi.IOCTL_OUT.pack(result, 0, 0, 0) + out[:out_size]
        raise OSError(errno.ENOTTY, "unrestricted ioctls are not served")

    def _statx(self, body: memoryview, nodeid: int, ctx: Ctx) -> bytes:
        getattr_flags, _, fh, _sx_flags, mask = abi.STATX_IN.unpack_from(body)
        stx = self.fs.statx(self._obj(nodeid), fh if getattr_flags & abi.GETATTR_FH else None,
                            mask, ctx)
        return abi.STATX_OUT_HEAD.pack(self._attr_times[0], self._attr_times[1], 0) + stx


_OUT_HEADER_PACK = abi.OUT_HEADER.pack
_OUT_SIZE = abi.OUT_HEADER.size
_NO_REPLY = frozenset((Op.FORGET, Op.BATCH_FORGET, Op.INTERRUPT))


def _signed(v: int) -> int:
    return v - (1 << 64) if v >= 1 << 63 else v


def _name(body: memoryview) -> bytes:
    raw = bytes(body)
    end = raw.find(b"\0")
    return raw if end < 0 else raw[:end]


def _two_names(body: memoryview) -> tuple[bytes, bytes]:
    raw = bytes(body)
    first = raw.index(b"\0")
    second = raw.find(b"\0", first + 1)
    return raw[:first], raw[first + 1:second if second >= 0 else len(raw)]


def _sized(data: bytes, size: int) -> bytes:
    """getxattr/listxattr: size 0 asks for the length only."""
    if size == 0:
        return abi.GETXATTR_OUT.pack(len(data), 0)
    if len(data) > size:
        raise OSError(errno.ERANGE, "buffer too small")
    return data


def _op_name(opcode: int) -> str:
    try:
        return Op(opcode).name
    except ValueError:
        return f"opcode {opcode}"
