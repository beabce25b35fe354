"""`cowfs lesson`: copy-on-write step by step, on the shipped example image.

Each step says the idea, runs real commands in the mount (shown as typed),
then shows what the program saw, the events the daemon reported and what
landed in the upper layer.  --pause waits for Enter between steps.
"""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from rich.console import Console
from rich.rule import Rule

from ..demo import EXAMPLES
from .client import EventCollector, mount_record
from .render import STYLES, describe
from .watch import Line, layer_lines

LAYERS = ["3-update", "2-app", "1-base"]   # top first
SETTLE_SECONDS = 0.3   # events travel through a socket: let them arrive


@dataclass(frozen=True)
class Step:
    title: str
    idea: str
    commands: list[str]


STEPS = [
    Step("Layers, stacked read-only",
         "An image is a stack of read-only layers: 1-base at the bottom, 2-app on it, "
         "3-update on top. The mount shows them merged; a writable upper layer starts empty.",
         ["ls", "cat etc/hostname etc/hosts", "cowfs which ."]),
    Step("Lookup from the top",
         "A name is looked up from the top layer down; the first layer that has it wins. "
         "2-app's os-release hides 1-base's.",
         ["cat etc/os-release", "cowfs which etc/os-release"]),
    Step("Copy-up on first write",
         "Lower layers never change. The first write to a lower file copies it whole into "
         "the upper layer; from then on the upper copy is the file.",
         ["echo '10.0.0.7 classroom' >> etc/hosts", "cowfs which etc/hosts"]),
    Step("Metadata-only copy-up",
         "Changing only metadata (chmod, chown) copies only the metadata (metacopy=on): "
         "the upper gets a placeholder, the data is still read from below.",
         ["chmod 600 etc/passwd", "ls -l etc/passwd", "cowfs which etc/passwd"]),
    Step("Deleting a lower file: a whiteout",
         "A lower file cannot be removed, so the upper layer gets a whiteout that hides it.",
         ["rm bin/hello", "ls bin", "cowfs which bin/hello"]),
    Step("Replacing a directory: opaque",
         "A directory made where a lower one was deleted is marked opaque: nothing below "
         "shows through it.",
         ["rm -r opt/app", "mkdir opt/app", "echo 'echo v2' > opt/app/run.sh", "ls opt/app",
          "cowfs which opt/app/start"]),
    Step("Renaming a directory: a redirect",
         "Renaming a lower directory copies up only the directory and records a redirect "
         "to where its lower contents still are (redirect_dir=on).",
         ["mv usr/share/doc usr/share/manuals", "ls usr/share/manuals",
          "cowfs which usr/share/manuals/app/README"]),
    Step("Committing the changes as a new layer",
         "The upper layer is the container's changes: `docker commit` packs them as one "
         "more layer (a tar with .wh. files for the whiteouts) on top of the image.",
         ["cowfs diff .", "cowfs commit . -o $LESSON/layer.tar", "tar tf $LESSON/layer.tar"]),
    Step("Data belongs in a volume, not in the upper",
         "The upper layer lives and dies with the container, every first write copies a "
         "whole file up, and a commit bakes whatever is there into the image. Data that must "
         "last goes to a volume: a directory outside the layers, written in place.",
         ["mkdir -p $LESSON/volume && echo 'row 1' >> $LESSON/volume/db",
          "cowfs stats ."]),
]


def _upper_delta(before: list[Line], after: list[Line]) -> list[str]:
    def key(ln: Line) -> tuple[str, str, str]:
        return ln.path, ln.kind, ln.mark
    old, new = {key(ln) for ln in before}, {key(ln) for ln in after}
    out = []
    for path, kind, mark in sorted(new - old):
        out.append(f"+ {path}  {kind}{' [' + mark + ']' if mark else ''}")
    for path, kind, mark in sorted(old - new):
        out.append(f"- {path}  {kind}")
    return out


def _run(console: Console, cmd: str, mnt: Path, env: dict[str, str]) -> None:
    console.print(f"$ {cmd}", style="bold green", markup=False, highlight=False)
    # `cowfs` in the commands is this very program.
    prog = f'cowfs() {{ "{sys.executable}" -m cowfs "$@"; }}; {cmd}'
    res = subprocess.run(["bash", "-c", prog], cwd=mnt, env=env, capture_output=True,
                         text=True, timeout=60)
    for line in (res.stdout + res.stderr).splitlines():
        console.print("  " + line, markup=False, highlight=False)


def _mount(scratch: Path) -> Path:
    upper, work, mnt = scratch / "upper", scratch / "work", scratch / "merged"
    for d in (upper, work, mnt):
        d.mkdir()
    lowers = ":".join(str(EXAMPLES / name) for name in LAYERS)
    opts = f"lowerdir={lowers},upperdir={upper},workdir={work},metacopy=on,redirect_dir=on"
    subprocess.run([sys.executable, "-m", "cowfs", "-o", opts, str(mnt)], check=True)
    return mnt


def run_lesson(pause: bool = False, keep: bool = False) -> int:
    console = Console(highlight=False, soft_wrap=True)
    scratch = Path(tempfile.mkdtemp(prefix="cowfs-lesson-"))
    env = {**os.environ, "LESSON": str(scratch)}
    mnt = _mount(scratch)
    upper = str(scratch / "upper")
    try:
        events = EventCollector(mount_record(str(mnt)))
        console.print(f"The example image is mounted at {mnt} (upper layer: {upper}).")
        for i, step in enumerate(STEPS, 1):
            console.print(Rule(f"{i}/{len(STEPS)}  {step.title}", align="left"))
            console.print(step.idea, style="italic")
            before = layer_lines(upper)
            for cmd in step.commands:
                _run(console, cmd, mnt, env)
            time.sleep(SETTLE_SECONDS)
            seen = events.drain()
            if seen:
                console.print("The daemon reported:", style="bold")
                for ev in seen:
                    console.print(f"  {ev.kind:<9} {ev.path}  {describe(ev)}",
                                  style=STYLES.get(ev.kind, ""), markup=False)
            delta = _upper_delta(before, layer_lines(upper))
            if delta:
                console.print("What landed in the upper layer:", style="bold")
                for line in delta:
                    console.print("  " + line, markup=False)
            if pause and i < len(STEPS):
                console.input("[dim]Enter: next step[/] ")
        console.print(Rule("end"))
    finally:
        if keep:
            console.print(f"Still mounted at {mnt}; unmount with: cowfs umount {mnt}")
        else:
            if subprocess.run(["umount", str(mnt)]).returncode != 0:
                console.print(f"cowfs: could not unmount {mnt}; left {scratch} as it is")
                return 1
            shutil.rmtree(scratch)
            console.print(f"Unmounted {mnt} and removed {scratch}.")
    return 0
