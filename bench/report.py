"""Statistics, the results table (terminal, text, Markdown), JSON and the PNG chart.

Absolute figures are medians over the repeats, with the spread (max-min over the
median).  Ratios are computed within each run (repeat) and then the median is taken,
so a machine that drifts between runs does not skew them.  Every ratio is a *cost*
ratio: time over time, or for throughput the inverse, or memory over memory; so a
ratio above 1 always means "cowfs is slower / bigger", below 1 "cowfs is better".
"""
from __future__ import annotations

import json
import statistics
from pathlib import Path

from config import (BACKENDS, METRIC_BY_KEY, METRICS, NOT_MEASURED, TARGETS, Config, Metric,
                    Target)

CLIP = (0.02, 500.0)   # chart x range for the ratio bars
RATIOS = [("cowfs", "kernel"), ("cowfs", "fuse-overlayfs"), ("fuse-overlayfs", "kernel")]
SHORT = {"plain": "plain", "kernel": "kernel", "fuse-overlayfs": "fuse-ovl", "cowfs": "cowfs"}


def _cost(m: Metric, v: float) -> float:
    return 1.0 / v if m.better == "higher" else v


def cost_ratios(m: Metric, va: list, vr: list) -> list[float]:
    """Per-run cost ratios a/ref, skipping runs where either failed."""
    return [_cost(m, x) / _cost(m, y) for x, y in zip(va, vr)
            if x is not None and y is not None and x > 0 and y > 0]


def summarize(cfg: Config, raw: dict, backends: list[str]) -> list[dict]:
    """raw[(metric, n)][backend] = [value or None per repeat] -> table rows."""
    rows = []
    for m in METRICS:
        for n in sorted({k[1] for k in raw if k[0] == m.key}):
            per = raw[(m.key, n)]
            row = {"metric": m.key, "title": m.title(cfg), "unit": m.unit, "better": m.better,
                   "layers": n, "values": {}, "median": {}, "spread": {}, "ratios": {}}
            for b in backends:
                vals = per.get(b, [])
                row["values"][b] = vals
                good = [v for v in vals if v is not None]
                if good:
                    med = statistics.median(good)
                    row["median"][b] = med
                    row["spread"][b] = (max(good) - min(good)) / med if med and len(good) > 1 \
                        else 0.0
            for a, ref in RATIOS:
                runs = cost_ratios(m, per.get(a, []), per.get(ref, []))
                if runs:
                    row["ratios"][f"{a}/{ref}"] = {"median": statistics.median(runs),
                                                   "per_run": runs}
            rows.append(row)
    return rows


SUMMARY_GROUPS = [   # (title, metric keys)
    ("0. daemon CPU per request", ["cpu_lookup_enoent", "cpu_getattr", "cpu_open"]),
    ("1-2. sequential read: first, again, cold", ["read_first", "read_hot", "read_cold"]),
    ("3. lstat of many files, first and warm", ["stat_first", "stat_warm"]),
    ("4. find, first and warm", ["find_first", "find_warm"]),
    ("5. big directory: list, list + lstat", ["ls_first", "ls_lstat_first"]),
    ("6. lookups as layers grow", ["lookup_bottom", "lookup_missing"]),
    ("7. copy-up by append + fsync", ["copyup_append_small", "copyup_append_large"]),
    ("7. chmod of a big lower file", ["copyup_chmod_large", "copyup_chmod_sync_large"]),
    ("7. cp + sync of a big file", ["cp_sync_large"]),
    ("8. small files, whiteouts", ["small_create", "small_unlink", "delete_lower"]),
    ("9. untar / du / tar job", ["job_untar", "job_du", "job_tar", "job_total"]),
    ("10. daemon RSS", ["rss_idle", "rss_walk", "rss_forget"]),
    ("11. mount latency", ["mount_latency"]),
    ("12. scenarios: git, sqlite, ls -lR, apt-get",
     ["git_commit", "sqlite_txns", "rootfs_ls_lR", "rootfs_apt"]),
]


# -- issue #9's targets ---------------------------------------------------------------
def _target_figure(t: Target, row: dict, cfg: Config) -> tuple[float | None, float, str]:
    """(figure, limit, how it reads) for one target on one row; figure None = not measured."""
    m = METRIC_BY_KEY[t.metric]
    limit = t.limit * (getattr(cfg, t.per) / (1 << 20) if t.per else 1.0)
    if t.form == "abs<=":
        return row["median"].get("cowfs"), limit, f"<= {fmt_value(limit, m.unit)} {m.unit}"
    runs = cost_ratios(m, row["values"].get("cowfs", []), row["values"].get(t.ref, []))
    if not runs:
        return None, limit, ""
    cost = statistics.median(runs)
    if t.form == "cost<=":
        return cost, limit, f"<= {t.limit:g}x"
    return 1.0 / cost, limit, f">= {t.limit:g}x"     # speed>= and faster>=


