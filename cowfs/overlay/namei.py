"""Name lookup through the layers (overlayfs' namei).

The upper layer is probed live: only cowfs writes it while mounted, but it is
the one layer that changes.  Lower layers are immutable while mounted, so each
merged directory scans its lower layers once into an index (name -> the layer
that wins, and for directories every layer merged below it): a lookup is one
dict hit and one fstatat, however many layers there are.

Redirects are followed in every layer, as the kernel does with
redirect_dir=on|follow: a directory renamed in one mount keeps showing its
contents when that upper becomes a lower layer.  A directory's layers are
settled when its node is made (`_settle`): an opaque layer ends them, a
redirect continues them at another path (kept in node.paths per layer).
Entries are classified only by `format`; redirects are validated there.
"""
from __future__ import annotations

import errno
import os
import stat
from dataclasses import dataclass
from typing import TYPE_CHECKING

from .format import (Kind, has_oci_whiteout, Parts, Redirect, classify, dir_marks, is_metacopy,
                     is_reserved_name, parse_redirect, read_redirect)
from .inodes import Node
from .layers import lstat_at, lstat_or_none, open_dir_at, xattr_path

if TYPE_CHECKING:
    from .super import Overlay


@dataclass(slots=True)
class LowerEntry:
    """What the lower layers of a merged directory show at one name."""
    layer: int                        # the top lower layer with the name
    is_dir: bool
    layers: list[int] | None = None   # directories: the layers merged, top first
    closed: bool = False              # directories: a lower layer ended the merge
    ino: int | tuple[int, bytes] | None = None   # its node's table key, once looked up


_MISSING = object()


def lower_index(ov: Overlay, node: Node) -> dict[bytes, LowerEntry | None]:
    """name -> LowerEntry, or None for a name whited out in some lower layer."""
    if node.index is None:
        node.index = _build_index(ov, node)
    return node.index


def _build_index(ov: Overlay, node: Node) -> dict[bytes, LowerEntry | None]:
    idx: dict[bytes, LowerEntry | None] = {}
    for k in node.layers:
        if k == 0:
            continue
        fd = ov.table.dir_fd(node, k)
        marks = dir_marks(ov.fmt, fd)
        whiteouts: list[bytes] = []
        with ov.table.opening(os.scandir, fd) as it:
            for e in it:
                name = os.fsencode(e.name)
                c = classify(ov.fmt, fd, name, e, marks)
                if c.kind is Kind.WHITEOUT:
                    whiteouts.append(c.target)
                    continue
                if c.kind is Kind.MARKER:
                    continue
                is_dir = e.is_dir(follow_symlinks=False)
                ent = idx.get(name, _MISSING)
                if ent is _MISSING:
                    idx[name] = LowerEntry(k, is_dir, [k] if is_dir else None)
                elif isinstance(ent, LowerEntry) and ent.is_dir and not ent.closed:
                    if is_dir:
                        ent.layers.append(k)  # type: ignore[union-attr]
                    else:
                        ent.closed = True
        for name in whiteouts:
            ent = idx.get(name, _MISSING)
            if ent is _MISSING:
                idx[name] = None
            elif isinstance(ent, LowerEntry) and ent.is_dir:
                ent.closed = True
    return idx


def lookup(ov: Overlay, parent: Node, name: bytes) -> Node | None:
    """The node for name in parent's merged view, or None when there is none."""
    if name == b".":
        return parent
    if name == b"..":
        return parent.parent or parent
    if is_reserved_name(name):
        return None
    if parent.layer == 0:
        ufd = ov.table.dir_fd(parent, 0)
        st = lstat_or_none(ufd, name)
        if st is not None:
            if classify(ov.fmt, ufd, name, st, None).kind is Kind.WHITEOUT:
                return None
            return upper_node(ov, parent, name, st, ufd)
        # The OCI form counts in the upper layer too (readdir hides NAME for it).
        if _may_hold_oci_whiteouts(ov, parent, ufd) and has_oci_whiteout(ufd, name):
            return None
    ent = lower_index(ov, parent).get(name)
    if ent is None:
        return None
    return _lower_node(ov, parent, name, ent)


def _may_hold_oci_whiteouts(ov: Overlay, parent: Node, ufd: int) -> bool:
    """Can the upper directory hold `.wh.` names?  Only ones it had when mounted:
    cowfs makes none (but where 0/0 whiteouts are refused), and users cannot
    create such names.  Known after one scan, so a miss costs one lstat."""
    if ov.wh_fallback:
        return True
    if parent.upper_wh is None:
        with os.scandir(ufd) as it:
            parent.upper_wh = any(e.name.startswith(".wh.") for e in it)
    return parent.upper_wh


