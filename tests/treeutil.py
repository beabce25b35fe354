"""Snapshots of a tree as a program sees it, for comparing mounts and upper dirs."""
from __future__ import annotations

import hashlib
import os
import stat
from pathlib import Path


def entry(path: Path, with_nlink: bool = True) -> tuple:
    st = os.lstat(path)
    kind = stat.S_IFMT(st.st_mode)
    if stat.S_ISREG(st.st_mode):
        extra: object = hashlib.sha256(path.read_bytes()).hexdigest()[:16]
    elif stat.S_ISLNK(st.st_mode):
        extra = os.readlink(path)
    elif stat.S_ISCHR(st.st_mode) or stat.S_ISBLK(st.st_mode):
        extra = (os.major(st.st_rdev), os.minor(st.st_rdev))
    else:
        extra = None
    try:
        names = sorted(n for n in os.listxattr(path, follow_symlinks=False)
                       if n.startswith("user."))
        xattrs = tuple((n, os.getxattr(path, n, follow_symlinks=False)) for n in names)
    except OSError:
        xattrs = ()
    size = st.st_size if not stat.S_ISDIR(st.st_mode) else None
    nlink = st.st_nlink if with_nlink and not stat.S_ISDIR(st.st_mode) else None
    return (kind, stat.S_IMODE(st.st_mode), st.st_uid, st.st_gid, size, nlink, extra, xattrs)


def snapshot(root: Path, with_nlink: bool = True) -> dict[str, tuple]:
    """path -> (type, mode, uid, gid, size, nlink, content/target/rdev, user xattrs)."""
    out: dict[str, tuple] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            p = Path(dirpath) / name
            out[str(p.relative_to(root))] = entry(p, with_nlink)
    return out


def upper_snapshot(root: Path) -> dict[str, tuple]:
    """An upper dir as overlayfs reads it: entries, whiteouts, overlay marks."""
    out: dict[str, tuple] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            p = Path(dirpath) / name
            st = os.lstat(p)
            marks = []
            # Only directories' marks: the kernel's metacopy also redirects renamed
            # files, where cowfs copies the data up instead.
            for attr in ("opaque", "redirect") if stat.S_ISDIR(st.st_mode) else ():
                try:
                    marks.append((attr, os.getxattr(p, "trusted.overlay." + attr,
                                                    follow_symlinks=False)))
                except OSError:
                    pass
            whiteout = stat.S_ISCHR(st.st_mode) and st.st_rdev == 0
            kind = "whiteout" if whiteout else stat.S_IFMT(st.st_mode)
            out[str(p.relative_to(root))] = (kind, tuple(marks))
    return out