def targets(rows: list[dict], cfg: Config) -> list[dict]:
    """Each #9 target against this run's figures: one entry per (target, layer count)."""
    out = []
    for t in TARGETS:
        mrows = [r for r in rows if r["metric"] == t.metric]
        if t.layers == "max" and mrows:
            mrows = [max(mrows, key=lambda r: r["layers"])]
        if not mrows:
            out.append({"target": t.label, "metric": t.metric, "layers": None,
                        "figure": None, "goal": "", "met": None, "values": {},
                        "ratios": {}, "unit": METRIC_BY_KEY[t.metric].unit})
        for r in mrows:
            fig, limit, goal = _target_figure(t, r, cfg)
            met = None if fig is None else (fig <= limit if t.form.endswith("<=")
                                            else fig >= limit)
            out.append({"target": t.label, "metric": t.metric, "layers": r["layers"],
                        "figure": fig, "goal": goal, "met": met, "unit": r["unit"],
                        "form": t.form, "ref": t.ref, "values": dict(r["median"]),
                        "ratios": {k: v["median"] for k, v in r["ratios"].items()}})
    return out


TARGET_HEAD = ["#9 target", "L", "unit", "cowfs", "fuse-ovl", "kernel", "plain",
               "cowfs/fuse-ovl", "cowfs/kernel", "figure", "target", "met?"]


def target_rows(tg: list[dict]) -> list[list[str]]:
    out = []
    for e in tg:
        v, rat, unit = e["values"], e["ratios"], e["unit"]
        fig = e["figure"]
        if fig is None:
            figure = "-"
        elif e.get("form") == "abs<=":
            figure = fmt_value(fig, unit) + f" {unit}"
        else:
            figure = fmt_x(fig)
        met = "not measured" if e["met"] is None else "met" if e["met"] else "MISSED"
        out.append([e["target"], "-" if e["layers"] is None else str(e["layers"]), unit] +
                   [fmt_value(v.get(b), unit) for b in ("cowfs", "fuse-overlayfs", "kernel",
                                                        "plain")] +
                   [fmt_x(rat[k]) if k in rat else "-"
                    for k in ("cowfs/fuse-overlayfs", "cowfs/kernel")] +
                   [figure, e["goal"], met])
    for label in NOT_MEASURED:
        out.append([label, "-", "-"] + ["-"] * 6 + ["-", "", "not measured"])
    return out


def _not_measured_notes() -> list[str]:
    return [f"- {label}: {why}" for label, why in NOT_MEASURED.items()]


def targets_markdown(tg: list[dict]) -> str:
    body = target_rows(tg)
    lines = ["| " + " | ".join(TARGET_HEAD) + " |",
             "|---|--:|--:|" + "--:|" * 8 + "---|"]
    for r in body:
        r = r[:-1] + [f"**{r[-1]}**" if r[-1] in ("met", "MISSED") else r[-1]]
        lines.append("| " + " | ".join(c.replace("|", "\\|") for c in r) + " |")
    return "\n".join(lines + [""] + _not_measured_notes()) + "\n"


def targets_text(tg: list[dict]) -> str:
    return _text_grid(TARGET_HEAD, target_rows(tg)) + "\n".join(_not_measured_notes()) + "\n"


def rich_targets(tg: list[dict]):
    from rich.table import Table
    t = Table(title="Issue #9 targets (cowfs, same run; ratios are cost ratios)",
              header_style="bold")
    for i, h in enumerate(TARGET_HEAD):
        t.add_column(h, justify="left" if i == 0 or i == len(TARGET_HEAD) - 1 else "right")
    for r in target_rows(tg):
        met = r[-1]
        style = "green" if met == "met" else "red" if met == "MISSED" else "yellow"
        t.add_row(*r[:-1], f"[{style}]{met}[/{style}]")
    return t


def summary(rows: list[dict], backends: list[str]) -> list[list[str]]:
    """Per group: geometric mean of each ratio over its rows (all layer counts)."""
    _, ratio_cols = table_columns(backends)
    out = []
    for title, keys in SUMMARY_GROUPS:
        grows = [r for r in rows if r["metric"] in keys]
        if not grows:
            continue
        cells = [title, str(len(grows))]
        for a, ref in ratio_cols:
            vals = [r["ratios"][f"{a}/{ref}"]["median"] for r in grows
                    if f"{a}/{ref}" in r["ratios"] and r["ratios"][f"{a}/{ref}"]["median"] > 0]
            cells.append(fmt_x(statistics.geometric_mean(vals)) if vals else "-")
        out.append(cells)
    return out


