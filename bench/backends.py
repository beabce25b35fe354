"""The four backends: how to mount one over a layer set and how to take it down again.

Only mounts this process made are ever unmounted, and only daemons whose pid was found
from our own mountpoint are ever signalled.
"""
from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


class MountError(Exception):
    pass


class MountTimeout(MountError):
    """The mount command hung: the backend is given up for the rest of the run."""


def _unescape(field_: str) -> str:
    return field_.replace("\\040", " ").replace("\\011", "\t").replace("\\012", "\n") \
        .replace("\\134", "\\")


def mountpoints() -> list[str]:
    with open("/proc/self/mountinfo") as f:
        return [_unescape(line.split(" ")[4]) for line in f]


def is_mountpoint(path: Path) -> bool:
    # abspath, not realpath: a hung FUSE mount must not hang us.
    return os.path.abspath(path) in mountpoints()


def daemon_pids(mnt: Path) -> list[int]:
    """Processes whose argv names this mountpoint (the FUSE daemon serving it)."""
    want = os.path.abspath(mnt).encode()
    me = os.getpid()
    out = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == me:
            continue
        try:
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                args = f.read().split(b"\0")
        except OSError:
            continue
        if want in args or want + b"/" in args:
            out.append(int(entry))
    return out


def rss_mib(pids: list[int]) -> float | None:
    total, seen = 0, False
    for pid in pids:
        try:
            with open(f"/proc/{pid}/status") as f:
                for line in f:
                    if line.startswith("VmRSS:"):
                        total += int(line.split()[1])
                        seen = True
        except OSError:
            pass
    return total / 1024 if seen else None


def alive(pid: int, mnt: Path) -> bool:
    """pid still runs and is still the daemon of mnt (guards against pid reuse)."""
    return pid in daemon_pids(mnt)


def _kill(pid: int, mnt: Path, sig: int) -> None:
    if alive(pid, mnt):
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            pass


def _wait_gone(pids: list[int], mnt: Path, seconds: float) -> bool:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if not any(alive(p, mnt) for p in pids):
            return True
        time.sleep(0.05)
    return not any(alive(p, mnt) for p in pids)


def unmount(mnt: Path, pids: list[int], hung: bool = False) -> None:
    """umount, then lazy umount; then make sure our daemon is gone (by pid)."""
    if hung:
        # A daemon that stopped answering: kill it first, that aborts the connection.
        for p in pids:
            _kill(p, mnt, signal.SIGKILL)
    for cmd in (["umount", str(mnt)], ["umount", "-l", str(mnt)]):
        if not is_mountpoint(mnt):
            break
        try:
            subprocess.run(cmd, capture_output=True, timeout=30)
        except subprocess.TimeoutExpired:
            for p in pids:
                _kill(p, mnt, signal.SIGKILL)
        for _ in range(100):
            if not is_mountpoint(mnt):
                break
            time.sleep(0.05)
    if pids and not _wait_gone(pids, mnt, 10):
        for p in pids:
            _kill(p, mnt, signal.SIGTERM)
        if not _wait_gone(pids, mnt, 3):
            for p in pids:
                _kill(p, mnt, signal.SIGKILL)
            _wait_gone(pids, mnt, 3)


@dataclass
class Mounted:
    backend: str
    path: Path
    pids: list[int] = field(default_factory=list)
    hung: bool = False
    mount_s: float = 0.0    # from starting the mount command until the mount answers


def _answers(path: Path, timeout: float) -> bool:
    """stat(path) returns within timeout (in a thread: a stuck FUSE mount must not hang
    us; the thread comes free once the daemon is killed)."""
    done = threading.Event()

    def probe() -> None:
        with contextlib.suppress(OSError):
            os.stat(path)
        done.set()
    threading.Thread(target=probe, daemon=True).start()
    return done.wait(timeout)


def overlay_opts(lowers: list[Path], upper: Path, work: Path) -> str:
    return f"lowerdir={':'.join(map(str, lowers))},upperdir={upper},workdir={work}"


