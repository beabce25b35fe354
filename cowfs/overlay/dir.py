"""Directory operations: create, delete, link and rename in the merged view.

Everything lands in the upper layer the way overlayfs puts it there: deleting a
name that a lower layer has leaves a whiteout; a directory made where a lower
one was deleted is opaque; a moved lower directory carries a redirect to where
its lower contents are.  Replacing anything that is already in the upper layer
goes through workdir/work and an atomic rename.
"""
from __future__ import annotations

import errno
import os
import shutil
import stat
from typing import TYPE_CHECKING

from .copy_up import copy_meta, copy_up, ensure_upper_dir, replace_with
from .file import Handle, attach
from .inode import upper_dir_fd, upper_ref
from .inodes import Node
from .layers import (RENAME_EXCHANGE, RENAME_NOREPLACE, RENAME_WHITEOUT, lstat_at,
                     lstat_or_none, make_whiteout, open_file_at, renameat2, xattr_path)
from .format import (NAME_MAX, WH_PREFIX, has_oci_whiteout, is_reserved_name, is_whiteout_stat,
                     public_xattrs, whited_out_at)
from .namei import freeze_paths, lookup, lower_entry, lower_path, upper_node
from .readdir import merged_names

if TYPE_CHECKING:
    from .super import Overlay

SHARED_WHITEOUT = b"whiteout"


def check_name(name: bytes) -> None:
    if len(name) > NAME_MAX:
        raise OSError(errno.ENAMETOOLONG, "name too long")
    if is_reserved_name(name):
        raise OSError(errno.EINVAL, "names starting with .wh. are reserved for whiteouts")


def _whited_out(ov: Overlay, ufd: int, name: bytes) -> bool:
    """Is there a whiteout at name in the upper directory ufd?"""
    return whited_out_at(ov.fmt, ufd, name)


def _prepare_new(ov: Overlay, parent: Node, name: bytes) -> tuple[int, bool]:
    """Check that name may be created; return the upper dir fd and whether a
    whiteout must be replaced."""
    ov.check_writable()
    check_name(name)
    if lookup(ov, parent, name) is not None:
        raise OSError(errno.EEXIST, "exists")
    ensure_upper_dir(ov, parent)
    ufd = ov.table.dir_fd(parent, 0)
    return ufd, _whited_out(ov, ufd, name)


def _owner(ov: Overlay, parent: Node, uid: int, gid: int) -> tuple[int, int]:
    """Owner for a new entry: the caller, with the parent's group if it is setgid."""
    if ov.euid != 0:
        return -1, -1
    pst = lstat_at(*_self_ref(ov, parent))
    return uid, (-1 if pst.st_mode & stat.S_ISGID else gid)


def _self_ref(ov: Overlay, node: Node) -> tuple[int, bytes]:
    if node.parent is None:
        return ov.layers[0].fd, b"."  # type: ignore[union-attr]
    return ov.table.dir_fd(node.parent, 0), node.name


def _place(ov: Overlay, ufd: int, name: bytes, covered: bool, make) -> None:
    """Create an entry with make(dir_fd, name): directly, or over a whiteout by
    building it in work/ and swapping it in."""
    if not covered:
        make(ufd, name)
        return
    tmp = ov.tmp_name()
    make(ov.work_fd, tmp)
    if lstat_or_none(ufd, name) is None:   # the whiteout is .wh.NAME
        os.rename(tmp, name, src_dir_fd=ov.work_fd, dst_dir_fd=ufd)
        os.unlink(WH_PREFIX + name, dir_fd=ufd)
    else:
        replace_with(ov, ufd, name, tmp)


def _new_node(ov: Overlay, parent: Node, name: bytes, st: os.stat_result | None = None) -> Node:
    """The node of an entry just made at parent/name (st: its stat, if known:
    what was just made needs no classifying)."""
    if st is not None:
        node = upper_node(ov, parent, name, st, ov.table.dir_fd(parent, 0))
    else:
        found = lookup(ov, parent, name)
        if found is None:
            raise OSError(errno.EIO, "created entry vanished")
        node = found
    ov.events.created(node)
    return node


