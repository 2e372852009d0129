"""Provision signed startup kits and give each hospital its site policies: what `make provision` runs.

Steps, each its own function so tests and the Makefile can use them one by one:

1. ``provision``: ``nvflare provision -p provisioning/project.yml -w build/provision`` (FLARE's own tool; the
   kits land in ``build/provision/<project>/prod_NN``).
2. ``sign_startup_kits``: sign every kit's ``startup/`` folder with the project's root CA key. Why: FLARE 2.9 writes
   ``signature.json`` only for confidential-computing and homomorphic-encryption kits ("mTLS is the trust anchor"),
   so an edited ``fed_client.json`` would otherwise go unnoticed. With the signature present, FLARE's own start-up
   check (``security_init``) refuses to start a site or server whose ``fed_*.json``, certificate, key or root CA
   no longer match. We only call FLARE's ``sign_folders``, the function its ``SignatureBuilder`` uses for HE kits;
   ``local/`` stays unsigned because it holds the hospital's own policies.
3. ``install_site_policies``: copy the committed policy templates (``provisioning/site_policies``) into each site's
   ``local/`` (authorization, resources with the class allow-list) and the server's ``resources.json`` (job and
   snapshot storage inside the server workspace, not /tmp); write each site's privacy scopes and budget from the
   templates and the privacy choice made on the command line (``fedseg3d.deploy.site_privacy``); ``main`` prints it.
4. ``write_site_data_config``: the site's ``local/fedseg3d_site.json`` (where its data lives).
5. ``add_site``: ``nvflare provision --add_client``: a new hospital's kit from the same root CA, in a new
   ``prod_NN``; the kits already handed out stay valid and are not re-issued.

Usage:
    fedseg3d provision [--project provisioning/project.yml] [--workspace build/provision]
    fedseg3d add-site --name site-5 --org hospital_e [--workspace build/provision]
    fedseg3d renew --name site-1 [--workspace build/provision]
    fedseg3d cert-info KIT_DIR

PRIVACY (defaults: the templates; see ``fedseg3d.deploy.site_privacy`` and docs/deployment.md, "Site privacy"):
    [--privacy-scope plain|dp_update] [--enforce-scope] [--dp-clip-norm C]
    [--dp-noise-multiplier SIGMA | --dp-rounds N] [--epsilon-budget EPS] [--delta DELTA]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from datetime import UTC, datetime
from pathlib import Path

import yaml

from fedseg3d.deploy import site_privacy
from fedseg3d.deploy.site_privacy import PrivacyChoice

# Relative to the repository checkout the command runs from, as `fedseg3d build-jobs` reads `jobs/`.
PROJECT_FILE = Path("provisioning") / "project.yml"
POLICIES_DIR = Path("provisioning") / "site_policies"
DEFAULT_WORKSPACE = Path("build") / "provision"
SITE_POLICY_FILES = ("authorization.json", "privacy.json", "resources.json", "privacy_budget.json")
PRIVACY_FILES = ("privacy.json", "privacy_budget.json")  # written from the templates and the privacy choice
SERVER_POLICY_FILES = ("resources.json",)
WORKSPACE_PLACEHOLDER = "@WORKSPACE@"
SIGNATURE_FILE = "signature.json"


def nvflare_cli() -> str:
    """The ``nvflare`` entry point of the running interpreter's environment (never a different install on PATH)."""
    return str(Path(sys.executable).parent / "nvflare")


def load_project(project_file: Path) -> dict:
    """Read a provisioning project file; raises ValueError naming the file when it lacks what we rely on."""
    project = yaml.safe_load(Path(project_file).read_text())
    if not isinstance(project, dict) or not project.get("name") or not isinstance(project.get("participants"), list):
        raise ValueError(f"{project_file}: expected a FLARE project with 'name' and a 'participants' list")
    return project


def participants(project: dict, kind: str) -> list[dict]:
    return [p for p in project["participants"] if p.get("type") == kind]


def latest_prod_dir(workspace: Path, project_name: str) -> Path:
    """``nvflare provision`` writes ``prod_00``, then ``prod_01`` ... on each run; the newest is the current one."""
    prods = sorted((Path(workspace) / project_name).glob("prod_*"))
    if not prods:
        raise FileNotFoundError(f"no prod_* folder under {Path(workspace) / project_name}: run provision first")
    return prods[-1]


