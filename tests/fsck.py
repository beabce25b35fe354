"""An fsck-style check of an overlay's core state and its upper dir, for core tests."""
from __future__ import annotations

import os
import stat

from cowfs.overlay.inodes import ROOT_INO
from cowfs.overlay.namei import lookup, lower_entry
from cowfs.overlay import Overlay


def check_invariants(ov: Overlay) -> None:
    assert ov.table.nodes[ROOT_INO] is ov.root
    # work/ holds nothing but the shared whiteout and the orphans of deleted files
    # the kernel still holds, once every operation has finished
    orphans = {n.orphan.decode() for n in ov.table.nodes.values() if n.orphan}
    assert set(os.listdir(ov.work_fd)) <= {"whiteout"} | orphans
    for ino, node in ov.table.nodes.items():
        assert node.ino == ino
        if node.unlinked or node.parent is None:
            continue
        # a live node is what its parent's merged view shows under its name
        again = lookup(ov, node.parent, node.name)
        if again is not node:
            # a hard link's node follows whichever name was looked up last
            assert not node.is_dir and again is not None and again.ino == node.ino, \
                (node, again)
        if node.layer == 0:
            assert os.lstat(node.name, dir_fd=ov.table.dir_fd(node.parent, 0))
        for layer, fd in node.fds.items():
            assert stat.S_ISDIR(os.fstat(fd).st_mode)
            assert layer in node.layers
    if ov.upper is None:
        return
    # whiteouts only where a lower layer has the name; no temp names escaped
    for dirpath, dirnames, filenames in os.walk(ov.upper.path):
        for name in dirnames + filenames:
            assert not name.startswith("#cowfs"), os.path.join(dirpath, name)
            st = os.lstat(os.path.join(dirpath, name))
            if stat.S_ISCHR(st.st_mode) and st.st_rdev == 0:
                rel = os.path.relpath(dirpath, ov.upper.path)
                parent = ov.root
                for comp in ([] if rel == "." else rel.split("/")):
                    parent = lookup(ov, parent, comp.encode())
                    assert parent is not None and parent.is_dir
                assert lower_entry(ov, parent, name.encode()) is not None, \
                    f"needless whiteout {dirpath}/{name}"
