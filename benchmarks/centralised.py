"""The two non-federated baselines, trained directly with the package's training code (no FLARE needed).

- local-only: each site trains alone on its own data; its final model is then scored on every site's validation
  cases (the whole model travels, batch norm included: that is what a hospital would share after training alone).
- pooled: one model trained on all sites' training data in one place, the centralised reference.

Both build each site's trainer from the site's own ``site.json`` (label map, intensity handling), as the federated
learner does, and the task's knobs from the same built job. Both use ``SiteTrainer.train_round`` -- the very round
the federated learner runs -- once per "round" of
``local_epochs`` epochs, so per-round curves, optimiser resets and the training budget match the federated runs.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch

from benchmarks.config import BenchConfig, centralised_settings
from fedseg3d.data.datalist import Datalist, load_datalist
from fedseg3d.data.dataset import PreparedCases
from fedseg3d.data.site_config import SiteConfig
from fedseg3d.training.loops import EvalResult, evaluate
from fedseg3d.training.site_trainer import SiteTrainer

logger = logging.getLogger(__name__)
LOCAL_ONLY, POOLED = "local_only", "pooled"


@dataclass
class CentralisedResult:
    """Dice of one trained model family.

    Attributes:
        per_round: round (1-based) -> site -> Dice after that round (local-only: each site's own model on its own
            validation cases; pooled: the pooled model on each site's validation cases).
        matrix: evaluating site -> model owner (a site, or ``pooled``) -> final Dice.
        class_matrix: the same, with each foreground class's Dice in place of the mean.
        train_stats: model owner -> total pure training seconds, patches, cases and voxels over all rounds.
        wall_seconds: training and scoring this family, data preparation included.
    """

    per_round: dict[int, dict[str, float]] = field(default_factory=dict)
    matrix: dict[str, dict[str, float]] = field(default_factory=dict)
    class_matrix: dict[str, dict[str, dict[str, float]]] = field(default_factory=dict)
    train_stats: dict[str, dict[str, float]] = field(default_factory=dict)
    wall_seconds: float = 0.0


def _train(trainer: SiteTrainer, rounds: int, on_round) -> dict[str, float]:
    totals = {"train_seconds": 0.0, "train_patches": 0.0, "train_cases": 0.0, "train_voxels": 0.0}
    for r in range(rounds):
        result = trainer.train_round(trainer.shared_weights(), r)
        for key in totals:
            totals[key] += result.metrics[key]
        on_round(r + 1, result)
    return totals


def _score(model: torch.nn.Module, on: SiteTrainer) -> EvalResult:
    """Dice of ``model`` (as it is, its own batch norm) on site ``on``'s validation cases."""
    return evaluate(model, on.val_cases.items, on.device, on.preprocessing.roi_size, on.class_names, amp=on.amp)


def _site_trainer(sites_root: Path, site: str, settings: tuple, output_dir: Path) -> SiteTrainer:
    """The trainer the site's own ``site.json`` describes, as the federated learner builds it: its label map and
    intensity handling (site facts) applied to the job's task."""
    class_names, preprocessing, training = settings
    config = SiteConfig.from_file(sites_root / site / "site.json", site_name=site)
    return SiteTrainer.from_site_config(config, class_names, preprocessing, training, output_dir, None, None)


def run_centralised(
    cfg: BenchConfig,
    sites_root: Path,
    work_dir: Path,
    task_overrides: dict[str, Any],
    log=print,
    methods: tuple[str, ...] = (LOCAL_ONLY, POOLED),
) -> dict[str, CentralisedResult]:
    """Train local-only models and the pooled model (those of them in ``methods``).

    Runs with one torch thread, as every POC and simulator site does (``num_threads: 1``): throughput figures are
    then comparable, and torch's thread pool does not spin against other work on a shared CPU.
    """
    threads = torch.get_num_threads()
    try:
        return _run_centralised(cfg, sites_root, work_dir, task_overrides, log, methods)
    finally:
        torch.set_num_threads(threads)


def _run_centralised(cfg, sites_root, work_dir, task_overrides, log, methods) -> dict[str, CentralisedResult]:
    settings = centralised_settings(cfg, task_overrides, work_dir / "job")
    started = time.perf_counter()
    trainers = {s: _site_trainer(sites_root, s, settings, work_dir / LOCAL_ONLY / s) for s in cfg.site_names}
    torch.set_num_threads(1)
    prepared_seconds = time.perf_counter() - started
    out = {}
    if LOCAL_ONLY in methods:
        out[LOCAL_ONLY] = _local_only(cfg, trainers, log)
        out[LOCAL_ONLY].wall_seconds += prepared_seconds
    if POOLED in methods:
        out[POOLED] = _pooled(cfg, trainers, settings, sites_root, work_dir / POOLED, log)
        out[POOLED].wall_seconds += prepared_seconds
    return out


def _local_only(cfg: BenchConfig, trainers: dict[str, SiteTrainer], log) -> CentralisedResult:
    local = CentralisedResult()
    started = time.perf_counter()
    for site, trainer in trainers.items():
        began = time.perf_counter()

        def on_round(r, result, site=site):
            local.per_round.setdefault(r, {})[site] = result.local_eval.mean_dice

        local.train_stats[site] = _train(trainer, cfg.rounds, on_round)
        log(f"local-only {site}: {cfg.rounds} rounds in {time.perf_counter() - began:.0f} s")
    for evaluating, on in trainers.items():
        scores = {owner: _score(t.model, on) for owner, t in trainers.items()}
        local.matrix[evaluating] = {owner: r.mean_dice for owner, r in scores.items()}
        local.class_matrix[evaluating] = {owner: dict(r.class_dice) for owner, r in scores.items()}
    local.wall_seconds = time.perf_counter() - started
    return local


def _pooled(cfg: BenchConfig, trainers: dict[str, SiteTrainer], settings: tuple, sites_root: Path, out_dir: Path, log):
    """One model on every site's training cases, each prepared with its own site's facts (label map, intensity).

    The same passes over each site's data as every other method: with ``local_steps`` the pooled model takes that
    many steps per site per round, since each of its batches mixes all sites.
    """
    class_names, preprocessing, training = settings
    if training.local_steps > 0:
        training = replace(training, local_steps=training.local_steps * len(trainers))
    started = time.perf_counter()
    first_site = sites_root / next(iter(trainers))
    pooled_trainer = _pooled_trainer(first_site, class_names, preprocessing, training, out_dir)
    # Every site's cases as its own trainer prepared them: one pooled CasePreparer could not apply each site's
    # intensity handling and label map.
    pooled_trainer.train_cases = PreparedCases(items=[i for t in trainers.values() for i in t.train_cases.items])
    pooled_trainer.val_cases = PreparedCases(items=[i for t in trainers.values() for i in t.val_cases.items])
    pooled = CentralisedResult()

    def on_pooled_round(r, _result):
        pooled.per_round[r] = {s: _score(pooled_trainer.model, on).mean_dice for s, on in trainers.items()}

    pooled.train_stats[POOLED] = _train(pooled_trainer, cfg.rounds, on_pooled_round)
    final = {s: _score(pooled_trainer.model, on) for s, on in trainers.items()}
    pooled.matrix = {s: {POOLED: r.mean_dice} for s, r in final.items()}
    pooled.class_matrix = {s: {POOLED: dict(r.class_dice)} for s, r in final.items()}
    pooled.wall_seconds = time.perf_counter() - started
    log(f"pooled: {cfg.rounds} rounds over all sites' data in {pooled.wall_seconds:.0f} s")
    return pooled


def _pooled_trainer(site_dir: Path, class_names, preprocessing, training, out_dir: Path) -> SiteTrainer:
    """A trainer with the job's model and knobs, built on one case of the first site (its data is replaced)."""
    config = SiteConfig.from_file(site_dir / "site.json", site_name=site_dir.name)
    datalist = load_datalist(config.datalist, config.data_root, label_names=class_names)
    one_case = Datalist(datalist.path, datalist.labels, datalist.training[:1], datalist.validation[:1])
    relabel = config.label_map.for_classes(class_names) if config.label_map else None
    site_preprocessing = config.preprocessing_for(preprocessing)
    return SiteTrainer(POOLED, one_case, class_names, site_preprocessing, training, out_dir, "cpu", relabel=relabel)
