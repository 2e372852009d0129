"""The segmentation tasks the benchmark runs: where each task's sites come from and the job knobs that describe it.

One description per task, passed to every method: the federated jobs get ``overrides`` through ``build-jobs --set``,
local-only and pooled read the same built job (``benchmarks.config.centralised_settings``), so no method can train a
different task. Knob names are the agreed job knobs (docs/job_knobs.md): ``class_names``, ``class_loss_weights``,
``roi_size``, ``samples_per_volume``, ``local_steps`` ...
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fedseg3d.data.synthetic import generate_sites

# Real task: the four abdominal organs the real sites label in both CT and MR (docs/real_data.md).
REAL_CLASSES = ["background", "spleen", "liver", "stomach", "pancreas"]


@dataclass(frozen=True)
class Task:
    """A segmentation task and where its sites come from.

    Attributes:
        name: ``synthetic`` or ``real``.
        overrides: job knobs every method gets (``build-jobs --set``); empty keeps the stock job's task.
        generated: True when the benchmark draws the sites itself for every seed (synthetic); False when they are
            read from a folder built beforehand (``fedseg3d data real --out DIR``) and the same for every seed.
    """

    name: str
    overrides: dict[str, Any] = field(default_factory=dict)
    generated: bool = True


TASKS = {
    "synthetic": Task("synthetic"),
    # One subject per real site: an epoch is a single case, so local work is counted in steps (docs/real_data.md).
    "real": Task("real", {"class_names": REAL_CLASSES, "class_loss_weights": []}, generated=False),
}


def get_task(name: str) -> Task:
    """Raises: ValueError: an unknown task name."""
    if name not in TASKS:
        raise ValueError(f"unknown --data {name!r}; choose one of {sorted(TASKS)}")
    return TASKS[name]


def synthetic_sites(
    root: Path, sites: int, seed: int, fov_mm: float, cases_scale: float, val_cases: int | None
) -> Path:
    """Draw the synthetic sites for one seed under ``root/seed-<seed>`` (a seed is a fresh draw of the consortium's
    patients and scanners, so the interval over seeds covers the validation cases as well as training)."""
    out = root / f"seed-{seed}"
    generate_sites(out, n_sites=sites, seed=seed, fov_mm=fov_mm, cases_scale=cases_scale, val_cases=val_cases)
    return out


def real_sites(root: Path, site_names: list[str]) -> Path:
    """Check that ``root`` holds the real sites (``fedseg3d data real --out ROOT``).

    Raises:
        FileNotFoundError: a site's ``site.json`` is missing, naming the command that builds it.
    """
    missing = [s for s in site_names if not (root / s / "site.json").is_file()]
    if missing:
        raise FileNotFoundError(
            f"{root}: no site.json for {missing}; build the real sites first: fedseg3d data real --out {root}"
        )
    return root


def site_modalities(sites_root: Path, site_names: list[str]) -> dict[str, str]:
    """Each site's modality as its own files state it: the site fact ``intensity.mode`` (CT window or MR
    percentiles) when present, else the datalist's ``modality`` field."""
    out = {}
    for site in site_names:
        config = json.loads((sites_root / site / "site.json").read_text())
        mode = (config.get("intensity") or {}).get("mode")
        if mode:
            out[site] = {"ct_window": "CT", "mr_percentile": "MR"}.get(mode, mode)
            continue
        datalist = json.loads((sites_root / site / config.get("datalist", "datalist.json")).read_text())
        out[site] = ",".join(sorted(set((datalist.get("modality") or {}).values()))) or "unknown"
    return out


def odd_modality_site(modalities: dict[str, str]) -> str | None:
    """The one site whose modality no other site shares (the goal's "site whose modality differs"); None when
    there is no single such site (all alike, or several differ)."""
    counts: dict[str, int] = {}
    for modality in modalities.values():
        counts[modality] = counts.get(modality, 0) + 1
    lone = [site for site, modality in modalities.items() if counts[modality] == 1]
    return lone[0] if len(lone) == 1 and len(counts) == 2 else None
