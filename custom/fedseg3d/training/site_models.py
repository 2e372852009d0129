"""The models a site keeps for itself, each a complete network it can deploy, chosen by its own validation Dice.

Why per site: the server's ``best_FL_global_model.pt`` is chosen by the mean Dice over all sites and, in FedBN, holds
no site's batch norm at all (sites never send it), so it is neither the best model for any one site nor usable on
its own. Here every file is shared weights and this site's normalisation state *from the same evaluation* (batch
norm recalibrated for those weights), so what scored the Dice is exactly what is saved:

- ``local_model.pt``: the site's model after its last round;
- ``best_local_model.pt``: the site's own model of the round that scored best here;
- ``best_global_model.pt``: the global model of the round that scored best here, with this site's batch norm;
- ``best_model.pt``: whichever of the two best scored higher here: the one to deploy;
- ``models.json``: for each file, the round, the Dice and what it is; and under ``"model"`` the recipe that turns a
  file back into a working model (preset, class names, the preprocessing this site trained with, job id, site), so
  ``fedseg3d.inference.loading`` can apply it to a scan without the job's config.

Files are bare ``state_dict`` checkpoints (``fedseg3d.models.checkpoint.load_checkpoint_state`` reads them).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import shutil
from pathlib import Path
from typing import Any

import torch

from fedseg3d.data.transforms import PreprocessConfig

logger = logging.getLogger(__name__)

LAST_LOCAL = "local_model.pt"
BEST_LOCAL = "best_local_model.pt"
BEST_GLOBAL = "best_global_model.pt"
BEST = "best_model.pt"
INDEX = "models.json"
_WHAT = {
    LAST_LOCAL: "the site's own model after its last round",
    BEST_LOCAL: "the site's own model of the round with the best validation Dice here",
    BEST_GLOBAL: "the global model of the round with the best validation Dice here, with this site's batch norm",
}


RECIPE_KEY = "model"
RECIPE_FIELDS = ("model_preset", "class_names", "preprocessing", "job_id", "site")


def model_recipe(
    model_preset: str, class_names: dict[int, str], preprocessing: PreprocessConfig, job_id: str, site: str
) -> dict[str, Any]:
    """The ``"model"`` section of ``models.json``: what a saved state dict needs to segment a scan as in training.

    ``preprocessing`` is the site's resolved config (its own intensity fact applied), every field written out, so
    prediction never falls back to a default that training did not use.
    """
    fields = dataclasses.asdict(preprocessing)
    return {
        "model_preset": model_preset,
        "class_names": [class_names[i] for i in sorted(class_names)],
        "preprocessing": {k: list(v) if isinstance(v, tuple) else v for k, v in fields.items()},
        "job_id": job_id,
        "site": site,
    }


class SiteModelStore:
    """Keeps a site's last and best models in ``output_dir`` and says which one to deploy.

    Args:
        site_name: for logs.
        output_dir: the site's model folder (created on the first save).
        recipe: the ``"model"`` section of ``models.json`` (``model_recipe``); ``None`` writes none.
    """

    def __init__(self, site_name: str, output_dir: Path, recipe: dict[str, Any] | None = None) -> None:
        self.site_name = site_name
        self.output_dir = Path(output_dir)
        self.recipe = recipe
        self.entries: dict[str, dict] = {}
        self._deployed: tuple[str, int] | None = None  # which best file best_model.pt copies, and its round

    def best_dice(self, name: str) -> float:
        """The Dice of the model saved as ``name`` (``-inf`` when none is)."""
        return self.entries.get(name, {}).get("val_mean_dice", -math.inf)

    def offer_local(self, model: torch.nn.Module, dice: float, current_round: int) -> None:
        """The site's own model after round ``current_round``: saved as the last, and as the best when it is."""
        self._save(LAST_LOCAL, model, dice, current_round)
        if self._better(dice, BEST_LOCAL):
            self._save(BEST_LOCAL, model, dice, current_round)
            logger.info("%s: new best local model (Dice %.4f) at round %d", self.site_name, dice, current_round)
        self._write_index()

    def offer_global(self, model: torch.nn.Module, dice: float, current_round: int) -> None:
        """The global model of round ``current_round`` with this site's batch norm: kept when best here."""
        if self._better(dice, BEST_GLOBAL):
            self._save(BEST_GLOBAL, model, dice, current_round)
            logger.info("%s: new best global model (Dice %.4f) at round %d", self.site_name, dice, current_round)
            self._write_index()

    def _better(self, dice: float, name: str) -> bool:
        return math.isfinite(dice) and dice > self.best_dice(name)

    def _save(self, name: str, model: torch.nn.Module, dice: float, current_round: int) -> None:
        self.output_dir.mkdir(parents=True, exist_ok=True)
        torch.save(model.state_dict(), self.output_dir / name)
        self.entries[name] = {"round": current_round, "val_mean_dice": dice, "what": _WHAT[name]}

    def _write_index(self) -> None:
        """Refresh ``best_model.pt`` (the better of the two best) and ``models.json``."""
        candidates = [name for name in (BEST_LOCAL, BEST_GLOBAL) if name in self.entries]
        index = dict(self.entries)
        if candidates:
            best = max(candidates, key=self.best_dice)
            if self._deployed != (best, self.entries[best]["round"]):  # copy only when the deployable model changed
                shutil.copyfile(self.output_dir / best, self.output_dir / BEST)
                self._deployed = (best, self.entries[best]["round"])
            index[BEST] = {**self.entries[best], "what": f"the model to deploy at this site: a copy of {best}"}
        content: dict[str, Any] = {"site": self.site_name, "models": index}
        if self.recipe is not None:
            content[RECIPE_KEY] = self.recipe
        text = json.dumps(content, indent=2)
        (self.output_dir / INDEX).write_text(text + "\n")
