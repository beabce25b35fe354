"""The workloads, as steps the runner drives for one (backend, layer count).

Each workload mounts the backend fresh (some several times), has worker.py do the timed
part in a child process, and returns {metric key: value}.  Anything that goes wrong
raises StepError; the runner records it and goes on with the next backend.
"""
from __future__ import annotations

import contextlib
import ctypes
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

from backends import Backend, MountError, Mounted, is_mountpoint, rss_mib
from config import APPLIES, Config
from data import SUBDIRS_BY_WORKLOAD, Data

WORKER = Path(__file__).resolve().parent / "worker.py"


class StepError(Exception):
    pass


def sync_all(timeout: float = 120.0) -> None:
    """sync(1) in a child: a hung FUSE mount elsewhere on the machine must not hang us."""
    with contextlib.suppress(subprocess.TimeoutExpired):
        subprocess.run(["sync"], timeout=timeout)


_libc = ctypes.CDLL(None, use_errno=True)


def syncfs(path: Path) -> None:
    """Flush the scratch filesystem only (so one step's writeback doesn't bleed into
    the next step's timing)."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        _libc.syncfs(fd)
    finally:
        os.close(fd)


def prime_disk(data: Data, size: int) -> None:
    """Write and delete a file of `size` bytes: this VM's disk writes recently freed
    blocks several times faster than long-free ones, so every copy-up step starts from
    this same state instead of from whatever the previous step left."""
    p = data.scratch / "primer"
    block = b"\0" * (8 << 20)
    with open(p, "wb") as f:
        left = size
        while left > 0:
            f.write(block[:min(left, len(block))])
            left -= len(block)
    sync_all()
    p.unlink()
    sync_all()


def drop_caches(level: int) -> None:
    sync_all()
    with open("/proc/sys/vm/drop_caches", "w") as f:
        f.write(f"{level}\n")


class Ctx:
    profile_dir: Path | None = None    # --profile: py-spy the cowfs daemon during steps

    def __init__(self, cfg: Config, data: Data, backend: Backend, n: int, workload: str,
                 register) -> None:
        self.cfg, self.data, self.backend, self.n = cfg, data, backend, n
        self.workload = workload
        self.subdirs = SUBDIRS_BY_WORKLOAD[workload]
        self.register = register      # register(mounted | None): the runner's safety net

    @contextlib.contextmanager
    def mount(self, lowers: list[Path] | None = None):
        """A fresh mount of this backend over the layer set, or over `lowers` (plain: a
        fresh union dir)."""
        b = self.backend
        self.data.prewarm(self.n, self.subdirs, lowers)
        if b.name == "plain":
            path = b.base / "mnt"
            if lowers is None:
                self.data.build_plain(self.n, self.subdirs, path)
            else:
                self.data.build_plain_rootfs(path)
            m = Mounted("plain", path)
        else:
            m = b.mount(lowers or self.data.layerset(self.n).layers)
        self.register(m)
        try:
            yield m
        finally:
            try:
                b.unmount(m)
            finally:
                self.register(None)
            if b.name != "plain" and is_mountpoint(m.path):
                raise StepError(f"{m.path} is still mounted after umount")

    def child(self, m: Mounted, op: str, tag: str | None = None, **kw) -> dict:
        spec = json.dumps({"op": op, **kw})
        syncfs(self.data.root)
        rec = None
        if self.profile_dir is not None and self.backend.name == "cowfs" and m.pids:
            from pyspy import Recorder
            rec = Recorder(m.pids[0], self.profile_dir /
                           f"cowfs-{self.workload}-L{self.n}-{tag or op}.txt")
            time.sleep(0.3)   # let py-spy attach
        proc = subprocess.Popen([sys.executable, str(WORKER)], stdin=subprocess.PIPE,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        try:
            out, err = proc.communicate(spec, timeout=self.cfg.timeout)
        except subprocess.TimeoutExpired:
            if rec is not None:
                rec.stop()
                rec = None
            m.hung = True          # the unmount kills the daemon first
            proc.kill()
            # If the child is stuck in a FUSE request, it gets free once the daemon dies.
            with contextlib.suppress(Exception):
                self.backend.unmount(m)
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.communicate(timeout=30)
            raise StepError(f"{op}: no answer within {self.cfg.timeout:.0f}s "
                            "(timed out; mount torn down)") from None
        finally:
            if rec is not None:
                rec.stop()
        try:
            res = json.loads(out.strip().splitlines()[-1])
        except (IndexError, json.JSONDecodeError):
            raise StepError(f"{op}: worker died (rc {proc.returncode}): {err.strip()[-300:]}")
        if not res["ok"]:
            dead = ""
            if m.pids and not any(os.path.exists(f"/proc/{p}") for p in m.pids):
                dead = " [daemon process has exited]"
            raise StepError(f"{op}: {res['error']}{dead}")
        return res["values"]


def _big(m: Mounted, name: str) -> str:
    return str(m.path / "big" / name)


def run_cpu(ctx: Ctx) -> dict:
    """Daemon CPU time (utime + stime of its process) per request, measured by the worker
    around N requests of one kind: lookups of distinct missing names (each one LOOKUP,
    the kernel caches the negative entry), statx(AT_STATX_FORCE_SYNC) of warm files (one
    GETATTR or STATX each, past the kernel's attribute cache) and open + close of warm
    files (OPEN, RELEASE and FLUSH unless the daemon declines it)."""
    out = {}
    with ctx.mount() as m:
        if not m.pids:
            raise StepError("cannot find the daemon process of the mount")
        for kind in ("enoent", "getattr", "open"):
            v = ctx.child(m, "cpu", f"cpu-{kind}", kind=kind, pids=m.pids,
                          path=str(m.path / "cpu"), files=ctx.cfg.cpu_files,
                          requests=ctx.cfg.cpu_requests)
            out[{"enoent": "cpu_lookup_enoent", "getattr": "cpu_getattr",
                 "open": "cpu_open"}[kind]] = v["cpu_us"]
    return out


def run_read(ctx: Ctx) -> dict:
    lower = (ctx.data.plain_big if ctx.backend.name == "plain" else ctx.data.big)["f_large"]
    ctx.data.warm_file(lower)          # the lower file is in the page cache
    with ctx.mount() as m:
        hot = ctx.child(m, "read", "read-hot", path=_big(m, "f_large"), warm=True)
        drop_caches(3)
        cold = ctx.child(m, "read", "read-cold", path=_big(m, "f_large"), warm=False)
    return {"read_first": hot["first_mibps"], "read_hot": hot["mibps"],
            "read_cold": cold["mibps"], "read_cached": cold["cached_mib"]}


def run_stat(ctx: Ctx) -> dict:
    with ctx.mount() as m:
        v = ctx.child(m, "stat", base=str(m.path), manifest=str(ctx.data.manifest(ctx.n, "stat")))
    return {"stat_first": v["first"], "stat_warm": v["warm"]}


def run_find(ctx: Ctx) -> dict:
    with ctx.mount() as m:
        v = ctx.child(m, "find", path=str(m.path / "find"))
    return {"find_first": v["first"], "find_warm": v["warm"]}


def run_ls(ctx: Ctx) -> dict:
    out = {}
    for key, lstat in (("ls_first", False), ("ls_lstat_first", True)):
        with ctx.mount() as m:
            v = ctx.child(m, "ls", key, path=str(m.path / "ls" / "dir"), lstat=lstat)
        if v["entries"] != ctx.cfg.bigdir:
            raise StepError(f"listing shows {v['entries']} entries, expected {ctx.cfg.bigdir}")
        out[key] = v["ms"]
    return out


def run_lookup(ctx: Ctx) -> dict:
    with ctx.mount() as m:
        v = ctx.child(m, "lookup", path=str(m.path / "lk"), count=ctx.cfg.lookup_names)
    return {"lookup_bottom": v["bottom"], "lookup_missing": v["missing"]}


def _warm_big(ctx: Ctx) -> None:
    files = ctx.data.plain_big if ctx.backend.name == "plain" else ctx.data.big
    for p in files.values():
        ctx.data.warm_file(p)
    prime_disk(ctx.data, ctx.cfg.big_small + ctx.cfg.big_large + (64 << 20))


def run_copyup(ctx: Ctx) -> dict:
    out = {}
    plain = ctx.backend.name == "plain"
    try:
        _warm_big(ctx)
        with ctx.mount() as m:
            v = ctx.child(m, "append", small=_big(m, "f_small"), large=_big(m, "f_large"))
        out["copyup_append_small"], out["copyup_append_large"] = v["small"], v["large"]
        if plain:
            ctx.data.restore_plain_big()
        _warm_big(ctx)
        with ctx.mount() as m:
            v = ctx.child(m, "chmod", path=_big(m, "f_large"))
        out["copyup_chmod_large"], out["copyup_chmod_sync_large"] = v["chmod"], v["chmod_sync"]
        if plain:
            ctx.data.restore_plain_big()
        _warm_big(ctx)
        with ctx.mount() as m:
            v = ctx.child(m, "cp_sync", src=_big(m, "f_large"), dst=_big(m, "f_large") + ".cp")
        out["cp_sync_large"] = v["s"]
    finally:
        if plain:
            ctx.data.restore_plain_big()
    return out


def run_small(ctx: Ctx) -> dict:
    with ctx.mount() as m:
        v = ctx.child(m, "small", base=str(m.path), count=ctx.cfg.small_files,
                      size=ctx.cfg.small_size,
                      delete_manifest=str(ctx.data.manifest(ctx.n, "del")))
    return {"small_create": v["create"], "small_unlink": v["unlink"], "delete_lower": v["delete"]}


def run_job(ctx: Ctx) -> dict:
    out = ctx.data.scratch / f"job-{ctx.backend.name}.tar"
    with ctx.mount() as m:
        v = ctx.child(m, "job", base=str(m.path), tarball=str(ctx.data.src_tar), out=str(out))
    return {"job_untar": v["untar"], "job_du": v["du"], "job_tar": v["tar"],
            "job_total": v["total"]}


def _settled_rss(pids: list[int], seconds: float = 10.0) -> float | None:
    """RSS once it stops moving (forgets arrive asynchronously)."""
    last, stable = rss_mib(pids), 0
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline and stable < 3:
        time.sleep(0.25)
        cur = rss_mib(pids)
        stable = stable + 1 if cur == last else 0
        last = cur
    return last


def run_memory(ctx: Ctx) -> dict:
    with ctx.mount() as m:
        if not m.pids:
            raise StepError("cannot find the daemon process of the mount")
        idle = _settled_rss(m.pids, 3)
        v = ctx.child(m, "walk", path=str(m.path / "mem"))
        walked = _settled_rss(m.pids, 3)
        drop_caches(2)
        forgot = _settled_rss(m.pids, 15)
    if None in (idle, walked, forgot):
        raise StepError("the daemon process went away during the walk")
    return {"mem_walk": v["s"], "rss_idle": idle, "rss_walk": walked, "rss_forget": forgot}


def run_mount(ctx: Ctx) -> dict:
    """Median over cfg.mounts fresh mounts of the time from starting the mount command
    until a stat in the mount answers (backends.Backend.mount)."""
    lowers = ctx.data.layerset(ctx.n).layers
    ctx.data.prewarm(ctx.n, ctx.subdirs)
    times = []
    for _ in range(ctx.cfg.mounts):
        m = ctx.backend.mount(lowers, probe="lk")
        ctx.register(m)
        try:
            times.append(m.mount_s)
        finally:
            ctx.backend.unmount(m)
            ctx.register(None)
        if is_mountpoint(m.path):
            raise StepError(f"{m.path} is still mounted after umount")
    return {"mount_latency": statistics.median(times)}


def run_git(ctx: Ctx) -> dict:
    with ctx.mount() as m:
        v = ctx.child(m, "git", path=str(m.path / "git"), files=ctx.cfg.git_files)
    return {"git_commit": v["s"]}


def run_sqlite(ctx: Ctx) -> dict:
    with ctx.mount() as m:
        v = ctx.child(m, "sqlite", db=str(m.path / "sq" / "bench.db"),
                      txns=ctx.cfg.sqlite_txns)
    return {"sqlite_txns": v["s"]}


def run_rootfs(ctx: Ctx) -> dict:
    rootfs = ctx.data.rootfs
    if rootfs is None:
        raise StepError("no rootfs was prepared")
    with ctx.mount([rootfs]) as m:
        out = {"rootfs_ls_lR": ctx.child(m, "ls_lR", path=str(m.path))["s"]}
    if ctx.backend.name != "plain" and ctx.data.apt_unavailable is None:
        with ctx.mount([rootfs]) as m:
            out["rootfs_apt"] = ctx.child(m, "apt", root=str(m.path),
                                          package=ctx.cfg.apt_package)["s"]
    return out


RUNNERS = {"cpu": run_cpu, "read": run_read, "stat": run_stat, "find": run_find, "ls": run_ls,
           "lookup": run_lookup, "copyup": run_copyup, "small": run_small, "job": run_job,
           "memory": run_memory, "mount": run_mount, "git": run_git, "sqlite": run_sqlite,
           "rootfs": run_rootfs}


def applies(workload: str, backend: str) -> bool:
    return workload not in APPLIES or backend in APPLIES[workload]


__all__ = ["Ctx", "StepError", "MountError", "RUNNERS", "applies", "drop_caches"]
