"""The daemon itself: it logs where someone can read, survives its own bugs,
and the kernel's caches it asks for stay right."""
from __future__ import annotations

import errno
import json
import os
import subprocess
import threading
import time
from pathlib import Path

import pytest

from cowfs.state import find_mount

from .conftest import write
from .mountutil import COWFS, cowfs_mount, mounted, overlay_opts

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="mounting needs root")


def _dirs(tmp_path: Path) -> tuple[Path, Path, Path, Path]:
    lower, up, work, mnt = (tmp_path / d for d in ("lower", "upper", "work", "mnt"))
    for d in (lower, up, work, mnt):
        d.mkdir()
    write(lower / "etc/hosts", "lower\n")
    return lower, up, work, mnt


def _drop_caches() -> None:
    Path("/proc/sys/vm/drop_caches").write_text("2\n")


def test_a_bug_answers_eio_is_logged_and_the_daemon_serves_on(tmp_path, monkeypatch):
    lower, up, work, mnt = _dirs(tmp_path)
    log = tmp_path / "daemon.log"
    monkeypatch.setenv("COWFS_FAULT", "fault-")
    cmd = [*COWFS, "--log", str(log), "-o", overlay_opts([lower], up, work), str(mnt)]
    with mounted(cmd, mnt) as m:
        with pytest.raises(OSError) as e:
            os.stat(m / "fault-lookup-x")
        assert e.value.errno == errno.EIO
        # A forget that raises: the kernel forgets the file once its dentry goes.
        write(m / "fault-forget-a", "x")
        os.unlink(m / "fault-forget-a")
        _drop_caches()
        assert sorted(os.listdir(m)) == ["etc"]
        assert (m / "etc/hosts").read_text() == "lower\n"
        (m / "etc/new").write_text("still serving\n")
        for _ in range(50):
            text = log.read_text()
            if "fault injected: forget" in text:
                break
            time.sleep(0.1)
        assert "fault injected: lookup" in text and "fault injected: forget" in text
        assert "Traceback" in text
    assert (up / "etc/new").read_text() == "still serving\n"


def test_detached_daemon_logs_to_the_run_dir(tmp_path):
    lower, up, work, mnt = _dirs(tmp_path)
    with cowfs_mount([lower], up, work, mnt) as m:
        rec = find_mount(str(m))
        assert rec is not None and rec["log"]
        path = Path(rec["log"])
        assert path.parent.is_dir()
        pid = rec["pid"]
        assert Path(f"/proc/{pid}/fd").exists()
        # The daemon's stderr is /dev/null: only the log file can tell.
        assert os.readlink(f"/proc/{pid}/fd/2") == "/dev/null"
        assert any(os.readlink(f"/proc/{pid}/fd/{fd}") == str(path)
                   for fd in os.listdir(f"/proc/{pid}/fd")
                   if os.path.islink(f"/proc/{pid}/fd/{fd}"))


def test_cached_listing_follows_changes(tmp_path):
    """Listings are cached by the kernel (FOPEN_CACHE_DIR): every change through
    the mount must show in the next listing, in any order of events."""
    lower, up, work, mnt = _dirs(tmp_path)
    with cowfs_mount([lower], up, work, mnt) as m:
        d = m / "etc"
        seen = [sorted(os.listdir(d))]
        (d / "a").write_text("a")
        seen.append(sorted(os.listdir(d)))
        os.rename(d / "a", d / "b")
        seen.append(sorted(os.listdir(d)))
        os.unlink(d / "hosts")
        seen.append(sorted(os.listdir(d)))
        os.mkdir(d / "sub")
        os.rmdir(d / "sub")
        seen.append(sorted(os.listdir(d)))
        for _ in range(3):    # many changes within one clock tick
            (d / "x").write_text("")
            os.unlink(d / "x")
        seen.append(sorted(os.listdir(d)))
    assert seen == [["hosts"], ["a", "hosts"], ["b", "hosts"], ["b"], ["b"], ["b"]]


def test_mount_record_survives_json(tmp_path):
    lower, up, work, mnt = _dirs(tmp_path)
    with cowfs_mount([lower], up, work, mnt) as m:
        rec = find_mount(str(m))
        assert json.loads(json.dumps(rec))["upperdir"] == str(up)
        out = subprocess.run(["grep", str(m), "/proc/mounts"], capture_output=True, text=True)
        assert out.stdout.split()[:3] == ["cowfs", str(m), "fuse.cowfs"]


@pytest.mark.parametrize("writers", [1, 2])
def test_a_large_copy_up_does_not_stall_other_requests(tmp_path, writers):
    """Other requests are served while a copy-up copies data: the listing below
    returns while the copy is still in work/ (a stalled daemon would answer it
    only once the copy was renamed into place).  A second writer of the file
    waits for that copy-up without stalling them either."""
    lower, up, work, mnt = _dirs(tmp_path)
    with open(lower / "big", "wb") as f:
        for _ in range(512):
            f.write(b"\1" * (1 << 20))
    with cowfs_mount([lower], up, work, mnt) as m:
        done = threading.Event()

        def writer() -> None:
            with open(m / "big", "ab") as f:
                f.write(b"tail")
            done.set()
        threads = [threading.Thread(target=writer) for _ in range(writers)]
        for t in threads:
            t.start()
        try:
            for _ in range(2000):
                if any(n.startswith("#cowfs") for n in os.listdir(work / "work")):
                    break
                time.sleep(0.005)
            else:
                pytest.fail("the copy-up never showed in work/")
            assert sorted(os.listdir(m / "etc")) == ["hosts"]
            os.stat(m / "etc/hosts")
            in_progress = any(n.startswith("#cowfs") for n in os.listdir(work / "work"))
            assert in_progress and not done.is_set()
        finally:
            for t in threads:
                t.join()
    assert (up / "big").stat().st_size == 512 * (1 << 20) + 4 * writers
