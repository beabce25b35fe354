"""Copy-up: bring a lower entry into the upper layer before it is changed.

Every copy is built under workdir/work and renamed into place, so a crash
mid-copy leaves nothing half-made in the upper layer (work/ is emptied at
mount).  File data is copied in a worker thread so one large copy-up does not
stall every other request; a per-inode lock makes concurrent writers share one
copy-up.  With metacopy, metadata changes copy only metadata: the upper file is
a sparse placeholder marked `overlay.metacopy`, and its data is copied on the
first data write, in place, before the mark is removed.
"""
from __future__ import annotations

import contextlib
import errno
import fcntl
import itertools
import os
import shutil
import stat
import time
from collections.abc import Iterator
from typing import TYPE_CHECKING


from .inodes import Node
from .layers import (FS_APPEND_FL, inode_flags, lstat_at, lstat_or_none, open_file_at,
                     renameat2, set_inode_flags, walk_dirs)
from .format import NO_XATTR, public_xattrs

if TYPE_CHECKING:
    from .super import Overlay

FICLONE = 0x40049409
CHUNK = 1 << 30
# For tests only: with COWFS_TEST_PAUSE=PATH, every file copy-up whose data is
# copied but not yet installed creates PATH.N (N counts copy-ups) and waits
# while it exists, so a test can kill the daemon or race it at that point.
_PAUSE = os.environ.get("COWFS_TEST_PAUSE")
_pauses = itertools.count()


def _test_pause(path: str) -> None:
    marker = f"{path}.{next(_pauses)}"
    with open(marker, "w"):
        pass
    while os.path.exists(marker):
        time.sleep(0.01)


def copy_data(src: int, dst: int, size: int) -> None:
    """Reflink if the filesystem can, else copy_file_range the data extents only,
    so sparse files stay sparse."""
    try:
        fcntl.ioctl(dst, FICLONE, src)
        return
    except OSError as e:
        if e.errno not in (errno.EXDEV, errno.EOPNOTSUPP, errno.EINVAL, errno.ENOTTY,
                           errno.EBADF, errno.ENOSYS):
            raise
    pos = 0
    while pos < size:
        try:
            data = os.lseek(src, pos, os.SEEK_DATA)
        except OSError as e:
            if e.errno == errno.ENXIO:   # only a hole remains
                break
            raise
        end = min(os.lseek(src, data, os.SEEK_HOLE), size)
        _copy_range(src, dst, data, end)
        pos = end
    os.ftruncate(dst, size)


def _copy_range(src: int, dst: int, start: int, end: int) -> None:
    off = start
    while off < end:
        try:
            n = os.copy_file_range(src, dst, min(CHUNK, end - off), off, off)
        except OSError as e:
            if e.errno not in (errno.EXDEV, errno.ENOSYS, errno.EOPNOTSUPP, errno.EINVAL):
                raise
            buf = os.pread(src, min(1 << 20, end - off), off)
            n = os.pwrite(dst, buf, off) if buf else 0
        if n == 0:
            break
        off += n


def copy_meta(ov: Overlay, st: os.stat_result, xattrs: dict[str, bytes],
               fd: int | None, dir_fd: int, name: bytes) -> None:
    """Owner, mode, xattrs and times of st onto the new entry (by fd or by name)."""
    if fd is not None:
        os.fchown(fd, st.st_uid, st.st_gid)
        os.fchmod(fd, stat.S_IMODE(st.st_mode))
        path: int | bytes = fd
    else:
        os.chown(name, st.st_uid, st.st_gid, dir_fd=dir_fd, follow_symlinks=False)
        path = b"/proc/self/fd/%d/%s" % (dir_fd, name)
        if not stat.S_ISLNK(st.st_mode):
            os.chmod(path, stat.S_IMODE(st.st_mode))
    for key, value in xattrs.items():
        try:
            os.setxattr(path, key, value, follow_symlinks=isinstance(path, int))
        except OSError as e:
            # As overlayfs: only an xattr the upper filesystem does not support,
            # and that no access check uses, may be left behind.
            if e.errno != errno.EOPNOTSUPP or must_copy_xattr(key):
                raise OSError(e.errno, f"copy-up cannot keep xattr {key}: "
                              f"{os.strerror(e.errno)}") from e
    if fd is not None:
        os.utime(fd, ns=(st.st_atime_ns, st.st_mtime_ns))
    else:
        os.utime(name, ns=(st.st_atime_ns, st.st_mtime_ns), dir_fd=dir_fd,
                 follow_symlinks=False)


