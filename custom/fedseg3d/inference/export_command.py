"""``fedseg3d export``: write the model a site deploys as a MONAI bundle, with where it came from.

The model is the site's ``site_models/best_model.pt``: the best of the site's own models and the job's global models
scored at this site, each with this site's batch norm (FedBN: the global weights with its own normalisation; FedAvg:
the global model). Its recipe (preset, class names, the preprocessing this site trained with) comes from the same
folder's ``models.json``.

Provenance: the site's ``models.json`` gives the job id, the round and the Dice at this site. The server's job
result (``--server-result``: the simulator workspace, or the job result a POC/production admin downloaded with
``nvflare job download``) adds the sites that trained the model, each site's validation Dice of it and the epsilon
each site had spent (DP jobs). Without it the bundle says that these are not recorded. When ``--model`` is a whole
simulator workspace, its server result is used.

Writes ``--out`` (a MONAI bundle: configs/metadata.json, configs/inference.json, models/model.pt, models/model.ts,
docs/README.md) and prints what it wrote. Run the bundle with:
    python -m monai.bundle run --config_file OUT/configs/inference.json --meta_file OUT/configs/metadata.json \\
        --bundle_root OUT --dataset_dir NIFTI_DIR --output_dir LABELS_DIR

Examples:
    fedseg3d export --model workspace/sim --site site-1 --out bundles/site-1
    fedseg3d export --model /opt/site-1/<job_id>/app_site-1 --server-result results/<job_id> --out bundles/site-1
    fedseg3d export --model calibrated/site-1 --out bundles/site-1-calibrated     # after fedseg3d calibrate
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from fedseg3d.inference.bundle import INFERENCE, METADATA, README, TORCHSCRIPT, WEIGHTS, export_bundle
from fedseg3d.inference.loading import ModelLoadError, find_site_models, is_bundle, load_deployable
from fedseg3d.inference.provenance import CONTRIBUTIONS_FILE, OUTPUT_SUBDIR, collect_provenance


def server_result_in(source: Path) -> Path | None:
    """``source`` itself when it holds exactly one server job record (a simulator workspace), else None."""
    found = list(Path(source).rglob(f"{OUTPUT_SUBDIR}/{CONTRIBUTIONS_FILE}"))
    return source if len(found) == 1 else None


def export(model_source: Path, out: Path, site: str | None = None, server_result: Path | None = None) -> Path:
    """Load the site's deployed model, attach its provenance and write the bundle; returns ``out``.

    Raises:
        ModelLoadError: the model or a provenance file cannot be read (the file is named).
    """
    model = load_deployable(model_source, site=site)
    if not is_bundle(model_source):
        folder = find_site_models(model_source, site)
        server = server_result if server_result is not None else server_result_in(model_source)
        model.provenance = {**model.provenance, **collect_provenance(folder, server)}
    return export_bundle(model, out)


def main(argv: list[str] | None = None, prog: str | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog=prog, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--model", type=Path, required=True,
        help="a site's site_models folder, its job/app folder, a simulator workspace (with --site) or a bundle",
    )  # fmt: skip
    parser.add_argument("--site", default=None, help="which site's model, when --model holds several")
    parser.add_argument("--server-result", type=Path, default=None, help="the server's job result, for provenance")
    parser.add_argument("--out", type=Path, required=True, help="the bundle folder to write")
    args = parser.parse_args(argv)
    try:
        out = export(args.model, args.out, args.site, args.server_result)
    except ModelLoadError as err:
        print(f"{parser.prog}: {err}", file=sys.stderr)
        return 1
    meta = json.loads((out / METADATA).read_text())
    facts = meta["fedseg3d"]
    print(f"wrote MONAI bundle {out}:")
    for rel in (METADATA, INFERENCE, WEIGHTS, TORCHSCRIPT, README):
        print(f"  {rel} ({(out / rel).stat().st_size} bytes)")
    print(f"model: {facts['model_preset']}, classes {facts['class_names']}, temperature {facts['temperature']:g}")
    print("provenance: " + json.dumps(facts["provenance"], indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
