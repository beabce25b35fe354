"""Mount lifecycle: mount, detach once live, serve, unmount on signal or umount."""
from __future__ import annotations

import logging
import os
import signal
import sys

import pyfuse3
import trio

from .fuse_ops import CowfsOperations
from .overlay.params import MountConfig
from .overlay import Overlay
from .state import forget_mount, hold_mount_locks, record_mount

log = logging.getLogger("cowfs")


def fuse_options(cfg: MountConfig) -> set[str]:
    opts = {"fsname=cowfs", "subtype=cowfs", "default_permissions"}
    if os.geteuid() == 0:
        # Root mounts serve every user; the kernel checks permissions itself.
        opts.add("allow_other")
        opts.update({"dev", "suid"} - {f[2:] for f in cfg.kernel_flags if f.startswith("no")})
    opts.update(f for f in cfg.kernel_flags if f in {"nodev", "nosuid", "noexec", "noatime"})
    if cfg.read_only or not cfg.upperdir:
        opts.add("ro")
    return opts


async def _serve() -> None:
    async with trio.open_nursery() as nursery:
        async def on_signal() -> None:
            with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT, signal.SIGHUP) as sigs:
                async for _ in sigs:
                    pyfuse3.terminate()
                    return
        nursery.start_soon(on_signal)
        await pyfuse3.main(min_tasks=2, max_tasks=64)
        nursery.cancel_scope.cancel()


def _serve_mounted(cfg: MountConfig, ready_fd: int | None) -> int:
    """Mount, report readiness on ready_fd, serve until unmounted."""
    try:
        overlay = Overlay(cfg)
        ops = CowfsOperations(overlay)
        hold_mount_locks(cfg.lowerdirs, cfg.upperdir, cfg.workdir)
        record_mount(cfg)
        pyfuse3.init(ops, cfg.mountpoint, fuse_options(cfg))
    except Exception as e:  # reported to the waiting parent, then exit
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
    try:
        trio.run(_serve)
    except Exception:
        log.exception("cowfs: daemon failed")
        raise
    finally:
        # After umount(8) the session is already gone; close() copes with both.
        pyfuse3.close(unmount=True)
        overlay.close()
        forget_mount(cfg.mountpoint)
    return 0


def _detach_stdio() -> None:
    devnull = os.open(os.devnull, os.O_RDWR)
    for fd in (0, 1, 2):
        os.dup2(devnull, fd)
    os.close(devnull)


def mount(cfg: MountConfig, foreground: bool) -> int:
    logging.basicConfig(level=logging.DEBUG if cfg.debug else logging.WARNING,
                        format="%(asctime)s %(name)s %(levelname)s %(message)s")
    if foreground:
        return _serve_mounted(cfg, None)
    rfd, wfd = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(rfd)
        os.setsid()
        os.chdir("/")
        code = 1
        try:
            code = _serve_mounted(cfg, wfd)
        finally:
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
