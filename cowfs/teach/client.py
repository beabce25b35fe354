"""Talking to a mount's control socket (cowfs/control.py) from the CLI."""
from __future__ import annotations

import json
import os
import socket
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass

from ..overlay.events import Event
from ..overlay.params import UsageError
from ..state import find_mount


class ControlError(OSError):
    """The daemon is unreachable or said no."""


@dataclass
class MountRecord:
    mountpoint: str
    lowerdirs: list[str]
    upperdir: str | None
    control: str

    @classmethod
    def of(cls, data: dict) -> MountRecord:
        return cls(data["mountpoint"], data["lowerdirs"], data.get("upperdir"),
                   data.get("control", ""))


def mount_record(mountpoint: str) -> MountRecord:
    rec = find_mount(mountpoint)
    if rec is None:
        raise UsageError(f"'{mountpoint}' is not a cowfs mount (no record of it)")
    return MountRecord.of(rec)


def mount_of(path: str) -> tuple[MountRecord, str] | None:
    """The cowfs mount holding path and path inside it, or None."""
    path = os.path.abspath(path)
    inside = ""
    while True:
        rec = find_mount(path)
        if rec is not None:
            return MountRecord.of(rec), inside or "/"
        parent, name = os.path.split(path)
        if parent == path:
            return None
        inside = "/" + name + inside
        path = parent


def _connect(rec: MountRecord) -> socket.socket:
    try:
        st = os.lstat(rec.control)
    except (FileNotFoundError, KeyError):
        raise ControlError(f"{rec.mountpoint} has no control socket (an older daemon?)") \
            from None
    # Only a socket made by root or by us is the daemon's: the run dir is shared.
    if st.st_uid not in (0, os.geteuid()):
        raise ControlError(f"{rec.control} belongs to uid {st.st_uid}, not to the daemon")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    try:
        sock.connect(rec.control)
    except OSError as e:
        sock.close()
        raise ControlError(f"cannot reach the daemon of {rec.mountpoint}: {e.strerror}") from None
    return sock


def _lines(sock: socket.socket) -> Iterator[dict]:
    with sock.makefile("rb") as f:
        for line in f:
            msg = json.loads(line)
            if "error" in msg:
                raise ControlError(msg["error"])
            yield msg


def request(rec: MountRecord, op: str) -> dict:
    with _connect(rec) as sock:
        sock.sendall(json.dumps({"op": op}).encode() + b"\n")
        for msg in _lines(sock):
            return msg
    raise ControlError(f"the daemon of {rec.mountpoint} closed the connection")


def subscribe(rec: MountRecord) -> Iterator[dict]:
    """Messages from the daemon: {"subscribed": true} once listening, then
    {"event": ...} or {"dropped": N}, until it goes."""
    sock = _connect(rec)
    try:
        sock.sendall(b'{"op": "subscribe"}\n')
        yield from _lines(sock)
    finally:
        sock.close()


class EventCollector:
    """A mount's events, gathered by a thread from the moment it is subscribed."""

    def __init__(self, rec: MountRecord, timeout: float = 10) -> None:
        self.events: list[Event] = []
        self._lock = threading.Lock()
        self._ready = threading.Event()
        self._stream = subscribe(rec)
        threading.Thread(target=self._run, daemon=True).start()
        if not self._ready.wait(timeout):
            raise ControlError(f"the daemon of {rec.mountpoint} did not answer")

    def _run(self) -> None:
        for msg in self._stream:
            if "subscribed" in msg:
                self._ready.set()
            elif "event" in msg:
                with self._lock:
                    self.events.append(Event.from_json(msg["event"]))

    def wait_for(self, kind: str, path: str, timeout: float = 10) -> list[Event]:
        """Every event so far, once one of kind at path is among them."""
        deadline = time.monotonic() + timeout
        while True:
            with self._lock:
                if any(e.kind == kind and e.path == path for e in self.events):
                    return list(self.events)
            if time.monotonic() > deadline:
                raise ControlError(f"no {kind} event for {path}")
            time.sleep(0.02)

    def drain(self) -> list[Event]:
        with self._lock:
            out, self.events = self.events, []
        return out
