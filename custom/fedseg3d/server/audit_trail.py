"""An append-only, hash-chained JSON-lines log: each record holds the SHA-256 of the record before it.

Plain Python. The server writes one record per round (``AuditTrailWriter``); ``fedseg3d audit-trail verify RUN_DIR``
checks the chain. A record is ``{"seq": n, "prev": <hash of record n-1>, ...body..., "hash": <its own hash>}``, the
hash taken over the record's canonical JSON (sorted keys, no spaces) without the ``hash`` field; the first record's
``prev`` is 64 zeros.

What it proves: an edited, deleted, inserted or reordered record breaks the chain at that point (its own hash, or
the next record's ``prev``, or the sequence number no longer fits), and ``verify`` names the first broken link.
What it does not: whoever holds the file can rewrite it whole, recomputing every hash, or cut records off its end.
Anchor the head outside the file to catch that: the server logs the head hash after each round (``audit trail:
round R recorded, head <hash>``); ``verify --head HASH`` then checks the file still reaches that record unchanged.
Nothing is signed.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path

GENESIS = "0" * 64
TRAIL_FILE = "audit_trail.jsonl"


def canonical(record: dict) -> bytes:
    """The bytes a record's hash covers: its JSON with sorted keys and no whitespace, without ``hash``."""
    body = {k: v for k, v in record.items() if k != "hash"}
    return json.dumps(body, sort_keys=True, separators=(",", ":"), allow_nan=True).encode()


def record_hash(record: dict) -> str:
    return hashlib.sha256(canonical(record)).hexdigest()


class AuditTrail:
    """Appends chained records to ``path`` (creating it), continuing an existing chain.

    Raises:
        ValueError: an existing file's chain is broken (appending to it would hide the break).
    """

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.seq, self.head = 0, GENESIS
        if self.path.is_file():
            result = verify(self.path)
            if not result.ok:
                raise ValueError(f"{self.path}: cannot append to a broken audit trail: {result.message}")
            self.seq, self.head = result.records, result.head

    def append(self, body: dict) -> dict:
        """Write one record (``body`` plus ``seq``, ``prev`` and ``hash``) and flush it to disk; return it."""
        record = {"seq": self.seq, "prev": self.head, **body}
        record["hash"] = record_hash(record)
        with self.path.open("a") as stream:
            stream.write(json.dumps(record, sort_keys=True, allow_nan=True) + "\n")
            stream.flush()
            os.fsync(stream.fileno())
        self.seq, self.head = self.seq + 1, record["hash"]
        return record


@dataclass(frozen=True)
class Verification:
    """The outcome of ``verify``: ``ok``, how many records were intact, the last intact hash, and what broke."""

    ok: bool
    records: int
    head: str
    message: str


def verify(path: str | Path, expected_head: str | None = None) -> Verification:
    """Check the chain in ``path`` from the first record; stop at the first broken link.

    Args:
        expected_head: a head hash anchored elsewhere (the server log): the chain must contain that record.

    Returns:
        ``Verification``; its ``message`` names the first broken record (its number, from 0, and line) and what
        differs, or says the chain is intact.
    """
    path = Path(path)
    prev, count, seen_anchor = GENESIS, 0, expected_head is None
    for line_no, line in enumerate(path.read_text().splitlines(), start=1):
        where = f"{path}: record {count} (line {line_no})"
        try:
            record = json.loads(line)
        except json.JSONDecodeError as err:
            return Verification(False, count, prev, f"{where}: not JSON ({err.msg})")
        if not isinstance(record, dict) or "hash" not in record:
            return Verification(False, count, prev, f"{where}: not an audit record (no 'hash' field)")
        if record.get("seq") != count:
            return Verification(
                False, count, prev, f"{where}: field 'seq' is {record.get('seq')!r}, expected {count} "
                "(a record was deleted, inserted or moved)",
            )  # fmt: skip
        if record.get("prev") != prev:
            return Verification(
                False, count, prev, f"{where}: field 'prev' is {str(record.get('prev'))[:16]}..., the previous "
                f"record's hash is {prev[:16]}... (the record before it was changed, deleted or moved)",
            )  # fmt: skip
        actual = record_hash(record)
        if actual != record["hash"]:
            return Verification(
                False, count, prev, f"{where}: content does not match its field 'hash' (the record was edited: "
                f"stored {record['hash'][:16]}..., computed {actual[:16]}...)",
            )  # fmt: skip
        prev, count = actual, count + 1
        seen_anchor = seen_anchor or actual == expected_head
    if not seen_anchor:
        return Verification(
            False, count, prev, f"{path}: no record has the anchored head {expected_head[:16]}... (the file was cut "
            f"short or rewritten; its last intact record is {count - 1}, hash {prev[:16]}...)",
        )  # fmt: skip
    return Verification(True, count, prev, f"{path}: {count} records, chain intact, head {prev}")


def find_trail(run_dir: str | Path) -> Path:
    """A run's audit trail: ``run_dir`` itself when it is the file, else the one ``TRAIL_FILE`` under it.

    Raises:
        FileNotFoundError: none, or more than one, under ``run_dir``.
    """
    run_dir = Path(run_dir)
    if run_dir.is_file():
        return run_dir
    found = sorted(run_dir.rglob(TRAIL_FILE))
    if len(found) != 1:
        what = "no" if not found else f"{len(found)} ({', '.join(map(str, found))})"
        raise FileNotFoundError(f"{run_dir}: {what} {TRAIL_FILE} found; give the run folder of one job, or the file")
    return found[0]
