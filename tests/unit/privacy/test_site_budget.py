"""Where a site's budget is found: its local/ folder first, then $FEDSEG3D_PRIVACY_DIR/<site>; writing one."""

from __future__ import annotations

import json

import pytest

from fedseg3d.privacy.ledger import PrivacyLedgerError
from fedseg3d.privacy.site_budget import PRIVACY_DIR_ENV, find_site_budget, write_site_budget


@pytest.fixture(autouse=True)
def no_env(monkeypatch):
    monkeypatch.delenv(PRIVACY_DIR_ENV, raising=False)


def test_local_folder_wins_over_the_environment(tmp_path, monkeypatch):
    write_site_budget(tmp_path / "local", epsilon_budget=3.0, delta=1e-6)
    write_site_budget(tmp_path / "env" / "site-1", epsilon_budget=9.0, delta=1e-5)
    monkeypatch.setenv(PRIVACY_DIR_ENV, str(tmp_path / "env"))
    assert find_site_budget(tmp_path / "local", "site-1").epsilon_budget == 3.0
    budget = find_site_budget(tmp_path / "nowhere", "site-1")
    assert (budget.epsilon_budget, budget.delta) == (9.0, 1e-5)
    assert budget.ledger_file == (tmp_path / "env" / "site-1" / "privacy_ledger.json").resolve()


def test_no_budget_anywhere_is_none_but_a_set_variable_without_the_file_is_an_error(tmp_path, monkeypatch):
    assert find_site_budget(tmp_path, "site-1") is None
    assert find_site_budget(None, "site-1") is None
    monkeypatch.setenv(PRIVACY_DIR_ENV, str(tmp_path))
    with pytest.raises(FileNotFoundError, match="site-1/privacy_budget.json does not exist"):
        find_site_budget(None, "site-1")
    with pytest.raises(RuntimeError, match="cannot name a folder"):
        find_site_budget(None, "../site-1")


def test_write_site_budget_never_overwrites_a_sites_decision_and_validates(tmp_path):
    path = write_site_budget(tmp_path, epsilon_budget=5.0, delta=1e-5)
    write_site_budget(tmp_path, epsilon_budget=500.0, delta=1e-5)
    assert json.loads(path.read_text())["epsilon_budget"] == 5.0
    write_site_budget(tmp_path, epsilon_budget=6.0, delta=1e-5, overwrite=True)
    assert json.loads(path.read_text())["epsilon_budget"] == 6.0
    with pytest.raises(PrivacyLedgerError, match="'delta' must be a number in"):
        write_site_budget(tmp_path / "bad", epsilon_budget=5.0, delta=2.0)