def lookup_listed(ov: Overlay, parent: Node, name: bytes) -> Node | None:
    """lookup for a name a listing shows: one whose lookup fails (a refused or
    invalid redirect, a metacopy file without data) must not fail the whole
    listing; the kernel lists it too, and a lookup by name reports the errno."""
    try:
        return lookup(ov, parent, name)
    except OSError:
        return None


def lower_entry(ov: Overlay, parent: Node, name: bytes) -> LowerEntry | None:
    """What the lower layers show at parent/name (ignoring the upper layer)."""
    if parent.layers == (0,) or parent.layers == ():
        return None
    return lower_index(ov, parent).get(name)


def upper_node(ov: Overlay, parent: Node, name: bytes, st: os.stat_result,
                ufd: int) -> Node:
    ino = ov.numbers.number(st)
    node = ov.table.nodes.get(ino)
    if node is not None:
        if not node.unlinked:
            return node
        # The filesystem reused the real inode of a deleted file: a new file.
        ino = ov.numbers.fresh(st)
    if stat.S_ISDIR(st.st_mode):
        node = Node(ino, parent, name, st.st_mode, 0, None, (0,))
        fd = ov.table.dir_fd(node, 0)
        lowers: list[int] = []
        if not dir_marks(ov.fmt, fd).opaque and ov.merge_lowers:
            value = ov.fmt.get(fd, "redirect")
            if value is not None:
                red = _followed(ov, value)
                node.redirect = red.resolve(lower_path(parent))
                lowers = _redirected(ov, node, red, 0)
            else:
                ent = lower_entry(ov, parent, name)
                if ent is not None and ent.is_dir:
                    lowers = list(ent.layers or ())
        try:
            node.layers = (0,) + _settle(ov, node, lowers)
        except BaseException:
            ov.table.close_fds(node)
            raise
    else:
        node = Node(ino, parent, name, st.st_mode, 0, None)
        if stat.S_ISREG(st.st_mode) and _may_be_metacopy(st) \
                and is_metacopy(ov.fmt, xattr_path(ufd, name)):
            # Metadata here, data below: at the same path, or where the kernel's
            # redirect says (a metacopy file it renamed or hard-linked).
            node.metacopy = True
            node.lower_layer, node.redirect = _data_source(ov, parent, name, 0, ufd)
    ov.table.add(node)
    return node


def _may_be_metacopy(st: os.stat_result) -> bool:
    """A metacopy placeholder holds no data, but an xattr block (ext4: one fs
    block) counts in st_blocks: only a file allocated beyond its size and a few
    blocks of xattrs surely has no metacopy mark, so needs no getxattr."""
    return st.st_size > 0 and (st.st_size > st.st_blocks * 512 or st.st_blocks <= 16)


def _lower_node(ov: Overlay, parent: Node, name: bytes, ent: LowerEntry) -> Node | None:
    k = ent.layer
    if ent.ino is not None:
        # Lower entries never change: a known one needs no syscall while its node lives.
        node = ov.table.nodes.get(ent.ino)
        if node is not None:
            return node
    pfd = ov.table.dir_fd(parent, k)
    st = lstat_at(pfd, name)
    if stat.S_ISREG(st.st_mode) and st.st_size == 0 \
            and classify(ov.fmt, pfd, name, st, None).kind is Kind.WHITEOUT:
        return None   # an xattr whiteout outside an opaque=x directory (see classify)
    ino = ov.numbers.number(st)
    # (with no upper layer nothing breaks a link: one node, as in overlayfs)
    key = link_key(parent, name) if not ent.is_dir and st.st_nlink > 1 \
        and ov.upper is not None else ino
    node = ov.table.nodes.get(key)
    if node is not None:
        ent.ino = key
        return node
    if ent.is_dir:
        node = Node(ino, parent, name, st.st_mode, k, None)
        try:
            node.layers = _settle(ov, node, list(ent.layers or ()))
        except BaseException:
            ov.table.close_fds(node)
            raise
    else:
        node = Node(ino, parent, name, st.st_mode, k, k)
        node.key = key
        if stat.S_ISREG(st.st_mode) and k != len(ov.layers) - 1 and _may_be_metacopy(st) \
                and is_metacopy(ov.fmt, xattr_path(pfd, name)):
            node.lower_layer, node.redirect = _data_source(ov, parent, name, k, pfd)
    ent.ino = key
    ov.table.add(node)
    return node


