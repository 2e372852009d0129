"""A drill tool for admins: make one site send a broken update, to see that the server's update QC catches it.

Off unless configured: it is in no stock job. Add it as the last ``train`` result filter before any quantize filter
of a job you run for a drill (``add_fault_injection`` does that to a built job), naming the site that misbehaves.
Every other site, and every round whose scheduled fault is ``none``, passes through untouched. Never put it in a
job that trains a model you intend to use.

Faults (``faults`` is cycled by round: round r gets ``faults[r % len(faults)]``):

- ``scale``: the update times 100 (a diverged optimiser, or a boosting attack).
- ``sign_flip``: the update negated (gradient ascent: pushes the model away from the site's data).
- ``noise``: the update replaced by Gaussian noise of the same per-tensor standard deviation (garbage of a
  plausible size, e.g. a corrupted transfer or a random-weights attack).
- ``free_rider``: a zero difference, i.e. the site returns the model it was sent without training.
- ``replay``: what the site sent in its previous round, sent again (the first round passes through).
- ``none``: no fault.

An update trained on flipped labels is not a filter: give the site a wrong ``label_map`` in its ``site.json``
(e.g. organ and lesion swapped), the way the fault happens in practice. Faults act on the update as the site would
send it, after any DP filter (a site that bypasses its own DP); they need ``WEIGHT_DIFF`` data.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from nvflare.apis.dxo import DataKind, MetaKey, from_shareable
from nvflare.apis.filter import Filter
from nvflare.apis.fl_context import FLContext
from nvflare.apis.shareable import Shareable
from nvflare.app_common.app_constant import AppConstants

FAULTS = ("scale", "sign_flip", "noise", "free_rider", "replay", "none")
SCALE = 100.0


def corrupt(fault: str, update: dict[str, np.ndarray], rng: np.random.Generator, previous: dict | None) -> dict:
    """The update a site with ``fault`` sends instead of ``update`` (new arrays; ``update`` is not changed)."""
    if fault == "scale":
        return {k: v * np.asarray(SCALE, dtype=v.dtype) for k, v in update.items()}
    if fault == "sign_flip":
        return {k: -v for k, v in update.items()}
    if fault == "noise":
        return {k: rng.normal(0.0, float(np.std(v)), v.shape).astype(v.dtype) for k, v in update.items()}
    if fault == "free_rider":
        return {k: np.zeros_like(v) for k, v in update.items()}
    if fault == "replay":
        return {k: v.copy() for k, v in (previous or update).items()}
    if fault == "none":
        return dict(update)
    raise ValueError(f"fault must be one of {FAULTS}, got {fault!r}")


class FaultInjectionFilter(Filter):
    """Corrupts one site's ``train`` results by a round-cycled schedule of faults (see the module docstring).

    Args:
        site: the site that misbehaves (others pass through).
        faults: faults cycled by round.
        seed: seed of the ``noise`` fault.
    """

    def __init__(self, site: str, faults: list[str], seed: int = 0) -> None:
        super().__init__()
        if not isinstance(site, str) or not site:
            raise ValueError(f"site must be a site name, got {site!r}")
        if not faults or any(f not in FAULTS for f in faults):
            raise ValueError(f"faults must be a non-empty list of {FAULTS}, got {faults!r}")
        self.site = site
        self.faults = list(faults)
        self.rng = np.random.default_rng(seed)
        self._previous: dict | None = None

    def process(self, shareable: Shareable, fl_ctx: FLContext) -> Shareable:
        if fl_ctx.get_identity_name() != self.site:
            return shareable
        dxo = from_shareable(shareable)
        if dxo.data_kind != DataKind.WEIGHT_DIFF:
            raise ValueError(f"{type(self).__name__}: needs WEIGHT_DIFF results, got {dxo.data_kind}")
        round_num = dxo.get_meta_prop(MetaKey.CURRENT_ROUND, shareable.get_header(AppConstants.CURRENT_ROUND, 0))
        fault = self.faults[int(round_num) % len(self.faults)]
        sent = corrupt(fault, {k: np.asarray(v) for k, v in dxo.data.items()}, self.rng, self._previous)
        dxo.data = self._previous = sent
        if fault != "none":
            dxo.add_filter_history(f"{type(self).__name__}:{fault}")  # so the server's audit trail shows the drill
            self.log_warning(fl_ctx, f"FAULT DRILL: {self.site} sends a '{fault}' update in round {round_num}")
        return dxo.update_shareable(shareable)


def add_fault_injection(job_dir: str | Path, site: str, faults: list[str], seed: int = 0) -> Path:
    """Add ``FaultInjectionFilter`` to a built job's site config (before any quantize filter); return the file.

    Raises:
        FileNotFoundError: the job has no ``app/config/config_fed_client.json``.
    """
    path = Path(job_dir) / "app" / "config" / "config_fed_client.json"
    config = json.loads(path.read_text())
    entry = {
        "path": f"{__name__}.FaultInjectionFilter",
        "args": {"site": site, "faults": list(faults), "seed": seed},
    }
    groups = config.setdefault("task_result_filters", [])
    group = next((g for g in groups if "train" in g.get("tasks", [])), None)
    if group is None:
        groups.append({"tasks": ["train"], "filters": [entry]})
    else:
        filters = group["filters"]
        codec = next((i for i, f in enumerate(filters) if f.get("path", "").endswith("QuantizeFilter")), len(filters))
        filters.insert(codec, entry)
    path.write_text(json.dumps(config, indent=2) + "\n")
    return path
