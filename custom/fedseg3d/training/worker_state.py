"""What a site must carry over when its training worker process is replaced: the state a fresh ``SiteTrainer`` lacks.

A fresh trainer rebuilds everything derived from the job and the site's data (model shape, prepared cases,
calibration patches). What it cannot rebuild is what earlier rounds produced: FedBN's local batch norm (the trained
affine weights and running statistics), how many rounds it trained, whether it adopted the server's initial batch
norm, which of its saved models are the best (so a worse model never replaces a better one on disk; which file
``best_model.pt`` copies follows from them, and is copied again once at most), and the
DP-SGD noise calibration (so a restart never re-calibrates mid-job). The shared weights are not here: every round
starts from the server's global model.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from fedseg3d.models.local_state import load_local_state
from fedseg3d.training.site_trainer import SiteTrainer


@dataclass
class SiteState:
    """A picklable snapshot of a ``SiteTrainer``'s carried-over state (see the module)."""

    local_state: dict[str, np.ndarray] = field(default_factory=dict)
    rounds_done: int = 0
    local_state_adopted: bool = False
    model_entries: dict[str, dict] = field(default_factory=dict)
    dp_calibration: Any = None

    def describe(self) -> str:
        """One line for the site log: what a restored trainer got back."""
        return (
            f"{self.rounds_done} round(s) done, {len(self.local_state)} local key(s) (FedBN batch norm), "
            f"{len(self.model_entries)} saved model(s) on record"
            + (", DP-SGD calibration kept" if self.dp_calibration is not None else "")
        )


def snapshot(trainer: SiteTrainer) -> SiteState:
    """The trainer's carried-over state, copied (the trainer goes on changing its own)."""
    model_state = trainer.model.state_dict()
    return SiteState(
        local_state={key: model_state[key].detach().cpu().numpy().copy() for key in trainer.split.local},
        rounds_done=trainer.rounds_done,
        local_state_adopted=trainer.local_state_adopted,
        model_entries=copy.deepcopy(trainer.models.entries),
        dp_calibration=trainer.dp_plan.calibration if trainer.dp_plan is not None else None,
    )


def restore(trainer: SiteTrainer, state: SiteState) -> None:
    """Put ``state`` back into a freshly built ``trainer`` of the same job and site.

    Raises:
        ValueError: the local keys do not fit the trainer's model (a different job or preset).
    """
    missing = set(trainer.split.local) - set(state.local_state)
    if state.local_state and missing:
        raise ValueError(f"{trainer.site_name}: saved site state lacks local key(s) {sorted(missing)[:3]}")
    load_local_state(trainer.model, trainer.split, state.local_state)
    trainer.rounds_done = state.rounds_done
    trainer.local_state_adopted = state.local_state_adopted or trainer.local_state_adopted
    trainer.models.entries = copy.deepcopy(state.model_entries)
    if trainer.dp_plan is not None and state.dp_calibration is not None:
        trainer.dp_plan.calibration = state.dp_calibration