def must_copy_xattr(name: str) -> bool:
    """xattrs that permission checks read (overlayfs' ovl_must_copy_xattr)."""
    return name in ("system.posix_acl_access", "system.posix_acl_default") \
        or name.startswith("security.")


@contextlib.contextmanager
def _building(ov: Overlay) -> Iterator[bytes]:
    """A fresh name in work/ for a copy under construction; whatever is there
    when the copy fails is removed at once (a partial copy that hit ENOSPC
    must not keep the space)."""
    tmp = ov.tmp_name()
    try:
        yield tmp
    except BaseException:
        _discard(ov, tmp)
        raise


def _discard(ov: Overlay, tmp: bytes) -> None:
    st = lstat_or_none(ov.work_fd, tmp)
    if st is None:
        return
    if stat.S_ISDIR(st.st_mode):
        shutil.rmtree(tmp, dir_fd=ov.work_fd)
    else:
        os.unlink(tmp, dir_fd=ov.work_fd)


def _install(ov: Overlay, node: Node, tmp: bytes) -> None:
    """Rename the finished copy into place and make node an upper node."""
    assert node.parent is not None
    if node.unlinked:
        # Deleted while its data was being copied (unlink takes no copy lock):
        # installing the copy now would bring it back (_building removes it).
        raise OSError(errno.ENOENT, "deleted during copy-up")
    pfd = ov.table.dir_fd(node.parent, 0)
    pst = os.fstat(pfd)
    os.rename(tmp, node.name, src_dir_fd=ov.work_fd, dst_dir_fd=pfd)
    # A copy-up changes nothing a program could see in the parent: keep its times
    # (as overlayfs does), or the upper dir would show the parent as modified.
    os.utime(pfd, ns=(pst.st_atime_ns, pst.st_mtime_ns))
    upper_st = lstat_at(pfd, node.name)
    renumbered = node.key != node.ino
    if renumbered:
        # One name of a lower hard link: a file of its own now (index=off).
        ov.table.renumber(node, ov.numbers.number(upper_st))
    else:
        ov.numbers.keep(upper_st, node.ino)
    node.layer = 0
    node.attr = None
    node.gen += 1
    ov.copied_up(node, renumbered)


def ensure_upper_dir(ov: Overlay, node: Node) -> None:
    """Copy a directory and all its ancestors up (metadata only: no contents).

    Every change to a directory's names starts here, so this is also where its
    cached listing is dropped."""
    node.listing = None
    missing: list[Node] = []
    n: Node | None = node
    while n is not None and n.layer != 0:   # (a loop: trees may be deep)
        missing.append(n)
        n = n.parent
    for n in reversed(missing):
        _copy_up_dir(ov, n)


def _copy_up_dir(ov: Overlay, node: Node) -> None:
    """Copy up one directory whose parent is in the upper layer already."""
    assert node.parent is not None
    ensure_upper_dir(ov, node.parent)
    t0, src_layer = time.perf_counter_ns(), node.layer  # for the copy-up event
    src_fd = ov.table.dir_fd(node.parent, node.layer)
    st = lstat_at(src_fd, node.name)
    xattrs = public_xattrs(src_fd, node.name)
    with _building(ov) as tmp:
        os.mkdir(tmp, 0o700, dir_fd=ov.work_fd)
        copy_meta(ov, st, xattrs, None, ov.work_fd, tmp)
        _install(ov, node, tmp)
    # Moving a directory rewrites its "..": its times are set once it is in place.
    os.utime(node.name, ns=(st.st_atime_ns, st.st_mtime_ns), dir_fd=ov.table.dir_fd(node.parent, 0),
             follow_symlinks=False)
    node.layers = (0,) + node.layers
    ov.events.copied_up(node, src_layer, 0, False, t0)


