"""`cowfs snapshotter serve`: containerd's Snapshots API over gRPC, status codes included."""
from __future__ import annotations

import contextlib
import io
import os
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from google.protobuf import field_mask_pb2

from cowfs.snapshot import Snapshotter
from cowfs.snapshot.proto import snapshots_pb2 as pb
from cowfs.snapshot.proto import snapshots_pb2_grpc

from .imageutil import COWFS, directory, file, scratch, tar_bytes

__all__ = ["scratch"]


@contextlib.contextmanager
def server(root: Path, sock: Path) -> Iterator[snapshots_pb2_grpc.SnapshotsStub]:
    p = subprocess.Popen([*COWFS, "snapshotter", "serve", "--address", str(sock), "--root",
                          str(root)], stderr=subprocess.PIPE, text=True)
    try:
        for _ in range(200):
            if sock.exists() or p.poll() is not None:
                break
            time.sleep(0.05)
        assert sock.exists(), p.stderr.read() if p.poll() is not None else "no socket"  # type: ignore[union-attr]
        with grpc.insecure_channel(f"unix:{sock}") as channel:
            yield snapshots_pb2_grpc.SnapshotsStub(channel)
    finally:
        p.send_signal(signal.SIGTERM)
        p.wait(timeout=30)
    assert not sock.exists()


def code(call) -> grpc.StatusCode:  # type: ignore[no-untyped-def]
    with pytest.raises(grpc.RpcError) as e:
        call()
    return e.value.code()  # type: ignore[attr-defined]


def test_the_snapshots_service(scratch: Path) -> None:
    root = scratch / "store"
    base = Snapshotter(str(root)).apply(None, io.BytesIO(tar_bytes([directory("etc"),
                                                                    file("etc/a", b"a")])))
    with server(root, scratch / "s.sock") as stub:
        res = stub.Prepare(pb.PrepareSnapshotRequest(key="k1", parent=base.name,
                                                     labels={"x": "1"}))
        (m,) = res.mounts
        assert m.type == "fuse.cowfs" and m.options[0].startswith("lowerdir=")
        assert any(o.startswith("upperdir=") for o in m.options)
        info = stub.Stat(pb.StatSnapshotRequest(key="k1")).info
        assert (info.name, info.parent, info.kind, dict(info.labels)) == \
            ("k1", base.name, pb.ACTIVE, {"x": "1"})
        assert info.created_at.seconds > 0
        assert code(lambda: stub.Prepare(pb.PrepareSnapshotRequest(key="k1"))) == \
            grpc.StatusCode.ALREADY_EXISTS
        assert code(lambda: stub.Stat(pb.StatSnapshotRequest(key="nope"))) == \
            grpc.StatusCode.NOT_FOUND
        assert code(lambda: stub.Prepare(pb.PrepareSnapshotRequest(key="k2", parent="k1"))) == \
            grpc.StatusCode.FAILED_PRECONDITION
        (view,) = stub.View(pb.ViewSnapshotRequest(key="v", parent=base.name)).mounts
        assert "ro" in view.options
        upd = stub.Update(pb.UpdateSnapshotRequest(
            info=pb.Info(name="k1", labels={"y": "2"}),
            update_mask=field_mask_pb2.FieldMask(paths=["labels.y"]))).info
        assert dict(upd.labels) == {"x": "1", "y": "2"}
        upper = next(o for o in m.options if o.startswith("upperdir="))[len("upperdir="):]
        Path(upper, "new").write_bytes(b"n" * 10_000)
        usage = stub.Usage(pb.UsageRequest(key="k1"))
        assert usage.inodes == 2 and usage.size >= 10_000
        stub.Commit(pb.CommitSnapshotRequest(name="c1", key="k1"))
        names = sorted(i.name for r in stub.List(pb.ListSnapshotsRequest()) for i in r.info)
        assert names == sorted(["c1", "v", base.name])
        active = [i.name for r in stub.List(pb.ListSnapshotsRequest(filters=["kind==view"]))
                  for i in r.info]
        assert active == ["v"]
        assert code(lambda: stub.Remove(pb.RemoveSnapshotRequest(key=base.name))) == \
            grpc.StatusCode.FAILED_PRECONDITION
        stub.Remove(pb.RemoveSnapshotRequest(key="v"))
        stub.Remove(pb.RemoveSnapshotRequest(key="c1"))
        stub.Cleanup(pb.CleanupRequest())
    assert [i.name for i in Snapshotter(str(root)).walk()] == [base.name]
    assert os.listdir(root / "tmp") == []
