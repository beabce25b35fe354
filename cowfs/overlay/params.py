"""Mount options: the fuse-overlayfs/mount.fuse3 argv, parsed and checked.

Everything here runs before anything is mounted or written: a bad argument is
a `UsageError` whose message is the one line the user sees.
"""
from __future__ import annotations

import os
import re
import shutil
import stat
from dataclasses import dataclass, field


class UsageError(Exception):
    """A bad mount argument; str(e) is a one-line message for stderr."""


# Accepted for compatibility with mount(8), podman and fstab lines.  The ones in
# KERNEL_FLAGS are handed on to the FUSE mount; the rest only need accepting.
KERNEL_FLAGS = {"dev", "nodev", "suid", "nosuid", "exec", "noexec", "atime", "noatime",
                "diratime", "nodiratime", "relatime", "norelatime", "strictatime"}
ACCEPTED = KERNEL_FLAGS | {"rw", "ro", "volatile", "auto", "noauto", "user", "nouser",
                           "users", "nofail", "_netdev", "defaults", "async", "sync", "debug"}
VALUED_IGNORED = ("context", "fscontext", "defcontext", "rootcontext", "timeout",
                  "threaded", "fsync", "plugins", "fast_ino", "x-")
# fuse-overlayfs options that change what cowfs would show: refused, never ignored.
REFUSED = {"squash_to_root", "squash_to_uid", "squash_to_gid", "static_nlink", "noxattrs"}
ON_OFF = {"on": True, "off": False}
# The kernel's redirect_dir modes.  "off" creates no redirects and, as
# redirect_always_follow=Y (the kernel's default) makes it, still follows them.
REDIRECT_MODES = {"on", "follow", "nofollow", "off"}
XINO_MODES = {"on", "off", "auto"}


@dataclass(frozen=True)
class IdRange:
    """One range of fuse-overlayfs' uidmapping=/gidmapping=: the ids FROM..FROM+LEN
    stored in the layers are the ids TO..TO+LEN the kernel sees (as a line of
    /proc/PID/uid_map reads: inside, outside, length)."""
    inside: int
    outside: int
    length: int


def _id_mapping(key: str, value: str | None) -> tuple[IdRange, ...]:
    """'0:1000:1:1:100000:65536' -> two IdRanges; triples separated by ':'."""
    try:
        nums = [int(n) for n in (value or "").split(":")]
    except ValueError:
        nums = []
    if not nums or len(nums) % 3 or min(nums) < 0 or 0 in nums[2::3]:
        raise UsageError(f"bad value for {key}: '{value}' (ID:MAPPED-ID:LEN[:ID:MAPPED-ID:LEN...])")
    return tuple(IdRange(*nums[i:i + 3]) for i in range(0, len(nums), 3))


@dataclass
class MountConfig:
    lowerdirs: list[str]          # top layer first, as overlayfs orders them; data-only last
    upperdir: str | None
    workdir: str | None
    mountpoint: str
    read_only: bool = False
    volatile: bool = False
    kernel_flags: set[str] = field(default_factory=set)
    debug: bool = False
    data_layers: int = 0          # how many of lowerdirs are data-only (after '::')
    # cowfs defaults differ from this kernel module's on purpose (see README):
    # metacopy and redirect_dir on; userxattr is the rootless default.
    metacopy: bool = True         # chmod/chown/xattr of a lower file copy metadata only
    redirect_dir: str = "on"      # on | follow | nofollow (off is stored as follow)
    userxattr: bool = False       # overlay xattrs in user.overlay., not trusted.overlay.
    index: bool = False
    xino: str = "auto"
    fsname: str = "cowfs"         # the source /proc/mounts shows
    passthrough: bool = True      # the kernel reads and writes real files itself (root)
    acl: bool = True              # POSIX ACLs enforced by the kernel, kept on copy-up
    log_file: str | None = None
    # fuse-overlayfs' dynamic id mapping; parsed and checked, not applied yet
    # (podman already id-maps the lowers it passes them with, see README)
    uidmapping: tuple[IdRange, ...] = ()
    gidmapping: tuple[IdRange, ...] = ()

    @property
    def layer_paths(self) -> list[str]:
        """All layer roots, upper first: the order lookups descend."""
        return ([self.upperdir] if self.upperdir else []) + self.lowerdirs

    @property
    def follow_redirects(self) -> bool:
        return self.redirect_dir != "nofollow"


def _split_escaped(text: str, sep: str) -> list[str]:
    """Split at sep except where it is escaped with a backslash (the kernel's and
    fuse-overlayfs' `\\,` and `\\:`); the escapes of sep stay for the next split."""
    out, cur, i = [], [], 0
    while i < len(text):
        ch = text[i]
        if ch == "\\" and i + 1 < len(text):
            cur.append(text[i:i + 2])
            i += 2
            continue
        if ch == sep:
            out.append("".join(cur))
            cur = []
        else:
            cur.append(ch)
        i += 1
    out.append("".join(cur))
    return out


