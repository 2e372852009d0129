"""Class-weighted loss: each case's loss must not depend on the other cases of its batch (DP-SGD clips per patient).

MONAI's weighted cross-entropy, applied to a whole batch, divides by the summed weights of all its voxels; the
first test shows that coupling on MONAI's own loss, so the second (the project's loss removes it) can fail.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from monai.losses import DiceCELoss

from fedseg3d.data.task import JobConfigError
from fedseg3d.data.transforms import PreprocessConfig
from fedseg3d.training.loops import make_loss
from fedseg3d.training.site_trainer import SiteTrainer, TrainingConfig

WEIGHTS = (1.0, 1.0, 4.0)


def labels_with_and_without_lesion() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Case a (the one watched), and two partners: b has a large lesion, c has none."""
    a, b, c = (torch.zeros((1, 1, 8, 8, 8), dtype=torch.long) for _ in range(3))
    for label in (a, b, c):
        label[..., 2:6, 2:6, 2:6] = 1
    a[..., 3:5, 3:5, 3:5] = 2
    b[..., 2:6, 2:6, 2:6] = 2
    return a, b, c


def gradient_of_case_a(loss: torch.nn.Module, partner: torch.Tensor) -> torch.Tensor:
    """d(batch loss)/d(case a's logits) in a batch of case a and ``partner``."""
    torch.manual_seed(0)
    logits = torch.randn((2, 3, 8, 8, 8), requires_grad=True)
    a, _, _ = labels_with_and_without_lesion()
    loss(logits, torch.cat([a, partner])).backward()
    return logits.grad[0]


def test_monai_weighted_loss_on_a_batch_couples_the_cases():
    _, b, c = labels_with_and_without_lesion()
    coupled = DiceCELoss(to_onehot_y=True, softmax=True, weight=torch.tensor(WEIGHTS))
    assert not torch.allclose(gradient_of_case_a(coupled, b), gradient_of_case_a(coupled, c), atol=1e-6)


@pytest.mark.parametrize("weights", [(), WEIGHTS], ids=["uniform", "weighted"])
def test_a_case_gradient_does_not_depend_on_the_other_cases(weights):
    _, b, c = labels_with_and_without_lesion()
    loss = make_loss(weights)
    assert torch.allclose(gradient_of_case_a(loss, b), gradient_of_case_a(loss, c), atol=1e-7)


def test_weighting_the_lesion_up_raises_its_share_of_the_gradient():
    a, _, _ = labels_with_and_without_lesion()
    lesion = (a[0, 0] == 2).unsqueeze(0).expand(3, -1, -1, -1)

    def lesion_share(loss: torch.nn.Module) -> float:
        torch.manual_seed(0)
        logits = torch.randn((1, 3, 8, 8, 8), requires_grad=True)
        loss(logits, a).backward()
        grad = logits.grad[0].abs()
        return float(grad[lesion].sum() / grad.sum())

    assert lesion_share(make_loss(WEIGHTS)) > 1.5 * lesion_share(make_loss())


def test_all_ones_is_the_unweighted_loss():
    a, b, _ = labels_with_and_without_lesion()
    logits = torch.randn((2, 3, 8, 8, 8))
    target = torch.cat([a, b])
    assert torch.allclose(make_loss((1, 1, 1))(logits, target), make_loss()(logits, target))


@pytest.mark.parametrize("weights", [(1, -1, 2), (0, 0, 0), (1, "x", 1)])
def test_bad_weights_are_refused(weights):
    with pytest.raises(ValueError, match="class_loss_weights must be numbers >= 0, not all 0"):
        TrainingConfig(class_loss_weights=weights)


def test_weights_given_as_json_text_are_decoded():
    assert TrainingConfig(class_loss_weights="[1, 2.5]").class_loss_weights == (1.0, 2.5)
    assert TrainingConfig(class_loss_weights="[]").class_loss_weights == ()


def test_weights_for_another_number_of_classes_are_refused_before_any_data_is_read(tmp_path: Path):
    classes = {0: "background", 1: "organ", 2: "lesion"}
    training = TrainingConfig(class_loss_weights=[1, 3])
    with pytest.raises(JobConfigError, match=r"class_loss_weights has 2 value\(s\) but class_names has 3 classes"):
        SiteTrainer("site-1", None, classes, PreprocessConfig(), training, tmp_path)  # type: ignore[arg-type]
