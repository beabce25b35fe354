"""`cowfs watch MNT`: a full-screen live view for the classroom projector.

rich, not textual: the view only displays (q quits), rich is already a
dependency of the CLI, starts in a fraction of textual's time and draws plain
ANSI that a tmux pane or a projector shows as is.  Layout: a header with the
counters and the upper's size, the layer stack side by side (upper on the left,
each change landing in it highlighted), the latest events at the bottom; every
part shrinks to fit, from 80x24 up.
"""
from __future__ import annotations

import collections
import os
import select
import stat
import sys
import termios
import threading
import time
import tty
from dataclasses import dataclass

from rich.console import Console, Group
from rich.layout import Layout
from rich.live import Live
from rich.panel import Panel
from rich.table import Table
from rich.text import Text

from ..overlay.format import Kind, classify, default_format, dir_marks, is_metacopy
from ..overlay.layers import xattr_path
from ..image.store import human_size
from ..overlay.events import Event
from .client import ControlError, MountRecord, request, subscribe
from .explain import layer_labels
from .render import STYLES, describe

MAX_ENTRIES = 5000   # per layer: a whole rootfs is not what a projector shows
RECENT_SECONDS = 10  # an upper entry stays highlighted this long after its event
REFRESH_SECONDS = 0.5


@dataclass
class Line:
    path: str        # in the layer, "/"-rooted: for highlighting
    depth: int
    name: str
    kind: str        # "dir", "file", "whiteout", ...
    mark: str = ""   # opaque, -> redirect, metadata only


