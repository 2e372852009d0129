"""Per-class Dice with a stated convention for classes that a case does not contain.

Real sites see slabs of one body, so a validation slab often lacks a class (no pancreas in the upper abdomen slab).
Dice is 0/0 there, and the two usual answers are both wrong for a federation: NaN (MONAI's ``ignore_empty=True``)
leaks into means and JSON, and 1.0 (``ignore_empty=False``) hands every site a free perfect score for each absent
class. The convention here, per case and class:

- the class is in the ground truth: Dice ``2|P & G| / (|P| + |G|)`` as usual;
- the class is absent and the model predicts none of it: the case says nothing about the class; it is left out
  (neither 0 nor 1);
- the class is absent but the model predicts some of it: Dice 0, a false detection is an error.

A class with no counted case at a site is left out of that site's ``class_dice`` (never NaN) and out of its mean.
"""

from __future__ import annotations

import torch


def case_class_dice(prediction: torch.Tensor, truth: torch.Tensor, classes: list[int]) -> dict[int, float]:
    """Dice of each class in ``classes`` for one case, by the module's convention (absent and unpredicted: left out).

    Args:
        prediction: class indices, any shape.
        truth: class indices, the same shape.
        classes: the class indices to score (usually every class but background).
    """
    if prediction.shape != truth.shape:
        raise ValueError(f"prediction shape {tuple(prediction.shape)} differs from truth {tuple(truth.shape)}")
    scores = {}
    for c in classes:
        predicted, true = prediction == c, truth == c
        size = int(predicted.sum()) + int(true.sum())
        if size:
            scores[c] = 2.0 * int((predicted & true).sum()) / size
    return scores


class ClassDiceAccumulator:
    """Collects ``case_class_dice`` over cases; ``result`` gives each class's mean over the cases that counted."""

    def __init__(self, class_names: dict[int, str]) -> None:
        self.class_names = class_names
        self.foreground = [i for i in sorted(class_names) if i != 0]
        self._scores: dict[int, list[float]] = {c: [] for c in self.foreground}

    def add(self, prediction: torch.Tensor, truth: torch.Tensor) -> None:
        for c, score in case_class_dice(prediction, truth, self.foreground).items():
            self._scores[c].append(score)

    def result(self) -> dict[str, float]:
        """Class name -> mean Dice, for the classes that were in some case's truth or prediction."""
        return {self.class_names[c]: sum(s) / len(s) for c, s in self._scores.items() if s}
