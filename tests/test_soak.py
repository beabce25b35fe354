"""Soak: fsstress-like random load from several processes for a few minutes; the
daemon's open fd count and RSS must stay flat.  Not run by default
(`pytest -m soak tests/test_soak.py`; COWFS_SOAK_SECONDS sets the length)."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

import pytest

from tests.mountutil import cowfs_mount
from tests.overlaydiff import SCRATCH, cowfs_pid

pytestmark = [pytest.mark.soak,
              pytest.mark.skipif(os.geteuid() != 0, reason="mounting needs root")]

WORKER = r"""
import errno, os, random, sys, time
root, me, until = sys.argv[1], int(sys.argv[2]), float(sys.argv[3])
rnd = random.Random(me)
dirs = ["", "low", "low/sub", "shared", f"w{me}", f"w{me}/x"]
names = [f"f{i}" for i in range(12)] + ["low0", "low1", "low2", "big"]
ops = enxio = 0
fine = {errno.ENOENT, errno.EEXIST, errno.ENOTEMPTY, errno.EISDIR, errno.ENOTDIR,
        errno.EINVAL, errno.EXDEV, errno.ELOOP, errno.EPERM, errno.EMLINK}
def p():
    return os.path.join(root, rnd.choice(dirs), rnd.choice(names))
while time.time() < until:
    what = rnd.randrange(14)
    try:
        if what == 0:
            with open(p(), "ab") as f: f.write(os.urandom(rnd.choice([10, 4096, 70000])))
        elif what == 1:
            fd = os.open(p(), os.O_WRONLY | os.O_CREAT, 0o644)
            os.pwrite(fd, b"x" * rnd.choice([1, 5000]), rnd.choice([0, 4096, 1 << 20])); os.close(fd)
        elif what == 2:
            with open(p(), "rb") as f: f.read()
        elif what == 3:
            os.unlink(p())
        elif what == 4:
            os.rename(p(), p())
        elif what == 5:
            os.mkdir(os.path.join(root, rnd.choice(dirs), "d%d" % rnd.randrange(4)))
        elif what == 6:
            os.rmdir(os.path.join(root, rnd.choice(dirs), "d%d" % rnd.randrange(4)))
        elif what == 7:
            os.chmod(p(), rnd.choice([0o644, 0o600, 0o755]))
        elif what == 8:
            os.truncate(p(), rnd.choice([0, 100, 1 << 16]))
        elif what == 9:
            os.setxattr(p(), "user.s", b"v")
        elif what == 10:
            os.listdir(os.path.join(root, rnd.choice(dirs)))
        elif what == 11:
            os.symlink("f0", p())
        elif what == 12:
            os.link(p(), p())
        else:
            os.utime(p(), ns=(1, 2))
    except OSError as e:
        if e.errno == errno.ENXIO:
            # an open racing an unlink (test_regressions.test_reopen_unlinked_*)
            enxio += 1
        elif e.errno not in fine:
            print("unexpected", what, e, file=sys.stderr); sys.exit(1)
    ops += 1
print(ops, enxio)
"""


ENXIO = [0]


def _sample(pid: int) -> tuple[int, int]:
    fds = len(os.listdir(f"/proc/{pid}/fd"))
    with open(f"/proc/{pid}/status") as f:
        rss = next(int(line.split()[1]) for line in f if line.startswith("VmRSS:"))
    return fds, rss


def _phase(mnt: Path, seconds: float, nproc: int) -> int:
    until = time.time() + seconds
    procs = [subprocess.Popen([sys.executable, "-c", WORKER, str(mnt), str(i), str(until)],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for i in range(nproc)]
    total = 0
    try:
        for pr in procs:
            out, err = pr.communicate(timeout=seconds + 120)
            assert pr.returncode == 0, err
            n, enxio = map(int, out.split())
            total += n
            ENXIO[0] += enxio
    finally:
        for pr in procs:
            if pr.poll() is None:
                pr.kill()
    return total


def test_soak_fd_and_rss_stay_flat() -> None:
    seconds = float(os.environ.get("COWFS_SOAK_SECONDS", "180"))
    SCRATCH.mkdir(parents=True, exist_ok=True)
    d = Path(tempfile.mkdtemp(prefix="soak-", dir=SCRATCH))
    try:
        low, up, work, mnt = (d / n for n in ("low", "up", "work", "mnt"))
        for p in (low / "low" / "sub", up, work, mnt):
            p.mkdir(parents=True)
        for i in range(3):
            (low / "low" / f"low{i}").write_bytes(b"L" * 100_000)
            (low / f"low{i}").write_bytes(b"l" * 5000)
        (low / "low" / "big").write_bytes(os.urandom(4 << 20))
        nproc = 4
        with cowfs_mount([low], up, work, mnt):
            for i in range(nproc):
                (mnt / f"w{i}" / "x").mkdir(parents=True)
            (mnt / "shared").mkdir()
            pid = cowfs_pid(str(mnt))
            assert pid is not None
            warm = _phase(mnt, max(10.0, seconds * 0.2), nproc)
            fd0, rss0 = _sample(pid)
            ops = _phase(mnt, seconds * 0.8, nproc)
            fd1, rss1 = _sample(pid)
            assert cowfs_pid(str(mnt)) == pid
            print(f"\nsoak: {warm} warm-up + {ops} measured ops, {nproc} processes, "
                  f"{seconds:.0f} s; daemon fds {fd0} -> {fd1}, RSS {rss0} -> {rss1} KiB; "
                  f"{ENXIO[0]} opens racing an unlink got ENXIO")
            assert fd1 <= fd0 + 16, f"fd count grew: {fd0} -> {fd1}"
            assert rss1 <= rss0 * 1.25 + 8192, f"RSS grew: {rss0} -> {rss1} KiB"
    finally:
        shutil.rmtree(d, ignore_errors=True)
