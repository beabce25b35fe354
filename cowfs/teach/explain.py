"""`cowfs explain`: which layer serves a path, which layers have it, what hides them.

The answer comes from the layers themselves, by the same merge the image
commands use (image.merged.Stack) and the same entry rules (overlay.format):
which layer serves the path is Stack.lookup's answer; for every other layer
that has the path, the cause is the first entry above it, along the path, that
cuts it off (a whiteout, a non-directory, an opaque directory, a redirect).
On a live mount the layers are the mount's own (its upper included).
"""
from __future__ import annotations

import os
import stat
from dataclasses import asdict, dataclass, field

from ..image.merged import Parts, Source, Stack, close_sources
from ..overlay.format import (WH_PREFIX, dir_marks, is_metacopy, is_whiteout_stat,
                              read_redirect)
from ..overlay.layers import lstat_or_none, walk_dirs, xattr_path

SERVES, MERGED, HIDES, HIDDEN, ABSENT = "serves", "merged", "hides", "hidden", "absent"


@dataclass
class LayerView:
    label: str        # "upper", "lower 1" (the top lower), ...
    name: str         # for people: the layer dir's name, or the store layer's id
    root: str
    kind: str         # file, dir, symlink, ..., whiteout, or "" where absent
    role: str         # serves, merged, hides (a whiteout), hidden, absent
    why: str = ""     # for hidden: what hides it; for merged via redirect: from where
    at: str = ""      # where in this layer (differs from the path through a redirect)


@dataclass
class Explanation:
    path: str
    visible: bool
    kind: str                       # of the entry the merged view shows
    served_by: str                  # a layer label, or ""
    layers: list[LayerView] = field(default_factory=list)
    copied_up: bool = False         # upper entry over a lower one
    copied_from: str = ""
    new_in_upper: bool = False      # upper entry with nothing below
    metadata_only: bool = False     # metacopy: the data is still below
    redirect: str = ""              # upper dir moved: where its lower contents are
    data_from: str = ""

    def to_json(self) -> dict:
        return asdict(self)


def kind_of(st: os.stat_result) -> str:
    m = st.st_mode
    for test, name in ((stat.S_ISREG, "file"), (stat.S_ISDIR, "dir"), (stat.S_ISLNK, "symlink"),
                       (stat.S_ISCHR, "char device"), (stat.S_ISBLK, "block device"),
                       (stat.S_ISFIFO, "fifo"), (stat.S_ISSOCK, "socket")):
        if test(m):
            return name
    return "?"


def layer_labels(n: int, has_upper: bool) -> list[str]:
    return ["upper" if has_upper and i == 0 else f"lower {i + (0 if has_upper else 1)}"
            for i in range(n)]


def split_path(path: str) -> Parts:
    return tuple(os.fsencode(p) for p in path.split("/") if p not in ("", "."))


def _show(parts: Parts) -> str:
    return "/" + "/".join(os.fsdecode(p) for p in parts)


def _literal(root_fd: int, parts: Parts) -> tuple[os.stat_result | None, bool, int | None]:
    """(stat of the entry at parts in this one layer, is it whited out here by a
    .wh. file, and the fd of its parent dir), all without following symlinks."""
    if not parts:
        return os.fstat(root_fd), False, None
    fd = walk_dirs(root_fd, parts[:-1])
    if fd is None:
        return None, False, None
    st = lstat_or_none(fd, parts[-1])
    oci_wh = st is None and lstat_or_none(fd, WH_PREFIX + parts[-1]) is not None
    return st, oci_wh, fd


def _same_entry(a: os.stat_result, b: os.stat_result | None) -> bool:
    return b is not None and (a.st_dev, a.st_ino) == (b.st_dev, b.st_ino)


def _same(fd: int, st: os.stat_result | None) -> bool:
    f = os.fstat(fd)
    return st is not None and (f.st_dev, f.st_ino) == (st.st_dev, st.st_ino)


