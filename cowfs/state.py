"""What is mounted: the daemon's locks and its mount record.

A live cowfs daemon holds shared flocks on its work dir and on each lower dir
for as long as it runs (the kernel drops them when it dies, SIGKILL included).
That is how the store knows a layer or an upper is in use: a lock, not a guess
from mountinfo (which misses other mount namespaces and escaped paths).  The
record beside it (STATE_DIR/KEY.json) only tells `cowfs diff MNT` which layers
a mount has, where it logs and where its control socket is (`cowfs trace MNT`);
a record whose locks nobody holds is stale and is dropped.
"""
from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import json
import os
import time
from collections.abc import Iterator

from .overlay.params import MountConfig

RUN_DIR = "/run/cowfs" if os.geteuid() == 0 else os.path.join(
    os.environ.get("XDG_RUNTIME_DIR", f"/tmp/cowfs-{os.getuid()}"), "cowfs")
STATE_DIR = os.path.join(RUN_DIR, "mounts")


def _key(mountpoint: str) -> str:
    return hashlib.sha256(os.fsencode(os.path.realpath(mountpoint))).hexdigest()[:16]

_held: list[int] = []  # the daemon's lock fds: open until it exits


def hold_mount_locks(lowerdirs: list[str], upperdir: str | None, workdir: str | None) -> None:
    """Called by the daemon at mount: take shared locks on the mount's work dir
    (its upper's) and its lower dirs, and keep them until the process ends."""
    for path in [workdir, *lowerdirs] if workdir else lowerdirs:
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        fcntl.flock(fd, fcntl.LOCK_SH)
        _held.append(fd)


def is_locked(path: str) -> bool:
    """Does a live mount hold path (a work dir or a lower dir)?"""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    except (FileNotFoundError, NotADirectoryError):
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as e:
        if e.errno != errno.EWOULDBLOCK:
            raise
        return True
    finally:
        os.close(fd)
    return False


@contextlib.contextmanager
def exclusive(path: str) -> Iterator[None]:
    """Hold path's lock exclusively (no mount can start on it), or raise
    BlockingIOError at once if a mount holds it."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        yield
    finally:
        os.close(fd)


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
    tmp = f"{_state_file(cfg.mountpoint)}.{os.getpid()}.tmp"
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


def _is_live(rec: dict) -> bool:
    held = [rec["workdir"]] if rec.get("workdir") else list(rec.get("lowerdirs") or [])
    return any(is_locked(p) for p in held if isinstance(p, str))


def _read(path: str) -> dict | None:
    try:
        with open(path) as f:
            rec = json.load(f)
    except (FileNotFoundError, ValueError):
        return None
    return rec if isinstance(rec, dict) else None


def find_mount(mountpoint: str) -> dict | None:
    """The layers of the live cowfs mount at mountpoint, or None if none is recorded."""
    rec = _read(_state_file(mountpoint))
    return rec if rec is not None and _is_live(rec) else None


def live_mount_records() -> list[dict]:
    """The records of live mounts; stale ones (their daemon is gone) are deleted."""
    try:
        names = sorted(os.listdir(STATE_DIR))
    except FileNotFoundError:
        return []
    out = []
    for n in names:
        if not n.endswith(".json"):
            continue
        path = os.path.join(STATE_DIR, n)
        rec = _read(path)
        if rec is not None and _is_live(rec):
            out.append(rec)
        elif rec is not None:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)
    return out


def wait_unlocked(path: str, timeout: float) -> bool:
    """Wait for a mount that is going away to drop path (a daemon exits shortly after
    its umount); False if path is still held after timeout seconds."""
    deadline = time.monotonic() + timeout
    while is_locked(path):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.02)
    return True


def wait_daemon_gone(rec: dict, timeout: float = 30.0) -> bool:
    """After an unmount, wait for the mount's daemon to exit (its locks with it);
    False if it is still there after timeout seconds."""
    if rec.get("workdir"):
        return wait_unlocked(rec["workdir"], timeout)
    deadline = time.monotonic() + timeout
    while os.path.exists(f"/proc/{rec.get('pid')}"):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.02)
    return True