def summary_markdown(rows: list[dict], backends: list[str]) -> str:
    _, ratio_cols = table_columns(backends)
    head = ["workload", "rows"] + [f"{SHORT[a]}/{SHORT[r]}" for a, r in ratio_cols]
    lines = ["| " + " | ".join(head) + " |", "|---|--:|" + "--:|" * len(ratio_cols)]
    for c in summary(rows, backends):
        lines.append("| " + " | ".join(c) + " |")
    return "\n".join(lines) + "\n"


def rich_summary(rows: list[dict], backends: list[str]):
    from rich.table import Table
    _, ratio_cols = table_columns(backends)
    t = Table(title="Summary: geometric mean of the cost ratios per workload "
                    "(>1 = first is slower)", header_style="bold")
    t.add_column("workload")
    t.add_column("rows", justify="right")
    for a, r in ratio_cols:
        t.add_column(f"{SHORT[a]}/{SHORT[r]}", justify="right", style="cyan")
    for c in summary(rows, backends):
        t.add_row(*c[:2], *[_color_ratio(x) for x in c[2:]])
    return t


def fmt_value(v: float | None, unit: str) -> str:
    if v is None:
        return "-"
    if unit in ("MiB/s", "MiB", "ms") and v >= 100:
        return f"{v:,.0f}"
    if v >= 100:
        return f"{v:,.0f}"
    if v >= 10:
        return f"{v:.1f}"
    if v >= 1:
        return f"{v:.2f}"
    return f"{v:.3f}"


def fmt_cell(row: dict, b: str) -> str:
    if b not in row["median"]:
        return "FAIL" if any(v is None for v in row["values"].get(b, [])) and \
            row["values"].get(b) else "-"
    s = fmt_value(row["median"][b], row["unit"])
    spread = row["spread"].get(b, 0.0)
    if len(row["values"][b]) > 1:
        s += f" ±{spread * 50:.0f}%"    # half the range, relative to the median
    return s


def fmt_ratio(row: dict, key: str) -> str:
    r = row["ratios"].get(key)
    if r is None:
        return "-"
    return fmt_x(r["median"])


def fmt_x(v: float) -> str:
    return f"{v:.2f}x" if v >= 0.095 else f"{v:.2g}x"


def table_columns(backends: list[str]) -> tuple[list[str], list[tuple[str, str]]]:
    ratio_cols = [(a, r) for a, r in RATIOS if a in backends and r in backends]
    head = ["workload", "L", "unit"] + [SHORT[b] for b in backends] + \
        [f"{SHORT[a]}/{SHORT[r]}" for a, r in ratio_cols]
    return head, ratio_cols


def table_rows(rows: list[dict], backends: list[str]) -> list[list[str]]:
    _, ratio_cols = table_columns(backends)
    out = []
    for row in rows:
        unit = row["unit"] + (" ↑" if row["better"] == "higher" else "")
        out.append([row["title"], str(row["layers"]), unit] +
                   [fmt_cell(row, b) for b in backends] +
                   [fmt_ratio(row, f"{a}/{r}") for a, r in ratio_cols])
    return out


def rich_table(rows: list[dict], backends: list[str], title: str):
    from rich.table import Table
    head, ratio_cols = table_columns(backends)
    t = Table(title=title, show_lines=False, header_style="bold")
    for i, h in enumerate(head):
        t.add_column(h, justify="left" if i == 0 else "right",
                     style="cyan" if i >= len(head) - len(ratio_cols) else None)
    for r in table_rows(rows, backends):
        t.add_row(*[_color_ratio(c) if i >= len(head) - len(ratio_cols) else c
                    for i, c in enumerate(r)])
    return t


def _color_ratio(cell: str) -> str:
    if not cell.endswith("x"):
        return cell
    v = float(cell[:-1])
    color = "green" if v <= 1.1 else "yellow" if v <= 2 else "red"
    return f"[{color}]{cell}[/{color}]"


def text_table(rows: list[dict], backends: list[str]) -> str:
    head, _ = table_columns(backends)
    return _text_grid(head, table_rows(rows, backends))


def _text_grid(head: list[str], body: list[list[str]]) -> str:
    widths = [max(len(str(x[i])) for x in [head] + body) for i in range(len(head))]
    lines = ["  ".join(h.ljust(w) if i == 0 else h.rjust(w) for i, (h, w) in
                       enumerate(zip(head, widths)))]
    lines.append("  ".join("-" * w for w in widths))
    for r in body:
        lines.append("  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in
                               enumerate(zip(r, widths))))
    return "\n".join(lines) + "\n"


