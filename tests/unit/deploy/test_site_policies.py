"""The committed site policies, checked with FLARE's own policy code: every component the jobs use is on the
allow-lists, the DP scope builds, the authorization policy loads and says what the docs say, and `make provision`
leaves signed startup folders and installed policies. Seconds; no federation is started."""

from __future__ import annotations

import importlib
import json
from pathlib import Path

import pytest
from nvflare.app_common.widgets.component_path_authorizer import ComponentPathAuthorizer
from nvflare.fuel.sec.authz import AuthzContext, Person
from nvflare.lighter.utils import verify_folder_signature
from nvflare.security.security import FLAuthorizer

from fedseg3d.deploy import kits
from fedseg3d.deploy.local import AUDIT_COMPONENT
from fedseg3d.deploy.site_privacy import DP_SCOPE
from fedseg3d.privacy.ledger import load_site_privacy_budget
from tests.unit.test_job_configs import components

REPO = Path(__file__).resolve().parents[3]
POLICIES = kits.POLICIES_DIR
JOB_DIRS = sorted(p for p in (REPO / "jobs").iterdir() if (p / "meta.json").is_file())


class _Workspace:
    """Just what ComponentPathAuthorizer asks of a FLARE workspace: where resources.json is."""

    def __init__(self, resources: Path) -> None:
        self.resources = resources

    def get_resources_file_path(self) -> str:
        return str(self.resources)


@pytest.mark.parametrize("job", JOB_DIRS, ids=lambda p: p.name)
@pytest.mark.parametrize("side", ["client", "server"])
def test_every_job_component_is_on_the_allow_list(job, side, tmp_path):
    # The server's resources.json is a template (@WORKSPACE@); the allow-list part does not depend on it.
    kind = "site" if side == "client" else "server"
    resources = tmp_path / "resources.json"
    resources.write_text((POLICIES / kind / "resources.json").read_text())
    authorizer = ComponentPathAuthorizer()
    config = json.loads((job / "app" / "config" / f"config_fed_{side}.json").read_text())
    extra = [AUDIT_COMPONENT] if side == "server" else []
    for node in [*components(config), *extra]:
        authorizer.authorize_component_config(node, workspace=_Workspace(resources))  # raises when not allowed


def test_allow_list_refuses_what_it_does_not_name(tmp_path):
    resources = tmp_path / "resources.json"
    resources.write_text((POLICIES / "site" / "resources.json").read_text())
    with pytest.raises(Exception, match="is not in allow_list"):
        ComponentPathAuthorizer().authorize_component_config(
            {"path": "nvflare.app_common.filters.exclude_vars.ExcludeVars"}, workspace=_Workspace(resources)
        )


def test_privacy_template_offers_a_plain_and_a_dp_scope_and_defaults_to_a_defined_one():
    policy = json.loads((POLICIES / "site" / "privacy.json").read_text())
    scopes = {scope["name"]: scope for scope in policy["scopes"]}
    assert policy["default_scope"] in scopes
    assert scopes["plain"]["task_result_filters"] == []
    (dp,) = scopes[DP_SCOPE]["task_result_filters"]
    module, _, cls = dp["path"].rpartition(".")
    instance = getattr(importlib.import_module(module), cls)(**dp["args"])
    assert type(instance).__name__ == "GaussianDPFilter"
    assert instance.require_budget is True
    assert instance.noise_multiplier > 0


def test_privacy_budget_template_loads(tmp_path):
    path = tmp_path / "privacy_budget.json"
    path.write_text((POLICIES / "site" / "privacy_budget.json").read_text())
    budget = load_site_privacy_budget(path)
    assert budget.epsilon_budget > 0 and 0 < budget.delta < 1
    assert Path(budget.ledger_file).parent == tmp_path


