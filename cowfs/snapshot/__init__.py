"""A Python snapshotter API shaped like containerd's, for container runtimes.

    from cowfs.snapshot import Snapshotter
    sn = Snapshotter("/var/lib/cowfs")
    top = sn.import_image("./oci:app")          # each layer: a committed snapshot
    sn.prepare("c1", parent=top.name)           # a writable snapshot
    sn.mount("c1", "/mnt/c1")  ...  sn.unmount("/mnt/c1")
    sn.commit("app-v2", "c1")                   # or sn.remove("c1")

See snapshotter.py for the semantics and examples/minirun.py for a runtime.
"""
from .errors import AlreadyExists, FailedPrecondition, InvalidArgument, NotFound, SnapshotError
from .snapshotter import MOUNT_TYPE, Info, Kind, Mount, Snapshotter, Usage

__all__ = ["AlreadyExists", "FailedPrecondition", "Info", "InvalidArgument", "Kind",
           "MOUNT_TYPE", "Mount", "NotFound", "SnapshotError", "Snapshotter", "Usage"]
