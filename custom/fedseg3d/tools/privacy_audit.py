"""Membership-inference audit of a finished federated job, site by site, for a privacy officer.

For each site it runs the loss-threshold attack (``fedseg3d.privacy.membership_audit``) with the site's training
cases as members and its validation (held-out) cases as non-members, against two models:

* ``global``: the job's final global model (``FL_global_model.pt``) as the site uses it. In FedBN the server never
  holds batch norm, so the global weights are paired with the site's own batch-norm state (FedBN's evaluation
  protocol); in FedAvg the global model is used as is.
* ``local``: the site's final local model (``site_models/local_model.pt``); its shared part leaves the site in
  cross-site evaluation.

It prints one row per site and model, with the epsilon the job's results record for that site (when the job was a
DP job) next to it.

Writes the table to standard output and, with ``--json FILE``, every row to FILE.

Example:
    fedseg3d audit --run-dir workspace/sim/unet3d_fedbn --sites-root data/synthetic \
        [--sites site-1,site-2] [--site-models DIR] [--json audit.json]

``--run-dir`` is a simulator workspace or a downloaded POC job result; in POC the sites' local models stay in the
sites' own workspaces, so pass ``--site-models`` (searched for ``app_<site>/site_models/local_model.pt``).
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import re
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from fedseg3d.data.datalist import load_datalist
from fedseg3d.data.site_config import SiteConfig
from fedseg3d.data.task import parse_class_names
from fedseg3d.data.transforms import PreprocessConfig
from fedseg3d.models.local_state import load_shared_state
from fedseg3d.privacy.membership_audit import AuditResult, audit_model
from fedseg3d.training.site_trainer import SiteTrainer, TrainingConfig

logger = logging.getLogger(__name__)

CLIENT_CONFIG = "config_fed_client.json"
GLOBAL_MODEL = "FL_global_model.pt"
LOCAL_MODEL = Path("site_models") / "local_model.pt"
PRIVACY_RECORDS = "privacy.jsonl"
_VAR = re.compile(r"^\{(\w+)\}$")


@dataclass(frozen=True)
class JobSetup:
    """What the audit needs from the job's client config to rebuild the sites' models and data exactly."""

    class_names: dict[int, str]
    preprocessing: PreprocessConfig
    training: TrainingConfig
    config_path: Path


def _resolve(value: Any, variables: dict[str, Any]) -> Any:
    """FLARE's ``{var}`` substitution, for the whole-string case the job configs use."""
    if isinstance(value, dict):
        return {k: _resolve(v, variables) for k, v in value.items()}
    if isinstance(value, list):
        return [_resolve(v, variables) for v in value]
    if isinstance(value, str) and (match := _VAR.match(value)) and match.group(1) in variables:
        return variables[match.group(1)]
    return value


def load_job_setup(run_dir: Path) -> JobSetup:
    """Find the job's client config under ``run_dir`` and read the learner's class names, preprocessing, training.

    Raises:
        FileNotFoundError: no client config under ``run_dir``.
        ValueError: no component with ``class_names``, ``preprocessing`` and ``training`` arguments.
    """
    configs = sorted(Path(run_dir).rglob(CLIENT_CONFIG))
    if not configs:
        raise FileNotFoundError(f"{run_dir}: no {CLIENT_CONFIG} found (is this a simulator workspace or job result?)")
    path = configs[0]
    raw = json.loads(path.read_text())
    variables = {k: v for k, v in raw.items() if not isinstance(v, list | dict)}
    for component in raw.get("components", []):
        args = _resolve(component.get("args", {}), variables)
        if {"class_names", "preprocessing", "training"} <= set(args):
            training = {k: v for k, v in args["training"].items() if k in TrainingConfig.__dataclass_fields__}
            return JobSetup(
                class_names=parse_class_names(args["class_names"]),
                preprocessing=PreprocessConfig.from_dict(args["preprocessing"]),
                training=TrainingConfig(**training),
                config_path=path,
            )
    raise ValueError(f"{path}: no component has 'class_names', 'preprocessing' and 'training' arguments (the learner)")


