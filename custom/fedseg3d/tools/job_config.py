"""Read a job's learner arguments outside FLARE (the pretraining tool and the benchmarks train like the job does).

FLARE substitutes ``{var}`` references with the config's top-level variables when it builds components; this does
the same for whole-string references, the only kind the jobs in ``jobs/`` use.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

from fedseg3d.data.task import json_list, parse_class_names

CLIENT_CONFIG = Path("app") / "config" / "config_fed_client.json"
LEARNER_SUFFIX = "SegmentationLearner"
# Learner arguments that are lists, carried by job variables as JSON text.
LIST_FIELDS = {
    "preprocessing": (
        "target_spacing",
        "roi_size",
        "ct_window",
        "mr_percentiles",
        "pos_neg_ratio",
        "class_crop_ratios",
    ),
    "training": ("class_loss_weights",),
}


def substitute(value: Any, variables: dict[str, Any]) -> Any:
    """FLARE's ``{var}`` substitution for a component argument (whole-string references only).

    Raises:
        ValueError: a reference names no variable.
    """
    if isinstance(value, dict):
        return {k: substitute(v, variables) for k, v in value.items()}
    if isinstance(value, list):
        return [substitute(v, variables) for v in value]
    if isinstance(value, str) and (m := re.fullmatch(r"\{(\w+)\}", value)):
        if m.group(1) not in variables:
            raise ValueError(f"job config references undefined variable {{{m.group(1)}}}")
        return variables[m.group(1)]
    return value


def learner_args(job_dir: Path) -> dict[str, Any]:
    """The ``SegmentationLearner`` arguments of a job folder (``class_names``, ``preprocessing``, ``training``, ...),
    variables resolved; ``class_names`` as ``{"0": name, ...}`` (the learner takes this form too) and the list knobs
    that the job carries as JSON text (``roi_size``, ``class_loss_weights``, ...) as lists.

    Raises:
        FileNotFoundError: the job has no client config.
        ValueError: the config has no ``SegmentationLearner`` component, or its ``class_names`` is malformed.
    """
    path = Path(job_dir) / CLIENT_CONFIG
    if not path.is_file():
        raise FileNotFoundError(f"{job_dir}: no {CLIENT_CONFIG} (is it a job folder?)")
    config = json.loads(path.read_text())
    variables = {k: v for k, v in config.items() if not isinstance(v, list | dict)}
    for component in config.get("components", []):
        if component.get("path", "").endswith(LEARNER_SUFFIX):
            args = substitute(component["args"], variables)
            args["class_names"] = {str(i): name for i, name in parse_class_names(args["class_names"]).items()}
            for block, names in LIST_FIELDS.items():
                for name in set(names) & set(args.get(block) or {}):
                    args[block][name] = json_list(args[block][name], f"{block}.{name}")
            return args
    raise ValueError(f"{path}: no {LEARNER_SUFFIX} component")
