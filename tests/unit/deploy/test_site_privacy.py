"""The privacy choice made at provisioning: what `fedseg3d.deploy.kits` writes into a site's ``local/``, what
FLARE's own privacy manager then lets a job do there, and the options it refuses. Seconds; no federation is started."""

from __future__ import annotations

import json

import pytest
from nvflare.apis.fl_constant import FilterKey
from nvflare.apis.fl_context import FLContext
from nvflare.apis.workspace import Workspace
from nvflare.private.fed.app.fl_conf import create_privacy_manager
from nvflare.private.fed.utils.app_deployer import AppDeployer
from nvflare.private.privacy_manager import PrivacyService

from fedseg3d.deploy import kits
from fedseg3d.deploy.site_privacy import DP_SCOPE, PrivacyChoice, describe, dp_filter_args
from fedseg3d.privacy.accounting import rounds_affordable
from fedseg3d.privacy.ledger import load_site_privacy_budget

UNKNOWN = "no_such_scope"


def write_site(tmp_path, choice: PrivacyChoice):
    """A site folder with the privacy files provisioning writes for ``choice``; FLARE's privacy service reads it."""
    local = tmp_path / "site-1" / "local"
    local.mkdir(parents=True)
    (local.parent / "startup").mkdir()  # FLARE's Workspace insists on one
    files = kits.site_privacy_files(choice)
    for name, content in files.items():
        (local / name).write_text(json.dumps(content))
    PrivacyService.initialize(create_privacy_manager(Workspace(str(tmp_path / "site-1"), "site-1"), names_only=False))
    return files


@pytest.fixture(autouse=True)
def reset_privacy_service():
    yield
    PrivacyService.initialize(None)


def result_filters(scope_name: str) -> list[str]:
    """The task-result filters FLARE applies to what leaves the site for a job naming ``scope_name``."""
    scope = PrivacyService.get_scope(scope_name)
    return [type(f).__name__ for f in scope.task_result_filters[FilterKey.OUT]]


@pytest.mark.parametrize(
    ("choice", "no_scope_gets", "allowed", "refused"),
    [
        (PrivacyChoice(), [], {"plain": [], DP_SCOPE: ["GaussianDPFilter"]}, [UNKNOWN]),
        (
            PrivacyChoice(default_scope=DP_SCOPE),
            ["GaussianDPFilter"],
            {"plain": [], DP_SCOPE: ["GaussianDPFilter"]},
            [UNKNOWN],
        ),
        (
            PrivacyChoice(default_scope=DP_SCOPE, enforce=True),
            ["GaussianDPFilter"],
            {DP_SCOPE: ["GaussianDPFilter"]},
            ["plain", UNKNOWN],
        ),
    ],
    ids=["default", "dp_by_default", "dp_enforced"],
)
def test_flare_gives_each_job_the_scope_the_site_chose_and_refuses_the_rest(
    tmp_path, choice, no_scope_gets, allowed, refused
):
    write_site(tmp_path, choice)
    assert PrivacyService.is_scope_allowed("")  # a job whose meta.json names no scope ...
    assert result_filters("") == no_scope_gets  # ... gets the site's default
    for name, filters in allowed.items():
        assert PrivacyService.is_scope_allowed(name)
        assert result_filters(name) == filters
    for name in refused:  # the site's deployer refuses the job before it writes or runs anything
        assert not PrivacyService.is_scope_allowed(name)
        reply = AppDeployer().deploy(None, "job-1", {"scope": name}, "app", b"", FLContext())
        assert reply == f"privacy scope '{name}' is not allowed"


@pytest.mark.parametrize(("rounds", "budget"), [(5, 8.0), (40, 4.0)])
def test_dp_rounds_calibrates_the_noise_so_the_budget_covers_that_many_rounds(tmp_path, rounds, budget):
    files = write_site(tmp_path, PrivacyChoice(dp_rounds=rounds, epsilon_budget=budget, delta=1e-6))
    sigma = dp_filter_args(files["privacy.json"], "privacy.json")["noise_multiplier"]
    written = load_site_privacy_budget(tmp_path / "site-1" / "local" / "privacy_budget.json")
    assert (written.epsilon_budget, written.delta) == (budget, 1e-6)
    assert rounds_affordable(sigma, budget, 1e-6) == rounds
    assert any(f"the budget covers {rounds} rounds" in line for line in describe(*files.values()))


