"""The two non-federated baselines, trained directly with the package's training code (no FLARE needed).

- local-only: each site trains alone on its own data; its final model is then scored on every site's validation
  cases (the whole model travels, batch norm included: that is what a hospital would share after training alone).
- pooled: one model trained on all sites' training data in one place, the centralised reference.

Both use ``SiteTrainer.train_round`` -- the very round the federated learner runs -- once per "round" of
``local_epochs`` epochs, so per-round curves, optimiser resets and the training budget match the federated runs.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from benchmarks.config import BenchConfig, centralised_settings
from fedseg3d.data.datalist import Datalist, load_datalist
from fedseg3d.training.loops import evaluate
from fedseg3d.training.site_trainer import SiteTrainer

logger = logging.getLogger(__name__)
POOLED = "pooled"


@dataclass
class CentralisedResult:
    """Dice of one trained model family.

    Attributes:
        per_round: round (1-based) -> site -> Dice after that round (local-only: each site's own model on its own
            validation cases; pooled: the pooled model on each site's validation cases).
        matrix: evaluating site -> model owner (a site, or ``pooled``) -> final Dice.
        train_stats: model owner -> total pure training seconds, patches, cases and voxels over all rounds.
    """

    per_round: dict[int, dict[str, float]] = field(default_factory=dict)
    matrix: dict[str, dict[str, float]] = field(default_factory=dict)
    train_stats: dict[str, dict[str, float]] = field(default_factory=dict)


def _site_datalist(sites_root: Path, site: str, class_names: dict[int, str]) -> Datalist:
    return load_datalist(sites_root / site / "datalist.json", sites_root / site, label_names=class_names)


def _train(trainer: SiteTrainer, rounds: int, on_round) -> dict[str, float]:
    totals = {"train_seconds": 0.0, "train_patches": 0.0, "train_cases": 0.0, "train_voxels": 0.0}
    for r in range(rounds):
        result = trainer.train_round(trainer.shared_weights(), r)
        for key in totals:
            totals[key] += result.metrics[key]
        on_round(r + 1, result)
    return totals


def _score(model: torch.nn.Module, on: SiteTrainer) -> float:
    """Dice of ``model`` (as it is, its own batch norm) on site ``on``'s validation cases."""
    result = evaluate(model, on.val_cases.items, on.device, on.preprocessing.roi_size, on.class_names, amp=on.amp)
    return result.mean_dice


def run_centralised(cfg: BenchConfig, sites_root: Path, work_dir: Path, log=print) -> dict[str, CentralisedResult]:
    """Train local-only models and the pooled model; return ``{"local_only": ..., "pooled": ...}``.

    Runs with one torch thread, as every POC and simulator site does (``num_threads: 1``): throughput figures are
    then comparable, and torch's thread pool does not spin against other work on a shared CPU.
    """
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return _run_centralised(cfg, sites_root, work_dir, log)
    finally:
        torch.set_num_threads(threads)


def _run_centralised(cfg: BenchConfig, sites_root: Path, work_dir: Path, log) -> dict[str, CentralisedResult]:
    class_names, preprocessing, training = centralised_settings(cfg)
    datalists = {s: _site_datalist(sites_root, s, class_names) for s in cfg.site_names}
    trainers = {
        site: SiteTrainer(site, dl, class_names, preprocessing, training, work_dir / "local_only" / site, "cpu")
        for site, dl in datalists.items()
    }

    local = CentralisedResult()
    for site, trainer in trainers.items():
        started = time.perf_counter()

        def on_round(r, result, site=site):
            local.per_round.setdefault(r, {})[site] = result.local_eval.mean_dice

        local.train_stats[site] = _train(trainer, cfg.rounds, on_round)
        log(f"local-only {site}: {cfg.total_epochs} epochs in {time.perf_counter() - started:.0f} s")
    for evaluating, on in trainers.items():
        local.matrix[evaluating] = {owner: _score(t.model, on) for owner, t in trainers.items()}

    pooled_list = Datalist(
        path=sites_root,
        labels=class_names,
        training=tuple(c for dl in datalists.values() for c in dl.training),
        validation=tuple(c for dl in datalists.values() for c in dl.validation),
    )
    pooled_trainer = SiteTrainer(POOLED, pooled_list, class_names, preprocessing, training, work_dir / POOLED, "cpu")
    pooled = CentralisedResult()
    started = time.perf_counter()

    def on_pooled_round(r, _result):
        pooled.per_round[r] = {s: _score(pooled_trainer.model, on) for s, on in trainers.items()}

    pooled.train_stats[POOLED] = _train(pooled_trainer, cfg.rounds, on_pooled_round)
    log(f"pooled: {cfg.total_epochs} epochs over all sites' data in {time.perf_counter() - started:.0f} s")
    pooled.matrix = {s: {POOLED: pooled.per_round[cfg.rounds][s]} for s in trainers}
    return {"local_only": local, "pooled": pooled}
