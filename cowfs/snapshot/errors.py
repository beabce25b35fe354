"""The snapshotter's errors: one base class, one subclass per containerd error code."""
from __future__ import annotations

from ..image.errors import ImageError


class SnapshotError(ImageError):
    """A snapshot operation failed; str(e) says which snapshot and why."""


class NotFound(SnapshotError):
    """No snapshot has that key or name."""


class AlreadyExists(SnapshotError):
    """The key or name is taken (keys and names share one namespace)."""


class FailedPrecondition(SnapshotError):
    """The snapshot is in the wrong state: the parent is not committed, it has
    children, it is mounted, or it is not of the kind the operation needs."""


class InvalidArgument(SnapshotError):
    """A malformed key, filter or field path."""
