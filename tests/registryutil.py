"""Helpers for the registry tests: Debian's docker-registry started on 127.0.0.1
(private config and storage, stopped by PID), images from examples/image, skopeo."""
from __future__ import annotations

import contextlib
import io
import os
import shutil
import signal
import socket
import subprocess
import tarfile
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from .imageutil import MTIME, write_layout

REGISTRY_BIN = shutil.which("docker-registry")
SKOPEO = shutil.which("skopeo")
EXAMPLES = Path(__file__).resolve().parent.parent / "examples" / "image"
needs_registry = pytest.mark.skipif(REGISTRY_BIN is None,
                                    reason="docker-registry is not installed (scripts/setup --slow)")
needs_skopeo = pytest.mark.skipif(SKOPEO is None,
                                  reason="skopeo is not installed (scripts/setup --slow)")


def tar_dir(root: Path, extra: dict[str, bytes] | None = None) -> bytes:
    """A reproducible layer tar of root's tree (owner root, fixed mtimes), plus extra files."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tf:
        for dirpath, dirnames, filenames in os.walk(root):
            dirnames.sort()
            for name in sorted(dirnames) + sorted(filenames):
                p = Path(dirpath) / name
                ti = tf.gettarinfo(str(p), str(p.relative_to(root)))
                ti.uid = ti.gid = 0
                ti.uname = ti.gname = ""
                ti.mtime = MTIME
                if ti.isfile():
                    with open(p, "rb") as f:
                        tf.addfile(ti, f)
                else:
                    tf.addfile(ti)
        for name in sorted({os.path.dirname(n) for n in extra or {}} - {""}):
            ti = tarfile.TarInfo(name)
            ti.type, ti.mode, ti.mtime = tarfile.DIRTYPE, 0o755, MTIME
            tf.addfile(ti)
        for name, data in (extra or {}).items():
            ti = tarfile.TarInfo(name)
            ti.size, ti.mode, ti.mtime = len(data), 0o644, MTIME
            tf.addfile(ti, io.BytesIO(data))
    return buf.getvalue()


def example_layers(pad: int = 0) -> list[bytes]:
    """The three layers of examples/image, each with pad random bytes more
    (random, so gzip cannot shrink them: sizes on the wire stay as asked)."""
    return [tar_dir(d, {f"pad/{d.name}.bin": os.urandom(pad)} if pad else None)
            for d in sorted(EXAMPLES.iterdir())]


def example_layout(layout: Path, tag: str = "v1", pad: int = 0) -> dict:
    return write_layout(layout, tag, example_layers(pad))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class RegistryServer:
    """docker-registry with its own config, storage and log in dir."""
    dir: Path
    tls: tuple[Path, Path] | None = None          # (cert, key)
    htpasswd: Path | None = None
    port: int = field(default_factory=free_port)
    proc: subprocess.Popen | None = None

    @property
    def host(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def storage(self) -> Path:
        return self.dir / "storage"

    @property
    def log(self) -> Path:
        return self.dir / "registry.log"

    def config(self) -> str:
        cfg = (f"version: 0.1\nlog:\n  level: info\n  accesslog:\n    disabled: false\n"
               f"storage:\n  filesystem:\n    rootdirectory: {self.storage}\n"
               f"  delete:\n    enabled: true\n"
               f"http:\n  addr: {self.host}\n")
        if self.tls:
            cfg += f"  tls:\n    certificate: {self.tls[0]}\n    key: {self.tls[1]}\n"
        if self.htpasswd:
            cfg += f"auth:\n  htpasswd:\n    realm: cowfs-test\n    path: {self.htpasswd}\n"
        return cfg

    def start(self) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        (self.dir / "config.yml").write_text(self.config())
        log = open(self.log, "ab")
        self.proc = subprocess.Popen([REGISTRY_BIN or "docker-registry", "serve",
                                      str(self.dir / "config.yml")],
                                     stdout=log, stderr=log, stdin=subprocess.DEVNULL)
        log.close()
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"docker-registry exited: {self.log.read_text()[-2000:]}")
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.5):
                    return
            except OSError:
                time.sleep(0.05)
        self.stop()
        raise RuntimeError("docker-registry did not start listening")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None

    def blob_gets(self) -> list[str]:
        """The blob GETs the registry has served, from its access log."""
        return [line for line in self.log.read_text().splitlines()
                if '"GET /v2/' in line and "/blobs/sha256:" in line]

    def blob_file(self, digest: str) -> Path:
        hexd = digest.split(":", 1)[1]
        return self.storage / "docker/registry/v2/blobs/sha256" / hexd[:2] / hexd / "data"

    def manifest_digest(self, repo: str, tag: str) -> str:
        """The digest the registry keeps for repo:tag (from its storage, no HTTP)."""
        link = self.storage / f"docker/registry/v2/repositories/{repo}/_manifests/tags/{tag}" \
            / "current/link"
        return link.read_text().strip()


@contextlib.contextmanager
def running(server: RegistryServer) -> Iterator[RegistryServer]:
    """The server started, and stopped (by PID) however the block ends."""
    server.start()
    try:
        yield server
    finally:
        server.stop()


def skopeo(*args: str) -> subprocess.CompletedProcess:
    res = subprocess.run([SKOPEO or "skopeo", "--insecure-policy", *args],
                         capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, f"skopeo {' '.join(args)}: {res.stderr[-2000:]}"
    return res


class CuttingProxy:
    """A TCP proxy in front of a registry: counts the bytes it hands to clients,
    notes each request line and Range header, and once more than cut_after
    bytes have gone out calls on_cut (e.g. stop the registry) and drops every
    open connection, as a dying server does."""

    def __init__(self, upstream: int, cut_after: int | None = None,
                 on_cut: Callable[[], None] | None = None) -> None:
        self.upstream, self.cut_after, self.on_cut = upstream, cut_after, on_cut
        self.sent = 0
        self.requests: list[str] = []
        self._lock = threading.Lock()
        self._socks: list[socket.socket] = []
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port = self._listener.getsockname()[1]
        self._thread = threading.Thread(target=self._accept, daemon=True)
        self._thread.start()

    @property
    def host(self) -> str:
        return f"127.0.0.1:{self.port}"

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            try:
                server = socket.create_connection(("127.0.0.1", self.upstream), timeout=5)
            except OSError:
                client.close()  # nothing behind us: the client sees a reset connection
                continue
            with self._lock:
                self._socks += [client, server]
            threading.Thread(target=self._pump, args=(client, server, False), daemon=True).start()
            threading.Thread(target=self._pump, args=(server, client, True), daemon=True).start()

    def _pump(self, src: socket.socket, dst: socket.socket, to_client: bool) -> None:
        try:
            while data := src.recv(65536):
                if not to_client:
                    self._note(data)
                dst.sendall(data)
                if to_client:
                    self._count(len(data))
        except OSError:
            pass
        finally:
            for s in (src, dst):
                with contextlib.suppress(OSError):
                    s.shutdown(socket.SHUT_RDWR)

    def _note(self, data: bytes) -> None:
        text = data.decode("latin-1")
        for line in text.split("\r\n"):
            if line.startswith(("GET ", "HEAD ", "PUT ", "POST ", "PATCH ")):
                self.requests.append(line.rsplit(" ", 1)[0])
            elif line.lower().startswith("range:"):
                self.requests[-1] += " " + line.split(":", 1)[1].strip()

    def _count(self, n: int) -> None:
        with self._lock:
            self.sent += n
            fire = self.cut_after is not None and self.sent > self.cut_after
            if fire:
                self.cut_after = None
        if fire:
            if self.on_cut:
                self.on_cut()
            self.drop()

    def drop(self) -> None:
        with self._lock:
            socks, self._socks = self._socks, []
        for s in socks:
            with contextlib.suppress(OSError):
                s.shutdown(socket.SHUT_RDWR)
            s.close()

    def close(self) -> None:
        self._listener.close()
        self.drop()
        self._thread.join(5)


def make_ca_and_cert(d: Path) -> tuple[Path, Path, Path]:
    """(ca.pem, server cert, server key): a throwaway CA and a cert for 127.0.0.1."""
    d.mkdir(parents=True, exist_ok=True)

    def ssl(*args: str) -> None:
        subprocess.run(["openssl", *args], check=True, capture_output=True, cwd=d)
    ssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", "ca.key", "-out", "ca.pem",
        "-days", "2", "-subj", "/CN=cowfs test CA")
    ssl("req", "-newkey", "rsa:2048", "-nodes", "-keyout", "srv.key", "-out", "srv.csr",
        "-subj", "/CN=127.0.0.1")
    (d / "ext.cnf").write_text("subjectAltName=IP:127.0.0.1\nbasicConstraints=CA:FALSE\n"
                               "authorityKeyIdentifier=keyid\nextendedKeyUsage=serverAuth\n")
    ssl("x509", "-req", "-in", "srv.csr", "-CA", "ca.pem", "-CAkey", "ca.key",
        "-CAcreateserial", "-out", "srv.pem", "-days", "2", "-extfile", "ext.cnf")
    return d / "ca.pem", d / "srv.pem", d / "srv.key"