def create(ov: Overlay, parent: Node, name: bytes, mode: int, flags: int,
           uid: int, gid: int) -> tuple[Handle, Node]:
    ufd, covered = _prepare_new(ov, parent, name)
    owner = _owner(ov, parent, uid, gid)
    fds: list[int] = []

    def make(dfd: int, n: bytes) -> None:
        fd = open_file_at(dfd, n, os.O_CREAT | os.O_EXCL | os.O_RDWR, stat.S_IMODE(mode))
        fds.append(fd)
        os.fchown(fd, *owner)
        if mode & (stat.S_ISUID | stat.S_ISGID):
            os.fchmod(fd, stat.S_IMODE(mode))   # chown cleared them

    _place(ov, ufd, name, covered, make)
    node = _new_node(ov, parent, name, os.fstat(fds[0]))
    node.no_caps = True     # (a new file has no security.capability)
    return attach(node, fds[0]), node


def mkdir(ov: Overlay, parent: Node, name: bytes, mode: int, uid: int, gid: int) -> Node:
    ufd, covered = _prepare_new(ov, parent, name)
    owner = _owner(ov, parent, uid, gid)

    # Over a deleted lower name the new directory must not show what was there;
    # in a merged parent, overlayfs marks every new directory opaque, which also
    # spares later lookups a trip through the lower layers.
    opaque = covered or len(parent.layers) > 1

    def make(dfd: int, n: bytes) -> None:
        os.mkdir(n, stat.S_IMODE(mode), dir_fd=dfd)
        os.chown(n, *owner, dir_fd=dfd, follow_symlinks=False)
        if opaque:
            os.setxattr(xattr_path(dfd, n), ov.fmt.xattr("opaque"), b"y",
                        follow_symlinks=False)
            ov.events.opaque(parent, name)

    _place(ov, ufd, name, covered, make)
    return _new_node(ov, parent, name)


def mknod(ov: Overlay, parent: Node, name: bytes, mode: int, rdev: int,
          uid: int, gid: int) -> Node:
    if stat.S_ISCHR(mode) and rdev == 0:
        # A 0/0 character device is a whiteout: it would hide itself.
        raise OSError(errno.EPERM, "0/0 character devices are whiteouts")
    ufd, covered = _prepare_new(ov, parent, name)
    owner = _owner(ov, parent, uid, gid)

    def make(dfd: int, n: bytes) -> None:
        os.mknod(n, mode, rdev, dir_fd=dfd)
        os.chown(n, *owner, dir_fd=dfd, follow_symlinks=False)

    _place(ov, ufd, name, covered, make)
    return _new_node(ov, parent, name)


def symlink(ov: Overlay, parent: Node, name: bytes, target: bytes, uid: int, gid: int) -> Node:
    ufd, covered = _prepare_new(ov, parent, name)
    owner = _owner(ov, parent, uid, gid)

    def make(dfd: int, n: bytes) -> None:
        os.symlink(target, n, dir_fd=dfd)
        os.chown(n, *owner, dir_fd=dfd, follow_symlinks=False)

    _place(ov, ufd, name, covered, make)
    return _new_node(ov, parent, name)


def link(ov: Overlay, node: Node, new_parent: Node, new_name: bytes) -> Node:
    if node.is_dir:
        raise OSError(errno.EPERM, "hard link to a directory")
    ov.check_writable()
    check_name(new_name)
    if lookup(ov, new_parent, new_name) is not None:
        raise OSError(errno.EEXIST, "exists")
    copy_up(ov, node, data=True)
    ensure_upper_dir(ov, new_parent)
    ufd = ov.table.dir_fd(new_parent, 0)
    assert node.parent is not None
    src_fd, src_name = upper_ref(ov, node)
    orphan = node.orphan

    def make(dfd: int, n: bytes) -> None:
        if orphan is not None:
            # An O_TMPFILE file (linkat of /proc/self/fd/N): its one real
            # name moves from work/ to where it is linked.
            os.rename(orphan, n, src_dir_fd=ov.work_fd, dst_dir_fd=dfd)
        else:
            os.link(src_name, n, src_dir_fd=src_fd, dst_dir_fd=dfd, follow_symlinks=False)

    _place(ov, ufd, new_name, _whited_out(ov, ufd, new_name), make)
    if orphan is not None:
        node.orphan = None
        node.parent, node.name = new_parent, new_name
    else:
        _add_link(node, new_parent, new_name)
    node.unlinked = False
    node.attr = None
    return node