def run_provision(project_file: Path, workspace: Path, extra: list[str] | None = None) -> Path:
    """Run ``nvflare provision`` and return the new ``prod_NN`` folder.

    Raises:
        RuntimeError: the command failed; the message carries its output.
    """
    workspace = Path(workspace).resolve()
    workspace.mkdir(parents=True, exist_ok=True)
    command = [nvflare_cli(), "provision", "-p", str(Path(project_file).resolve()), "-w", str(workspace), "--force"]
    # --add_client resolves its yaml relative to the working directory: run where relative paths mean what they say.
    result = subprocess.run([*command, *(extra or [])], capture_output=True, text=True, timeout=120)
    if result.returncode != 0:
        raise RuntimeError(f"`{' '.join(command)}` failed ({result.returncode}):\n{result.stdout}\n{result.stderr}")
    return latest_prod_dir(workspace, load_project(project_file)["name"])


def sign_startup_kits(prod_dir: Path, names: list[str] | None = None) -> list[Path]:
    """Sign the ``startup/`` folder of the named kits (default: every kit) with the root CA key of the project.

    The key comes from ``<workspace>/<project>/state/cert.json``, which provisioning keeps next to ``prod_NN`` (keep
    that folder with the consortium admin only: it can issue kits).
    """
    from nvflare.lighter.utils import load_private_key, sign_folders

    state_file = Path(prod_dir).parent / "state" / "cert.json"
    try:
        root_key = load_private_key(json.loads(state_file.read_text())["root_pri_key"])
    except (OSError, KeyError, ValueError) as err:
        raise RuntimeError(f"{state_file}: cannot read the project's root CA key ({err!r})") from err
    kits = [p for p in sorted(Path(prod_dir).iterdir()) if (p / "startup").is_dir()]
    if names is not None:
        kits = [k for k in kits if k.name in names]
    for kit in kits:
        sign_folders(str(kit / "startup"), root_key, signature_file=SIGNATURE_FILE)
    return kits


def site_privacy_files(privacy: PrivacyChoice, policies_dir: Path = POLICIES_DIR) -> dict[str, dict]:
    """The content of each site's ``privacy.json`` and ``privacy_budget.json`` for ``privacy``.

    Raises:
        ValueError: a value out of range or a scope the template lacks, naming the option or the file.
    """
    privacy_file, budget_file = site_privacy.template_paths(policies_dir)
    policy, budget = site_privacy.render(
        privacy, json.loads(privacy_file.read_text()), json.loads(budget_file.read_text()), str(privacy_file)
    )
    return dict(zip(PRIVACY_FILES, (policy, budget), strict=True))


def install_site_policies(
    prod_dir: Path,
    project: dict,
    policies_dir: Path = POLICIES_DIR,
    sites: list[str] | None = None,
    privacy: PrivacyChoice | None = None,
) -> dict[str, dict]:
    """Copy the policy templates into each site's and the server's ``local/`` (existing files are replaced).

    ``@WORKSPACE@`` in a template becomes the absolute path of that participant's kit folder, so the server keeps its
    job store and snapshots inside its own workspace. A site's privacy files are rendered for ``privacy`` (default:
    the templates as they are) before anything is written, so a bad choice leaves no kit half-configured.

    Returns:
        The privacy files written to every site, by file name.
    """
    from fedseg3d.privacy.ledger import load_site_privacy_budget

    rendered = site_privacy_files(privacy or PrivacyChoice(), policies_dir)
    server = participants(project, "server")[0]["name"]
    targets = [(server, "server", SERVER_POLICY_FILES)]
    targets += [(p["name"], "site", SITE_POLICY_FILES) for p in participants(project, "client")]
    for name, kind, files in targets:
        kit = Path(prod_dir) / name
        if kind == "site" and sites is not None and name not in sites:
            continue
        if not (kit / "local").is_dir():
            continue  # a participant of the project file that this prod_NN does not hold
        for filename in files:
            if kind == "site" and filename in PRIVACY_FILES:
                text = json.dumps(rendered[filename], indent=2) + "\n"
            else:
                source = policies_dir / kind / filename
                text = source.read_text().replace(WORKSPACE_PLACEHOLDER, str(kit.resolve()))
                json.loads(text)  # a broken template must fail here, not in a hospital's start-up log
            (kit / "local" / filename).write_text(text)
        if kind == "site":
            load_site_privacy_budget(kit / "local" / "privacy_budget.json")  # the filters' own check, at provisioning
    return rendered


def write_site_data_config(site_kit: Path, data_root: Path, num_threads: int = 1) -> Path:
    """Write ``local/fedseg3d_site.json`` pointing the site at ``data_root/datalist.json``."""
    if not (Path(data_root) / "datalist.json").is_file():
        raise FileNotFoundError(f"{data_root}/datalist.json not found: run `make data` or give the site's data folder")
    config = {
        "site_name": Path(site_kit).name,
        "data_root": str(Path(data_root).resolve()),
        "datalist": "datalist.json",
        "num_threads": num_threads,
    }
    path = Path(site_kit) / "local" / "fedseg3d_site.json"
    path.write_text(json.dumps(config, indent=2) + "\n")
    return path


