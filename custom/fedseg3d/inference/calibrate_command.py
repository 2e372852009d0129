"""``fedseg3d calibrate``: adapt a federated model to this site with its own labelled cases, never worse.

Refreshes the batch-norm statistics on the site's training images, optionally fine-tunes briefly
(``--fine-tune-steps``), and fits a softmax temperature; it reports Dice and expected calibration error (ECE, MONAI's
``CalibrationErrorMetric``) on the site's validation cases before and after. The adapted network is kept only if
its validation Dice is not worse (tolerance 0); otherwise the original is kept and the report says so. The
temperature changes probabilities only, never the label map. Details: ``fedseg3d.inference.calibration``.

Input: the model (as ``fedseg3d export --model`` takes it: site_models, a job/app folder, a simulator workspace
with ``--site``, or a MONAI bundle) and the site's own config (``site.json`` / ``fedseg3d_site.json``: its datalist,
label map and intensity handling; only its cases are read, nothing leaves the site).

Writes ``--out``: a MONAI bundle (as ``fedseg3d export``) holding the model to deploy, its temperature, and the
report under ``fedseg3d.provenance.local_calibration`` in ``configs/metadata.json``; ``fedseg3d predict`` and
``python -m monai.bundle run`` take it as is. Prints the before/after table.

Example:
    fedseg3d calibrate --model workspace/sim --site site-1 --site-config data/real/site-1/site.json \\
        --out bundles/site-1-calibrated [--fine-tune-steps 20 --learning-rate 1e-4]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

from fedseg3d.data.errors import DataError
from fedseg3d.data.site_config import SiteConfig
from fedseg3d.inference.bundle import export_bundle
from fedseg3d.inference.calibration import calibrate
from fedseg3d.inference.export_command import server_result_in
from fedseg3d.inference.loading import ModelLoadError, find_site_models, is_bundle, load_deployable
from fedseg3d.inference.provenance import collect_provenance


def main(argv: list[str] | None = None, prog: str | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog=prog, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", type=Path, required=True, help="site_models, job/app folder, workspace or bundle")
    parser.add_argument("--site", default=None, help="which site's model, when --model holds several")
    parser.add_argument("--site-config", type=Path, required=True, help="the site's site.json (its own cases)")
    parser.add_argument("--server-result", type=Path, default=None, help="the server's job result, for provenance")
    parser.add_argument("--out", type=Path, required=True, help="the bundle folder to write")
    parser.add_argument("--fine-tune-steps", type=int, default=0, help="optimizer steps of fine-tuning (0: none)")
    parser.add_argument("--learning-rate", type=float, default=1e-4, help="Adam learning rate of the fine-tuning")
    parser.add_argument("--batch-size", type=int, default=2, help="patches per fine-tuning step")
    parser.add_argument("--device", default="auto", help="auto (CUDA when present), cpu or cuda[:N]")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    try:
        model = load_deployable(args.model, site=args.site)
        if not is_bundle(args.model):
            server = args.server_result if args.server_result is not None else server_result_in(args.model)
            folder = find_site_models(args.model, args.site)
            model.provenance = {**model.provenance, **collect_provenance(folder, server)}
        site = SiteConfig.from_file(args.site_config)
        if site.num_threads > 0:  # the site's own CPU share, as in training
            torch.set_num_threads(site.num_threads)
        calibrated, report = calibrate(
            model,
            site,
            fine_tune_steps=args.fine_tune_steps,
            learning_rate=args.learning_rate,
            batch_size=args.batch_size,
            seed=args.seed,
            device=args.device,
        )
    except (ModelLoadError, DataError, ValueError) as err:
        print(f"{parser.prog}: {err}", file=sys.stderr)
        return 1
    print(report.summary())
    out = export_bundle(calibrated, args.out)
    print(f"wrote MONAI bundle {out} (the model to deploy at {report.site}, temperature {calibrated.temperature:.3g})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
