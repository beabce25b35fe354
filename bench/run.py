#!/usr/bin/env python3
"""cowfs benchmark suite: every workload on every backend over identical data, one run.

Backends: plain (a directory holding the union of the layers: the physical reference),
kernel (mount -t overlay), fuse-overlayfs and cowfs.  See bench/README.md.

    scripts/bench                       # the full run; regenerates bench/RESULTS.md
    scripts/bench --quick               # small sizes, one repeat (the test suite's smoke test)
    scripts/bench --backends kernel,cowfs --workloads stat,lookup --repeat 5
"""
from __future__ import annotations

import argparse
import datetime as dt
import os
import platform
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from backends import CLASSES, MountError, MountTimeout, cleanup_stale, unmount  # noqa: E402
from config import BACKENDS, METRICS, WORKLOADS, Config, human_size, quick_config  # noqa: E402
from data import SUBDIRS_BY_WORKLOAD, Data  # noqa: E402
from events_overhead import BEGIN as KEPT_BEGIN, END as KEPT_END  # noqa: E402
import report  # noqa: E402
from workloads import RUNNERS, Ctx, StepError, applies  # noqa: E402

DEFAULT_ROOT = Path("/tmp/bench-helper")
PULL_SECTION = "## Registry pull"     # bench/pull.py's (importing it starts its test helpers)


def _csv(kind: str, allowed: list[str]):
    def parse(s: str) -> list[str]:
        items = [x.strip() for x in s.split(",") if x.strip()]
        bad = [x for x in items if x not in allowed]
        if bad:
            raise argparse.ArgumentTypeError(f"unknown {kind}: {', '.join(bad)} "
                                             f"(choose from {', '.join(allowed)})")
        return items
    return parse


def _ints(s: str) -> list[int]:
    try:
        out = [int(x) for x in s.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a list of integers: {s}") from None
    if not out or any(x < 1 for x in out):
        raise argparse.ArgumentTypeError("layer counts must be >= 1")
    return out


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="scripts/bench", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true",
                   help="small sizes, one repeat, layer counts 1 and 3 (a smoke test)")
    p.add_argument("--backends", type=_csv("backend", BACKENDS), default=list(BACKENDS),
                   help=f"comma-separated subset of {','.join(BACKENDS)}")
    p.add_argument("--workloads", type=_csv("workload", WORKLOADS), default=list(WORKLOADS),
                   help=f"comma-separated subset of {','.join(WORKLOADS)}")
    p.add_argument("--repeat", type=int, default=None,
                   help="runs of everything; medians are reported (default 5, quick 1)")
    p.add_argument("--layers", type=_ints, default=None,
                   help="layer counts for the layered workloads (default 1,5,20)")
    p.add_argument("--lookup-layers", type=_ints, default=None,
                   help="layer counts for the lookup-scaling workload (default 1,5,20,100)")
    p.add_argument("--max-minutes", type=float, default=None,
                   help="start another run (repeat) only if it is expected to end within "
                        "this many minutes of the first run's start; report the runs made")
    p.add_argument("--timeout", type=float, default=None,
                   help="seconds one measured step may take before the mount is torn down")
    p.add_argument("--out", type=Path, default=HERE / "out",
                   help="where results.json, table.txt, table.md, chart.png go (bench/out)")
    p.add_argument("--root", type=Path, default=DEFAULT_ROOT / "run",
                   help="scratch directory for data and mountpoints (/tmp/bench-helper/run)")
    p.add_argument("--keep-data", action="store_true",
                   help="keep the generated data for the next run (default: remove it)")
    p.add_argument("--results-md", type=Path, default=None,
                   help="write the RESULTS.md report here (default: bench/RESULTS.md on a "
                        "full run of everything, nowhere otherwise)")
    p.add_argument("--no-results-md", action="store_true", help="never write RESULTS.md")
    p.add_argument("--prepare-only", action="store_true",
                   help="generate the data the chosen workloads need and stop (with "
                        "--keep-data: a later run with the same --root starts measuring "
                        "at once)")
    p.add_argument("--profile", action="store_true",
                   help="record the cowfs daemon with py-spy during every step (perturbs "
                        "its timings; writes OUT/profiles/ and never RESULTS.md)")
    p.add_argument("--cowfs-python", default=sys.executable,
                   help="the python that runs `-m cowfs` (default: this one)")
    ns = p.parse_args(argv)
    ns.backends = [b for b in BACKENDS if b in ns.backends]      # canonical order
    ns.workloads = [w for w in WORKLOADS if w in ns.workloads]
    if ns.repeat is not None and ns.repeat < 1:
        p.error("--repeat must be >= 1")
    return ns


