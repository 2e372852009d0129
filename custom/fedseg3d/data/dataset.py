"""Load, check and preprocess a site's cases once, then serve random training patches from memory.

Preprocessing every case up front (rather than lazily inside a DataLoader) means every data error surfaces
before the first training step, with the file named, and each case is read from disk exactly once per job.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from monai.data import DataLoader, Dataset, list_data_collate
from monai.data.image_reader import NibabelReader, PydicomReader
from monai.transforms import LoadImage

from fedseg3d.data.case_checks import (
    check_case_files,
    check_image_content,
    check_label_content,
    check_same_geometry,
    is_nifti,
)
from fedseg3d.data.datalist import Case
from fedseg3d.data.dicom import MONAI_DICOM_READER_ARGS, check_dicom_series, multiframe_file
from fedseg3d.data.dicom_multiframe import MultiFrameDicomReader
from fedseg3d.data.errors import DataError
from fedseg3d.data.transforms import (
    PreprocessConfig,
    orientation_transform,
    resample_and_normalise_transform,
    train_augment_transform,
)

logger = logging.getLogger(__name__)


@dataclass
class PreparedCases:
    """Preprocessed cases ready for training or evaluation, and the ones that were skipped (with why)."""

    items: list[dict] = field(default_factory=list)
    skipped: list[DataError] = field(default_factory=list)


class VolumeLoader:
    """Reads one volume with the MONAI reader that fits it, channel first, with its RAS affine.

    NIfTI files go to nibabel; a DICOM single-frame series folder to MONAI's pydicom reader, after
    ``check_dicom_series``; an enhanced multi-frame DICOM file (or a folder holding only that file) to
    ``MultiFrameDicomReader``. Every failure is a ``DataError`` naming the file.
    """

    def __init__(self) -> None:
        self._nifti = LoadImage(reader=NibabelReader(), image_only=True, ensure_channel_first=True)
        self._dicom = LoadImage(
            reader=PydicomReader(**MONAI_DICOM_READER_ARGS), image_only=True, ensure_channel_first=True
        )
        self._frames_reader = MultiFrameDicomReader()
        self._multiframe = LoadImage(reader=self._frames_reader, image_only=True, ensure_channel_first=True)

    def __call__(self, path: Path) -> torch.Tensor:
        path = Path(path)
        if is_nifti(path):
            return self._read(self._nifti, path, path)
        if not path.exists():
            raise DataError(path, "image not found")
        frames_file = multiframe_file(path)
        if frames_file is not None:
            # Named at call time, so that MONAI never falls back to PydicomReader, which misreads these files.
            return self._read(lambda name: self._multiframe(name, reader=self._frames_reader), frames_file, path)
        check_dicom_series(path)  # MONAI's reader would stack a broken folder without complaint
        return self._read(self._dicom, path, path)

    @staticmethod
    def _read(reader: Callable[[str], torch.Tensor], source: Path, path: Path) -> torch.Tensor:
        try:
            return reader(str(source))
        except DataError:
            raise
        except Exception as err:  # nibabel/pydicom raise many types for truncated or corrupt files
            # MONAI's message goes on to list every reader it tried; its first line says what matters.
            first_line = str(err).strip().splitlines()[0] if str(err).strip() else ""
            raise DataError(path, f"unreadable or truncated file ({type(err).__name__}: {first_line})") from err


class CasePreparer:
    """Turns a ``Case`` into a preprocessed ``{"image", "label"}`` dict, checking it on the way.

    ``relabel(label_path, label)`` maps a site's own label IDs to the job's class indices before the label checks
    (``LabelMap.for_classes``); ``None`` when the files already hold the job's indices.
    """

    def __init__(
        self,
        cfg: PreprocessConfig,
        num_classes: int,
        relabel: Callable[[Path, torch.Tensor], torch.Tensor] | None = None,
    ) -> None:
        self.num_classes = num_classes
        self._relabel = relabel
        self._load = VolumeLoader()
        self._orient = orientation_transform()
        self._resample = resample_and_normalise_transform(cfg)

    def __call__(self, case: Case) -> dict:
        check_case_files(case)
        image = self._load(case.image)
        label = self._load(case.label)
        if self._relabel is not None:
            label = self._relabel(case.label, label)
        check_image_content(case.image, image)
        oriented = self._orient({"image": image, "label": label})
        check_same_geometry(case, oriented["image"], oriented["label"])
        check_label_content(case.label, oriented["label"], self.num_classes)
        item = self._resample(oriented)
        item["case_id"] = case.case_id
        return item


def prepare_cases(
    cases: tuple[Case, ...] | list[Case],
    preparer: CasePreparer,
    skip_bad_cases: bool,
    split: str,
) -> PreparedCases:
    """Prepare every case; fail on the first bad one, or skip bad ones with a warning if the site allows it.

    Raises:
        DataError: a case is bad and ``skip_bad_cases`` is False, or every case of the split was bad.
    """
    prepared = PreparedCases()
    for case in cases:
        try:
            prepared.items.append(preparer(case))
        except DataError as err:
            if not skip_bad_cases:
                raise
            logger.warning("skipping %s case %s: %s", split, case.case_id, err)
            prepared.skipped.append(err)
    if not prepared.items:
        raise DataError(split, f"no usable {split} case left after skipping {len(prepared.skipped)} bad one(s)")
    return prepared


def make_train_loader(items: list[dict], cfg: PreprocessConfig, batch_size: int, seed: int) -> DataLoader:
    """Batches of random patches; each volume yields ``samples_per_volume`` patches per epoch."""
    augment = train_augment_transform(cfg)
    augment.set_random_state(seed=seed)
    dataset = Dataset(data=items, transform=augment)
    generator = torch.Generator().manual_seed(seed)
    return DataLoader(
        dataset, batch_size=batch_size, shuffle=True, num_workers=0, collate_fn=list_data_collate, generator=generator
    )