def _single(paths: list[Path], what: str, where: Path) -> Path:
    if not paths:
        raise FileNotFoundError(f"{where}: no {what} found")
    if len(paths) > 1:
        raise ValueError(f"{where}: several {what} found ({[str(p) for p in paths]}); point at one job's results")
    return paths[0]


def load_state(path: Path) -> dict[str, torch.Tensor]:
    """A state dict from a FLARE persistor checkpoint (``{"model": ...}``) or a plain ``torch.save``-d one.

    Opacus wraps a model as ``_module``; that prefix is stripped so the keys match the plain network.
    """
    state = torch.load(path, map_location="cpu", weights_only=True)
    if isinstance(state, dict) and isinstance(state.get("model"), dict):
        state = state["model"]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ValueError(f"{path}: not a model state dict")
    return {k.removeprefix("_module."): v for k, v in state.items()}


def find_global_model(run_dir: Path) -> Path:
    return _single(sorted(Path(run_dir).rglob(GLOBAL_MODEL)), GLOBAL_MODEL, run_dir)


def find_local_model(site_models_root: Path, site: str) -> Path:
    found = sorted(Path(site_models_root).rglob(f"app_{site}/{LOCAL_MODEL}"))
    return _single(found, f"app_{site}/{LOCAL_MODEL}", site_models_root)


def find_sites(run_dir: Path) -> list[str]:
    """Sites that trained in this run: those with an ``app_<site>`` folder (other than the server's)."""
    names = {p.name.removeprefix("app_") for p in Path(run_dir).rglob("app_*") if p.is_dir()}
    return sorted(names - {"server"})


def find_epsilons(run_dir: Path) -> dict[str, dict[str, Any]]:
    """Each site's cumulative epsilon as the job's results record it; empty for a non-private job.

    Reads ``fedseg3d/privacy.jsonl`` (written by the server's ``ContributionLog`` from what each DP site declared
    with its update) and keeps each site's latest round: epsilon, delta, the protected unit (``site_update`` or
    ``patient``) and the scope (``site_ledger``: the site's lifetime total; otherwise this job only).
    """
    found: dict[str, dict[str, Any]] = {}
    for path in sorted(Path(run_dir).rglob(PRIVACY_RECORDS)):
        for number, line in enumerate(path.read_text().splitlines(), start=1):
            try:
                record = json.loads(line)
                site, round_ = record["site"], int(record["round"])
                entry = {"epsilon": float(record["epsilon"]), "delta": record.get("delta"), "unit": record.get("unit")}
            except (json.JSONDecodeError, KeyError, TypeError, ValueError) as err:
                raise ValueError(f"{path}:{number}: not a privacy record with site, round and epsilon ({err})") from err
            entry["scope"] = record.get("scope")
            if site not in found or round_ >= found[site]["round"]:
                found[site] = {**entry, "round": round_}
    return found


def audit_site(
    site: str,
    setup: JobSetup,
    sites_root: Path,
    global_state: dict[str, torch.Tensor],
    local_state: dict[str, torch.Tensor] | None,
    device: str,
    resamples: int,
) -> dict[str, AuditResult]:
    """Run the attack at one site against the global model (with the site's local state) and its local model."""
    config = SiteConfig.from_file(Path(sites_root) / site / "site.json", site_name=site)
    datalist = load_datalist(config.datalist, config.data_root, label_names=setup.class_names)
    trainer = SiteTrainer(
        site_name=site,
        datalist=datalist,
        class_names=setup.class_names,
        preprocessing=setup.preprocessing,
        training=setup.training,
        output_dir=Path("unused"),
        device=device,
        skip_bad_cases=config.skip_bad_cases,
    )
    model, split = trainer.model, trainer.split
    if split.local and local_state is None and setup.training.keep_batchnorm_local:
        raise FileNotFoundError(
            f"{site}: the job keeps normalisation layers at the site but no local model was found; the global model "
            f"needs the site's own"
        )
    results = {}
    if local_state is not None:
        model.load_state_dict(local_state)
        results["local"] = _audit(trainer, resamples)
    load_shared_state(model, split, {k: v.numpy() for k, v in global_state.items()})
    results["global"] = _audit(trainer, resamples)
    return dict(sorted(results.items()))


