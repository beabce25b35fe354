"""The #9 target table of the benchmark suite (bench/report.py): each target form reads
the same run's figures the right way round.  Pure logic, no mount."""
from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "bench"))

from config import Config  # noqa: E402
from report import summarize, targets  # noqa: E402


def _targets(raw: dict) -> dict:
    cfg = Config(repeat=2)
    rows = summarize(cfg, raw, ["plain", "kernel", "fuse-overlayfs", "cowfs"])
    return {(t["metric"], t["layers"]): t for t in targets(rows, cfg)}


def test_cost_ratio_target_uses_the_per_run_ratio() -> None:
    # cowfs 2x fuse-overlayfs in run 1, 1.2x in run 2: median 1.6x, over 1.5x.
    t = _targets({("cpu_lookup_enoent", 1): {"fuse-overlayfs": [10.0, 10.0],
                                             "cowfs": [20.0, 12.0]}})
    e = t[("cpu_lookup_enoent", 1)]
    assert abs(e["figure"] - 1.6) < 1e-9 and e["met"] is False
    t = _targets({("cpu_lookup_enoent", 1): {"fuse-overlayfs": [10.0, 10.0],
                                             "cowfs": [14.0, 15.0]}})
    assert t[("cpu_lookup_enoent", 1)]["met"] is True


def test_throughput_target_is_a_speed_ratio() -> None:
    # MiB/s: cowfs reads at 0.95x the kernel's speed -> met (>= 0.9x).
    t = _targets({("read_hot", 1): {"kernel": [1000.0, 1000.0], "cowfs": [950.0, 950.0]}})
    e = t[("read_hot", 1)]
    assert abs(e["figure"] - 0.95) < 1e-9 and e["met"] is True
    t = _targets({("read_hot", 1): {"kernel": [1000.0, 1000.0], "cowfs": [850.0, 850.0]}})
    assert t[("read_hot", 1)]["met"] is False


def test_faster_target_takes_the_largest_layer_count() -> None:
    raw = {("stat_first", 1): {"fuse-overlayfs": [100.0, 100.0], "cowfs": [200.0, 200.0]},
           ("stat_first", 20): {"fuse-overlayfs": [300.0, 300.0], "cowfs": [150.0, 150.0]}}
    t = _targets(raw)
    assert ("stat_first", 1) not in t
    e = t[("stat_first", 20)]
    assert abs(e["figure"] - 2.0) < 1e-9 and e["met"] is True     # 2x faster


def test_absolute_target_scales_with_the_file_size() -> None:
    # Cached growth limit: 1.2 x big_large (1 GiB) = 1228.8 MiB.
    t = _targets({("read_cached", 1): {"cowfs": [1100.0, 1120.0],
                                       "fuse-overlayfs": [2048.0, 2050.0]}})
    assert t[("read_cached", 1)]["met"] is True
    t = _targets({("read_cached", 1): {"cowfs": [2000.0, 2100.0]}})
    assert t[("read_cached", 1)]["met"] is False


def test_a_target_without_figures_is_not_measured() -> None:
    t = _targets({("git_commit", 1): {"fuse-overlayfs": [None, None], "cowfs": [1.0, 1.0]}})
    assert t[("git_commit", 1)]["met"] is None
    assert t[("mount_latency", None)]["met"] is None
