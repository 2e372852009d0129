"""Where a site's privacy budget file is: one rule shared by the update filter and the DP-SGD learner.

The budget is a site setting, never a job setting (the server writes the job). Order of lookup:

1. ``<site workspace>/local/privacy_budget.json`` (a deployed site; the caller passes its ``local/`` folder);
2. else, when ``FEDSEG3D_PRIVACY_DIR`` is set, ``$FEDSEG3D_PRIVACY_DIR/<site name>/privacy_budget.json``. The
   simulator's site workspaces are thrown away after each run, so ``fedseg3d.tools.simulate --privacy-dir`` points
   this variable at a folder that outlives the runs. The variable being set while the file is missing is an error;
3. else ``None``: no budget configured (the caller decides whether that is an error).

Plain Python (no nvflare), so it is unit-testable and usable below the FLARE adapters.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from fedseg3d.privacy.ledger import BUDGET_FILE_NAME, SiteBudget, load_site_privacy_budget

PRIVACY_DIR_ENV = "FEDSEG3D_PRIVACY_DIR"


def find_site_budget(site_config_dir: str | os.PathLike | None, site_name: str | None) -> SiteBudget | None:
    """Load the site's budget by the rule in the module doc.

    Args:
        site_config_dir: the site's ``local/`` folder, or ``None`` outside a FLARE run.
        site_name: the site's FLARE identity, used under ``$FEDSEG3D_PRIVACY_DIR``.

    Raises:
        FileNotFoundError: ``FEDSEG3D_PRIVACY_DIR`` is set but the site's budget file is not there.
        RuntimeError: ``FEDSEG3D_PRIVACY_DIR`` is set but the site name cannot name a folder.
        PrivacyLedgerError: the budget file is malformed.
    """
    if site_config_dir is not None and (Path(site_config_dir) / BUDGET_FILE_NAME).is_file():
        return load_site_privacy_budget(Path(site_config_dir) / BUDGET_FILE_NAME)
    env_dir = os.environ.get(PRIVACY_DIR_ENV)
    if env_dir:
        if not site_name or site_name in (".", "..") or "/" in site_name or os.sep in site_name:
            raise RuntimeError(f"{PRIVACY_DIR_ENV} is set but the site name {site_name!r} cannot name a folder")
        path = Path(env_dir) / site_name / BUDGET_FILE_NAME
        if not path.is_file():
            raise FileNotFoundError(f"{PRIVACY_DIR_ENV}={env_dir} is set but {path} does not exist")
        return load_site_privacy_budget(path)
    return None


def where_looked(site_config_dir: str | os.PathLike | None) -> str:
    """Human-readable list of the places ``find_site_budget`` looks, for 'no budget found' messages."""
    local = Path(site_config_dir) / BUDGET_FILE_NAME if site_config_dir is not None else "(no site workspace)"
    return f"{local} and ${PRIVACY_DIR_ENV}/<site>/{BUDGET_FILE_NAME}"


def write_site_budget(
    folder: str | os.PathLike, epsilon_budget: float, delta: float, accountant: str = "rdp", overwrite: bool = False
) -> Path:
    """Write ``<folder>/privacy_budget.json`` (what a site admin does by hand); validated by loading it back.

    Returns:
        The file's path. An existing file is left alone unless ``overwrite``: a budget is the site's decision.
    """
    path = Path(folder) / BUDGET_FILE_NAME
    if path.exists() and not overwrite:
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    payload = {"epsilon_budget": epsilon_budget, "delta": delta, "accountant": accountant}
    path.write_text(json.dumps(payload, indent=2) + "\n")
    load_site_privacy_budget(path)
    return path