def _unescape(text: str) -> str:
    return re.sub(r"\\(.)", r"\1", text)


def split_options(opts: list[str]) -> dict[str, str | None]:
    """Merge repeated -o values; empty elements are tolerated.  A layer path may
    hold an escaped comma (`\\,`); a second lowerdir= is an error, as in the kernel."""
    out: dict[str, str | None] = {}
    for group in opts:
        for item in _split_escaped(group, ","):
            if not item:
                continue
            key, eq, value = item.partition("=")
            if key in out and key in ("lowerdir", "upperdir", "workdir"):
                raise UsageError(f"{key}= given twice")
            out[key] = value if eq else None
    return out


def _on_off(key: str, value: str | None) -> bool:
    if value not in ON_OFF:
        raise UsageError(f"bad value for {key}: '{value}' (on or off)")
    return ON_OFF[value]


def _lower_layers(lower: str) -> tuple[list[str], int]:
    """lowerdir=l1:l2::d1::d2 -> ([l1, l2, d1, d2], 2): '::' starts data-only layers."""
    parts = _split_escaped(lower, ":")
    layers: list[str] = []
    data = 0
    i = 0
    while i < len(parts):
        p = parts[i]
        if p == "" and layers and i + 1 < len(parts) and parts[i + 1] != "":
            data += 1           # '::' before a data-only layer
            layers.append(parts[i + 1])
            i += 2
            continue
        if p == "":
            raise UsageError(f"empty path in lowerdir='{lower}'")
        if data:
            raise UsageError(f"a regular layer after data-only ones in lowerdir='{lower}'")
        layers.append(p)
        i += 1
    return [_unescape(p) for p in layers], data


def parse_mount_options(opts: list[str], mountpoint: str) -> MountConfig:
    """Build a MountConfig from -o groups; relative paths resolve against the cwd."""
    raw = split_options(opts)
    lower = raw.pop("lowerdir", None)
    upper = raw.pop("upperdir", None)
    work = raw.pop("workdir", None)
    cfg = MountConfig(lowerdirs=[], upperdir=None, workdir=None,
                      mountpoint=os.path.abspath(mountpoint))
    given: set[str] = set()
    for key, value in raw.items():
        item = key if value is None else f"{key}={value}"
        if key == "ro":
            cfg.read_only = True
        elif key == "volatile":
            cfg.volatile = True
        elif key == "debug":
            cfg.debug = True
        elif key == "metacopy":
            cfg.metacopy = _on_off(key, value)
        elif key == "passthrough":
            cfg.passthrough = _on_off(key, value)
        elif key in ("acl", "noacl") and value is None:
            cfg.acl = key == "acl"
        elif key == "index":
            cfg.index = _on_off(key, value)
        elif key == "redirect_dir":
            if value not in REDIRECT_MODES:
                raise UsageError(f"bad value for redirect_dir: '{value}' "
                                 "(on, follow, nofollow or off)")
            cfg.redirect_dir = "follow" if value == "off" else value
        elif key == "xino":
            if value not in XINO_MODES:
                raise UsageError(f"bad value for xino: '{value}' (on, off or auto)")
            cfg.xino = value
        elif key == "userxattr" and value is None:
            cfg.userxattr = True
        elif key == "uidmapping":
            cfg.uidmapping = _id_mapping(key, value)
        elif key == "gidmapping":
            cfg.gidmapping = _id_mapping(key, value)
        elif key == "fsname" and value:
            cfg.fsname = _unescape(value)
        elif key in REFUSED:
            raise UsageError(f"mount option '{item}' is not supported by cowfs")
        elif key in KERNEL_FLAGS:
            cfg.kernel_flags.add(key)
        elif item in ACCEPTED or key.startswith(VALUED_IGNORED):
            pass
        else:
            raise UsageError(f"unknown mount option '{item}'")
        given.add(key)
    if not lower:
        raise UsageError("missing lowerdir= (need at least one lower layer)")
    layers, cfg.data_layers = _lower_layers(lower)
    cfg.lowerdirs = [os.path.abspath(p) for p in layers]
    if (upper is None) != (work is None):
        raise UsageError("upperdir= and workdir= must be given together")
    if upper is not None:
        cfg.upperdir = os.path.abspath(_unescape(upper))
        cfg.workdir = os.path.abspath(_unescape(work or ""))
    if os.geteuid() != 0 and "userxattr" not in given:
        cfg.userxattr = True    # a rootless daemon cannot read trusted.* at all
    _resolve(cfg, "metacopy" in given, "redirect_dir" in given)
    return cfg


