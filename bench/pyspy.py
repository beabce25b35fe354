"""Sampling profiles of the cowfs daemon during the benchmark steps (--profile).

py-spy records the daemon (found by pid from the mountpoint) while a step's worker runs,
in the "raw" collapsed-stack format; summarize() turns the files into a table of where
the daemon's busy time goes: self time and inclusive time per function.

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
             "--nonblocking"], stdout=self.log, stderr=self.log, stdin=subprocess.DEVNULL)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.log.close()


def _frame_name(frame: str) -> str:
    m = _FRAME.match(frame.strip())
    if not m:
        return frame.strip()
    f = m.group("file")
    # Keep the last two path parts: cowfs/overlay.py, trio/_core/_run.py -> _core/_run.py
    short = "/".join(Path(f).parts[-2:]) if f else "?"
    return f"{m.group('func')} ({short})"


# Leaf frames that are waiting, not working (py-spy --nonblocking cannot always tell).
IDLE_LEAVES = ("EpollIOManager.get_events ", "EpollIOManager._epoll_wait ",
               "Condition.wait ", "Event.wait ", "WorkerThread._work ")


def load(path: Path) -> tuple[Counter, Counter, int]:
    """Per-function self and inclusive sample counts, idle (waiting) samples left out."""
    self_c, incl_c, total = Counter(), Counter(), 0
    for line in path.read_text(errors="replace").splitlines():
        m = _LINE.match(line.strip())
        if not m:
            continue
        stack, n = m.group(1), int(m.group(2))
        frames = [_frame_name(f) for f in stack.split(";") if f.strip()]
        if not frames:
            continue
        # py-spy puts the thread/process name first; skip non-frames.
        frames = [f for f in frames if "(" in f] or frames
        if frames[-1].startswith(IDLE_LEAVES):
            continue
        total += n
        self_c[frames[-1]] += n
        for f in set(frames):
            incl_c[f] += n
    return self_c, incl_c, total


def summarize(paths: list[Path], top: int = 12) -> str:
    out = []
    for p in paths:
        if not p.exists() or p.stat().st_size == 0:
            continue
        self_c, incl_c, total = load(p)
        if not total:
            continue
        out.append(f"### {p.stem}  ({total} busy samples; waiting in epoll left out)\n")
        out.append("| self % | function (all code) | | incl % | function (cowfs code) |")
        out.append("|--:|---|---|--:|---|")
        # Inclusive time only for cowfs's own functions below the request dispatch:
        # the frames every sample shares (cli, daemon, trio's loop) say nothing.
        incl = [(f, n) for f, n in incl_c.most_common()
                if "(cowfs/" in f and not f.startswith(("_run_mount", "_legacy_main", "<module>",
                                                        "_serve_mounted", "mount (",
                                                        "_serve (", "main ("))
                and not f.startswith("errno_boundary")][:top]
        selfs = self_c.most_common(top)
        for i in range(max(len(selfs), len(incl))):
            a = selfs[i] if i < len(selfs) else ("", 0)
            b = incl[i] if i < len(incl) else ("", 0)
            left = f"{100 * a[1] / total:.1f} | `{a[0]}`" if a[0] else " | "
            right = f"{100 * b[1] / total:.1f} | `{b[0]}`" if b[0] else " | "
            out.append(f"| {left} | | {right} |")
        out.append("")
    return "\n".join(out)


if __name__ == "__main__":
    files = [Path(a) for a in sys.argv[1:]]
    print(summarize(files, top=int(os.environ.get("TOP", "15"))))
