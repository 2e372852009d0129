"""Aggregation rules for a round's site updates: the weighted mean FedAvg uses, and three robust alternatives.

Pure numpy. Each rule takes the updates (name -> array dicts) and the sites' weights and returns one dict. A key is
aggregated over the sites that sent it (FedBN: batch-norm keys never arrive, so they are absent from the result).

- ``weighted_mean``: FedAvg (McMahan et al. 2017), weights are the sites' sample counts.
- ``median``: coordinate-wise median (Yin et al. 2018); unweighted, since a weight is what a liar would inflate.
- ``trimmed_mean``: per coordinate, drop the ``trim_fraction`` largest and smallest values, average the rest
  (Yin et al. 2018); unweighted for the same reason.
- ``norm_bound``: scale every update whose L2 norm exceeds the round's median norm down to it, then the weighted
  mean (Sun et al. 2019, "Can you really backdoor federated learning?"): one site can move the model no further
  than a typical one.

Integer arrays (batch norm's ``num_batches_tracked``) are returned in their own dtype, rounded.

The weighted mean is written here rather than taken from FLARE's ``WeightedAggregationHelper`` so that all four
rules share one per-key stacking (float64, a key averaged over the sites that sent it) and one integer cast.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np

from fedseg3d.server.update_screen import l2_norm

Params = dict[str, np.ndarray]


def _stack(updates: list[Params], key: str) -> np.ndarray:
    return np.stack([np.asarray(u[key], dtype=np.float64) for u in updates if key in u])


def _keys(updates: list[Params]) -> list[str]:
    return sorted(set().union(*(u.keys() for u in updates)))


def _cast(value: np.ndarray, like: np.ndarray) -> np.ndarray:
    if np.issubdtype(like.dtype, np.integer):
        return np.rint(value).astype(like.dtype)
    return value.astype(like.dtype if np.issubdtype(like.dtype, np.floating) else np.float32)


def _first(updates: list[Params], key: str) -> np.ndarray:
    return next(np.asarray(u[key]) for u in updates if key in u)


def weighted_mean(updates: list[Params], weights: list[float]) -> Params:
    """Per key, the mean over the sites that sent it, weighted by ``weights`` (renormalised over those sites)."""
    _check(updates, weights)
    result = {}
    for key in _keys(updates):
        present = [(u[key], w) for u, w in zip(updates, weights, strict=True) if key in u]
        total = sum(w for _, w in present)
        value = sum(np.asarray(v, dtype=np.float64) * (w / total) for v, w in present)
        result[key] = _cast(np.asarray(value), _first(updates, key))
    return result


def coordinate_median(updates: list[Params], weights: list[float] | None = None) -> Params:
    """Per coordinate, the median over the sites (``weights`` ignored: see the module docstring)."""
    _check(updates, weights)
    return {k: _cast(np.median(_stack(updates, k), axis=0), _first(updates, k)) for k in _keys(updates)}


def trimmed_mean(updates: list[Params], weights: list[float] | None = None, trim_fraction: float = 0.25) -> Params:
    """Per coordinate, the mean after dropping ``floor(trim_fraction * n)`` values at each end (n sites with the key).

    Raises:
        ValueError: ``trim_fraction`` not in [0, 0.5).
    """
    if not 0.0 <= trim_fraction < 0.5:
        raise ValueError(f"trim_fraction must be in [0, 0.5), got {trim_fraction!r}")
    _check(updates, weights)
    result = {}
    for key in _keys(updates):
        stacked = np.sort(_stack(updates, key), axis=0)
        cut = int(math.floor(trim_fraction * stacked.shape[0]))
        kept = stacked[cut : stacked.shape[0] - cut]
        result[key] = _cast(kept.mean(axis=0), _first(updates, key))
    return result


def norm_bound(updates: list[Params], weights: list[float]) -> Params:
    """Clip each update's L2 norm to the round's median norm, then take the weighted mean."""
    _check(updates, weights)
    norms = [l2_norm(u) for u in updates]
    bound = float(np.median(norms))
    clipped = [
        {k: np.asarray(v, dtype=np.float64) * (bound / n if n > bound else 1.0) for k, v in u.items()}
        for u, n in zip(updates, norms, strict=True)
    ]
    result = weighted_mean(clipped, weights)
    return {k: _cast(v, _first(updates, k)) for k, v in result.items()}


def _check(updates: list[Params], weights: list[float] | None) -> None:
    if not updates:
        raise ValueError("no updates to aggregate")
    if weights is not None:
        if len(weights) != len(updates):
            raise ValueError(f"{len(weights)} weights for {len(updates)} updates")
        if any(not (math.isfinite(w) and w > 0) for w in weights):
            raise ValueError(f"weights must be positive and finite, got {weights}")


RULES: dict[str, Callable[..., Params]] = {
    "weighted_mean": weighted_mean,
    "median": coordinate_median,
    "trimmed_mean": trimmed_mean,
    "norm_bound": norm_bound,
}


def aggregate(rule: str, updates: list[Params], weights: list[float], trim_fraction: float = 0.25) -> Params:
    """Aggregate with the rule named ``rule`` (a key of ``RULES``).

    Raises:
        ValueError: an unknown rule, no updates, or bad weights.
    """
    if rule not in RULES:
        raise ValueError(f"aggregation_rule must be one of {sorted(RULES)}, got {rule!r}")
    if rule == "trimmed_mean":
        return trimmed_mean(updates, weights, trim_fraction)
    return RULES[rule](updates, weights)
