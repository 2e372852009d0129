"""Everything one site does in a federated round, in plain PyTorch/MONAI.

The FLARE learner (``fedseg3d.learners``) only translates tasks into calls on this class, so the whole round trip
(receive global weights, keep local batch norm, train, validate, compute the update) can be unit-tested and reused
under another FL framework.
"""

from __future__ import annotations

import copy
import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from monai.utils import set_determinism

from fedseg3d.data.datalist import Datalist, load_datalist
from fedseg3d.data.dataset import CasePreparer, PreparedCases, make_train_loader, prepare_cases
from fedseg3d.data.site_config import SiteConfig
from fedseg3d.data.task import json_list, per_class_values
from fedseg3d.data.transforms import PreprocessConfig
from fedseg3d.models.local_state import load_local_state, load_shared_state, shared_state_numpy, split_local_state
from fedseg3d.models.presets import build_model, count_parameters
from fedseg3d.privacy.accounting import Mechanism
from fedseg3d.privacy.spend import DEFAULT_DELTA
from fedseg3d.training.device import resolve_device, use_mixed_precision
from fedseg3d.training.dpsgd import DPSGDConfig, check_model_supports_dpsgd, train_dpsgd
from fedseg3d.training.dpsgd_plan import DPSGDPlan
from fedseg3d.training.loops import EvalResult, TrainStats, evaluate, make_loss, train_local
from fedseg3d.training.norm_calibration import batchnorm_layers, patch_batches, recalibrate_batchnorm
from fedseg3d.training.site_models import BEST_GLOBAL, BEST_LOCAL, SiteModelStore, model_recipe

logger = logging.getLogger(__name__)

LR_SCHEDULES = ("constant", "cosine")
LOG_EVERY_STEPS = 10


@dataclass(frozen=True)
class TrainingConfig:
    """The job's training knobs (the same at every site).

    Attributes:
        model_preset: name of the network in ``fedseg3d.models.presets.PRESETS``.
        keep_batchnorm_local: FedBN: batch-norm layers stay at the site and are never sent or overwritten.
        local_epochs: passes over the site's training patches per round (used when ``local_steps`` is 0).
        local_steps: exact optimizer steps per round; makes sites of different sizes do equal work.
        batch_size: patches per optimizer step.
        learning_rate: Adam learning rate (of the first round, with ``lr_schedule`` "cosine").
        lr_schedule: "constant" (default): every round trains at ``learning_rate``. "cosine": round r of R trains
            at ``learning_rate * (1 + cos(pi * r / R)) / 2``, from the full rate in the first round towards 0 in
            the last. Why per round: the optimizer is rebuilt each round from the global model, and the server
            tells each site the round and the number of rounds. Under DP-SGD the schedule uses no private data,
            so it costs no privacy; a smaller late step shrinks the noise the last rounds leave in the model.
        weight_decay: Adam weight decay.
        amp: use mixed precision when training on a GPU (ignored on CPU).
        seed: seeds weights-independent randomness (patch sampling, augmentation, shuffling).
        fedprox_mu: FedProx (Li et al., MLSys 2020) proximal weight: ``mu/2 * ||w - w_global||^2`` is added to
            the local loss; 0 disables it. The term itself is given to ``SiteTrainer`` (the FLARE learner passes
            FLARE's ``PTFedProxLoss``), which keeps this package free of nvflare.
        class_loss_weights: one weight per class (background first) for the Dice and cross-entropy terms of the
            loss (``fedseg3d.training.loss``), a list or its JSON text; empty or all 1 is the unweighted loss. A
            class the network learns late (a lesion) can be weighted up. Same for DP-SGD, whose loss stays per patch.
        recalibrate_norm: FedBN: before a model is validated or saved, recompute its batch-norm running statistics
            on the site's own training patches with the weights being evaluated
            (``fedseg3d.training.norm_calibration``). Off, the running averages of earlier weights (or, for a
            global model, of the site's local weights) are used and evaluation can collapse to Dice near 0.
            Ignored without batch norm or without ``keep_batchnorm_local`` (FedAvg's statistics are averaged).
    """

    model_preset: str = "unet3d_tiny"
    keep_batchnorm_local: bool = True
    local_epochs: int = 1
    local_steps: int = 0
    batch_size: int = 2
    learning_rate: float = 1e-3
    weight_decay: float = 1e-5
    amp: bool = True
    seed: int = 0
    fedprox_mu: float = 0.0
    lr_schedule: str = "constant"
    class_loss_weights: tuple[float, ...] = ()
    recalibrate_norm: bool = True

    def __post_init__(self) -> None:
        weights = tuple(json_list(self.class_loss_weights or [], "training.class_loss_weights"))
        if not all(isinstance(w, int | float) and not isinstance(w, bool) and w >= 0 for w in weights) or (
            weights and sum(weights) <= 0
        ):
            raise ValueError(f"class_loss_weights must be numbers >= 0, not all 0, got {list(weights)}")
        object.__setattr__(self, "class_loss_weights", tuple(float(w) for w in weights))
        for name in ("keep_batchnorm_local", "recalibrate_norm"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name} must be true or false, got {getattr(self, name)!r}")
        if self.local_epochs < 1 and self.local_steps < 1:
            raise ValueError("local_epochs or local_steps must be at least 1")
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {self.batch_size}")
        if not self.learning_rate > 0:
            raise ValueError(f"learning_rate must be > 0, got {self.learning_rate}")
        if not (isinstance(self.fedprox_mu, int | float) and self.fedprox_mu >= 0):
            raise ValueError(f"fedprox_mu must be a number >= 0, got {self.fedprox_mu!r}")
        if self.lr_schedule not in LR_SCHEDULES:
            raise ValueError(f"lr_schedule must be one of {list(LR_SCHEDULES)}, got {self.lr_schedule!r}")

    def learning_rate_for(self, current_round: int, total_rounds: int | None) -> float:
        """The learning rate of round ``current_round`` (0-based) of ``total_rounds``.

        Raises:
            ValueError: the schedule needs the number of rounds and ``total_rounds`` is not a positive integer.
        """
        if self.lr_schedule == "constant":
            return self.learning_rate
        if isinstance(total_rounds, bool) or not isinstance(total_rounds, int) or total_rounds < 1:
            raise ValueError(f"lr_schedule '{self.lr_schedule}' needs the job's number of rounds, got {total_rounds!r}")
        fraction = min(max(current_round, 0), total_rounds) / total_rounds
        return self.learning_rate * (1 + math.cos(math.pi * fraction)) / 2


