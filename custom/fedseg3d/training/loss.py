"""The training loss: Dice over the classes a patch contains, plus cross-entropy, each patch on its own.

Why not MONAI's ``DiceCELoss``: real sites train on slabs of one body, so most patches lack some classes (no
pancreas in the upper abdomen). Per patch, MONAI scores such an absent class ``1 - smooth / (sum of its
probabilities + smooth)`` with smooth 1e-5: about 1 (the worst score) for any prediction short of near-certainty, and
almost no gradient. Each absent class thus adds a constant to the loss a site reports (a site whose patches lack
more classes reports a higher loss for the same quality), and divides the Dice gradient of the classes present by the
full class count instead of the count present. The convention here, per patch:

- Dice term: the (weighted) mean of ``1 - Dice`` over the classes present in the patch's ground truth only. An
  absent class neither scores 1.0 for free nor adds a constant;
- cross-entropy over every voxel (weighted per voxel by its true class, normalised by the patch's summed weights):
  predicting an absent class anywhere is still penalised, here;
- the batch loss is the mean over patches. Each patch's term depends on that patch alone, so one patient's gradient
  never depends on the other patients in its batch, which DP-SGD's per-patient clipping relies on.

With every class present and no weights it equals MONAI's ``DiceCELoss(to_onehot_y=True, softmax=True)`` up to
MONAI's 1e-5 smoothing (a unit test checks this).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F


class PresentClassDiceCELoss(torch.nn.Module):
    """Dice over the classes present in each patch + cross-entropy, averaged over patches (see the module docstring).

    Args:
        class_weights: one weight >= 0 per class, background first, for both terms; empty for uniform.
    """

    def __init__(self, class_weights: Sequence[float] = ()) -> None:
        super().__init__()
        weights = torch.tensor([float(w) for w in class_weights]) if class_weights else torch.zeros(0)
        self.register_buffer("class_weights", weights, persistent=False)

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """``logits`` (N, C, *spatial); ``target`` class indices (N, 1, *spatial) or (N, *spatial)."""
        logits = logits.float()  # softmax and sums in float32 also under autocast
        classes = logits.shape[1]
        labels = (target[:, 0] if target.dim() == logits.dim() else target).long()
        weights = self.class_weights if self.class_weights.numel() else logits.new_ones(classes)
        if weights.numel() != classes:
            raise ValueError(f"the loss has {weights.numel()} class weights but the network gives {classes} classes")
        weights = weights.to(logits.device)
        log_probs = F.log_softmax(logits, dim=1)
        probs = log_probs.exp()
        truth = F.one_hot(labels, classes).movedim(-1, 1).to(probs.dtype)
        spatial = tuple(range(2, logits.dim()))
        truth_size = truth.sum(spatial)  # (N, C)
        overlap = (probs * truth).sum(spatial)
        predicted_size = probs.sum(spatial)
        # A present class has truth_size >= 1, so its denominator is never 0; absent ones are masked out below.
        dice = 2 * overlap / (predicted_size + truth_size).clamp_min(1.0)
        present = (truth_size > 0).to(probs.dtype) * weights
        tiny = torch.finfo(probs.dtype).tiny
        dice_term = (present * (1 - dice)).sum(1) / present.sum(1).clamp_min(tiny)
        voxel_weights = weights[labels]
        nll = -log_probs.gather(1, labels.unsqueeze(1)).squeeze(1)
        ce_term = (voxel_weights * nll).flatten(1).sum(1) / voxel_weights.flatten(1).sum(1).clamp_min(tiny)
        return (dice_term + ce_term).mean()
