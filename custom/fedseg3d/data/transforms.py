"""MONAI transform chains: standardise geometry and intensity, then crop to the training ROI.

Preprocessing is deterministic and runs once per case before training (see ``dataset.py``); only the random
augmentation runs every epoch. All knobs come from the job's ``preprocessing`` block, parsed by
``PreprocessConfig.from_dict`` so a typo in a job file fails with the field's name instead of being ignored.
"""

from __future__ import annotations

from dataclasses import dataclass, fields, replace
from typing import Any

from monai.transforms import (
    Compose,
    EnsureTyped,
    Orientationd,
    RandCropByLabelClassesd,
    RandCropByPosNegLabeld,
    RandFlipd,
    RandScaleIntensityd,
    RandShiftIntensityd,
    ScaleIntensityRanged,
    ScaleIntensityRangePercentilesd,
    Spacingd,
    SpatialPadd,
)

from fedseg3d.data.task import json_list, per_class_values

KEYS = ("image", "label")
INTENSITY_MODES = ("ct_window", "mr_percentile")
CROP_SAMPLINGS = ("pos_neg", "by_class")


@dataclass(frozen=True)
class PreprocessConfig:
    """Geometry and intensity standardisation shared by every site of a job.

    Attributes:
        target_spacing: voxel size in mm after resampling (x, y, z in RAS).
        roi_size: training patch and sliding-window size, in voxels.
        intensity_mode: ``ct_window`` clips Hounsfield units to ``ct_window`` and scales to [0, 1];
            ``mr_percentile`` maps the per-image ``mr_percentiles`` to [0, 1] (MR has no absolute scale).
        ct_window: (low, high) in HU for ``ct_window``.
        mr_percentiles: (low, high) percentiles for ``mr_percentile``.
        samples_per_volume: random patches drawn from each training volume per epoch.
        crop_sampling: how training patch centres are drawn. ``pos_neg`` (MONAI ``RandCropByPosNegLabeld``): on any
            foreground voxel or on background, weighted by ``pos_neg_ratio``; a small class (a lesion inside an
            organ) gets centres only in proportion to its volume. ``by_class`` (``RandCropByLabelClassesd``): pick a
            class by ``class_crop_ratios`` first, then a voxel of it, so a small class is seen as often as asked.
        pos_neg_ratio: (pos, neg) weights for foreground- vs background-centred patches (``pos_neg`` only).
        class_crop_ratios: one weight per class, background first (``by_class`` only), or empty for uniform;
            ``for_classes`` checks it against the job's classes and fills in the uniform weights. A class missing
            from a case is skipped for that case (MONAI warns).
    """

    target_spacing: tuple[float, float, float] = (2.0, 2.0, 2.0)
    roi_size: tuple[int, int, int] = (32, 32, 32)
    intensity_mode: str = "mr_percentile"
    ct_window: tuple[float, float] = (-200.0, 300.0)
    mr_percentiles: tuple[float, float] = (1.0, 99.0)
    samples_per_volume: int = 2
    pos_neg_ratio: tuple[float, float] = (2.0, 1.0)
    crop_sampling: str = "pos_neg"
    class_crop_ratios: tuple[float, ...] = ()

    def __post_init__(self) -> None:
        if self.crop_sampling not in CROP_SAMPLINGS:
            raise ValueError(f"preprocessing.crop_sampling must be one of {CROP_SAMPLINGS}, got '{self.crop_sampling}'")
        if self.class_crop_ratios and (min(self.class_crop_ratios) < 0 or sum(self.class_crop_ratios) <= 0):
            raise ValueError(
                f"preprocessing.class_crop_ratios must be non-negative weights, one per class, not all 0 "
                f"([] for uniform), got {list(self.class_crop_ratios)}"
            )
        if self.intensity_mode not in INTENSITY_MODES:
            raise ValueError(
                f"preprocessing.intensity_mode must be one of {INTENSITY_MODES}, got '{self.intensity_mode}'"
            )
        if len(self.target_spacing) != 3 or min(self.target_spacing) <= 0:
            raise ValueError(f"preprocessing.target_spacing must be 3 positive numbers, got {self.target_spacing}")
        if len(self.roi_size) != 3 or min(self.roi_size) < 8:
            raise ValueError(f"preprocessing.roi_size must be 3 integers >= 8, got {self.roi_size}")
        low, high = self.ct_window
        if low >= high:
            raise ValueError(f"preprocessing.ct_window must be (low, high) with low < high, got {self.ct_window}")
        p_low, p_high = self.mr_percentiles
        if not 0 <= p_low < p_high <= 100:
            raise ValueError(
                f"preprocessing.mr_percentiles must satisfy 0 <= low < high <= 100, got {self.mr_percentiles}"
            )
        if self.samples_per_volume < 1:
            raise ValueError(f"preprocessing.samples_per_volume must be >= 1, got {self.samples_per_volume}")

    @classmethod
    def from_dict(cls, raw: dict[str, Any] | None) -> PreprocessConfig:
        """Parse the job's ``preprocessing`` block; unknown keys are an error, missing ones take defaults.

        List fields may be lists or their JSON text (the form job variables carry them in).
        """
        raw = dict(raw or {})
        known = {f.name for f in fields(cls)}
        unknown = set(raw) - known
        if unknown:
            raise ValueError(f"preprocessing has unknown field(s) {sorted(unknown)}; known: {sorted(known)}")
        for key in ("target_spacing", "ct_window", "mr_percentiles", "pos_neg_ratio", "class_crop_ratios", "roi_size"):
            if key in raw:
                number = int if key == "roi_size" else float
                values = json_list(raw[key], f"preprocessing.{key}")
                try:
                    raw[key] = tuple(number(v) for v in values)
                except (TypeError, ValueError) as err:
                    raise ValueError(f"preprocessing.{key} must be a list of numbers, got {values!r}") from err
        return cls(**raw)

    def for_classes(self, class_names: dict[int, str]) -> PreprocessConfig:
        """This config with one crop weight per class of the job (``[]`` becomes uniform).

        Raises:
            JobConfigError: ``class_crop_ratios`` is not empty and not one weight per class.
        """
        ratios = per_class_values(self.class_crop_ratios, class_names, "preprocessing.class_crop_ratios")
        return replace(self, class_crop_ratios=tuple(ratios) or (1.0,) * len(class_names))


