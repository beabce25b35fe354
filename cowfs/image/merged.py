"""A read-only merged view of a layer stack, by the overlay rules, for diff and commit.

Layer 0 is the top.  A name is the first layer's entry that has it; a whiteout
(either form) hides it below; a directory merges with directories below it until
an opaque one, and a redirected directory (overlay.redirect) continues below at
the path the redirect names.  Everything is opened relative to directory fds with
O_NOFOLLOW, one component at a time: layer contents never lead outside a layer.
"""
from __future__ import annotations

import os
import stat
from dataclasses import dataclass

from ..overlay.layers import lstat_or_none, open_dir_at
from .ovlformat import WH_PREFIX, is_hidden_marker, is_opaque, redirect, whiteout_target

Parts = tuple[bytes, ...]


@dataclass(frozen=True)
class Source:
    """One layer's directory contributing to a merged directory (fd owned by the caller)."""
    layer: int
    fd: int


@dataclass(frozen=True)
class Entry:
    """A visible name in a merged directory: the layer entry that provides it."""
    layer: int
    dir_fd: int       # the providing layer's directory (valid while its Sources are open)
    name: bytes
    st: os.stat_result

    @property
    def is_dir(self) -> bool:
        return stat.S_ISDIR(self.st.st_mode)

    def same_as(self, other: Entry | None) -> bool:
        return other is not None and (self.st.st_dev, self.st.st_ino) == \
            (other.st.st_dev, other.st.st_ino)


def close_sources(sources: list[Source]) -> None:
    for s in sources:
        os.close(s.fd)


def _whited_out(fd: int, name: bytes) -> bool:
    """Is name hidden in this layer by an OCI-form `.wh.NAME` file?"""
    return lstat_or_none(fd, WH_PREFIX + name) is not None


class Stack:
    """Layer roots, top first; for a diff, layer 0 is the upper dir."""

    def __init__(self, roots: list[str]) -> None:
        self.roots = roots
        self.fds: list[int] = []
        try:
            for r in roots:
                # The roots are the user's choice, not layer content: follow them.
                self.fds.append(os.open(r, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC))
        except BaseException:
            self.close()
            raise

    def close(self) -> None:
        for fd in self.fds:
            os.close(fd)
        self.fds = []

    def __enter__(self) -> Stack:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def root_sources(self, first: int = 0) -> list[Source]:
        return [Source(i, os.dup(self.fds[i])) for i in range(first, len(self.fds))]

    def dir_sources(self, path: Parts, first: int = 0) -> list[Source]:
        """The layer directories that make up the merged directory at path, using
        layers from `first` down; empty if path is not a directory there."""
        sources = self.root_sources(first)
        for i, name in enumerate(path):
            try:
                child = self.child_sources(sources, path[:i], name)
            finally:
                close_sources(sources)
            sources = child
            if not sources:
                break
        return sources

    def child_sources(self, sources: list[Source], parent: Parts, name: bytes) -> list[Source]:
        """The sources of directory `name` inside the merged directory `parent`."""
        out: list[Source] = []
        try:
            for src in sources:
                st = lstat_or_none(src.fd, name)
                if st is None:
                    if _whited_out(src.fd, name):
                        break
                    continue
                if whiteout_target(name, st) is not None or not stat.S_ISDIR(st.st_mode):
                    break  # hidden here, or a non-directory ends the merge
                fd = open_dir_at(src.fd, name)
                out.append(Source(src.layer, fd))
                if is_opaque(src.fd, name, fd):
                    break
                target = redirect_path(parent, redirect(src.fd, name))
                if target is not None and src.layer + 1 < len(self.fds):
                    out += self.dir_sources(target, src.layer + 1)
                    break
        except BaseException:
            close_sources(out)
            raise
        return out

    def lookup(self, path: Parts, first: int = 0) -> tuple[Entry, list[Source]] | None:
        """The entry at path (and the parent sources keeping it open), or None."""
        if not path:
            return None
        sources = self.dir_sources(path[:-1], first)
        hit = list_merged(sources).get(path[-1])
        if hit is None:
            close_sources(sources)
            return None
        return hit, sources


def redirect_path(parent: Parts, value: bytes | None) -> Parts | None:
    """Where an overlay.redirect value points: absolute from the layer root, or a
    name in parent.  None for no value or a bad one: like the kernel, a redirect
    never leads up ('..') and a relative one is a single name."""
    if value is None:
        return None
    if value.startswith(b"/"):
        parts = tuple(p for p in value.split(b"/") if p not in (b"", b"."))
    elif b"/" in value or value in (b"", b"."):
        return None
    else:
        parts = parent + (value,)
    return None if b".." in parts else parts


def list_merged(sources: list[Source]) -> dict[bytes, Entry]:
    """The visible names of a merged directory and the entries providing them."""
    seen: dict[bytes, Entry] = {}
    hidden: set[bytes] = set()
    for src in sources:
        hidden_here: set[bytes] = set()
        for name in map(os.fsencode, os.listdir(src.fd)):
            if is_hidden_marker(name):
                continue
            st = os.stat(name, dir_fd=src.fd, follow_symlinks=False)
            target = whiteout_target(name, st)
            if target is not None:
                hidden_here.add(target)
            elif name not in seen and name not in hidden:
                seen[name] = Entry(src.layer, src.fd, name, st)
        hidden |= hidden_here
    return seen

