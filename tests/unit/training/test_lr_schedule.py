"""The per-round learning-rate schedule (``TrainingConfig.lr_schedule``) and the rate a site really trains at."""

import math
from pathlib import Path

import pytest
import torch

from fedseg3d.data.datalist import load_datalist
from fedseg3d.data.transforms import PreprocessConfig
from fedseg3d.training.site_trainer import SiteTrainer, TrainingConfig

CLASSES = {0: "background", 1: "organ", 2: "lesion"}


def test_constant_schedule_ignores_the_rounds():
    config = TrainingConfig(learning_rate=0.01)
    assert [config.learning_rate_for(r, None) for r in range(3)] == [0.01] * 3


def test_cosine_schedule_starts_at_the_rate_and_decays_towards_zero():
    config = TrainingConfig(learning_rate=0.02, lr_schedule="cosine")
    rates = [config.learning_rate_for(r, 10) for r in range(10)]
    assert rates[0] == pytest.approx(0.02)
    assert rates[5] == pytest.approx(0.01)  # half way: half the rate
    assert rates[9] == pytest.approx(0.02 * (1 + math.cos(0.9 * math.pi)) / 2)
    assert all(a > b for a, b in zip(rates, rates[1:], strict=False))


def test_unknown_schedule_and_missing_round_count_are_refused():
    with pytest.raises(ValueError, match=r"lr_schedule must be one of \['constant', 'cosine'\], got 'step'"):
        TrainingConfig(lr_schedule="step")
    config = TrainingConfig(lr_schedule="cosine")
    for bad in (None, "?", 0, True):
        with pytest.raises(ValueError, match="needs the job's number of rounds"):
            config.learning_rate_for(0, bad)


def test_site_trains_at_the_scheduled_rate(tiny_sites: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    datalist = load_datalist(tiny_sites / "site-1" / "datalist.json", tiny_sites / "site-1", CLASSES)
    prep = PreprocessConfig(roi_size=(16, 16, 16), intensity_mode="mr_percentile")
    training = TrainingConfig(local_steps=1, learning_rate=0.01, lr_schedule="cosine")
    trainer = SiteTrainer("site-1", datalist, CLASSES, prep, training, tmp_path)
    seen = []
    real_adam = torch.optim.Adam

    def recording_adam(params, lr, **kwargs):
        seen.append(lr)
        return real_adam(params, lr=lr, **kwargs)

    monkeypatch.setattr(torch.optim, "Adam", recording_adam)
    result = trainer.train_round(trainer.shared_weights(), 2, total_rounds=4)
    assert seen == [pytest.approx(0.005)]  # round 2 of 4: (1 + cos(pi / 2)) / 2 of the rate
    assert result.metrics["learning_rate"] == pytest.approx(0.005)
    with pytest.raises(ValueError, match="needs the job's number of rounds"):
        trainer.train_round(trainer.shared_weights(), 0)
