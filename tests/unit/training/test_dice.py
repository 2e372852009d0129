"""The Dice convention for classes a case lacks: left out when also not predicted, 0 when predicted; never NaN,
never a free 1.0."""

import math

import torch

from fedseg3d.training.dice import ClassDiceAccumulator, case_class_dice
from fedseg3d.training.loops import evaluate

CLASSES = {0: "background", 1: "liver", 2: "pancreas"}


def _volume(liver=(), pancreas=()):
    volume = torch.zeros(4, 4, 4, dtype=torch.long)
    for z in liver:
        volume[z] = 1
    for z in pancreas:
        volume[z] = 2
    return volume


def test_absent_and_unpredicted_is_left_out_absent_but_predicted_scores_zero():
    truth = _volume(liver=[0, 1])
    assert case_class_dice(_volume(liver=[0, 1]), truth, [1, 2]) == {1: 1.0}
    assert case_class_dice(_volume(liver=[0], pancreas=[3]), truth, [1, 2]) == {1: 2 * 16 / (16 + 32), 2: 0.0}


def test_a_class_no_case_counts_is_left_out_not_nan():
    dice = ClassDiceAccumulator(CLASSES)
    dice.add(_volume(liver=[0]), _volume(liver=[0]))
    dice.add(_volume(liver=[1]), _volume(liver=[0]))
    assert dice.result() == {"liver": 0.5}


def test_evaluate_reports_no_nan_and_no_free_one_for_an_absent_class():
    class Constant(torch.nn.Module):
        """Predicts liver where the image is 1 and background elsewhere; never pancreas."""

        def forward(self, x):
            return torch.cat([1 - x, x, torch.full_like(x, -1.0)], dim=1)

    image = _volume(liver=[0, 1]).float().unsqueeze(0)
    item = {"image": image, "label": _volume(liver=[0, 1]).unsqueeze(0)}
    result = evaluate(Constant(), [item], torch.device("cpu"), (4, 4, 4), CLASSES)
    assert result.class_dice == {"liver": 1.0} and result.mean_dice == 1.0
    assert all(math.isfinite(v) for v in result.class_dice.values())