def provision(
    project_file: Path = PROJECT_FILE,
    workspace: Path = DEFAULT_WORKSPACE,
    privacy: PrivacyChoice | None = None,
) -> Path:
    """Provision, sign the startup folders and install the site policies; returns the ``prod_NN`` folder.

    Raises:
        ValueError: a bad privacy choice, before anything is provisioned.
    """
    project = load_project(project_file)
    site_privacy_files(privacy or PrivacyChoice())  # refuse a bad choice before FLARE writes anything
    prod_dir = run_provision(project_file, workspace)
    sign_startup_kits(prod_dir)
    install_site_policies(prod_dir, project, privacy=privacy)
    return prod_dir


def add_site(
    name: str,
    org: str,
    project_file: Path = PROJECT_FILE,
    workspace: Path = DEFAULT_WORKSPACE,
    privacy: PrivacyChoice | None = None,
) -> Path:
    """Provision one more hospital with the project's existing root CA; returns the new site's kit folder.

    FLARE re-runs provisioning into a new ``prod_NN`` and reuses the certificates kept in ``state/`` for everyone
    else, so only the new site's kit needs to be handed out.
    """
    project = load_project(project_file)
    if any(p["name"] == name for p in project["participants"]):
        raise ValueError(f"{project_file}: a participant named '{name}' already exists")
    site_privacy_files(privacy or PrivacyChoice())
    workspace = Path(workspace).resolve()
    extra_file = workspace / f"add_{name}.yml"
    workspace.mkdir(parents=True, exist_ok=True)
    extra_file.write_text(yaml.safe_dump({"name": name, "org": org}))
    prod_dir = run_provision(project_file, workspace, ["--add_client", str(extra_file)])
    sign_startup_kits(prod_dir, [name])
    site_project = {"participants": [*project["participants"], {"name": name, "type": "client", "org": org}]}
    install_site_policies(prod_dir, site_project, sites=[name], privacy=privacy)
    return prod_dir / name


def renew(
    name: str,
    project_file: Path = PROJECT_FILE,
    workspace: Path = DEFAULT_WORKSPACE,
    privacy: PrivacyChoice | None = None,
) -> Path:
    """Re-issue one participant's certificate (same root CA) into a new ``prod_NN``; returns its new kit folder.

    FLARE reuses every certificate kept in ``state/cert.json``; dropping one participant's entry makes the next
    ``nvflare provision`` issue that participant a fresh key and certificate (360 days, never beyond the root CA's
    expiry) while everyone else keeps theirs. The renewed kit gets this project's policies, like a new one.
    """
    project = load_project(project_file)
    if not any(p["name"] == name for p in project["participants"]):
        raise ValueError(f"{project_file}: no participant named '{name}'")
    site_privacy_files(privacy or PrivacyChoice())
    workspace = Path(workspace).resolve()
    state_file = workspace / project["name"] / "state" / "cert.json"
    if not state_file.is_file():
        raise FileNotFoundError(f"{state_file} not found: provision the project in {workspace} first")
    state = json.loads(state_file.read_text())
    state.pop(name, None)
    state_file.write_text(json.dumps(state))
    prod_dir = run_provision(project_file, workspace)
    sign_startup_kits(prod_dir, [name])
    kinds = {p["name"]: p["type"] for p in project["participants"]}
    if kinds[name] in ("client", "server"):
        only = [name] if kinds[name] == "client" else []
        install_site_policies(prod_dir, project, sites=only, privacy=privacy)
    return prod_dir / name


def cert_info(kit: Path) -> dict:
    """Subject, issuer, serial and validity of a kit's own certificate: for checking lifetime and renewal."""
    from cryptography import x509

    found = [p for name in ("server.crt", "client.crt") if (p := Path(kit) / "startup" / name).is_file()]
    if not found:
        raise FileNotFoundError(f"{Path(kit) / 'startup'}: no server.crt or client.crt: is {kit} a startup kit?")
    crt = found[0]
    cert = x509.load_pem_x509_certificate(crt.read_bytes())
    root = x509.load_pem_x509_certificate((crt.parent / "rootCA.pem").read_bytes())
    day = 86400.0
    return {
        "file": str(crt),
        "subject": cert.subject.rfc4514_string(),
        "issuer": cert.issuer.rfc4514_string(),
        "serial": cert.serial_number,
        "not_before": cert.not_valid_before_utc.isoformat(),
        "not_after": cert.not_valid_after_utc.isoformat(),
        "lifetime_days": round((cert.not_valid_after_utc - cert.not_valid_before_utc).total_seconds() / day, 2),
        "days_left": round((cert.not_valid_after_utc - datetime.now(UTC)).total_seconds() / day, 2),
        "root_ca_not_after": root.not_valid_after_utc.isoformat(),
        "root_ca_lifetime_days": round((root.not_valid_after_utc - root.not_valid_before_utc).total_seconds() / day, 2),
    }


