"""Layer fixtures and mount helpers shared by the mount tests."""
from __future__ import annotations

import os
import stat
from collections.abc import Callable
from pathlib import Path

import pytest


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption("--long", action="store_true", default=False,
                     help="test_differential: run >= 10,000 compared operations")


def write(p: Path, data: str | bytes = "", mode: int | None = None) -> Path:
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_bytes(data.encode() if isinstance(data, str) else data)
    if mode is not None:
        os.chmod(p, mode)
    return p


def whiteout(p: Path) -> None:
    p.parent.mkdir(parents=True, exist_ok=True)
    os.mknod(p, stat.S_IFCHR, os.makedev(0, 0))


def opaque(p: Path) -> None:
    p.mkdir(parents=True, exist_ok=True)
    os.setxattr(p, "trusted.overlay.opaque", b"y")


def build_standard_layers(base: Path) -> list[Path]:
    """Three layers (top first) using the kernel's whiteout form."""
    top, mid, bot = base / "l1", base / "l2", base / "l3"
    write(bot / "etc/passwd", "root:x:0:0\n", 0o644)
    write(bot / "etc/shadow", "secret\n", 0o600)
    write(bot / "etc/hosts", "127.0.0.1 localhost\n")
    write(bot / "bin/tool", "#!/bin/sh\n", 0o755)
    write(bot / "data/big", b"\0" * 65536 + b"tail")
    write(bot / "gone/file", "x")
    write(bot / "replaced/old", "old")
    write(bot / "deep/a/b/c/file", "deep")
    os.link(bot / "etc/hosts", bot / "etc/hosts.link")
    os.symlink("passwd", bot / "etc/pw")
    os.mkfifo(bot / "fifo")
    os.setxattr(bot / "etc/passwd", "user.tag", b"base")
    write(mid / "etc/hosts", "127.0.0.1 mid\n")
    write(mid / "app/main.py", "print('hi')\n")
    write(mid / "deep/a/b/mid", "mid")
    whiteout(mid / "gone")
    opaque(mid / "replaced")
    write(mid / "replaced/new", "new")
    write(top / "app/config.toml", "x = 1\n")
    whiteout(top / "bin/tool")
    write(top / "deep/a/top", "top")
    for layer in (top, mid, bot):
        layer.mkdir(exist_ok=True)
    return [top, mid, bot]


@pytest.fixture
def layers(tmp_path: Path) -> list[Path]:
    return build_standard_layers(tmp_path / "layers")


@pytest.fixture
def scratch(tmp_path: Path) -> Callable[[str], Path]:
    def make(name: str) -> Path:
        p = tmp_path / name
        p.mkdir(parents=True, exist_ok=True)
        return p
    return make
