"""Overlay inodes: one Node per file in use (the server tells which ones it
still holds: Overlay.is_held).

A Node's number is the FUSE node id and the st_ino programs see.  It is derived
from the real inode it first came from (see InodeNumbers), so it is stable for the
life of the mount, the same for hard links, and kept across copy-up.
"""
from __future__ import annotations

import errno
import os
import stat
from collections import OrderedDict
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, TypeVar

from .layers import open_dir_at, walk_dirs

if TYPE_CHECKING:
    from .super import Overlay

ROOT_INO = 1
# Directory fds kept when the fd limit is hit: more than one operation uses.
KEEP_ON_EMFILE = 16
T = TypeVar("T")
_NO_FDS: dict[int, int] = {}


class Node:
    __slots__ = ("ino", "parent", "name", "mode", "layer", "lower_layer", "layers",
                 "redirect", "paths", "fds", "index", "gen", "metacopy",
                 "unlinked", "orphan", "no_caps", "attr", "listing", "links", "key",
                 "upper_wh")

    def __init__(self, ino: int, parent: Node | None, name: bytes, mode: int,
                 layer: int, lower_layer: int | None, layers: tuple[int, ...] = ()) -> None:
        self.ino = ino
        self.parent = parent
        self.name = name
        self.mode = mode                # file type bits (and perms at lookup time)
        self.layer = layer              # layer of the topmost real entry (0 = upper)
        self.lower_layer = lower_layer  # lower layer holding the data, if any
        self.layers = layers            # directories: every layer merged in, top first
        # dirs: the lower path a redirect written for it names; metacopy and
        # lower files: the path of their data in layer lower_layer
        self.redirect: tuple[bytes, ...] | None = None
        # dirs: lower layers reached through a redirect -> the path there
        self.paths: dict[int, tuple[bytes, ...]] | None = None
        # directories: open fd per layer (cached); files share one empty dict
        self.fds: dict[int, int] = {} if stat.S_ISDIR(mode) else _NO_FDS
        self.index: dict[bytes, list | None] | None = None  # merged lower entries
        self.gen = 0                    # bumped on copy-up: handles re-resolve
        self.metacopy = False           # upper holds metadata only, data is lower
        self.unlinked = False
        # Deleted while the kernel still held it: the file waits in work/ under
        # this name until the kernel forgets it (open fds, O_PATH, cwd...).
        self.orphan: bytes | None = None
        self.attr: Any = None           # adapter's cached reply for immutable nodes
        # Known to have no security.capability: the kernel asks before every write.
        self.no_caps = False
        self.listing: list[bytes] | None = None  # directories: merged names, cached
        # directories: does the upper copy hold OCI `.wh.` names (None: not scanned)
        self.upper_wh: bool | None = None
        # Every upper name of a file that has several (parent, name): set by link().
        self.links: list[tuple[Node, bytes]] | None = None
        # Its key in the inode table: the number, or (parent, name) for one name
        # of a lower hard link until copy-up (namei.link_key).
        self.key: int | tuple[int, bytes] = ino

    @property
    def is_dir(self) -> bool:
        return stat.S_ISDIR(self.mode)

    def __repr__(self) -> str:
        return f"Node({self.ino}, {self.name!r}, layer={self.layer})"


class InodeNumbers:
    """st_ino of the overlay: the real inode number, with the top byte telling
    filesystems apart (like overlayfs' xino), and copied-up files keeping the
    number of the lower file they came from."""

    def __init__(self) -> None:
        self._devs: dict[int, int] = {}
        self._copied: dict[tuple[int, int], int] = {}
        self._next_fresh = 1 << 62

    def number(self, st: os.stat_result) -> int:
        key = (st.st_dev, st.st_ino)
        ino = self._copied.get(key)
        if ino is not None:
            return ino
        dev = self._devs.setdefault(st.st_dev, len(self._devs))
        ino = (st.st_ino & ((1 << 56) - 1)) | (dev << 56)
        if ino <= ROOT_INO:
            ino |= 1 << 63   # 0 and 1 are the kernel's: negative entry and root
        return ino

    def fresh(self, st: os.stat_result) -> int:
        """A new number for an upper file whose real inode number was freed and
        reused while the overlay inode that had it is still known to the kernel."""
        self._next_fresh += 1
        self._copied[(st.st_dev, st.st_ino)] = self._next_fresh
        return self._next_fresh

    def forget(self, st: os.stat_result) -> None:
        """The real file st is being deleted: its number may be reused for another."""
        self._copied.pop((st.st_dev, st.st_ino), None)

    def keep(self, st: os.stat_result, ino: int) -> None:
        """The real file st now stands for overlay inode ino (copy-up, root)."""
        self._copied[(st.st_dev, st.st_ino)] = ino


