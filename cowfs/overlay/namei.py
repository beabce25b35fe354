"""Name lookup through the layers (overlayfs' namei).

The upper layer is probed live: only cowfs writes it while mounted, but it is
the one layer that changes.  Lower layers are immutable while mounted, so each
merged directory scans its lower layers once into an index (name -> the layer
that wins, and for directories every layer merged below it): a lookup is one
dict hit and one fstatat, however many layers there are.
"""
from __future__ import annotations

import os
import stat
from typing import TYPE_CHECKING

from .inodes import Node
from .layers import lstat_at, lstat_or_none, open_dir_at, walk_dirs, xattr_path
from .format import (OPAQUE_MARKER, WH_PREFIX, dir_opacity, is_whiteout_stat,
                       is_xattr_whiteout, overlay_xattr)

if TYPE_CHECKING:
    from .super import Overlay

# A lower index entry: [layer, is_dir, layers merged (dirs), merge closed] and,
# once looked up, its inode number; None for a name whited out in some lower layer.
LowerEntry = list
_MISSING = object()


def lower_index(ov: Overlay, node: Node) -> dict[bytes, LowerEntry | None]:
    if node.index is None:
        node.index = _build_index(ov, node)
    return node.index


def _scan_layer(fd: int) -> list[tuple[bytes, bool, os.DirEntry]]:
    out = []
    with os.scandir(fd) as it:
        for e in it:
            out.append((os.fsencode(e.name), e.is_dir(follow_symlinks=False), e))
    return out


def _build_index(ov: Overlay, node: Node) -> dict[bytes, LowerEntry | None]:
    idx: dict[bytes, LowerEntry | None] = {}
    kept: list[int] = []
    for k in node.layers:
        kept.append(k)
        if k == 0:
            continue
        fd = ov.table.dir_fd(node, k)
        opaque, xwhiteouts = dir_opacity(fd)
        whiteouts: list[bytes] = []
        for name, is_dir, e in ov.table.opening(_scan_layer, fd):
            if name.startswith(WH_PREFIX):
                if name == OPAQUE_MARKER:
                    opaque = True
                elif len(name) > 4:
                    whiteouts.append(name[4:])
                continue
            if not is_dir and not e.is_file(follow_symlinks=False) \
                    and not e.is_symlink():
                if is_whiteout_stat(e.stat(follow_symlinks=False)):
                    whiteouts.append(name)
                    continue
            elif xwhiteouts and not is_dir and e.is_file(follow_symlinks=False) \
                    and e.stat(follow_symlinks=False).st_size == 0 \
                    and is_xattr_whiteout(xattr_path(fd, name)):
                whiteouts.append(name)
                continue
            ent = idx.get(name, _MISSING)
            if ent is _MISSING:
                idx[name] = [k, is_dir, [k] if is_dir else None, False]
            elif ent is not None and ent[1] and not ent[3]:
                if is_dir:
                    ent[2].append(k)
                else:
                    ent[3] = True
        for name in whiteouts:
            ent = idx.get(name, _MISSING)
            if ent is _MISSING:
                idx[name] = None
            elif ent is not None and ent[1]:
                ent[3] = True
        if opaque:
            break
    # Layers below an opaque layer take no part in this directory.
    node.layers = tuple(kept)
    for k in [k for k in node.fds if k not in kept]:
        ov.table.drop_fd(node, k)
    return idx


def lookup(ov: Overlay, parent: Node, name: bytes) -> Node | None:
    """The node for name in parent's merged view, or None when there is none."""
    if name == b".":
        return parent
    if name == b"..":
        return parent.parent or parent
    if name.startswith(WH_PREFIX):
        return None
    if parent.layer == 0:
        ufd = ov.table.dir_fd(parent, 0)
        st = lstat_or_none(ufd, name)
        if st is not None:
            if is_whiteout_stat(st):
                return None
            return _upper_node(ov, parent, name, st, ufd)
        if ov.wh_fallback and lstat_or_none(ufd, WH_PREFIX + name) is not None:
            return None
    ent = lower_index(ov, parent).get(name)
    if ent is None:
        return None
    return _lower_node(ov, parent, name, ent)


def lower_entry(ov: Overlay, parent: Node, name: bytes) -> LowerEntry | None:
    """What the lower layers show at parent/name (ignoring the upper layer)."""
    if parent.layers == (0,) or parent.layers == ():
        return None
    return lower_index(ov, parent).get(name)