class Backend:
    name = "?"
    fuse = False

    def __init__(self, base: Path, mount_timeout: float) -> None:
        self.base = base / self.name          # .../m/<backend>/{u,w,mnt}
        self.mount_timeout = mount_timeout

    def unavailable(self) -> str | None:
        return None

    def version(self) -> str:
        return ""

    @property
    def mnt(self) -> Path:
        return self.base / "mnt"

    def _fresh_dirs(self) -> tuple[Path, Path]:
        upper, work = self.base / "u", self.base / "w"
        for d in (upper, work):
            if d.exists():
                subprocess.run(["rm", "-rf", str(d)], check=True)
            d.mkdir(parents=True)
        self.mnt.mkdir(parents=True, exist_ok=True)
        return upper, work

    def command(self, lowers: list[Path], upper: Path, work: Path) -> list[str]:
        raise NotImplementedError

    def mount(self, lowers: list[Path], before=None, probe: str | None = None) -> Mounted:
        """before(upper) runs on the fresh upper directory just before mounting.  The
        mount counts as live once stat(mnt/probe) answers (a FUSE daemon may return
        before it has answered the kernel's INIT)."""
        if is_mountpoint(self.mnt):
            raise MountError(f"{self.mnt} is still mounted from an earlier step")
        upper, work = self._fresh_dirs()
        if before is not None:
            before(upper)
        cmd = self.command(lowers, upper, work)
        # Output to a file, not a pipe: a daemon that keeps the pipe open must not
        # make us wait for it.  Only the mount command itself is waited for.
        with tempfile.TemporaryFile("w+") as log:
            t0 = time.perf_counter()
            proc = subprocess.Popen(cmd, stdout=log, stderr=log, stdin=subprocess.DEVNULL,
                                    cwd=REPO)
            try:
                rc = proc.wait(timeout=self.mount_timeout)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
                m = Mounted(self.name, self.mnt, daemon_pids(self.mnt), hung=True)
                unmount(m.path, m.pids, hung=True)
                raise MountTimeout(f"mount command did not return within "
                                   f"{self.mount_timeout:.0f}s"
                                   f"{' (although the mount appeared)' if m.pids else ''}")
            log.seek(0)
            output = log.read()
        if rc != 0 or not is_mountpoint(self.mnt):
            pids = daemon_pids(self.mnt)
            if is_mountpoint(self.mnt) or pids:
                unmount(self.mnt, pids, hung=True)
            err = output.strip().splitlines()
            tail = " | ".join(err[-3:]) if err else "(no output)"
            what = f"exit {rc}" if rc else "exit 0 but not mounted"
            raise MountError(f"{what}: {tail}")
        live = _answers(self.mnt / (probe or ""), self.mount_timeout)
        took = time.perf_counter() - t0
        m = Mounted(self.name, self.mnt, daemon_pids(self.mnt) if self.fuse else [],
                    mount_s=took)
        if not live:
            m.hung = True
            self.unmount(m)
            raise MountTimeout(f"the mount did not answer a stat within "
                               f"{self.mount_timeout:.0f}s")
        return m

    def unmount(self, m: Mounted) -> None:
        unmount(m.path, m.pids, hung=m.hung)
        for d in ("u", "w"):
            subprocess.run(["rm", "-rf", str(self.base / d)], check=False)


class Plain(Backend):
    """No mount at all: the union of the layers as one ordinary directory."""
    name = "plain"

    def mount(self, lowers: list[Path], before=None, probe=None) -> Mounted:  # by the runner
        raise NotImplementedError

    def unmount(self, m: Mounted) -> None:
        subprocess.run(["rm", "-rf", str(m.path)], check=False)


class Kernel(Backend):
    name = "kernel"

    def unavailable(self) -> str | None:
        with open("/proc/filesystems") as f:
            if "overlay" not in f.read():
                subprocess.run(["modprobe", "overlay"], capture_output=True)
        with open("/proc/filesystems") as f:
            return None if "overlay" in f.read() else "the overlay module is not loaded"

    def version(self) -> str:
        params = {}
        d = Path("/sys/module/overlay/parameters")
        if d.is_dir():
            for p in sorted(d.iterdir()):
                try:
                    params[p.name] = p.read_text().strip()
                except OSError:
                    pass
        return f"linux {os.uname().release} overlay(" + \
            ",".join(f"{k}={v}" for k, v in params.items()) + ")"

    def command(self, lowers, upper, work):
        return ["mount", "-t", "overlay", "overlay", "-o", overlay_opts(lowers, upper, work),
                str(self.mnt)]


class FuseOverlayfs(Backend):
    name = "fuse-overlayfs"
    fuse = True

    def exe(self) -> str | None:
        return shutil.which("fuse-overlayfs")

    def unavailable(self) -> str | None:
        return None if self.exe() else "fuse-overlayfs is not installed"

    def version(self) -> str:
        try:
            out = subprocess.run([self.exe(), "--version"], capture_output=True, text=True,
                                 timeout=10).stdout
        except Exception:
            return "?"
        lines = [ln for ln in out.splitlines() if "fuse-overlayfs" in ln]
        return lines[0].strip() if lines else out.strip()[:60]

    def command(self, lowers, upper, work):
        return [self.exe(), "-o", overlay_opts(lowers, upper, work), str(self.mnt)]


class Cowfs(Backend):
    name = "cowfs"
    fuse = True
    python = sys.executable

    def version(self) -> str:
        try:
            # The last commit that touched cowfs/, not HEAD (other work moves HEAD).
            rev = subprocess.run(["git", "-C", str(REPO), "log", "-1", "--format=%h %cs",
                                  "--", "cowfs"],
                                 capture_output=True, text=True, timeout=10).stdout.strip()
            dirty = subprocess.run(["git", "-C", str(REPO), "status", "--porcelain", "cowfs"],
                                   capture_output=True, text=True, timeout=10).stdout.strip()
        except Exception:
            return "?"
        return f"cowfs git {rev}" + (" + uncommitted changes in cowfs/" if dirty else "")

    def command(self, lowers, upper, work):
        return [self.python, "-m", "cowfs", "-o", overlay_opts(lowers, upper, work),
                str(self.mnt)]


CLASSES = {c.name: c for c in (Plain, Kernel, FuseOverlayfs, Cowfs)}


def cleanup_stale(root: Path) -> list[str]:
    """Unmount leftovers of an earlier, killed run under our own scratch root."""
    prefix = os.path.abspath(root) + "/"
    done = []
    for mp in reversed(mountpoints()):
        if mp.startswith(prefix):
            unmount(Path(mp), daemon_pids(Path(mp)), hung=False)
            done.append(mp)
    return done
