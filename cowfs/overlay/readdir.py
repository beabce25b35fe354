"""The merged directory listing: upper names first, then lower names not hidden."""
from __future__ import annotations

import os
from typing import TYPE_CHECKING

from .inodes import Node
from .namei import lower_index
from .format import WH_PREFIX, is_whiteout_stat

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
        with os.scandir(ov.table.dir_fd(node, 0)) as it:
            for e in it:
                name = os.fsencode(e.name)
                if name.startswith(WH_PREFIX):
                    hidden.add(name[4:])
                elif not (e.is_dir(follow_symlinks=False) or e.is_file(follow_symlinks=False)
                          or e.is_symlink()) and is_whiteout_stat(e.stat(follow_symlinks=False)):
                    hidden.add(name)
                else:
                    names.append(name)
        if len(node.layers) == 1:
            return names
        hidden.update(names)
    for name, ent in lower_index(ov, node).items():
        if ent is not None and name not in hidden:
            names.append(name)
    return names
