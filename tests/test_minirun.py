"""examples/minirun.py runs a command in a container built from the example image."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from cowfs.snapshot import Snapshotter

from .clientutil import example_layout
from .imageutil import cowfs_unready, needs_root, scratch
from .mountutil import is_mountpoint

__all__ = ["scratch"]

ROOT = Path(__file__).resolve().parent.parent
MINIRUN = ROOT / "examples" / "minirun.py"


@needs_root
def test_minirun_runs_a_command_in_a_container(scratch: Path) -> None:
    if reason := cowfs_unready():
        pytest.skip(reason)
    image = example_layout(scratch / "oci")
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