def print_privacy(files: dict[str, dict], sites: list[str]) -> None:
    """Say what the sites were given: the privacy choice is the consortium's, so it must be seen, not buried."""
    print(f"site privacy in local/privacy.json and local/privacy_budget.json of {', '.join(sites)}:")
    for line in site_privacy.describe(files["privacy.json"], files["privacy_budget.json"]):
        print(f"  {line}")


COMMAND_HELP = {
    "provision": """Provision signed mTLS startup kits for every participant of the project file
(``nvflare provision``), sign each kit's startup/ folder and install the site policies
(provisioning/site_policies) into local/.

Writes <workspace>/<project>/prod_NN/<participant>/ (one kit each: hand each hospital only its own) and
<workspace>/<project>/state/ (the root CA: keep it with the consortium admin).

Example:
    fedseg3d provision --workspace build/provision --privacy-scope plain""",
    "add-site": """Provision one more hospital with the project's existing root CA; the kits already handed out
stay valid.

Writes a new <workspace>/<project>/prod_NN/ holding the new site's kit (hand out only that folder).

Example:
    fedseg3d add-site --name site-5 --org hospital_e --workspace build/provision""",
    "renew": """Re-issue one participant's certificate with the existing root CA (everyone else keeps theirs).

Writes a new <workspace>/<project>/prod_NN/ holding the renewed kit (hand out only that folder).

Example:
    fedseg3d renew --name site-1 --workspace build/provision""",
    "cert-info": """Print a kit's certificate subject, issuer and validity (days left, root CA expiry) as JSON;
writes nothing.

Example:
    fedseg3d cert-info build/provision/fedseg3d/prod_00/site-1""",
}


def main(argv: list[str] | None = None, prog: str | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog=prog, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    sub = parser.add_subparsers(dest="command", required=True)
    raw = argparse.RawDescriptionHelpFormatter
    prov = sub.add_parser("provision", help="provision, sign startup kits, install site policies",
                          description=COMMAND_HELP["provision"], formatter_class=raw)  # fmt: skip
    add = sub.add_parser("add-site", help="provision one more hospital with the existing root CA",
                         description=COMMAND_HELP["add-site"], formatter_class=raw)  # fmt: skip
    ren = sub.add_parser("renew", help="re-issue one participant's certificate with the existing root CA",
                         description=COMMAND_HELP["renew"], formatter_class=raw)  # fmt: skip
    for p in (prov, add, ren):
        p.add_argument("--project", type=Path, default=PROJECT_FILE)
        p.add_argument("--workspace", type=Path, default=DEFAULT_WORKSPACE)
    add.add_argument("--name", required=True)
    add.add_argument("--org", required=True)
    ren.add_argument("--name", required=True)
    for p in (prov, add, ren):
        site_privacy.add_arguments(p)
    info = sub.add_parser("cert-info", help="print a kit's certificate validity",
                          description=COMMAND_HELP["cert-info"], formatter_class=raw)  # fmt: skip
    info.add_argument("kit", type=Path)
    args = parser.parse_args(argv)
    if args.command == "cert-info":
        print(json.dumps(cert_info(args.kit), indent=2))
        return
    privacy = site_privacy.choice_from_args(args)
    try:
        files = site_privacy_files(privacy)
    except ValueError as err:
        parser.error(str(err))
    if args.command == "provision":
        prod_dir = provision(args.project, args.workspace, privacy)
        print(f"kits (startup/ signed, site policies in local/): {prod_dir}")
        for kit in sorted(p for p in prod_dir.iterdir() if (p / "startup").is_dir()):
            print(f"  {kit.name}")
        print_privacy(files, [p["name"] for p in participants(load_project(args.project), "client")])
    elif args.command == "add-site":
        kit = add_site(args.name, args.org, args.project, args.workspace, privacy)
        print(f"new site kit: {kit} (hand out only this folder; the other kits are unchanged)")
        print_privacy(files, [args.name])
    else:
        kit = renew(args.name, args.project, args.workspace, privacy)
        print(f"renewed kit: {kit} ({cert_info(kit)['not_after']}); hand out only this folder")
        if (kit / "local" / "privacy.json").is_file():
            print_privacy(files, [args.name])


if __name__ == "__main__":
    main()
