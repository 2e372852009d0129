"""Provisioned startup kits run for real on localhost: server, two hospitals, admin console through the admin API.

One deployment (module fixture) serves every test. It is provisioned from a copy of ``provisioning/project.yml`` on
a free port, so it runs beside POC (port 8002) without the port lock. Every refusal is checked twice: that it
happened (job status, server's client list, exit code) and why (the message FLARE gives).
"""

from __future__ import annotations

import json
import math
import shutil
import time
from pathlib import Path
from types import SimpleNamespace

import pytest

from fedseg3d.deploy import kits
from fedseg3d.deploy.local import (
    LocalDeployment,
    free_port,
    port_in_use,
    prepare_job,
    prepare_sites,
    processes_using,
    project_copy,
    wait_for_job,
)
from fedseg3d.deploy.site_privacy import DP_SCOPE, dp_filter_args

pytestmark = pytest.mark.deploy
SITES = ["site-1", "site-2"]
TINY = {"num_rounds": 1, "local_steps": 2, "sites_per_round": 2}


def read_log(path: Path) -> str:
    return path.read_text(errors="replace") if path.is_file() else ""


def wait_for_text(path: Path, text: str, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if text in read_log(path):
            return True
        time.sleep(1)
    return False


def run_and_read_audit(fed, job_dir: Path, results: str) -> tuple[str, list[dict]]:
    """Submit ``job_dir``, wait for it to complete and return its id and what the server received from each site
    (recorded by the server-side UpdateNormAudit, downloaded with the results)."""
    job_id = fed.session.submit_job(str(job_dir))
    status = wait_for_job(fed.session, job_id, timeout=300, progress=False)
    assert status == "FINISHED:COMPLETED", fed.session.get_job_meta(job_id)
    result = Path(fed.session.download_job_result(job_id, str(fed.root / results)))
    (audit_file,) = result.rglob("received_updates.jsonl")
    updates = [json.loads(line) for line in audit_file.read_text().splitlines()]
    assert sorted(u["site"] for u in updates) == SITES
    return job_id, updates


@pytest.fixture(scope="module")
def fed(tiny_sites, tmp_path_factory):
    root = tmp_path_factory.mktemp("deploy")
    port = free_port()
    project_file = project_copy(kits.PROJECT_FILE, root / "project.yml", port=port)
    prod_dir = kits.provision(project_file, root / "provision")
    prepare_sites(prod_dir, SITES, tiny_sites)
    deployment = LocalDeployment(prod_dir)
    session = None
    try:
        deployment.start_server()
        for site in SITES:
            deployment.start(site)
        session = deployment.session()
        deployment.wait_for_sites(session, SITES, timeout=90)
        yield SimpleNamespace(
            root=root, port=port, project_file=project_file, prod_dir=prod_dir, deployment=deployment,
            session=session, data=tiny_sites,
        )  # fmt: skip
    finally:
        if session is not None:
            session.close()
        deployment.stop_all()
    assert not port_in_use(port)
    assert not processes_using(root), "processes of the deployment left running"


def test_admin_runs_a_job_without_custom_code_and_the_site_dp_scope_protects_every_update(fed):
    job_dir = prepare_job("unet3d_fedbn", fed.root / "jobs_ok", TINY, len(SITES))
    assert not (job_dir / "app" / "custom").exists()
    client_config = json.loads((job_dir / "app" / "config" / "config_fed_client.json").read_text())
    assert client_config["task_result_filters"] == [], "the job itself must carry no DP filter for this test"

    job_id, updates = run_and_read_audit(fed, job_dir, "results")
    assert json.loads((job_dir / "meta.json").read_text())["scope"] == DP_SCOPE
    site_policy = fed.prod_dir / SITES[0] / "local" / "privacy.json"
    dp_args = dp_filter_args(json.loads(site_policy.read_text()), str(site_policy))
    for update in updates:
        assert update["data_kind"] == "WEIGHT_DIFF"
        assert update["filter_history"] == ["GaussianDPFilter"]
        assert update["dp_meta"]["dp_scope"] == "site_ledger"
        assert update["dp_meta"]["dp_epsilon"] > 0
        # Clipped to C, plus N(0, (sigma C)^2) per value: the norm is sigma*C*sqrt(n) give or take C and 1 %.
        expected = dp_args["noise_multiplier"] * dp_args["clip_norm"] * math.sqrt(update["num_values"])
        assert abs(update["l2_norm"] - expected) < 0.01 * expected + dp_args["clip_norm"], update
    for site in SITES:
        ledger = json.loads((fed.prod_dir / site / "local" / "privacy_ledger.json").read_text())
        assert [e["job_id"] for e in ledger["entries"]] == [job_id]


def test_a_job_naming_no_scope_gets_the_sites_default_plain_scope(fed):
    job_dir = prepare_job("unet3d_fedbn", fed.root / "jobs_default", TINY, len(SITES), scope=None)
    assert "scope" not in json.loads((job_dir / "meta.json").read_text())
    policy = json.loads((fed.prod_dir / SITES[0] / "local" / "privacy.json").read_text())
    assert policy["default_scope"] == "plain"  # provisioned with the defaults

    job_id, updates = run_and_read_audit(fed, job_dir, "results_default")
    for update in updates:  # no site filter ran and nothing was charged
        assert update["filter_history"] == [] and "dp_epsilon" not in update.get("dp_meta", {}), update
    for site in SITES:
        ledger_file = fed.prod_dir / site / "local" / "privacy_ledger.json"
        entries = json.loads(ledger_file.read_text())["entries"] if ledger_file.is_file() else []
        assert job_id not in [e["job_id"] for e in entries]


def test_member_cannot_submit_a_job(fed):
    job_dir = prepare_job("unet3d_fedbn", fed.root / "jobs_member", TINY, len(SITES))
    member = fed.deployment.session("member@consortium.org")
    try:
        with pytest.raises(Exception, match="'member@consortium.org' is not authorized for 'submit_job'"):
            member.submit_job(str(job_dir))
        assert fed.deployment.connected_sites(member) == set(SITES)  # a member may look
    finally:
        member.close()


def test_site_refuses_a_job_that_brings_its_own_code(fed):
    job_dir = prepare_job("unet3d_fedbn", fed.root / "jobs_byoc", TINY, len(SITES), with_code=True)
    assert (job_dir / "app" / "custom" / "fedseg3d").is_dir()
    job_id = fed.session.submit_job(str(job_dir))  # the server lets project_admin submit code...
    status = wait_for_job(fed.session, job_id, timeout=60, progress=False)
    meta = fed.session.get_job_meta(job_id)
    assert status == "FINISHED:FAILED_TO_RUN", meta
    assert meta["byoc"] is True
    for site in SITES:  # ...the hospitals refuse to run it
        assert f"{site}: NVFLARE_ERROR: BYOC not permitted" in meta["job_deploy_detail"]


def test_site_refuses_a_job_asking_for_a_privacy_scope_it_does_not_have(fed):
    job_dir = prepare_job("unet3d_fedbn", fed.root / "jobs_scope", TINY, len(SITES), scope="no_privacy")
    job_id = fed.session.submit_job(str(job_dir))
    status = wait_for_job(fed.session, job_id, timeout=60, progress=False)
    meta = fed.session.get_job_meta(job_id)
    assert status == "FINISHED:FAILED_TO_RUN", meta
    for site in SITES:
        assert f"{site}: NVFLARE_ERROR: privacy scope 'no_privacy' is not allowed" in meta["job_deploy_detail"]


def test_site_from_another_project_never_joins(fed):
    foreign_file = project_copy(kits.PROJECT_FILE, fed.root / "foreign.yml", port=fed.port, name="othernet")
    foreign_kit = kits.provision(foreign_file, fed.root / "foreign") / "site-3"
    fed.deployment.start("foreign-site-3", kit=foreign_kit)
    try:
        refused = wait_for_text(foreign_kit / "log.txt", "CERTIFICATE_VERIFY_FAILED", timeout=45)
        assert "site-3" not in fed.deployment.connected_sites(fed.session)
    finally:
        fed.deployment.stop("foreign-site-3")
    site_log = read_log(foreign_kit / "log.txt")
    assert refused, site_log[-2000:]
    assert "certificate verify failed: self-signed certificate in certificate chain" in site_log


def test_edited_startup_config_is_refused_at_start(fed, tmp_path):
    kit = tmp_path / "site-3"
    shutil.copytree(fed.prod_dir / "site-3", kit)
    config_file = kit / "startup" / "fed_client.json"
    config = json.loads(config_file.read_text())
    config["servers"][0]["service"]["target"] = "attacker.example.org:8002"
    config_file.write_text(json.dumps(config, indent=2))
    process = fed.deployment.start("tampered", kit=kit)
    try:
        code = process.wait(timeout=60)
    finally:
        fed.deployment.stop("tampered")
    console = read_log(kit / "console.log")
    assert code == 1, console
    assert "The following files are not secure content.\nfed_client.json" in console


def test_kit_edited_to_claim_another_sites_name_is_refused_by_the_server(fed, tmp_path):
    kit = tmp_path / "site-3"
    shutil.copytree(fed.prod_dir / "site-3", kit)
    script = kit / "startup" / "sub_start.sh"
    script.write_text(script.read_text().replace("uid=site-3 ", "uid=site-4 "))
    server_log = fed.prod_dir / "server" / "log.txt"
    fed.deployment.start("impostor", kit=kit)
    try:
        message = "authenticated as 'site-3' but claimed endpoint 'site-4' requires identity 'site-4'"
        refused = wait_for_text(server_log, message, timeout=45)
        assert "site-4" not in fed.deployment.connected_sites(fed.session)
    finally:
        fed.deployment.stop("impostor")
    assert refused, read_log(server_log)[-2000:]


def test_a_new_hospital_joins_the_running_project_without_reissuing_other_kits(fed):
    before = {name: kits.cert_info(fed.prod_dir / name) for name in ("server", *SITES)}
    site_kit = kits.add_site("site-5", "hospital_e", fed.project_file, fed.prod_dir.parent.parent)
    new_prod = site_kit.parent
    assert new_prod != fed.prod_dir
    for name, info in before.items():
        # The other kits in the new prod_NN carry the same certificates: nobody needs a new kit.
        assert kits.cert_info(new_prod / name)["serial"] == info["serial"]
    info = kits.cert_info(site_kit)
    assert info["issuer"] == before["site-1"]["issuer"]
    # FLARE's default lifetime is 360 days, and no certificate outlives the root CA: a site added later expires
    # together with everyone else (renewal means a new root and new kits for all; see docs/deployment.md).
    assert before["site-1"]["root_ca_lifetime_days"] == 360
    assert before["site-1"]["not_after"] == before["site-1"]["root_ca_not_after"]
    assert info["not_after"] == before["site-1"]["root_ca_not_after"]
    assert (site_kit / "local" / "privacy.json").is_file()
    assert (site_kit / "startup" / "signature.json").is_file()
    kits.write_site_data_config(site_kit, fed.data / "site-1")
    fed.deployment.start("site-5", kit=site_kit)
    try:
        fed.deployment.wait_for_sites(fed.session, ["site-5"], timeout=60)
    finally:
        fed.deployment.stop("site-5")


def test_admin_locks_out_a_site_whose_kit_leaked(fed):
    # FLARE 2.9 has no certificate revocation list; the server-side switch is disable_client (by site name).
    kit = fed.prod_dir / "site-3"
    fed.deployment.start("site-3")
    try:
        fed.deployment.wait_for_sites(fed.session, ["site-3"], timeout=60)
        reply = fed.session.disable_client("site-3")
        assert reply["clients"][0]["state"] == "disabled"
        assert "site-3" not in fed.deployment.connected_sites(fed.session)
        fed.deployment.stop("site-3")
        fed.deployment.start("site-3")  # the same, still valid, kit tries again
        refused = wait_for_text(kit / "log.txt", "registration rejected: Client 'site-3' is disabled", timeout=45)
        assert "site-3" not in fed.deployment.connected_sites(fed.session)
    finally:
        fed.deployment.stop("site-3")
        fed.session.enable_client("site-3")
    assert refused, read_log(kit / "log.txt")[-2000:]