def test_dp_options_reach_the_filter_the_site_builds(tmp_path):
    write_site(tmp_path, PrivacyChoice(default_scope=DP_SCOPE, clip_norm=0.5, noise_multiplier=3.5))
    (dp,) = PrivacyService.get_scope(DP_SCOPE).task_result_filters[FilterKey.OUT]
    assert (dp.clip_norm, dp.noise_multiplier, dp.require_budget) == (0.5, 3.5, True)


@pytest.mark.parametrize(
    ("options", "message"),
    [
        (["--privacy-scope", "none"], "--privacy-scope: 'none' is not a scope of"),
        (["--dp-noise-multiplier", "0"], "--dp-noise-multiplier must be a finite number > 0, got 0.0"),
        (["--dp-clip-norm", "-1"], "--dp-clip-norm must be a finite number > 0, got -1.0"),
        (["--epsilon-budget", "inf"], "--epsilon-budget must be a finite number > 0, got inf"),
        (["--delta", "1"], "--delta must be in (0, 1), got 1.0"),
        (["--dp-rounds", "0"], "--dp-rounds must be an integer >= 1, got 0"),
        (["--dp-rounds", "5", "--dp-noise-multiplier", "2"], "not allowed with argument --dp-rounds"),
        (["--enforce-scope"], "--enforce-scope needs --privacy-scope"),
        (
            ["--privacy-scope", "plain", "--enforce-scope", "--dp-noise-multiplier", "2"],
            "--dp-noise-multiplier: the site offers no 'dp_update' scope",
        ),
    ],
)
@pytest.mark.parametrize("command", [["provision"], ["add-site", "--name", "site-9", "--org", "hospital_z"]])
def test_a_bad_privacy_option_is_refused_before_anything_is_provisioned(tmp_path, capsys, command, options, message):
    with pytest.raises(SystemExit) as exit_info:
        kits.main([*command, "--workspace", str(tmp_path / "ws"), *options])
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "ws").exists()


def test_provision_writes_the_choice_into_every_site_and_prints_it(tmp_path, capsys):
    options = ["--privacy-scope", DP_SCOPE, "--enforce-scope", "--dp-rounds", "10", "--epsilon-budget", "4"]
    kits.main(["provision", "--workspace", str(tmp_path), *options])
    out = capsys.readouterr().out
    assert f"a job whose meta.json names no scope gets '{DP_SCOPE}'; no other scope is offered" in out
    assert "the budget covers 10 rounds" in out
    prod_dir = kits.latest_prod_dir(tmp_path, kits.load_project(kits.PROJECT_FILE)["name"])
    for site in kits.participants(kits.load_project(kits.PROJECT_FILE), "client"):
        local = prod_dir / site["name"] / "local"
        policy = json.loads((local / "privacy.json").read_text())
        assert [s["name"] for s in policy["scopes"]] == [DP_SCOPE] and policy["default_scope"] == DP_SCOPE
        assert load_site_privacy_budget(local / "privacy_budget.json").epsilon_budget == 4.0


def test_add_site_gives_the_new_site_its_own_choice(tmp_path, capsys):
    first = kits.provision(kits.PROJECT_FILE, tmp_path)
    kits.main(["add-site", "--name", "site-8", "--org", "hospital_y", "--workspace", str(tmp_path), "--delta", "1e-7"])
    assert "site privacy in local/privacy.json and local/privacy_budget.json of site-8" in capsys.readouterr().out
    site_8 = kits.latest_prod_dir(tmp_path, first.parent.name) / "site-8" / "local"
    assert load_site_privacy_budget(site_8 / "privacy_budget.json").delta == 1e-7
    template = json.loads((kits.POLICIES_DIR / "site" / "privacy_budget.json").read_text())
    assert load_site_privacy_budget(first / "site-1" / "local" / "privacy_budget.json").delta == template["delta"]
