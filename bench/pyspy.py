"""Sampling profiles of the cowfs daemon during the benchmark steps (--profile).

py-spy records the daemon (found by pid from the mountpoint) while a step's worker runs,
in the "raw" collapsed-stack format, with --gil: only samples of the thread holding the
GIL, i.e. the daemon's Python work (threads blocked in readv on /dev/fuse, or inside
any other syscall, hold no GIL and are not sampled; their kernel time shows as stime in
the daemon-CPU rows instead).  summarize() turns the files into tables of where that
time goes: self and inclusive time per function, and the hottest source lines.

    python bench/pyspy.py bench/out/profiles/*.txt     # summarize again
"""
from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
from collections import Counter
from pathlib import Path

_LINE = re.compile(r"^(.*) (\d+)$")
_FRAME = re.compile(r"^(?P<func>.*?) \((?P<file>[^()]*?)(?::\d+)?\)$")


def py_spy() -> str | None:
    here = Path(sys.executable).parent / "py-spy"
    return str(here) if here.exists() else shutil.which("py-spy")


class Recorder:
    """py-spy record -p PID until stop(); only ever signals the py-spy it started."""

    def __init__(self, pid: int, out: Path, rate: int = 250) -> None:
        self.out = out
        exe = py_spy()
        if exe is None:
            raise RuntimeError("py-spy is not installed (pip install py-spy)")
        out.parent.mkdir(parents=True, exist_ok=True)
        self.log = open(out.with_suffix(".log"), "w")
        self.proc = subprocess.Popen(
            [exe, "record", "-p", str(pid), "-f", "raw", "-o", str(out), "-r", str(rate),
             "--nonblocking", "--gil"], stdout=self.log, stderr=self.log, stdin=subprocess.DEVNULL)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.log.close()


def _frame_name(frame: str, line: bool = False) -> str:
    m = _FRAME.match(frame.strip())
    if not m:
        return frame.strip()
    f = m.group("file")
    # cowfs's own files from the package on (cowfs/fuse/session.py), others by their
    # last two path parts (threading.py, json/decoder.py).
    if "cowfs/" in f:
        short = f[f.rindex("cowfs/"):]
    else:
        short = "/".join(Path(f).parts[-2:]) if f else "?"
    if line:
        ln = frame.strip().rsplit(":", 1)[-1].rstrip(")")
        short += f":{ln}" if ln.isdigit() else ""
    return f"{m.group('func')} ({short})"


def load(path: Path) -> tuple[Counter, Counter, Counter, int]:
    """Per-function self and inclusive sample counts, per-line self counts, total."""
    self_c, incl_c, line_c, total = Counter(), Counter(), Counter(), 0
    for line in path.read_text(errors="replace").splitlines():
        m = _LINE.match(line.strip())
        if not m:
            continue
        stack, n = m.group(1), int(m.group(2))
        raw = [f for f in stack.split(";") if f.strip()]
        frames = [_frame_name(f) for f in raw]
        if not frames:
            continue
        total += n
        self_c[frames[-1]] += n
        line_c[_frame_name(raw[-1], line=True)] += n
        for f in set(frames):
            incl_c[f] += n
    return self_c, incl_c, line_c, total


# Frames every request shares (the loop, startup): their inclusive time says nothing.
_SHARED = ("Session._worker ", "_serve_mounted ", "main ", "<module> ", "mount ")


def summarize(paths: list[Path], top: int = 12) -> str:
    out = []
    for p in paths:
        if not p.exists() or p.stat().st_size == 0:
            continue
        self_c, incl_c, line_c, total = load(p)
        if not total:
            continue
        out.append(f"### {p.stem}  ({total} samples holding the GIL)\n")
        out.append("| self % | function (all code) | | incl % | function (cowfs code) |")
        out.append("|--:|---|---|--:|---|")
        incl = [(f, n) for f, n in incl_c.most_common()
                if "(cowfs/" in f and not f.startswith(_SHARED)][:top]
        selfs = self_c.most_common(top)
        for i in range(max(len(selfs), len(incl))):
            a = selfs[i] if i < len(selfs) else ("", 0)
            b = incl[i] if i < len(incl) else ("", 0)
            left = f"{100 * a[1] / total:.1f} | `{a[0]}`" if a[0] else " | "
            right = f"{100 * b[1] / total:.1f} | `{b[0]}`" if b[0] else " | "
            out.append(f"| {left} | | {right} |")
        out.append("")
        out.append("Hottest lines (self): " + ", ".join(
            f"`{f}` {100 * n / total:.0f} %" for f, n in line_c.most_common(8)))
        out.append("")
    return "\n".join(out)


if __name__ == "__main__":
    files = [Path(a) for a in sys.argv[1:]]
    print(summarize(files, top=int(os.environ.get("TOP", "15"))))
