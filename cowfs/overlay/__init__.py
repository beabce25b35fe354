"""The overlay core: layers, lookup, copy-up, whiteouts, directory and file
operations, as overlayfs splits them (namei, copy_up, dir, readdir, inode, file,
xattrs, params, super).  It knows nothing of FUSE; cowfs.fuse knows nothing of it.
"""
from .super import Overlay

__all__ = ["Overlay"]