def link_key(parent: Node, name: bytes) -> tuple[int, bytes]:
    """The table key of one name of a lower hard link.  As overlayfs without
    index, every name is its own file: they show the lower inode (number and
    link count) until copy-up breaks the link, so a write lands only under
    the name written, and nothing depends on which name was looked up last."""
    return (parent.ino, name)


# ------------------------------------------------------------------ paths
def lower_path(node: Node) -> Parts:
    """The path below the lower layer roots a redirect written for node names
    (the kernel's ovl_get_redirect): its own redirect, or its parent's path and
    its name.  Lower layers' own redirects are followed from there."""
    names: list[bytes] = []
    n: Node | None = node
    while n is not None:   # (a loop: trees may be deep)
        if n.redirect is not None and n.is_dir:
            return n.redirect + tuple(reversed(names))
        if n.parent is None:
            break
        names.append(n.name)
        n = n.parent
    return tuple(reversed(names))


def layer_path(node: Node, layer: int) -> Parts:
    """Where node's directory is below the root of one lower layer."""
    if node.parent is None:
        return ()
    if node.paths and layer in node.paths:
        return node.paths[layer]
    return layer_path(node.parent, layer) + (node.name,)


def freeze_paths(node: Node) -> None:
    """Before a directory moves: keep its lower layers where they are now, as the
    natural route through its new parent and name would not find them."""
    node.paths = {k: layer_path(node, k) for k in node.layers if k != 0}


def _followed(ov: Overlay, value: bytes) -> Redirect:
    """A redirect about to be followed: valid, and following allowed (the kernel
    refuses a lookup with EPERM when redirect_dir=nofollow meets one)."""
    red = parse_redirect(value)
    if not ov.follow_redirects:
        raise OSError(errno.EPERM, "refusing to follow a redirect (redirect_dir=nofollow)")
    return red


def _settle(ov: Overlay, node: Node, lowers: list[int]) -> tuple[int, ...]:
    """A directory's lower layers, top first, from the layers that have it at its
    path: an opaque layer ends them, a redirect replaces the ones below it."""
    out: list[int] = []
    i = 0
    while i < len(lowers):
        k = lowers[i]
        i += 1
        out.append(k)
        if k == ov.bottom_layer:
            break   # nothing below: its marks cannot matter (the kernel's d.last)
        fd = ov.table.dir_fd(node, k)
        if dir_marks(ov.fmt, fd).opaque:
            break
        value = ov.fmt.get(fd, "redirect")
        if value is not None:
            lowers, i = _redirected(ov, node, _followed(ov, value), k), 0
    for k in [k for k in node.fds if k != 0 and k not in out]:
        ov.table.drop_fd(node, k)
    return tuple(out)


@dataclass(frozen=True)
class _Probe:
    kind: str            # "dir", "file", "missing", or "end" (nothing below either)
    walked: Parts        # the path looked up in this layer
    next: Parts          # the path for the layers below (an ancestor's redirect moves it)
    stop: bool = False   # an opaque ancestor: the layers below take no part


def _probe(ov: Overlay, root_fd: int, prefix: Parts, comps: Parts) -> _Probe:
    """Look comps up below root_fd (at `prefix` in its layer), as the kernel's
    ovl_lookup_layer: a whiteout or non-directory on the way ends the lookup in
    every layer, an opaque ancestor ends it below this layer, an ancestor's
    redirect moves it for the layers below."""
    walked = prefix + comps
    nxt: Parts = prefix
    stop = False
    fd = os.dup(root_fd)
    try:
        for i, name in enumerate(comps):
            last = i == len(comps) - 1
            try:
                st = lstat_or_none(fd, name)
            except OSError as e:
                if e.errno != errno.ENAMETOOLONG:
                    raise
                st = None
            if st is None:
                gone = has_oci_whiteout(fd, name)
                return _Probe("end" if gone else "missing", walked, nxt + comps[i:], stop)
            if classify(ov.fmt, fd, name, st, None).kind is Kind.WHITEOUT:
                return _Probe("end", walked, nxt + comps[i:], stop)
            if last:
                kind = "dir" if stat.S_ISDIR(st.st_mode) else \
                    "file" if stat.S_ISREG(st.st_mode) else "end"
                return _Probe(kind, walked, nxt + (name,), stop)
            if not stat.S_ISDIR(st.st_mode):
                return _Probe("end", walked, nxt + comps[i:], stop)
            nfd = open_dir_at(fd, name)
            os.close(fd)
            fd = nfd
            nxt += (name,)
            if dir_marks(ov.fmt, fd).opaque:
                stop = True
            value = ov.fmt.get(fd, "redirect")
            if value is not None:
                red = _followed(ov, value)
                nxt = red.resolve(nxt[:-1])
                stop = stop and not red.absolute
        return _Probe("dir", walked, nxt, stop)  # comps empty: the root itself
    finally:
        os.close(fd)


