"""Where a live mount records its layers, so `cowfs diff MNT` can find its upper dir."""
from __future__ import annotations

import json
import os

import xxhash

from .overlay.params import MountConfig

STATE_DIR = "/run/cowfs/mounts" if os.geteuid() == 0 else os.path.join(
    os.environ.get("XDG_RUNTIME_DIR", f"/tmp/cowfs-{os.getuid()}"), "cowfs", "mounts")


def _state_file(mountpoint: str) -> str:
    key = xxhash.xxh64_hexdigest(os.path.realpath(mountpoint).encode())
    return os.path.join(STATE_DIR, key + ".json")


def log_path(mountpoint: str) -> str:
    """Where a detached daemon logs (cowfs --log FILE to choose)."""
    key = xxhash.xxh64_hexdigest(os.path.realpath(mountpoint).encode())
    return os.path.join(os.path.dirname(STATE_DIR), "logs", key + ".log")


def record_mount(cfg: MountConfig) -> None:
    """Called before the mount is live: resolving the mountpoint afterwards would
    ask this very daemon, which is not serving yet."""
    os.makedirs(STATE_DIR, exist_ok=True)
    data = {"mountpoint": cfg.mountpoint, "lowerdirs": cfg.lowerdirs,
            "upperdir": cfg.upperdir, "workdir": cfg.workdir, "pid": os.getpid(),
            "started": _start_time(os.getpid()),
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
    """The layers of the live cowfs mount at mountpoint, or None if none is recorded."""
    return _read_live(_state_file(mountpoint))


def live_mounts() -> list[dict]:
    """The records of every mount whose daemon still runs."""
    try:
        names = os.listdir(STATE_DIR)
    except FileNotFoundError:
        return []
    recs = (_read_live(os.path.join(STATE_DIR, n)) for n in names if n.endswith(".json"))
    return [r for r in recs if r is not None]


def _read_live(path: str) -> dict | None:
    """A record, or None when there is none or its daemon is gone (killed with
    SIGKILL, it could not remove it): such a record is removed."""
    try:
        with open(path) as f:
            rec = json.load(f)
    except (FileNotFoundError, json.JSONDecodeError):
        return None
    if _start_time(rec.get("pid", 0)) != rec.get("started", -1):
        try:
            os.unlink(path)
        except FileNotFoundError:
            pass
        return None
    return rec


def _start_time(pid: int) -> int | None:
    """When process pid started (clock ticks since boot; tells a reused pid apart),
    None if there is no such process."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read()
    except (FileNotFoundError, ProcessLookupError):
        return None
    # Field 22; the command name (field 2) may hold spaces, so count from its ')'.
    return int(stat[stat.rindex(b")") + 2:].split()[19])
