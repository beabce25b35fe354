"""What an upper dir changes in the tree of the layers below it, as `docker diff` shows it.

A path is A (added: not in the lower tree), C (changed: in both, and the upper
has its own copy) or D (deleted: hidden by a whiteout or an opaque directory).
As in docker, a directory whose metadata is unchanged is listed only as the
parent of an added or deleted entry, and only the top of a deleted subtree is.
"""
from __future__ import annotations

import os
import stat
from collections.abc import Iterator
from dataclasses import dataclass

from .merged import Entry, Parts, Source, Stack, close_sources, list_merged

ADDED, CHANGED, DELETED = "A", "C", "D"


@dataclass(frozen=True, order=True)
class Change:
    path: bytes          # absolute, "/a/b"
    kind: str

    def __str__(self) -> str:
        return f"{self.kind} {os.fsdecode(self.path)}"


def as_path(parts: Parts) -> bytes:
    return b"/" + b"/".join(parts)


def dir_meta_changed(new: os.stat_result, old: os.stat_result) -> bool:
    return (new.st_mode, new.st_uid, new.st_gid, new.st_mtime_ns) != \
        (old.st_mode, old.st_uid, old.st_gid, old.st_mtime_ns)


class TreeDiff:
    """Walks the merged tree of [upper, *lowers] against the tree of the lowers."""

    def __init__(self, upper: str, lowers: list[str]) -> None:
        self.stack = Stack([upper, *lowers])

    def close(self) -> None:
        self.stack.close()

    def __enter__(self) -> TreeDiff:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def changes(self) -> list[Change]:
        out: dict[bytes, str] = {}
        new, old = self.stack.root_sources(0), self.stack.root_sources(1)
        try:
            self._dir((), new, old, out)
        finally:
            close_sources(new)
            close_sources(old)
        return sorted(Change(p, k) for p, k in out.items())

    def _dir(self, path: Parts, new_src: list[Source], old_src: list[Source],
             out: dict[bytes, str]) -> None:
        new, old = list_merged(new_src, self.stack.fmt), list_merged(old_src, self.stack.fmt)
        touched = False
        for name in sorted(new.keys() | old.keys()):
            n, o = new.get(name), old.get(name)
            p = path + (name,)
            if n is None:
                out[as_path(p)] = DELETED
                touched = True
            elif o is None:
                out[as_path(p)] = ADDED
                touched = True
                if n.is_dir:
                    self._added_below(p, new_src, name, out)
            elif n.layer == 0 or not n.same_as(o):
                self._both(p, n, o, new_src, old_src, out)
        if touched and path and as_path(path) not in out:
            out[as_path(path)] = CHANGED

    def _both(self, p: Parts, n: Entry, o: Entry, new_src: list[Source],
              old_src: list[Source], out: dict[bytes, str]) -> None:
        """A path in both trees whose new entry is the upper's (or another one)."""
        if not (n.is_dir and o.is_dir):
            out[as_path(p)] = CHANGED
            if n.is_dir:
                self._added_below(p, new_src, p[-1], out)
            return
        if dir_meta_changed(n.st, o.st):
            out[as_path(p)] = CHANGED
        cn = self.stack.child_sources(new_src, p[:-1], p[-1])
        co = self.stack.child_sources(old_src, p[:-1], p[-1])
        try:
            self._dir(p, cn, co, out)
        finally:
            close_sources(cn)
            close_sources(co)

    def _added_below(self, p: Parts, parent_src: list[Source], name: bytes,
                     out: dict[bytes, str]) -> None:
        for sub in walk_merged(self.stack, p, self.stack.child_sources(parent_src, p[:-1], name)):
            out[as_path(sub)] = ADDED


def walk_merged(stack: Stack, path: Parts, sources: list[Source]) -> Iterator[Parts]:
    """Every path below a merged directory, parents first; closes sources."""
    try:
        entries = list_merged(sources, stack.fmt)
        for name in sorted(entries):
            p = path + (name,)
            yield p
            if stat.S_ISDIR(entries[name].st.st_mode):
                yield from walk_merged(stack, p, stack.child_sources(sources, path, name))
    finally:
        close_sources(sources)


def diff(upper: str, lowers: list[str]) -> list[Change]:
    with TreeDiff(upper, lowers) as td:
        return td.changes()