@pytest.mark.parametrize(
    ("org", "role", "right", "allowed"),
    [
        ("consortium", "project_admin", "submit_job", True),
        ("consortium", "project_admin", "operate", True),
        ("consortium", "project_admin", "byoc", False),
        ("consortium", "project_admin", "shell_commands", False),
        ("consortium", "lead", "submit_job", True),
        ("consortium", "lead", "byoc", False),
        ("consortium", "lead", "operate", False),
        ("consortium", "member", "submit_job", False),
        ("consortium", "member", "view", True),
        ("consortium", "org_admin", "operate", False),
        ("hospital_a", "org_admin", "operate", True),
        ("hospital_a", "org_admin", "shell_commands", True),
        ("hospital_a", "org_admin", "byoc", False),
    ],
)
def test_site_authorization_policy(org, role, right, allowed):
    policy = json.loads((POLICIES / "site" / "authorization.json").read_text())
    authorizer = FLAuthorizer("hospital_a", policy)  # the policy as site-1 (org hospital_a) applies it
    user = Person("someone@example.org", org, role)
    granted, _ = authorizer.authorize(AuthzContext(right=right, user=user, submitter=user))
    assert granted is allowed


def test_provision_signs_startup_folders_and_installs_policies(tmp_path):
    prod_dir = kits.provision(kits.PROJECT_FILE, tmp_path / "provision")
    project = kits.load_project(kits.PROJECT_FILE)
    names = [p["name"] for p in project["participants"]]
    assert sorted(p.name for p in prod_dir.iterdir() if (p / "startup").is_dir()) == sorted(names)
    for name in names:
        startup = prod_dir / name / "startup"
        assert verify_folder_signature(str(startup), str(startup / "rootCA.pem"), True, "signature.json")
    for site in (p["name"] for p in kits.participants(project, "client")):
        for filename in kits.SITE_POLICY_FILES:
            written, template = prod_dir / site / "local" / filename, POLICIES / "site" / filename
            if filename in kits.PRIVACY_FILES:  # rendered for the default choice: the template's content
                assert json.loads(written.read_text()) == json.loads(template.read_text())
            else:
                assert written.read_text() == template.read_text()
    server = json.loads((prod_dir / "server" / "local" / "resources.json").read_text())
    job_store = next(c for c in server["components"] if c["id"] == "job_manager")["args"]["uri_root"]
    assert job_store == str((prod_dir / "server").resolve() / "jobs-storage")
    assert kits.WORKSPACE_PLACEHOLDER not in json.dumps(server)


def test_signature_check_notices_an_edit(tmp_path):
    prod_dir = kits.provision(kits.PROJECT_FILE, tmp_path / "provision")
    startup = prod_dir / "site-1" / "startup"
    config = startup / "fed_client.json"
    config.write_text(config.read_text().replace("localhost", "elsewhere"))
    assert not verify_folder_signature(str(startup), str(startup / "rootCA.pem"), True, "signature.json")


def test_add_site_refuses_an_existing_name(tmp_path):
    with pytest.raises(ValueError, match="'site-1' already exists"):
        kits.add_site("site-1", "hospital_a", kits.PROJECT_FILE, tmp_path)


def test_site_data_config_needs_a_datalist(tmp_path):
    kit = tmp_path / "site-1"
    (kit / "local").mkdir(parents=True)
    with pytest.raises(FileNotFoundError, match="datalist.json not found"):
        kits.write_site_data_config(kit, tmp_path / "nodata")


def test_renew_reissues_one_certificate_and_keeps_the_others(tmp_path):
    first = kits.provision(kits.PROJECT_FILE, tmp_path / "provision")
    renewed = kits.renew("site-1", kits.PROJECT_FILE, tmp_path / "provision")
    assert renewed.parent != first
    assert kits.cert_info(renewed)["serial"] != kits.cert_info(first / "site-1")["serial"]
    assert kits.cert_info(renewed)["issuer"] == kits.cert_info(first / "site-1")["issuer"]
    for other in ("server", "site-2", "admin@consortium.org"):
        assert kits.cert_info(renewed.parent / other)["serial"] == kits.cert_info(first / other)["serial"]
    startup = renewed / "startup"
    assert verify_folder_signature(str(startup), str(startup / "rootCA.pem"), True, "signature.json")
    assert (renewed / "local" / "privacy.json").is_file()