class InodeTable:
    """Live nodes by number, plus an LRU of nodes holding directory fds: the fd
    limit is far below the number of directories a tree walk can visit."""

    def __init__(self, ov: Overlay, fd_budget: int) -> None:
        self.ov = ov
        self.nodes: dict[int | tuple[int, bytes], Node] = {}
        self._fd_lru: OrderedDict[int, Node] = OrderedDict()
        self._fd_count = 0
        self._fd_budget = fd_budget

    def add(self, node: Node) -> None:
        self.nodes[node.key] = node

    def renumber(self, node: Node, ino: int) -> None:
        """node is a file of its own now, under a new number (a lower hard link
        broken by copy-up shows its upper inode, as in overlayfs)."""
        if self.nodes.get(node.key) is node:
            del self.nodes[node.key]
        node.ino = node.key = ino
        self.nodes[ino] = node

    def drop(self, node: Node) -> None:
        """Nobody holds node any more: forget it, and delete it if it is an orphan."""
        if node.ino == ROOT_INO or self.nodes.get(node.key) is not node:
            return
        del self.nodes[node.key]
        self.close_fds(node)
        if node.orphan is not None:
            self.ov.numbers.forget(os.stat(node.orphan, dir_fd=self.ov.work_fd,
                                           follow_symlinks=False))
            os.unlink(node.orphan, dir_fd=self.ov.work_fd)
            node.orphan = None
            self.ov.events.orphan(node, kept=False)

    def dir_fd(self, node: Node, layer: int) -> int:
        """The fd of node's directory in one layer, opened without following links.

        Opened from the nearest ancestor whose fd is cached, in a loop (trees may
        be deeper than Python's recursion limit)."""
        fd = node.fds.get(layer)
        if fd is not None:
            self._fd_lru.move_to_end(node.ino)
            return fd
        chain: list[Node] = []
        n = node
        while n.fds.get(layer) is None and n.parent is not None \
                and not (n.paths and layer in n.paths):
            chain.append(n)
            n = n.parent
        if n.fds.get(layer) is None:
            if n.parent is None:
                self._cache(n, layer, self.opening(os.dup, self.ov.layers[layer].fd))
            else:
                found = self.opening(walk_dirs, self.ov.layers[layer].fd, n.paths[layer])
                if found is None:
                    raise FileNotFoundError(f"redirected directory gone in layer {layer}")
                self._cache(n, layer, found)
        for child in reversed(chain):
            self._cache(child, layer, self.opening(open_dir_at, n.fds[layer], child.name))
            n = child
        if self._fd_count > self._fd_budget:
            self._evict(self._fd_budget * 3 // 4)
        return node.fds[layer]

    def _cache(self, node: Node, layer: int, fd: int) -> None:
        node.fds[layer] = fd
        self._fd_count += 1
        self._fd_lru[node.ino] = node
        self._fd_lru.move_to_end(node.ino)

    def opening(self, fn: Callable[..., T], *args: Any) -> T:
        """fn(*args) that opens an fd; on EMFILE (open files of callers filling the
        limit), close all but the most recently used directory fds and retry once."""
        try:
            return fn(*args)
        except OSError as e:
            if e.errno != errno.EMFILE:
                raise
        self._evict(KEEP_ON_EMFILE)
        return fn(*args)

    def drop_fd(self, node: Node, layer: int) -> None:
        os.close(node.fds.pop(layer))
        self._fd_count -= 1

    def close_fds(self, node: Node) -> None:
        if node.fds:
            for fd in node.fds.values():
                os.close(fd)
            self._fd_count -= len(node.fds)
            node.fds = {}
        self._fd_lru.pop(node.ino, None)

    def _evict(self, keep: int) -> None:
        """Close the least recently used directory fds until at most keep are
        cached (the ones an operation in progress uses are the most recent)."""
        while self._fd_count > keep and self._fd_lru:
            _, node = self._fd_lru.popitem(last=False)
            if node.ino == ROOT_INO:
                continue
            for fd in node.fds.values():
                os.close(fd)
            self._fd_count -= len(node.fds)
            node.fds = {}

    def close_all(self) -> None:
        for node in list(self.nodes.values()):
            self.close_fds(node)
