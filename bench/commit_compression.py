"""`cowfs commit` against `tar | gzip` on the same upper dir (time and blob size).

    .venv/bin/python bench/commit_compression.py SRC_DIR [SRC_DIR...]

The dirs are copied into one upper dir under /tmp; the layer is committed over an
empty lower, gzip (level 6, zlib-ng threads) and zstd, and compared with GNU tar
piped through gzip -6 and gzip -9 (and the old single-threaded Python level 9).
"""
from __future__ import annotations

import gzip
import os
import shutil
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
from cowfs.image.commit import write_layer  # noqa: E402


def timed(fn) -> tuple[float, int]:  # type: ignore[no-untyped-def]
    t = time.perf_counter()
    size = fn()
    return time.perf_counter() - t, size


def main(srcs: list[str]) -> None:
    with tempfile.TemporaryDirectory(prefix="snapshot-bench-", dir="/tmp") as tmp:
        upper, lower = os.path.join(tmp, "upper"), os.path.join(tmp, "lower")
        os.mkdir(lower)
        for s in srcs:
            shutil.copytree(s, os.path.join(upper, s.strip("/").replace("/", "_")),
                            symlinks=True)
        raw = int(subprocess.run(["du", "-sb", upper], capture_output=True, text=True,
                                 check=True).stdout.split()[0])
        out = os.path.join(tmp, "out")
        rows = []

        def cowfs(comp: str | None) -> int:
            return write_layer(upper, [lower], out, comp).size

        def shell(cmd: str) -> int:
            subprocess.run(f"{cmd} > {out}", shell=True, check=True, cwd=upper)
            return os.path.getsize(out)

        def old_python9() -> int:  # what cowfs commit did before: gzip level 9 in Python
            tar = os.path.join(tmp, "plain.tar")
            write_layer(upper, [lower], tar, None)
            with open(tar, "rb") as src, gzip.GzipFile(out, "wb", 9, mtime=0) as dst:
                shutil.copyfileobj(src, dst, 1 << 20)
            return os.path.getsize(out)

        for name, fn in (("cowfs commit gzip (zlib-ng level 6, threaded)", lambda: cowfs("gzip")),
                         ("cowfs commit zstd (level 3, threaded)", lambda: cowfs("zstd")),
                         ("cowfs commit, no compression", lambda: cowfs(None)),
                         ("tar -c . | gzip -6", lambda: shell("tar -c . | gzip -6")),
                         ("tar -c . | gzip -9", lambda: shell("tar -c . | gzip -9")),
                         ("old: tar + Python gzip level 9", old_python9)):
            secs, size = timed(fn)
            rows.append((name, secs, size))
        print(f"upper: {raw / 1e6:.0f} MB in {', '.join(srcs)}; {os.cpu_count()} cores\n")
        print("| method | seconds | blob MB | vs tar\\|gzip -6 |")
        print("|---|---:|---:|---:|")
        ref = rows[3][2]
        for name, secs, size in rows:
            print(f"| {name} | {secs:.1f} | {size / 1e6:.1f} | {100 * (size / ref - 1):+.2f} % |")


if __name__ == "__main__":
    main(sys.argv[1:])
