"""The on-disk overlay format: the only place that classifies a layer entry.

The daemon (namei, readdir, dir) and the image tools (merged, changes, commit,
unpack) all read layers through this module, so they cannot disagree.

Kernel form: a character device 0/0 hides a name; `overlay.opaque=y` makes a
directory opaque; a zero-size regular file with `overlay.whiteout` hides a name
(the kernel's xattr whiteouts: readdir takes them only in a directory marked
`overlay.opaque=x`, 6.8+, and not for `overlay.whiteouts` alone; lookup in any);
`overlay.redirect` says where a moved directory (or a metacopy file's data)
lives below; `overlay.metacopy` marks a file whose data is in a lower layer.
OCI/AUFS form (extracted image layers, and rootless uppers): `.wh.NAME` hides
NAME and `.wh..wh..opq` makes its directory opaque; other `.wh..wh.*` names are
metadata, never shown.  cowfs reads both forms in every layer, upper included.

The overlay xattrs live in one namespace per mount (`Format`): trusted.overlay.
by default, user.overlay. with userxattr.  A root daemon must not read
user.overlay.* on a trusted mount: any user can set those on files they own.
"""
from __future__ import annotations

import enum
import errno
import os
import stat
from dataclasses import dataclass

from .layers import lstat_or_none, xattr_path

WH_PREFIX = b".wh."
OPAQUE_MARKER = b".wh..wh..opq"
_META_PREFIX = WH_PREFIX + WH_PREFIX
NAME_MAX = 255
TRUSTED = "trusted.overlay."
USER = "user.overlay."
# Hidden from and refused through the mount, whatever the mount's namespace.
PRIVATE_PREFIXES = (TRUSTED, USER)
# What the kernel takes for "no such xattr here" (ovl_getxattr_value): anything
# else is an error the lookup reports, never silence.
NO_XATTR = frozenset({errno.ENODATA, errno.ENOTSUP, errno.EOPNOTSUPP})

Parts = tuple[bytes, ...]


def is_private_xattr(name: str) -> bool:
    """Overlay-private xattrs are never shown or settable through the mount."""
    return name.startswith(PRIVATE_PREFIXES)


def is_reserved_name(name: bytes) -> bool:
    """Names cowfs reads as whiteouts or markers, so they cannot be created."""
    return name.startswith(WH_PREFIX)


def is_whiteout_stat(st: os.stat_result) -> bool:
    """The kernel's own whiteout: a character device 0/0."""
    return stat.S_ISCHR(st.st_mode) and st.st_rdev == 0


@dataclass(frozen=True)
class Format:
    """How one mount reads and writes the overlay xattrs."""
    prefix: str = TRUSTED

    @classmethod
    def for_mount(cls, userxattr: bool) -> Format:
        return cls(USER if userxattr else TRUSTED)

    def xattr(self, suffix: str) -> str:
        """The full name of overlay.SUFFIX in this mount's namespace."""
        return self.prefix + suffix

    def get(self, fd_or_path: int | bytes, suffix: str) -> bytes | None:
        """overlay.SUFFIX of an entry (an fd, or a path that is never followed)."""
        try:
            return os.getxattr(fd_or_path, self.prefix + suffix,
                               follow_symlinks=isinstance(fd_or_path, int))
        except OSError as e:
            if e.errno in NO_XATTR:
                return None
            raise


def default_format() -> Format:
    """The namespace a mount uses without options: user. when rootless (the
    default of -o userxattr then, see params), trusted. as root."""
    return Format.for_mount(os.geteuid() != 0)


# ---------------------------------------------------------------- entries
class Kind(enum.Enum):
    ENTRY = "entry"        # a name the merged view shows
    WHITEOUT = "whiteout"  # hides `target` in the layers below
    MARKER = "marker"      # format metadata (.wh..wh.*): neither shown nor hiding


@dataclass(frozen=True)
class Classified:
    kind: Kind
    target: bytes          # the name shown (ENTRY) or hidden (WHITEOUT)


@dataclass(frozen=True)
class DirMarks:
    """What a layer directory says about the layers below it."""
    opaque: bool           # overlay.opaque=y or .wh..wh..opq: nothing below shows
    xwhiteouts: bool       # overlay.opaque=x: may hold xattr whiteouts


def dir_marks(fmt: Format, dir_fd: int) -> DirMarks:
    """The marks of an open layer directory."""
    value = fmt.get(dir_fd, "opaque")
    opaque = value == b"y" or lstat_or_none(dir_fd, OPAQUE_MARKER) is not None
    return DirMarks(opaque, value == b"x")


def oci_form(name: bytes) -> Classified | None:
    """What a name is in the OCI form, by the name alone; None for a plain name."""
    if not name.startswith(WH_PREFIX):
        return None
    if name.startswith(_META_PREFIX) or len(name) == len(WH_PREFIX):
        return Classified(Kind.MARKER, name)
    return Classified(Kind.WHITEOUT, name[len(WH_PREFIX):])


