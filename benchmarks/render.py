"""Render ``results.json`` as fixed-width tables (stdout), PNG plots and ``report.md``.

Plots use matplotlib's headless Agg backend. A plot whose data does not exist in a run (bytes when no federated
method ran) is not drawn; the report says so instead.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from benchmarks.summary import LOCAL_ONLY, POOLED, mean_curve  # noqa: E402

LABELS = {
    LOCAL_ONLY: "local-only",
    POOLED: "pooled",
    "fedavg": "FedAvg",
    "fedprox": "FedProx",
    "fedbn": "FedBN",
    "fedbn_int3": "FedBN-int3",
}


def label(method: str) -> str:
    return LABELS.get(method, method)


def _fmt(value: Any, spec: str = ".4f") -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    if isinstance(value, bool | int):
        return str(value)
    return format(value, spec) if isinstance(value, float) else str(value)


def table(headers: list[str], rows: list[list[Any]], spec: str = ".4f") -> str:
    """A markdown table that also reads well as fixed-width text on stdout."""
    cells = [[_fmt(c, spec) for c in row] for row in rows]
    widths = [max(len(h), *(len(r[i]) for r in cells)) if cells else len(h) for i, h in enumerate(headers)]
    line = lambda items: "| " + " | ".join(s.ljust(w) for s, w in zip(items, widths, strict=True)) + " |"  # noqa: E731
    return "\n".join([line(headers), "|" + "|".join("-" * (w + 2) for w in widths) + "|", *map(line, cells)])


def dice_tables(results: dict) -> tuple[str, str]:
    """(global model per site per method, own model per site per method), each with a mean row."""
    sites, summaries = results["config"]["site_names"], results["summary"]
    methods = [m for m in results["methods"] if m in summaries]
    glob_methods = [m for m in methods if summaries[m].get("global")]
    rows = [[s, *(summaries[m]["global"][s] for m in glob_methods)] for s in sites]
    rows.append(["mean", *(summaries[m]["global_mean"] for m in glob_methods)])
    glob = table(["site", *map(label, glob_methods)], rows)
    own_methods = [m for m in methods if summaries[m].get("own")]
    rows = [[s, *(summaries[m]["own"][s] for m in own_methods)] for s in sites]
    rows.append(["mean", *(summaries[m]["own_mean"] for m in own_methods)])
    if LOCAL_ONLY in summaries:
        lo = summaries[LOCAL_ONLY]
        rows.append(["local-only models on all sites", lo["all_sites_mean"], *([None] * (len(own_methods) - 1))])
    own = table(["site", *map(label, own_methods)], rows)
    return glob, own


def local_only_matrix(results: dict) -> str:
    sites = results["config"]["site_names"]
    matrix = results["methods"][LOCAL_ONLY]["matrix"]
    rows = [[e, *(matrix[e][o] for o in sites)] for e in sites]
    return table(["evaluated at \\ model of", *sites], rows)


def plot_curves(results: dict, path: Path) -> None:
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for method, raw in results["methods"].items():
        curve = mean_curve(raw["per_round"])
        if curve:
            name = label(method) + (" (own models)" if method == LOCAL_ONLY else "")
            ax.plot(list(curve), list(curve.values()), marker="o", label=name)
    ax.set_xlabel("round (local_epochs epochs per site each)")
    ax.set_ylabel("mean validation Dice over sites")
    ax.set_title("Dice per round (federated: global model at the start of each round)")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_per_site(results: dict, path: Path) -> None:
    sites, summaries = results["config"]["site_names"], results["summary"]
    bars = [(m, "global") for m in summaries if summaries[m].get("global")] + [(LOCAL_ONLY, "own")]
    bars = [(m, k) for m, k in bars if m in summaries]
    width = 0.8 / max(len(bars), 1)
    fig, ax = plt.subplots(figsize=(8, 4.5))
    for i, (method, kind) in enumerate(bars):
        values = [summaries[method][kind][s] for s in sites]
        ax.bar([x + i * width for x in range(len(sites))], values, width, label=f"{label(method)} ({kind})")
    ax.set_xticks([x + 0.4 - width / 2 for x in range(len(sites))], sites)
    ax.set_ylabel("validation Dice (final model)")
    ax.set_ylim(0, 1)
    ax.legend(fontsize=8)
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_dice_vs_bytes(results: dict, path: Path) -> bool:
    fig, ax = plt.subplots(figsize=(7, 4.5))
    drawn = False
    for method, raw in results["methods"].items():
        per_dir = raw.get("bytes_per_round") or {}
        up, down = per_dir.get("site_to_server", {}), per_dir.get("server_to_site", {})
        if not up or not down:
            continue
        curve = mean_curve(raw["per_round"])
        cumulative, xs, ys = 0, [0.0], [curve.get(0, math.nan)]
        for r in sorted(int(k) for k in up):
            cumulative += int(up.get(str(r), up.get(r, 0))) + int(down.get(str(r), down.get(r, 0)))
            xs.append(cumulative / 1e6)
            ys.append(curve.get(r + 1, math.nan))
        ax.plot(xs, ys, marker="o", label=label(method))
        drawn = True
    for method, style in ((POOLED, "--"), (LOCAL_ONLY, ":")):
        if method in results["summary"]:
            s = results["summary"][method]
            value = s["global_mean"] if method == POOLED else s["all_sites_mean"]
            ax.axhline(value, linestyle=style, color="grey", label=f"{label(method)} (no model traffic)")
    ax.set_xlabel("cumulative serialised bytes, both directions, all sites (MB)")
    ax.set_ylabel("mean Dice of the global model")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    if drawn:
        fig.savefig(path, dpi=110)
    plt.close(fig)
    return drawn


def plot_dice_intervals(results: dict, path: Path) -> None:
    """Each method's mean Dice per site and over sites, with its 95% interval over seeds as an error bar."""
    stats, sites = results["stats"], results["config"]["site_names"]
    groups = [*sites, "mean"]
    methods = stats["methods"]
    width = 0.8 / max(len(methods), 1)
    fig, ax = plt.subplots(figsize=(9, 4.8))
    for i, method in enumerate(methods):
        raws = [stats["per_site"][method].get(s) for s in sites] + [stats["mean"][method]]
        means = [r["mean"] if r else math.nan for r in raws]
        errors = [[r["mean"] - r["low"] if r and r["n"] > 1 else 0.0 for r in raws],
                  [r["high"] - r["mean"] if r and r["n"] > 1 else 0.0 for r in raws]]  # fmt: skip
        xs = [x + i * width for x in range(len(groups))]
        ax.bar(xs, means, width, label=label(method), yerr=errors, capsize=2)
    ax.set_xticks([x + 0.4 - width / 2 for x in range(len(groups))], groups)
    ax.set_ylabel("validation Dice (final model)")
    ax.set_title(f"mean and 95% interval over seeds {', '.join(stats['seeds'])}")
    ax.set_ylim(0, 1)
    ax.legend(fontsize=8, ncol=3)
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_plots(results: dict, out_dir: Path) -> dict[str, str | None]:
    """Draw every plot that has data; returns plot name -> file name (None: not drawn, no data)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    plot_dice_intervals(results, out_dir / "dice_intervals.png")
    plot_curves(results, out_dir / "dice_per_round.png")
    plot_per_site(results, out_dir / "dice_per_site.png")
    return {
        "dice_intervals": "dice_intervals.png",
        "dice_per_round": "dice_per_round.png",
        "dice_per_site": "dice_per_site.png",
        "dice_vs_bytes": "dice_vs_bytes.png" if plot_dice_vs_bytes(results, out_dir / "dice_vs_bytes.png") else None,
    }