def _audit(trainer: SiteTrainer, resamples: int) -> AuditResult:
    return audit_model(
        trainer.model,
        trainer.train_cases.items,
        trainer.val_cases.items,
        trainer.device,
        trainer.preprocessing.roi_size,
        resamples=resamples,
    )


def format_table(rows: list[dict[str, Any]]) -> str:
    """Fixed-width table: one row per site and model."""
    header = (
        f"{'site':<8}{'model':<8}{'members':>8}{'non-mem':>8}{'AUC':>7}{'95% CI':>15}"
        f"{'loss mem':>10}{'loss non':>10}{'epsilon':>10}  unit"
    )
    lines = [header, "-" * len(header)]
    for row in rows:
        eps = row.get("epsilon")
        eps_text = "-" if eps is None else ("inf" if math.isinf(eps) else f"{eps:.3g}")
        ci = f"[{row['auc_low']:.2f}, {row['auc_high']:.2f}]"
        lines.append(
            f"{row['site']:<8}{row['model']:<8}{row['n_members']:>8}{row['n_nonmembers']:>8}{row['auc']:>7.3f}"
            f"{ci:>15}{row['member_loss']:>10.4f}{row['nonmember_loss']:>10.4f}{eps_text:>10}  {row.get('unit') or '-'}"
        )
    return "\n".join(lines)


def run_audit(
    run_dir: Path,
    sites_root: Path,
    sites: list[str] | None = None,
    site_models: Path | None = None,
    device: str = "cpu",
    resamples: int = 1000,
) -> list[dict[str, Any]]:
    """Audit every site of a finished run and return the table's rows (also what ``--json`` writes)."""
    setup = load_job_setup(run_dir)
    global_state = load_state(find_global_model(run_dir))
    sites = sites or find_sites(run_dir)
    if not sites:
        raise ValueError(f"{run_dir}: no app_<site> folders found; pass --sites")
    epsilons = find_epsilons(run_dir)
    rows = []
    for site in sites:
        try:
            local_path = find_local_model(site_models or run_dir, site)
        except FileNotFoundError:
            local_path = None
        local_state = load_state(local_path) if local_path else None
        for model_name, result in audit_site(
            site, setup, sites_root, global_state, local_state, device, resamples
        ).items():
            rows.append({"site": site, "model": model_name, **result.as_dict(), **epsilons.get(site, {})})
    return rows


def main(argv: list[str] | None = None, prog: str | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog=prog, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--run-dir", type=Path, required=True, help="simulator workspace or downloaded job result")
    parser.add_argument("--sites-root", type=Path, required=True, help="folder with <site>/site.json per site")
    parser.add_argument("--sites", default=None, help="comma-separated sites (default: those that ran)")
    parser.add_argument("--site-models", type=Path, default=None, help="where app_<site>/site_models live (POC)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--resamples", type=int, default=1000, help="bootstrap resamples for the AUC interval")
    parser.add_argument("--json", type=Path, default=None, help="also write the rows as JSON here")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr)
    rows = run_audit(
        args.run_dir,
        args.sites_root,
        args.sites.split(",") if args.sites else None,
        args.site_models,
        args.device,
        args.resamples,
    )
    print(f"Loss-threshold membership attack (Yeom et al. 2018) on {args.run_dir}:")
    print(format_table(rows))
    print("AUC 0.5: the loss tells nothing about membership; 1.0: every training case is recognisable.")
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2) + "\n")


if __name__ == "__main__":
    main()