def classify(fmt: Format, dir_fd: int, name: bytes, entry: os.DirEntry | os.stat_result,
             marks: DirMarks | None) -> Classified:
    """What the entry `name` of the layer directory dir_fd is, by both forms.
    `entry` is its DirEntry (no stat unless its type needs one) or its lstat.
    With `marks` (dir_fd's), as the kernel's readdir: a zero-size file with
    overlay.whiteout is a whiteout only in an opaque=x directory, which spares a
    stat of every file.  Without, as the kernel's lookup by name: in any
    directory (a listing built with marks leaves out names lookup refuses)."""
    by_name = oci_form(name)
    if by_name is not None:
        return by_name
    if isinstance(entry, os.stat_result):
        st: os.stat_result | None = entry
        is_dir = stat.S_ISDIR(entry.st_mode)
        is_reg = stat.S_ISREG(entry.st_mode)
    else:
        st = None
        is_dir = entry.is_dir(follow_symlinks=False)
        is_reg = entry.is_file(follow_symlinks=False)
        if not is_dir and not is_reg and not entry.is_symlink():
            st = entry.stat(follow_symlinks=False)
    if st is not None and is_whiteout_stat(st):
        return Classified(Kind.WHITEOUT, name)
    if is_reg and (marks is None or marks.xwhiteouts):
        if st is None:
            st = entry.stat(follow_symlinks=False)  # type: ignore[union-attr]
        if st.st_size == 0 and fmt.get(xattr_path(dir_fd, name), "whiteout") is not None:
            return Classified(Kind.WHITEOUT, name)
    return Classified(Kind.ENTRY, name)


def has_oci_whiteout(dir_fd: int, name: bytes) -> bool:
    """Is there a `.wh.NAME` in dir_fd?  (None can exist for a name too long.)"""
    wh = WH_PREFIX + name
    return len(wh) <= NAME_MAX and lstat_or_none(dir_fd, wh) is not None


def whited_out_at(fmt: Format, dir_fd: int, name: bytes, marks: DirMarks | None = None) -> bool:
    """Is `name` hidden by a whiteout in the layer directory dir_fd (any form)?"""
    st = lstat_or_none(dir_fd, name)
    if st is not None:
        return classify(fmt, dir_fd, name, st, marks).kind is Kind.WHITEOUT
    return has_oci_whiteout(dir_fd, name)


# -------------------------------------------------------------- redirects
@dataclass(frozen=True)
class Redirect:
    """A parsed overlay.redirect: an absolute path from the layer root, or a
    new name in the same parent directory."""
    absolute: bool
    parts: Parts

    def resolve(self, parent: Parts) -> Parts:
        """The path below a layer root the redirect names, for a parent at `parent`."""
        return self.parts if self.absolute else parent + self.parts

    def value(self) -> bytes:
        return (b"/" if self.absolute else b"") + b"/".join(self.parts)


def parse_redirect(value: bytes) -> Redirect:
    """A redirect by the kernel's rules (ovl_get_redirect_xattr, then its lookup):
    absolute with no empty component, or relative without '/'; EINVAL if not.
    '.' and '..' are refused (EACCES, as the kernel's lookup_one refuses them):
    no redirect ever leads out of a layer."""
    if not value or b"\0" in value:
        raise OSError(errno.EINVAL, f"invalid redirect {value!r}")
    if value.startswith(b"/"):
        parts = tuple(value[1:].split(b"/"))
        if any(p == b"" for p in parts):
            raise OSError(errno.EINVAL, f"invalid redirect {value!r}")
        absolute = True
    else:
        if b"/" in value:
            raise OSError(errno.EINVAL, f"invalid redirect {value!r}")
        parts, absolute = (value,), False
    if any(p in (b".", b"..") for p in parts):
        raise OSError(errno.EACCES, f"redirect {value!r} leaves its layer")
    return Redirect(absolute, parts)


def read_redirect(fmt: Format, path: bytes) -> Redirect | None:
    """The validated redirect of the entry at an xattr_path, if it has one."""
    value = fmt.get(path, "redirect")
    return None if value is None else parse_redirect(value)


def is_metacopy(fmt: Format, path: bytes) -> bool:
    """Does the entry at an xattr_path hold metadata only (its data is below)?"""
    return fmt.get(path, "metacopy") is not None


def public_xattrs(dir_fd: int, name: bytes) -> dict[str, bytes]:
    """An entry's xattrs that belong to the file, not to the overlay machinery
    (an opaque mark of a lower dir must not make a copy of it hide that dir)."""
    path = xattr_path(dir_fd, name)
    try:
        names = os.listxattr(path, follow_symlinks=False)
    except OSError as e:
        if e.errno in NO_XATTR:
            return {}
        raise
    out = {}
    for n in names:
        if is_private_xattr(n):
            continue
        try:
            out[n] = os.getxattr(path, n, follow_symlinks=False)
        except OSError as e:
            if e.errno not in NO_XATTR:
                raise
    return out
