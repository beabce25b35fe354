"""Where a live mount records its layers (so `cowfs diff MNT` can find its upper
dir) and its control socket (so `cowfs trace MNT` can find the daemon)."""
from __future__ import annotations

import hashlib
import json
import os

from .overlay.params import MountConfig

RUN_DIR = "/run/cowfs" if os.geteuid() == 0 else os.path.join(
    os.environ.get("XDG_RUNTIME_DIR", f"/tmp/cowfs-{os.getuid()}"), "cowfs")
STATE_DIR = os.path.join(RUN_DIR, "mounts")


def _key(mountpoint: str) -> str:
    return hashlib.sha256(os.fsencode(os.path.realpath(mountpoint))).hexdigest()[:16]


def _state_file(mountpoint: str) -> str:
    return os.path.join(STATE_DIR, _key(mountpoint) + ".json")


def control_socket_path(mountpoint: str) -> str:
    """The mount's control socket (cowfs.control), beside the records."""
    return os.path.join(RUN_DIR, _key(mountpoint) + ".sock")


def make_run_dir() -> None:
    """RUN_DIR and its records dir, writable by their owner only (the daemon runs
    with umask 0, so the mode is explicit, for the parents too)."""
    for d in (os.path.dirname(RUN_DIR), RUN_DIR, STATE_DIR):
        if not os.path.isdir(d):
            os.makedirs(d, mode=0o755, exist_ok=True)
        st = os.stat(d)
        if st.st_uid == os.geteuid() and st.st_mode & 0o022 and d != "/run":
            os.chmod(d, st.st_mode & ~0o022)   # (made by an older cowfs under umask 0)


def log_path(mountpoint: str) -> str:
    """Where a detached daemon logs (cowfs --log FILE to choose)."""
    return os.path.join(os.path.dirname(STATE_DIR), "logs", _key(mountpoint) + ".log")


def record_mount(cfg: MountConfig) -> None:
    """Called before the mount is live: resolving the mountpoint afterwards would
    ask this very daemon, which is not serving yet."""
    make_run_dir()
    data = {"mountpoint": cfg.mountpoint, "lowerdirs": cfg.lowerdirs,
            "upperdir": cfg.upperdir, "workdir": cfg.workdir, "pid": os.getpid(),
            "log": cfg.log_file or log_path(cfg.mountpoint),
            "control": control_socket_path(cfg.mountpoint)}
    tmp = _state_file(cfg.mountpoint) + ".tmp"
    with open(tmp, "w") as f:
        json.dump(data, f)
    os.replace(tmp, _state_file(cfg.mountpoint))


def forget_mount(mountpoint: str) -> None:
    """Remove this daemon's record: a new mount at the same place may have
    recorded itself while this one was still shutting down."""
    rec = find_mount(mountpoint)
    if rec is not None and rec.get("pid") == os.getpid():
        try:
            os.unlink(_state_file(mountpoint))
        except FileNotFoundError:
            pass


def find_mount(mountpoint: str) -> dict | None:
    """The layers of the cowfs mount at mountpoint, or None if none is recorded."""
    try:
        with open(_state_file(mountpoint)) as f:
            return json.load(f)
    except FileNotFoundError:
        return None
