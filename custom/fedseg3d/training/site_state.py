"""What a site carries from one job of a run to the next (a continuation after a server restart).

FLARE creates the learner afresh for every job, so without this a continuation job would start each site from the
server's model alone. For FedBN that is silently wrong: the server's model holds the batch-norm layers of the
*initial* network (sites never send theirs), so the site's learned batch-norm scale and shift would be reset to the
initial ones. And the site's best models would be chosen again from the continuation's rounds only.

So after every round the site saves, in ``<site workspace>/fedseg3d_state/<run>/site_state.pt`` (written
atomically): its local state (the keys that never leave it: FedBN's batch norm, weights and running statistics),
the round, and where its models of that job are (``site_models/``). A continuation job of the same run loads the
local state instead of adopting the server's, and starts its model store from the previous job's best models, so
``best_model.pt`` stays the best of the whole run. Batch-norm running statistics are recomputed anyway before any
evaluation (``norm_calibration``); the learned scale and shift are what needs carrying.

What is not carried, and why: the uplink quantiser's error-feedback residual (a filter's memory; it restarts from
zero, dropping one round's quantisation error) and the downlink decoder's copy of the global model (the server's
first message of a job carries full weights). The privacy ledger needs nothing: it is already the site's, across
jobs (``local/``), and a continuation's rounds are charged to it like any others.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np
import torch

from fedseg3d.models.local_state import LocalStateSplit, load_local_state
from fedseg3d.server.run_state import atomic_write

logger = logging.getLogger(__name__)

SITE_STATE = "site_state.pt"


def save_site_state(
    state_dir: Path, model: torch.nn.Module, split: LocalStateSplit, round_: int, models_dir: Path
) -> Path:
    """Save ``model``'s local keys, the round and the models folder to ``state_dir/site_state.pt``, atomically."""
    state = model.state_dict()
    data = {
        "round": int(round_),
        "local": {key: state[key].detach().cpu().clone() for key in split.local},
        "models_dir": str(Path(models_dir).resolve()),
    }
    return atomic_write(Path(state_dir) / SITE_STATE, lambda tmp: torch.save(data, tmp))


def load_site_state(state_dir: Path) -> dict[str, Any] | None:
    """What :func:`save_site_state` wrote, or None when this site has no state for the run.

    Raises:
        ValueError: the file exists but is not a site state, naming the file.
    """
    path = Path(state_dir) / SITE_STATE
    if not path.is_file():
        return None
    try:
        data = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # torch raises several kinds for a file that is not a checkpoint
        raise ValueError(f"{path}: not a readable site state ({err})") from err
    if not isinstance(data, dict) or not isinstance(data.get("local"), dict) or "round" not in data:
        raise ValueError(f"{path}: expected fields 'round', 'local' and 'models_dir'")
    return data


def restore_local_state(model: torch.nn.Module, split: LocalStateSplit, saved: dict[str, Any], source: Path) -> int:
    """Load the saved local keys into ``model``; returns how many.

    Raises:
        ValueError: the saved keys are not exactly the model's local keys (another network or FedBN setting),
            naming the file: carrying on would mix two models' batch norm.
    """
    local = saved["local"]
    if set(local) != set(split.local):
        raise ValueError(
            f"{source}: the saved local state has {len(local)} keys, this job's model has {len(split.local)} local "
            "keys (different preset or keep_batchnorm_local): start a new run instead of continuing this one"
        )
    return len(load_local_state(model, split, {k: np.asarray(v) for k, v in local.items()}))
