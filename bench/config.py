"""Sizes, layer counts and metric definitions for the full and the --quick run."""
from __future__ import annotations

from dataclasses import asdict, dataclass, field

MiB = 1 << 20
GiB = 1 << 30

BACKENDS = ["plain", "kernel", "fuse-overlayfs", "cowfs"]
FUSE_BACKENDS = {"fuse-overlayfs", "cowfs"}
WORKLOADS = ["read", "stat", "find", "ls", "lookup", "copyup", "small", "job", "memory"]


@dataclass
class Config:
    quick: bool = False
    big_small: int = 256 * MiB        # read workloads and the small copy-up file
    big_large: int = 1 * GiB          # copy-up and chmod file
    stat_files: int = 10_000
    find_entries: int = 20_000
    bigdir: int = 5_000
    lookup_names: int = 2_000
    small_files: int = 5_000
    small_size: int = 4096
    delete_files: int = 2_000
    job_files: int = 3_000
    mem_entries: int = 100_000
    layers: list[int] = field(default_factory=lambda: [1, 5, 20])
    lookup_layers: list[int] = field(default_factory=lambda: [1, 5, 20, 100])
    copyup_layers: list[int] = field(default_factory=lambda: [1])
    memory_layers: list[int] = field(default_factory=lambda: [5])
    repeat: int = 5
    timeout: float = 900.0            # one measurement step; then the mount is torn down
    mount_timeout: float = 60.0
    seed: int = 5

    def as_dict(self) -> dict:
        return asdict(self)

    def layers_for(self, workload: str) -> list[int]:
        return {"lookup": self.lookup_layers, "copyup": self.copyup_layers,
                "memory": self.memory_layers}.get(workload, self.layers)


def quick_config() -> Config:
    return Config(quick=True, big_small=8 * MiB, big_large=16 * MiB, stat_files=400,
                  find_entries=600, bigdir=300, lookup_names=200, small_files=200,
                  delete_files=100, job_files=120, mem_entries=2_000, layers=[3],
                  lookup_layers=[1, 3], copyup_layers=[3], memory_layers=[3], repeat=1,
                  timeout=20.0, mount_timeout=10.0)


def human_size(n: int) -> str:
    if n >= GiB and n % GiB == 0:
        return f"{n // GiB} GiB"
    return f"{n // MiB} MiB"


@dataclass(frozen=True)
class Metric:
    key: str
    workload: str
    label: str          # str.format()ed with the config's fields
    unit: str
    better: str = "lower"   # "lower" or "higher"
    backends: tuple[str, ...] = tuple(BACKENDS)

    def title(self, cfg: Config) -> str:
        d = cfg.as_dict()
        d.update(big_small=human_size(cfg.big_small), big_large=human_size(cfg.big_large))
        for k in ("stat_files", "find_entries", "bigdir", "lookup_names", "small_files",
                  "delete_files", "job_files", "mem_entries"):
            d[k] = f"{d[k]:,}"
        return self.label.format(**d)


_F = tuple(sorted(FUSE_BACKENDS, key=BACKENDS.index))

METRICS: list[Metric] = [
    Metric("read_first", "read", "1. read {big_small} lower file (cached below), 1st pass",
           "MiB/s", "higher"),
    Metric("read_hot", "read", "1. the same read again (hot: mount's cache warm)", "MiB/s",
           "higher"),
    Metric("read_cold", "read", "2. sequential read after drop_caches", "MiB/s", "higher"),
    Metric("stat_first", "stat", "3. lstat {stat_files} files, first pass (fresh mount)", "ms"),
    Metric("stat_warm", "stat", "3. lstat {stat_files} files, warm", "ms"),
    Metric("find_first", "find", "4. find over {find_entries}-entry tree, first pass", "ms"),
    Metric("find_warm", "find", "4. find over the same tree, warm", "ms"),
    Metric("ls_first", "ls", "5. list {bigdir}-entry dir (fresh mount)", "ms"),
    Metric("ls_lstat_first", "ls", "5. list + lstat {bigdir}-entry dir (fresh mount)", "ms"),
    Metric("lookup_bottom", "lookup", "6. lookup of bottom-layer-only names, first", "us/op"),
    Metric("lookup_missing", "lookup", "6. lookup of missing names (ENOENT)", "us/op"),
    Metric("copyup_append_small", "copyup", "7. first append+fsync, {big_small} lower file", "s"),
    Metric("copyup_append_large", "copyup", "7. first append+fsync, {big_large} lower file", "s"),
    Metric("copyup_chmod_large", "copyup", "7. chmod of {big_large} lower file", "s"),
    Metric("copyup_chmod_sync_large", "copyup", "7. chmod + sync of {big_large} lower file", "s"),
    Metric("cp_sync_large", "copyup", "7. reference: cp + sync of the {big_large} file", "s"),
    Metric("small_create", "small", "8. create + write 4 KiB x {small_files}", "ms"),
    Metric("small_unlink", "small", "8. unlink those {small_files} files", "ms"),
    Metric("delete_lower", "small", "8. delete {delete_files} lower files (whiteouts)", "ms"),
    Metric("job_untar", "job", "9. job: untar {job_files}-file source tree", "s"),
    Metric("job_du", "job", "9. job: du -s over it and the lower tree", "s"),
    Metric("job_tar", "job", "9. job: tar both trees back out", "s"),
    Metric("job_total", "job", "9. job: total", "s"),
    Metric("mem_walk", "memory", "10. walk {mem_entries}-entry tree (lstat all)", "s", backends=_F),
    Metric("rss_idle", "memory", "10. daemon RSS, freshly mounted", "MiB", backends=_F),
    Metric("rss_walk", "memory", "10. daemon RSS after the walk", "MiB", backends=_F),
    Metric("rss_forget", "memory", "10. daemon RSS after drop_caches=2 (forget)", "MiB",
           backends=_F),
]
METRIC_BY_KEY = {m.key: m for m in METRICS}
