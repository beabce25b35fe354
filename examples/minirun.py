#!/usr/bin/env python3
"""minirun: a container runtime in one page, on cowfs' snapshotter API.

    minirun.py [--store DIR] [-v HOST:CONTAINER]... [--commit NAME] IMAGE -- CMD [ARG...]

IMAGE is an OCI layout DIR[:TAG], a `docker save` archive, a rootfs tarball, or
a committed snapshot's name.  The container gets a writable snapshot of it,
mounted with cowfs, and its own mount, PID, UTS, IPC and network namespaces; the
command runs as PID 1 after pivot_root.  Afterwards the snapshot is committed
as NAME (--commit) or removed.  Needs root.
"""
from __future__ import annotations

import argparse
import ctypes
import os
import platform
import secrets
import sys
import tempfile

from cowfs.snapshot import NotFound, Snapshotter

libc = ctypes.CDLL(None, use_errno=True)
CLONE_NEWNS, CLONE_NEWUTS, CLONE_NEWIPC = 0x00020000, 0x04000000, 0x08000000
CLONE_NEWPID, CLONE_NEWNET = 0x20000000, 0x40000000
MS_BIND, MS_REC, MS_PRIVATE, MNT_DETACH = 0x1000, 0x4000, 0x40000, 2
SYS_PIVOT_ROOT = {"x86_64": 155, "aarch64": 41}[platform.machine()]


def check(ret: int, what: str) -> None:
    if ret != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"{what}: {os.strerror(err)}")


def mount(src: str, dst: str, fstype: str | None = None, flags: int = 0) -> None:
    check(libc.mount(src.encode(), dst.encode(), fstype and fstype.encode(), flags, None),
          f"mount {src} on {dst}")


def container(rootfs: str, volumes: list[tuple[str, str]], cmd: list[str]) -> None:
    """In the new namespaces, as PID 1: volumes, /proc, pivot_root, exec."""
    mount("none", "/", None, MS_REC | MS_PRIVATE)  # nothing we do leaks to the host
    for host, inside in volumes:
        target = os.path.join(rootfs, inside.lstrip("/"))
        os.makedirs(target, exist_ok=True)
        mount(host, target, None, MS_BIND | MS_REC)
    os.makedirs(os.path.join(rootfs, "proc"), exist_ok=True)
    mount("proc", os.path.join(rootfs, "proc"), "proc")
    os.chdir(rootfs)
    check(libc.syscall(SYS_PIVOT_ROOT, b".", b"."), "pivot_root")  # old root on top of new
    check(libc.umount2(b".", MNT_DETACH), "detach the old root")
    os.chdir("/")
    check(libc.sethostname(b"minirun", 7), "sethostname")
    os.execvp(cmd[0], cmd)


def run(rootfs: str, volumes: list[tuple[str, str]], cmd: list[str]) -> int:
    pid = os.fork()
    if pid == 0:  # becomes PID 1's parent in the new PID namespace
        code = 127
        try:
            check(libc.unshare(CLONE_NEWNS | CLONE_NEWPID | CLONE_NEWUTS | CLONE_NEWIPC |
                               CLONE_NEWNET), "unshare")
            init = os.fork()
            if init == 0:
                try:
                    container(rootfs, volumes, cmd)
                except OSError as e:
                    print(f"minirun: {e}", file=sys.stderr)
                os._exit(127)
            code = os.waitstatus_to_exitcode(os.waitpid(init, 0)[1])
        finally:
            os._exit(code if code >= 0 else 128 - code)
    return os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1])


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--store", default=os.environ.get("COWFS_STORE", "/var/lib/cowfs"))
    p.add_argument("-v", "--volume", action="append", default=[], metavar="HOST:CONTAINER")
    p.add_argument("--commit", metavar="NAME", help="keep the changes as this snapshot")
    p.add_argument("image")
    p.add_argument("cmd", nargs=argparse.REMAINDER, help="the command (after --, if you like)")
    ns = p.parse_args()
    ns.cmd = ns.cmd[1:] if ns.cmd[:1] == ["--"] else ns.cmd
    if not ns.cmd:
        p.error("no command to run")
    volumes = [tuple(v.split(":", 1)) for v in ns.volume]
    if any(len(v) != 2 or not os.path.isabs(v[1]) for v in volumes):
        p.error("a volume is HOST:/ABSOLUTE/PATH")

    sn = Snapshotter(ns.store)
    try:
        parent = sn.stat(ns.image).name
    except NotFound:
        parent = sn.import_image(ns.image).name
    key = f"minirun-{secrets.token_hex(4)}"
    sn.prepare(key, parent, labels={"minirun.image": ns.image})
    rootfs = tempfile.mkdtemp(prefix="minirun-")
    try:
        sn.mount(key, rootfs)
        try:
            code = run(rootfs, volumes, ns.cmd)  # type: ignore[arg-type]
        finally:
            sn.unmount(rootfs)
        if ns.commit:
            sn.commit(ns.commit, key)
            print(f"minirun: committed as {ns.commit}", file=sys.stderr)
        return code
    finally:
        for info in list(sn.walk([f"name=={key}"])):  # still there: not committed
            sn.remove(info.name)
        os.rmdir(rootfs)


if __name__ == "__main__":
    sys.exit(main())
