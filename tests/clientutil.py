"""Helpers for the real-client tests (containerd, podman): an image with a shell,
the cowfs command on PATH, waiting for sockets, stopping what a test started."""
from __future__ import annotations

import io
import json
import os
import shutil
import signal
import subprocess
import sys
import tarfile
import time
from collections.abc import Callable
from pathlib import Path

from .imageutil import shell_layer, write_layout

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = ROOT / "examples" / "image"


def dir_layer(path: Path) -> bytes:
    """A layer directory as a tar (its `.wh.` files are OCI whiteouts)."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tf:
        for name in sorted(os.listdir(path)):
            tf.add(path / name, arcname=name)
    return buf.getvalue()


def sh_layer() -> bytes:
    """The host's shell and its libraries, with /bin a real directory holding sh
    (the example image has a /bin directory, which would hide a merged-usr symlink)."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=io.BytesIO(shell_layer())) as src, \
            tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as out:
        for m in src:
            if m.name != "bin" and not m.name.startswith("bin/"):
                out.addfile(m, src.extractfile(m) if m.isreg() else None)
        sh = Path(os.path.realpath("/bin/sh")).read_bytes()
        for name, data in (("bin", None), ("bin/sh", sh)):
            ti = tarfile.TarInfo(name)
            ti.type = tarfile.DIRTYPE if data is None else tarfile.REGTYPE
            ti.mode, ti.size = 0o755, len(data or b"")
            out.addfile(ti, io.BytesIO(data) if data else None)
    return buf.getvalue()


def example_layout(layout: Path, tag: str = "example", image_name: str | None = None,
                   extra: list[bytes] | None = None) -> str:
    """examples/image's three layers over a layer with the host's /bin/sh (and the
    extra layers on top), as an OCI layout; image_name also goes into the index as
    containerd's image name."""
    layers = [sh_layer()] + [dir_layer(EXAMPLES / d) for d in ("1-base", "2-app", "3-update")]
    layers += extra or []
    write_layout(layout, tag, layers)
    if image_name is not None:
        index = json.loads((layout / "index.json").read_text())
        index["manifests"][-1]["annotations"]["io.containerd.image.name"] = image_name
        (layout / "index.json").write_text(json.dumps(index))
    return f"{layout}:{tag}"


def layout_archive(layout: Path, out: Path) -> Path:
    """An OCI layout as the tar `ctr image import` reads."""
    with tarfile.open(out, "w") as tf:
        for name in ("oci-layout", "index.json", "blobs"):
            tf.add(layout / name, arcname=name)
    return out


def cowfs_path_env() -> dict[str, str]:
    """An environment whose PATH finds this checkout's cowfs command first (mount
    helpers and container tools run `cowfs` by name)."""
    bindir = os.path.dirname(sys.executable)
    assert os.path.exists(os.path.join(bindir, "cowfs")), "the cowfs entry point is not installed"
    return {**os.environ, "PATH": f"{bindir}:{os.environ.get('PATH', '/usr/bin:/bin')}"}


def wait_for(path: Path, proc: subprocess.Popen, what: str, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        if proc.poll() is not None:
            raise AssertionError(f"{what} exited ({proc.returncode}) before {path} appeared")
        if time.monotonic() > deadline:
            raise AssertionError(f"{what}: no {path} after {timeout} s")
        time.sleep(0.1)


def wait_until(cond: Callable[[], bool], timeout: float = 60) -> bool:
    """Poll cond until it holds (True) or timeout seconds pass (False)."""
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.2)
    return True


def stop(proc: subprocess.Popen) -> None:
    """SIGTERM, then SIGKILL: a process this test started, by its PID."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def have(*tools: str) -> str | None:
    missing = [t for t in tools if shutil.which(t) is None]
    return f"not installed: {', '.join(missing)} (scripts/setup --slow)" if missing else None


COWFS_ARGS = [sys.executable, "-m", "cowfs"]