def _resolve(cfg: MountConfig, set_metacopy: bool, set_redirect: bool) -> None:
    """The kernel's cross-checks (ovl_fs_params_verify): metacopy needs
    redirect_dir=on, data-only layers need metacopy, userxattr turns redirects
    and metacopy off; a contradiction given explicitly is an error."""
    if cfg.upperdir is None:
        cfg.index = False         # nothing to index without an upper layer
        if cfg.redirect_dir == "follow":
            cfg.redirect_dir = "on"   # the same for a mount that writes nothing
    if cfg.metacopy and cfg.redirect_dir != "on":
        if set_metacopy and set_redirect:
            raise UsageError(f"conflicting options: metacopy=on,redirect_dir={cfg.redirect_dir}")
        if set_redirect:
            cfg.metacopy = False
        else:
            cfg.redirect_dir = "on"
    if cfg.userxattr:
        if set_redirect and cfg.redirect_dir != "nofollow":
            raise UsageError(f"conflicting options: userxattr,redirect_dir={cfg.redirect_dir}")
        if set_metacopy and cfg.metacopy:
            raise UsageError("conflicting options: userxattr,metacopy=on")
        cfg.redirect_dir, cfg.metacopy = "nofollow", False
    if cfg.data_layers and not cfg.metacopy:
        raise UsageError("data-only lower layers (lowerdir=...::DIR) need metacopy=on")


def _is_dir(path: str, what: str) -> os.stat_result:
    try:
        st = os.stat(path)
    except FileNotFoundError:
        raise UsageError(f"{what} '{path}' does not exist") from None
    except OSError as e:
        raise UsageError(f"{what} '{path}': {e.strerror}") from None
    if not stat.S_ISDIR(st.st_mode):
        raise UsageError(f"{what} '{path}' is not a directory")
    return st


def _inside(child: str, parent: str) -> bool:
    child, parent = os.path.realpath(child), os.path.realpath(parent)
    return child == parent or child.startswith(parent.rstrip("/") + "/")


def is_mounted(path: str) -> bool:
    real = os.path.realpath(path)
    with open("/proc/self/mountinfo", "rb") as f:
        for line in f:
            mnt = line.split(b" ")[4].decode("unicode_escape", "surrogateescape")
            if mnt == real:
                return True
    return False


def _refuse_mountpoint_in_layer(cfg: MountConfig) -> None:
    """A mountpoint strictly inside a layer (or the workdir) would be served by
    this very daemon: its first lookup there waits on itself.  (The kernel sees
    the covered directory; a path from user space cannot.)  The mountpoint may
    be a layer root itself: layer roots are opened before the mount covers them."""
    for what, path in [("upperdir", cfg.upperdir), ("workdir", cfg.workdir)] + \
            [("lowerdir", p) for p in cfg.lowerdirs]:
        if path and _inside(cfg.mountpoint, path) \
                and os.path.realpath(cfg.mountpoint) != os.path.realpath(path):
            raise UsageError(f"mountpoint '{cfg.mountpoint}' is inside {what} '{path}'")


def validate(cfg: MountConfig) -> None:
    """Check every layer, the workdir and the mountpoint; raise UsageError."""
    # The kernel refuses a layer that is in the stack twice (ELOOP).
    seen: dict[tuple[int, int], str] = {}
    roles = [("lowerdir", p) for p in cfg.lowerdirs]
    for role, p in roles + ([("upperdir", cfg.upperdir)] if cfg.upperdir else []):
        st = _is_dir(p, role)
        key = (st.st_dev, st.st_ino)
        if key in seen:
            raise UsageError(f"{role} '{p}' is in the layer stack twice (also {seen[key]})")
        seen[key] = f"{role} '{p}'"
    if cfg.upperdir and cfg.workdir:
        ust = _is_dir(cfg.upperdir, "upperdir")
        wst = _is_dir(cfg.workdir, "workdir")
        if ust.st_dev != wst.st_dev:
            raise UsageError(f"workdir '{cfg.workdir}' is not on the same filesystem "
                             f"as upperdir '{cfg.upperdir}'")
        if _inside(cfg.workdir, cfg.upperdir) or _inside(cfg.upperdir, cfg.workdir):
            raise UsageError("workdir and upperdir must not be inside one another")
        if not os.access(cfg.upperdir, os.W_OK) or not os.access(cfg.workdir, os.W_OK):
            raise UsageError("upperdir and workdir must be writable")
    _is_dir(cfg.mountpoint, "mountpoint")
    _refuse_mountpoint_in_layer(cfg)
    if is_mounted(cfg.mountpoint):
        raise UsageError(f"mountpoint '{cfg.mountpoint}' is already mounted")
    _check_fuse_access()


def _check_fuse_access() -> None:
    """Root opens /dev/fuse itself; a user goes through the setuid fusermount3."""
    if not os.path.exists("/dev/fuse"):
        raise UsageError("/dev/fuse does not exist (is the fuse module loaded?)")
    if os.geteuid() != 0 and not os.access("/dev/fuse", os.R_OK | os.W_OK) \
            and shutil.which("fusermount3") is None:
        raise UsageError("no access to /dev/fuse and no fusermount3 (Debian package fuse3)")
