"""The merged directory listing: upper names first, then lower names not hidden."""
from __future__ import annotations

import os
from typing import TYPE_CHECKING

from .format import Kind, classify, dir_marks
from .inodes import Node
from .namei import lower_index

if TYPE_CHECKING:
    from .super import Overlay


def merged_names(ov: Overlay, node: Node) -> list[bytes]:
    """Every visible name of a merged directory, each once, markers hidden.
    Cached until the directory changes (see copyup.ensure_upper_dir)."""
    if node.listing is None:
        node.listing = _merge(ov, node)
    return node.listing


def _merge(ov: Overlay, node: Node) -> list[bytes]:
    names: list[bytes] = []
    hidden: set[bytes] = set()
    if node.layer == 0:
        fd = ov.table.dir_fd(node, 0)
        marks = dir_marks(ov.fmt, fd)
        with os.scandir(fd) as it:
            for e in it:
                c = classify(ov.fmt, fd, os.fsencode(e.name), e, marks)
                if c.kind is Kind.WHITEOUT:
                    hidden.add(c.target)
                elif c.kind is Kind.ENTRY:
                    names.append(c.target)
        if len(node.layers) == 1:
            return names
        hidden.update(names)
    for name, ent in lower_index(ov, node).items():
        if ent is not None and name not in hidden:
            names.append(name)
    return names
