"""Mount lifecycle: mount, detach once live, serve, unmount on signal or umount.

Concurrency (measured, see bench/PROFILE.md): a few worker threads read the
/dev/fuse fd and its clones; the overlay core runs one request at a time under
its lock and releases it around blocking work (copying data, fsync, reads and
writes the daemon serves), so one large copy-up does not stall other requests.
"""
from __future__ import annotations

import errno
import logging
import os
import signal
import sys

from . import control, fuse
from .overlay import Overlay
from .overlay.params import MountConfig
from .server import OverlayServer
from .state import forget_mount, hold_mount_locks, log_path, record_mount

log = logging.getLogger("cowfs")

TIMEOUT = 86400.0


def mount_spec(cfg: MountConfig) -> fuse.MountSpec:
    flags = {f for f in cfg.kernel_flags if f in {"nodev", "nosuid", "noexec", "noatime"}}
    root = os.geteuid() == 0
    if not root:
        # fusermount3 refuses dev and suid for users anyway; say so explicitly.
        flags |= {"nodev", "nosuid"}
    if cfg.read_only or not cfg.upperdir:
        flags.add("ro")
    # Root mounts serve every user; the kernel checks permissions itself.
    return fuse.MountSpec(cfg.mountpoint, fsname=cfg.fsname, subtype="cowfs", flags=flags,
                          allow_other=root, default_permissions=True)


def _passthrough_wanted(cfg: MountConfig) -> bool:
    # The kernel lets only CAP_SYS_ADMIN register backing files.
    return cfg.passthrough and os.geteuid() == 0


def _serve_mounted(cfg: MountConfig, ready_fd: int | None) -> int:
    """Mount, report readiness on ready_fd, serve until unmounted."""
    fd = -1
    try:
        overlay = Overlay(cfg)
        server = OverlayServer(overlay, _passthrough_wanted(cfg))
        # (the overlay holds upperdir and workdir exclusively; the lowers are shared)
        hold_mount_locks(cfg.lowerdirs, None, None)
        record_mount(cfg)
        ctl = control.start(overlay, cfg)
        fd = fuse.mount(mount_spec(cfg))
        session = fuse.Session(server, fd, fuse.Config(
            entry_timeout=TIMEOUT, attr_timeout=TIMEOUT, negative_timeout=TIMEOUT,
            passthrough=_passthrough_wanted(cfg), posix_acl=cfg.acl), overlay.lock)
        server.attach(session)
        session.handshake()
    except Exception as e:  # reported to the waiting parent, then exit
        if fd >= 0:
            _unmount(cfg.mountpoint)
        forget_mount(cfg.mountpoint)
        msg = f"cowfs: cannot mount {cfg.mountpoint}: {e}"
        if ready_fd is None:
            print(msg, file=sys.stderr)
        else:
            os.write(ready_fd, msg.encode())
            os.close(ready_fd)
        return 1
    if ready_fd is not None:
        os.write(ready_fd, b"ok")
        os.close(ready_fd)
        _detach_stdio()
    signalled: list[int] = []

    def on_signal(signum: int, frame: object) -> None:
        signalled.append(signum)
        session.stop()
    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(sig, on_signal)
    try:
        session.start()
        session.wait()      # until umount (the kernel ends the connection) or a signal
    except Exception:
        log.exception("cowfs: daemon failed")
        raise
    finally:
        if signalled:
            # A signal, not umount(8): the mount is still ours to remove.  (After
            # umount the path may already hold someone else's new mount.)
            _unmount(cfg.mountpoint)
        session.stop()
        ctl.close()
        overlay.close()
        forget_mount(cfg.mountpoint)
    return 0


def _unmount(mountpoint: str) -> None:
    try:
        fuse.unmount(mountpoint)
    except OSError as e:
        if e.errno == errno.EBUSY:
            fuse.unmount(mountpoint, lazy=True)
        elif e.errno not in (errno.EINVAL, errno.ENOENT):
            log.warning("unmounting %s: %s", mountpoint, e)


def _detach_stdio() -> None:
    devnull = os.open(os.devnull, os.O_RDWR)
    for fd in (0, 1, 2):
        os.dup2(devnull, fd)
    os.close(devnull)


def _setup_logging(cfg: MountConfig, foreground: bool) -> None:
    level = logging.DEBUG if cfg.debug else logging.INFO
    fmt = "%(asctime)s %(name)s[%(process)d] %(levelname)s %(message)s"
    if cfg.log_file or not foreground:
        path = cfg.log_file or log_path(cfg.mountpoint)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        logging.basicConfig(filename=path, level=level, format=fmt)
    else:
        logging.basicConfig(level=logging.DEBUG if cfg.debug else logging.WARNING, format=fmt)


def mount(cfg: MountConfig, foreground: bool) -> int:
    if foreground:
        _setup_logging(cfg, True)
        return _serve_mounted(cfg, None)
    rfd, wfd = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(rfd)
        os.setsid()
        os.chdir("/")
        code = 1
        try:
            _setup_logging(cfg, False)
            code = _serve_mounted(cfg, wfd)
        finally:
            logging.shutdown()
            os._exit(code)
    os.close(wfd)
    with os.fdopen(rfd, "rb") as r:
        answer = r.read()
    if answer == b"ok":
        return 0
    if answer:
        print(answer.decode(errors="replace"), file=sys.stderr)
    else:
        print(f"cowfs: the daemon died before {cfg.mountpoint} was mounted", file=sys.stderr)
    os.waitpid(pid, 0)
    return 1
