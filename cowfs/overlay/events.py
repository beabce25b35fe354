"""What the overlay does, for people watching it: events and counters.

The core reports each copy-up, whiteout, opaque directory, redirect, new upper
entry and orphan through one EventBus per Overlay (`ov.events`).  Counters are
plain ints, always kept; an Event (and the path it names) is only built when
someone listens, so with nobody listening a report costs a method call, a lock
and an int increment.

Threads: reports come from the daemon's request threads; listeners (the control
socket's clients) each get a bounded queue.  A listener that lags loses events
(counted in its `dropped`), it never slows the filesystem down.

Wiring for the FUSE transport (not the core's business):
  ov.events.request_counts             a callable: requests served per operation
  ov.events.count_cache_hit()         a reply served from a cache (no layer touched)
  ov.events.count_passthrough_open()  an open handed to the kernel's passthrough
"""
from __future__ import annotations

import queue
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, fields
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .inodes import Node

# Event kinds, in the order a lesson meets them.
COPY_UP = "copy-up"
CREATE = "create"
WHITEOUT = "whiteout"
OPAQUE = "opaque"
REDIRECT = "redirect"
ORPHAN_KEPT = "orphan-kept"
ORPHAN_DELETED = "orphan-deleted"
KINDS = (COPY_UP, CREATE, WHITEOUT, OPAQUE, REDIRECT, ORPHAN_KEPT, ORPHAN_DELETED)


@dataclass(frozen=True)
class Event:
    kind: str
    path: str                    # in the merged view, "/"-rooted
    time: float                  # time.time() when it was reported
    layer: int | None = None     # copy-up: the layer it came from (1 = top lower)
    bytes: int = 0               # copy-up: data bytes copied
    metadata_only: bool = False  # copy-up: metacopy placeholder, data stays below
    ms: float = 0.0              # copy-up: time taken
    detail: str = ""             # redirect target, file type, ...

    def to_json(self) -> dict:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict) -> Event:
        return cls(**{f.name: data[f.name] for f in fields(cls) if f.name in data})


@dataclass
class Counters:
    copy_ups: int = 0
    copy_up_bytes: int = 0
    metacopy_ups: int = 0        # metadata-only copy-ups (among copy_ups)
    whiteouts: int = 0
    opaque_dirs: int = 0
    redirects: int = 0
    upper_creates: int = 0
    orphans_kept: int = 0
    orphans_deleted: int = 0
    cache_hits: int = 0          # wired by the transport
    passthrough_opens: int = 0   # wired by the transport
    requests: dict[str, int] = field(default_factory=dict)  # by operation name

    def to_json(self) -> dict:
        return asdict(self)


class Subscriber:
    """One listener's bounded queue of events."""

    def __init__(self, maxsize: int) -> None:
        self.queue: queue.Queue[Event] = queue.Queue(maxsize)
        self.dropped = 0

    def offer(self, event: Event) -> None:
        try:
            self.queue.put_nowait(event)
        except queue.Full:
            self.dropped += 1

    def get(self, timeout: float) -> Event | None:
        try:
            return self.queue.get(timeout=timeout)
        except queue.Empty:
            return None


def node_path(node: Node) -> str:
    parts: list[bytes] = []
    n: Node | None = node
    while n is not None and n.parent is not None:
        parts.append(n.name)
        n = n.parent
    return "/" + "/".join(p.decode(errors="surrogateescape") for p in reversed(parts))


def child_path(parent: Node, name: bytes) -> str:
    base = node_path(parent)
    return base.rstrip("/") + "/" + name.decode(errors="surrogateescape")


class EventBus:
    def __init__(self) -> None:
        self.counters = Counters()
        # Replaced, never mutated: reporters read it without the lock.
        self.listeners: tuple[Subscriber, ...] = ()
        self._lock = threading.Lock()
        # Requests served per operation, as the server counts them.
        self.request_counts: Callable[[], dict[str, int]] | None = None

    # -- listeners (the control socket) ------------------------------------
    def subscribe(self, maxsize: int = 1024) -> Subscriber:
        sub = Subscriber(maxsize)
        with self._lock:
            self.listeners = self.listeners + (sub,)
        return sub

    def unsubscribe(self, sub: Subscriber) -> None:
        with self._lock:
            self.listeners = tuple(s for s in self.listeners if s is not sub)

    def snapshot(self) -> Counters:
        with self._lock:
            c = Counters(**{f.name: getattr(self.counters, f.name)
                            for f in fields(Counters) if f.name != "requests"})
            c.requests = dict(self.counters.requests)
        if self.request_counts is not None:
            c.requests = self.request_counts()
        return c

    def _emit(self, event: Event) -> None:
        for sub in self.listeners:
            sub.offer(event)

    # -- the server's counters (called under the core's lock) -------------------
    def count_cache_hit(self) -> None:
        self.counters.cache_hits += 1

    def count_passthrough_open(self) -> None:
        self.counters.passthrough_opens += 1

    # -- the core's reports ----------------------------------------------------
    def copied_up(self, node: Node, layer: int | None, nbytes: int, metadata_only: bool,
                  started_ns: int) -> None:
        """node now lives in the upper layer; it came from `layer`."""
        with self._lock:
            c = self.counters
            c.copy_ups += 1
            c.copy_up_bytes += nbytes
            c.metacopy_ups += metadata_only
        if self.listeners:
            ms = (time.perf_counter_ns() - started_ns) / 1e6
            self._emit(Event(COPY_UP, node_path(node), time.time(), layer, nbytes,
                             metadata_only, round(ms, 3),
                             "directory" if node.is_dir else ""))

    def whiteout(self, parent: Node, name: bytes) -> None:
        with self._lock:
            self.counters.whiteouts += 1
        if self.listeners:
            self._emit(Event(WHITEOUT, child_path(parent, name), time.time()))

    def opaque(self, parent: Node, name: bytes) -> None:
        with self._lock:
            self.counters.opaque_dirs += 1
        if self.listeners:
            self._emit(Event(OPAQUE, child_path(parent, name), time.time()))

    def redirect(self, node: Node, value: bytes) -> None:
        with self._lock:
            self.counters.redirects += 1
        if self.listeners:
            self._emit(Event(REDIRECT, node_path(node), time.time(),
                             detail=value.decode(errors="surrogateescape")))

    def created(self, node: Node) -> None:
        with self._lock:
            self.counters.upper_creates += 1
        if self.listeners:
            self._emit(Event(CREATE, node_path(node), time.time()))

    def orphan(self, node: Node, kept: bool) -> None:
        """A deleted file still held open moved to work/ (kept), or went for good."""
        with self._lock:
            if kept:
                self.counters.orphans_kept += 1
            else:
                self.counters.orphans_deleted += 1
        if self.listeners:
            self._emit(Event(ORPHAN_KEPT if kept else ORPHAN_DELETED, node_path(node),
                             time.time()))
