"""The ``fedseg3d`` command: one entry point, one subcommand for each thing a user runs.

Each subcommand hands its arguments to the ``main(argv, prog)`` of the module that implements it, so every option
is defined once, next to its code, and a module (torch, FLARE) is imported only when its subcommand runs:
``fedseg3d --help`` stays instant. ``fedseg3d COMMAND --help`` says what the command does, what it writes, and
gives an example. Run the commands from the repository checkout: defaults such as ``jobs/``,
``provisioning/project.yml`` and ``data/synthetic`` are relative to it.
"""

from __future__ import annotations

import difflib
import importlib
import sys
from collections.abc import Sequence
from dataclasses import dataclass


@dataclass(frozen=True)
class Command:
    """A subcommand: the module whose ``main(argv, prog)`` runs it, and arguments put before the user's."""

    module: str
    summary: str
    leading: tuple[str, ...] = ()


COMMANDS: dict[str, Command | dict[str, Command]] = {
    "data": {
        "synthetic": Command("fedseg3d.data.synthetic", "write the synthetic multi-site data set (NIfTI/DICOM)"),
        "real": Command("fedseg3d.data.realdata", "build 3 real-scan sites from a pinned PyPI source archive"),
    },
    "build-jobs": Command(
        "fedseg3d.tools.build_jobs", "assemble job folders (config, --set overrides, code) into build/"
    ),
    "simulate": Command("fedseg3d.tools.simulate", "run a built job in the FLARE simulator"),
    "poc": {
        "run": Command("fedseg3d.poc.runner", "run a job on a POC federation on this machine (live Dice progress)"),
        "stop": Command("fedseg3d.poc.control", "stop a running or interrupted POC: processes, port"),
    },
    "resume": Command("fedseg3d.server.resume", "continue a run after a server restart, from its last completed round"),
    "report": Command("fedseg3d.tools.report", "print per-site Dice of a finished job (simulator or POC result)"),
    "privacy-report": Command("fedseg3d.tools.privacy_report", "print what sites spent of their privacy budgets"),
    "audit": Command("fedseg3d.tools.privacy_audit", "membership-inference privacy audit of a finished job"),
    "audit-trail": {
        "verify": Command(
            "fedseg3d.tools.audit_trail", "check a job's hash-chained audit trail; name the first broken link"
        ),
    },
    "pretrain": Command("fedseg3d.tools.pretrain", "pretrain a model on public data for `initial_checkpoint`"),
    "predict": Command(
        "fedseg3d.inference.predict", "segment scans with a site's model: NIfTI labels, DICOM SEG, volumes per class"
    ),
    "provision": Command("fedseg3d.deploy.kits", "signed startup kits with site policies", ("provision",)),
    "add-site": Command("fedseg3d.deploy.kits", "one more hospital's kit from the existing root CA", ("add-site",)),
    "renew": Command("fedseg3d.deploy.kits", "re-issue one participant's certificate", ("renew",)),
    "cert-info": Command("fedseg3d.deploy.kits", "a kit's certificate validity", ("cert-info",)),
    "deploy-local": Command("fedseg3d.deploy.local", "run provisioned kits on localhost and submit a job"),
    "export": Command("fedseg3d.inference.export_command", "a site's deployed model as a MONAI bundle with provenance"),
    "calibrate": Command(
        "fedseg3d.inference.calibrate_command", "adapt a model to this site's data (BN, fine-tune, temperature)"
    ),
}

PROG = "fedseg3d"


def overview(commands: dict[str, Command | dict[str, Command]] = COMMANDS, prog: str = PROG) -> str:
    """The top-level help: every subcommand with its one-line summary."""
    rows = []
    for name, entry in commands.items():
        if isinstance(entry, Command):
            rows.append((name, entry.summary))
        else:
            rows.extend((f"{name} {sub}", command.summary) for sub, command in entry.items())
    width = max(len(name) for name, _ in rows)
    lines = [f"usage: {prog} COMMAND [options]   ({prog} COMMAND --help for what it does and writes)", "", "commands:"]
    lines += [f"  {name:<{width}}  {summary}" for name, summary in rows]
    if commands is COMMANDS:
        lines += ["", "Federated 3D segmentation on NVIDIA FLARE. Try: fedseg3d poc run --sites 2 --set num_rounds=3"]
    return "\n".join(lines)


def _unknown(prog: str, given: str, known: Sequence[str]) -> int:
    close = difflib.get_close_matches(given, known, n=1)
    hint = f" (did you mean '{close[0]}'?)" if close else ""
    print(f"{prog}: unknown command '{given}'{hint}; commands: {', '.join(known)}", file=sys.stderr)
    return 2


def main(argv: Sequence[str] | None = None) -> int:
    """Dispatch ``argv`` (default: the process arguments) to its subcommand; returns the exit status."""
    args = list(sys.argv[1:] if argv is None else argv)
    if not args or args[0] in ("-h", "--help"):
        print(overview())
        return 0 if args else 2
    prog, entry = PROG, COMMANDS.get(args[0])
    if entry is None:
        return _unknown(prog, args[0], list(COMMANDS))
    prog, args = f"{prog} {args[0]}", args[1:]
    if isinstance(entry, dict):
        if not args or args[0] in ("-h", "--help"):
            print(overview(entry, prog))
            return 0 if args else 2
        if args[0] not in entry:
            return _unknown(prog, args[0], list(entry))
        prog, entry, args = f"{prog} {args[0]}", entry[args[0]], args[1:]
    module = importlib.import_module(entry.module)
    # kits.main has its own subcommands: its parser is `fedseg3d`, so `fedseg3d provision` names itself correctly.
    name = PROG if entry.leading else prog
    try:
        status = module.main([*entry.leading, *args], prog=name)
    except SystemExit as done:  # argparse's --help and usage errors
        if done.code is None or isinstance(done.code, int):
            return done.code or 0
        print(done.code, file=sys.stderr)
        return 1
    return status if isinstance(status, int) else 0


if __name__ == "__main__":
    raise SystemExit(main())
