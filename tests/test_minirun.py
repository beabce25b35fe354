"""examples/minirun.py runs a command in a container built from the example image."""
from __future__ import annotations

import io
import os
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

from cowfs.snapshot import Snapshotter

from .imageutil import cowfs_unready, needs_root, scratch, shell_layer, write_layout
from .mountutil import is_mountpoint

__all__ = ["scratch"]

ROOT = Path(__file__).resolve().parent.parent
MINIRUN = ROOT / "examples" / "minirun.py"


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


def example_image(scratch: Path) -> str:
    """examples/image's three layers over a layer with the host's /bin/sh."""
    layers = [sh_layer()] + [dir_layer(ROOT / "examples" / "image" / d)
                                for d in ("1-base", "2-app", "3-update")]
    write_layout(scratch / "oci", "example", layers)
    return f"{scratch}/oci:example"


@needs_root
def test_minirun_runs_a_command_in_a_container(scratch: Path) -> None:
    if reason := cowfs_unready():
        pytest.skip(reason)
    image = example_image(scratch)
    vol = scratch / "vol"
    vol.mkdir()
    (vol / "in").write_text("from the host\n")
    store = scratch / "store"
    script = ("echo pid $$; read h < /etc/hostname; echo hostname-file $h; "
              "read v < /data/in; echo volume $v; /bin/hello; "
              "echo made > /made; echo out > /data/out; "
              "test -e /usr/share/doc/base && echo whiteout-failed; "
              "test -e /proc/1 && echo proc-mounted; exit 3")
    res = subprocess.run([sys.executable, str(MINIRUN), "--store", str(store), "-v",
                          f"{vol}:/data", "--commit", "after", image, "/bin/sh", "-c", script],
                         capture_output=True, text=True, timeout=120)
    out = res.stdout.split("\n")
    assert res.returncode == 3, res.stderr
    assert "pid 1" in out and "volume from the host" in out and "proc-mounted" in out
    assert "hello from the base layer" in out and "whiteout-failed" not in out
    assert any(line.startswith("hostname-file ") for line in out)
    assert (vol / "out").read_text() == "out\n"
    sn = Snapshotter(str(store))
    changes = {str(c) for c in sn.changes("after")}
    assert "A /made" in changes and not any("/data/" in c for c in changes)
    assert [i.name for i in sn.walk(["kind==active"])] == []
    # Without --commit the container's snapshot goes away.
    res = subprocess.run([sys.executable, str(MINIRUN), "--store", str(store), "after",
                          "/bin/sh", "-c", "read m < /made; echo $m"],
                         capture_output=True, text=True, timeout=120)
    assert res.returncode == 0 and res.stdout == "made\n", res.stderr
    assert [i.name for i in sn.walk(["kind==active"])] == []
    assert not any(is_mountpoint(p) for p in Path("/tmp").glob("minirun-*"))
