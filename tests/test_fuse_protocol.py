"""The FUSE transport without a mount: struct layouts against the kernel's
uapi sizes, INIT negotiation with older and newer kernels, and whole requests
through a Session talking to a fake kernel over a SOCK_SEQPACKET pair (message
boundaries like /dev/fuse)."""
from __future__ import annotations

import errno
import os
import socket
import stat
import struct
import threading
from collections.abc import Iterator

import pytest

from cowfs.fuse import Config, Ctx, DirEntry, Entry, Operations, Session, abi
from cowfs.fuse.abi import Init, Op


@pytest.mark.parametrize("st,size", [
    (abi.IN_HEADER, 40), (abi.OUT_HEADER, 16), (abi.ATTR, 88), (abi.ENTRY_OUT, 128),
    (abi.ATTR_OUT, 104), (abi.INIT_OUT, 64), (abi.OPEN_OUT, 16), (abi.SETATTR_IN, 88),
    (abi.READ_IN, 40), (abi.WRITE_IN, 40), (abi.RELEASE_IN, 24), (abi.STATFS_OUT, 80),
    (abi.CREATE_IN, 16), (abi.MKNOD_IN, 16), (abi.FALLOCATE_IN, 32), (abi.LSEEK_IN, 24),
    (abi.COPY_FILE_RANGE_IN, 56), (abi.IOCTL_IN, 32), (abi.IOCTL_OUT, 16), (abi.DIRENT, 24),
    (abi.NOTIFY_INVAL_INODE, 24), (abi.NOTIFY_INVAL_ENTRY, 16), (abi.BACKING_MAP, 16),
    (abi.STATX, 256), (abi.STATX_OUT_HEAD, 32), (abi.STATX_IN, 24),
])
def test_struct_sizes_match_the_kernel(st: struct.Struct, size: int) -> None:
    assert st.size == size


def fake_stat(mode: int, ino: int, size: int = 0, rdev: int = 0,
              mtime_ns: int = 1_700_000_000_123_456_789) -> os.stat_result:
    t = mtime_ns // 10**9
    return os.stat_result((mode, ino, 0, 1, 0, 0, size, t, t, t, t, t, t,
                           mtime_ns, mtime_ns, mtime_ns, 4096, 0, rdev))


@pytest.mark.parametrize("major,minor", [(0, 0), (8, 1), (259, 1), (4095, 1048575)])
def test_device_numbers_round_trip(major: int, minor: int) -> None:
    dev = os.makedev(major, minor)
    packed = abi.ATTR.unpack(abi.pack_attr(5, fake_stat(stat.S_IFCHR, 9, rdev=dev)))
    assert abi.decode_dev(packed[13]) == dev and packed[0] == 5
    assert packed[4] == 1_700_000_000 and packed[7] == 123_456_789   # mtime, mtimensec


def test_dirent_padding() -> None:
    for n in range(1, 20):
        rec = abi.pack_dirent(1, 2, b"x" * n, 8)
        assert len(rec) % 8 == 0 and len(rec) >= abi.DIRENT.size + n


class Toy(Operations):
    """A directory with two files; "boom" raises a bug, "gone" answers ENOENT."""

    def __init__(self) -> None:
        self.root = "/"
        self.forgotten: list[str] = []
        self.caps = 0

    def init(self, caps: int) -> None:
        self.caps = caps

    def _attr(self, ino: int, mode: int) -> bytes:
        return abi.pack_attr(ino, fake_stat(mode, ino, 3))

    def lookup(self, parent: object, name: bytes, ctx: Ctx) -> Entry | None:
        if name == b"boom":
            raise RuntimeError("a bug")
        if name == b"gone":
            return None
        if name not in (b"a", b"b"):
            raise OSError(errno.ENOENT, "no")
        return Entry(name.decode(), self._attr(10 + (name == b"b"), stat.S_IFREG | 0o644))

    def forget(self, obj: object) -> None:
        self.forgotten.append(str(obj))

    def getattr(self, obj: object, fh: int | None, ctx: Ctx) -> bytes:
        return self._attr(1, stat.S_IFDIR | 0o755)

    def readdir(self, obj: object, fh: int, offset: int, plus: bool) -> Iterator[DirEntry]:
        for i, name in enumerate((b"a", b"b")[offset:], offset):
            e = self.lookup(obj, name, Ctx(0, 0, 0))
            yield DirEntry(name, 10 + i, 8, i + 1, e if plus else None)


