"""A mount's control socket: its events and counters, for `cowfs trace/stats/watch`.

One unix socket per mount in the run dir (state.control_socket_path), mode 0600,
owned by the daemon's user; a peer whose SO_PEERCRED uid is neither that user
nor root is refused.  It is served by daemon threads with blocking sockets: the
threads only read the overlay's counters and drain their own bounded event queue
(see overlay/events.py), they never touch the overlay's inodes.

Protocol: the client sends one JSON line, the server answers with JSON lines.
  {"op": "info"}       -> {"mountpoint", "lowerdirs", "upperdir", "pid"}
  {"op": "stats"}      -> {"counters": {...}, "upper": {...}, "listeners", "refused"}
  {"op": "subscribe"}  -> {"event": {...}} per event, {"dropped": N} after losses,
                          until the client closes
  anything else        -> {"error": "..."}
"""
from __future__ import annotations

import json
import logging
import os
import select
import socket
import stat
import struct
import tempfile
import threading
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING

from .state import RUN_DIR, control_socket_path, make_run_dir

if TYPE_CHECKING:
    from .overlay import Overlay
    from .overlay.params import MountConfig

log = logging.getLogger("cowfs")

MAX_REQUEST = 4096
POLL_SECONDS = 0.5
QUEUE_SIZE = 4096
CLIENT_TIMEOUT = 30.0


@dataclass
class UpperUsage:
    entries: int = 0
    files: int = 0
    bytes: int = 0   # apparent size of the regular files
    disk: int = 0    # blocks allocated


def upper_usage(root: str) -> UpperUsage:
    """What the upper layer holds now (walked without following symlinks)."""
    u = UpperUsage()
    stack = [root]
    while stack:
        path = stack.pop()
        try:
            with os.scandir(path) as it:
                for e in it:
                    st = e.stat(follow_symlinks=False)
                    u.entries += 1
                    u.disk += st.st_blocks * 512
                    if stat.S_ISREG(st.st_mode):
                        u.files += 1
                        u.bytes += st.st_size
                    elif stat.S_ISDIR(st.st_mode):
                        stack.append(e.path)
        except FileNotFoundError:   # removed while we walked: the mount is busy
            continue
    return u


def peer_uid(conn: socket.socket) -> int:
    creds = conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    return struct.unpack("3i", creds)[1]


def _send(conn: socket.socket, obj: dict) -> None:
    conn.sendall(json.dumps(obj).encode() + b"\n")


class ControlServer:
    def __init__(self, overlay: Overlay, cfg: MountConfig) -> None:
        self.overlay = overlay
        self.cfg = cfg
        self.owner = os.geteuid()
        self.path = control_socket_path(cfg.mountpoint)
        self.refused = 0
        self._closing = threading.Event()
        self._conns: set[socket.socket] = set()
        self._lock = threading.Lock()
        self._sock = self._listen()
        self._thread = threading.Thread(target=self._accept_loop, name="cowfs-control",
                                        daemon=True)
        self._thread.start()

    def _listen(self) -> socket.socket:
        """Bind in a fresh 0700 dir, restrict, then rename into place: the socket is
        never reachable with looser permissions (the daemon's umask is 0)."""
        make_run_dir()
        private = tempfile.mkdtemp(prefix=".ctl-", dir=RUN_DIR)
        tmp = os.path.join(private, "s")
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        try:
            sock.bind(tmp)
            os.chmod(tmp, 0o600)
            os.chown(tmp, self.owner, os.getegid())
            sock.listen(16)
            self._ino = os.stat(tmp).st_ino
            os.replace(tmp, self.path)   # a stale socket of a dead daemon goes
        except BaseException:
            sock.close()
            raise
        finally:
            if os.path.lexists(tmp):
                os.unlink(tmp)
            os.rmdir(private)
        return sock

    def close(self) -> None:
        self._closing.set()
        try:
            # Only our own: a new mount at the same place may have replaced it.
            if os.stat(self.path).st_ino == self._ino:
                os.unlink(self.path)
        except FileNotFoundError:
            pass
        self._sock.shutdown(socket.SHUT_RDWR)   # wakes accept()
        self._sock.close()
        with self._lock:
            conns = list(self._conns)
        for c in conns:
            try:
                c.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        self._thread.join(timeout=2)

    def _accept_loop(self) -> None:
        while not self._closing.is_set():
            try:
                conn, _ = self._sock.accept()
            except OSError:
                return   # closed
            threading.Thread(target=self._serve, args=(conn,), name="cowfs-control-client",
                             daemon=True).start()

    def _serve(self, conn: socket.socket) -> None:
        with self._lock:
            self._conns.add(conn)
        # A client that neither asks nor reads (for this long) is let go.
        conn.settimeout(CLIENT_TIMEOUT)
        try:
            uid = peer_uid(conn)
            if uid not in (self.owner, 0):
                self.refused += 1
                _send(conn, {"error": f"uid {uid} may not use this mount's control socket"})
                return
            self._dispatch(conn, self._request(conn))
        except (OSError, ValueError) as e:
            log.debug("control client: %s", e)
        finally:
            with self._lock:
                self._conns.discard(conn)
            conn.close()

    def _request(self, conn: socket.socket) -> dict:
        buf = b""
        while b"\n" not in buf and len(buf) < MAX_REQUEST:
            chunk = conn.recv(MAX_REQUEST)
            if not chunk:
                break
            buf += chunk
        req = json.loads(buf.split(b"\n", 1)[0] or b"{}")
        if not isinstance(req, dict):
            raise ValueError("request is not a JSON object")
        return req

    def _dispatch(self, conn: socket.socket, req: dict) -> None:
        op = req.get("op")
        if op == "info":
            _send(conn, {"mountpoint": self.cfg.mountpoint, "lowerdirs": self.cfg.lowerdirs,
                         "upperdir": self.cfg.upperdir, "pid": os.getpid()})
        elif op == "stats":
            usage = upper_usage(self.cfg.upperdir) if self.cfg.upperdir else UpperUsage()
            _send(conn, {"counters": self.overlay.events.snapshot().to_json(),
                         "upper": asdict(usage),
                         "listeners": len(self.overlay.events.listeners),
                         "refused": self.refused})
        elif op == "subscribe":
            self._stream(conn)
        else:
            _send(conn, {"error": f"unknown op {op!r}"})

    def _stream(self, conn: socket.socket) -> None:
        bus = self.overlay.events
        sub = bus.subscribe(QUEUE_SIZE)
        reported = 0
        try:
            _send(conn, {"subscribed": True})
            while not self._closing.is_set():
                ev = sub.get(POLL_SECONDS)
                if sub.dropped != reported:
                    reported = sub.dropped
                    _send(conn, {"dropped": reported})
                if ev is not None:
                    _send(conn, {"event": ev.to_json()})
                elif _hung_up(conn):
                    return
        finally:
            bus.unsubscribe(sub)


def _hung_up(conn: socket.socket) -> bool:
    """Has a subscriber closed its end? (It sends nothing after its request.)"""
    readable, _, _ = select.select([conn], [], [], 0)
    return bool(readable) and conn.recv(1, socket.MSG_PEEK) == b""


def start(overlay: Overlay, cfg: MountConfig) -> ControlServer:
    """Serve the mount's control socket from a daemon thread until .close()."""
    return ControlServer(overlay, cfg)