def copy_up(ov: Overlay, node: Node, data: bool = True, truncate: bool = False) -> None:
    """Make node live in the upper layer; data=False allows a metadata-only copy,
    truncate=True (open with O_TRUNC) skips the data that is about to go."""
    if node.layer == 0 and not (data and node.metacopy):
        return
    ov.check_writable()
    if node.unlinked:
        # Copying up a deleted entry would bring it back from the dead.
        raise OSError(errno.ENOENT, "deleted")
    with ov.copying(node):
        if node.layer == 0:
            if data and node.metacopy:
                _copy_up_data(ov, node, truncate)
            return
        if node.is_dir:
            ensure_upper_dir(ov, node)
            return
        assert node.parent is not None
        ensure_upper_dir(ov, node.parent)
        if stat.S_ISREG(node.mode):
            if not data and ov.metacopy:
                _copy_up_meta(ov, node)
            else:
                _copy_up_file(ov, node, truncate)
        else:
            _copy_up_special(ov, node)


def _copy_up_special(ov: Overlay, node: Node) -> None:
    assert node.parent is not None
    t0, src_layer = time.perf_counter_ns(), node.layer  # for the copy-up event
    src_fd = ov.table.dir_fd(node.parent, node.layer)
    st = lstat_at(src_fd, node.name)
    with _building(ov) as tmp:
        if stat.S_ISLNK(st.st_mode):
            os.symlink(os.readlink(node.name, dir_fd=src_fd), tmp, dir_fd=ov.work_fd)
        else:
            os.mknod(tmp, stat.S_IFMT(st.st_mode) | 0o600, st.st_rdev, dir_fd=ov.work_fd)
        copy_meta(ov, st, public_xattrs(src_fd, node.name), None, ov.work_fd, tmp)
        _install(ov, node, tmp)
    node.lower_layer = None
    ov.events.copied_up(node, src_layer, 0, False, t0)


def _new_tmp_file(ov: Overlay, tmp: bytes) -> int:
    return ov.table.opening(open_file_at, ov.work_fd, tmp,
                            os.O_CREAT | os.O_EXCL | os.O_RDWR, 0o600)


def _copy_up_file(ov: Overlay, node: Node, truncate: bool) -> None:
    assert node.parent is not None
    t0, src_layer = time.perf_counter_ns(), node.layer  # for the copy-up event
    src_dir = ov.table.dir_fd(node.parent, node.layer)
    # A lower metacopy file's data is further down (open_lower_data finds it).
    src = ov.table.opening(open_lower_data, ov, node)
    try:
        st = lstat_at(src_dir, node.name)
        xattrs = public_xattrs(src_dir, node.name)
        with _building(ov) as tmp:
            dst = _new_tmp_file(ov, tmp)
            try:
                if not truncate:
                    ov.unlocked(copy_data, src, dst, st.st_size)
                if _PAUSE:
                    ov.unlocked(_test_pause, _PAUSE)
                copy_meta(ov, st, xattrs, dst, ov.work_fd, tmp)
                if not ov.volatile:
                    ov.unlocked(os.fsync, dst)
            finally:
                os.close(dst)
            _install(ov, node, tmp)
    finally:
        os.close(src)
    node.lower_layer = None
    node.redirect = None
    ov.events.copied_up(node, src_layer, 0 if truncate else st.st_size, False, t0)


def _copy_up_meta(ov: Overlay, node: Node) -> None:
    """A sparse placeholder with the lower file's metadata and a metacopy mark."""
    assert node.parent is not None
    t0, src_layer = time.perf_counter_ns(), node.layer  # for the copy-up event
    src_dir = ov.table.dir_fd(node.parent, node.layer)
    st = lstat_at(src_dir, node.name)
    with _building(ov) as tmp:
        dst = _new_tmp_file(ov, tmp)
        try:
            os.ftruncate(dst, st.st_size)
            os.setxattr(dst, ov.fmt.xattr("metacopy"), b"")
            copy_meta(ov, st, public_xattrs(src_dir, node.name), dst, ov.work_fd, tmp)
        finally:
            os.close(dst)
        _install(ov, node, tmp)
    node.metacopy = True
    node.lower_layer = node.lower_layer or node.layer
    ov.events.copied_up(node, src_layer, 0, True, t0)


