"""Which parts of a model's state stay at the site (FedBN) and which are shared with the server.

FedBN (Li et al., "FedBN: Federated Learning on Non-IID Features via Local Batch Normalization", ICLR 2021) keeps
every batch-norm layer local: its affine weight and bias and its running statistics. Keys are chosen by module
type (any ``torch.nn.modules.batchnorm._BatchNorm``), never by substring: MONAI names its norm layers ``adn.N``,
so a filter looking for ``bn`` in key names silently matches nothing.

Group and instance norm are not batch norm: they normalise each sample by its own statistics and keep no running
averages, so their affine weight and bias are shared like any other parameter, and FedBN on such a network is FedAvg.

Integer buffers (``num_batches_tracked``) are never shared either: they count local steps and averaging them
means nothing; keeping them out also keeps every shared tensor floating point, which the compression filters need.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch.nn.modules.batchnorm import _BatchNorm


@dataclass(frozen=True)
class LocalStateSplit:
    """The state-dict keys of one model, partitioned into those shared with the server and those kept local."""

    shared: tuple[str, ...]
    local: tuple[str, ...]


def batchnorm_state_keys(model: torch.nn.Module) -> set[str]:
    """All state-dict keys (parameters and buffers) that belong to batch-norm modules."""
    keys: set[str] = set()
    for module_name, module in model.named_modules():
        if isinstance(module, _BatchNorm):
            prefix = f"{module_name}." if module_name else ""
            keys.update(prefix + name for name, _ in module.named_parameters(recurse=False))
            keys.update(prefix + name for name, _ in module.named_buffers(recurse=False))
    return keys


def split_local_state(model: torch.nn.Module, keep_batchnorm_local: bool) -> LocalStateSplit:
    """Partition ``model.state_dict()`` keys into shared and local ones.

    Args:
        model: the network.
        keep_batchnorm_local: True for FedBN (batch-norm layers stay at the site), False for plain FedAvg.
    """
    local = batchnorm_state_keys(model) if keep_batchnorm_local else set()
    shared, kept = [], []
    for key, value in model.state_dict().items():
        if key in local or not torch.is_floating_point(value):
            kept.append(key)
        else:
            shared.append(key)
    return LocalStateSplit(shared=tuple(shared), local=tuple(kept))


def shared_state_numpy(model: torch.nn.Module, split: LocalStateSplit) -> dict[str, np.ndarray]:
    """The shared part of the model's state as float32 numpy arrays (what a site may send)."""
    state = model.state_dict()
    return {key: state[key].detach().cpu().numpy().astype(np.float32, copy=True) for key in split.shared}


def load_shared_state(model: torch.nn.Module, split: LocalStateSplit, weights: dict[str, np.ndarray]) -> list[str]:
    """Load the shared keys of ``weights`` into ``model``; local keys in ``weights`` are ignored.

    Every shared key must be present with the right shape: a global model that lacks one (for instance because a
    filter dropped it on the way) is an error, not something to paper over with ``strict=False``.

    Returns:
        The keys present in ``weights`` that were ignored because they are local to this site.

    Raises:
        KeyError: a shared key is missing from ``weights``.
        ValueError: a shared key has the wrong shape.
    """
    missing = [key for key in split.shared if key not in weights]
    if missing:
        raise KeyError(f"global model lacks {len(missing)} shared key(s), e.g. {missing[:3]}")
    _copy_into(model, weights, split.shared)
    local = set(split.local)
    return [key for key in weights if key in local]


def load_local_state(model: torch.nn.Module, split: LocalStateSplit, weights: dict[str, np.ndarray]) -> list[str]:
    """Load the local keys that ``weights`` carries into ``model`` (shared keys are left alone); return them.

    Raises:
        ValueError: a local key has the wrong shape.
    """
    found = [key for key in split.local if key in weights]
    _copy_into(model, weights, found)
    return found


def _copy_into(model: torch.nn.Module, weights: dict[str, np.ndarray], keys: list[str]) -> None:
    """Copy ``weights[key]`` into the model's state for every key, all shapes checked before anything is copied."""
    state = model.state_dict()
    for key in keys:
        value = weights[key]
        if tuple(np.shape(value)) != tuple(state[key].shape):
            raise ValueError(
                f"global model key '{key}' has shape {np.shape(value)}, expected {tuple(state[key].shape)}"
            )
    with torch.no_grad():
        for key in keys:
            tensor = torch.as_tensor(np.asarray(weights[key]))
            state[key].copy_(tensor.to(dtype=state[key].dtype, device=state[key].device))
