"""Faults and concurrency: a daemon killed mid copy-up, racing writers, readers
during copy-up, parallel namespace changes.  Every wait has a timeout."""
from __future__ import annotations

import contextlib
import hashlib
import os
import signal
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

import pytest

from tests.mountutil import COWFS, cowfs_mount, is_mountpoint, overlay_opts, unmount
from tests.overlaydiff import SCRATCH, cowfs_pid, stray_work_entries

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="mounting needs root")

MiB = 1 << 20


@pytest.fixture
def scratch():
    SCRATCH.mkdir(parents=True, exist_ok=True)
    d = Path(tempfile.mkdtemp(prefix="faults-", dir=SCRATCH))
    for sub in ("lower", "upper", "work", "mnt"):
        (d / sub).mkdir()
    try:
        yield d
    finally:
        if is_mountpoint(d / "mnt"):
            unmount(d / "mnt")
        subprocess.run(["rm", "-rf", str(d)], timeout=120)


def _pattern_file(path: Path, size: int) -> str:
    """A file of non-zero, non-repeating-per-MiB data; returns its md5."""
    h = hashlib.md5()
    block = bytes(range(1, 256)) * (MiB // 255 + 1)
    with open(path, "wb") as f:
        for i in range(size // MiB):
            chunk = (b"%08d" % i) + block[8:MiB]
            f.write(chunk)
            h.update(chunk)
    return h.hexdigest()


def _md5(path: Path) -> str:
    h = hashlib.md5()
    with open(path, "rb") as f:
        while chunk := f.read(4 * MiB):
            h.update(chunk)
    return h.hexdigest()


def _run_py(code: str, timeout: float) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True,
                          text=True, timeout=timeout)


def _mount(d: Path):
    return cowfs_mount([d / "lower"], d / "upper", d / "work", d / "mnt")


# --------------------------------------------------------------- SIGKILL
def _wait_for(path: Path, timeout: float = 60) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if path.exists():
            return True
        time.sleep(0.01)
    return False


def test_sigkill_during_large_copy_up(scratch: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    size = 64 * MiB
    lower_md5 = _pattern_file(scratch / "lower" / "big", size)
    (scratch / "lower" / "small").write_bytes(b"small\n")
    mnt = scratch / "mnt"
    pause = scratch / "pause"
    # The daemon stops in the copy-up (data copied, not installed) until killed.
    monkeypatch.setenv("COWFS_TEST_PAUSE", str(pause))
    with _mount(scratch):
        monkeypatch.delenv("COWFS_TEST_PAUSE")
        pid = cowfs_pid(str(mnt))
        assert pid is not None, "cannot find the cowfs daemon"
        writer = subprocess.Popen(
            [sys.executable, "-c",
             "import os,sys; fd=os.open(sys.argv[1], os.O_WRONLY|os.O_APPEND); "
             "os.write(fd, b'appended'); os.close(fd)", str(mnt / "big")],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            assert _wait_for(Path(f"{pause}.0")), "the copy-up never reached the pause"
            assert stray_work_entries(scratch / "work"), "no copy in progress in work/"
            os.kill(pid, signal.SIGKILL)
            writer.wait(timeout=30)
        finally:
            if writer.poll() is None:
                writer.kill()
                writer.wait(timeout=10)
        for _ in range(100):
            if not os.path.exists(f"/proc/{pid}"):
                break
            time.sleep(0.05)
        subprocess.run(["umount", "-l", str(mnt)], capture_output=True, timeout=30)
    assert writer.returncode != 0
    # Killed before the copy was renamed into place: the upper layer has nothing.
    assert os.listdir(scratch / "upper") == []
    with _mount(scratch):
        assert stray_work_entries(scratch / "work") == [], "workdir/work not emptied at mount"
        assert sorted(os.listdir(mnt)) == ["big", "small"]
        assert os.stat(mnt / "big").st_size == size
        assert _md5(mnt / "big") == lower_md5
        # The mount is fully usable: the copy-up can now complete.
        with open(mnt / "big", "ab") as f:
            f.write(b"again")
        assert os.stat(mnt / "big").st_size == size + 5
        assert (mnt / "small").read_bytes() == b"small\n"
    assert os.listdir(scratch / "upper") == ["big"]


# -------------------------------------------------- racing writers
def test_parallel_open_for_write_one_copy_up(scratch: Path,
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    size = 32 * MiB
    _pattern_file(scratch / "lower" / "f", size)
    expected = bytearray((scratch / "lower" / "f").read_bytes())
    nproc = 6
    for i in range(nproc):
        off = i * 5 * MiB + 123
        payload = (b"writer-%d;" % i) * 100
        expected[off:off + len(payload)] = payload
    pause = scratch / "pause"
    monkeypatch.setenv("COWFS_TEST_PAUSE", str(pause))
    with _mount(scratch):
        monkeypatch.delenv("COWFS_TEST_PAUSE")
        code = f"""
            import os, sys
            i = int(sys.argv[1])
            fd = os.open({str(scratch / 'mnt' / 'f')!r}, os.O_WRONLY)
            payload = (b"writer-%d;" % i) * 100
            assert os.pwrite(fd, payload, i * 5 * {MiB} + 123) == len(payload)
            os.close(fd)
        """
        procs = [subprocess.Popen([sys.executable, "-c", textwrap.dedent(code), "0"])]
        try:
            # The first writer's copy-up waits at the pause; the others open now.
            assert _wait_for(Path(f"{pause}.0")), "the copy-up never reached the pause"
            procs += [subprocess.Popen([sys.executable, "-c", textwrap.dedent(code), str(i)])
                      for i in range(1, nproc)]
            time.sleep(1.0)
            # They wait for the first copy-up instead of starting their own.
            assert not Path(f"{pause}.1").exists(), "a second copy-up of the same file"
            os.unlink(f"{pause}.0")
            for p in procs:
                assert p.wait(timeout=120) == 0
        finally:
            for p in procs:
                if p.poll() is None:
                    p.kill()
            for m in scratch.glob("pause.*"):
                m.unlink()
        data = (scratch / "mnt" / "f").read_bytes()
        assert len(data) == size
        assert data == bytes(expected), "a writer's data was lost: more than one copy-up?"
        assert stray_work_entries(scratch / "work") == []
    assert (scratch / "upper" / "f").read_bytes() == bytes(expected)


def test_readers_during_copy_up(scratch: Path) -> None:
    size = 120 * MiB
    md5 = _pattern_file(scratch / "lower" / "f", size)
    with _mount(scratch):
        path = str(scratch / "mnt" / "f")
        reader_code = f"""
            import os, random, sys, time, hashlib
            fd = os.open({path!r}, os.O_RDONLY)
            block = bytes(range(1, 256)) * ({MiB} // 255 + 1)
            end = time.monotonic() + 6
            n = 0
            while time.monotonic() < end:
                i = random.randrange({size // MiB})
                got = os.pread(fd, 4096, i * {MiB})
                assert got == (b"%08d" % i) + block[8:4096], (i, got[:16])
                n += 1
            # a whole pass over the file from a fresh open
            h = hashlib.md5()
            with open({path!r}, "rb") as f:
                f.seek(0)
                left = {size}
                while left:
                    c = f.read(min(left, 4 << 20)); h.update(c); left -= len(c)
            assert h.hexdigest() == {md5!r}
            print(n)
        """
        readers = [subprocess.Popen([sys.executable, "-c", textwrap.dedent(reader_code)],
                                    stdout=subprocess.PIPE, text=True) for _ in range(3)]
        try:
            time.sleep(0.3)
            res = _run_py(f"""
                import os
                fd = os.open({path!r}, os.O_WRONLY | os.O_APPEND)
                os.write(fd, b"tail")
                os.close(fd)
            """, timeout=120)
            assert res.returncode == 0, res.stderr
            for r in readers:
                out, _ = r.communicate(timeout=120)
                assert r.returncode == 0
                assert int(out) > 0
        finally:
            for r in readers:
                if r.poll() is None:
                    r.kill()
        assert os.stat(path).st_size == size + 4


def test_parallel_namespace_changes(scratch: Path) -> None:
    lower = scratch / "lower"
    (lower / "dir").mkdir()
    for i in range(20):
        (lower / "dir" / f"low{i}").write_text(f"low {i}\n")
    code = """
        import errno, os, random, sys
        d = sys.argv[1]; me = int(sys.argv[2])
        rnd = random.Random(me)
        names = [f"low{i}" for i in range(20)] + [f"n{i}" for i in range(20)]
        ok = {errno.ENOENT, errno.EEXIST, errno.ENOTEMPTY, errno.EISDIR, errno.ENOTDIR}
        for step in range(400):
            a, b = rnd.choice(names), rnd.choice(names)
            pa, pb = os.path.join(d, a), os.path.join(d, b)
            what = rnd.randrange(5)
            try:
                if what == 0:
                    fd = os.open(pa, os.O_CREAT | os.O_WRONLY, 0o644)
                    os.write(fd, b"%d %d\\n" % (me, step)); os.close(fd)
                elif what == 1:
                    os.unlink(pa)
                elif what == 2:
                    os.rename(pa, pb)
                elif what == 3:
                    os.listdir(d)
                else:
                    with open(pa, "rb") as f:
                        f.read()
            except OSError as e:
                if e.errno not in ok:
                    raise
    """
    with _mount(scratch):
        d = str(scratch / "mnt" / "dir")
        procs = [subprocess.Popen([sys.executable, "-c", textwrap.dedent(code), d, str(i)],
                                  stderr=subprocess.PIPE, text=True) for i in range(4)]
        try:
            for p in procs:
                _, err = p.communicate(timeout=120)
                assert p.returncode == 0, err
        finally:
            for p in procs:
                if p.poll() is None:
                    p.kill()
        seen = sorted(os.listdir(d))
        assert len(seen) == len(set(seen))
        for name in seen:
            os.lstat(os.path.join(d, name))   # every listed name resolves
            (scratch / "mnt" / "dir" / name).read_bytes()
        assert stray_work_entries(scratch / "work") == []
    # Remounted, the same upper gives the same view.
    with _mount(scratch):
        assert sorted(os.listdir(scratch / "mnt" / "dir")) == seen
