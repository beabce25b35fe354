"""The `cowfs image`, `cowfs diff` and `cowfs commit` subcommands."""
from __future__ import annotations

import argparse
import datetime
import errno
import os
import subprocess
import sys
from collections.abc import Callable, Sequence

from ..overlay.params import UsageError, is_mounted, parse_mount_options, validate
from ..state import find_mount, live_mount_records
from .changes import diff
from .commit import commit_to_layout, write_layer
from .errors import ImageError
from .oci import open_source
from .records import RecordError
from .store import Store, human_size, unescape_mountinfo


def _store(ns: argparse.Namespace) -> Store:
    return Store(ns.store)


def _guard(func: Callable[[argparse.Namespace], int]) -> Callable[[argparse.Namespace], int]:
    """A failed operation (not a bad argument) -> its message, exit 1."""
    def run(ns: argparse.Namespace) -> int:
        try:
            return func(ns)
        except (ImageError, OSError) as e:
            print(f"cowfs: {e}", file=sys.stderr)
            return 1
        except KeyboardInterrupt:  # an import cleans up after itself on the way out
            print("cowfs: interrupted", file=sys.stderr)
            return 130
    return run


def _warn(msg: str) -> None:
    print(f"cowfs: warning: {msg}", file=sys.stderr)


# -- image import / ls / rm / mount -----------------------------------------------

def cmd_import(ns: argparse.Namespace) -> int:
    src = open_source(ns.source)
    try:
        summary = _store(ns).import_image(src, ns.name,
                                          progress=False if ns.quiet else None, spec=ns.source)
    finally:
        src.close()
    for w in summary.warnings:
        _warn(w)
    print(summary)
    return 0


def _layer_bytes(store: Store, chain_id: str) -> int:
    try:
        return store.layer_record(chain_id).file_bytes
    except (RecordError, FileNotFoundError):
        return 0


def cmd_pull(ns: argparse.Namespace) -> int:
    from .registry import options_from, pull  # httpx only for the registry commands
    summary = pull(_store(ns), ns.reference, options_from(ns), ns.name)
    for w in summary.warnings:
        _warn(w)
    print(summary)
    return 0


def cmd_push(ns: argparse.Namespace) -> int:
    from .registry import options_from, push
    print(push(_store(ns), ns.image, ns.reference, options_from(ns)))
    return 0


def cmd_ls(ns: argparse.Namespace) -> int:
    store = _store(ns)
    images, problems = store.scan_images()
    rows = [("NAME", "ID", "LAYERS", "SIZE", "IMPORTED")]
    for rec in images:
        size = sum(_layer_bytes(store, c) for c in set(rec.chain))
        rows.append((rec.name, rec.id[7:19], str(len(rec.chain)), human_size(size),
                     rec.imported))
    _table(rows)
    containers, cproblems = store.scan_containers()
    if containers:
        print()
        _table([("CONTAINER", "IMAGE", "UPPER", "MOUNTPOINT")] +
               [(c.id, c.image, c.upper, c.mountpoint) for c in containers])
    if ns.layers:
        print()
        used = store.layers_in_use().users
        _table([("LAYER", "SIZE", "USED BY")] +
               [(c[7:19], human_size(_layer_bytes(store, c)), used.get(c, "-"))
                for c in store.layer_ids()])
    for p in problems + cproblems:
        _warn(f"unreadable record: {p}")
    return 0