def orientation_transform(keys: tuple[str, ...] = KEYS) -> Orientationd:
    """Reorient image and label to RAS so that geometry can be compared and resampled consistently."""
    # Explicit labels: MONAI is changing the default and warns; these are the RAS world labels we rely on.
    return Orientationd(keys=keys, axcodes="RAS", labels=(("L", "R"), ("P", "A"), ("I", "S")))


def intensity_transform(cfg: PreprocessConfig):
    """CT: a fixed HU window (CT numbers are calibrated). MR: per-image percentiles (MR units are arbitrary)."""
    if cfg.intensity_mode == "ct_window":
        low, high = cfg.ct_window
        return ScaleIntensityRanged(keys="image", a_min=low, a_max=high, b_min=0.0, b_max=1.0, clip=True)
    low, high = cfg.mr_percentiles
    return ScaleIntensityRangePercentilesd(keys="image", lower=low, upper=high, b_min=0.0, b_max=1.0, clip=True)


def resample_and_normalise_transform(cfg: PreprocessConfig) -> Compose:
    """Deterministic part after the data checks: common voxel spacing, then intensity standardisation."""
    return Compose(
        [
            Spacingd(keys=KEYS, pixdim=cfg.target_spacing, mode=("bilinear", "nearest")),
            intensity_transform(cfg),
            EnsureTyped(keys=KEYS, track_meta=False),
        ]
    )


def inference_transform(cfg: PreprocessConfig) -> Compose:
    """Training's deterministic image preprocessing (orientation, spacing, intensity) for an image alone, with its
    metadata kept so that a prediction can be brought back to the source grid (``fedseg3d.inference.segment``)."""
    return Compose(
        [
            orientation_transform(keys=("image",)),
            Spacingd(keys="image", pixdim=cfg.target_spacing, mode="bilinear"),
            intensity_transform(cfg),
        ]
    )


def patch_sampler(cfg: PreprocessConfig) -> RandCropByPosNegLabeld | RandCropByLabelClassesd:
    """The random crop that picks ``samples_per_volume`` patch centres per volume (see ``crop_sampling``)."""
    if cfg.crop_sampling == "by_class":
        if not cfg.class_crop_ratios:
            raise ValueError("crop_sampling 'by_class' needs one weight per class: use PreprocessConfig.for_classes")
        return RandCropByLabelClassesd(
            keys=KEYS,
            label_key="label",
            spatial_size=cfg.roi_size,
            ratios=list(cfg.class_crop_ratios),
            num_classes=len(cfg.class_crop_ratios),
            num_samples=cfg.samples_per_volume,
        )
    pos, neg = cfg.pos_neg_ratio
    return RandCropByPosNegLabeld(
        keys=KEYS, label_key="label", spatial_size=cfg.roi_size, pos=pos, neg=neg, num_samples=cfg.samples_per_volume
    )


def train_augment_transform(cfg: PreprocessConfig) -> Compose:
    """Random part, run every epoch: pad to the ROI, draw label-balanced patches, flip, jitter intensity."""
    return Compose(
        [
            SpatialPadd(keys=KEYS, spatial_size=cfg.roi_size),
            patch_sampler(cfg),
            RandFlipd(keys=KEYS, prob=0.5, spatial_axis=0),
            RandFlipd(keys=KEYS, prob=0.5, spatial_axis=1),
            RandFlipd(keys=KEYS, prob=0.5, spatial_axis=2),
            RandScaleIntensityd(keys="image", factors=0.1, prob=0.5),
            RandShiftIntensityd(keys="image", offsets=0.1, prob=0.5),
        ]
    )