def _bases(ov: Overlay, parent: Node, red_absolute: bool, below: int,
           layers: tuple[int, ...]) -> list[tuple[int, int, Parts]]:
    """(layer, base fd, base path) to look a redirect up in, below layer `below`:
    every lower root for an absolute one, the parent's directories otherwise."""
    if red_absolute:
        return [(j, ov.layers[j].fd, ()) for j in layers if j > below]  # type: ignore[union-attr]
    return [(j, ov.table.dir_fd(parent, j), layer_path(parent, j))
            for j in parent.layers if j > below and j in layers]


def _redirected(ov: Overlay, node: Node, red: Redirect, below: int) -> list[int]:
    """The layers below `below` that hold the directory a redirect names; each
    one's path goes into node.paths."""
    assert node.parent is not None
    paths = dict(node.paths or {})
    found: list[int] = []
    comps = red.parts
    for j, base, prefix in _bases(ov, node.parent, red.absolute, below, ov.merge_lowers):
        p = _probe(ov, base, prefix if not red.absolute else (), comps)
        if p.kind == "end" or p.kind == "file":
            break
        if p.kind == "dir":
            found.append(j)
            paths[j] = p.walked
        if red.absolute:
            comps = p.next
        if p.stop:
            break
    node.paths = paths
    return found


def _data_source(ov: Overlay, parent: Node, name: bytes, layer: int,
                 dfd: int) -> tuple[int, Parts]:
    """(layer, path) of the data of a metacopy file found in `layer`: the next
    regular file down at its path or at its redirect, following lower metacopy
    files on; data-only layers are reached only by an absolute redirect.
    EIO when there is none, EPERM with metacopy=off (the kernel's answers)."""
    red = read_redirect(ov.fmt, xattr_path(dfd, name))
    if red is not None and not ov.follow_redirects:
        raise OSError(errno.EPERM, "refusing to follow a redirect (redirect_dir=nofollow)")
    red = red or Redirect(False, (name,))
    while True:
        layers = ov.merge_lowers + (ov.data_lowers if red.absolute else ())
        hit = None
        for j, base, prefix in _bases(ov, parent, red.absolute, layer, layers):
            p = _probe(ov, base, (), red.parts)
            if p.kind == "missing" and not p.stop:
                continue
            if p.kind == "file":
                hit = (j, (p.walked if red.absolute else layer_path(parent, j) + red.parts))
            break
        if hit is None:
            raise OSError(errno.EIO, "metacopy file without its lower data")
        if not ov.metacopy:
            raise OSError(errno.EPERM, "refusing to follow a metacopy file (metacopy=off)")
        layer, path = hit
        fd = _open_parent(ov, layer, path)
        try:
            st = lstat_at(fd, path[-1])
            if layer == len(ov.layers) - 1 or not _may_be_metacopy(st) \
                    or not is_metacopy(ov.fmt, xattr_path(fd, path[-1])):
                return layer, path
            nxt = read_redirect(ov.fmt, xattr_path(fd, path[-1]))
        finally:
            os.close(fd)
        if nxt is not None and not ov.follow_redirects:
            raise OSError(errno.EPERM, "refusing to follow a redirect (redirect_dir=nofollow)")
        # A lower metacopy file: its data is further down, by its own redirect.
        red = Redirect(True, nxt.resolve(path[:-1])) if nxt is not None else Redirect(True, path)


def _open_parent(ov: Overlay, layer: int, path: Parts) -> int:
    fd = os.dup(ov.layers[layer].fd)  # type: ignore[union-attr]
    try:
        for name in path[:-1]:
            nfd = open_dir_at(fd, name)
            os.close(fd)
            fd = nfd
    except BaseException:
        os.close(fd)
        raise
    return fd
