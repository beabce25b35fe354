"""Mount options: the fuse-overlayfs/mount.fuse3 argv, parsed and checked.

Everything here runs before anything is mounted or written: a bad argument is
a `UsageError` whose message is the one line the user sees.
"""
from __future__ import annotations

import os
import stat
from dataclasses import dataclass, field


class UsageError(Exception):
    """A bad mount argument; str(e) is a one-line message for stderr."""


# Accepted for compatibility with mount(8), podman and fstab lines.  The ones in
# KERNEL_FLAGS are handed on to the FUSE mount; the rest only need accepting.
KERNEL_FLAGS = {"dev", "nodev", "suid", "nosuid", "exec", "noexec", "atime", "noatime",
                "diratime", "nodiratime", "relatime", "norelatime", "strictatime"}
ACCEPTED = KERNEL_FLAGS | {"rw", "ro", "volatile", "auto", "noauto", "user", "nouser",
                           "users", "nofail", "_netdev", "defaults", "async", "sync",
                           "userxattr", "xino=off", "xino=auto", "xino=on",
                           "squash_to_root", "squash_to_uid", "squash_to_gid", "debug"}
VALUED_IGNORED = ("context", "fscontext", "defcontext", "rootcontext", "uidmapping",
                  "gidmapping", "timeout", "threaded", "fsync", "plugins",
                  "fast_ino", "x-")


@dataclass
class MountConfig:
    lowerdirs: list[str]          # top layer first, as overlayfs orders them
    upperdir: str | None
    workdir: str | None
    mountpoint: str
    read_only: bool = False
    volatile: bool = False
    kernel_flags: set[str] = field(default_factory=set)
    debug: bool = False
    metacopy: bool = True       # chmod/chown/xattr of a lower file copy metadata only
    redirect_dir: bool = True   # renaming a lower directory records a redirect
    passthrough: bool = True    # the kernel reads and writes real files itself (root)
    acl: bool = True            # POSIX ACLs enforced by the kernel, kept on copy-up
    index: bool = False         # index=on: lower hard links kept linked (not supported yet)
    fsname: str = "cowfs"       # the source /proc/mounts shows
    log_file: str | None = None

    @property
    def layer_paths(self) -> list[str]:
        """All layer roots, upper first: the order lookups descend."""
        return ([self.upperdir] if self.upperdir else []) + self.lowerdirs


def split_options(opts: list[str]) -> dict[str, str | None]:
    """Merge repeated -o values; empty elements are tolerated."""
    out: dict[str, str | None] = {}
    for group in opts:
        for item in group.split(","):
            if not item:
                continue
            key, eq, value = item.partition("=")
            out[key] = value if eq else None
    return out


def parse_mount_options(opts: list[str], mountpoint: str) -> MountConfig:
    """Build a MountConfig from -o groups; relative paths resolve against the cwd."""
    raw = split_options(opts)
    lower = raw.pop("lowerdir", None)
    upper = raw.pop("upperdir", None)
    work = raw.pop("workdir", None)
    cfg = MountConfig(lowerdirs=[], upperdir=None, workdir=None,
                      mountpoint=os.path.abspath(mountpoint))
    for key, value in raw.items():
        item = key if value is None else f"{key}={value}"
        if key == "ro":
            cfg.read_only = True
        elif key == "volatile":
            cfg.volatile = True
        elif key == "debug":
            cfg.debug = True
        elif item in ("metacopy=on", "metacopy=off"):
            cfg.metacopy = value == "on"
        elif item in ("redirect_dir=on", "redirect_dir=off", "redirect_dir=follow"):
            cfg.redirect_dir = value == "on"
        elif item in ("index=on", "index=off"):
            cfg.index = value == "on"
        elif item in ("passthrough=on", "passthrough=off"):
            cfg.passthrough = value == "on"
        elif key in ("acl", "noacl"):
            cfg.acl = key == "acl"
        elif key == "fsname" and value:
            cfg.fsname = value
        elif key in KERNEL_FLAGS:
            cfg.kernel_flags.add(key)
        elif item in ACCEPTED or key in ACCEPTED or key.startswith(VALUED_IGNORED):
            pass
        else:
            raise UsageError(f"unknown mount option '{item}'")
    if not lower:
        raise UsageError("missing lowerdir= (need at least one lower layer)")
    # overlayfs escapes ':' in a path as '\:'; honour that.
    parts = [p.replace("\0", ":") for p in lower.replace("\\:", "\0").split(":")]
    if any(p == "" for p in parts):
        raise UsageError(f"empty path in lowerdir='{lower}'")
    cfg.lowerdirs = [os.path.abspath(p) for p in parts]
    if (upper is None) != (work is None):
        raise UsageError("upperdir= and workdir= must be given together")
    if upper is not None:
        cfg.upperdir, cfg.workdir = os.path.abspath(upper), os.path.abspath(work or "")
    return cfg


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
    for p in cfg.lowerdirs:
        _is_dir(p, "lowerdir")
    if cfg.upperdir and cfg.workdir:
        ust = _is_dir(cfg.upperdir, "upperdir")
        wst = _is_dir(cfg.workdir, "workdir")
        if ust.st_dev != wst.st_dev:
            raise UsageError(f"workdir '{cfg.workdir}' is not on the same filesystem "
                             f"as upperdir '{cfg.upperdir}'")
        if _inside(cfg.workdir, cfg.upperdir) or _inside(cfg.upperdir, cfg.workdir):
            raise UsageError("workdir and upperdir must not be inside one another")
        for p in cfg.lowerdirs:
            if os.path.realpath(p) == os.path.realpath(cfg.upperdir):
                raise UsageError(f"upperdir '{cfg.upperdir}' is also a lowerdir")
        if not os.access(cfg.upperdir, os.W_OK) or not os.access(cfg.workdir, os.W_OK):
            raise UsageError("upperdir and workdir must be writable")
    _is_dir(cfg.mountpoint, "mountpoint")
    _refuse_mountpoint_in_layer(cfg)
    if is_mounted(cfg.mountpoint):
        raise UsageError(f"mountpoint '{cfg.mountpoint}' is already mounted")
    if not os.access("/dev/fuse", os.R_OK | os.W_OK):
        raise UsageError("no access to /dev/fuse (is the fuse module loaded? "
                         "are you allowed to use it?)")
