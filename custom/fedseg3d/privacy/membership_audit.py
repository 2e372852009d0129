"""Membership-inference audit of a trained segmentation model: the loss-threshold attack of Yeom et al.

Yeom, Giacomelli, Fredrikson and Jha, "Privacy Risk in Machine Learning: Analyzing the Connection to Overfitting"
(IEEE CSF 2018): an attacker who can query the model and knows a case's ground truth guesses "member" when the
model's loss on that case is low. Sweeping the threshold over all values gives the attack's ROC curve; its area
(AUC) is the probability that a random training case (member) has a lower loss than a random held-out case
(non-member) of the same distribution. 0.5 means the model's loss says nothing about membership; 1.0 means every
training case is recognisable. Differential privacy bounds this attack: an (epsilon, delta)-DP model caps the
attacker's true-positive rate at ``exp(epsilon) * FPR + delta`` for every threshold (Kairouz et al. 2015), so a
measured AUC well above 0.5 at a small epsilon would point to a bug in the DP pipeline, while an AUC near 0.5 at a
large epsilon shows only that *this* attack fails, not that the model is private.

Per-case loss is the unweighted training loss (``fedseg3d.training.loops.make_loss()``: Dice + cross-entropy) on
the whole volume, with the same sliding-window inference the validation uses, so the attack sees what the model
was optimised for (a job's ``class_loss_weights`` are not applied: the attack's statistic stays the same across
jobs). AUC comes from ``monai.metrics.compute_roc_auc`` (Mann-Whitney with ties counted as half).

Plain torch/MONAI: the FLARE-specific part (where a job stores its models) lives in ``fedseg3d.tools.privacy_audit``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass

import numpy as np
import torch
from monai.inferers import sliding_window_inference
from monai.metrics import compute_roc_auc
from monai.utils import convert_to_tensor

from fedseg3d.training.loops import make_loss


@dataclass(frozen=True)
class AuditResult:
    """Outcome of the loss-threshold attack on one site's cases.

    Attributes:
        auc: attack AUC (0.5: no better than a coin; 1.0: every member recognised).
        auc_low, auc_high: bounds of a percentile bootstrap interval (``confidence``) over both sets of cases;
            with a dozen cases per set the interval is wide, and that is the honest answer.
        n_members, n_nonmembers: cases in each set.
        member_loss, nonmember_loss: mean per-case loss of each set (the generalisation gap the attack exploits).
    """

    auc: float
    auc_low: float
    auc_high: float
    confidence: float
    n_members: int
    n_nonmembers: int
    member_loss: float
    nonmember_loss: float

    def as_dict(self) -> dict[str, float | int]:
        return asdict(self)


@torch.no_grad()
def case_losses(
    model: torch.nn.Module,
    items: Sequence[dict],
    device: torch.device,
    roi_size: Sequence[int],
    loss_fn: torch.nn.Module | None = None,
) -> list[float]:
    """The training loss of ``model`` on each whole volume in ``items`` (preprocessed ``{"image", "label"}``).

    Raises:
        ValueError: ``items`` is empty, or a loss is not finite (a broken model must not pass as "private").
    """
    if not items:
        raise ValueError("case_losses needs at least one case")
    loss_fn = loss_fn or make_loss()
    model.eval()
    losses = []
    for item in items:
        # Plain tensors: MONAI's MetaTensor bookkeeping on every layer costs about a quarter of the time on CPU.
        image = convert_to_tensor(item["image"], track_meta=False).unsqueeze(0).to(device)
        label = convert_to_tensor(item["label"], track_meta=False).unsqueeze(0).to(device)
        logits = sliding_window_inference(image, tuple(roi_size), sw_batch_size=4, predictor=model, overlap=0.25)
        loss = float(loss_fn(logits.float(), label))
        if not math.isfinite(loss):
            raise ValueError(f"loss is {loss} on case {item.get('case_id', '?')}: the model output is not usable")
        losses.append(loss)
    return losses


def attack_auc(member_losses: Sequence[float], nonmember_losses: Sequence[float]) -> float:
    """AUC of the loss-threshold attack: members are the positive class, a lower loss is a stronger "member" score.

    Raises:
        ValueError: either set is empty or holds a non-finite loss.
    """
    if not member_losses or not nonmember_losses:
        raise ValueError(
            f"the attack needs members and non-members, got {len(member_losses)} and {len(nonmember_losses)}"
        )
    scores = -np.asarray([*member_losses, *nonmember_losses], dtype=np.float64)
    if not np.isfinite(scores).all():
        raise ValueError("losses must be finite")
    labels = np.r_[np.ones(len(member_losses)), np.zeros(len(nonmember_losses))]
    return float(compute_roc_auc(torch.as_tensor(scores), torch.as_tensor(labels)))


def bootstrap_auc_interval(
    member_losses: Sequence[float],
    nonmember_losses: Sequence[float],
    *,
    confidence: float = 0.95,
    resamples: int = 1000,
    seed: int = 0,
) -> tuple[float, float]:
    """Percentile bootstrap interval of the attack AUC, resampling members and non-members separately.

    Raises:
        ValueError: ``confidence`` not in (0, 1) or ``resamples`` < 10.
    """
    if not 0 < confidence < 1:
        raise ValueError(f"confidence must be in (0, 1), got {confidence}")
    if resamples < 10:
        raise ValueError(f"resamples must be >= 10, got {resamples}")
    rng = np.random.default_rng(seed)
    members, nonmembers = np.asarray(member_losses), np.asarray(nonmember_losses)
    aucs = [
        attack_auc(rng.choice(members, members.size).tolist(), rng.choice(nonmembers, nonmembers.size).tolist())
        for _ in range(resamples)
    ]
    tail = (1.0 - confidence) / 2.0
    low, high = np.quantile(aucs, [tail, 1.0 - tail])
    return float(low), float(high)


def audit_model(
    model: torch.nn.Module,
    members: Sequence[dict],
    nonmembers: Sequence[dict],
    device: torch.device,
    roi_size: Sequence[int],
    *,
    confidence: float = 0.95,
    resamples: int = 1000,
    seed: int = 0,
) -> AuditResult:
    """Run the loss-threshold attack against ``model`` with known members and non-members of one site.

    Non-members must come from the same distribution as the members (a site's held-out cases): otherwise the
    attack measures the distribution shift, not membership.
    """
    member_losses = case_losses(model, members, device, roi_size)
    nonmember_losses = case_losses(model, nonmembers, device, roi_size)
    low, high = bootstrap_auc_interval(
        member_losses, nonmember_losses, confidence=confidence, resamples=resamples, seed=seed
    )
    return AuditResult(
        auc=attack_auc(member_losses, nonmember_losses),
        auc_low=low,
        auc_high=high,
        confidence=confidence,
        n_members=len(member_losses),
        n_nonmembers=len(nonmember_losses),
        member_loss=float(np.mean(member_losses)),
        nonmember_loss=float(np.mean(nonmember_losses)),
    )