class Explainer:
    def __init__(self, roots: list[str], has_upper: bool, names: list[str] | None = None) -> None:
        self.stack = Stack(roots)
        self.roots = roots
        self.has_upper = has_upper
        self.labels = layer_labels(len(roots), has_upper)
        self.names = names or [os.path.basename(os.path.normpath(r)) for r in roots]

    def close(self) -> None:
        self.stack.close()

    def __enter__(self) -> Explainer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _dir_stat(self, layer: int, parts: Parts) -> os.stat_result | None:
        st, _, pfd = _literal(self.stack.fds[layer], parts)
        if pfd is not None:
            os.close(pfd)
        return st if st is not None and stat.S_ISDIR(st.st_mode) else None

    def _in_sources(self, sources: list[Source], layer: int, parts: Parts) -> Source | None:
        """The source of `layer` if it is that layer's own directory at parts."""
        lit = self._dir_stat(layer, parts)
        return next((s for s in sources if s.layer == layer and _same(s.fd, lit)), None)

    def _cause(self, sources: list[Source], layer: int, parts: Parts, k: int,
               own_is_dir: bool) -> str:
        """What, above `layer` among the parent's sources, cuts off component k-1."""
        name, where = parts[k - 1], _show(parts[:k])
        for src in sources:
            if src.layer >= layer:
                break
            by = self.labels[src.layer]
            st = lstat_or_none(src.fd, name)
            if st is None:
                if lstat_or_none(src.fd, WH_PREFIX + name) is not None:
                    return f"whiteout {where} in {by} (.wh. file)"
                continue
            if is_whiteout_stat(st):
                return f"whiteout {where} in {by}"
            if not stat.S_ISDIR(st.st_mode):
                return f"covered by {by}'s {kind_of(st)} {where}"
            fd = os.open(name, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC,
                         dir_fd=src.fd)
            try:
                if dir_marks(self.stack.fmt, fd).opaque:
                    return f"opaque directory {where} in {by}"
            finally:
                os.close(fd)
            value = self._redirect(src.fd, name)
            if value is not None:
                return f"redirect: {by}'s {where} continues at {os.fsdecode(value)}"
            if k == len(parts) and not own_is_dir:
                return f"covered by {by}'s dir {where}"
        return "not reached by the merge"

    def _why_hidden(self, layer: int, parts: Parts, own_is_dir: bool) -> str:
        for k in range(1, len(parts) + 1):
            sources = self.stack.dir_sources(parts[:k - 1])
            try:
                if self._in_sources(sources, layer, parts[:k - 1]) is None:
                    return "not reached by the merge"
                last = k == len(parts)
                if not last:
                    child = self.stack.dir_sources(parts[:k])
                    try:
                        if self._in_sources(child, layer, parts[:k]) is not None:
                            continue
                    finally:
                        close_sources(child)
                return self._cause(sources, layer, parts, k, own_is_dir)
            finally:
                close_sources(sources)
        return "not reached by the merge"

    def explain(self, path: str) -> Explanation:
        parts = split_path(path)
        shown = _show(parts)
        n = len(self.roots)
        served: int | None = 0 if not parts else None   # the root: the top layer's
        served_fd = -1
        kind = "dir"
        hit = None
        if parts:
            hit = self.stack.lookup(parts)
            if hit is not None:
                served, served_fd, kind = hit[0].layer, hit[0].dir_fd, kind_of(hit[0].st)
        ex = Explanation(shown, served is not None, kind if served is not None else "",
                         self.labels[served] if served is not None else "")
        merged: dict[int, str] = {}
        if ex.kind == "dir":
            sources = self.stack.dir_sources(parts)
            try:
                for s in sources:
                    merged[s.layer] = self._where(s)
            finally:
                close_sources(sources)
        for i in range(n):
            st, oci_wh, pfd = _literal(self.stack.fds[i], parts)
            if pfd is not None:
                os.close(pfd)
            view = LayerView(self.labels[i], self.names[i], self.roots[i], "", ABSENT)
            if st is not None:
                view.kind = "whiteout" if parts and is_whiteout_stat(st) else kind_of(st)
                view.at = shown
            elif oci_wh:
                view.kind, view.at = "whiteout", shown
            if served == i:
                view.role = SERVES
                if hit is not None and not _same_entry(hit[0].st, st):
                    at = self._where_fd(hit[0].dir_fd, i) + "/" + os.fsdecode(parts[-1])
                    view.kind, view.at = kind, at.replace("//", "/")
                    view.why = f"through the redirect, from {view.at}"
            elif i in merged:
                view.role, view.at, view.kind = MERGED, merged[i], "dir"
                if merged[i] != shown:
                    view.why = f"through the redirect, from {merged[i]}"
            elif view.kind == "whiteout":
                view.role, view.why = HIDES, "the name, for the layers below"
            elif view.kind:
                view.role = HIDDEN
                view.why = self._why_hidden(i, parts, view.kind == "dir")
            ex.layers.append(view)
        if parts and self.has_upper and served == 0:
            self._upper_history(ex, parts, served_fd)
        if hit is not None:
            close_sources(hit[1])
        return ex

    def _redirect(self, dir_fd: int, name: bytes) -> bytes | None:
        """The redirect value of dir_fd/name; an invalid one is shown as it is."""
        path = xattr_path(dir_fd, name)
        try:
            r = read_redirect(self.stack.fmt, path)
        except OSError:
            return self.stack.fmt.get(path, "redirect")
        return None if r is None else r.value()

    def _where(self, src: Source) -> str:
        return self._where_fd(src.fd, src.layer)

    def _where_fd(self, fd: int, layer: int) -> str:
        """An open dir's path inside its own layer."""
        real = os.readlink(f"/proc/self/fd/{fd}")
        root = os.readlink(f"/proc/self/fd/{self.stack.fds[layer]}")
        return "/" + os.path.relpath(real, root).removeprefix(".")

    def _upper_history(self, ex: Explanation, parts: Parts, dir_fd: int) -> None:
        value = self._redirect(dir_fd, parts[-1]) if ex.kind == "dir" else None
        if value is not None:
            ex.redirect = os.fsdecode(value)
            return
        below = self.stack.lookup(parts, first=1)
        if below is None:
            ex.new_in_upper = True
        else:
            close_sources(below[1])
            ex.copied_up = True
            ex.copied_from = self.labels[below[0].layer]
        if ex.kind == "file" and is_metacopy(self.stack.fmt, xattr_path(dir_fd, parts[-1])):
            ex.metadata_only = True
            ex.data_from = ex.copied_from


def render(ex: Explanation) -> list[str]:
    """The explanation as text lines for people."""
    if ex.visible:
        lines = [f"{ex.path}: {ex.kind}, served by {ex.served_by}"]
    else:
        lines = [f"{ex.path}: not in the merged view"]
    width = max(len(f"{v.label} ({v.name[:16]})") for v in ex.layers)
    for v in ex.layers:
        what = v.kind or "-"
        detail = v.role if v.role != ABSENT else ""
        if v.why:
            detail += f": {v.why}"
        lines.append(f"  {v.label + ' (' + v.name[:16] + ')':<{width}}  {what:<9} {detail}".rstrip())
    if ex.metadata_only:
        lines.append(f"  metadata-only copy-up: the upper holds its metadata, "
                     f"the data is still read from {ex.data_from}")
    elif ex.redirect:
        lines.append(f"  moved here (redirect): its lower contents are at {ex.redirect}")
    elif ex.copied_up:
        lines.append(f"  copied up (or replaced): the upper's own copy covers {ex.copied_from}")
    elif ex.new_in_upper:
        lines.append("  new in the upper: no lower layer has it")
    return lines