def tmpfile(ov: Overlay, parent: Node, mode: int, uid: int, gid: int) -> tuple[Handle, Node]:
    """O_TMPFILE: an unnamed file made in the upper copy of parent (so it gets
    the directory's group and default ACL), kept as an orphan in work/ until
    it is linked in or closed."""
    ov.check_writable()
    ensure_upper_dir(ov, parent)
    owner = _owner(ov, parent, uid, gid)
    fd = os.open(".", os.O_TMPFILE | os.O_RDWR | os.O_CLOEXEC, stat.S_IMODE(mode),
                 dir_fd=upper_dir_fd(ov, parent))
    try:
        os.fchown(fd, *owner)
        if mode & (stat.S_ISUID | stat.S_ISGID):
            os.fchmod(fd, stat.S_IMODE(mode))
        tmp = ov.tmp_name()
        os.link(b"/proc/self/fd/%d" % fd, tmp, dst_dir_fd=ov.work_fd)
        st = os.fstat(fd)
    except BaseException:
        os.close(fd)
        raise
    node = Node(ov.numbers.number(st), parent, b"", st.st_mode, 0, None)
    node.unlinked = True
    node.orphan = tmp
    ov.table.add(node)
    return attach(node, fd), node


def _link_whiteout(ov: Overlay, dfd: int, name: bytes) -> None:
    """A whiteout as a hard link to one shared whiteout in work/: a link costs a
    third of a mknod (overlayfs does the same since Linux 5.8)."""
    for _ in range(2):
        try:
            os.link(SHARED_WHITEOUT, name, src_dir_fd=ov.work_fd, dst_dir_fd=dfd)
            return
        except OSError as e:
            if e.errno not in (errno.ENOENT, errno.EMLINK):
                raise
        # First use, or the shared one is out of links: make a fresh one.
        tmp = ov.tmp_name()
        make_whiteout(ov.work_fd, tmp)
        os.rename(tmp, SHARED_WHITEOUT, src_dir_fd=ov.work_fd, dst_dir_fd=ov.work_fd)
    make_whiteout(dfd, name)


def _whiteout(ov: Overlay, ufd: int, name: bytes) -> None:
    try:
        _link_whiteout(ov, ufd, name)
    except PermissionError:
        if not ov.wh_fallback:
            raise
        os.close(open_file_at(ufd, WH_PREFIX + name, os.O_CREAT | os.O_EXCL | os.O_WRONLY))


def _new_whiteout(ov: Overlay) -> bytes:
    tmp = ov.tmp_name()
    _link_whiteout(ov, ov.work_fd, tmp)
    return tmp


def _detach(node: Node, parent: Node, name: bytes) -> None:
    """parent/name no longer names node; it is gone once no name is left."""
    if node.links:
        if (parent, name) in node.links:
            node.links.remove((parent, name))
        if node.links:
            node.parent, node.name = node.links[0]
            return
    if node.parent is parent and node.name == name:
        node.unlinked = True
        node.attr = None


def _add_link(node: Node, parent: Node, name: bytes) -> None:
    assert node.parent is not None
    if node.links is None:
        node.links = [(node.parent, node.name)]
    node.links.append((parent, name))


def _moved(node: Node, old_parent: Node, old_name: bytes, new_parent: Node,
           new_name: bytes) -> None:
    if node.links and (old_parent, old_name) in node.links:
        node.links[node.links.index((old_parent, old_name))] = (new_parent, new_name)
    node.parent, node.name = new_parent, new_name
    node.unlinked = False


