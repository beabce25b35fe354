"""Extended attributes through the overlay; overlay-private ones stay hidden."""
from __future__ import annotations

import errno
import os
from typing import TYPE_CHECKING

from .copy_up import copy_up
from .inode import upper_ref
from .inodes import Node
from .layers import xattr_path
from .format import is_private_xattr

if TYPE_CHECKING:
    from .super import Overlay


def _path(ov: Overlay, node: Node) -> bytes:
    """The xattr path of the entry that holds node's metadata now."""
    if node.layer == 0:
        return xattr_path(*upper_ref(ov, node))
    if node.parent is None:
        return b"/proc/self/fd/%d" % ov.layers[node.layer].fd  # type: ignore[union-attr]
    return xattr_path(ov.table.dir_fd(node.parent, node.layer), node.name)


def _refuse_private(name: str) -> None:
    if is_private_xattr(name):
        raise OSError(errno.EPERM, "overlay-private xattr")


CAPS = "security.capability"


def getxattr(ov: Overlay, node: Node, name: str) -> bytes:
    if is_private_xattr(name) or (node.no_caps and name == CAPS):
        raise OSError(errno.ENODATA, "no such xattr")
    try:
        return os.getxattr(_path(ov, node), name, follow_symlinks=False)
    except OSError as e:
        # The kernel checks security.capability before every write(2); only this
        # mount changes xattrs, so remember its absence until setxattr.
        if e.errno == errno.ENODATA and name == CAPS:
            node.no_caps = True
        raise


def listxattr(ov: Overlay, node: Node, uid: int = 0) -> list[str]:
    """The names a caller may see: trusted.* only for root (as the kernel)."""
    names = [n for n in os.listxattr(_path(ov, node), follow_symlinks=False)
             if not is_private_xattr(n)]
    if uid != 0:
        names = [n for n in names if not n.startswith("trusted.")]
    return names


def setxattr(ov: Overlay, node: Node, name: str, value: bytes, flags: int = 0) -> None:
    ov.check_writable()
    _refuse_private(name)
    # As overlayfs: copy up first, even when XATTR_REPLACE then finds nothing.
    copy_up(ov, node, data=False)
    os.setxattr(_path(ov, node), name, value, flags, follow_symlinks=False)
    node.no_caps = False


def removexattr(ov: Overlay, node: Node, name: str) -> None:
    ov.check_writable()
    _refuse_private(name)
    # Nothing to copy up for an xattr that is not there.
    getxattr(ov, node, name)
    copy_up(ov, node, data=False)
    os.removexattr(_path(ov, node), name, follow_symlinks=False)
