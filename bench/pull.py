"""Benchmark: `cowfs image pull` from a local registry against `skopeo copy` into
an OCI layout followed by `cowfs image import`, in the same run.

    .venv/bin/python bench/pull.py [--size-mib 100] [--repeat 5] [--results-md]

A 3-layer image (examples/image, each layer padded with random bytes to about
size/3, so gzip cannot shrink it) is pushed once to Debian's docker-registry on
127.0.0.1; then each run pulls it into a fresh store both ways (order alternating)
and the ratio is taken within the run.  --results-md writes the table into
bench/RESULTS.md (section "Registry pull").
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

from tests.registryutil import RegistryServer, example_layout  # noqa: E402

COWFS = [sys.executable, "-m", "cowfs"]
SECTION = "## Registry pull"


def run(cmd: list[str], env: dict[str, str] | None = None) -> float:
    t = time.perf_counter()
    res = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, **(env or {})})
    if res.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed: {res.stderr[-1000:]}")
    return time.perf_counter() - t


def one_run(ref: str, work: Path, order: list[str]) -> dict[str, float]:
    out: dict[str, float] = {}
    for how in order:
        d = Path(tempfile.mkdtemp(prefix=f"{how}-", dir=work))
        store = {"COWFS_STORE": str(d / "store")}
        if how == "cowfs":
            out["cowfs pull"] = run([*COWFS, "image", "pull", "--plain-http", "-q", ref], store)
            out["cowfs pull again (nothing new)"] = run(
                [*COWFS, "image", "pull", "--plain-http", "-q", ref, "--name", "again"], store)
        else:
            copy = run(["skopeo", "--insecure-policy", "copy", "--src-tls-verify=false",
                        f"docker://{ref}", f"oci:{d / 'oci'}:v1"])
            imp = run([*COWFS, "image", "import", f"{d / 'oci'}:v1", "-q"], store)
            out["skopeo copy"] = copy
            out["cowfs import"] = imp
            out["skopeo copy + cowfs import"] = copy + imp
        shutil.rmtree(d)
    out["ratio"] = out["cowfs pull"] / out["skopeo copy + cowfs import"]
    return out


def table(runs: list[dict[str, float]], size: int) -> str:
    rows = ["| step | median (s) | min | max |", "|---|---|---|---|"]
    for key in ["cowfs pull", "skopeo copy", "cowfs import", "skopeo copy + cowfs import",
                "cowfs pull again (nothing new)"]:
        vals = [r[key] for r in runs]
        rows.append(f"| {key} | {statistics.median(vals):.2f} | {min(vals):.2f} | "
                    f"{max(vals):.2f} |")
    ratios = [r["ratio"] for r in runs]
    rows.append(f"| **cowfs pull / (skopeo copy + cowfs import)**, per run | "
                f"**{statistics.median(ratios):.2f}x** | {min(ratios):.2f}x | "
                f"{max(ratios):.2f}x |")
    return (f"{SECTION}\n\n`bench/pull.py`: a 3-layer image of {size / 2**20:.0f} MiB "
            f"(gzip layers of random data) from Debian's docker-registry on 127.0.0.1, into "
            f"a fresh store each run; {len(runs)} runs, order alternating, ratio taken "
            f"within each run (below 1: cowfs pull is faster).\n\n" + "\n".join(rows) + "\n")


def write_results_md(section: str) -> None:
    path = HERE / "RESULTS.md"
    text = path.read_text()
    if SECTION in text:
        head, _, rest = text.partition(SECTION)
        nxt = rest.find("\n## ")
        text = head + section + (rest[nxt:] if nxt >= 0 else "")
    else:
        marker = "\n## Methodology"
        head, sep, tail = text.partition(marker)
        text = head.rstrip("\n") + "\n\n" + section + (sep + tail if sep else "")
    path.write_text(text)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--size-mib", type=int, default=100)
    p.add_argument("--repeat", type=int, default=5)
    p.add_argument("--results-md", action="store_true", help="write into bench/RESULTS.md")
    p.add_argument("--out", default=str(HERE / "out"), help="results-pull.json goes here")
    ns = p.parse_args()
    for tool in ("docker-registry", "skopeo"):
        if shutil.which(tool) is None:
            raise SystemExit(f"{tool} is not installed (scripts/setup --slow)")
    work = Path(tempfile.mkdtemp(prefix="cowfs-bench-pull-"))
    server = RegistryServer(work / "registry")
    try:
        layout = work / "image"
        example_layout(layout, "v1", pad=ns.size_mib * 2**20 // 3)
        size = sum(f.stat().st_size for f in (layout / "blobs" / "sha256").iterdir())
        server.start()
        ref = f"{server.host}/bench/app:v1"
        run(["skopeo", "--insecure-policy", "copy", "--dest-tls-verify=false",
             f"oci:{layout}:v1", f"docker://{ref}"])
        runs = []
        for i in range(ns.repeat):
            order = ["cowfs", "skopeo"] if i % 2 == 0 else ["skopeo", "cowfs"]
            runs.append(one_run(ref, work, order))
            print(f"run {i + 1}/{ns.repeat}: " + ", ".join(
                f"{k} {v:.2f}" for k, v in runs[-1].items()), file=sys.stderr)
    finally:
        server.stop()
        shutil.rmtree(work, ignore_errors=True)
    section = table(runs, size)
    print(section)
    os.makedirs(ns.out, exist_ok=True)
    with open(os.path.join(ns.out, "results-pull.json"), "w") as f:
        json.dump({"size": size, "runs": runs}, f, indent=1)
    if ns.results_md:
        write_results_md(section)
    return 0


if __name__ == "__main__":
    sys.exit(main())
