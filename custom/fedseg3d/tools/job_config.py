"""Read a job's learner arguments outside FLARE (the pretraining tool and the benchmarks train like the job does).

FLARE substitutes ``{var}`` references with the config's top-level variables when it builds components; this does
the same for whole-string references, the only kind the jobs in ``jobs/`` use.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

CLIENT_CONFIG = Path("app") / "config" / "config_fed_client.json"
LEARNER_SUFFIX = "SegmentationLearner"


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
    variables resolved.

    Raises:
        FileNotFoundError: the job has no client config.
        ValueError: the config has no ``SegmentationLearner`` component.
    """
    path = Path(job_dir) / CLIENT_CONFIG
    if not path.is_file():
        raise FileNotFoundError(f"{job_dir}: no {CLIENT_CONFIG} (is it a job folder?)")
    config = json.loads(path.read_text())
    variables = {k: v for k, v in config.items() if not isinstance(v, list | dict)}
    for component in config.get("components", []):
        if component.get("path", "").endswith(LEARNER_SUFFIX):
            return substitute(component["args"], variables)
    raise ValueError(f"{path}: no {LEARNER_SUFFIX} component")
