"""Initial-model checkpoints: the file a job can start from instead of a freshly initialised network.

The format is the one FLARE's ``PTFileModelPersistor`` reads and writes (``{"model": state_dict, ...}``, loadable
with ``torch.load(weights_only=True)``), so a checkpoint written here is what ``initial_checkpoint`` in a job names,
and a job's saved global model (``FL_global_model.pt``) can be used the same way. ``fedseg3d`` adds one entry,
``fedseg3d_provenance`` (plain strings and numbers: which preset, which data, how it was trained), which FLARE
keeps as an opaque property.

A checkpoint must match the job's preset exactly (same keys, same shapes): ``check_state_matches`` says which file,
which keys and which shapes differ, so a wrong checkpoint stops the job at the server before any site trains.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

MODEL_KEY = "model"  # FLARE's PTModelPersistenceFormatManager.PERSISTENCE_KEY_MODEL
PROVENANCE_KEY = "fedseg3d_provenance"
_SHOWN = 5  # keys named in an error message before "..."


def save_checkpoint(state: Mapping[str, torch.Tensor], path: Path, provenance: dict[str, Any] | None = None) -> Path:
    """Write ``state`` (a model's ``state_dict``) as a checkpoint FLARE's persistor loads.

    Args:
        state: the model state, every value a tensor.
        path: the file to write (its folder is created).
        provenance: JSON-like facts about how the weights were made (strings, numbers, lists, dicts).

    Returns:
        ``path``.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    data: dict[str, Any] = {MODEL_KEY: {k: v.detach().cpu().clone() for k, v in state.items()}}
    if provenance:
        data[PROVENANCE_KEY] = provenance
    torch.save(data, path)
    return path


def read_checkpoint(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """The model state and the ``fedseg3d_provenance`` entry (empty when it has none) of a checkpoint, in one read.

    Raises:
        FileNotFoundError: no such file.
        ValueError: the file is not a PyTorch checkpoint of tensors, naming the file.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"initial checkpoint {path} does not exist")
    try:
        data = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # torch raises several kinds for a file that is not a checkpoint
        raise ValueError(f"initial checkpoint {path} is not a readable PyTorch checkpoint: {err}") from err
    state = data.get(MODEL_KEY, data) if isinstance(data, dict) else None
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ValueError(f"initial checkpoint {path}: expected a state dict of tensors (optionally under 'model')")
    provenance = dict(data.get(PROVENANCE_KEY, {})) if MODEL_KEY in data else {}
    return state, provenance


def load_checkpoint_state(path: Path) -> dict[str, torch.Tensor]:
    """The model state in a checkpoint (FLARE's ``{"model": ...}`` format or a bare state dict); see
    :func:`read_checkpoint` for the errors."""
    return read_checkpoint(path)[0]


def checkpoint_provenance(path: Path) -> dict[str, Any]:
    """The ``fedseg3d_provenance`` entry of a checkpoint (empty when it has none)."""
    return read_checkpoint(path)[1]


def state_mismatches(expected: Mapping[str, Any], state: Mapping[str, Any]) -> list[str]:
    """How ``state`` differs from ``expected`` (both key -> array or tensor): missing and unexpected keys, and keys
    whose shapes differ; empty when they match."""
    problems = []
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    shapes = [
        f"{k}: {tuple(state[k].shape)} instead of {tuple(expected[k].shape)}"
        for k in expected
        if k in state and tuple(state[k].shape) != tuple(expected[k].shape)
    ]
    for label, items in (("missing keys", missing), ("unexpected keys", unexpected), ("wrong shapes", shapes)):
        if items:
            more = f", ... ({len(items)} in all)" if len(items) > _SHOWN else ""
            problems.append(f"{label} {', '.join(items[:_SHOWN])}{more}")
    return problems


def check_state_matches(expected: Mapping[str, Any], state: Mapping[str, Any], source: Path | str, what: str) -> None:
    """Raise unless ``state`` (loaded from ``source``) has exactly the keys and shapes of ``expected``.

    Args:
        expected: the state of the network the job builds.
        state: the state read from the checkpoint.
        source: the checkpoint file, for the message.
        what: the network the job builds, for the message (e.g. ``preset 'unet3d_tiny', 3 classes``).

    Raises:
        ValueError: naming the file, the network and the differences.
    """
    problems = state_mismatches(expected, state)
    if problems:
        raise ValueError(
            f"initial checkpoint {source} does not fit the job's network ({what}): {'; '.join(problems)}. "
            "Pretrain with the job's model_preset and num_classes, or clear initial_checkpoint"
        )
