"""What the Dice term does with classes a training patch lacks: MONAI's DiceCELoss against fedseg3d's loss.

1. A sweep on one 32^3 patch of the five-class real task that holds background, spleen and liver (stomach and
   pancreas absent), with logits that pick the true class everywhere by a margin m: the loss a correct prediction
   still pays, and the size of the gradient that reaches the present classes' Dice.
2. The real sites' training patches, cropped as the stock job crops them: how many classes each lacks, and the loss
   a correct prediction at margin 8 pays there under each loss (its floor, which differs from site to site).

Run from the repository root: ``PYTHONPATH=custom python research/absent_class_loss/measure.py --real data/real``
(``fedseg3d data real --out data/real`` builds the sites; without ``--real`` only the sweep runs).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from monai.losses import DiceCELoss, DiceLoss

from fedseg3d.data.datalist import load_datalist
from fedseg3d.data.dataset import CasePreparer, prepare_cases
from fedseg3d.data.site_config import SiteConfig
from fedseg3d.data.transforms import PreprocessConfig, train_augment_transform
from fedseg3d.training.loss import PresentClassDiceCELoss

CLASSES = 5


def sweep_patch() -> torch.Tensor:
    """(1, 1, 32, 32, 32): spleen in one corner, liver in the middle, the rest background."""
    label = torch.zeros((1, 1, 32, 32, 32), dtype=torch.long)
    label[..., 4:12, 4:12, 4:12] = 1
    label[..., 14:28, 12:28, 10:26] = 2
    return label


def confident(label: torch.Tensor, margin: float) -> torch.Tensor:
    logits = margin * torch.nn.functional.one_hot(label[:, 0], CLASSES).movedim(-1, 1).float()
    return logits.requires_grad_(True)


def loss_and_present_grad(loss_fn, label: torch.Tensor, margin: float) -> tuple[float, float]:
    """(loss, norm of its gradient on the present classes' logits) for a correct prediction at ``margin``."""
    logits = confident(label, margin)
    loss = loss_fn(logits, label)
    loss.backward()
    present = sorted(int(c) for c in label.unique())
    return float(loss.detach()), float(logits.grad[:, present].norm())


def sweep() -> list[dict]:
    label = sweep_patch()
    rows = []
    for margin in (2, 4, 6, 8, 10, 12, 16, 20, 24, 28):
        monai_dice, _ = loss_and_present_grad(DiceLoss(to_onehot_y=True, softmax=True), label, margin)
        monai, monai_grad = loss_and_present_grad(DiceCELoss(to_onehot_y=True, softmax=True), label, margin)
        ours, ours_grad = loss_and_present_grad(PresentClassDiceCELoss(), label, margin)
        rows.append(
            {
                "margin": margin,
                "monai_dice_term": round(monai_dice, 4),
                "monai_dice_ce": round(monai, 4),
                "ours_dice_ce": round(ours, 4),
                "monai_grad_on_present": float(f"{monai_grad:.3g}"),
                "ours_grad_on_present": float(f"{ours_grad:.3g}"),
            }
        )
    return rows


def real_floors(root: Path, margin: float = 8.0, draws: int = 40) -> list[dict]:
    """Per real site: absent classes per training patch, and each loss's value on a correct prediction there."""
    built = json.loads((root / "sites.json").read_text())
    class_names = {int(k): v for k, v in built["classes"].items()}
    rows = []
    for summary in built["sites"]:
        site = SiteConfig.from_file(root / summary["site_name"] / "site.json")
        preprocessing = site.preprocessing_for(PreprocessConfig()).for_classes(class_names)
        relabel = site.label_map.for_classes(class_names)
        datalist = load_datalist(site.datalist, site.data_root, class_names)
        preparer = CasePreparer(preprocessing, num_classes=len(class_names), relabel=relabel)
        items = prepare_cases(datalist.training, preparer, False, "training").items
        augment = train_augment_transform(preprocessing)
        augment.set_random_state(seed=0)
        absent, monai, ours = [], [], []
        for draw in range(draws):
            for patch in augment(items[draw % len(items)]):
                label = patch["label"].unsqueeze(0).long()
                absent.append(CLASSES - len(label.unique()))
                logits = confident(label, margin).detach()
                monai.append(float(DiceCELoss(to_onehot_y=True, softmax=True)(logits, label)))
                ours.append(float(PresentClassDiceCELoss()(logits, label)))
        rows.append(
            {
                "site": summary["site_name"],
                "patches": len(absent),
                "mean_absent_classes": round(sum(absent) / len(absent), 2),
                "monai_floor_mean": round(sum(monai) / len(monai), 4),
                "monai_floor_range": [round(min(monai), 4), round(max(monai), 4)],
                "ours_floor_mean": round(sum(ours) / len(ours), 4),
            }
        )
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--real", type=Path, default=None, help="sites built by `fedseg3d data real`")
    args = parser.parse_args()
    result = {"sweep": sweep()}
    if args.real is not None:
        result["real_sites"] = real_floors(args.real)
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