def unlink(ov: Overlay, parent: Node, name: bytes) -> None:
    ov.check_writable()
    node = lookup(ov, parent, name)
    if node is None:
        raise OSError(errno.ENOENT, "no such file")
    if node.is_dir:
        raise OSError(errno.EISDIR, "is a directory")
    ensure_upper_dir(ov, parent)
    ufd = ov.table.dir_fd(parent, 0)
    in_lower = lower_entry(ov, parent, name) is not None
    st = _upper_entry(ufd, name)
    if _keep_as_orphan(ov, node, st):
        _orphan(ov, node, ufd, name, in_lower)
    elif st is not None:
        _forget_upper(ov, st)
        if in_lower and not ov.wh_fallback:
            replace_with(ov, ufd, name, _new_whiteout(ov))
        else:
            os.unlink(name, dir_fd=ufd)
            if in_lower:
                _whiteout(ov, ufd, name)
    else:
        _whiteout(ov, ufd, name)
    if in_lower or st is None:   # every branch above left a whiteout then
        ov.events.whiteout(parent, name)
    _detach(node, parent, name)


def _upper_entry(ufd: int, name: bytes) -> os.stat_result | None:
    """The upper entry at name, if there is one that is not a whiteout."""
    st = lstat_or_none(ufd, name)
    return None if st is None or is_whiteout_stat(st) else st


def _keep_as_orphan(ov: Overlay, node: Node, st: os.stat_result | None) -> bool:
    """Is st the last name of an upper file the kernel still holds (open, or
    about to be opened through a dentry looked up before the delete)?"""
    if node.is_dir or node.links or node.layer != 0 or not ov.is_held(node):
        return False
    return st is not None and st.st_nlink == 1


def _orphan(ov: Overlay, node: Node, ufd: int, name: bytes, leave_whiteout: bool) -> None:
    """Move a deleted file into work/ (leaving a whiteout where a lower layer has
    the name), where it lives on until the kernel forgets it, as POSIX wants."""
    tmp = b"#orphan-%d" % node.ino
    if leave_whiteout and _rename_whiteout(ov, ufd, name, ov.work_fd, tmp):
        node.orphan = tmp
        ov.events.orphan(node, kept=True)
        return
    os.rename(name, tmp, src_dir_fd=ufd, dst_dir_fd=ov.work_fd)
    if leave_whiteout:
        _whiteout(ov, ufd, name)
    node.orphan = tmp
    ov.events.orphan(node, kept=True)


def _rename_whiteout(ov: Overlay, ofd: int, old: bytes, nfd: int, new: bytes) -> bool:
    """rename(2) leaving a whiteout behind, atomically; False where the upper
    filesystem (or a non-root daemon) cannot, for the caller to do it in two steps."""
    if ov.wh_fallback:
        return False
    try:
        renameat2(ofd, old, nfd, new, RENAME_WHITEOUT)
        return True
    except OSError as e:
        if e.errno not in (errno.EINVAL, errno.EPERM, errno.EOPNOTSUPP):
            raise
        return False


def _forget_upper(ov: Overlay, st: os.stat_result | None) -> None:
    """Before an upper entry is deleted: its real inode number may be handed to a
    new file, which must not inherit the overlay inode number it stood for."""
    if st is not None and (st.st_nlink <= 1 or stat.S_ISDIR(st.st_mode)):
        ov.numbers.forget(st)


def _clear_upper_dir(ov: Overlay, tmp: bytes) -> None:
    """Remove a directory moved into work/ (it holds only whiteouts)."""
    shutil.rmtree(tmp, dir_fd=ov.work_fd)


def rmdir(ov: Overlay, parent: Node, name: bytes) -> None:
    ov.check_writable()
    node = lookup(ov, parent, name)
    if node is None:
        raise OSError(errno.ENOENT, "no such directory")
    if not node.is_dir:
        raise OSError(errno.ENOTDIR, "not a directory")
    if merged_names(ov, node):
        raise OSError(errno.ENOTEMPTY, "directory not empty")
    ensure_upper_dir(ov, parent)
    ufd = ov.table.dir_fd(parent, 0)
    in_lower = lower_entry(ov, parent, name) is not None
    if node.layer == 0:
        _forget_upper(ov, _upper_entry(ufd, name))
        tmp = _new_whiteout(ov) if in_lower else ov.tmp_name()
        if in_lower:
            renameat2(ov.work_fd, tmp, ufd, name, RENAME_EXCHANGE)
        else:
            os.rename(name, tmp, src_dir_fd=ufd, dst_dir_fd=ov.work_fd)
        _clear_upper_dir(ov, tmp)
    else:
        _whiteout(ov, ufd, name)
    if in_lower or node.layer != 0:   # both branches above left a whiteout then
        ov.events.whiteout(parent, name)
    _detach(node, parent, name)
    ov.table.close_fds(node)


