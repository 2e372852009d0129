"""Where training patches are centred: ``pos_neg`` (MONAI's pos/neg crop) against ``by_class`` (class first).

The volume has a large organ and a small lesion in one corner of it, the situation of the synthetic sites: with
``pos_neg`` a lesion reaches a patch only as often as the organ voxels near it are drawn; ``by_class`` must put it
in as many patches as its ratio asks for.
"""

from pathlib import Path

import pytest
import torch

from fedseg3d.data.task import JobConfigError
from fedseg3d.data.transforms import PreprocessConfig, train_augment_transform
from fedseg3d.training.site_trainer import SiteTrainer, TrainingConfig

LESION = 2


def organ_with_a_small_lesion() -> dict[str, torch.Tensor]:
    label = torch.zeros((1, 64, 64, 64))
    label[:, 12:52, 12:52, 12:52] = 1  # organ: 40^3 voxels
    label[:, 14:17, 14:17, 14:17] = LESION  # lesion: 3^3 voxels in the organ's corner
    return {"image": torch.rand((1, 64, 64, 64)), "label": label}


def lesion_share(preprocessing: PreprocessConfig, draws: int) -> float:
    """The share of drawn patches that hold at least one lesion voxel (fixed seed)."""
    augment = train_augment_transform(preprocessing)
    augment.set_random_state(seed=0)
    case = organ_with_a_small_lesion()
    hits = 0
    for _ in range(draws):
        for patch in augment(dict(case)):
            hits += int((torch.as_tensor(patch["label"]) == LESION).any())
    return hits / (draws * preprocessing.samples_per_volume)


def test_by_class_puts_the_small_class_in_as_many_patches_as_its_ratio_asks():
    base = {"roi_size": (16, 16, 16), "samples_per_volume": 4}
    only_lesion = PreprocessConfig(**base, crop_sampling="by_class", class_crop_ratios=(0, 0, 1))
    assert lesion_share(only_lesion, draws=10) == 1.0
    pos_neg = lesion_share(PreprocessConfig(**base), draws=30)
    balanced = lesion_share(PreprocessConfig(**base, crop_sampling="by_class", class_crop_ratios=(1, 1, 1)), draws=30)
    # Expected shares: pos_neg about 2/3 x (lesion-near organ voxels) ~ 0.07; balanced at least 1/3.
    assert pos_neg < 0.2 and balanced > 0.3, (pos_neg, balanced)


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        ({"crop_sampling": "lesion"}, "crop_sampling must be one of"),
        ({"crop_sampling": "by_class", "class_crop_ratios": "[1, x]"}, "class_crop_ratios must be a JSON list"),
        ({"crop_sampling": "by_class", "class_crop_ratios": [1, -1, 1]}, "non-negative"),
        ({"crop_sampling": "by_class", "class_crop_ratios": [0, 0, 0]}, "not all 0"),
    ],
)
def test_bad_crop_settings_name_the_field(raw, message):
    with pytest.raises(ValueError, match=message):
        PreprocessConfig.from_dict(raw)


def test_ratios_for_another_number_of_classes_are_refused_before_any_data_is_read(tmp_path: Path):
    preprocessing = PreprocessConfig.from_dict({"crop_sampling": "by_class", "class_crop_ratios": [1, 2]})
    classes = {0: "background", 1: "organ", 2: "lesion"}
    with pytest.raises(JobConfigError, match=r"class_crop_ratios has 2 value\(s\) but class_names has 3 classes"):
        SiteTrainer("site-1", None, classes, preprocessing, TrainingConfig(), tmp_path)  # type: ignore[arg-type]


def test_empty_ratios_are_uniform_over_the_jobs_classes():
    preprocessing = PreprocessConfig.from_dict({"crop_sampling": "by_class", "class_crop_ratios": "[]"})
    classes = {0: "background", 1: "liver", 2: "spleen", 3: "kidney"}
    assert preprocessing.for_classes(classes).class_crop_ratios == (1.0, 1.0, 1.0, 1.0)
