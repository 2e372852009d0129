"""Benchmark settings: the two modes, and the training knobs read from the committed job (one source of truth).

Every method gets the same training budget: ``rounds * local_epochs`` passes over each site's training data.
Local-only does them at each site alone, pooled does them over all sites' data at once, the federated methods do
``local_epochs`` per round for ``rounds`` rounds.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from fedseg3d.data.transforms import PreprocessConfig
from fedseg3d.tools.job_config import CLIENT_CONFIG, learner_args
from fedseg3d.training.site_trainer import TrainingConfig

REPO = Path(__file__).resolve().parent.parent
JOBS_DIR = REPO / "jobs"
REFERENCE_JOB = "unet3d_fedbn"
# method -> job folder; local-only and pooled are trained directly with the package's training code.
FEDERATED_JOBS = {"fedavg": "unet3d_fedavg", "fedprox": "unet3d_fedprox", "fedbn": "unet3d_fedbn"}


def _site_knobs(job: str) -> set[str]:
    """The top-level variables of a job's client config (its knobs; see docs/job_knobs.md)."""
    config = json.loads((JOBS_DIR / job / CLIENT_CONFIG).read_text())
    return {k for k, v in config.items() if not isinstance(v, list | dict)}


def is_dp_job(job: str) -> bool:
    """A job whose sites release differentially private updates (its results carry epsilon per site): one with a
    ``noise_multiplier`` knob, read from its config rather than guessed from its name."""
    return "noise_multiplier" in _site_knobs(job)


def is_quantised_job(job: str) -> bool:
    """A job that compresses its messages (its byte figures differ from float32): one with a ``scheme`` knob."""
    return "scheme" in _site_knobs(job)


@dataclass(frozen=True)
class BenchConfig:
    """One benchmark run.

    Attributes:
        mode: ``quick`` (CI smoke test) or ``full`` (the committed report).
        sites: number of synthetic sites.
        rounds: federated rounds; local-only and pooled evaluate after each block of ``local_epochs`` epochs.
        local_epochs: epochs over a site's training data per round.
        fov_mm, cases_scale: synthetic data size (see ``fedseg3d.data.synthetic``).
        seed: data, weights-independent randomness and the initial model of every method.
        poc: also run the cost measurement in POC (needs port 8002; taken under ``/tmp/fedseg3d-ports.lock``).
        cost_job: the job run in POC for the cost figures.
    """

    mode: str
    sites: int
    rounds: int
    local_epochs: int
    fov_mm: float
    cases_scale: float
    seed: int = 0
    poc: bool = True
    cost_job: str = REFERENCE_JOB

    def __post_init__(self) -> None:
        if self.sites < 2:
            raise ValueError(f"sites must be >= 2 (federation needs two), got {self.sites}")
        if self.rounds < 1 or self.local_epochs < 1:
            raise ValueError(f"rounds and local_epochs must be >= 1, got {self.rounds} and {self.local_epochs}")

    @property
    def site_names(self) -> list[str]:
        return [f"site-{i + 1}" for i in range(self.sites)]

    @property
    def total_epochs(self) -> int:
        return self.rounds * self.local_epochs


MODES = {
    "quick": BenchConfig(mode="quick", sites=2, rounds=2, local_epochs=1, fov_mm=32.0, cases_scale=0.2),
    "full": BenchConfig(mode="full", sites=4, rounds=10, local_epochs=3, fov_mm=64.0, cases_scale=1.0),
}


def make_config(mode: str, **overrides: Any) -> BenchConfig:
    """A mode's settings with ``overrides`` (None values ignored).

    Raises:
        ValueError: unknown mode or an invalid override.
    """
    if mode not in MODES:
        raise ValueError(f"unknown benchmark mode {mode!r}; choose one of {sorted(MODES)}")
    return replace(MODES[mode], **{k: v for k, v in overrides.items() if v is not None})


def job_learner_args(job: str = REFERENCE_JOB) -> dict[str, Any]:
    """The learner's ``class_names``, ``preprocessing`` and ``training`` blocks of a committed job, variables resolved.

    Raises:
        ValueError: the job has no ``SegmentationLearner`` component.
    """
    return learner_args(JOBS_DIR / job)


def centralised_settings(cfg: BenchConfig) -> tuple[dict[int, str], PreprocessConfig, TrainingConfig]:
    """The reference job's classes, preprocessing and training knobs, with this run's epochs and seed."""
    args = job_learner_args(REFERENCE_JOB)
    training = dict(args["training"], local_epochs=cfg.local_epochs, local_steps=0, seed=cfg.seed)
    training["keep_batchnorm_local"] = True  # a lone model keeps all of its state anyway
    class_names = {int(k): v for k, v in args["class_names"].items()}
    return class_names, PreprocessConfig.from_dict(args["preprocessing"]), TrainingConfig(**training)
