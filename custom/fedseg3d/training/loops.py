"""Plain PyTorch/MONAI training and evaluation loops: no FLARE here, so they run and test standalone."""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from monai.data import DataLoader
from monai.inferers import sliding_window_inference

from fedseg3d.training.dice import ClassDiceAccumulator
from fedseg3d.training.loss import PresentClassDiceCELoss

logger = logging.getLogger(__name__)

# Sliding-window inference: windows per forward pass and their overlap (batch-norm recalibration cuts the same tiles).
SW_BATCH_SIZE = 4
SW_OVERLAP = 0.25


@dataclass(frozen=True)
class TrainStats:
    """What one local training run did, for logs, TensorBoard and the benchmark."""

    mean_loss: float
    steps: int
    patches: int
    seconds: float


@dataclass(frozen=True)
class EvalResult:
    """Dice per foreground class and their mean, over a set of cases."""

    mean_dice: float
    class_dice: dict[str, float]
    cases: int

    def as_metrics(self, prefix: str = "val_") -> dict[str, float]:
        metrics = {f"{prefix}mean_dice": self.mean_dice}
        metrics.update({f"{prefix}dice_{name}": value for name, value in self.class_dice.items()})
        return metrics


def make_loss(class_weights: Sequence[float] = ()) -> torch.nn.Module:
    """Dice + cross-entropy: Dice handles the class imbalance of small structures, CE keeps early gradients sane.

    Dice counts only the classes present in each patch, each patch's loss is its own (``fedseg3d.training.loss``),
    so the batch loss is a mean of per-patch terms as DP-SGD needs. ``class_weights`` (one per class, background
    first; empty for uniform) scale each class's Dice and cross-entropy terms.
    """
    return PresentClassDiceCELoss(class_weights)


def train_local(
    model: torch.nn.Module,
    loader: DataLoader,
    optimizer: torch.optim.Optimizer,
    device: torch.device,
    *,
    epochs: int = 1,
    max_steps: int = 0,
    amp: bool = False,
    should_stop: Callable[[], bool] = lambda: False,
    loss_fn: torch.nn.Module | None = None,
    progress: Callable[[int, float], None] | None = None,
    regulariser: Callable[[torch.nn.Module], torch.Tensor] | None = None,
) -> TrainStats:
    """Train for ``epochs`` passes over ``loader``, or exactly ``max_steps`` steps when that is positive.

    ``regulariser(model)`` is added to the loss of every step when given (FedProx's proximal term); the reported
    ``mean_loss`` is the task loss alone, so it stays comparable between methods.

    Raises:
        FloatingPointError: the loss became NaN or infinite (a diverged site must not send garbage).
    """
    loss_fn = (loss_fn or make_loss()).to(device)
    scaler = torch.amp.GradScaler(device.type, enabled=amp)
    model.train()
    started = time.perf_counter()
    steps, patches, loss_sum = 0, 0, 0.0
    epoch = 0
    while (max_steps > 0 and steps < max_steps) or (max_steps <= 0 and epoch < epochs):
        for batch in loader:
            if should_stop() or (max_steps > 0 and steps >= max_steps):
                break
            images, labels = batch["image"].to(device), batch["label"].to(device)
            optimizer.zero_grad(set_to_none=True)
            with torch.autocast(device.type, enabled=amp):
                loss = loss_fn(model(images), labels)
            if not math.isfinite(loss.item()):
                raise FloatingPointError(f"training loss is {loss.item()} at step {steps}: local training diverged")
            total = loss if regulariser is None else loss + regulariser(model)
            scaler.scale(total).backward()
            scaler.step(optimizer)
            scaler.update()
            steps += 1
            patches += images.shape[0]
            loss_sum += loss.item()
            if progress is not None:
                progress(steps, loss.item())
        epoch += 1
        if should_stop():
            break
    return TrainStats(
        mean_loss=loss_sum / max(steps, 1), steps=steps, patches=patches, seconds=time.perf_counter() - started
    )


@torch.no_grad()
def evaluate(
    model: torch.nn.Module,
    items: list[dict],
    device: torch.device,
    roi_size: tuple[int, int, int],
    class_names: dict[int, str],
    *,
    amp: bool = False,
    should_stop: Callable[[], bool] = lambda: False,
) -> EvalResult:
    """Whole-volume Dice with sliding-window inference, per foreground class. A class absent from a case's ground
    truth counts 0 for that case when predicted and is left out when not (``fedseg3d.training.dice``): no NaN, no
    free 1.0; a class that never counted is left out of ``class_dice`` and of the mean."""
    dice = ClassDiceAccumulator(class_names)
    model.eval()
    for item in items:
        if should_stop():
            break
        image = item["image"].unsqueeze(0).to(device)
        label = item["label"].unsqueeze(0).to(device)
        with torch.autocast(device.type, enabled=amp):
            logits = sliding_window_inference(
                image, roi_size, sw_batch_size=SW_BATCH_SIZE, predictor=model, overlap=SW_OVERLAP
            )
        dice.add(torch.argmax(logits.float(), dim=1), label[:, 0].long())
    class_dice = dice.result()
    mean_dice = sum(class_dice.values()) / len(class_dice) if class_dice else float("nan")
    return EvalResult(mean_dice=mean_dice, class_dice=class_dice, cases=len(items))
