"""Verify a job's tamper-evident audit trail: the hash chain the server writes, one record per round.

The server writes ``<run dir>/fedseg3d/audit_trail.jsonl`` in every stock job: per round, which model each site was
sent, the hash, norm, sample count, filters, declared epsilon and QC verdict of each site's update as received, and
the hash of the resulting global model; each record holds the SHA-256 of the one before. This command re-computes
the chain and prints the first broken link (record number, line, and what differs); exit status 1 when broken.

A hash chain shows an edited, deleted, inserted or reordered record; it cannot show a file rewritten whole, or cut
short, by someone who holds it. For that, compare with a head hash kept elsewhere: the server log prints
``audit trail: round R recorded, head HASH`` after each round; pass the last one with ``--head``.

Examples:
    fedseg3d audit-trail verify workspace/sim/server/simulate_job
    fedseg3d audit-trail verify results/JOB_ID --head 3f5c...e1
"""

from __future__ import annotations

import argparse
from pathlib import Path

from fedseg3d.server.audit_trail import find_trail, verify


def main(argv: list[str] | None = None, prog: str | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog=prog, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("run_dir", type=Path, help="a job's run or result folder (or the audit_trail.jsonl itself)")
    parser.add_argument("--head", help="a head hash anchored elsewhere (the server log): the chain must reach it")
    args = parser.parse_args(argv)
    try:
        path = find_trail(args.run_dir)
    except FileNotFoundError as err:
        print(f"error: {err}")
        return 2
    result = verify(path, args.head)
    print(("OK: " if result.ok else "BROKEN: ") + result.message)
    return 0 if result.ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
