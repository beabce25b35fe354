"""Smoke test of the benchmark suite: the --quick run over every backend completes and
writes its JSON and table.  No timing is asserted: a backend that fails to mount or
fails a step is reported by the suite, not by this test."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import uuid
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="the benchmark needs root")


def test_quick_bench_runs_all_backends(tmp_path: Path) -> None:
    pytest.importorskip("rich")
    pytest.importorskip("matplotlib")
    root = Path("/tmp/bench-helper") / f"smoke-{uuid.uuid4().hex[:8]}"
    out = tmp_path / "out"
    try:
        res = subprocess.run(
            [sys.executable, str(REPO / "bench" / "run.py"), "--quick", "--out", str(out),
             "--root", str(root), "--no-results-md"],
            capture_output=True, text=True, timeout=240, stdin=subprocess.DEVNULL)
    finally:
        # The suite unmounts everything itself, but not if it was killed (an
        # interrupted pytest kills its child): then its leftovers go here.
        sys.path.insert(0, str(REPO / "bench"))
        from backends import cleanup_stale
        cleanup_stale(root)
        shutil.rmtree(root, ignore_errors=True)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    doc = json.loads((out / "results.json").read_text())
    assert doc["backends"] == ["plain", "kernel", "fuse-overlayfs", "cowfs"]
    assert doc["rows"], "no rows in results.json"
    assert {r["metric"] for r in doc["rows"]} >= {"read_hot", "stat_first", "lookup_bottom",
                                                  "copyup_append_large", "job_total",
                                                  "cpu_lookup_enoent", "cpu_getattr",
                                                  "cpu_open", "read_cached", "mount_latency",
                                                  "git_commit", "sqlite_txns", "rootfs_ls_lR"}
    targets = {t["metric"] for t in doc["targets"] if t["met"] is not None}
    assert targets >= {"cpu_getattr", "read_hot", "find_warm", "mount_latency", "git_commit"}
    table = (out / "table.txt").read_text()
    assert "cowfs/kernel" in table and "fuse-ovl" in table and "#9 target" in table
    with open("/proc/self/mountinfo") as f:
        assert str(root) not in f.read(), "the benchmark left a mount behind"
