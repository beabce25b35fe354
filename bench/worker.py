"""The measured operations, run in a child process so a hung mount cannot hang the suite.

Usage: python worker.py < spec.json   (spec: {"op": NAME, ...arguments})
Prints one JSON object: {"ok": true, "values": {...}} or {"ok": false, "error": "..."}.
Standard library only, so it starts fast.
"""
from __future__ import annotations

import ctypes
import json
import os
import sqlite3
import subprocess
import sys
import time
import traceback

now = time.perf_counter


def _read_all(path: str, block: int = 1 << 20) -> int:
    buf = bytearray(block)
    view = memoryview(buf)
    total = 0
    fd = os.open(path, os.O_RDONLY)
    try:
        while True:
            n = os.readv(fd, [view])
            if n <= 0:
                break
            total += n
    finally:
        os.close(fd)
    return total


def _cached_mib() -> float:
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("Cached:"):
                return int(line.split()[1]) / 1024
    raise RuntimeError("no Cached line in /proc/meminfo")


def op_read(path: str, warm: bool) -> dict:
    out = {}
    if warm:                   # first pass fills the mount's page cache; timed too
        t = now()
        size = _read_all(path)
        out["first_mibps"] = size / (1 << 20) / (now() - t)
    cached = _cached_mib()     # here, not in the runner: our own start pages in python
    t = now()
    size = _read_all(path)
    dt = now() - t
    out.update(mibps=size / (1 << 20) / dt, bytes=size, cached_mib=_cached_mib() - cached)
    return out


def _paths(base: str, manifest: str) -> list[str]:
    with open(manifest) as f:
        return [os.path.join(base, line.rstrip("\n")) for line in f if line.strip()]


def op_stat(base: str, manifest: str) -> dict:
    paths = _paths(base, manifest)
    out = {}
    for key in ("first", "warm"):
        t = now()
        for p in paths:
            os.lstat(p)
        out[key] = (now() - t) * 1e3
    return out


