"""Turn a finished job's results into the table a user wants: per-site Dice of the global and the local models.

Reads ``cross_site_val/cross_val_results.json`` (FLARE's cross-site evaluation matrix: evaluating site -> model ->
metrics). In FedBN every model is scored at a site with that site's own batch norm, which is FedBN's evaluation
protocol; the site's own model is the diagonal of the matrix.

Writes nothing: it prints the table.

Example:
    fedseg3d report workspace/sim/unet3d_fedbn       # a simulator workspace or a downloaded POC job result
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

CROSS_SITE_FILE = Path("cross_site_val") / "cross_val_results.json"
KEY_METRIC = "val_mean_dice"
FINAL_GLOBAL = "SRV_FL_global_model.pt"
BEST_GLOBAL = "SRV_best_FL_global_model.pt"


def find_cross_site_results(result_dir: Path) -> Path:
    """The cross-site matrix inside a downloaded job result or a simulator workspace."""
    matches = sorted(Path(result_dir).rglob(str(CROSS_SITE_FILE)))
    if not matches:
        raise FileNotFoundError(f"{result_dir}: no {CROSS_SITE_FILE} found (did cross-site evaluation run?)")
    return matches[0]


def site_rows(matrix: dict[str, dict[str, dict[str, float]]]) -> list[dict[str, float | str]]:
    """One row per evaluating site: global (final and best) and own-model Dice, and the mean over other sites'."""
    rows = []
    for site in sorted(matrix):
        scores = matrix[site]
        others = [m[KEY_METRIC] for name, m in scores.items() if not name.startswith("SRV_") and name != site]
        rows.append(
            {
                "site": site,
                "global_final": scores.get(FINAL_GLOBAL, {}).get(KEY_METRIC, math.nan),
                "global_best": scores.get(BEST_GLOBAL, {}).get(KEY_METRIC, math.nan),
                "own_model": scores.get(site, {}).get(KEY_METRIC, math.nan),
                "other_sites_models": sum(others) / len(others) if others else math.nan,
            }
        )
    return rows


def format_table(rows: list[dict[str, float | str]]) -> str:
    """A fixed-width table with a mean row (NaN where a model was not evaluated)."""
    columns = ["global_final", "global_best", "own_model", "other_sites_models"]
    header = f"{'site':<10}" + "".join(f"{c:>20}" for c in columns)
    lines = [header, "-" * len(header)]
    for row in rows:
        lines.append(f"{row['site']:<10}" + "".join(f"{row[c]:>20.4f}" for c in columns))
    if rows:
        means = {c: _nanmean([float(r[c]) for r in rows]) for c in columns}
        lines.append("-" * len(header))
        lines.append(f"{'mean':<10}" + "".join(f"{means[c]:>20.4f}" for c in columns))
    return "\n".join(lines)


def _nanmean(values: list[float]) -> float:
    finite = [v for v in values if math.isfinite(v)]
    return sum(finite) / len(finite) if finite else math.nan


def report(result_dir: Path) -> str:
    path = find_cross_site_results(result_dir)
    matrix = json.loads(path.read_text())
    return f"Mean validation Dice per site (from {path}):\n" + format_table(site_rows(matrix))


def main(argv: list[str] | None = None, prog: str | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog=prog, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("result_dir", type=Path)
    print(report(parser.parse_args(argv).result_dir))


if __name__ == "__main__":
    main()
