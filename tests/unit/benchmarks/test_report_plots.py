"""The privacy and compression reports' plots are drawn from their JSON alone, so a committed report can be redrawn
without rerunning the simulator."""

import json
import math

import pytest

from benchmarks.report_plots import main, plot_compression_variants, plot_privacy_rows

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def test_privacy_plot_takes_private_and_non_private_rows(tmp_path):
    rows = [
        {"name": "fedbn", "epsilon": None, "unit": None, "mean_dice": 0.71},
        {"name": "public_only", "epsilon": None, "unit": None, "mean_dice": math.nan},
        {"name": "fedbn_dp", "epsilon": 8.08, "unit": "site_update", "mean_dice": 0.03},
        {"name": "dpsgd", "epsilon": 7.15, "unit": "patient", "mean_dice": 0.19},
    ]
    out = tmp_path / "privacy_benchmark.png"
    plot_privacy_rows(rows, out)
    assert out.read_bytes().startswith(PNG_MAGIC)


def test_redraw_from_json_picks_the_plot_by_the_reports_kind(tmp_path, capsys):
    variants = {
        "fp32": {"up_x": 1.0, "dice_mean": 0.70, "dice_sd": 0.04, "runs": 8},
        "int3": {"up_x": 8.98, "dice_mean": 0.69, "dice_sd": None, "runs": 1},
    }
    report = tmp_path / "compression_benchmark.json"
    report.write_text(json.dumps({"meta": {}, "variants": variants, "results": {}}))
    main([str(report)])
    assert report.with_suffix(".png").read_bytes().startswith(PNG_MAGIC)
    plot_compression_variants(variants, tmp_path / "again.png")
    assert (tmp_path / "again.png").read_bytes().startswith(PNG_MAGIC)
    other = tmp_path / "other.json"
    other.write_text("{}")
    with pytest.raises(SystemExit):
        main([str(other)])
    assert "neither 'rows'" in capsys.readouterr().err