@dataclass
class RoundResult:
    """What a site produces in one round: its update (shared keys only) and what it measured."""

    update: dict[str, np.ndarray]
    num_cases: int
    train: TrainStats
    local_eval: EvalResult
    metrics: dict[str, float] = field(default_factory=dict)
    privacy: Mechanism | None = None  # DP-SGD only: what this round released, for the site's privacy ledger

    def summary(self) -> str:
        """One line for the site log."""
        return (
            f"loss {self.train.mean_loss:.4f}, {self.train.steps} steps in {self.train.seconds:.1f} s at learning rate "
            f"{self.metrics.get('learning_rate', math.nan):.3g}, local val Dice {self.local_eval.mean_dice:.4f} "
            f"{self.local_eval.class_dice}"
        )


class SiteTrainer:
    """One site's model, data and local state across the rounds of a job.

    Args:
        site_name: for logs and checkpoints.
        datalist: the site's parsed datalist.
        class_names: class index -> name, background at 0; its length is the number of output channels.
        preprocessing: the job's preprocessing block.
        training: the job's training knobs.
        output_dir: where this site keeps its own models (``fedseg3d.training.site_models``).
        device: ``auto``, ``cpu`` or ``cuda[:N]``.
        skip_bad_cases: skip cases that fail the data checks (with a warning) instead of failing.
        dp_sgd: train with patient-level DP-SGD (``fedseg3d.training.dpsgd``) instead of the plain loop.
        proximal_loss: FedProx's term, a module called as ``proximal_loss(model, global_model)`` (FLARE's
            ``PTFedProxLoss`` has this signature); required when ``training.fedprox_mu > 0``.
        relabel: maps the site's own label IDs to the job's class indices (``LabelMap.for_classes``), a site fact.
        job_id: the FLARE job id, recorded with the site's models so a deployed model names the job it came from.

    Raises:
        ValueError: ``fedprox_mu > 0`` without a ``proximal_loss``, or together with ``dp_sgd``.
        JobConfigError: ``class_crop_ratios`` or ``class_loss_weights`` neither empty nor one value per class.
    """

    def __init__(
        self,
        site_name: str,
        datalist: Datalist,
        class_names: dict[int, str],
        preprocessing: PreprocessConfig,
        training: TrainingConfig,
        output_dir: Path,
        device: str = "auto",
        skip_bad_cases: bool = False,
        dp_sgd: DPSGDConfig | None = None,
        proximal_loss: torch.nn.Module | None = None,
        relabel: Callable[[Path, torch.Tensor], torch.Tensor] | None = None,
        job_id: str = "",
    ) -> None:
        if training.fedprox_mu > 0 and proximal_loss is None:
            raise ValueError(f"training.fedprox_mu is {training.fedprox_mu} but no proximal_loss was given")
        if training.fedprox_mu > 0 and dp_sgd is not None:
            # Opacus clips per-sample gradients of the data loss only; a proximal term would bypass its accounting.
            raise ValueError("training.fedprox_mu > 0 cannot be combined with dp_sgd")
        self.proximal_loss = proximal_loss if training.fedprox_mu > 0 else None
        self.site_name = site_name
        self.class_names = dict(sorted(class_names.items()))
        # The job's per-class lists must fit its classes (the learner checks this at job start too).
        preprocessing = preprocessing.for_classes(self.class_names)
        per_class_values(training.class_loss_weights, self.class_names, "training.class_loss_weights")
        # The same for every round: built once.
        self.loss_fn = make_loss(training.class_loss_weights)
        self.preprocessing = preprocessing
        self.training = training
        self.output_dir = Path(output_dir)
        self.device = resolve_device(device)
        self.amp = use_mixed_precision(self.device, training.amp)
        set_determinism(seed=training.seed)
        self.model = build_model(training.model_preset, out_channels=len(self.class_names)).to(self.device)
        self.split = split_local_state(self.model, keep_batchnorm_local=training.keep_batchnorm_local)
        if dp_sgd is not None:
            check_model_supports_dpsgd(self.model, training.model_preset)
        preparer = CasePreparer(preprocessing, num_classes=len(self.class_names), relabel=relabel)
        self.train_cases: PreparedCases = prepare_cases(datalist.training, preparer, skip_bad_cases, "training")
        self.val_cases: PreparedCases = prepare_cases(datalist.validation, preparer, skip_bad_cases, "validation")
        self.dp_plan = DPSGDPlan(dp_sgd, self.num_train_cases, site_name) if dp_sgd is not None else None
        if training.keep_batchnorm_local and not batchnorm_layers(self.model):
            logger.warning(
                "%s: keep_batchnorm_local is set but %s has no batch norm: nothing stays local (FedBN acts as FedAvg)",
                site_name,
                training.model_preset,
            )
        recipe = model_recipe(training.model_preset, self.class_names, preprocessing, job_id, site_name)
        self.models = SiteModelStore(site_name, self.output_dir, recipe)
        self.rounds_done = 0
        self.local_state_adopted = not self.split.local
        # FedBN's statistics are the site's own: recompute them for whatever weights are evaluated (see the module).
        self.recalibrate = bool(
            training.recalibrate_norm and training.keep_batchnorm_local and batchnorm_layers(self.model)
        )
        self._calibration: list[torch.Tensor] | None = None
        logger.info(
            "%s: %s (%d parameters) on %s, %d training / %d validation cases (%d skipped), %d shared and %d local keys",
            site_name,
            training.model_preset,
            count_parameters(self.model),
            self.device,
            len(self.train_cases.items),
            len(self.val_cases.items),
            len(self.train_cases.skipped) + len(self.val_cases.skipped),
            len(self.split.shared),
            len(self.split.local),
        )

    @classmethod
    def from_site_config(
        cls,
        site: SiteConfig,
        class_names: dict[int, str],
        preprocessing: PreprocessConfig,
        training: TrainingConfig,
        default_output_dir: Path,
        dp_sgd: DPSGDConfig | None = None,
        proximal_loss: torch.nn.Module | None = None,
        job_id: str = "",
    ) -> SiteTrainer:
        """The trainer a site's own settings describe: its datalist, device, CPU threads and output folder
        (``default_output_dir`` when the site names none).

        Raises:
            DataError, ValueError: as ``load_datalist`` and the constructor.
        """
        if site.num_threads > 0:
            torch.set_num_threads(site.num_threads)
        datalist = load_datalist(site.datalist, site.data_root, label_names=class_names)
        logger.info("%s: datalist %s, data root %s", site.site_name, site.datalist, site.data_root)
        return cls(
            site_name=site.site_name,
            datalist=datalist,
            class_names=class_names,
            # Site facts: the site's intensity handling replaces the job's; its label IDs map to the job's classes.
            preprocessing=site.preprocessing_for(preprocessing),
            training=training,
            output_dir=site.output_dir or default_output_dir,
            device=site.device,
            skip_bad_cases=site.skip_bad_cases,
            dp_sgd=dp_sgd,
            proximal_loss=proximal_loss,
            relabel=site.label_map.for_classes(class_names) if site.label_map else None,
            job_id=job_id,
        )

    @property
    def num_train_cases(self) -> int:
        return len(self.train_cases.items)

    def evaluate_weights(self, weights: dict[str, np.ndarray], should_stop=lambda: False) -> EvalResult:
        """Dice of a received model on this site's validation cases, with this site's local state (FedBN: its own
        batch norm, its statistics recalibrated for the received weights). The site's training model is left
        untouched."""
        return self._evaluate(self._paired(weights), should_stop)

    def evaluate_global(self, weights: dict[str, np.ndarray], current_round: int, should_stop=lambda: False):
        """Like ``evaluate_weights`` for the global model of round ``current_round``, which the site also keeps
        (with its batch norm) as ``best_global_model.pt`` when it is the best global model for this site so far."""
        candidate = self._paired(weights)
        result = self._evaluate(candidate, should_stop)
        if not should_stop():
            self.models.offer_global(candidate, result.mean_dice, current_round)
        return result

    def _paired(self, weights: dict[str, np.ndarray]) -> torch.nn.Module:
        """A copy of the site's model with the received shared weights, ready to evaluate."""
        self._adopt_first_local_state(weights)
        candidate = copy.deepcopy(self.model)
        load_shared_state(candidate, self.split, weights)
        self._calibrate(candidate)
        return candidate

    def _calibrate(self, model: torch.nn.Module) -> None:
        """Recompute ``model``'s batch-norm statistics on this site's training patches (FedBN with
        ``recalibrate_norm``); the same patches every time, so a model scores the same whenever it is evaluated."""
        if not self.recalibrate:
            return
        if self._calibration is None:
            self._calibration = patch_batches(self.train_cases.items, self.preprocessing, seed=self.training.seed)
        recalibrate_batchnorm(model, self._calibration, self.device)

    def _adopt_first_local_state(self, weights: dict[str, np.ndarray]) -> None:
        """Start the site's local state (FedBN's batch norm) from the first server model that carries it, once.

        The server's model holds the batch-norm state of the network the job started from. From a fresh network that
        is the same as the site's own initialisation (weight 1, bias 0, mean 0, variance 1), so this changes nothing;
        from a pretrained checkpoint it keeps the batch norm the pretrained convolutions were trained with instead of
        resetting it. Afterwards the local state is the site's own and the server's copy is ignored, as FedBN wants.
        Nothing here is ever sent: local state still never leaves the site.
        """
        if self.local_state_adopted:
            return
        found = load_local_state(self.model, self.split, weights)
        if not found:
            return  # e.g. another site's model in cross-site evaluation: it carries no local state
        self.local_state_adopted = True
        logger.info("%s: local state (%d keys) starts from the server's initial model", self.site_name, len(found))

    def train_round(
        self,
        global_weights: dict[str, np.ndarray],
        current_round: int,
        should_stop=lambda: False,
        progress=None,
        total_rounds: int | None = None,
    ) -> RoundResult:
        """Load the global model (keeping local state), train locally, validate, and return the weight difference.

        ``total_rounds`` (the job's number of rounds) is needed only by an ``lr_schedule`` other than "constant".
        ``progress(step, loss)`` is called after each step; by default every tenth step is logged.

        Raises:
            FloatingPointError: training diverged or the update is not finite; nothing must be sent then.
            ValueError: the learning-rate schedule needs ``total_rounds`` and did not get it.
        """
        learning_rate = self.training.learning_rate_for(current_round, total_rounds)
        progress = progress or self._log_progress(current_round, total_rounds)
        self._adopt_first_local_state(global_weights)
        ignored = load_shared_state(self.model, self.split, global_weights)
        if ignored:
            logger.debug("%s: kept %d local key(s) instead of the global values", self.site_name, len(ignored))
        start = shared_state_numpy(self.model, self.split)
        optimizer = torch.optim.Adam(self.model.parameters(), lr=learning_rate, weight_decay=self.training.weight_decay)
        mechanism = None
        if self.dp_plan is not None:
            stats, mechanism, _ = train_dpsgd(
                self.model,
                self.train_cases.items,
                self.preprocessing,
                self.dp_plan.config,
                optimizer,
                self.device,
                seed=self.training.seed + current_round,
                should_stop=should_stop,
                progress=progress,
                loss_fn=self.loss_fn,
            )
        else:
            stats = self._train_plain(optimizer, current_round, should_stop, progress)
        eval_started = time.perf_counter()
        self._calibrate(self.model)
        local_eval = self._evaluate(self.model, should_stop)
        eval_seconds = time.perf_counter() - eval_started
        self.models.offer_local(self.model, local_eval.mean_dice, current_round)
        end = shared_state_numpy(self.model, self.split)
        update = {key: end[key] - start[key] for key in self.split.shared}
        bad = [key for key, value in update.items() if not np.isfinite(value).all()]
        if bad:
            raise FloatingPointError(f"{self.site_name}: update has non-finite values in {bad[:3]}; not sending it")
        self.rounds_done += 1
        metrics = {
            "train_loss": stats.mean_loss,
            **local_eval.as_metrics("local_val_"),
            **self.cost_metrics(stats),
            "local_eval_seconds": eval_seconds,
            "learning_rate": learning_rate,
        }
        return RoundResult(
            update=update,
            num_cases=self.num_train_cases,
            train=stats,
            local_eval=local_eval,
            metrics=metrics,
            privacy=mechanism,
        )

    def _log_progress(self, current_round: int, total_rounds: int | None):
        def progress(step: int, loss: float) -> None:
            if step % LOG_EVERY_STEPS == 0:
                rounds = total_rounds or "?"
                logger.info("%s: round %d/%s step %d: loss %.4f", self.site_name, current_round + 1, rounds, step, loss)

        return progress

    def summary(self) -> str:
        """Where the site stands, for the end of a job."""
        best_local, best_global = (self.models.best_dice(name) for name in (BEST_LOCAL, BEST_GLOBAL))
        return (
            f"{self.rounds_done} round(s) done; best val Dice here: own model {best_local:.4f}, global model "
            f"{best_global:.4f}; models in {self.output_dir} (best_model.pt to deploy, models.json says which)"
        )

    def plan_round(
        self, current_round: int, total_rounds: int | None, delta: float = DEFAULT_DELTA, accountant: str = "rdp"
    ) -> Mechanism | None:
        """Check that round ``current_round`` (0-based) can run and say what it will release (None without DP-SGD),
        before any training: the caller checks the release against the site's budget.

        With ``dp_sgd.target_epsilon`` the first call calibrates the noise for the rounds left, at the ``delta`` and
        ``accountant`` of the site ledger.

        Raises:
            ValueError: the learning-rate schedule or the calibration needs ``total_rounds`` and did not get it, or
                the DP-SGD settings do not fit this site (see ``DPSGDPlan.planned``).
        """
        self.training.learning_rate_for(current_round, total_rounds)
        if self.dp_plan is None:
            return None
        return self.dp_plan.planned(current_round, total_rounds, delta, accountant)

    def privacy_details(self) -> dict:
        """The DP-SGD settings to keep with a release in the site ledger (empty without DP-SGD)."""
        return self.dp_plan.details() if self.dp_plan is not None else {}

    def _train_plain(self, optimizer: torch.optim.Optimizer, current_round: int, should_stop, progress) -> TrainStats:
        regulariser = None
        if self.proximal_loss is not None:
            # The proximal term pulls towards the weights this round started from (the global model + local BN).
            anchor = copy.deepcopy(self.model)
            anchor.requires_grad_(False)
            proximal_loss = self.proximal_loss

            def regulariser(model: torch.nn.Module) -> torch.Tensor:
                return proximal_loss(model, anchor)

        loader = make_train_loader(
            self.train_cases.items,
            self.preprocessing,
            self.training.batch_size,
            seed=self.training.seed + current_round,
        )
        return train_local(
            self.model,
            loader,
            optimizer,
            self.device,
            epochs=self.training.local_epochs,
            max_steps=self.training.local_steps,
            amp=self.amp,
            should_stop=should_stop,
            loss_fn=self.loss_fn,
            progress=progress,
            regulariser=regulariser,
        )

    def cost_metrics(self, stats: TrainStats) -> dict[str, float]:
        """Pure local training time and work of a round, for the benchmark's throughput and overhead figures.

        A "case" is one pass over a volume: ``samples_per_volume`` patches.
        """
        return {
            "train_seconds": stats.seconds,
            "train_patches": float(stats.patches),
            "train_cases": stats.patches / self.preprocessing.samples_per_volume,
            "train_voxels": float(stats.patches * math.prod(self.preprocessing.roi_size)),
        }

    def shared_weights(self) -> dict[str, np.ndarray]:
        """The shared part of this site's current model, for cross-site evaluation: local batch norm stays home."""
        return shared_state_numpy(self.model, self.split)

    def _evaluate(self, model: torch.nn.Module, should_stop) -> EvalResult:
        return evaluate(
            model,
            self.val_cases.items,
            self.device,
            self.preprocessing.roi_size,
            self.class_names,
            amp=self.amp,
            should_stop=should_stop,
        )
