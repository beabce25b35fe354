"""containerd with cowfs as its snapshotter (a proxy plugin): import, run, diff, rm.

Slow tier: needs Debian's containerd and runc (scripts/setup --slow).  containerd
runs with a private config, root, state dir and sockets in the test's scratch
dir, and is stopped by its PID afterwards, like the cowfs server.
"""
from __future__ import annotations

import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from cowfs.snapshot import Snapshotter

from .clientutil import (COWFS_ARGS, cowfs_path_env, example_layout, have, layout_archive, stop,
                         wait_for, wait_until)
from .imageutil import cowfs, cowfs_unready, needs_root, scratch
from .mountutil import unmount
from .registryutil import REGISTRY_BIN, RegistryServer, running

__all__ = ["scratch"]
pytestmark = [pytest.mark.slow, needs_root]
NS = "cowfs-test"
IMAGE = "docker.io/library/cowfs-example:1"


def config(base: Path) -> str:
    return f"""version = 2
root = "{base}/root"
state = "{base}/state"
disabled_plugins = ["io.containerd.grpc.v1.cri"]
[grpc]
  address = "{base}/containerd.sock"
[ttrpc]
  address = "{base}/containerd.sock.ttrpc"
[debug]
  address = "{base}/debug.sock"
[proxy_plugins]
  [proxy_plugins.cowfs]
    type = "snapshot"
    address = "{base}/cowfs.sock"
"""


@pytest.fixture
def containerd(scratch: Path) -> Iterator[tuple[Path, list[str]]]:
    """(the cowfs store, the ctr command) with containerd and the snapshotter running."""
    if reason := have("containerd", "ctr", "runc") or cowfs_unready():
        pytest.skip(reason)
    env = cowfs_path_env()
    store = scratch / "store"
    (scratch / "config.toml").write_text(config(scratch))
    served = subprocess.Popen([*COWFS_ARGS, "snapshotter", "serve", "--address",
                               str(scratch / "cowfs.sock"), "--root", str(store)], env=env)
    daemon = None
    try:
        wait_for(scratch / "cowfs.sock", served, "cowfs snapshotter serve")
        log = open(scratch / "containerd.log", "w")
        daemon = subprocess.Popen(["containerd", "--config", str(scratch / "config.toml")],
                                  env=env, stdout=log, stderr=log)
        wait_for(scratch / "containerd.sock", daemon, "containerd")
        yield store, ["ctr", "--address", str(scratch / "containerd.sock"), "-n", NS]
    finally:
        if daemon is not None:
            stop(daemon)
        stop(served)
        for mnt in (scratch / "root").rglob("*") if (scratch / "root").exists() else []:
            if mnt.is_dir() and mnt.name == "rootfs":
                unmount(mnt)


def ctr(cmd: list[str], *args: str, timeout: int = 300) -> str:
    res = subprocess.run([*cmd, *args], capture_output=True, text=True, timeout=timeout,
                         env=cowfs_path_env())
    assert res.returncode == 0, f"ctr {' '.join(args)}: {res.stdout}\n{res.stderr}"
    return res.stdout


def test_ctr_run_with_the_cowfs_snapshotter(containerd: tuple[Path, list[str]],
                                            scratch: Path) -> None:
    store, cmd = containerd
    example_layout(scratch / "oci", "1", image_name=IMAGE)
    archive = layout_archive(scratch / "oci", scratch / "image.tar")
    ctr(cmd, "image", "import", "--snapshotter", "cowfs", str(archive))
    assert IMAGE in ctr(cmd, "image", "ls", "-q")
    sn = Snapshotter(str(store))
    assert len(list(sn.walk(["kind==committed"]))) == 4  # one per layer, by chain ID
    out = ctr(cmd, "run", "--rm=false", "--snapshotter", "cowfs", IMAGE, "c1", "/bin/sh", "-c",
              "echo written > /etc/written; /bin/hello; echo pid $$")
    assert "hello from the base layer" in out and "pid 1" in out
    (active,) = [i for i in sn.walk(["kind==active"]) if i.name.endswith("/c1")]
    changes = {str(c) for c in sn.changes(active.name)}
    assert {"A /etc/written", "C /etc"} <= changes
    assert "c1" in ctr(cmd, "snapshots", "--snapshotter", "cowfs", "ls")
    ctr(cmd, "snapshots", "--snapshotter", "cowfs", "rm", "c1")
    # containerd forgets it at once and removes it from the snapshotter in its
    # next garbage collection.
    assert wait_until(lambda: not [i for i in sn.walk(["kind==active"])
                                   if i.name.endswith("/c1")])
    ctr(cmd, "containers", "rm", "c1")
    ctr(cmd, "image", "rm", "--sync", IMAGE)
    assert wait_until(lambda: list(sn.walk()) == [])  # and the layers went with the image


@pytest.mark.skipif(REGISTRY_BIN is None, reason="docker-registry is not installed "
                    "(scripts/setup --slow)")
def test_ctr_pull_from_a_local_registry_and_run(containerd: tuple[Path, list[str]],
                                                scratch: Path) -> None:
    """The runtime's usual path: containerd pulls the image from a registry (here
    Debian's docker-registry on 127.0.0.1, the image pushed by cowfs) straight into
    the cowfs snapshotter, and runs a container on it."""
    store, cmd = containerd
    spec = example_layout(scratch / "oci", "1")
    with running(RegistryServer(scratch / "registry")) as reg:
        ref = f"{reg.host}/cowfs/example:1"
        cowfs("image", "import", spec, store=scratch / "push-store")
        cowfs("image", "push", "--plain-http", spec, ref, store=scratch / "push-store")
        ctr(cmd, "image", "pull", "--plain-http", "--snapshotter", "cowfs", ref)
        out = ctr(cmd, "run", "--rm", "--snapshotter", "cowfs", ref, "p1", "/bin/sh", "-c",
                  "/bin/hello; read -r line </etc/os-release; echo \"$line\"")
    assert "hello from the base layer" in out and 'NAME="Example Linux"' in out
    sn = Snapshotter(str(store))
    assert len(list(sn.walk(["kind==committed"]))) == 4
    ctr(cmd, "image", "rm", "--sync", ref)
    assert wait_until(lambda: list(sn.walk()) == [])
