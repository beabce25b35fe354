"""Whiteout and opaque-directory rules, for both forms a layer may carry.

Kernel form: a character device 0/0 hides a name; an xattr `overlay.opaque=y`
(trusted. as root, user. for userxattr mounts) makes a directory opaque; a
zero-size file with `overlay.whiteout` hides a name when its directory carries
`overlay.whiteouts` (or `overlay.opaque=x`).
OCI/AUFS form (extracted image layers): `.wh.NAME` hides NAME and `.wh..wh..opq`
makes its directory opaque.
"""
from __future__ import annotations

import errno
import os
import stat

WH_PREFIX = b".wh."
OPAQUE_MARKER = b".wh..wh..opq"
# overlayfs' own xattr namespaces: trusted. as root, user. with userxattr.
XATTR_NS = ("trusted.overlay.", "user.overlay.")
# Errors that mean "no such xattr here", not a failure.
NO_XATTR = (errno.ENODATA, errno.ENOTSUP, errno.EOPNOTSUPP)


def is_private_xattr(name: str) -> bool:
    """Overlay-private xattrs are never shown or settable through the mount."""
    return name.startswith(XATTR_NS)


def is_whiteout_stat(st: os.stat_result) -> bool:
    return stat.S_ISCHR(st.st_mode) and st.st_rdev == 0



def overlay_xattr(fd_or_path: int | bytes, suffix: str) -> bytes | None:
    """The value of trusted.overlay.SUFFIX or user.overlay.SUFFIX, whichever is set."""
    for ns in XATTR_NS:
        try:
            # An fd is the entry itself; a path is never followed.
            return os.getxattr(fd_or_path, ns + suffix,
                               follow_symlinks=isinstance(fd_or_path, int))
        except OSError as e:
            if e.errno not in NO_XATTR:
                raise
    return None


def dir_opacity(dir_fd: int) -> tuple[bool, bool]:
    """(opaque, has xattr whiteouts) for an open directory, from its xattrs."""
    value = overlay_xattr(dir_fd, "opaque")
    opaque = value == b"y"
    xwhiteouts = value == b"x" or overlay_xattr(dir_fd, "whiteouts") is not None
    return opaque, xwhiteouts


def is_xattr_whiteout(path: bytes) -> bool:
    return overlay_xattr(path, "whiteout") is not None


def private_xattr_name(euid: int, suffix: str) -> str:
    """The xattr cowfs writes in the upper layer: trusted. as root (what the
    kernel reads by default), user. otherwise (what it reads with userxattr)."""
    return ("trusted.overlay." if euid == 0 else "user.overlay.") + suffix