def _table(rows: Sequence[Sequence[str]]) -> None:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    for r in rows:
        print("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip())


def cmd_rm(ns: argparse.Namespace) -> int:
    store = _store(ns)
    for ref in ns.refs:
        print(f"removed {store.remove(ref)}")
    deleted, usage = store.prune_layers()
    for p in usage.problems:
        _warn(f"unreadable record: {p}")
    if usage.problems:
        print("deleted no layers: the store has unreadable records (fix or remove them)")
        return 1
    from .registry import prune_blobs
    prune_blobs(store)  # the blobs kept for push that no image uses any more
    print(f"deleted {len(deleted)} unused layer(s); {len(usage.users)} still in use")
    return 0


def cmd_mount(ns: argparse.Namespace) -> int:
    store = _store(ns)
    mnt = os.path.abspath(ns.mountpoint)
    if not os.path.isdir(mnt):
        raise UsageError(f"mountpoint '{mnt}' does not exist")
    if is_mounted(mnt):
        raise UsageError(f"mountpoint '{mnt}' is already mounted")
    # Under the store lock from the record to the live mount (whose daemon then
    # holds its own locks), so rm and prune never see the container half made.
    with store.lock():
        image = store.image(ns.image)
        lowers = store.lower_dirs(image)
        if not lowers:  # an image with no layers still needs one lower
            lowers = [os.path.join(store.root, "empty")]
            os.makedirs(lowers[0], exist_ok=True)
        container = store.new_container(image, ns.upper, mnt)
        rc = 1
        try:
            opts = ["lowerdir=" + ":".join(p.replace(":", "\\:") for p in lowers) +
                    f",upperdir={container.upper},workdir={container.work}", *ns.opts]
            cfg = parse_mount_options(opts, mnt)
            validate(cfg)
            if ns.foreground:
                rc = 0  # mounted below, outside the lock
            else:
                # A separate process: a forked daemon would inherit the store lock.
                rc = subprocess.call([sys.executable, "-m", "cowfs", "-o", ",".join(opts), mnt])
        finally:
            if rc != 0:  # nothing was mounted: no container either
                store.discard_container(container.id)
    if ns.foreground:
        try:
            from ..daemon import mount
        except ImportError as e:
            store.discard_container(container.id)
            raise ImageError(f"the cowfs filesystem is not available ({e})") from None
        return mount(cfg, foreground=True)
    if rc == 0:
        print(f"mounted {image.name} at {mnt} (container {container.id}, "
              f"upper {container.upper})")
    return rc


# -- diff / commit --------------------------------------------------------------

def _mountinfo_overlay(mnt: str) -> tuple[str, list[str]] | None:
    """upperdir and lowerdirs of a kernel overlay mount, from /proc/self/mountinfo."""
    real = os.path.realpath(mnt)
    with open("/proc/self/mountinfo") as f:
        for line in f:
            fields = line.split()
            if unescape_mountinfo(fields[4]) != real or "-" not in fields:
                continue
            sep = fields.index("-")
            if fields[sep + 1] != "overlay":
                continue
            opts: dict[str, str] = {}
            for item in fields[sep + 3].split(","):
                key, _, value = item.partition("=")
                opts[key] = unescape_mountinfo(value)
            if "upperdir" not in opts:
                return None
            lowers = [p.replace("\0", ":") for p in
                      opts.get("lowerdir", "").replace("\\:", "\0").split(":") if p]
            return opts["upperdir"], lowers
    return None


def resolve_layers(target: str, lowers: list[str] | None, store: Store) -> tuple[str, list[str]]:
    """(upper, lowers top first) for `cowfs diff/commit TARGET`: a cowfs or kernel
    overlay mount point, or an upper dir with --lower or with a known mount."""
    try:
        os.statvfs(target)   # (stat may answer from the kernel's cache; statfs asks)
    except OSError as e:
        if e.errno == errno.ENOTCONN:
            raise UsageError(f"{target}: {e.strerror} (its daemon is gone; umount it)") from None
    if not os.path.isdir(target):
        raise UsageError(f"'{target}' is not a directory")
    mounted = is_mounted(target)
    if lowers:
        if mounted:
            raise UsageError(f"{target} is a mount point; --lower goes with an upper dir")
        return target, lowers
    if mounted:
        # A FUSE mount with a writeback cache holds data and times the upper dir
        # has not seen yet: flush them, as the kernel's syncfs does for overlayfs.
        os.sync()
        rec = find_mount(target)
        if rec is not None:
            if not rec.get("upperdir"):
                raise UsageError(f"{target} is a read-only mount: it has no upper dir")
            return rec["upperdir"], rec["lowerdirs"]
        found = _mountinfo_overlay(target)
        if found is not None:
            return found
        raise UsageError(f"{target} is mounted, but not by cowfs or overlayfs with an upper dir")
    container = store.container_for_upper(target)
    if container is not None:
        return target, [store.layer_root(c) for c in reversed(container.chain)]
    real = os.path.realpath(target)
    for rec in live_mount_records():
        if rec.get("upperdir") and os.path.realpath(rec["upperdir"]) == real:
            return target, rec["lowerdirs"]
    raise UsageError(f"cannot tell which layers are below '{target}': give a mount point, "
                     "or --lower DIR (repeat, top layer first)")


def cmd_diff(ns: argparse.Namespace) -> int:
    upper, lowers = resolve_layers(ns.target, ns.lower, _store(ns))
    out = sys.stdout.buffer
    for change in diff(upper, lowers):
        out.write(change.kind.encode() + b" " + change.path + b"\n")
    out.flush()
    return 0


def cmd_commit(ns: argparse.Namespace) -> int:
    if not ns.output and not ns.image:
        raise UsageError("commit needs -o LAYER.tar[.gz|.zst], --image DIR:TAG, or both")
    store = _store(ns)
    upper, lowers = resolve_layers(ns.target, ns.lower, store)
    if not ns.image:
        layer = write_layer(upper, lowers, ns.output)
    else:
        base = store.image_for_lowers(lowers)
        if base is None:
            _warn("the layers below are not an imported image: "
                  "the new image holds only the committed layer")
        comment = ns.message or f"cowfs commit {datetime.date.today().isoformat()}"
        layer, manifest = commit_to_layout(
            ns.image, upper, lowers, base, store.blobs_dir, comment,
            None if ns.compression == "none" else ns.compression, ns.output)
    print(f"digest: {layer.digest}")
    print(f"diff_id: {layer.diff_id}")
    if ns.image:
        print(f"image: {ns.image} manifest {manifest}")
    return 0


def add_registry_arguments(p: argparse.ArgumentParser) -> None:
    """The options pull and push share."""
    p.add_argument("--plain-http", action="store_true", help="talk HTTP, not HTTPS")
    p.add_argument("--ca-file", metavar="PEM", help="trust this CA for the registry's TLS")
    p.add_argument("--authfile", metavar="FILE",
                   help="credentials (auth.json format; default: $REGISTRY_AUTH_FILE, "
                        "containers auth.json, ~/.docker/config.json)")
    p.add_argument("--retries", type=int, default=4, metavar="N",
                   help="retries on connection failures and 5xx, with backoff (default 4)")
    p.add_argument("-j", "--jobs", type=int, default=3, metavar="N",
                   help="blobs transferred at once (default 3)")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bars")


def add_commands(subparsers: argparse._SubParsersAction) -> None:
    store_help = "the layer store (default: $COWFS_STORE, /var/lib/cowfs as root, " \
                 "else ~/.local/share/cowfs)"

    def with_store(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
        p.add_argument("--store", metavar="DIR", help=store_help)
        return p

    img = subparsers.add_parser("image", help="container images: import, ls, rm, mount")
    isub = img.add_subparsers(dest="image_command", required=True)

    p = with_store(isub.add_parser(
        "import", help="import an OCI layout (DIR[:TAG]) or a docker save archive"))
    p.add_argument("source", metavar="SOURCE")
    p.add_argument("--name", help="store the image under this name")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bars")
    p.set_defaults(func=_guard(cmd_import))

    p = with_store(isub.add_parser("pull", help="pull an image from a registry into the store"))
    p.add_argument("reference", metavar="REGISTRY/REPO[:TAG|@DIGEST]")
    p.add_argument("--name", help="store the image under this name (default: the reference)")
    p.add_argument("--platform", metavar="OS/ARCH[/VARIANT]",
                   help="which manifest of an image index (default: this host's)")
    add_registry_arguments(p)
    p.set_defaults(func=_guard(cmd_pull))

    p = with_store(isub.add_parser("push", help="push an image from the store to a registry"))
    p.add_argument("image", metavar="IMAGE")
    p.add_argument("reference", metavar="REGISTRY/REPO[:TAG]")
    p.add_argument("--chunk-size", type=int, metavar="BYTES",
                   help="upload in chunks of BYTES (default: each blob in one request)")
    add_registry_arguments(p)
    p.set_defaults(func=_guard(cmd_push))

    p = with_store(isub.add_parser("ls", help="list images and containers"))
    p.add_argument("--layers", action="store_true", help="also list layers and their users")
    p.set_defaults(func=_guard(cmd_ls))

    p = with_store(isub.add_parser(
        "rm", help="remove images or containers; layers go when nothing uses them"))
    p.add_argument("refs", nargs="*", metavar="IMAGE|CONTAINER")
    p.set_defaults(func=_guard(cmd_rm))

    p = with_store(isub.add_parser("mount", help="mount an image with a writable upper dir"))
    p.add_argument("image", metavar="IMAGE")
    p.add_argument("mountpoint", metavar="MNT")
    p.add_argument("--upper", metavar="DIR",
                   help="upper dir to use (default: a fresh one in the store); "
                        "the work dir goes beside it")
    p.add_argument("-o", dest="opts", action="append", default=[], metavar="OPTS")
    p.add_argument("-f", "--foreground", action="store_true")
    p.set_defaults(func=_guard(cmd_mount))

    def layer_args(p: argparse.ArgumentParser) -> None:
        with_store(p)
        p.add_argument("target", metavar="MNT|UPPER")
        p.add_argument("--lower", action="append", metavar="DIR",
                       help="a layer below UPPER; repeat, top layer first")

    p = subparsers.add_parser("diff", help="list changes (A/C/D) against the layers below")
    layer_args(p)
    p.set_defaults(func=_guard(cmd_diff))

    p = subparsers.add_parser("commit", help="write the changes as an OCI layer tarball")
    layer_args(p)
    p.add_argument("-o", "--output", metavar="LAYER.tar[.gz|.zst]")
    p.add_argument("--image", metavar="DIR:TAG",
                   help="also add an image (the base image + this layer) to an OCI layout")
    p.add_argument("-m", "--message", help="history comment for --image")
    p.add_argument("--compression", choices=["gzip", "zstd", "none"], default="gzip",
                   help="of the layer --image writes without -o (default gzip)")
    p.set_defaults(func=_guard(cmd_commit))
