"""Local calibration: adapt a federated model to one site with that site's own labelled cases, never worse.

A model the federation trained meets a site's scanner as it is. Before a site relies on it, three cheap steps use
only the site's own data (nothing leaves the site):

1. refresh the batch-norm statistics on the site's training images (``training.norm_calibration``): a global model
   carries averaged or another site's statistics;
2. optionally fine-tune briefly on the site's training cases (``fine_tune_steps``, the project's training loop);
3. fit a softmax temperature (``inference.temperature``) so the probabilities mean what they say.

Steps 1-2 give a candidate network that replaces the original only if its Dice on the site's validation cases is
not worse (tolerance 0: equal counts as not worse); otherwise the original network is kept and the report says
why. The temperature never changes the label map, only the probabilities: it is kept only if it does not raise the
calibration error. Dice follows ``training.dice`` (absent and unpredicted classes left out); the calibration error
is MONAI's ``CalibrationErrorMetric`` (expected calibration error, 20 bins, per foreground class, then the mean).

Held-out voxels: sites often have one validation case, so the temperature's error is measured by two-fold
cross-fitting on the validation volumes' halves (lower and upper half along the last axis): the temperature fitted
on one half scores the other, so the reported error is never the fit's own data. The temperature kept is then fitted
on all validation voxels. The Dice comparison selects on the validation cases it reports, which can only make the
kept model look as good as the original, never hide that it is worse.
"""

from __future__ import annotations

import copy
import logging
import math
from dataclasses import asdict, dataclass
from typing import Any

import torch
from monai.inferers import sliding_window_inference
from monai.metrics import CalibrationErrorMetric

from fedseg3d.data.datalist import load_datalist
from fedseg3d.data.dataset import CasePreparer, make_train_loader, prepare_cases
from fedseg3d.data.site_config import SiteConfig
from fedseg3d.inference.deployable import DeployableModel
from fedseg3d.inference.temperature import fit_temperature, voxel_sample
from fedseg3d.training.device import resolve_device, use_mixed_precision
from fedseg3d.training.dice import ClassDiceAccumulator
from fedseg3d.training.loops import SW_BATCH_SIZE, SW_OVERLAP, make_loss, train_local
from fedseg3d.training.norm_calibration import batchnorm_layers, patch_batches, recalibrate_batchnorm

logger = logging.getLogger(__name__)

ECE_BINS = 20


@dataclass(frozen=True)
class Score:
    """A model's quality on the site's validation cases."""

    mean_dice: float
    class_dice: dict[str, float]
    ece: float


@dataclass(frozen=True)
class CalibrationReport:
    """What local calibration did at one site and what it measured before and after."""

    site: str
    validation_cases: int
    before: Score
    after: Score
    adapted_network_kept: bool
    decision: str
    batchnorm_refreshed: bool
    fine_tune_steps: int
    temperature_before: float
    temperature: float

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)

    def summary(self) -> str:
        """Lines for a person: before and after, and what was kept."""
        return "\n".join(
            [
                f"site {self.site}: {self.validation_cases} validation case(s)",
                f"  before: Dice {self.before.mean_dice:.4f}  ECE {self.before.ece:.4f}  T={self.temperature_before:g}",
                f"  after:  Dice {self.after.mean_dice:.4f}  ECE {self.after.ece:.4f}  T={self.temperature:.3g}",
                f"  {self.decision}",
            ]
        )


@torch.no_grad()
def validation_logits(
    network: torch.nn.Module, items: list[dict], roi_size: tuple[int, int, int], device: torch.device
) -> list[torch.Tensor]:
    """Sliding-window logits ``(C, *spatial)`` of each validation case, on the CPU (as ``training.loops.evaluate``)."""
    network.eval()
    return [
        sliding_window_inference(
            item["image"].unsqueeze(0).to(device), roi_size, SW_BATCH_SIZE, network, overlap=SW_OVERLAP
        )[0].float().cpu()
        for item in items
    ]  # fmt: skip


def dice_score(logits: list[torch.Tensor], items: list[dict], class_names: dict[int, str]) -> tuple[float, dict]:
    """Mean and per-class Dice of the argmax, by the project's convention (``training.dice``)."""
    dice = ClassDiceAccumulator(class_names)
    for case_logits, item in zip(logits, items, strict=True):
        dice.add(case_logits.argmax(0), item["label"][0].long())
    per_class = dice.result()
    return (sum(per_class.values()) / len(per_class) if per_class else math.nan), per_class


