"""Where a site's deployed model came from: the facts an exported bundle records, gathered from a finished job.

Two places hold them, and the export reads both:

- the site's ``site_models/models.json`` (always at hand at the site): the job id, the site, which file is deployed
  (``best_model.pt`` copies the site's best global model with its own batch norm, or its best own model), its round
  and its validation Dice at this site;
- the server's job result (optional; the simulator workspace's ``server/<job>`` or a downloaded POC job result):
  ``fedseg3d/contributions.jsonl`` says which sites' updates the server accepted in which round and what each site
  measured for the round's global model before training (``initial_metrics``); ``cross_site_val/
  cross_val_results.json`` has every site's Dice of the final global model and of each site's final own model;
  ``fedseg3d/privacy.jsonl`` has the cumulative epsilon each site declared with each release (DP jobs only).

Rounds follow ``models.json``: a global model of round ``r`` is the one the sites received at the start of round
``r`` (0-based), i.e. after ``r`` aggregations; round ``num_rounds`` is the job's final global model. An own model of
round ``r`` is the site's model after training in round ``r``.
"""

from __future__ import annotations

import json
import math
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from fedseg3d.inference.loading import ModelLoadError
from fedseg3d.training.site_models import BEST, BEST_GLOBAL, BEST_LOCAL, INDEX, LAST_LOCAL

# The server's record files (``fedseg3d.server.contribution_log`` writes them; a test keeps the names equal). Named
# here because that module is a FLARE component: reading a finished job's records needs no nvflare import.
OUTPUT_SUBDIR = "fedseg3d"
CONTRIBUTIONS_FILE = "contributions.jsonl"
PRIVACY_FILE = "privacy.jsonl"

CROSS_SITE = Path("cross_site_val") / "cross_val_results.json"
FINAL_GLOBAL = "SRV_FL_global_model.pt"
DICE = "val_mean_dice"


def deployed_file(index: Path) -> tuple[str, dict[str, Any], dict[str, Any]]:
    """Which best file ``best_model.pt`` copies, its ``models.json`` entry, and the whole ``models`` section.

    Raises:
        ModelLoadError: naming ``index``: unreadable, or ``best_model.pt`` matches neither best entry.
    """
    try:
        models = json.loads(index.read_text())["models"]
        deployed = models[BEST]
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise ModelLoadError(index, f"cannot tell which model is deployed ({type(err).__name__}: {err})") from err
    # models.json says "a copy of <file>"; a file whose round and Dice match is the fallback.
    named = [name for name in (BEST_GLOBAL, BEST_LOCAL) if str(deployed.get("what", "")).endswith(name)]
    for name in named or [BEST_GLOBAL, BEST_LOCAL]:
        entry = models.get(name, {})
        if entry.get("round") == deployed.get("round") and entry.get(DICE) == deployed.get(DICE):
            return name, deployed, models
    raise ModelLoadError(index, f"'{BEST}' matches neither '{BEST_GLOBAL}' nor '{BEST_LOCAL}'")


def find_server_files(result_dir: Path) -> dict[str, Path]:
    """The server's record files inside a job result or a simulator workspace (the cross-site and privacy files
    may be absent).

    Raises:
        ModelLoadError: no ``contributions.jsonl`` under ``result_dir``, or several (several jobs: point at one).
    """
    found = sorted(Path(result_dir).rglob(f"{OUTPUT_SUBDIR}/{CONTRIBUTIONS_FILE}"))
    if not found:
        raise ModelLoadError(result_dir, f"no {OUTPUT_SUBDIR}/{CONTRIBUTIONS_FILE}: not a fedseg3d server job result")
    if len(found) > 1:
        raise ModelLoadError(result_dir, f"holds several job results ({', '.join(map(str, found))}): point at one")
    run_dir = found[0].parent.parent
    files = {"contributions": found[0], "run_dir": run_dir}
    for key, rel in (("cross_site", CROSS_SITE), ("privacy", Path(OUTPUT_SUBDIR) / PRIVACY_FILE)):
        if (run_dir / rel).is_file():
            files[key] = run_dir / rel
    return files


def _jsonl(path: Path) -> list[dict[str, Any]]:
    try:
        return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    except (OSError, ValueError) as err:
        raise ModelLoadError(path, f"unreadable record ({type(err).__name__}: {err})") from err


def _finite(value: Any) -> float | None:
    return float(value) if isinstance(value, int | float) and math.isfinite(value) else None


