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

from ..overlay.format import (Format, Kind, Redirect, classify, default_format, dir_marks,
                              is_metacopy, read_redirect, whited_out_at)
from ..overlay.layers import lstat_or_none, open_dir_at, xattr_path
from .errors import ImageError

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


class Stack:
    """Layer roots, top first; for a diff, layer 0 is the upper dir."""

    def __init__(self, roots: list[str], fmt: Format | None = None) -> None:
        self.roots = roots
        # The namespace the daemon writes by default (see params): one per stack.
        self.fmt = fmt or default_format()
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

    def redirect(self, layer: int, dir_fd: int, path: Parts) -> Redirect | None:
        """The validated redirect of the entry at path (in dir_fd of a layer); a
        bad one is an ImageError naming it, as the kernel fails such a lookup."""
        try:
            return read_redirect(self.fmt, xattr_path(dir_fd, path[-1]))
        except OSError as e:
            where = os.fsdecode(b"/" + b"/".join(path))
            raise ImageError(f"{where} in {self.roots[layer]}: {e.strerror}") from None

    def child_sources(self, sources: list[Source], parent: Parts, name: bytes) -> list[Source]:
        """The sources of directory `name` inside the merged directory `parent`."""
        out: list[Source] = []
        try:
            for src in sources:
                st = lstat_or_none(src.fd, name)
                if st is None:
                    if whited_out_at(self.fmt, src.fd, name):
                        break
                    continue
                if classify(self.fmt, src.fd, name, st, None).kind is not Kind.ENTRY \
                        or not stat.S_ISDIR(st.st_mode):
                    break  # hidden here, or a non-directory ends the merge
                fd = open_dir_at(src.fd, name)
                out.append(Source(src.layer, fd))
                if src.layer + 1 == len(self.fds) or dir_marks(self.fmt, fd).opaque:
                    break
                red = self.redirect(src.layer, src.fd, parent + (name,))
                if red is not None:
                    out += self.dir_sources(red.resolve(parent), src.layer + 1)
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
        hit = list_merged(sources, self.fmt).get(path[-1])
        if hit is None:
            close_sources(sources)
            return None
        return hit, sources


    def data_entry(self, path: Parts, e: Entry) -> tuple[Entry, list[Source]] | None:
        """The entry holding a file's data, and the sources keeping it open: e
        itself (no sources), or for a metacopy file the next file down at its
        redirect or at the same path, metacopy files followed on.  None if none."""
        sources: list[Source] = []
        while stat.S_ISREG(e.st.st_mode) and e.layer + 1 < len(self.fds) \
                and is_metacopy(self.fmt, xattr_path(e.dir_fd, e.name)):
            red = self.redirect(e.layer, e.dir_fd, path)
            path = (red or Redirect(False, (path[-1],))).resolve(path[:-1])
            found = self.lookup(path, first=e.layer + 1)
            close_sources(sources)
            if found is None or not stat.S_ISREG(found[0].st.st_mode):
                if found is not None:
                    close_sources(found[1])
                return None
            e, sources = found
        return e, sources


def list_merged(sources: list[Source], fmt: Format) -> dict[bytes, Entry]:
    """The visible names of a merged directory and the entries providing them."""
    seen: dict[bytes, Entry] = {}
    hidden: set[bytes] = set()
    for src in sources:
        hidden_here: set[bytes] = set()
        for name in map(os.fsencode, os.listdir(src.fd)):
            st = os.stat(name, dir_fd=src.fd, follow_symlinks=False)
            # as a lookup by name: what the mount shows (see format.classify)
            c = classify(fmt, src.fd, name, st, None)
            if c.kind is Kind.WHITEOUT:
                hidden_here.add(c.target)
            elif c.kind is Kind.ENTRY and name not in seen and name not in hidden:
                seen[name] = Entry(src.layer, src.fd, name, st)
        hidden |= hidden_here
    return seen

