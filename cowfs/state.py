"""Where a live mount records its layers, so `cowfs diff MNT` can find its upper dir."""
from __future__ import annotations

import hashlib
import json
import os

from .overlay.params import MountConfig

STATE_DIR = "/run/cowfs/mounts" if os.geteuid() == 0 else os.path.join(
    os.environ.get("XDG_RUNTIME_DIR", f"/tmp/cowfs-{os.getuid()}"), "cowfs", "mounts")


def _key(mountpoint: str) -> str:
    return hashlib.sha256(os.fsencode(os.path.realpath(mountpoint))).hexdigest()[:16]


def _state_file(mountpoint: str) -> str:
    key = _key(mountpoint)
    return os.path.join(STATE_DIR, key + ".json")


def log_path(mountpoint: str) -> str:
    """Where a detached daemon logs (cowfs --log FILE to choose)."""
    return os.path.join(os.path.dirname(STATE_DIR), "logs", _key(mountpoint) + ".log")


def record_mount(cfg: MountConfig) -> None:
    """Called before the mount is live: resolving the mountpoint afterwards would
    ask this very daemon, which is not serving yet."""
    os.makedirs(STATE_DIR, exist_ok=True)
    data = {"mountpoint": cfg.mountpoint, "lowerdirs": cfg.lowerdirs,
            "upperdir": cfg.upperdir, "workdir": cfg.workdir, "pid": os.getpid(),
            "log": cfg.log_file or log_path(cfg.mountpoint)}
    tmp = _state_file(cfg.mountpoint) + ".tmp"
    with open(tmp, "w") as f:
        json.dump(data, f)
    os.replace(tmp, _state_file(cfg.mountpoint))


def forget_mount(mountpoint: str) -> None:
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
