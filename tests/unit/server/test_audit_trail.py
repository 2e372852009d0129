"""The hash chain detects an edited, deleted, reordered or truncated record and names the first broken link."""

import json

import pytest

from fedseg3d.server.audit_trail import AuditTrail, find_trail, verify


@pytest.fixture
def trail(tmp_path):
    path = tmp_path / "fedseg3d" / "audit_trail.jsonl"
    writer = AuditTrail(path)
    for r in range(4):
        writer.append({"round": r, "received": {"site-1": {"norm": 1.0 + r}}, "global_model": f"{r:064x}"})
    return path


def lines(path):
    return path.read_text().splitlines()


def write(path, rows):
    path.write_text("\n".join(rows) + "\n")


def test_an_intact_chain_verifies_and_continues(trail):
    result = verify(trail)
    assert result.ok and result.records == 4
    AuditTrail(trail).append({"round": 4})
    assert verify(trail).records == 5


def test_an_edited_record_is_named(trail):
    rows = lines(trail)
    record = json.loads(rows[2])
    record["received"]["site-1"]["norm"] = 0.5
    rows[2] = json.dumps(record)
    write(trail, rows)
    result = verify(trail)
    assert not result.ok and result.records == 2
    assert "record 2 (line 3): content does not match its field 'hash' (the record was edited" in result.message


def test_an_edit_with_a_recomputed_hash_breaks_the_next_link(trail):
    from fedseg3d.server.audit_trail import record_hash

    rows = lines(trail)
    record = json.loads(rows[1])
    record["global_model"] = "f" * 64
    record["hash"] = record_hash(record)
    rows[1] = json.dumps(record)
    write(trail, rows)
    assert "record 2 (line 3): field 'prev'" in verify(trail).message


def test_a_deleted_record_is_named(trail):
    rows = lines(trail)
    write(trail, rows[:1] + rows[2:])
    assert "record 1 (line 2): field 'seq' is 2, expected 1" in verify(trail).message


def test_reordered_records_are_named(trail):
    rows = lines(trail)
    write(trail, [rows[0], rows[2], rows[1], rows[3]])
    assert "record 1 (line 2): field 'seq' is 2, expected 1" in verify(trail).message


def test_a_cut_tail_is_found_only_against_an_anchored_head(trail):
    head = verify(trail).head
    write(trail, lines(trail)[:3])
    assert verify(trail).ok
    result = verify(trail, expected_head=head)
    assert not result.ok and "no record has the anchored head" in result.message


def test_appending_to_a_broken_trail_is_refused(trail):
    write(trail, lines(trail)[1:])
    with pytest.raises(ValueError, match="cannot append to a broken audit trail"):
        AuditTrail(trail)


def test_the_trail_is_found_in_a_run_folder(trail, tmp_path):
    assert find_trail(tmp_path) == trail
    with pytest.raises(FileNotFoundError, match="no audit_trail.jsonl found"):
        find_trail(tmp_path / "fedseg3d" / "empty_dir_that_does_not_exist")
