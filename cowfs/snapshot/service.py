"""`cowfs snapshotter serve`: the Snapshotter as containerd's Snapshots gRPC service.

containerd loads it as a proxy plugin (see the README's proxy_plugins stanza)
and calls it over a unix socket.  The wire definition is containerd's own
(api/services/snapshots/v1/snapshots.proto, api/types/mount.proto), copied into
proto/ and compiled by scripts/gen-proto; the generated modules are committed,
so installing cowfs needs no protobuf compiler.  grpcio serves it: the
maintained gRPC implementation for Python.
"""
from __future__ import annotations

import functools
import os
import signal
import threading
from collections.abc import Callable, Iterator
from concurrent import futures
from typing import Any, TypeVar

import grpc
from google.protobuf import empty_pb2, timestamp_pb2

from .errors import AlreadyExists, FailedPrecondition, InvalidArgument, NotFound, SnapshotError
from .proto import mount_pb2, snapshots_pb2, snapshots_pb2_grpc
from .snapshotter import Info, Kind, Mount, Snapshotter

F = TypeVar("F", bound=Callable[..., Any])
KINDS = {Kind.VIEW: snapshots_pb2.VIEW, Kind.ACTIVE: snapshots_pb2.ACTIVE,
         Kind.COMMITTED: snapshots_pb2.COMMITTED}
CODES = [(NotFound, grpc.StatusCode.NOT_FOUND), (AlreadyExists, grpc.StatusCode.ALREADY_EXISTS),
         (FailedPrecondition, grpc.StatusCode.FAILED_PRECONDITION),
         (InvalidArgument, grpc.StatusCode.INVALID_ARGUMENT)]
LIST_BATCH = 100


def _code(e: SnapshotError) -> grpc.StatusCode:
    """The gRPC status containerd maps back to its errdefs (NotFound, AlreadyExists...)."""
    return next((c for cls, c in CODES if isinstance(e, cls)), grpc.StatusCode.UNKNOWN)


def _status(func: F) -> F:
    @functools.wraps(func)
    def call(self: SnapshotsService, request: Any, context: grpc.ServicerContext) -> Any:
        try:
            return func(self, request, context)
        except SnapshotError as e:
            context.abort(_code(e), str(e))
        except OSError as e:
            context.abort(grpc.StatusCode.INTERNAL, str(e))
    return call  # type: ignore[return-value]


def _timestamp(iso: str) -> timestamp_pb2.Timestamp:
    ts = timestamp_pb2.Timestamp()
    ts.FromJsonString(iso)
    return ts


def _info(info: Info) -> snapshots_pb2.Info:
    return snapshots_pb2.Info(name=info.name, parent=info.parent or "", kind=KINDS[info.kind],
                              created_at=_timestamp(info.created),
                              updated_at=_timestamp(info.updated), labels=info.labels)


def _mounts(mounts: list[Mount]) -> list[mount_pb2.Mount]:
    return [mount_pb2.Mount(type=m.type, source=m.source, options=m.options) for m in mounts]


class SnapshotsService(snapshots_pb2_grpc.SnapshotsServicer):
    def __init__(self, sn: Snapshotter) -> None:
        self.sn = sn

    @_status
    def Prepare(self, request: Any, context: grpc.ServicerContext) -> Any:
        mounts = self.sn.prepare(request.key, request.parent or None, dict(request.labels))
        return snapshots_pb2.PrepareSnapshotResponse(mounts=_mounts(mounts))

    @_status
    def View(self, request: Any, context: grpc.ServicerContext) -> Any:
        mounts = self.sn.view(request.key, request.parent or None, dict(request.labels))
        return snapshots_pb2.ViewSnapshotResponse(mounts=_mounts(mounts))

    @_status
    def Mounts(self, request: Any, context: grpc.ServicerContext) -> Any:
        return snapshots_pb2.MountsResponse(mounts=_mounts(self.sn.mounts(request.key)))

    @_status
    def Commit(self, request: Any, context: grpc.ServicerContext) -> Any:
        self.sn.commit(request.name, request.key, dict(request.labels))
        return empty_pb2.Empty()

    @_status
    def Remove(self, request: Any, context: grpc.ServicerContext) -> Any:
        self.sn.remove(request.key)
        return empty_pb2.Empty()

    @_status
    def Stat(self, request: Any, context: grpc.ServicerContext) -> Any:
        return snapshots_pb2.StatSnapshotResponse(info=_info(self.sn.stat(request.key)))

    @_status
    def Update(self, request: Any, context: grpc.ServicerContext) -> Any:
        old = self.sn.stat(request.info.name)
        new = Info(old.name, old.kind, old.parent, dict(request.info.labels))
        paths = list(request.update_mask.paths) if request.HasField("update_mask") else []
        return snapshots_pb2.UpdateSnapshotResponse(info=_info(self.sn.update(new, paths)))

    def List(self, request: Any, context: grpc.ServicerContext) -> Iterator[Any]:
        try:
            infos = list(self.sn.walk(list(request.filters)))
        except SnapshotError as e:
            context.abort(_code(e), str(e))
        for i in range(0, len(infos), LIST_BATCH):
            yield snapshots_pb2.ListSnapshotsResponse(
                info=[_info(x) for x in infos[i:i + LIST_BATCH]])

    @_status
    def Usage(self, request: Any, context: grpc.ServicerContext) -> Any:
        u = self.sn.usage(request.key)
        return snapshots_pb2.UsageResponse(size=u.size, inodes=u.inodes)

    @_status
    def Cleanup(self, request: Any, context: grpc.ServicerContext) -> Any:
        self.sn.cleanup()
        return empty_pb2.Empty()


def serve(root: str, address: str) -> None:
    """Serve until SIGTERM or SIGINT; the socket is removed on the way out."""
    sn = Snapshotter(root)
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=8))
    snapshots_pb2_grpc.add_SnapshotsServicer_to_server(SnapshotsService(sn), server)
    if os.path.exists(address):
        os.unlink(address)  # a socket left by a server that died
    os.makedirs(os.path.dirname(os.path.abspath(address)), exist_ok=True)
    server.add_insecure_port("unix:" + os.path.abspath(address))
    server.start()
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    try:
        stop.wait()
    finally:
        server.stop(grace=5).wait()
        if os.path.exists(address):
            os.unlink(address)
