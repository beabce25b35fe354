"""`cowfs trace | stats | explain (which) | watch | lesson`: seeing copy-on-write happen.

rich (tables, colour, the full-screen live view) is imported inside the commands
only: mounting never pays for it.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

from ..overlay.events import Event
from ..overlay.params import UsageError
from .client import ControlError, MountRecord, mount_of, mount_record, request, subscribe
from .explain import Explainer, render
from .render import STYLES, counter_rows, event_line


def _guard(func):
    def run(ns: argparse.Namespace) -> int:
        try:
            return func(ns)
        except (ControlError, OSError) as e:
            print(f"cowfs: {e}", file=sys.stderr)
            return 1
        except KeyboardInterrupt:
            return 130
    return run


def cmd_trace(ns: argparse.Namespace) -> int:
    rec = mount_record(ns.mountpoint)
    console = None
    if not ns.json:
        from rich.console import Console
        console = Console(highlight=False, soft_wrap=True)
    for msg in subscribe(rec):
        if "subscribed" in msg:
            print(f"cowfs: tracing {rec.mountpoint} (Ctrl-C to stop)", file=sys.stderr,
                  flush=True)
        elif ns.json:
            print(json.dumps(msg), flush=True)
        elif "dropped" in msg:
            console.print(f"[dim]... {msg['dropped']} events dropped (too slow)[/]")
        else:
            ev = Event.from_json(msg["event"])
            console.print(event_line(ev), style=STYLES.get(ev.kind, ""), markup=False)
    return 0


def cmd_stats(ns: argparse.Namespace) -> int:
    rec = mount_record(ns.mountpoint)
    if ns.json:
        print(json.dumps(request(rec, "stats")))
        return 0
    from rich.console import Console
    from rich.live import Live
    from rich.table import Table

    def table() -> Table:
        t = Table(title=f"cowfs {rec.mountpoint}", show_header=False, title_justify="left")
        for k, v in counter_rows(request(rec, "stats")):
            t.add_row(k, v)
        return t

    console = Console()
    if not ns.interval:
        console.print(table())
        return 0
    with Live(table(), console=console, auto_refresh=False) as live:
        while True:
            time.sleep(ns.interval)
            live.update(table(), refresh=True)


def _offline_roots(ns: argparse.Namespace) -> tuple[list[str], bool, list[str] | None]:
    if ns.image:
        from ..image.store import Store
        store = Store(ns.store)
        image = store.image(ns.image)
        ids = list(reversed(image.chain))   # store layers by chain ID, top first as lower_dirs
        return store.lower_dirs(image), False, [d.split(":", 1)[-1][:12] for d in ids]
    for d in ns.lower + ([ns.upper] if ns.upper else []):
        if not os.path.isdir(d):
            raise UsageError(f"layer '{d}' is not a directory")
    return ([ns.upper] if ns.upper else []) + ns.lower, bool(ns.upper), None


def cmd_explain(ns: argparse.Namespace) -> int:
    if ns.image and (ns.lower or ns.upper):
        raise UsageError("--image and --lower/--upper exclude each other")
    live = not ns.image and not ns.lower
    if ns.upper and not ns.lower:
        raise UsageError("--upper needs at least one --lower")
    results = []
    if live:
        for path in ns.paths:
            found = mount_of(path)
            if found is None:
                raise UsageError(f"'{path}' is not inside a cowfs mount "
                                 "(offline: --lower DIR ... or --image NAME)")
            rec, inside = found
            with _live_explainer(rec) as ex:
                results.append(ex.explain(inside))
    else:
        roots, has_upper, names = _offline_roots(ns)
        with Explainer(roots, has_upper, names) as ex:
            results = [ex.explain(p) for p in ns.paths]
    if ns.json:
        print(json.dumps([r.to_json() for r in results]))
    else:
        print("\n\n".join("\n".join(render(r)) for r in results))
    return 0 if all(r.visible for r in results) else 1   # like which(1)


def _live_explainer(rec: MountRecord) -> Explainer:
    roots = ([rec.upperdir] if rec.upperdir else []) + rec.lowerdirs
    return Explainer(roots, rec.upperdir is not None)


def cmd_watch(ns: argparse.Namespace) -> int:
    from .watch import run_watch
    return run_watch(mount_record(ns.mountpoint), ns.events)


def cmd_lesson(ns: argparse.Namespace) -> int:
    from .lesson import run_lesson
    return run_lesson(pause=ns.pause, keep=ns.keep)


def add_commands(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("trace", help="print a mount's copy-ups, whiteouts, ... as they happen")
    p.add_argument("mountpoint", metavar="MNT")
    p.add_argument("--json", action="store_true", help="JSON lines, for programs")
    p.set_defaults(func=_guard(cmd_trace))

    p = sub.add_parser("stats", help="a mount's counters")
    p.add_argument("mountpoint", metavar="MNT")
    p.add_argument("-i", "--interval", type=float, metavar="SECONDS",
                   help="refresh every SECONDS until Ctrl-C")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=_guard(cmd_stats))

    for name in ("explain", "which"):
        p = sub.add_parser(name, help="which layer serves a path, and what hides the others")
        p.add_argument("paths", nargs="+", metavar="PATH",
                       help="MNT/PATH on a live mount; a path in the layers offline")
        p.add_argument("--lower", action="append", default=[], metavar="DIR",
                       help="offline: a lower layer; repeat, top layer first")
        p.add_argument("--upper", metavar="DIR", help="offline: the upper layer")
        p.add_argument("--image", metavar="NAME", help="offline: an image in the store")
        p.add_argument("--store", metavar="DIR", help="the layer store (with --image)")
        p.add_argument("--json", action="store_true")
        p.set_defaults(func=_guard(cmd_explain))

    p = sub.add_parser("watch", help="full-screen live view of a mount's layers and events")
    p.add_argument("mountpoint", metavar="MNT")
    p.add_argument("--events", type=int, default=0, metavar="N",
                   help="latest events to show (default: what fits)")
    p.set_defaults(func=_guard(cmd_watch))

    p = sub.add_parser("lesson", help="copy-on-write step by step on the example image")
    p.add_argument("--pause", action="store_true", help="wait for Enter between steps")
    p.add_argument("--keep", action="store_true", help="leave the lesson's mount mounted")
    p.set_defaults(func=_guard(cmd_lesson))
