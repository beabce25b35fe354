"""The store's records: versioned dataclasses, written atomically, parsed strictly.

A record that does not parse is never guessed at: `RecordError` names the file
and the problem, and garbage collection treats the store as fully in use.
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import secrets
import types
import typing
from dataclasses import dataclass, field
from typing import Any, TypeVar

from .errors import ImageError

SCHEMA = 2
T = TypeVar("T")


class RecordError(ImageError):
    """A store record that is missing fields, has wrong types or another version."""


def write_json_atomic(path: str, data: object) -> None:
    """Write JSON under a unique temporary name, fsync, rename: readers see all or nothing."""
    tmp = f"{path}.{secrets.token_hex(6)}.tmp"
    try:
        with open(tmp, "w") as f:
            json.dump(data, f, indent=1)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def _check(value: object, hint: Any, where: str) -> None:
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        if not any(_matches(value, h) for h in typing.get_args(hint)):
            raise RecordError(f"{where}: {value!r} is not {hint}")
        return
    if not _matches(value, hint):
        raise RecordError(f"{where}: {value!r} is not {getattr(hint, '__name__', hint)}")


def _matches(value: object, hint: Any) -> bool:
    if hint is Any:
        return True
    if hint is type(None):
        return value is None
    origin = typing.get_origin(hint)
    if origin is list:
        (item,) = typing.get_args(hint)
        return isinstance(value, list) and all(_matches(v, item) for v in value)
    if origin is dict:
        k, v = typing.get_args(hint)
        return isinstance(value, dict) and all(_matches(a, k) and _matches(b, v)
                                               for a, b in value.items())
    if hint is bool:
        return isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    return isinstance(value, hint)


def parse(cls: type[T], data: object, where: str) -> T:
    """data as a cls record: exactly its fields, of its types, of this schema."""
    if not isinstance(data, dict):
        raise RecordError(f"{where}: not a JSON object")
    if data.get("schema") != SCHEMA:
        raise RecordError(f"{where}: schema {data.get('schema')!r}, this cowfs reads {SCHEMA}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    if set(data) != names:
        extra, missing = sorted(set(data) - names), sorted(names - set(data))
        raise RecordError(f"{where}: unexpected fields {extra}, missing fields {missing}")
    for name in names:
        _check(data[name], hints[name], f"{where}: field {name!r}")
    return cls(**data)


def load(cls: type[T], path: str) -> T:
    """The record at path; FileNotFoundError if there is none, RecordError if it is bad."""
    with open(path, "rb") as f:
        raw = f.read()
    try:
        data = json.loads(raw)
    except ValueError as e:
        raise RecordError(f"{path}: not valid JSON ({e})") from None
    return parse(cls, data, path)


def save(rec: object, path: str) -> None:
    write_json_atomic(path, dataclasses.asdict(rec))  # type: ignore[call-overload]


@dataclass(frozen=True)
class LayerRecord:
    """STORE/layers/HEX/layer.json, HEX = the layer's chain ID."""
    chain_id: str
    diff_id: str
    parent: str | None             # chain ID of the layer below, None for a bottom layer
    digest: str | None             # the blob it came from, when known
    media_type: str
    blob_size: int
    file_bytes: int
    entries: int
    owners: bool                   # unpacked as root: owners and device nodes are the image's
    created: str
    schema: int = SCHEMA


@dataclass(frozen=True)
class ImageRecord:
    """STORE/images/NAME.json."""
    name: str
    id: str                        # config digest
    source: str                    # the layout, archive or tarball; a pull's REGISTRY/REPO@DIGEST
    kind: str                      # "oci", "docker-archive", "tarball", "registry" (a pull)
    imported: str
    manifest: dict[str, Any]
    config: str
    layers: list[str]              # diff_ids, bottom first
    chain: list[str]               # chain IDs, bottom first: the store layers it mounts
    aliases: list[str] = field(default_factory=list)  # the names import was given
    schema: int = SCHEMA


@dataclass(frozen=True)
class ContainerRecord:
    """STORE/containers/ID/container.json: an image mount's upper and work dir."""
    id: str
    image: str
    image_id: str
    chain: list[str]               # the store layers below its upper, bottom first
    upper: str
    work: str
    mountpoint: str
    created: str
    schema: int = SCHEMA


@dataclass(frozen=True)
class SnapshotRecord:
    """STORE/snapshots/ID/snapshot.json: one snapshot of cowfs.snapshot.Snapshotter.

    Its tree is the store layer `layer` (a committed snapshot made by apply) or
    STORE/snapshots/ID/fs (an active one's upper dir, and what it commits to)."""
    id: str
    key: str                       # key or, once committed, name: one namespace
    kind: str                      # "active", "view" or "committed"
    parent: str | None             # the committed snapshot below, by name
    labels: dict[str, str]
    created: str
    updated: str
    layer: str | None              # chain ID of the store layer holding its tree
    schema: int = SCHEMA