def op_find(path: str) -> dict:
    out = {}
    for key in ("first", "warm"):
        t = now()
        res = subprocess.run(["find", path], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        out[key] = (now() - t) * 1e3
        if res.returncode != 0:
            raise RuntimeError(f"find failed: {res.stderr.decode()[-300:]}")
        out["entries"] = res.stdout.count(b"\n")
    return out


def op_ls(path: str, lstat: bool) -> dict:
    t = now()
    names = os.listdir(path)
    if lstat:
        for n in names:
            os.lstat(os.path.join(path, n))
    return {"ms": (now() - t) * 1e3, "entries": len(names)}


def op_lookup(path: str, count: int) -> dict:
    present = [os.path.join(path, f"b{i:05d}") for i in range(count)]
    missing = [os.path.join(path, f"m{i:05d}") for i in range(count)]
    t = now()
    for p in present:
        os.lstat(p)
    t_present = now() - t
    t = now()
    for p in missing:
        try:
            os.lstat(p)
        except FileNotFoundError:
            pass
        else:
            raise RuntimeError(f"{p} exists")
    t_missing = now() - t
    return {"bottom": t_present / count * 1e6, "missing": t_missing / count * 1e6}


def _append(path: str) -> float:
    t = now()
    fd = os.open(path, os.O_WRONLY | os.O_APPEND)
    try:
        os.write(fd, b"z" * 4096)
        os.fsync(fd)
    finally:
        os.close(fd)
    return now() - t


def op_append(small: str, large: str) -> dict:
    return {"small": _append(small), "large": _append(large)}


def op_chmod(path: str) -> dict:
    t = now()
    os.chmod(path, 0o600)
    t1 = now()
    os.sync()
    t2 = now()
    if os.stat(path).st_mode & 0o777 != 0o600:
        raise RuntimeError("chmod did not stick")
    return {"chmod": t1 - t, "chmod_sync": t2 - t}


def op_cp_sync(src: str, dst: str) -> dict:
    t = now()
    subprocess.run(["cp", src, dst], check=True)
    subprocess.run(["sync"], check=True)
    dt = now() - t
    if os.path.getsize(dst) != os.path.getsize(src):
        raise RuntimeError("copy has the wrong size")
    os.unlink(dst)
    return {"s": dt}


def op_small(base: str, count: int, size: int, delete_manifest: str) -> dict:
    d = os.path.join(base, "small-new")
    os.makedirs(d, exist_ok=True)    # the runner may have made it (priming)
    payload = b"s" * size
    names = [os.path.join(d, f"n{i:05d}") for i in range(count)]
    t = now()
    for p in names:
        fd = os.open(p, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        os.write(fd, payload)
        os.close(fd)
    t_create = now() - t
    t = now()
    for p in names:
        os.unlink(p)
    t_unlink = now() - t
    victims = _paths(base, delete_manifest)
    t = now()
    for p in victims:
        os.unlink(p)
    t_delete = now() - t
    for p in victims[:50]:
        if os.path.lexists(p):
            raise RuntimeError(f"{p} still visible after unlink")
    return {"create": t_create * 1e3, "unlink": t_unlink * 1e3, "delete": t_delete * 1e3}


def op_job(base: str, tarball: str, out: str) -> dict:
    job = os.path.join(base, "job")
    os.makedirs(job, exist_ok=True)  # the runner may have made it (priming)
    t0 = now()
    subprocess.run(["tar", "-xf", tarball, "-C", job], check=True)
    t1 = now()
    du = subprocess.run(["du", "-sk", job, os.path.join(base, "src")], check=True,
                        capture_output=True, text=True).stdout
    t2 = now()
    subprocess.run(["tar", "-cf", out, "-C", base, "job", "src"], check=True)
    t3 = now()
    os.unlink(out)
    return {"untar": t1 - t0, "du": t2 - t1, "tar": t3 - t2, "total": t3 - t0,
            "du_out": du.split()[::2]}


def op_walk(path: str) -> dict:
    t = now()
    n = 0
    for dirpath, dirnames, filenames in os.walk(path):
        for name in filenames:
            os.lstat(os.path.join(dirpath, name))
        n += len(filenames) + len(dirnames)
    return {"s": now() - t, "entries": n}


def _cpu_seconds(pids: list[int]) -> tuple[float, float]:
    """(utime, stime) of the daemon processes (all their threads), in seconds."""
    user = system = 0
    for pid in pids:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        user += int(fields[11])      # fields 14 and 15 of proc(5)
        system += int(fields[12])
    tick = os.sysconf("SC_CLK_TCK")
    return user / tick, system / tick


AT_FDCWD = -100
AT_SYMLINK_NOFOLLOW = 0x100
AT_STATX_FORCE_SYNC = 0x2000     # past the kernel's attribute cache: FUSE asks the daemon
STATX_BASIC_STATS = 0x7FF


def _statx_forced():
    libc = ctypes.CDLL(None, use_errno=True)
    buf = ctypes.create_string_buffer(256)

    def statx(path: bytes) -> None:
        if libc.statx(AT_FDCWD, path, AT_SYMLINK_NOFOLLOW | AT_STATX_FORCE_SYNC,
                      STATX_BASIC_STATS, buf) != 0:
            e = ctypes.get_errno()
            raise OSError(e, os.strerror(e), path.decode())
    return statx


def op_cpu(kind: str, pids: list[int], path: str, files: int, requests: int) -> dict:
    """Daemon CPU per request (or per open + close for kind "open")."""
    names = [os.path.join(path, f"f{i:05d}").encode() for i in range(files)]
    for p in names:              # warm: every file looked up once
        os.lstat(p)
    if kind == "enoent":
        targets = [os.path.join(path, f"missing-{i:06d}").encode() for i in range(requests)]
    else:
        targets = [names[i % files] for i in range(requests)]
    statx = _statx_forced()
    cpu0, t0 = _cpu_seconds(pids), now()
    if kind == "enoent":
        for p in targets:
            try:
                os.lstat(p)
            except FileNotFoundError:
                pass
            else:
                raise RuntimeError(f"{p!r} exists")
    elif kind == "getattr":
        for p in targets:
            statx(p)
    elif kind == "open":
        for p in targets:
            os.close(os.open(p, os.O_RDONLY))
    else:
        raise ValueError(f"unknown kind {kind}")
    wall = now() - t0
    (u0, s0), (u1, s1) = cpu0, _cpu_seconds(pids)
    per = 1e6 / requests
    return {"cpu_us": (u1 - u0 + s1 - s0) * per, "user_us": (u1 - u0) * per,
            "sys_us": (s1 - s0) * per, "wall_us": wall * per}


def op_git(path: str, files: int) -> dict:
    env = {**os.environ, "GIT_AUTHOR_NAME": "bench", "GIT_AUTHOR_EMAIL": "bench@localhost",
           "GIT_COMMITTER_NAME": "bench", "GIT_COMMITTER_EMAIL": "bench@localhost",
           "GIT_CONFIG_GLOBAL": "/dev/null", "GIT_CONFIG_NOSYSTEM": "1"}
    t = now()
    for cmd in (["git", "init", "-q"], ["git", "add", "-A"],
                ["git", "commit", "-q", "-m", "bench"]):
        subprocess.run(cmd, cwd=path, env=env, check=True, stdout=subprocess.DEVNULL)
    dt = now() - t
    tracked = subprocess.run(["git", "ls-files"], cwd=path, env=env, check=True,
                             capture_output=True).stdout.count(b"\n")
    if tracked != files:
        raise RuntimeError(f"the commit has {tracked} files, expected {files}")
    return {"s": dt}


def op_sqlite(db: str, txns: int) -> dict:
    con = sqlite3.connect(db, isolation_level=None)   # explicit transactions
    try:
        con.execute("PRAGMA synchronous=FULL")          # fsync at every commit
        body = "row" * 40
        t = now()
        for _ in range(txns):
            con.execute("BEGIN")
            con.execute("INSERT INTO t (body) VALUES (?)", (body,))
            con.execute("COMMIT")
        dt = now() - t
        (count,) = con.execute("SELECT count(*) FROM t").fetchone()
    finally:
        con.close()
    if count != 100 + txns:
        raise RuntimeError(f"{count} rows after {txns} transactions")
    return {"s": dt}


def op_ls_lR(path: str) -> dict:
    t = now()
    res = subprocess.run(["ls", "-lR", path], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    dt = now() - t
    if res.returncode != 0:
        raise RuntimeError(f"ls -lR failed: {res.stderr.decode()[-300:]}")
    return {"s": dt, "lines": res.stdout.count(b"\n")}


# In a mount namespace of its own, so the /dev and /proc mounts vanish with it.
_APT = ('mount --rbind /dev "$1/dev"; mount -t proc proc "$1/proc"; '
        'exec chroot "$1" apt-get install -y -q --no-download "$2"')


def op_apt(root: str, package: str) -> dict:
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    t = now()
    res = subprocess.run(["unshare", "-m", "--propagation", "private", "--", "sh", "-ec", _APT,
                          "sh", root, package], env=env, capture_output=True, text=True)
    dt = now() - t
    if res.returncode != 0:
        raise RuntimeError(f"apt-get install failed (rc {res.returncode}): "
                           f"{(res.stdout + res.stderr).strip()[-300:]}")
    status = subprocess.run(["chroot", root, "dpkg-query", "-W", "-f=${Status}", package],
                            capture_output=True, text=True).stdout
    if status != "install ok installed":
        raise RuntimeError(f"{package} is not installed afterwards: {status!r}")
    return {"s": dt}


def main() -> int:
    spec = json.load(sys.stdin)
    op = spec.pop("op")
    try:
        values = globals()[f"op_{op}"](**spec)
    except BaseException as e:  # reported to the runner, which decides
        tb = traceback.format_exc().strip().splitlines()
        print(json.dumps({"ok": False, "error": f"{type(e).__name__}: {e}",
                          "where": tb[-3:] if tb else []}))
        return 1
    print(json.dumps({"ok": True, "values": values}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
