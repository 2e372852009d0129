"""The one plot of the privacy and of the compression benchmark, drawn from the rows their JSON report holds.

Kept apart from the scripts that run the simulator so a committed report's plot can be redrawn from its JSON alone
(``python -m benchmarks.report_plots docs/privacy_benchmark.json``), without rerunning an hour of training.
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

MARKERS = {"site_update": "s", "patient": "o"}


def plot_privacy_rows(rows: list[dict[str, Any]], path: Path) -> None:
    """Dice against the epsilon each private row spent (log scale), marker by protected unit; the non-private rows
    as horizontal lines, since they spend no epsilon."""
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for row in rows:
        if row["epsilon"] is None:
            if math.isfinite(row["mean_dice"]):
                ax.axhline(row["mean_dice"], linestyle="--", linewidth=1, color="grey")
                ax.annotate(row["name"], (0.01, row["mean_dice"]), xycoords=("axes fraction", "data"), fontsize=7)
            continue
        marker = MARKERS.get(row["unit"], "x")
        ax.scatter([row["epsilon"]], [row["mean_dice"]], marker=marker, label=f"{row['name']} ({row['unit']})")
    ax.set_xscale("log")
    ax.set_xlabel("largest epsilon spent by a site (delta 1e-5)")
    ax.set_ylabel("mean Dice of the final global model")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_compression_variants(variants: dict[str, dict[str, Any]], path: Path) -> None:
    """Mean Dice (bars: one standard deviation over the runs) against how many times fewer bytes than float32 each
    variant sends up per round."""
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for name, v in variants.items():
        sd = v["dice_sd"] or 0.0
        ax.errorbar([v["up_x"]], [v["dice_mean"]], yerr=[sd], fmt="o", capsize=3)
        ax.annotate(f"{name} ({v['runs']})", (v["up_x"], v["dice_mean"]), textcoords="offset points",
                    xytext=(4, 4), fontsize=7)  # fmt: skip
    ax.set_xscale("log", base=2)
    ax.set_xlabel("times fewer bytes than float32, site to server (log 2)")
    ax.set_ylabel("mean Dice of the final global model (runs in brackets)")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Redraw a privacy or compression report's plot from its JSON.")
    parser.add_argument("report", type=Path, help="docs/privacy_benchmark.json or docs/compression_benchmark.json")
    args = parser.parse_args(argv)
    result = json.loads(args.report.read_text())
    out = args.report.with_suffix(".png")
    if "rows" in result:
        plot_privacy_rows(result["rows"], out)
    elif "variants" in result:
        plot_compression_variants(result["variants"], out)
    else:
        parser.error(f"{args.report}: neither 'rows' (privacy) nor 'variants' (compression) in it")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
