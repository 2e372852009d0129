"""Decathlon-style datalists: one JSON per site listing training and validation cases.

Paths inside a datalist are relative to the site's data root, so a site can move its data without editing the
list, and no absolute path ever sits in a job.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from fedseg3d.data.errors import DataError

SPLITS = ("training", "validation")


@dataclass(frozen=True)
class Case:
    """One image/label pair with absolute paths, plus an id for messages and reports."""

    case_id: str
    image: Path
    label: Path

    def as_dict(self) -> dict[str, str]:
        """The MONAI dictionary form consumed by ``LoadImaged``."""
        return {"image": str(self.image), "label": str(self.label), "case_id": self.case_id}


@dataclass(frozen=True)
class Datalist:
    """The parsed datalist of one site."""

    path: Path
    labels: dict[int, str]
    training: tuple[Case, ...]
    validation: tuple[Case, ...]


def _case_id(image_rel: str) -> str:
    name = Path(image_rel.rstrip("/")).name
    for suffix in (".nii.gz", ".nii", ".dcm"):
        if name.endswith(suffix):
            return name[: -len(suffix)]
    return name


def _parse_entries(path: Path, split: str, entries: object, data_root: Path) -> tuple[Case, ...]:
    if not isinstance(entries, list):
        raise DataError(
            path, f"field '{split}' must be a list of {{'image', 'label'}} objects, got {type(entries).__name__}"
        )
    cases = []
    for index, entry in enumerate(entries):
        where = f"{split}[{index}]"
        if not isinstance(entry, dict):
            raise DataError(path, f"{where} must be an object with 'image' and 'label', got {type(entry).__name__}")
        for key in ("image", "label"):
            value = entry.get(key)
            if not isinstance(value, str) or not value:
                raise DataError(path, f"{where}.{key} must be a non-empty path string, got {value!r}")
            if Path(value).is_absolute():
                raise DataError(path, f"{where}.{key} is absolute ({value}); paths must be relative to the data root")
        cases.append(Case(_case_id(entry["image"]), data_root / entry["image"], data_root / entry["label"]))
    return tuple(cases)


def load_datalist(path: str | Path, data_root: str | Path, label_names: dict[int, str] | None = None) -> Datalist:
    """Read and check a datalist. File existence is checked later, case by case, with the data itself.

    Args:
        path: the datalist JSON.
        data_root: the folder that the datalist's relative paths start from.
        label_names: the classes the job expects; when given, the datalist's ``labels`` must agree with it.

    Raises:
        DataError: the file is missing, not JSON, or a field is missing or malformed (``labels`` is required).
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(path, "datalist file not found")
    try:
        raw = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise DataError(path, f"datalist is not valid JSON ({err})") from err
    if not isinstance(raw, dict):
        raise DataError(path, "datalist must be a JSON object with 'training' and 'validation' lists")
    for split in SPLITS:
        if split not in raw:
            raise DataError(path, f"datalist has no '{split}' field")
    if "labels" not in raw:
        # Without it the classes would be guessed from the job, and a binary datalist would silently train (and
        # score) the job's other classes as absent.
        expected = {str(k): v for k, v in (label_names or {0: "background", 1: "tumour"}).items()}
        raise DataError(
            path, f"datalist has no 'labels' field: declare the classes its cases are labelled with, e.g. {expected}"
        )
    labels_raw = raw["labels"]
    try:
        labels = {int(k): str(v) for k, v in labels_raw.items()}
    except (AttributeError, ValueError) as err:
        raise DataError(path, f"field 'labels' must map class indices to names, got {labels_raw!r}") from err
    if sorted(labels) != list(range(len(labels))) or len(labels) < 2:
        raise DataError(path, f"field 'labels' must map 0 (background) .. N-1 to names, N >= 2; got {labels_raw!r}")
    if label_names is not None and labels != label_names:
        raise DataError(
            path,
            f"field 'labels' is {labels}, but the job expects {label_names} (the job's class_names knob; "
            "with a site label_map, 'labels' lists the consortium's classes)",
        )
    root = Path(data_root)
    training = _parse_entries(path, "training", raw["training"], root)
    validation = _parse_entries(path, "validation", raw["validation"], root)
    if not training:
        raise DataError(path, "field 'training' is empty: a site needs at least one training case")
    if not validation:
        raise DataError(path, "field 'validation' is empty: a site needs at least one validation case")
    return Datalist(path=path, labels=labels, training=training, validation=validation)