def server_provenance(
    files: dict[str, Path], site: str, kind: str, model_round: int, final_own: bool = False
) -> dict[str, Any]:
    """What the server's records say about the model ``kind`` (``best_global_model.pt`` or
    ``best_local_model.pt``) of round ``model_round`` deployed at ``site``; ``final_own``: an own model that is the
    site's last one (the one cross-site evaluation scored at the other sites)."""
    records = _jsonl(files["contributions"])
    accepted = [r for r in records if r.get("return_code") == "OK" and r.get("data_kind")]
    num_rounds = max((r["num_rounds"] for r in records if isinstance(r.get("num_rounds"), int)), default=None)
    # A global model of round r holds the updates of rounds < r; an own model of round r is that global model
    # trained further at this site alone.
    last = model_round - 1
    trained_by = sorted({r["site"] for r in accepted if isinstance(r.get("round"), int) and r["round"] <= last})
    if kind == BEST_LOCAL:
        trained_by = sorted({*trained_by, site})
    matrix = json.loads(files["cross_site"].read_text()) if "cross_site" in files else {}
    dice: dict[str, float | None] = {}
    if kind == BEST_GLOBAL and num_rounds is not None and model_round >= num_rounds:
        how = "cross-site evaluation of the final global model, each site with its own batch norm"
        dice = {s: _finite(m.get(FINAL_GLOBAL, {}).get(DICE)) for s, m in matrix.items()}
    elif kind == BEST_GLOBAL:
        how = f"the global model of round {model_round} validated by each site before training (its own batch norm)"
        at_round = [r for r in records if r.get("round") == model_round]
        dice = {r["site"]: _finite((r.get("initial_metrics") or {}).get(DICE)) for r in at_round}
    elif final_own:
        how = f"{site}'s final own model in cross-site evaluation, each site with its own batch norm"
        dice = {s: _finite(m.get(site, {}).get(DICE)) for s, m in matrix.items()}
    else:
        how = f"{site}'s own model of round {model_round}: no other site evaluated it, only {site}'s Dice is known"
    privacy = {}
    releases = _jsonl(files["privacy"]) if "privacy" in files else []
    for release in releases:
        # The releases that went into the model: the global rounds before it, and an own model's own round too.
        upto = model_round if kind == BEST_LOCAL and release.get("site") == site else last
        if isinstance(release.get("round"), int) and release["round"] <= upto:
            keep = {k: release.get(k) for k in ("round", "epsilon", "delta", "unit", "scope")}
            if release["site"] not in privacy or privacy[release["site"]]["round"] <= release["round"]:
                privacy[release["site"]] = keep
    return {
        "server_result": str(files["run_dir"].resolve()),
        "num_rounds": num_rounds,
        "trained_by": trained_by,
        "site_val_dice": {s: d for s, d in sorted(dice.items()) if d is not None},
        "site_val_dice_is": how,
        "differential_privacy": privacy or None,
        "dp_job": bool(releases),
    }


def collect_provenance(site_models: Path, server_result: Path | None) -> dict[str, Any]:
    """Provenance of the model ``site_models/best_model.pt`` for an export's metadata.

    Args:
        site_models: the site's ``site_models`` folder.
        server_result: the server's job result or a simulator workspace; ``None`` records the site's facts only.

    Raises:
        ModelLoadError: a file is unreadable, or the server result is not this job's.
    """
    index = Path(site_models) / INDEX
    kind, entry, models = deployed_file(index)
    recipe = json.loads(index.read_text()).get("model", {})
    site = recipe.get("site") or json.loads(index.read_text()).get("site")
    facts: dict[str, Any] = {
        "job_id": recipe.get("job_id"),
        "site": site,
        "deployed": kind,
        "round": entry["round"],
        "val_mean_dice": entry[DICE],
        "exported_at": datetime.now(UTC).isoformat(timespec="seconds"),
    }
    if kind == BEST_LOCAL:
        facts["is_final_own_model"] = models.get(LAST_LOCAL, {}).get("round") == entry["round"]
    if server_result is None:
        facts["trained_by"] = None
        facts["note"] = "no server result given: training sites, their Dice and privacy spent are not recorded"
        return facts
    files = find_server_files(server_result)
    meta = files["run_dir"] / "meta.json"
    job_id = json.loads(meta.read_text()).get("job_id") if meta.is_file() else None
    if job_id and facts["job_id"] and job_id != facts["job_id"]:
        raise ModelLoadError(meta, f"job_id is '{job_id}' but the site's model comes from job '{facts['job_id']}'")
    server = server_provenance(files, site, kind, int(entry["round"]), bool(facts.get("is_final_own_model")))
    # The site's own figure is of exactly this file (its batch norm recalibrated as saved): it takes precedence.
    server["site_val_dice"] = dict(sorted({**server["site_val_dice"], site: entry[DICE]}.items()))
    return {**facts, **server}
