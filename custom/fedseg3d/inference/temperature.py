"""Temperature scaling (Guo et al., "On Calibration of Modern Neural Networks", ICML 2017) for voxel classifiers.

One scalar ``T`` divides the logits before the softmax: ``T > 1`` softens an over-confident model, ``T < 1`` sharpens
an under-confident one, and the argmax (the label map) never changes. Written here because MONAI measures
calibration (``CalibrationErrorMetric``) but ships no method to fit it; a one-parameter NLL fit is a few lines of
torch (L-BFGS over ``log T``, so ``T`` stays positive).
"""

from __future__ import annotations

import math

import torch

# Voxels the fit uses at most (a random subset): the NLL of one scalar is settled long before millions of voxels.
MAX_FIT_VOXELS = 200_000
T_RANGE = (0.05, 20.0)  # a temperature outside this says the logits are broken, not miscalibrated


def voxel_sample(
    logits: torch.Tensor, labels: torch.Tensor, max_voxels: int = MAX_FIT_VOXELS, seed: int = 0
) -> tuple[torch.Tensor, torch.Tensor]:
    """Flatten ``(C, *spatial)`` logits and ``(*spatial)`` labels to ``(N, C)`` and ``(N,)``, keeping at most
    ``max_voxels`` voxels drawn at random (the same for the same seed)."""
    flat_logits = logits.reshape(logits.shape[0], -1).T
    flat_labels = labels.reshape(-1).long()
    if flat_labels.numel() > max_voxels:
        generator = torch.Generator().manual_seed(seed)
        keep = torch.randperm(flat_labels.numel(), generator=generator)[:max_voxels]
        flat_logits, flat_labels = flat_logits[keep], flat_labels[keep]
    return flat_logits.float(), flat_labels


def fit_temperature(logits: torch.Tensor, labels: torch.Tensor, max_iter: int = 100) -> float:
    """The temperature that minimises the cross-entropy (NLL) of ``softmax(logits / T)`` on these voxels.

    Args:
        logits: ``(N, C)`` raw network outputs.
        labels: ``(N,)`` class indices.

    Raises:
        ValueError: no voxels, shapes that do not match, or non-finite logits.
    """
    if logits.ndim != 2 or labels.shape != logits.shape[:1] or logits.shape[0] == 0:
        raise ValueError(f"expected (N, C) logits and (N,) labels with N > 0, got {tuple(logits.shape)} and "
                         f"{tuple(labels.shape)}")  # fmt: skip
    if not torch.isfinite(logits).all():
        raise ValueError("logits are not finite: nothing to calibrate")
    logits, labels = logits.detach().float(), labels.long()
    log_t = torch.zeros(1, requires_grad=True)
    optimizer = torch.optim.LBFGS([log_t], lr=0.5, max_iter=max_iter, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        optimizer.zero_grad()
        loss = torch.nn.functional.cross_entropy(logits / log_t.exp(), labels)
        loss.backward()
        return loss

    optimizer.step(closure)
    low, high = T_RANGE
    return float(min(max(math.exp(log_t.item()), low), high))
