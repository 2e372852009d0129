"""What one site's DP-SGD rounds train with and release, decided before each round trains.

Why apart from the training loop: the budget check before a round needs the round's release (noise multiplier,
sample rate, steps) before any work, and the loop must then run exactly that. With ``target_epsilon`` the noise
multiplier is the site's own, calibrated once from its patient count and the delta and accountant its ledger uses,
for the rounds the job has left. This class holds that decision; the trainer trains with ``config`` and the FLARE
learner only passes round numbers in and charges what comes out. Plain Python, no nvflare.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

from fedseg3d.privacy.accounting import Mechanism
from fedseg3d.training.dpsgd import DPSGDConfig

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Calibration:
    """The noise a site picked for ``target_epsilon``: over ``rounds`` rounds of ``steps`` steps in all."""

    target_epsilon: float
    noise_multiplier: float
    rounds: int
    steps: int
    sample_rate: float
    delta: float
    accountant: str


class DPSGDPlan:
    """The DP-SGD configuration a site's rounds train with, and what each releases.

    Args:
        config: the job's ``dp_sgd`` block.
        n_patients: the site's training patients (the Poisson rate is ``patients_per_step`` over this).
        site_name: for the calibration log line.
    """

    def __init__(self, config: DPSGDConfig, n_patients: int, site_name: str = "") -> None:
        self.job_config = config
        self.n_patients = n_patients
        self.site_name = site_name
        self.calibration: Calibration | None = None
        self._config = config if not config.target_epsilon else None

    @property
    def config(self) -> DPSGDConfig:
        """The configuration rounds train with.

        Raises:
            RuntimeError: ``target_epsilon`` is set and no round has been planned yet (nothing calibrated).
        """
        if self._config is None:
            raise RuntimeError(
                f"dp_sgd.target_epsilon is {self.job_config.target_epsilon}: plan a round (DPSGDPlan.planned) to "
                f"calibrate the noise multiplier before training"
            )
        return self._config

    def planned(self, current_round: int, total_rounds: int | None, delta: float, accountant: str = "rdp") -> Mechanism:
        """What round ``current_round`` (0-based) of ``total_rounds`` will release; calibrates first if needed.

        ``delta`` and ``accountant`` are those the site ledger uses; they matter only to the calibration.

        Raises:
            ValueError: ``patients_per_step`` exceeds the site's patients, no noise reaches ``target_epsilon``, or
                a calibration without the job's number of rounds (each names the ``dp_sgd`` field).
        """
        if self._config is None:
            self._calibrate(current_round, total_rounds, delta, accountant)
        config = self.config
        return config.mechanism(self.n_patients, config.steps_for(self.n_patients))

    def details(self) -> dict[str, Any]:
        """What the ledger keeps about a release besides its mechanism: the settings that produced it."""
        config = self.job_config
        details: dict[str, Any] = {
            "max_grad_norm": config.max_grad_norm,
            "patients_per_step": config.patients_per_step,
            "patches_per_patient": config.patches_per_patient,
            "patients": self.n_patients,
        }
        if self.calibration is not None:
            details["target_epsilon"] = self.calibration.target_epsilon
        return details

    def _calibrate(self, current_round: int, total_rounds: int | None, delta: float, accountant: str) -> None:
        """Pick the noise for ``target_epsilon`` over the rounds the job has left, once.

        The number of rounds comes from the server: a server that announces fewer rounds than it runs gets a site
        that spends more than the target, which the site budget still bounds.
        """
        if isinstance(total_rounds, bool) or not isinstance(total_rounds, int) or total_rounds <= current_round:
            raise ValueError(
                f"dp_sgd.target_epsilon needs the job's number of rounds from the server's task (got {total_rounds!r} "
                f"at round {current_round + 1})"
            )
        rounds = total_rounds - current_round
        calibrated = self.job_config.calibrated(self.n_patients, rounds, delta, accountant)
        steps = rounds * calibrated.steps_for(self.n_patients)
        self.calibration = Calibration(
            target_epsilon=self.job_config.target_epsilon,
            noise_multiplier=calibrated.noise_multiplier,
            rounds=rounds,
            steps=steps,
            sample_rate=calibrated.patients_per_step / self.n_patients,
            delta=delta,
            accountant=accountant,
        )
        self._config = calibrated
        logger.info(
            "DP-SGD noise calibrated at %s: noise_multiplier=%.4g for target epsilon %g over %d round(s) (%d steps at "
            "sample rate %.4g, %d patients), delta=%g, %s accountant",
            self.site_name,
            calibrated.noise_multiplier,
            self.job_config.target_epsilon,
            rounds,
            steps,
            self.calibration.sample_rate,
            self.n_patients,
            delta,
            accountant,
        )
