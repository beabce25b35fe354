"""cowfs' FUSE transport: the kernel protocol on /dev/fuse, without libfuse.

It knows nothing of overlays: a filesystem implements ops.Operations and is
served by a Session on a connection that mount.mount() made.  Written here
because no maintained Python binding speaks passthrough, FOPEN_CACHE_DIR,
copy_file_range, fallocate, lseek or O_TMPFILE (pyfuse3 3.x is frozen).
"""
from .mount import MountSpec, mount, unmount
from .ops import NOW, Ctx, DirEntry, Entry, Opened, Operations, SetAttr
from .session import Config, Session

__all__ = ["NOW", "Config", "Ctx", "DirEntry", "Entry", "MountSpec", "Opened", "Operations",
           "Session", "SetAttr", "mount", "unmount"]
