"""The on-disk overlay format of a layer or upper dir, as the kernel writes it.

Both forms are understood everywhere: kernel form (whiteout = char device 0/0,
opaque = xattr overlay.opaque=y) and OCI form (`.wh.NAME`, `.wh..wh..opq`).
Overlay xattrs are looked up in trusted. first and user. second (userxattr).
"""
from __future__ import annotations

import errno
import os
import stat

from ..overlay.layers import xattr_path

WH_PREFIX = b".wh."
OPAQUE_MARKER = b".wh..wh..opq"
OVERLAY_XATTR_PREFIXES = ("trusted.overlay.", "user.overlay.")
_MISSING = (errno.ENODATA, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EPERM, errno.EACCES)


def is_overlay_xattr(name: str) -> bool:
    return name.startswith(OVERLAY_XATTR_PREFIXES)


def whiteout_target(name: bytes, st: os.stat_result) -> bytes | None:
    """The name an entry hides if it is a whiteout (either form), else None."""
    if stat.S_ISCHR(st.st_mode) and st.st_rdev == 0:
        return name
    if name.startswith(WH_PREFIX) and not name.startswith(WH_PREFIX + WH_PREFIX) \
            and len(name) > len(WH_PREFIX):
        return name[len(WH_PREFIX):]
    return None


def is_hidden_marker(name: bytes) -> bool:
    """OCI/AUFS metadata names (`.wh..wh.*`) that are never shown as entries."""
    return name.startswith(WH_PREFIX + WH_PREFIX)


def overlay_xattr(dir_fd: int, name: bytes, suffix: str) -> bytes | None:
    """trusted.overlay.SUFFIX or user.overlay.SUFFIX of an entry, without following it."""
    path = xattr_path(dir_fd, name)
    for prefix in OVERLAY_XATTR_PREFIXES:
        try:
            return os.getxattr(path, prefix + suffix, follow_symlinks=False)
        except OSError as e:
            if e.errno not in _MISSING:
                raise
    return None


def is_opaque(parent_fd: int, name: bytes, fd: int) -> bool:
    """Is the directory `name` (open as fd) opaque, by xattr or by marker file?"""
    if overlay_xattr(parent_fd, name, "opaque") == b"y":
        return True
    try:
        os.stat(OPAQUE_MARKER, dir_fd=fd, follow_symlinks=False)
        return True
    except FileNotFoundError:
        return False


def redirect(parent_fd: int, name: bytes) -> bytes | None:
    return overlay_xattr(parent_fd, name, "redirect")


def is_metacopy(parent_fd: int, name: bytes) -> bool:
    return overlay_xattr(parent_fd, name, "metacopy") is not None


def user_xattrs(parent_fd: int, name: bytes) -> dict[str, bytes]:
    """An entry's xattrs that belong to the file, not to the overlay machinery."""
    path = xattr_path(parent_fd, name)
    try:
        names = os.listxattr(path, follow_symlinks=False)
    except OSError as e:
        if e.errno in _MISSING:
            return {}
        raise
    out = {}
    for n in names:
        if is_overlay_xattr(n):
            continue
        try:
            out[n] = os.getxattr(path, n, follow_symlinks=False)
        except OSError as e:
            if e.errno not in _MISSING:
                raise
    return out
