"""`cowfs demo`: mount the example image layers, show the merged tree, write to
it to show copy-up and whiteouts landing in the upper layer, unmount."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

EXAMPLES = Path(__file__).resolve().parent.parent / "examples" / "image"


def _tree(root: Path) -> list[str]:
    out = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames.sort()
        rel = Path(dirpath).relative_to(root)
        depth = 0 if str(rel) == "." else len(rel.parts)
        if depth:
            out.append("  " * (depth - 1) + rel.name + "/")
        for f in sorted(filenames):
            p = Path(dirpath) / f
            extra = f" -> {os.readlink(p)}" if p.is_symlink() else ""
            out.append("  " * depth + f + extra)
    return out


def _upper_listing(upper: Path) -> list[str]:
    res = subprocess.run(["find", str(upper), "-mindepth", "1", "-printf", "%y %P\n"],
                         capture_output=True, text=True, check=True)
    kinds = {"c": "whiteout (char 0/0)", "d": "dir", "f": "file", "l": "symlink"}
    lines = []
    for line in sorted(res.stdout.splitlines(), key=lambda s: s[2:]):
        kind, path = line.split(" ", 1)
        marks = []
        for attr in ("opaque", "redirect", "metacopy"):
            try:
                value = os.getxattr(upper / path, "trusted.overlay." + attr,
                                    follow_symlinks=False)
                marks.append(f"{attr}={value.decode() or '(set)'}")
            except OSError:
                pass
        lines.append(f"  {path:40} {kinds.get(kind, kind)} {' '.join(marks)}")
    return lines


def run_demo(keep: bool = False) -> int:
    layers = [EXAMPLES / "3-update", EXAMPLES / "2-app", EXAMPLES / "1-base"]
    scratch = Path(tempfile.mkdtemp(prefix="cowfs-demo-"))
    upper, work, mnt = scratch / "upper", scratch / "work", scratch / "merged"
    for d in (upper, work, mnt):
        d.mkdir()
    opts = (f"lowerdir={':'.join(map(str, layers))},upperdir={upper},workdir={work}")
    print(f"$ cowfs -o {opts} {mnt}")
    rc = subprocess.call([sys.executable, "-m", "cowfs", "-o", opts, str(mnt)])
    if rc != 0:
        return rc
    try:
        print("\nThe merged tree (3-update over 2-app over 1-base; whiteouts hidden):")
        print("\n".join("  " + line for line in _tree(mnt)))
        print(f"\n$ cat {mnt}/etc/os-release   # the app layer's copy wins")
        print((mnt / "etc/os-release").read_text(), end="")
        print("\nNow write through the mount: append to a lower file, chmod one, delete one,")
        print("and make a new directory where a deleted one was.")
        with open(mnt / "etc/hosts", "a") as f:
            f.write("10.0.0.1 demo\n")
        os.chmod(mnt / "etc/passwd", 0o600)
        os.unlink(mnt / "bin/hello")
        (mnt / "opt/app/config").mkdir()
        print("\nWhat landed in the upper layer:")
        print("\n".join(_upper_listing(upper)))
        print("\nThe lower layers are unchanged; remove the upper dir to start afresh.")
    finally:
        if keep:
            print(f"\nStill mounted at {mnt}; unmount with: cowfs umount {mnt}")
        else:
            subprocess.call(["umount", str(mnt)])
            shutil.rmtree(scratch)
            print(f"\nUnmounted {mnt} and removed {scratch}.")
    return 0
