"""`cowfs snapshotter serve` (grpc is imported only when it runs)."""
from __future__ import annotations

import argparse
import os
import sys


def cmd_serve(ns: argparse.Namespace) -> int:
    from .service import serve
    print(f"cowfs snapshotter: serving {ns.root} on {ns.address}", file=sys.stderr)
    serve(ns.root, ns.address)
    return 0


def add_commands(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("snapshotter", help="containerd snapshotter (proxy plugin)")
    sub = p.add_subparsers(dest="snapshotter_command", required=True)
    s = sub.add_parser("serve", help="serve containerd's Snapshots gRPC API on a unix socket")
    s.add_argument("--address", required=True, metavar="SOCK", help="unix socket to listen on")
    s.add_argument("--root", default=os.environ.get("COWFS_STORE", "/var/lib/cowfs"),
                   metavar="DIR", help="the store (default: $COWFS_STORE or /var/lib/cowfs)")
    s.set_defaults(func=cmd_serve)
