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
from fedseg3d.tools.build_jobs import build_jobs
from fedseg3d.tools.job_config import CLIENT_CONFIG, learner_args
from fedseg3d.training.site_trainer import TrainingConfig

REPO = Path(__file__).resolve().parent.parent
JOBS_DIR = REPO / "jobs"
REFERENCE_JOB = "unet3d_fedbn"
# method -> (job folder, extra knobs); local-only and pooled are trained directly with the package's training code.
# FedBN-int3 is the quantised job with 3-bit updates both ways, the variant the compression study kept.
FEDERATED_METHODS: dict[str, tuple[str, dict[str, Any]]] = {
    "fedavg": ("unet3d_fedavg", {}),
    "fedprox": ("unet3d_fedprox", {}),
    "fedbn": ("unet3d_fedbn", {}),
    "fedbn_int3": ("unet3d_fedbn_quantized", {"scheme": "int3"}),
}
CENTRALISED_METHODS = ("local_only", "pooled")
ALL_METHODS = (*CENTRALISED_METHODS, *FEDERATED_METHODS)
FEDERATED_JOBS = {method: job for method, (job, _) in FEDERATED_METHODS.items()}


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
        seed: this run's seed: the initial model of every method, training order and (synthetic) the data drawn.
        seeds: every seed the benchmark runs; each method runs once per seed, the same seeds for all.
        task: ``synthetic`` or ``real`` (``benchmarks.tasks``).
        local_steps: optimiser steps per round instead of epochs (0: epochs); real sites hold one case each.
        val_cases: synthetic validation cases per site (None: scaled with ``cases_scale``).
        methods: the methods to run (a subset of ``ALL_METHODS``).
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
    seeds: tuple[int, ...] = (0,)
    task: str = "synthetic"
    local_steps: int = 0
    val_cases: int | None = None
    methods: tuple[str, ...] = ALL_METHODS
    poc: bool = True
    cost_job: str = REFERENCE_JOB

    def __post_init__(self) -> None:
        if self.sites < 2:
            raise ValueError(f"sites must be >= 2 (federation needs two), got {self.sites}")
        if self.rounds < 1 or self.local_epochs < 1:
            raise ValueError(f"rounds and local_epochs must be >= 1, got {self.rounds} and {self.local_epochs}")
        if not self.seeds or len(set(self.seeds)) != len(self.seeds):
            raise ValueError(f"seeds must be distinct and at least one, got {list(self.seeds)}")
        unknown = sorted(set(self.methods) - set(ALL_METHODS))
        if unknown or not self.methods:
            raise ValueError(f"unknown method(s) {unknown}; choose from {list(ALL_METHODS)}")
        if self.val_cases is not None and self.val_cases < 1:
            raise ValueError(f"val_cases must be >= 1, got {self.val_cases}")

    @property
    def site_names(self) -> list[str]:
        return [f"site-{i + 1}" for i in range(self.sites)]

    @property
    def total_epochs(self) -> int:
        return self.rounds * self.local_epochs


MODES = {
    "quick": BenchConfig(mode="quick", sites=2, rounds=2, local_epochs=1, fov_mm=32.0, cases_scale=0.2, seeds=(0, 1)),
    "full": BenchConfig(mode="full", sites=4, rounds=10, local_epochs=3, fov_mm=64.0, cases_scale=1.0, seeds=(0, 1, 2)),
}
# The real task (``--data real``): 3 sites of one subject each (docs/real_data.md), local work in steps.
REAL_SETTINGS = {
    "quick": {"sites": 3, "rounds": 2, "local_steps": 5},
    "full": {"sites": 3, "rounds": 10, "local_steps": 20},
}


def make_config(mode: str, **overrides: Any) -> BenchConfig:
    """A mode's settings with ``overrides`` (None values ignored).

    Raises:
        ValueError: unknown mode or an invalid override.
    """
    if mode not in MODES:
        raise ValueError(f"unknown benchmark mode {mode!r}; choose one of {sorted(MODES)}")
    given = {k: v for k, v in overrides.items() if v is not None}
    base = MODES[mode]
    if given.get("task") == "real":
        base = replace(base, **REAL_SETTINGS[mode])
    if "seeds" in given and "seed" not in given:
        given["seed"] = given["seeds"][0]
    return replace(base, **given)


def job_learner_args(job: str = REFERENCE_JOB) -> dict[str, Any]:
    """The learner's ``class_names``, ``preprocessing`` and ``training`` blocks of a committed job, variables resolved.

    Raises:
        ValueError: the job has no ``SegmentationLearner`` component.
    """
    return learner_args(JOBS_DIR / job)


def job_overrides(cfg: BenchConfig, task_overrides: dict[str, Any]) -> dict[str, Any]:
    """The knobs every method's job is built with: the task's, then this run's rounds, local work and seed."""
    return {
        **task_overrides,
        "num_rounds": cfg.rounds,
        "local_epochs": cfg.local_epochs,
        "local_steps": cfg.local_steps,
        "seed": cfg.seed,
        "sites_per_round": cfg.sites,
        "min_sites_per_round": cfg.sites,
    }


def centralised_settings(
    cfg: BenchConfig, task_overrides: dict[str, Any], build_dir: Path
) -> tuple[dict[int, str], PreprocessConfig, TrainingConfig]:
    """The reference job's classes, preprocessing and training knobs as the job's own learner parses them, built
    with the task's knobs and this run's local work and seed (one source for every method)."""
    from fedseg3d.learners.segmentation_learner import SegmentationLearner  # the only parser of a job's knobs

    (job_dir,) = build_jobs(JOBS_DIR, build_dir, [REFERENCE_JOB], job_overrides(cfg, task_overrides), None, False)
    learner = SegmentationLearner(**learner_args(job_dir))
    # A lone model keeps all of its state anyway.
    training = replace(learner.training, keep_batchnorm_local=True)
    return learner.class_names, learner.preprocessing, training
