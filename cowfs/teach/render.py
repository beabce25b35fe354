"""Events and counters as text for people: one line per event, coloured by kind."""
from __future__ import annotations

import time

from ..image.store import human_size
from ..overlay.events import (COPY_UP, CREATE, OPAQUE, ORPHAN_DELETED, ORPHAN_KEPT,
                              REDIRECT, WHITEOUT, Event)

# rich style names, one per kind
STYLES = {COPY_UP: "bold yellow", CREATE: "green", WHITEOUT: "bold red", OPAQUE: "magenta",
          REDIRECT: "cyan", ORPHAN_KEPT: "dim", ORPHAN_DELETED: "dim"}


def layer_name(layer: int | None) -> str:
    return "?" if layer is None else ("upper" if layer == 0 else f"lower {layer}")


def describe(ev: Event) -> str:
    """What happened, after the kind and path."""
    if ev.kind == COPY_UP:
        what = "metadata only" if ev.metadata_only else (
            "directory" if ev.detail == "directory" else human_size(ev.bytes))
        return f"from {layer_name(ev.layer)}, {what}, {ev.ms:.1f} ms"
    if ev.kind == REDIRECT:
        return f"lower contents at {ev.detail}"
    if ev.kind == WHITEOUT:
        return "hides the lower layers' entry"
    if ev.kind == OPAQUE:
        return "hides the lower layers' directory contents"
    if ev.kind == ORPHAN_KEPT:
        return "deleted while open: kept in work/"
    if ev.kind == ORPHAN_DELETED:
        return "last user gone: removed from work/"
    return "new in the upper"


def event_line(ev: Event) -> str:
    stamp = time.strftime("%H:%M:%S", time.localtime(ev.time)) + f".{int(ev.time * 1000) % 1000:03d}"
    return f"{stamp} {ev.kind:<14} {ev.path}  {describe(ev)}"


def counter_rows(stats: dict) -> list[tuple[str, str]]:
    c, u = stats["counters"], stats["upper"]
    rows = [("copy-ups", f"{c['copy_ups']} ({c['metacopy_ups']} metadata-only), "
                         f"{human_size(c['copy_up_bytes'])} copied"),
            ("whiteouts", str(c["whiteouts"])),
            ("opaque dirs", str(c["opaque_dirs"])),
            ("redirects", str(c["redirects"])),
            ("new in upper", str(c["upper_creates"])),
            ("orphans", f"{c['orphans_kept']} kept, {c['orphans_deleted']} deleted"),
            ("cache hits", str(c["cache_hits"])),
            ("passthrough opens", str(c["passthrough_opens"])),
            ("upper", f"{u['entries']} entries, {u['files']} files, "
                      f"{human_size(u['bytes'])} ({human_size(u['disk'])} on disk)")]
    reqs = c["requests"]
    if reqs:
        rows.append(("requests", ", ".join(f"{k} {v}" for k, v in
                                           sorted(reqs.items(), key=lambda kv: -kv[1]))))
    return rows
