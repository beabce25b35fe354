"""The cowfs command.

Two argv shapes must keep working because other programs produce them:
  cowfs [-f] [-d] -o lowerdir=..,upperdir=..,workdir=.. MNT   (fuse-overlayfs, podman)
  cowfs SOURCE MNT -o OPTS                                     (mount.fuse3, fstab)
Everything else is a subcommand for people.
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys

from .overlay.params import UsageError, parse_mount_options, validate

SUBCOMMANDS = {"mount", "umount", "demo", "image", "diff", "commit", "snapshotter",
               "trace", "stats", "explain", "which", "watch", "lesson"}


class _Version(argparse.Action):
    """--version, looked up only when asked (importlib.metadata costs a mount ~40 ms)."""

    def __init__(self, option_strings: list[str], dest: str, **kw: object) -> None:
        super().__init__(option_strings, dest, nargs=0, help="show the version and exit")

    def __call__(self, parser: argparse.ArgumentParser, *args: object) -> None:
        from importlib.metadata import PackageNotFoundError, version
        try:
            v = version("cowfs")
        except PackageNotFoundError:
            v = "unknown"
        print(f"cowfs {v}")
        parser.exit()


def _mount_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="cowfs",
        usage="cowfs [-f] [-d] -o lowerdir=L1:L2,upperdir=U,workdir=W MNT\n"
              "       cowfs SOURCE MNT -o OPTS\n"
              f"       cowfs {{{','.join(sorted(SUBCOMMANDS))}}} ...",
        description="Mount layer directories as one copy-on-write tree.")
    p.add_argument("--version", action=_Version)
    p.add_argument("-o", dest="opts", action="append", default=[], metavar="OPTS")
    p.add_argument("-f", "--foreground", action="store_true",
                   help="stay in the foreground")
    p.add_argument("-d", "--debug", action="store_true",
                   help="foreground, log every request to stderr")
    p.add_argument("--log", metavar="FILE",
                   help="where the daemon logs (default when detached: a file in the run dir)")
    p.add_argument("args", nargs="+", metavar="[SOURCE] MNT")
    return p


def _run_mount(opts: list[str], mountpoint: str, foreground: bool, debug: bool,
               log_file: str | None = None) -> int:
    from .daemon import mount
    try:
        cfg = parse_mount_options(opts, mountpoint)
        cfg.debug = cfg.debug or debug
        cfg.log_file = os.path.abspath(log_file) if log_file else None
        validate(cfg)
    except UsageError as e:
        print(f"cowfs: {e}", file=sys.stderr)
        return 2
    return mount(cfg, foreground=foreground or cfg.debug)


def _legacy_main(argv: list[str]) -> int:
    ns = _mount_parser().parse_args(argv)
    if len(ns.args) > 2:
        print("cowfs: too many arguments (expected [SOURCE] MNT)", file=sys.stderr)
        return 2
    return _run_mount(ns.opts, ns.args[-1], ns.foreground, ns.debug, ns.log)


def _cmd_mount(ns: argparse.Namespace) -> int:
    opts = list(ns.opts)
    opts.append("lowerdir=" + ":".join(p.replace(":", "\\:") for p in ns.lower))
    if ns.upper:
        work = ns.work or os.path.join(os.path.dirname(os.path.abspath(ns.upper)),
                                       "." + os.path.basename(ns.upper) + ".work")
        if not ns.work:
            os.makedirs(work, exist_ok=True)
        opts.append(f"upperdir={ns.upper},workdir={work}")
    return _run_mount(opts, ns.mountpoint, ns.foreground, ns.debug, ns.log)


def _cmd_umount(ns: argparse.Namespace) -> int:
    rc = subprocess.call(["fusermount3", "-u", *(["-z"] if ns.lazy else []), ns.mountpoint])
    return 0 if rc == 0 else 1


def _cmd_demo(ns: argparse.Namespace) -> int:
    from .demo import run_demo
    return run_demo(keep=ns.keep)


def _command_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="cowfs")
    p.add_argument("--version", action=_Version)
    sub = p.add_subparsers(dest="command", required=True)

    m = sub.add_parser("mount", help="mount layers (top layer first)")
    m.add_argument("--lower", action="append", required=True, metavar="DIR",
                   help="a lower layer; repeat, top layer first")
    m.add_argument("--upper", metavar="DIR", help="writable upper layer")
    m.add_argument("--work", metavar="DIR",
                   help="work dir on the upper's filesystem (default: .UPPER.work beside it)")
    m.add_argument("-o", dest="opts", action="append", default=[], metavar="OPTS")
    m.add_argument("-f", "--foreground", action="store_true")
    m.add_argument("-d", "--debug", action="store_true")
    m.add_argument("--log", metavar="FILE", help="where the daemon logs")
    m.add_argument("mountpoint")
    m.set_defaults(func=_cmd_mount)

    u = sub.add_parser("umount", help="unmount a cowfs mount")
    u.add_argument("-z", "--lazy", action="store_true", help="lazy unmount")
    u.add_argument("mountpoint")
    u.set_defaults(func=_cmd_umount)

    d = sub.add_parser("demo", help="mount the example image layers and show the result")
    d.add_argument("--keep", action="store_true", help="leave the demo mounted")
    d.set_defaults(func=_cmd_demo)

    from .image.cli import add_commands  # only subcommands pay for importing it
    from .teach.cli import add_commands as add_teach_commands
    add_commands(sub)
    add_teach_commands(sub)
    from .snapshot.cli import add_commands as add_snapshotter_commands
    add_snapshotter_commands(sub)
    return p


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] in SUBCOMMANDS:
        ns = _command_parser().parse_args(argv)
        try:
            return int(ns.func(ns) or 0)
        except UsageError as e:
            print(f"cowfs: {e}", file=sys.stderr)
            return 2
    return _legacy_main(argv)


if __name__ == "__main__":
    sys.exit(main())
