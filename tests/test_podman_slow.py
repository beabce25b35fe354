"""podman with `mount_program = cowfs`, as with fuse-overlayfs: run, write, diff,
commit, and a three-step build (one step deletes a lower file); the results must
equal fuse-overlayfs'.

Slow tier: needs Debian's podman, runc, fuse-overlayfs and busybox-static
(scripts/setup --slow).  Each storage is private (CONTAINERS_STORAGE_CONF with
graphroot/runroot in the scratch dir), podman runs runc, no network.
"""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from .clientutil import cowfs_path_env, example_layout, have
from .imageutil import (cowfs_unready, directory, file, needs_root, scratch, snapshot, symlink,
                        tar_bytes)

__all__ = ["scratch"]
pytestmark = [pytest.mark.slow, needs_root]

CONTAINERFILE = """FROM localhost/example:1
RUN echo one > /one
RUN rm /etc/hosts
RUN echo three > /opt/app/three
"""


def busybox_layer() -> bytes:
    """A static busybox in /usr/local/bin, with rm, ls and cat linked to it."""
    bb = Path(shutil.which("busybox") or "/bin/busybox").read_bytes()
    return tar_bytes([directory("usr"), directory("usr/local"), directory("usr/local/bin"),
                      file("usr/local/bin/busybox", bb, mode=0o755),
                      *(symlink(f"usr/local/bin/{t}", "busybox") for t in ("rm", "ls", "cat"))])


def storage(base: Path, mount_program: str) -> dict[str, str]:
    """Environment for a podman with its own storage, run root and engine config."""
    base.mkdir(parents=True, exist_ok=True)
    (base / "storage.conf").write_text(f"""[storage]
driver = "overlay"
graphroot = "{base}/graph"
runroot = "{base}/run"
[storage.options.overlay]
mount_program = "{mount_program}"
mountopt = "nodev"
""")
    (base / "containers.conf").write_text(f"""[containers]
netns = "none"
# podman's default limits are above what this machine grants runc
default_ulimits = ["nofile=1024:1024", "nproc=1024:1024"]
[engine]
runtime = "runc"
cgroup_manager = "cgroupfs"
events_logger = "file"
tmp_dir = "{base}/tmp"
volume_path = "{base}/volumes"
""")
    return {**cowfs_path_env(), "CONTAINERS_STORAGE_CONF": str(base / "storage.conf"),
            "CONTAINERS_CONF": str(base / "containers.conf")}


def podman(env: dict[str, str], *args: str, timeout: int = 600) -> str:
    res = subprocess.run(["podman", *args], capture_output=True, text=True, env=env,
                         timeout=timeout)
    assert res.returncode == 0, f"podman {' '.join(args)}: {res.stdout}\n{res.stderr}"
    return res.stdout


def scenario(env: dict[str, str], layout: Path, ctx: Path) -> dict[str, object]:
    """Everything the scenario shows: run output, diffs, the built image's tree."""
    out: dict[str, object] = {}
    podman(env, "pull", f"oci:{layout}:1")
    podman(env, "tag", podman(env, "images", "-q").split()[0], "localhost/example:1")
    out["run"] = podman(env, "run", "--name", "c1", "localhost/example:1", "/bin/sh", "-c",
                        "echo written > /etc/written; rm /etc/os-release; /bin/hello; ls /etc")
    out["diff"] = sorted(podman(env, "diff", "c1").split("\n"))
    podman(env, "commit", "-q", "c1", "localhost/committed:1")
    out["committed"] = podman(env, "run", "--rm", "localhost/committed:1", "/bin/sh", "-c",
                              "cat /etc/written; ls /etc")
    podman(env, "build", "--network", "none", "-t", "localhost/built:1", str(ctx))
    out["built-diff"] = sorted(podman(env, "diff", "localhost/built:1").split("\n"))
    mnt = podman(env, "image", "mount", "localhost/built:1").strip()
    try:
        out["built-tree"] = snapshot(Path(mnt), dir_mtimes=False, file_mtimes=False)
    finally:
        podman(env, "image", "unmount", "localhost/built:1")
    podman(env, "rm", "-a", "-f")
    podman(env, "rmi", "-a", "-f")
    return out


def test_podman_with_cowfs_as_mount_program(scratch: Path) -> None:
    if reason := have("podman", "runc", "fuse-overlayfs", "busybox") or cowfs_unready():
        pytest.skip(reason)
    layout = scratch / "oci"
    example_layout(layout, "1", extra=[busybox_layer()])
    ctx = scratch / "ctx"
    ctx.mkdir()
    (ctx / "Containerfile").write_text(CONTAINERFILE)
    cowfs_exe = os.path.join(os.path.dirname(sys.executable), "cowfs")
    results = {}
    for name, program in (("cowfs", cowfs_exe), ("fuse-overlayfs", shutil.which("fuse-overlayfs"))):
        env = storage(scratch / name, str(program))
        try:
            results[name] = scenario(env, layout, ctx)
        finally:
            subprocess.run(["podman", "rm", "-a", "-f"], env=env, capture_output=True)
            subprocess.run(["podman", "rmi", "-a", "-f"], env=env, capture_output=True)
            subprocess.run(["podman", "system", "reset", "-f"], env=env, capture_output=True)
    got, want = results["cowfs"], results["fuse-overlayfs"]
    assert "hello from the base layer" in str(got["run"])
    assert "A /etc/written" in got["diff"] and "D /etc/os-release" in got["diff"]  # type: ignore
    tree = got["built-tree"]
    assert "one" in tree and "opt/app/three" in tree and "etc/hosts" not in tree  # type: ignore
    assert "etc/written" not in tree and "etc/os-release" in tree  # type: ignore[operator]
    for key in want:
        assert got[key] == want[key], f"{key}: cowfs {got[key]!r}\nfuse-overlayfs {want[key]!r}"