def calibration_error(probabilities: list[torch.Tensor], items: list[dict], num_classes: int) -> float:
    """Expected calibration error over the foreground classes (MONAI ``CalibrationErrorMetric``)."""
    metric = CalibrationErrorMetric(num_bins=ECE_BINS, include_background=False, calibration_reduction="expected")
    for probs, item in zip(probabilities, items, strict=True):
        truth = torch.nn.functional.one_hot(item["label"][0].long(), num_classes).movedim(-1, 0)
        metric(y_pred=probs.unsqueeze(0), y=truth.unsqueeze(0).float())
    return float(metric.aggregate())


def _halves(volume: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    middle = volume.shape[-1] // 2
    return volume[..., :middle], volume[..., middle:]


def cross_fitted_error(
    logits: list[torch.Tensor], items: list[dict], num_classes: int, seed: int
) -> tuple[float, float]:
    """``(ECE measured out of fold, temperature fitted on all voxels)``: each half of every validation volume is
    scored with the temperature fitted on the other halves."""
    labels = [item["label"][0] for item in items]
    halves = [(_halves(x), _halves(y)) for x, y in zip(logits, labels, strict=True)]
    temperatures = [_fit([x[fold] for x, _ in halves], [y[fold] for _, y in halves], seed) for fold in (0, 1)]
    out_of_fold = []
    for case_logits in logits:
        lower, upper = _halves(case_logits)
        # The lower half is scored with the upper halves' temperature and vice versa.
        out_of_fold.append(torch.cat([(lower / temperatures[1]).softmax(0), (upper / temperatures[0]).softmax(0)], -1))
    return calibration_error(out_of_fold, items, num_classes), _fit(logits, labels, seed)


def _fit(logits: list[torch.Tensor], labels: list[torch.Tensor], seed: int) -> float:
    """The temperature of a voxel sample from every volume (``MAX_FIT_VOXELS`` from each at most)."""
    sample = [voxel_sample(x, y, seed=seed) for x, y in zip(logits, labels, strict=True)]
    return fit_temperature(torch.cat([s[0] for s in sample]), torch.cat([s[1] for s in sample]))


def adapt_network(
    network: torch.nn.Module,
    train_items: list[dict],
    model: DeployableModel,
    device: torch.device,
    fine_tune_steps: int,
    learning_rate: float,
    batch_size: int,
    seed: int,
) -> tuple[torch.nn.Module | None, bool, str]:
    """A copy of ``network`` with refreshed batch norm and, if asked, briefly fine-tuned.

    Returns:
        ``(candidate, batch norm refreshed, note)``; the candidate is None when fine-tuning diverged.
    """
    candidate = copy.deepcopy(network).to(device)
    has_bn = bool(batchnorm_layers(candidate))
    batches = patch_batches(train_items, model.preprocessing, seed=seed) if has_bn else []
    if has_bn:
        recalibrate_batchnorm(candidate, batches, device)
    if fine_tune_steps <= 0:
        return candidate, has_bn, ""
    torch.manual_seed(seed)
    loader = make_train_loader(train_items, model.preprocessing, batch_size, seed=seed)
    optimizer = torch.optim.Adam(candidate.parameters(), lr=learning_rate)
    try:
        stats = train_local(
            candidate, loader, optimizer, device, max_steps=fine_tune_steps, amp=use_mixed_precision(device),
            loss_fn=make_loss(),
        )  # fmt: skip
    except FloatingPointError as err:
        return None, has_bn, f"fine-tuning diverged ({err})"
    if has_bn:  # the statistics of the fine-tuned weights, as training does after each round
        recalibrate_batchnorm(candidate, batches, device)
    return candidate, has_bn, f"fine-tuned {stats.steps} steps (mean loss {stats.mean_loss:.4f})"


def calibrate(
    model: DeployableModel,
    site: SiteConfig,
    *,
    fine_tune_steps: int = 0,
    learning_rate: float = 1e-4,
    batch_size: int = 2,
    seed: int = 0,
    device: str = "auto",
) -> tuple[DeployableModel, CalibrationReport]:
    """Adapt ``model`` to ``site`` with the site's own cases; the result is never worse on its validation Dice.

    The site's intensity handling (``site.json``) replaces the model's, as in training; its label map applies.

    Returns:
        The model to deploy (the adapted or the original network, with the temperature kept) whose provenance has a
        ``local_calibration`` entry, and the report.

    Raises:
        DataError: the site's datalist or a case is unusable (bad cases are skipped where the site allows it).
        ValueError: ``fine_tune_steps`` < 0 or ``learning_rate`` <= 0.
    """
    if fine_tune_steps < 0 or not learning_rate > 0:
        raise ValueError(f"fine_tune_steps must be >= 0 and learning_rate > 0, got {fine_tune_steps}, {learning_rate}")
    torch_device = resolve_device(device)
    preprocessing = site.preprocessing_for(model.preprocessing)
    model = copy.copy(model)
    model.preprocessing = preprocessing
    datalist = load_datalist(site.datalist, site.data_root, label_names=model.class_names)
    relabel = site.label_map.for_classes(model.class_names) if site.label_map else None
    preparer = CasePreparer(preprocessing, num_classes=model.num_classes, relabel=relabel)
    train = prepare_cases(datalist.training, preparer, site.skip_bad_cases, "training").items
    val = prepare_cases(datalist.validation, preparer, site.skip_bad_cases, "validation").items
    roi = preprocessing.roi_size

    original = model.network.to(torch_device)
    logits = validation_logits(original, val, roi, torch_device)
    dice_before, class_before = dice_score(logits, val, model.class_names)
    probs_before = [(x / model.temperature).softmax(0) for x in logits]
    before = Score(dice_before, class_before, calibration_error(probs_before, val, model.num_classes))

    candidate, refreshed, note = adapt_network(
        original, train, model, torch_device, fine_tune_steps, learning_rate, batch_size, seed
    )
    chosen, kept = original, False
    steps = "batch-norm refresh" + (f" + {note}" if note else "") if refreshed else (note or "no batch norm to refresh")
    if candidate is None:
        decision = f"kept the original network: {note}"
    else:
        cand_logits = validation_logits(candidate, val, roi, torch_device)
        dice_cand, class_cand = dice_score(cand_logits, val, model.class_names)
        if dice_cand >= dice_before:  # tolerance 0: not worse is good enough
            chosen, kept, logits = candidate, True, cand_logits
            dice_before_choice = f"{dice_before:.4f} -> {dice_cand:.4f}"
            decision = f"kept the adapted network ({steps}): validation Dice {dice_before_choice}"
        else:
            decision = (
                f"kept the original network: the adapted one ({steps}) scored validation Dice {dice_cand:.4f} < "
                f"{dice_before:.4f}"
            )
    dice_after, class_after = dice_score(logits, val, model.class_names)
    ece_unscaled = calibration_error([(x / model.temperature).softmax(0) for x in logits], val, model.num_classes)
    ece_fitted, fitted = cross_fitted_error(logits, val, model.num_classes, seed)
    if ece_fitted <= ece_unscaled:
        temperature, ece_after = fitted, ece_fitted
        decision += f"; temperature {fitted:.3g} (held-out ECE {ece_unscaled:.4f} -> {ece_fitted:.4f})"
    else:
        temperature, ece_after = model.temperature, ece_unscaled
        decision += (
            f"; kept temperature {model.temperature:g} (ECE {ece_unscaled:.4f}; a fitted {fitted:.3g} gave held-out "
            f"{ece_fitted:.4f})"
        )
    report = CalibrationReport(
        site=site.site_name,
        validation_cases=len(val),
        before=before,
        after=Score(dice_after, class_after, ece_after),
        adapted_network_kept=kept,
        decision=decision,
        batchnorm_refreshed=refreshed and kept,
        fine_tune_steps=fine_tune_steps if kept else 0,
        temperature_before=model.temperature,
        temperature=temperature,
    )
    logger.info("local calibration at %s: %s", site.site_name, decision)
    calibrated = DeployableModel(
        network=chosen.eval().cpu(),
        model_preset=model.model_preset,
        class_names=model.class_names,
        preprocessing=preprocessing,
        provenance={**model.provenance, "local_calibration": report.as_dict()},
        temperature=temperature,
    )
    return calibrated, report
