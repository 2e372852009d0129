"""Recompute batch-norm running statistics for the weights actually being evaluated or saved.

Why: in evaluation mode a batch-norm layer normalises with its running mean and variance, an exponential average
(momentum 0.1) of the batch statistics seen while training. Those belong to the weights they were collected with.
In FedBN they go wrong in two ways. A round of a few optimizer steps moves the running averages only a little
(after ``n`` steps the previous round's values still weigh ``0.9 ** n``), while Adam moves the weights a lot: the
site's own model is then normalised with statistics of older weights. And a global model is paired with the site's
statistics of its *local* weights, which the averaged convolutions do not produce. Training looks fine throughout
(training mode uses batch statistics), but the evaluated model can score near 0 Dice. Re-estimating the statistics
with the evaluated weights on the site's own training patches (a forward pass, no gradient) removes both mismatches
(``research/fedbn_stability``); it uses only the site's data and never leaves the site.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from monai.transforms import Compose, SpatialPadd
from torch.nn.modules.batchnorm import _BatchNorm
from torch.optim.swa_utils import update_bn

from fedseg3d.data.transforms import KEYS, PreprocessConfig, patch_sampler

# Patches (at least) and patches per forward pass that batch-norm statistics are recomputed from.
CALIBRATION_PATCHES = 64
CALIBRATION_BATCH = 4


def batchnorm_layers(model: torch.nn.Module) -> list[_BatchNorm]:
    """The model's batch-norm layers that keep running statistics (the ones evaluation mode depends on)."""
    return [m for m in model.modules() if isinstance(m, _BatchNorm) and m.track_running_stats]


def recalibrate_batchnorm(model: torch.nn.Module, batches: Iterable[torch.Tensor], device: torch.device) -> int:
    """Replace every batch-norm layer's running mean and variance by the statistics of ``batches`` under the
    model's current weights; learned parameters (including the affine weight and bias) are left untouched.

    torch's ``swa_utils.update_bn`` does the work: every batch counts equally (cumulative average), so the result
    does not depend on the order of the batches or on how the layer was trained. It runs the model in training mode,
    which is the same as batch norm alone in training mode for these presets (they have no dropout). The model is
    left in evaluation mode.

    Args:
        model: the network, changed in place.
        batches: image tensors shaped ``(N, C, *spatial)``.
        device: where to run the forward passes.

    Returns:
        The number of batches used; 0 when the model has no batch norm with running statistics (nothing done).

    Raises:
        ValueError: the model has batch norm but ``batches`` is empty (the old statistics would silently stay).
    """
    if not batchnorm_layers(model):
        return 0
    batches = list(batches)
    if not batches:
        raise ValueError("batch-norm recalibration got no batches: the site has no training patches to use")
    update_bn(batches, model, device)
    model.eval()
    return len(batches)


def patch_batches(
    items: list[dict], cfg: PreprocessConfig, min_patches: int = CALIBRATION_PATCHES, seed: int = 0
) -> list[torch.Tensor]:
    """Batches of at least ``min_patches`` training patches, drawn as training draws them (label-centred crops)
    but without flips or intensity jitter, passing over the volumes as often as needed; the same for the same seed.

    Why this many: a site with one training volume yields ``samples_per_volume`` patches a pass, and statistics
    from two patches were noise (at the real MR site they made evaluation worse than the stale running averages).
    """
    transform = Compose([SpatialPadd(keys=KEYS, spatial_size=cfg.roi_size), patch_sampler(cfg)])
    transform.set_random_state(seed=seed)
    patches: list[torch.Tensor] = []
    while len(patches) < min_patches:
        for item in items:
            patches.extend(crop["image"] for crop in transform(item))
    return [torch.stack(patches[i : i + CALIBRATION_BATCH]) for i in range(0, len(patches), CALIBRATION_BATCH)]
