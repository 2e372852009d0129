"""The consortium's segmentation task as a job states it: the class list (background first) and the per-class
settings that must agree with it.

FLARE's job variables are strings, numbers and booleans only (a top-level list is not a variable), so the list
knobs of a job (``class_names``, ``roi_size``, ``class_loss_weights``, ...) sit at the top of its config as JSON
text, and ``fedseg3d build-jobs --set roi_size=[48,48,48]`` writes them back as JSON text. This module decodes them,
and says when a job's settings do not fit together: that is the job's fault, never a site's data.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any


class JobConfigError(ValueError):
    """The job's own settings are wrong or inconsistent: fix the job (``--set``), not the sites' data."""

    def __init__(self, message: str) -> None:
        super().__init__(f"job config error: {message}")


def json_list(value: Any, field: str) -> list:
    """A list knob as a list: given as one, as a tuple, or as its JSON text (how FLARE variables carry lists).

    Raises:
        JobConfigError: the value is neither a list nor the JSON text of one (the field is named).
    """
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except json.JSONDecodeError as err:
            raise JobConfigError(f"{field} must be a JSON list such as [1, 2], got {value!r} ({err.msg})") from err
    if isinstance(value, tuple):
        value = list(value)
    if not isinstance(value, list):
        raise JobConfigError(f"{field} must be a JSON list such as [1, 2], got {value!r}")
    return value


def parse_class_names(raw: Any, field: str = "class_names") -> dict[int, str]:
    """Class index -> name from a list of names (background first), its JSON text, or ``{"0": name, ...}``.

    Raises:
        JobConfigError: fewer than two classes, a name that is not a non-empty string, a repeated name, or
            (object form) indices that are not 0..N-1.
    """
    if isinstance(raw, dict):
        try:
            names = {int(k): v for k, v in raw.items()}
        except ValueError as err:
            raise JobConfigError(f"{field} keys must be class indices 0..N-1, got {sorted(raw)}") from err
        if sorted(names) != list(range(len(names))):
            raise JobConfigError(f"{field} keys must be class indices 0..N-1, got {sorted(names)}")
    else:
        names = dict(enumerate(json_list(raw, field)))
    values = [names[i] for i in sorted(names)]
    if len(values) < 2:
        raise JobConfigError(f'{field} needs background and at least one class, e.g. ["background", "tumour"]')
    if not all(isinstance(v, str) and v.strip() for v in values) or len(set(values)) != len(values):
        raise JobConfigError(f"{field} must be distinct non-empty names, background first, got {values}")
    return {i: names[i] for i in sorted(names)}


def per_class_values(values: Sequence[Any] | str, class_names: dict[int, str], field: str) -> tuple[float, ...]:
    """One number per class (background first), or ``()`` when the knob is ``[]`` (uniform).

    Raises:
        JobConfigError: the list is not empty and its length differs from the number of classes.
    """
    numbers = json_list(values, field)
    if numbers and len(numbers) != len(class_names):
        names = [class_names[i] for i in sorted(class_names)]
        raise JobConfigError(
            f"{field} has {len(numbers)} value(s) but class_names has {len(names)} classes {names}: "
            "give one per class, background first, or [] for uniform"
        )
    return tuple(numbers)
