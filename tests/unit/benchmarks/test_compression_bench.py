"""The compression benchmark's statistics: byte ratios per variant and the Dice difference with its interval."""

import pytest

from benchmarks.compression import VARIANTS, build_variant, dice_difference, summarise_variants


def _run(up: int, down: int, dice: float) -> dict:
    per_round = [{"round": r, "up_bytes": up, "down_bytes": down, "global_dice_before_round": dice} for r in (0, 1)]
    totals = {"up_bytes_total": 2 * up, "down_bytes_total": 2 * down}
    totals |= {"up_streamed_bytes_total": 2 * up, "down_streamed_bytes_total": 2 * down}
    return {"per_round": per_round, "final_global_dice": dice, **totals}


def test_welch_interval_covers_the_difference_and_needs_two_runs_each():
    d = dice_difference([0.70, 0.72, 0.71], [0.74, 0.75, 0.73])
    assert d["diff"] == pytest.approx(-0.03)
    assert d["low"] < -0.03 < d["high"] < 0  # three runs each, sd 0.01: clearly below the baseline
    wide = dice_difference([0.70, 0.76], [0.74, 0.71])
    assert wide["low"] < 0 < wide["high"]  # noisy runs: no conclusion either way
    assert dice_difference([0.7], [0.74, 0.75])["low"] is None


def test_summary_ratios_are_against_the_float32_mean():
    results = {
        "fp32#1": _run(1000, 1100, 0.74),
        "fp32#2": _run(1000, 1100, 0.76),
        "int3#1": _run(100, 110, 0.75),
        "int3#2": _run(120, 110, 0.73),
    }
    summary = summarise_variants(results)
    assert summary["fp32"]["up_x"] == 1.0 and summary["fp32"]["runs"] == 2
    int3 = summary["int3"]
    assert int3["up_x"] == pytest.approx(1000 / 110) and int3["down_x"] == pytest.approx(10.0)
    assert int3["down_x_after_round_0"] == pytest.approx(10.0)
    assert int3["dice_mean"] == pytest.approx(0.74) and int3["dice_vs_fp32"]["diff"] == pytest.approx(-0.01)


@pytest.mark.parametrize("name", sorted(VARIANTS))
def test_every_variant_builds_with_its_seed(name, tmp_path):
    job_dir = build_variant(name, tmp_path, rounds=2, local_steps=3, repeat=2)
    client = (job_dir / "app" / "config" / "config_fed_client.json").read_text()
    assert '"seed": 2' in client and '"local_steps": 3' in client


def test_the_recorded_command_leaves_the_note_out():
    from benchmarks.compression import _without_note

    assert _without_note(["--repeats", "2", "--note", "long text", "--resume", "--note=x"]) == [
        "--repeats",
        "2",
        "--resume",
    ]