def _copy_up_data(ov: Overlay, node: Node, truncate: bool) -> None:
    """Fill a metacopy placeholder with its data, then drop the mark: until the
    mark is gone (after fsync), reads still come from the lower file."""
    assert node.parent is not None
    t0, src_layer = time.perf_counter_ns(), node.lower_layer  # for the copy-up event
    src = open_lower_data(ov, node)
    try:
        dst, append_only = _open_placeholder(ov.table.dir_fd(node.parent, 0), node.name)
        try:
            st = os.fstat(dst)
            if truncate:
                os.ftruncate(dst, 0)
            else:
                try:
                    ov.unlocked(copy_data, src, dst, st.st_size)
                except BaseException:
                    # Still a placeholder: give back the space of the partial data.
                    os.ftruncate(dst, 0)
                    os.ftruncate(dst, st.st_size)
                    os.utime(dst, ns=(st.st_atime_ns, st.st_mtime_ns))
                    raise
            os.utime(dst, ns=(st.st_atime_ns, st.st_mtime_ns))
            if not ov.volatile:
                ov.unlocked(os.fsync, dst)
            os.removexattr(dst, ov.fmt.xattr("metacopy"))
            if node.redirect is not None:
                # The kernel's redirect of a metacopy file has served its purpose.
                try:
                    os.removexattr(dst, ov.fmt.xattr("redirect"))
                except OSError as e:
                    if e.errno not in NO_XATTR:
                        raise
            if append_only:
                set_inode_flags(dst, inode_flags(dst) | FS_APPEND_FL)
        finally:
            os.close(dst)
    finally:
        os.close(src)
    node.redirect = None
    node.metacopy = False
    node.lower_layer = None
    node.gen += 1
    ov.events.copied_up(node, src_layer, 0 if truncate else st.st_size, False, t0)


def _open_placeholder(dir_fd: int, name: bytes) -> tuple[int, bool]:
    """The metacopy placeholder opened for its data.  One made append-only
    (chattr +a) refuses that; the copy is not a write of the program's, so the
    flag is lifted for it and put back after (an immutable file stays refused)."""
    try:
        return open_file_at(dir_fd, name, os.O_WRONLY), False
    except PermissionError:
        ro = open_file_at(dir_fd, name, os.O_RDONLY)
        try:
            flags = inode_flags(ro)
            if not flags & FS_APPEND_FL:
                raise
            set_inode_flags(ro, flags & ~FS_APPEND_FL)
        finally:
            os.close(ro)
        return open_file_at(dir_fd, name, os.O_WRONLY), True


def open_lower_data(ov: Overlay, node: Node) -> int:
    """An fd on the lower file that holds a lower or metacopy node's data."""
    assert node.parent is not None
    if node.metacopy and node.lower_layer is None:
        raise OSError(errno.EIO, "metacopy file without its lower data")
    layer = node.lower_layer if node.lower_layer is not None else node.layer
    if node.redirect is None:
        return open_file_at(ov.table.dir_fd(node.parent, layer), node.name, os.O_RDONLY)
    dfd = walk_dirs(ov.layers[layer].fd, node.redirect[:-1])  # type: ignore[union-attr]
    if dfd is None:
        raise OSError(errno.EIO, "redirected lower data gone")
    try:
        return open_file_at(dfd, node.redirect[-1], os.O_RDONLY)
    finally:
        os.close(dfd)


def replace_with(ov: Overlay, dir_fd: int, name: bytes, tmp: bytes) -> None:
    """Atomically put work/tmp at dir_fd/name, swapping out whatever is there
    (a whiteout, a directory) and removing it afterwards."""
    renameat2(ov.work_fd, tmp, dir_fd, name, 2)
    st = lstat_at(ov.work_fd, tmp)
    if stat.S_ISDIR(st.st_mode):
        os.rmdir(tmp, dir_fd=ov.work_fd)
    else:
        os.unlink(tmp, dir_fd=ov.work_fd)