def _set_redirect(ov: Overlay, node: Node, same_parent: bool) -> bytes:
    """A moved directory with lower parts records where they are: by its old name
    when it stays in its parent, else by absolute path (as overlayfs writes it)."""
    comps = lower_path(node)
    freeze_paths(node)
    value = comps[-1] if same_parent and node.redirect is None else b"/" + b"/".join(comps)
    dfd, name = _self_ref(ov, node)
    os.setxattr(xattr_path(dfd, name), ov.fmt.xattr("redirect"),
                value, follow_symlinks=False)
    node.redirect = comps
    return value


def _set_opaque(ov: Overlay, node: Node) -> None:
    dfd, name = _self_ref(ov, node)
    os.setxattr(xattr_path(dfd, name), ov.fmt.xattr("opaque"), b"y",
                follow_symlinks=False)


OPAQUE_MARK = b""   # (_prepare_moved_dir's answer for "made opaque", not a redirect)


def _prepare_moved_dir(ov: Overlay, node: Node, dest_parent: Node,
                             moves: bool, same_parent: bool) -> bytes | None:
    """Copy a directory up before it moves; keep its lower contents reachable
    (redirect), or, for a directory with none, keep whatever the lower layers of
    a merged destination hold under its new name out of it (opaque), as
    overlayfs does."""
    has_lower = any(k != 0 for k in node.layers)
    if has_lower and moves and not ov.redirect_dir:
        raise OSError(errno.EXDEV, "renaming a lower directory needs redirect_dir=on")
    copy_up(ov, node)
    if has_lower and moves:
        return _set_redirect(ov, node, same_parent)
    if not has_lower and any(k != 0 for k in dest_parent.layers):
        _set_opaque(ov, node)
        return OPAQUE_MARK
    return None


def rename(ov: Overlay, old_parent: Node, old_name: bytes, new_parent: Node,
                 new_name: bytes, flags: int) -> None:
    ov.check_writable()
    if flags & ~(RENAME_NOREPLACE | RENAME_EXCHANGE) or \
            (flags & RENAME_NOREPLACE and flags & RENAME_EXCHANGE):
        raise OSError(errno.EINVAL, "unsupported rename flags")
    check_name(new_name)
    src = lookup(ov, old_parent, old_name)
    if src is None:
        raise OSError(errno.ENOENT, "no such file")
    dst = lookup(ov, new_parent, new_name)
    exchange = bool(flags & RENAME_EXCHANGE)
    if dst is None and exchange:
        raise OSError(errno.ENOENT, "no such file")
    if dst is not None and flags & RENAME_NOREPLACE:
        raise OSError(errno.EEXIST, "exists")
    if dst is src:
        return   # two names of one file: POSIX says do nothing
    if dst is not None and not exchange:
        if src.is_dir and not dst.is_dir:
            raise OSError(errno.ENOTDIR, "not a directory")
        if not src.is_dir and dst.is_dir:
            raise OSError(errno.EISDIR, "is a directory")
        if dst.is_dir and merged_names(ov, dst):
            raise OSError(errno.ENOTEMPTY, "directory not empty")
    moves = (old_parent, old_name) != (new_parent, new_name)
    src_lower = lower_entry(ov, old_parent, old_name) is not None
    mark = None
    if src.is_dir:
        mark = _prepare_moved_dir(ov, src, new_parent, moves, old_parent is new_parent)
    else:
        copy_up(ov, src)
    if exchange and dst is not None:
        if dst.is_dir:
            _prepare_moved_dir(ov, dst, old_parent, moves, old_parent is new_parent)
        else:
            copy_up(ov, dst)
    ensure_upper_dir(ov, old_parent)
    ensure_upper_dir(ov, new_parent)
    ofd = ov.table.dir_fd(old_parent, 0)
    nfd = ov.table.dir_fd(new_parent, 0)
    if exchange:
        renameat2(ofd, old_name, nfd, new_name, RENAME_EXCHANGE)
        assert dst is not None
        _moved(dst, new_parent, new_name, old_parent, old_name)
    else:
        dst_st = _upper_entry(nfd, new_name)
        # Failure-atomic, as overlayfs: prepare only what nothing shows (the
        # replaced file's orphan name, an emptied replaced directory), then one
        # rename makes the change.
        orphan = None
        if dst is not None and _keep_as_orphan(ov, dst, dst_st):
            orphan = b"#orphan-%d" % dst.ino
            os.link(new_name, orphan, src_dir_fd=nfd, dst_dir_fd=ov.work_fd,
                    follow_symlinks=False)
        try:
            if dst is not None and dst.is_dir and dst.layer == 0:
                _empty_upper_dir(ov, dst, nfd, new_name)
            _move(ov, ofd, old_name, nfd, new_name, src_lower)
        except BaseException:
            if orphan is not None:
                os.unlink(orphan, dir_fd=ov.work_fd)
            raise
        if orphan is not None:
            dst.orphan = orphan   # type: ignore[union-attr]
        else:
            _forget_upper(ov, dst_st)
        if src_lower:
            ov.events.whiteout(old_parent, old_name)
        if dst is not None:
            _detach(dst, new_parent, new_name)
            ov.table.close_fds(dst)
    _moved(src, old_parent, old_name, new_parent, new_name)
    # The mark a moved directory got, reported at its new name.
    if mark == OPAQUE_MARK:
        ov.events.opaque(new_parent, new_name)
    elif mark is not None:
        ov.events.redirect(src, mark)


