import json
import math

from fedseg3d.tools.report import format_table, report, site_rows

MATRIX = {
    "site-1": {
        "SRV_FL_global_model.pt": {"val_mean_dice": 0.8},
        "SRV_best_FL_global_model.pt": {"val_mean_dice": 0.7},
        "site-1": {"val_mean_dice": 0.9},
        "site-2": {"val_mean_dice": 0.5},
    },
    "site-2": {"SRV_FL_global_model.pt": {"val_mean_dice": 0.6}, "site-2": {"val_mean_dice": 0.65}},
}


def test_rows_take_the_diagonal_as_the_own_model():
    rows = {r["site"]: r for r in site_rows(MATRIX)}
    assert rows["site-1"]["own_model"] == 0.9
    assert rows["site-1"]["other_sites_models"] == 0.5
    assert math.isnan(rows["site-2"]["global_best"])


def test_table_has_a_mean_row_that_skips_missing_values(tmp_path):
    table = format_table(site_rows(MATRIX))
    assert table.splitlines()[-1].split() == ["mean", "0.7000", "0.7000", "0.7750", "0.5000"]
    (tmp_path / "job" / "cross_site_val").mkdir(parents=True)
    (tmp_path / "job" / "cross_site_val" / "cross_val_results.json").write_text(json.dumps(MATRIX))
    assert "site-2" in report(tmp_path)