class FakeKernel:
    def __init__(self, fs: Operations, minor: int = abi.KERNEL_MINOR, major: int = 7,
                 flags: int = 0) -> None:
        self.k, d = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        self.d = d
        self.unique = 0
        self.session = Session(fs, d.fileno(), Config(threads=1), threading.Lock())
        self.init_reply: tuple[int, bytes] | None = None
        self.major, self.minor, self.flags = major, minor, flags

    def send(self, opcode: int, nodeid: int, body: bytes) -> int:
        self.unique += 1
        self.k.send(abi.IN_HEADER.pack(abi.IN_HEADER.size + len(body), opcode, self.unique,
                                       nodeid, 0, 0, 1, 0, 0) + body)
        return self.unique

    def reply(self) -> tuple[int, int, bytes]:
        msg = self.k.recv(1 << 20)
        length, error, unique = abi.OUT_HEADER.unpack_from(msg)
        assert length == len(msg)
        return unique, error, msg[abi.OUT_HEADER.size:]

    def init(self) -> tuple[int, bytes]:
        flags = self.flags | Init.INIT_EXT
        body = abi.INIT_IN.pack(self.major, self.minor, 65536, flags & 0xFFFFFFFF)
        body += struct.pack("<I", flags >> 32) + bytes(44)
        self.send(Op.INIT, 0, body)
        t = threading.Thread(target=self.session.handshake)
        t.start()
        _, error, out = self.reply()
        if self.major > 7:
            # Told our major, the kernel asks again.
            assert error == 0 and struct.unpack_from("<II", out) == (7, abi.KERNEL_MINOR)
            self.major = 7
            self.send(Op.INIT, 0, abi.INIT_IN.pack(7, self.minor, 65536, flags & 0xFFFFFFFF)
                      + struct.pack("<I", flags >> 32) + bytes(44))
            _, error, out = self.reply()
        t.join(5)
        return error, out

    def close(self) -> None:
        self.session.stop()
        self.k.close()
        self.d.close()


@pytest.fixture
def kernel() -> Iterator[FakeKernel]:
    fk = FakeKernel(Toy(), flags=int(Init.ASYNC_READ | Init.DO_READDIRPLUS | Init.MAX_PAGES
                                     | Init.PASSTHROUGH | Init.WRITEBACK_CACHE))
    yield fk
    fk.close()


@pytest.mark.parametrize("minor", [31, 36, 40, 45, 60])
def test_init_settles_on_the_older_minor(minor: int) -> None:
    fk = FakeKernel(Toy(), minor=minor, flags=int(Init.MAX_PAGES | Init.WRITEBACK_CACHE))
    try:
        error, out = fk.init()
        assert error == 0 and len(out) == 64
        major, got_minor, _ra, flags = struct.unpack_from("<IIII", out)
        assert (major, got_minor) == (7, min(minor, abi.KERNEL_MINOR))
        assert flags & Init.MAX_PAGES and not flags & Init.WRITEBACK_CACHE   # asked, refused
        assert fk.session.proto.max_write == 256 * 4096
    finally:
        fk.close()


def test_init_with_a_newer_major_asks_again() -> None:
    fk = FakeKernel(Toy(), major=8)
    try:
        error, out = fk.init()
        assert error == 0 and struct.unpack_from("<II", out)[0] == 7
    finally:
        fk.close()


def test_init_refuses_a_kernel_too_old() -> None:
    fk = FakeKernel(Toy(), minor=20)
    try:
        fk.send(Op.INIT, 0, abi.INIT_IN.pack(7, 20, 65536, 0))
        with pytest.raises(OSError):
            fk.session.handshake()
        assert fk.reply()[1] == -errno.EPROTO
    finally:
        fk.close()