def _empty_upper_dir(ov: Overlay, node: Node, dfd: int, name: bytes) -> None:
    """Swap an upper directory that is empty in the merged view but holds
    whiteouts for a really empty one (same owner, mode, times; opaque where
    lower layers are below), which a rename can replace in one step."""
    with os.scandir(ov.table.dir_fd(node, 0)) as it:
        if next(it, None) is None:
            return
    st = lstat_at(dfd, name)
    tmp = ov.tmp_name()
    os.mkdir(tmp, 0o700, dir_fd=ov.work_fd)
    try:
        if any(k != 0 for k in node.layers):
            os.setxattr(xattr_path(ov.work_fd, tmp), ov.fmt.xattr("opaque"),
                        b"y", follow_symlinks=False)
        copy_meta(ov, st, public_xattrs(dfd, name), None, ov.work_fd, tmp)
        renameat2(ov.work_fd, tmp, dfd, name, RENAME_EXCHANGE)
    finally:
        _clear_upper_dir(ov, tmp)
    ov.table.close_fds(node)


def _move(ov: Overlay, ofd: int, old: bytes, nfd: int, new: bytes,
          leave_whiteout: bool) -> None:
    """rename(2) in the upper layer, over a whiteout if one is at new, leaving a
    whiteout at old when a lower layer still has that name."""
    target = lstat_or_none(nfd, new)
    if target is not None and is_whiteout_stat(target):
        # Swap with the whiteout: it lands at the old name, where it may be wanted.
        renameat2(ofd, old, nfd, new, RENAME_EXCHANGE)
        if not leave_whiteout:
            os.unlink(old, dir_fd=ofd)
        return
    if has_oci_whiteout(nfd, new):
        os.unlink(WH_PREFIX + new, dir_fd=nfd)
    if leave_whiteout and _rename_whiteout(ov, ofd, old, nfd, new):
        return
    if leave_whiteout and ov.wh_fallback:
        # .wh.NAME beside NAME hides nothing until NAME goes: made first, the
        # rename is still the one step that changes the merged view.
        os.close(open_file_at(ofd, WH_PREFIX + old, os.O_CREAT | os.O_EXCL | os.O_WRONLY))
        try:
            os.rename(old, new, src_dir_fd=ofd, dst_dir_fd=nfd)
        except BaseException:
            os.unlink(WH_PREFIX + old, dir_fd=ofd)
            raise
        return
    os.rename(old, new, src_dir_fd=ofd, dst_dir_fd=nfd)
    if leave_whiteout:
        _whiteout(ov, ofd, old)
