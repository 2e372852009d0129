"""A site's DP-SGD plan, without FLARE: what each round trains with and releases, calibrated once for a target."""

from __future__ import annotations

import pytest

from fedseg3d.privacy.accounting import epsilon_for
from fedseg3d.training.dpsgd import DPSGDConfig
from fedseg3d.training.dpsgd_plan import DPSGDPlan

DELTA = 1e-5


def test_a_fixed_noise_plan_releases_the_jobs_noise_every_round():
    plan = DPSGDPlan(DPSGDConfig(noise_multiplier=1.3, patients_per_step=4, passes_per_round=2), n_patients=40)
    first, later = plan.planned(0, 5, DELTA), plan.planned(4, 5, DELTA)
    assert first == later and tuple(first) == (1.3, 0.1, 20)
    assert plan.config.noise_multiplier == 1.3 and plan.calibration is None
    assert plan.details() == {"max_grad_norm": 1.0, "patients_per_step": 4, "patches_per_patient": 1, "patients": 40}


def test_a_target_is_calibrated_once_for_the_rounds_left_and_the_job_ends_within_it():
    plan = DPSGDPlan(DPSGDConfig(patients_per_step=4, target_epsilon=6.0), n_patients=40)
    with pytest.raises(RuntimeError, match="plan a round"):
        plan.config  # noqa: B018 - nothing to train with before the calibration
    rounds = [plan.planned(r, 4, DELTA) for r in range(1, 4)]  # joined at round 2 of 4: three rounds left
    assert len(set(rounds)) == 1 and plan.calibration.rounds == 3
    assert plan.config.noise_multiplier == rounds[0].noise_multiplier == plan.calibration.noise_multiplier
    assert 6.0 - 0.05 < epsilon_for(rounds, DELTA) <= 6.0
    assert plan.details()["target_epsilon"] == 6.0


def test_the_calibration_uses_the_ledgers_delta_and_accountant():
    config = DPSGDConfig(patients_per_step=4, target_epsilon=6.0)
    strict, loose = DPSGDPlan(config, 40), DPSGDPlan(config, 40)
    strict.planned(0, 2, 1e-7)
    loose.planned(0, 2, 1e-3, "prv")
    assert strict.config.noise_multiplier > loose.config.noise_multiplier
    assert (loose.calibration.delta, loose.calibration.accountant) == (1e-3, "prv")


@pytest.mark.parametrize("total_rounds", [None, "?", 2, True])
def test_a_calibration_without_the_rounds_left_is_refused(total_rounds):
    plan = DPSGDPlan(DPSGDConfig(patients_per_step=4, target_epsilon=6.0), n_patients=40)
    with pytest.raises(ValueError, match="dp_sgd.target_epsilon needs the job's number of rounds"):
        plan.planned(2, total_rounds, DELTA)
    assert plan.calibration is None


def test_more_patients_per_step_than_the_site_has_is_refused_naming_the_field():
    with pytest.raises(ValueError, match=r"dp_sgd.patients_per_step \(8\) exceeds this site's 5"):
        DPSGDPlan(DPSGDConfig(patients_per_step=8), n_patients=5).planned(0, 1, DELTA)
