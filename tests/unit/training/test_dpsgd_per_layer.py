"""Per-layer clipping (``dp_sgd.clipping: per_layer``): each tensor within its share, the same noise, the same
epsilon."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch

from fedseg3d.data.transforms import PreprocessConfig
from fedseg3d.models.presets import build_model
from fedseg3d.training.dpsgd import DPSGDConfig, make_dp_optimizer, per_layer_clip_norms, train_dpsgd
from tests.unit.training.test_dpsgd import patients

PREPROCESSING = PreprocessConfig(roi_size=(16, 16, 16), samples_per_volume=1)


def clipped_sum(clipping: str, gradients: list[torch.Tensor], max_grad_norm: float) -> list[torch.Tensor]:
    """What Opacus's optimizer for ``clipping`` sums from one patient whose per-tensor gradients are given."""
    params = [torch.nn.Parameter(torch.zeros_like(g)) for g in gradients]
    optimizer = make_dp_optimizer(
        torch.optim.SGD(params, lr=1.0),
        DPSGDConfig(noise_multiplier=1.0, max_grad_norm=max_grad_norm, clipping=clipping),
    )
    for param, gradient in zip(params, gradients, strict=True):
        param.grad_sample = gradient.unsqueeze(0)  # one patient
    optimizer.clip_and_accumulate()
    return [param.summed_grad for param in params]


def test_per_layer_norms_split_the_clip_equally_and_add_up_to_it_in_l2():
    model = build_model("unet3d_tiny_instancenorm")
    optimizer = torch.optim.Adam(model.parameters())
    norms = per_layer_clip_norms(optimizer, 0.25)
    assert len(norms) == len(list(model.parameters()))
    assert len(set(norms)) == 1
    assert math.hypot(*norms) == pytest.approx(0.25)


def test_a_small_tensor_passes_per_layer_unclipped_while_the_flat_clip_scales_it_with_the_large_one():
    large, small = torch.full((100,), 1.0), torch.full((4,), 0.01)  # norms 10 and 0.02; each share is 0.5 / sqrt(2)
    flat = clipped_sum("flat", [large, small], max_grad_norm=0.5)
    per_layer = clipped_sum("per_layer", [large, small], max_grad_norm=0.5)
    # Flat: one factor for the whole gradient, so the small tensor shrinks 20-fold with the large one.
    assert torch.cat(flat).norm().item() == pytest.approx(0.5, rel=1e-4)
    assert (flat[1].norm() / flat[0].norm()).item() == pytest.approx((small.norm() / large.norm()).item(), rel=1e-4)
    # Per layer: the large tensor is cut to its share, the small one is left as it was; the whole stays within C.
    assert per_layer[0].norm().item() == pytest.approx(0.5 / math.sqrt(2), rel=1e-4)
    assert torch.allclose(per_layer[1], small)
    assert torch.cat(per_layer).norm() <= 0.5


def test_noise_per_layer_has_the_standard_deviation_of_the_whole_clip():
    """An empty Poisson sample: the step's update is the noise alone, noise_multiplier * max_grad_norm over the
    expected batch, in every coordinate (if per-layer noise were scaled to a tensor's share it would be 1/sqrt(L))."""
    sigma, clip, batch = 2.0, 0.25, 4
    params = [torch.nn.Parameter(torch.zeros(20_000)) for _ in range(4)]
    optimizer = make_dp_optimizer(
        torch.optim.SGD(params, lr=1.0),
        DPSGDConfig(noise_multiplier=sigma, max_grad_norm=clip, patients_per_step=batch, clipping="per_layer"),
    )
    torch.manual_seed(0)
    for param in params:
        param.grad_sample = torch.zeros((0, *param.shape))
    optimizer.step()
    update = torch.cat([param.detach() for param in params])
    expected = sigma * clip / batch
    # 80,000 draws: the sample std is within 1.5% of the true one with overwhelming probability; a wrong scale
    # (per-tensor share 1/2, or no division by the batch) is off by 2x or more.
    assert update.std().item() == pytest.approx(expected, rel=0.015)
    assert abs(update.mean().item()) < 4 * expected / math.sqrt(update.numel())


def test_per_layer_training_is_charged_exactly_as_flat_and_logs_its_clipped_share(caplog):
    flat = DPSGDConfig(noise_multiplier=1.3, max_grad_norm=1e-6, patients_per_step=2, steps_per_round=3)
    per_layer = dataclasses.replace(flat, clipping="per_layer")
    results = {}
    for config in (flat, per_layer):
        torch.manual_seed(0)
        model = build_model("unet3d_tiny_instancenorm")
        before = torch.cat([p.detach().flatten().clone() for p in model.parameters()])
        optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
        with caplog.at_level("INFO", logger="fedseg3d.training.dpsgd"):
            _, mechanism, accountant = train_dpsgd(
                model, patients(4), PREPROCESSING, config, optimizer, torch.device("cpu"), seed=0
            )
        after = torch.cat([p.detach().flatten() for p in model.parameters()])
        results[config.clipping] = (tuple(mechanism), accountant.history, after - before)
    assert results["flat"][:2] == results["per_layer"][:2] == ((1.3, 0.5, 3), [(1.3, 0.5, 3)])
    assert not torch.equal(results["flat"][2], results["per_layer"][2]), "per-layer clipping changed nothing"
    [message] = [r.getMessage() for r in caplog.records if "per-layer clipping" in r.getMessage()]
    # A 1e-6 clip cuts every tensor whose gradient is not zero; the conv biases just before an instance norm have
    # none (the norm subtracts them out), so not every patient-tensor gradient is clipped.
    share = int(message.split("clipping: ")[1].split("%")[0])
    assert 50 < share < 100
    assert f"sqrt({len(list(model.parameters()))} tensors)" in message


def test_an_unknown_clipping_mode_is_refused_naming_the_field():
    for bad in ("perlayer", "", None, 1):
        with pytest.raises(ValueError, match="dp_sgd.clipping must be one of \\['flat', 'per_layer'\\]"):
            DPSGDConfig(clipping=bad)
    assert DPSGDConfig.from_dict({"clipping": "per_layer"}).clipping == "per_layer"
