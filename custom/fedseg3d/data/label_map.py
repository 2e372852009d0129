"""A site's own label IDs mapped onto the consortium's classes.

Hospitals never share label conventions: one site's liver is 5, another's is 2, and a model-made label map may
hold a hundred structures the consortium does not train on. Each site therefore declares, in its site config, which
of its IDs is which consortium class, by class *name* (so the consortium may reorder its classes without every site
editing its file), and what to do with IDs it did not list:

- ``"unmapped_labels": "error"`` (the default): any unlisted non-zero ID in a label file is refused, naming the
  label file, the IDs and the site config field. A site that forgot a class must not have it silently learnt as
  background.
- ``"unmapped_labels": "background"``: unlisted IDs become background. For label maps that hold many structures
  outside the consortium's task (TotalSegmentator's 117 classes), where "not one of our organs" is what they are.

ID 0 is always background. Only IDs that occur in a file are checked, so a map may list classes a slab lacks.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import torch

from fedseg3d.data.errors import DataError

UNMAPPED_POLICIES = ("error", "background")


@dataclass(frozen=True)
class LabelMap:
    """Site label ID -> consortium class name, and the policy for IDs not listed.

    Attributes:
        source: the site config file, for error messages.
        names: site ID -> consortium class name.
        unmapped: ``"error"`` or ``"background"`` (see the module docstring).
    """

    source: Path
    names: dict[int, str]
    unmapped: str = "error"

    @classmethod
    def from_raw(cls, source: Path, raw: object, unmapped: object) -> LabelMap:
        """Parse the ``label_map`` and ``unmapped_labels`` fields of a site config.

        Raises:
            DataError: naming ``source`` and the field, when an ID is not a whole number >= 1, a name is not a
                non-empty string, or the policy is unknown.
        """
        if not isinstance(raw, dict) or not raw:
            raise DataError(source, f"field 'label_map' must map the site's label IDs to class names, got {raw!r}")
        if unmapped not in UNMAPPED_POLICIES:
            raise DataError(source, f"field 'unmapped_labels' must be one of {UNMAPPED_POLICIES}, got {unmapped!r}")
        names: dict[int, str] = {}
        for key, name in raw.items():
            try:
                site_id = int(key)
            except ValueError:
                site_id = -1
            if site_id < 1 or str(site_id) != str(key).strip():
                raise DataError(source, f"field 'label_map' key {key!r} must be a label ID >= 1 (0 is background)")
            if not isinstance(name, str) or not name:
                raise DataError(source, f"field 'label_map[\"{key}\"]' must be a class name, got {name!r}")
            names[site_id] = name
        return cls(source=source, names=names, unmapped=str(unmapped))

    def lookup(self, class_names: dict[int, str]) -> dict[int, int]:
        """Site ID -> consortium class index for a job's classes (``{index: name}``, background at 0).

        Raises:
            DataError: a mapped name is not one of the job's classes (the field and the job's classes are named).
        """
        index_of = {name: index for index, name in class_names.items()}
        table = {0: 0}
        for site_id, name in sorted(self.names.items()):
            if name not in index_of:
                raise DataError(
                    self.source,
                    f"field 'label_map[\"{site_id}\"]' is '{name}', which is not a class of this job "
                    f"(classes: {[class_names[i] for i in sorted(class_names)]})",
                )
            table[site_id] = index_of[name]
        return table

    def for_classes(self, class_names: dict[int, str]) -> Callable[[Path, torch.Tensor], torch.Tensor]:
        """``relabel(label_path, label)`` for a job's classes; resolving the names now fails before any file is read."""
        return partial(self.apply, table=self.lookup(class_names))

    def apply(self, label_path: Path, label: torch.Tensor, table: dict[int, int]) -> torch.Tensor:
        """Return ``label`` with site IDs replaced by class indices (``table`` from ``lookup``).

        Raises:
            DataError: the file holds non-integer values, or IDs not in the map while ``unmapped`` is ``"error"``.
        """
        values = torch.unique(label)
        if not torch.equal(values, torch.round(values)):
            raise DataError(label_path, "label has non-integer values; it cannot be mapped to the consortium's classes")
        present = [int(v) for v in values.tolist()]
        unlisted = [v for v in present if v not in table]
        if unlisted and self.unmapped == "error":
            raise DataError(
                label_path,
                f"label IDs {unlisted} are not in field 'label_map' of {self.source}; list them, or set "
                f"'unmapped_labels' to 'background' if they are structures outside the consortium's classes",
            )
        mapped = torch.zeros_like(label)
        for site_id in present:
            target = table.get(site_id, 0)
            if target:
                mapped[label == site_id] = target
        return mapped