def layer_lines(root: str) -> list[Line]:
    """A layer's tree, depth first, with the overlay marks of each entry."""
    out: list[Line] = []
    fd = os.open(root, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        _walk(fd, "", 0, out)
    finally:
        os.close(fd)
    return out


FMT = default_format()   # the namespace this user's mounts write


def _walk(fd: int, prefix: str, depth: int, out: list[Line]) -> None:
    for name in sorted(os.listdir(fd)):
        if len(out) >= MAX_ENTRIES:
            return
        b = os.fsencode(name)
        try:
            st = os.stat(b, dir_fd=fd, follow_symlinks=False)
        except FileNotFoundError:   # the upper changes while we look
            continue
        what = classify(FMT, fd, b, st, None)
        if what.kind is Kind.MARKER:
            continue
        path = f"{prefix}/{name}"
        target = what.target if what.kind is Kind.WHITEOUT else None
        if target is not None:
            out.append(Line(f"{prefix}/{os.fsdecode(target)}", depth, os.fsdecode(target),
                            "whiteout"))
        elif stat.S_ISDIR(st.st_mode):
            try:
                cfd = os.open(b, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC,
                              dir_fd=fd)
            except FileNotFoundError:
                continue
            try:
                value = FMT.get(xattr_path(fd, b), "redirect")
                mark = "opaque" if dir_marks(FMT, cfd).opaque else \
                    (f"-> {os.fsdecode(value)}" if value is not None else "")
                out.append(Line(path, depth, name, "dir", mark))
                _walk(cfd, path, depth + 1, out)
            finally:
                os.close(cfd)
        else:
            mark = "metadata only" if stat.S_ISREG(st.st_mode) \
                and is_metacopy(FMT, xattr_path(fd, b)) else ""
            out.append(Line(path, depth, name, "file" if stat.S_ISREG(st.st_mode) else "other",
                            mark))


def _line_text(line: Line, recent: bool) -> Text:
    t = Text("  " * line.depth, no_wrap=True, overflow="ellipsis")
    if line.kind == "whiteout":
        t.append(f"x {line.name}", style="bold red")
    elif line.kind == "dir":
        t.append(line.name + "/", style="bold blue")
    else:
        t.append(line.name)
    if line.mark:
        t.append(f" [{line.mark}]", style="magenta" if line.mark == "opaque" else "cyan")
    if recent:
        t.stylize("reverse")
    return t


def _fit(lines: list[Line], height: int, recent: set[str]) -> list[Text]:
    """At most height lines; when they do not fit, the recent changes and their
    parents stay."""
    if len(lines) <= height:
        return [_line_text(ln, ln.path in recent) for ln in lines]
    keep = {ln.path for ln in lines if ln.path in recent}
    keep |= {p[:i] for p in keep for i in range(1, len(p)) if p[i] == "/"}
    chosen = [ln for ln in lines if ln.path in keep][:height - 1]
    for ln in lines:
        if len(chosen) >= height - 1:
            break
        if ln not in chosen:
            chosen.append(ln)
    order = {id(ln): i for i, ln in enumerate(lines)}
    chosen.sort(key=lambda ln: order[id(ln)])
    more = Text(f"... {len(lines) - len(chosen)} more", style="dim")
    return [_line_text(ln, ln.path in recent) for ln in chosen] + [more]


class Watch:
    def __init__(self, rec: MountRecord, max_events: int) -> None:
        self.rec = rec
        self.max_events = max_events
        self.roots = ([rec.upperdir] if rec.upperdir else []) + rec.lowerdirs
        self.labels = layer_labels(len(self.roots), rec.upperdir is not None)
        self.lower_lines = {r: layer_lines(r) for r in rec.lowerdirs}  # immutable
        self.events: collections.deque[Event] = collections.deque(maxlen=200)
        self.dropped = 0
        self.stats: dict | None = None
        self.gone = ""
        threading.Thread(target=self._listen, daemon=True).start()

    def _listen(self) -> None:
        try:
            for msg in subscribe(self.rec):
                if "event" in msg:
                    self.events.append(Event.from_json(msg["event"]))
                elif "dropped" in msg:
                    self.dropped = msg["dropped"]
        except (ControlError, OSError, ValueError) as e:
            self.gone = str(e)
        self.gone = self.gone or "the daemon went away (unmounted?)"

    def _header(self) -> Text:
        t = Text(f"cowfs watch {self.rec.mountpoint}", style="bold")
        if self.stats:
            c, u = self.stats["counters"], self.stats["upper"]
            t.append(f"   upper: {u['entries']} entries, {human_size(u['bytes'])}", style="bold")
            t.append(f"\ncopy-ups {c['copy_ups']} ({human_size(c['copy_up_bytes'])})  "
                     f"whiteouts {c['whiteouts']}  opaque {c['opaque_dirs']}  "
                     f"redirects {c['redirects']}  new {c['upper_creates']}")
        if self.gone:
            t.append(f"\n{self.gone}", style="bold red")
        else:
            t.append("   (q quits)", style="dim")
        return t

    def _layers(self, height: int) -> Table:
        now = time.time()
        recent = {e.path for e in self.events if now - e.time < RECENT_SECONDS}
        grid = Table.grid(expand=True, padding=(0, 1))
        cells = []
        for root, label in zip(self.roots, self.labels):
            lines = self.lower_lines.get(root) if root in self.lower_lines else layer_lines(root)
            # (the dir's name inside: a title too long for 80 columns would be cut)
            name = Text(os.path.basename(os.path.normpath(root)), style="dim", no_wrap=True,
                        overflow="ellipsis")
            body = _fit(lines, max(1, height - 3), recent if label == "upper" else set())
            style = "yellow" if label == "upper" else "blue"
            grid.add_column(ratio=1, min_width=12)
            cells.append(Panel(Group(name, *body) if body else
                               Group(name, Text("(empty)", style="dim")),
                               title=label, title_align="left", border_style=style,
                               height=height))
        grid.add_row(*cells)
        return grid

    def _events(self, height: int) -> Panel:
        shown = list(self.events)[-max(1, height - 2):]
        lines = []
        for ev in shown:
            t = Text(no_wrap=True, overflow="ellipsis")
            t.append(time.strftime("%H:%M:%S ", time.localtime(ev.time)), style="dim")
            t.append(f"{ev.kind:<9} ", style=STYLES.get(ev.kind, ""))
            t.append(f"{ev.path}  ")
            t.append(describe(ev), style="dim")
            lines.append(t)
        if self.dropped:
            lines.append(Text(f"({self.dropped} events dropped)", style="dim"))
        return Panel(Group(*lines) if lines else Text("waiting for a change...", style="dim"),
                     title="latest events", title_align="left")

    def render(self, height: int) -> Layout:
        """Everything in exactly `height` lines: the events get a third (or what
        --events asks), the layers the rest, down to a pane of a dozen lines."""
        header = 3 if height >= 16 else 2
        events = self.max_events + 2 if self.max_events else min(12, max(3, height // 3))
        events = max(3, min(events, height - header - 4))
        layout = Layout()
        layout.split_column(Layout(self._header(), size=header),
                            Layout(self._layers(max(4, height - header - events))),
                            Layout(self._events(events), size=events))
        return layout

    def refresh_stats(self) -> None:
        try:
            self.stats = request(self.rec, "stats")
        except (ControlError, OSError) as e:
            self.gone = str(e)


def _key_pressed(timeout: float) -> str:
    if not sys.stdin.isatty():
        time.sleep(timeout)
        return ""
    ready, _, _ = select.select([sys.stdin], [], [], timeout)
    return os.read(sys.stdin.fileno(), 16).decode(errors="replace") if ready else ""


def run_watch(rec: MountRecord, max_events: int = 0) -> int:
    w = Watch(rec, max_events)
    console = Console()
    old = termios.tcgetattr(sys.stdin) if sys.stdin.isatty() else None
    try:
        if old is not None:
            tty.setcbreak(sys.stdin)
        w.refresh_stats()
        with Live(console=console, screen=True, auto_refresh=False) as live:
            last_stats = time.monotonic()
            while True:
                if sys.stdout.isatty():
                    # the pane's size now: LINES/COLUMNS in the environment go stale
                    console.size = os.get_terminal_size(sys.stdout.fileno())
                live.update(w.render(console.height), refresh=True)
                if "q" in _key_pressed(REFRESH_SECONDS).lower():
                    return 0
                if time.monotonic() - last_stats > 1:
                    w.refresh_stats()
                    last_stats = time.monotonic()
    except KeyboardInterrupt:
        return 0
    finally:
        if old is not None:
            termios.tcsetattr(sys.stdin, termios.TCSADRAIN, old)