def make_config(ns: argparse.Namespace) -> Config:
    cfg = quick_config() if ns.quick else Config()
    if ns.repeat is not None:
        cfg.repeat = ns.repeat
    if ns.layers:
        cfg.layers = ns.layers
        cfg.copyup_layers = [min(ns.layers)]
        cfg.memory_layers = [sorted(ns.layers)[len(ns.layers) // 2]]
    if ns.lookup_layers:
        cfg.lookup_layers = ns.lookup_layers
    if ns.timeout:
        cfg.timeout = ns.timeout
    return cfg


def machine_info(backends: dict) -> dict:
    mem = "?"
    cpu = platform.processor() or "?"
    try:
        with open("/proc/meminfo") as f:
            kb = int(next(ln for ln in f if ln.startswith("MemTotal")).split()[1])
        mem = f"{kb / 1024 / 1024:.1f} GiB"
        with open("/proc/cpuinfo") as f:
            cpu = next((ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")),
                       cpu)
    except (OSError, StopIteration):
        pass
    fs = subprocess.run(["findmnt", "-no", "FSTYPE", "-T", str(DEFAULT_ROOT.parent)],
                        capture_output=True, text=True).stdout.strip()
    versions = {name: b.version() for name, b in backends.items() if name != "plain"}
    versions["python"] = platform.python_version()
    rev = subprocess.run(["git", "-C", str(HERE), "log", "-1", "--format=%h", "--", "."],
                         capture_output=True, text=True).stdout.strip()
    dirty = subprocess.run(["git", "-C", str(HERE), "status", "--porcelain", "."],
                           capture_output=True, text=True).stdout.strip()
    versions["bench"] = f"bench/ at git {rev or '?'}" + (" + uncommitted changes" if dirty
                                                         else "")
    return {"date": dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
            "nproc": os.cpu_count(), "memory": mem, "cpu": cpu,
            "kernel": os.uname().release, "scratch_fs": fs, "versions": versions}


class Runner:
    def __init__(self, ns: argparse.Namespace) -> None:
        self.ns = ns
        self.cfg = make_config(ns)
        self.root: Path = ns.root.resolve()
        self.data = Data(self.root / "data", self.cfg)
        base = self.root / "m"
        self.backends = {}
        for name in ns.backends:
            b = CLASSES[name](base, self.cfg.mount_timeout)
            if name == "cowfs":
                b.python = ns.cowfs_python
            self.backends[name] = b
        self.workloads = [w for w in WORKLOADS if w in ns.workloads]
        self.raw: dict = {}             # (metric, n) -> backend -> [value|None per repeat]
        self.failures: list[dict] = []
        self.status = {b: "ok" for b in self.backends}
        self.dead: dict[tuple[str, int], str] = {}   # (backend, n) -> why it is skipped
        self.live = None                # the mount being measured, for the safety net
        self.timeouts: dict[str, int] = {}

    # -- the plan ---------------------------------------------------------------------
    def steps(self) -> list[tuple[str, int, str]]:
        out = []
        for w in self.workloads:
            for n in self.cfg.layers_for(w):
                for b in self.backends:
                    if applies(w, b):
                        out.append((w, n, b))
        return out

    def data_needs(self) -> dict[int, set[str]]:
        needs: dict[int, set[str]] = {}
        for w, n, _ in self.steps():
            needs.setdefault(n, set()).update(SUBDIRS_BY_WORKLOAD[w])
        return needs

    def _all_layer_counts(self) -> set[int]:
        return {n for w in self.workloads for n in self.cfg.layers_for(w)}

    def _register(self, m) -> None:
        self.live = m

    def record(self, w: str, n: int, b: str, r: int, values: dict | None) -> None:
        for m in METRICS:
            if m.workload != w or b not in m.backends:
                continue
            per = self.raw.setdefault((m.key, n), {})
            vals = per.setdefault(b, [None] * self.cfg.repeat)
            vals[r] = None if values is None else values.get(m.key)

    def truncate(self, runs: int) -> None:
        """Keep the first `runs` runs (the ones that were made)."""
        self.cfg.repeat = runs
        for per in self.raw.values():
            for b in per:
                per[b] = per[b][:runs]

    def fail(self, w: str, n: int, b: str, r: int, err: str) -> None:
        self.failures.append({"backend": b, "workload": w, "layers": n, "repeat": r + 1,
                              "error": err})
        self.record(w, n, b, r, None)

    # -- the run -------------------------------------------------------------------------
    def run(self, progress, task) -> None:
        steps = self.steps()
        for name, b in self.backends.items():
            why = b.unavailable()
            if why:
                self.status[name] = f"unavailable: {why}"
        t0 = time.monotonic()
        for r in range(self.cfg.repeat):
            if r and self.ns.max_minutes:
                spent = time.monotonic() - t0
                if spent + spent / r > self.ns.max_minutes * 60:   # another would not fit
                    self.truncate(r)
                    progress.console.print(f"bench: stopping after {r} run(s): another "
                                           f"would exceed --max-minutes")
                    return
            # Rotate the backend order each run so none always goes first.
            order = list(self.backends)
            order = order[r % len(order):] + order[:r % len(order)]
            for w in self.workloads:
                for n in self.cfg.layers_for(w):
                    for bname in order:
                        if (w, n, bname) not in steps:
                            continue
                        desc = f"run {r + 1}/{self.cfg.repeat}  {w:<7} L={n:<3} {bname}"
                        progress.update(task, description=desc)
                        if not progress.console.is_terminal:   # a log: one line a step
                            done = int(progress.tasks[0].completed)
                            print(f"bench: [{done + 1}/{progress.tasks[0].total:.0f}] {desc}",
                                  file=sys.stderr, flush=True)
                        self.one(w, n, bname, r)
                        progress.advance(task)

    def one(self, w: str, n: int, bname: str, r: int) -> None:
        b = self.backends[bname]
        if self.status[bname].startswith("unavailable"):
            self.fail(w, n, bname, r, self.status[bname])
            return
        if (bname, n) in self.dead:
            self.fail(w, n, bname, r, f"skipped: {self.dead[(bname, n)]}")
            return
        ctx = Ctx(self.cfg, self.data, b, n, w, self._register)
        try:
            values = RUNNERS[w](ctx)
        except MountError as e:
            msg = f"mount failed: {e}"
            if isinstance(e, MountTimeout):   # a hanging mount: give up the backend
                for nn in self._all_layer_counts():
                    self.dead[(bname, nn)] = msg
            self.dead[(bname, n)] = msg
            self.status[bname] = "mount failed"
            self.fail(w, n, bname, r, msg)
        except StepError as e:
            self.fail(w, n, bname, r, str(e))
            if "timed out" in str(e):
                self.timeouts[bname] = self.timeouts.get(bname, 0) + 1
                if self.timeouts[bname] >= 2:     # a daemon that keeps hanging: give up
                    for nn in self._all_layer_counts():
                        self.dead[(bname, nn)] = "two steps timed out"
            if self.status[bname] == "ok":
                self.status[bname] = "some steps failed"
        except OSError as e:
            self.fail(w, n, bname, r, f"{type(e).__name__}: {e}")
            if self.status[bname] == "ok":
                self.status[bname] = "some steps failed"
        else:
            self.record(w, n, bname, r, values)

    def safety_net(self) -> None:
        """Whatever happened: nothing of ours stays mounted."""
        if self.live is not None and self.live.backend != "plain":
            unmount(self.live.path, self.live.pids, hung=True)
        for b in self.backends.values():
            if b.name != "plain":
                unmount(b.mnt, [], hung=False)
        cleanup_stale(self.root)


def write_results_md(path: Path, meta: dict, cfg: Config, md_table: str, summary_md: str,
                     targets_md: str, notes: dict, failures: list, status: dict,
                     chart_name: str | None, elapsed: float) -> None:
    v = meta["versions"]
    lines = [
        "# cowfs benchmark results", "",
        "Regenerated by `scripts/bench` (the full run); do not edit by hand.", "",
        f"- date: {meta['date']}, wall time of the run: {elapsed / 60:.1f} min",
        f"- machine: {meta['nproc']} CPUs ({meta['cpu']}), {meta['memory']} RAM, "
        f"kernel {meta['kernel']}, scratch fs {meta['scratch_fs']}",
        f"- kernel overlayfs: {v.get('kernel', '-')}",
        f"- fuse-overlayfs: {v.get('fuse-overlayfs', '-')}",
        f"- cowfs: {v.get('cowfs', '-')} (python {v.get('python')}, its own FUSE transport; "
        f"default options, i.e. passthrough on as root)",
        f"- command: `{meta['command']}` ({v.get('bench', '?')}; `scripts/bench` "
        f"is scripts/setup + this)",
        f"- runs: {cfg.repeat}; big files {human_size(cfg.big_small)} and "
        f"{human_size(cfg.big_large)}; layer counts {cfg.layers}, lookup "
        f"{cfg.lookup_layers}, copy-up {cfg.copyup_layers}, memory {cfg.memory_layers}, "
        f"daemon CPU {cfg.cpu_layers}, mount {cfg.mount_layers}, scenarios "
        f"{cfg.scenario_layers}; {cfg.cpu_requests:,} requests per CPU figure, "
        f"{cfg.mounts} mounts per latency figure",
        "- backends: " + ", ".join(f"{b}: {s}" for b, s in status.items()), "",
        "How to read it: absolute figures are medians over the runs, `±` is half the "
        "range over the runs relative to the median. Ratio columns are cost ratios "
        "(time over time, inverse throughput, memory over memory), computed within each "
        "run and then the median taken: **above 1 means the first backend is slower or "
        "bigger**, e.g. `cowfs/kernel 3.00x` = cowfs takes three times as long as kernel "
        "overlayfs. `↑` marks units where more is better. `L` is the number of lower "
        "layers. `plain` is one ordinary directory holding the union of the layers "
        "(for copy-up rows: the same write on a plain file, i.e. no copy-up at all). "
        "`FAIL` is a step that failed (see below), `-` a step that does not apply.", "",
        "## Issue #9 targets", "",
        "cowfs's figure for each target of issue #9, from this run (medians; the ratio "
        "figures are medians of per-run ratios, as in the tables below; `figure` is the "
        "target's own form: a cost ratio for `<=`, a speed ratio for `>=`).", "",
        targets_md, ""] + [f"- {k}: {w}" for k, w in notes.items()] + ["",
        "## Summary", "",
        "Geometric mean of each cost ratio over a workload's rows (all layer counts):", "",
        summary_md, "", "## All measurements", "", md_table, ""]
    if chart_name:
        lines += [f"![cost relative to kernel overlayfs]({chart_name})", ""]
    lines += ["## Methodology", "",
              "- Every measurement gets a fresh mount (fresh empty upper and work "
              "directories) over the same generated lower layers; before it, the lower "
              "layers are walked so every backend starts from the same warm lower "
              "caches. \"First pass\" therefore means a cold overlay (fresh mount), not a "
              "cold disk, except workload 2, which drops all caches.",
              "- The timed part runs in a child process (bench/worker.py); a step that "
              "hangs is killed after the timeout and its mount torn down.",
              "- Copy-up rows: the lower file's pages are in the page cache beforehand; "
              "append rows include fsync; `chmod + sync` adds a global sync; the `cp + sync` "
              "row copies the same file within the same mount (plain: the same disk).",
              "- Where cowfs spends its time (py-spy profiles, request counts): "
              "[PROFILE.md](PROFILE.md); `scripts/bench --profile` records new ones. "
              "Every raw value of this run: [results.json](results.json).",
              "- Memory: RSS (VmRSS) of the FUSE daemon process (found through its argv), "
              "settled; after the walk and again after `echo 2 > drop_caches` makes the "
              "kernel forget the inodes.",
              "- Daemon CPU (rows 0): utime + stime of the daemon process (all threads, "
              "/proc/PID/stat) before and after N requests of one kind made by the worker: "
              "lstat of N distinct missing names (one LOOKUP each), "
              "statx(AT_STATX_FORCE_SYNC) of warm files (one GETATTR or STATX each: the "
              "flag goes past the kernel's attribute cache), open + close of warm files "
              "(OPEN, RELEASE and FLUSH unless the daemon declines it; per pair). Clock ticks "
              "are 10 ms, so N is large.",
              "- Reads (rows 1-2) are of the big lower file; `Cached` is the growth of "
              "Cached in /proc/meminfo during the read after drop_caches (the whole "
              "machine's page cache: other work on it adds noise).",
              "- Mount latency (row 11): from starting the mount command until it has "
              "returned and a stat inside the mount answers; median of the mounts.",
              "- Scenarios (rows 12), each on a fresh mount over one lower layer: `git "
              "init`, `git add -A`, `git commit` of lower files; sqlite (python's sqlite3, "
              "synchronous=FULL, rollback journal) with the database in the lower layer; "
              "`ls -lR` and, in a chroot (own mount namespace with /dev and /proc), "
              "`apt-get install --no-download` of a package whose .debs are in the "
              "rootfs's apt cache. The rootfs is a debootstrapped minbase bookworm "
              "(made once, kept in /tmp/bench-helper/rootfs/).",
              "- Noise on this VM: its disk writes recently freed blocks several times "
              "faster than long-free ones, so each copy-up step first writes and deletes a "
              "primer file of the same size; file creation on the ext4 scratch disk swings "
              "several-fold between runs for every backend alike (plain included), so "
              "rows 8 and 9 have a wide spread: read their ratios, which are taken within "
              "one run, rather than the absolute times. Other engineers' work shares the "
              "two CPUs.", ""]
    if failures:
        lines += ["## Failures", ""]
        seen = set()
        for f in failures:
            key = (f["backend"], f["workload"], f["layers"], f["error"])
            if key in seen:
                continue
            seen.add(key)
            lines.append(f"- {f['backend']} / {f['workload']} / L={f['layers']} "
                         f"(run {f['repeat']}): {f['error']}")
        lines.append("")
    lines += kept_sections(path)
    path.write_text("\n".join(lines))


def kept_sections(path: Path) -> list[str]:
    """Sections other scripts keep in RESULTS.md: bench/pull.py's (a heading of its own,
    up to the next one) and bench/events_overhead.py's (between its markers)."""
    old = path.read_text() if path.exists() else ""
    out = []
    if PULL_SECTION in old:
        rest = old.split(PULL_SECTION, 1)[1]
        end = min(i for i in (rest.find("\n## "), rest.find(KEPT_BEGIN), len(rest)) if i >= 0)
        out += [(PULL_SECTION + rest[:end]).rstrip("\n"), ""]
    if KEPT_BEGIN in old:
        out += [KEPT_BEGIN + old.split(KEPT_BEGIN, 1)[1].split(KEPT_END, 1)[0] + KEPT_END, ""]
    return out


def main(argv: list[str] | None = None) -> int:
    ns = parse_args(argv)
    from rich.console import Console
    from rich.progress import (BarColumn, MofNCompleteColumn, Progress, SpinnerColumn,
                               TextColumn, TimeElapsedColumn)
    console = Console(stderr=True)
    out_console = Console()
    if not out_console.is_terminal:
        out_console = Console(width=180)
    if os.geteuid() != 0:
        console.print("bench: must run as root (mount, drop_caches)", style="red")
        return 2
    root = ns.root.resolve()
    if not str(root).startswith(str(DEFAULT_ROOT) + "/") and root != DEFAULT_ROOT:
        console.print(f"bench: --root must be under {DEFAULT_ROOT}", style="red")
        return 2
    runner = Runner(ns)
    cfg = runner.cfg
    full = (not ns.quick and ns.backends == BACKENDS and ns.workloads == WORKLOADS
            and not ns.layers and not ns.lookup_layers)
    if ns.profile:
        from pyspy import py_spy
        if py_spy() is None:
            console.print("bench: --profile needs py-spy (pip install py-spy)", style="red")
            return 2
        Ctx.profile_dir = ns.out / "profiles"
        shutil.rmtree(Ctx.profile_dir, ignore_errors=True)
    results_md = None if ns.no_results_md or ns.profile else (ns.results_md or
                                                (HERE / "RESULTS.md" if full else None))
    ns.out.mkdir(parents=True, exist_ok=True)
    root.mkdir(parents=True, exist_ok=True)
    stale = cleanup_stale(root)
    if stale:
        console.print(f"bench: unmounted leftovers of an earlier run: {stale}")

    def on_term(signum, frame):
        raise KeyboardInterrupt
    old = signal.signal(signal.SIGTERM, on_term)
    t0 = time.monotonic()
    interrupted = False
    meta = machine_info(runner.backends)
    meta["command"] = " ".join([".venv/bin/python bench/run.py"] +
                               (sys.argv[1:] if argv is None else argv))
    steps = runner.steps()
    columns = (SpinnerColumn(), TextColumn("{task.description}"), BarColumn(),
               MofNCompleteColumn(), TimeElapsedColumn())
    try:
        with Progress(*columns, console=console, transient=False) as progress:
            task = progress.add_task("preparing data", total=len(steps) * cfg.repeat)
            def note(s: str) -> None:
                progress.update(task, description=s)
                if not console.is_terminal:
                    print(f"bench: {s}", file=sys.stderr, flush=True)
            runner.data.prepare(runner.data_needs(), note)
            if ns.prepare_only:
                console.print(f"bench: data ready in {runner.data.root}")
                return 0
            runner.run(progress, task)
            progress.update(task, description="done")
    except KeyboardInterrupt:
        interrupted = True
        console.print("bench: interrupted; reporting what was measured", style="yellow")
    finally:
        runner.safety_net()
        signal.signal(signal.SIGTERM, old)
        if not ns.keep_data:
            runner.data.cleanup()
        subprocess.run(["rm", "-rf", str(root / "m")], check=False)
        if not ns.keep_data and root != DEFAULT_ROOT:
            shutil.rmtree(root, ignore_errors=True)
    elapsed = time.monotonic() - t0

    backends = list(runner.backends)
    rows = report.summarize(cfg, runner.raw, backends)
    title = (f"cowfs benchmark{' (quick)' if cfg.quick else ''}: {meta['date']}, "
             f"{meta['nproc']} CPUs, kernel {meta['kernel']}, {cfg.repeat} run(s)")
    out_console.print(report.rich_table(rows, backends, title))
    out_console.print(report.rich_summary(rows, backends))
    tg = report.targets(rows, cfg)
    notes = {}
    if "rootfs" in ns.workloads and runner.data.apt_unavailable:
        notes["apt-get install scenario"] = f"not measured: {runner.data.apt_unavailable}"
    out_console.print(report.rich_targets(tg))
    for b, s in runner.status.items():
        if s != "ok":
            console.print(f"backend {b}: {s}", style="yellow")
    for f in runner.failures[:20]:
        console.print(f"  FAIL {f['backend']} {f['workload']} L={f['layers']} "
                      f"run {f['repeat']}: {f['error']}", style="red", highlight=False)
    if len(runner.failures) > 20:
        console.print(f"  ... and {len(runner.failures) - 20} more (see results.json)")
    summary_md = report.summary_markdown(rows, backends)
    (ns.out / "table.txt").write_text(title + "\n\n" + report.text_table(rows, backends) +
                                      "\nSummary (geometric mean of the ratios per workload):"
                                      "\n\n" + summary_md + "\nIssue #9 targets:\n\n" +
                                      report.targets_text(tg) +
                                      "".join(f"{k}: {w}\n" for k, w in notes.items()))
    md = report.markdown_table(rows, backends)
    targets_md = report.targets_markdown(tg)
    (ns.out / "table.md").write_text(md + "\n" + targets_md)
    report.write_json(ns.out / "results.json", meta, cfg, rows, runner.failures, backends,
                      runner.status, notes)
    have_chart = False
    try:
        have_chart = report.chart(ns.out / "chart.png", rows, backends, title)
    except Exception as e:   # a chart problem must not lose the numbers
        console.print(f"bench: chart failed: {e}", style="red")
    if results_md is not None and not interrupted:
        chart_name = None
        if have_chart:
            chart_name = "results.png"
            shutil.copyfile(ns.out / "chart.png", results_md.parent / chart_name)
        # The raw figures behind it, kept with it (bench/out/ is not in git).
        shutil.copyfile(ns.out / "results.json", results_md.parent / "results.json")
        write_results_md(results_md, meta, cfg, md, summary_md, targets_md, notes,
                         runner.failures, runner.status, chart_name, elapsed)
        console.print(f"bench: wrote {results_md}")
    if ns.profile and Ctx.profile_dir.is_dir():
        from pyspy import summarize
        head = (f"# Where the cowfs daemon spends its time\n\n"
                f"py-spy samples of the daemon (250 Hz, --nonblocking --gil) during each "
                f"measured step of `scripts/bench --profile` on {meta['date']}, "
                f"{meta['versions'].get('cowfs', '?')}: only the thread holding the GIL is "
                f"sampled, so this is the daemon's Python time (syscalls are not in it). "
                f"Left: self time per function; right: inclusive time of cowfs's own "
                f"functions; then the hottest lines.\n\n")
        text = head + summarize(sorted(Ctx.profile_dir.glob("*.txt")))
        (Ctx.profile_dir / "summary.md").write_text(text)
        console.print(f"bench: profile summary in {Ctx.profile_dir / 'summary.md'}")
    console.print(f"bench: results in {ns.out} ({elapsed:.0f}s)")
    return 130 if interrupted else 0


if __name__ == "__main__":
    sys.exit(main())