def markdown_table(rows: list[dict], backends: list[str]) -> str:
    head, ratio_cols = table_columns(backends)
    body = table_rows(rows, backends)
    out = ["| " + " | ".join(head) + " |",
           "|" + "|".join(["---"] + ["--:"] * (len(head) - 1)) + "|"]
    for r in body:
        out.append("| " + " | ".join(c.replace("|", "\\|") for c in r) + " |")
    return "\n".join(out) + "\n"


def write_json(path: Path, meta: dict, cfg: Config, rows: list[dict], failures: list[dict],
               backends: list[str], backend_status: dict, notes: dict) -> None:
    doc = {"meta": meta, "config": cfg.as_dict(), "backends": backends,
           "backend_status": backend_status, "ratio_meaning":
           "cost ratio (time, 1/throughput, memory): >1 means the first is slower/bigger",
           "targets": targets(rows, cfg), "not_measured": {**NOT_MEASURED, **notes},
           "rows": rows, "failures": failures}
    path.write_text(json.dumps(doc, indent=1, default=str) + "\n")


def chart(path: Path, rows: list[dict], backends: list[str], title: str) -> bool:
    """Horizontal bars: each backend's cost relative to kernel overlayfs (log scale)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rel_rows = [r for r in rows if "kernel" in r["median"]]
    mem_rows = [r for r in rows if r["metric"].startswith("rss_") and r["median"]]
    others = [b for b in backends if b != "kernel"]
    if not rel_rows and not mem_rows:
        return False
    colors = {"plain": "#999999", "fuse-overlayfs": "#1f77b4", "cowfs": "#d62728",
              "kernel": "#2ca02c"}
    height = 1.6 + 0.24 * len(rel_rows) * max(1, len(others)) / 1.5 + \
        (0.3 * len(mem_rows) + 1.2 if mem_rows else 0)
    fig = plt.figure(figsize=(11, max(4.0, height)), layout="constrained")
    gs = fig.add_gridspec(2 if mem_rows else 1, 1,
                          height_ratios=[max(1, len(rel_rows)), max(1, len(mem_rows) / 1.5)]
                          if mem_rows else [1])
    ax = fig.add_subplot(gs[0])
    labels = [f"{r['title'][:58]} [L={r['layers']}]" for r in rel_rows]
    bw = 0.8 / max(1, len(others))
    for j, b in enumerate(others):
        xs, ys = [], []
        for i, r in enumerate(rel_rows):
            if b in r["median"] and r["median"]["kernel"] > 0 and r["median"][b] > 0:
                m = next(mm for mm in METRICS if mm.key == r["metric"])
                k = (r["ratios"].get(f"{b}/kernel") or {}).get("median")
                if k is None:
                    k = _cost(m, r["median"][b]) / _cost(m, r["median"]["kernel"])
                xs.append(min(max(k, CLIP[0]), CLIP[1]))
                ys.append(i + (j - (len(others) - 1) / 2) * bw)
        ax.barh(ys, xs, height=bw, color=colors.get(b, None), label=b)
    ax.axvline(1.0, color=colors["kernel"], lw=1.5, label="kernel overlayfs = 1")
    ax.set_xscale("log")
    ax.set_xlim(left=CLIP[0] * 0.8)
    ax.set_yticks(range(len(rel_rows)))
    ax.set_yticklabels(labels, fontsize=7)
    ax.set_ylim(len(rel_rows) - 0.5, -0.5)
    ax.set_xlabel("cost relative to kernel overlayfs = time or 1/throughput ratio "
                  "(log; <1 faster than the kernel)")
    ax.grid(axis="x", which="both", alpha=0.3)
    ax.legend(fontsize=8, loc="lower center", bbox_to_anchor=(0.5, 1.0), ncol=4,
              frameon=False)
    fig.suptitle(title, fontsize=10)
    if mem_rows:
        ax2 = fig.add_subplot(gs[1])
        fb = [b for b in backends if any(b in r["median"] for r in mem_rows)]
        bw2 = 0.8 / max(1, len(fb))
        for j, b in enumerate(fb):
            xs, ys = [], []
            for i, r in enumerate(mem_rows):
                if b in r["median"]:
                    xs.append(r["median"][b])
                    ys.append(i + (j - (len(fb) - 1) / 2) * bw2)
            ax2.barh(ys, xs, height=bw2, color=colors.get(b), label=b)
        ax2.set_yticks(range(len(mem_rows)))
        ax2.set_yticklabels([f"{r['title'][:58]} [L={r['layers']}]" for r in mem_rows],
                            fontsize=7)
        ax2.set_ylim(len(mem_rows) - 0.5, -0.5)
        ax2.set_xlabel("daemon RSS, MiB")
        ax2.grid(axis="x", alpha=0.3)
        ax2.legend(fontsize=8, loc="lower center", bbox_to_anchor=(0.5, 1.0), ncol=4,
                   frameon=False)
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return True