def test_passthrough_only_when_asked() -> None:
    for want in (False, True):
        fk = FakeKernel(Toy(), flags=int(Init.PASSTHROUGH))
        fk.session.cfg.passthrough = want
        try:
            _, out = fk.init()
            flags2, stack = struct.unpack_from("<II", out, 32)
            assert bool(flags2 << 32 & Init.PASSTHROUGH) == want
            assert stack == (abi.MAX_STACK_DEPTH if want else 0)
        finally:
            fk.close()


def _lookup(fk: FakeKernel, name: bytes) -> tuple[int, int, bytes]:
    u = fk.send(Op.LOOKUP, abi.ROOT_ID, name + b"\0")
    got_u, error, out = fk.reply()
    assert got_u == u
    return got_u, error, out


def test_requests_node_ids_and_forget(kernel: FakeKernel) -> None:
    kernel.init()
    kernel.session.start()
    fs = kernel.session.fs
    _, error, out = _lookup(kernel, b"a")
    nodeid, gen, *_rest = abi.ENTRY_OUT.unpack(out)
    assert error == 0 and nodeid > abi.ROOT_ID and _rest[4] == 10   # attr ino: the fs's number
    _, _, out2 = _lookup(kernel, b"a")
    assert abi.ENTRY_OUT.unpack(out2)[0] == nodeid                  # same object, same id
    _, error, out = _lookup(kernel, b"gone")
    assert error == 0 and abi.ENTRY_OUT.unpack(out)[0] == 0         # a negative entry
    assert _lookup(kernel, b"nope")[1] == -errno.ENOENT
    # A bug answers EIO and the session keeps serving.
    assert _lookup(kernel, b"boom")[1] == -errno.EIO
    assert _lookup(kernel, b"b")[1] == 0
    # Two lookups of "a": it is forgotten after both are given back, not before.
    kernel.send(Op.FORGET, nodeid, abi.FORGET_IN.pack(1))
    assert _lookup(kernel, b"b")[1] == 0 and fs.forgotten == []
    kernel.send(Op.BATCH_FORGET, 0, abi.BATCH_FORGET_IN.pack(1, 0) + abi.FORGET_ONE.pack(nodeid, 1))
    assert _lookup(kernel, b"b")[1] == 0 and fs.forgotten == ["a"]
    # The id comes back with a new generation.
    _, _, out = _lookup(kernel, b"a")
    again, gen2 = abi.ENTRY_OUT.unpack(out)[:2]
    assert (again, gen2) == (nodeid, gen + 1)
    assert kernel.session.counters[Op.LOOKUP] >= 9


def test_readdirplus_counts_only_entries_that_fit(kernel: FakeKernel) -> None:
    kernel.init()
    kernel.session.start()
    fs = kernel.session.fs
    one = abi.direntplus_size(b"a")
    u = kernel.send(Op.READDIRPLUS, abi.ROOT_ID, abi.READ_IN.pack(1, 0, one, 0, 0, 0, 0))
    got, error, out = kernel.reply()
    assert got == u and error == 0 and len(out) == one
    # "b" did not fit: it is not counted, so the fs is told to forget it.
    assert fs.forgotten == ["b"]
    nodeid = abi.ENTRY_OUT.unpack_from(out)[0]
    ino, off, namelen, _t = abi.DIRENT.unpack_from(out, abi.ENTRY_OUT.size)
    assert nodeid > 1 and (ino, off, namelen) == (10, 1, 1)
    u = kernel.send(Op.READDIR, abi.ROOT_ID, abi.READ_IN.pack(1, 1, 4096, 0, 0, 0, 0))
    _, error, out = kernel.reply()
    assert error == 0 and abi.DIRENT.unpack_from(out)[:3] == (11, 2, 1)


def test_unknown_opcode_is_enosys(kernel: FakeKernel) -> None:
    kernel.init()
    kernel.session.start()
    kernel.send(999, abi.ROOT_ID, b"")
    assert kernel.reply()[1] == -errno.ENOSYS
    kernel.send(Op.SYMLINK, abi.ROOT_ID, b"x\0y\0")
    assert kernel.reply()[1] == -errno.ENOSYS