def _upper_node(ov: Overlay, parent: Node, name: bytes, st: os.stat_result,
                ufd: int) -> Node:
    ino = ov.numbers.number(st)
    node = ov.table.nodes.get(ino)
    if node is not None:
        if not node.unlinked:
            return node
        # The filesystem reused the real inode of a deleted file: a new file.
        ino = ov.numbers.fresh(st)
    if stat.S_ISDIR(st.st_mode):
        layers: tuple[int, ...] = (0,)
        path = xattr_path(ufd, name)
        redirect = None
        if overlay_xattr(path, "opaque") != b"y":
            value = overlay_xattr(path, "redirect") if ov.redirect_dir else None
            if value:
                redirect = redirect_components(parent, value)
                layers += _redirect_layers(ov, redirect)
            else:
                ent = lower_entry(ov, parent, name)
                if ent is not None and ent[1]:
                    layers += tuple(ent[2])
        node = Node(ino, parent, name, st.st_mode, 0, None, layers)
        node.redirect = redirect
    else:
        node = Node(ino, parent, name, st.st_mode, 0, None)
        # A metacopy placeholder holds no data, but an xattr block (ext4: one fs
        # block) counts in st_blocks: only a file allocated beyond its size and
        # a few blocks of xattrs surely has no metacopy mark.
        if stat.S_ISREG(st.st_mode) and st.st_size > 0 \
                and (st.st_size > st.st_blocks * 512 or st.st_blocks <= 16) \
                and overlay_xattr(xattr_path(ufd, name), "metacopy") is not None:
            # Metadata here, data below: at the same path, or where the kernel's
            # redirect says (a metacopy file it renamed or hard-linked). No data
            # found leaves lower_layer None: reads then fail with EIO, as in overlayfs.
            node.metacopy = True
            value = overlay_xattr(xattr_path(ufd, name), "redirect") if ov.redirect_dir else None
            if value:
                node.redirect = redirect_components(parent, value)
                node.lower_layer = _lower_file_layer(ov, node.redirect)
            else:
                ent = lower_entry(ov, parent, name)
                if ent is not None and not ent[1]:
                    node.lower_layer = ent[0]
    ov.table.add(node)
    return node


def _lower_node(ov: Overlay, parent: Node, name: bytes, ent: LowerEntry) -> Node:
    k = ent[0]
    if len(ent) > 4:
        # Lower entries never change: a known one needs no syscall while its node lives.
        node = ov.table.nodes.get(ent[4])
        if node is not None:
            return node
    st = lstat_at(ov.table.dir_fd(parent, k), name)
    ino = ov.numbers.number(st)
    # (with no upper layer nothing breaks a link: one node, as in overlayfs)
    key = link_key(parent, name) if not ent[1] and st.st_nlink > 1 \
        and ov.upper is not None else ino
    if len(ent) == 4:
        ent.append(key)
    node = ov.table.nodes.get(key)
    if node is not None:
        return node
    if ent[1]:
        node = Node(ino, parent, name, st.st_mode, k, None, tuple(ent[2]))
    else:
        node = Node(ino, parent, name, st.st_mode, k, k)
        node.key = key
    ov.table.add(node)
    return node


def link_key(parent: Node, name: bytes) -> tuple[int, bytes]:
    """The table key of one name of a lower hard link.  As overlayfs without
    index, every name is its own file: they show the lower inode (number and
    link count) until copy-up breaks the link, so a write lands only under
    the name written, and nothing depends on which name was looked up last."""
    return (parent.ino, name)


def lower_path(node: Node) -> tuple[bytes, ...]:
    """Where node's lower directories live below each lower layer root."""
    names: list[bytes] = []
    n: Node | None = node
    while n is not None:   # (a loop: trees may be deep)
        if n.redirect is not None:
            return n.redirect + tuple(reversed(names))
        if n.parent is None:
            break
        names.append(n.name)
        n = n.parent
    return tuple(reversed(names))


def redirect_components(parent: Node, value: bytes) -> tuple[bytes, ...]:
    """overlayfs redirect: absolute from the layer root, or a name in the parent."""
    if value.startswith(b"/"):
        return tuple(p for p in value.split(b"/") if p)
    return lower_path(parent) + (value,)


def _lower_file_layer(ov: Overlay, comps: tuple[bytes, ...]) -> int | None:
    """The top lower layer with a regular file at comps, if that is what shows there."""
    for k in ov.lower_indexes:
        fd = walk_dirs(ov.layers[k].fd, comps[:-1])  # type: ignore[union-attr]
        if fd is None:
            continue
        try:
            st = lstat_or_none(fd, comps[-1])
        finally:
            os.close(fd)
        if st is not None:
            return k if stat.S_ISREG(st.st_mode) else None
    return None


def _redirect_layers(ov: Overlay, comps: tuple[bytes, ...]) -> tuple[int, ...]:
    """Lower layers merged into a redirected directory: top down, while the path
    is a directory; a layer where it is anything else (a whiteout too) ends it."""
    found: list[int] = []
    for k in ov.lower_indexes:
        kind = _path_kind(ov.layers[k].fd, comps)  # type: ignore[union-attr]
        if kind == "other":
            break
        if kind == "dir":
            found.append(k)
    return tuple(found)


def _path_kind(root_fd: int, comps: tuple[bytes, ...]) -> str:
    """"dir", "missing" or "other" for the entry at comps below root_fd."""
    fd = os.dup(root_fd)
    try:
        for name in comps:
            st = lstat_or_none(fd, name)
            if st is None:
                return "missing"
            if not stat.S_ISDIR(st.st_mode):
                return "other"
            nfd = open_dir_at(fd, name)
            os.close(fd)
            fd = nfd
        return "dir"
    finally:
        os.close(fd)
