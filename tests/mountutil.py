"""Real mounts for tests: cowfs, kernel overlayfs and fuse-overlayfs over the same layers.

Each mount is a context manager that unmounts on exit, lazily if it must, even when
the test body failed.
"""
from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

COWFS = [sys.executable, "-m", "cowfs"]


def overlay_opts(lowers: list[Path], upper: Path | None, work: Path | None,
                 extra: str = "") -> str:
    opts = "lowerdir=" + ":".join(str(p) for p in lowers)
    if upper is not None:
        opts += f",upperdir={upper},workdir={work}"
    return opts + ("," + extra if extra else "")


def is_mountpoint(path: Path) -> bool:
    real = os.path.realpath(path)
    with open("/proc/self/mountinfo") as f:
        return any(line.split()[4] == real for line in f)


def unmount(mnt: Path) -> None:
    """Unmount mnt; fall back to a lazy unmount so nothing is left behind."""
    for cmd in (["umount", str(mnt)], ["umount", "-l", str(mnt)]):
        if not is_mountpoint(mnt):
            return
        subprocess.run(cmd, capture_output=True)
        for _ in range(50):
            if not is_mountpoint(mnt):
                return
            time.sleep(0.05)


@contextlib.contextmanager
def mounted(cmd: list[str], mnt: Path) -> Iterator[Path]:
    mnt.mkdir(parents=True, exist_ok=True)
    try:
        res = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
        if res.returncode != 0:
            raise RuntimeError(f"mount failed ({res.returncode}): {' '.join(cmd)}\n{res.stderr}")
        if not is_mountpoint(mnt):
            raise RuntimeError(f"{cmd[0]} returned but {mnt} is not mounted")
        yield mnt
    finally:
        unmount(mnt)


def cowfs_mount(lowers: list[Path], upper: Path | None, work: Path | None, mnt: Path,
                extra: str = "") -> contextlib.AbstractContextManager[Path]:
    return mounted([*COWFS, "-o", overlay_opts(lowers, upper, work, extra), str(mnt)], mnt)


def kernel_mount(lowers: list[Path], upper: Path | None, work: Path | None, mnt: Path,
                 extra: str = "") -> contextlib.AbstractContextManager[Path]:
    if upper is None and len(lowers) == 1:
        # The kernel wants two lowers for a read-only mount; an empty one changes nothing.
        empty = mnt.parent / (mnt.name + ".empty")
        empty.mkdir(exist_ok=True)
        lowers = [*lowers, empty]
    return mounted(["mount", "-t", "overlay", "overlay", "-o",
                    overlay_opts(lowers, upper, work, extra), str(mnt)], mnt)


def fuse_overlayfs_mount(lowers: list[Path], upper: Path | None, work: Path | None,
                         mnt: Path, extra: str = "") -> contextlib.AbstractContextManager[Path]:
    exe = shutil.which("fuse-overlayfs")
    if exe is None:
        raise RuntimeError("fuse-overlayfs is not installed (scripts/setup installs it)")
    return mounted([exe, "-o", overlay_opts(lowers, upper, work, extra), str(mnt)], mnt)
