"""The loss's convention for classes a patch does not contain (``fedseg3d.training.loss``).

MONAI's per-patch Dice scores an absent class near its worst value for any prediction short of near-certainty, so a
correct, moderately confident prediction keeps a loss floor that grows with the number of absent classes; the
project's loss leaves absent classes to cross-entropy.
"""

from __future__ import annotations

import pytest
import torch
from monai.losses import DiceCELoss, DiceLoss

from fedseg3d.training.loss import PresentClassDiceCELoss

CLASSES = 4


def organ_patch() -> torch.Tensor:
    """A (1, 1, 12, 12, 12) label with background and class 1 only: classes 2 and 3 are absent."""
    label = torch.zeros((1, 1, 12, 12, 12), dtype=torch.long)
    label[..., 3:9, 3:9, 3:9] = 1
    return label


def confident_logits(label: torch.Tensor, margin: float) -> torch.Tensor:
    """Logits that pick the true class everywhere, ``margin`` above every other class."""
    return margin * torch.nn.functional.one_hot(label[:, 0], CLASSES).movedim(-1, 1).float()


def test_monai_dice_keeps_a_floor_for_each_absent_class_that_the_project_loss_does_not():
    label = organ_patch()
    logits = confident_logits(label, margin=8.0)
    monai_dice = float(DiceLoss(to_onehot_y=True, softmax=True)(logits, label))
    ours = PresentClassDiceCELoss()
    ours_dice_and_ce = float(ours(logits, label))
    # Two of the four classes are absent: MONAI's mean over classes holds about 2/4 for them, whatever the margin.
    assert monai_dice > 0.45
    assert ours_dice_and_ce < 0.01


def test_predicting_an_absent_class_is_still_penalised_through_cross_entropy():
    label = organ_patch()
    clean = confident_logits(label, margin=8.0)
    false_detection = clean.clone()
    false_detection[:, 3, :3, :3, :3] = 20.0  # class 3 (absent) predicted in a corner of background
    loss = PresentClassDiceCELoss()
    assert float(loss(false_detection, label)) > float(loss(clean, label)) + 0.05


def test_with_every_class_present_it_matches_monai_dice_ce():
    torch.manual_seed(0)
    label = torch.randint(0, CLASSES, (2, 1, 10, 10, 10))
    logits = torch.randn((2, CLASSES, 10, 10, 10))
    monai = DiceCELoss(to_onehot_y=True, softmax=True)(logits, label)
    assert float(PresentClassDiceCELoss()(logits, label)) == pytest.approx(float(monai), abs=1e-4)


def test_absent_classes_give_finite_loss_and_gradients_for_every_weighting():
    label = torch.zeros((2, 1, 6, 6, 6), dtype=torch.long)  # background only: every foreground class absent
    for weights in [(), (0.0, 1.0, 1.0, 1.0), (1.0, 2.0, 0.0, 5.0)]:
        logits = torch.randn((2, CLASSES, 6, 6, 6), requires_grad=True)
        loss = PresentClassDiceCELoss(weights)(logits, label)
        loss.backward()
        assert torch.isfinite(loss) and torch.isfinite(logits.grad).all()


def test_weights_for_another_class_count_are_refused():
    with pytest.raises(ValueError, match="3 class weights but the network gives 4 classes"):
        PresentClassDiceCELoss((1, 1, 1))(torch.zeros((1, CLASSES, 4, 4, 4)), torch.zeros((1, 1, 4, 4, 4)))
