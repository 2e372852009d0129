"""The privacy choice a consortium makes for its sites at provisioning, written into each site's ``local/``.

The templates (``provisioning/site_policies/site/privacy.json`` and ``privacy_budget.json``) define the named scopes
and the defaults; a ``PrivacyChoice`` says which scope a job gets when its ``meta.json`` names none, whether the site
offers only that scope (no job can opt out), the DP filter's clip and noise, and the site's lifetime budget.
FLARE does the rest: a job naming a scope the site does not offer is not deployed there
(``privacy scope 'x' is not allowed``), so a job never runs unfiltered by asking for something the site lacks.

Why the choice is explicit: site-level DP on every update (the ``dp_update`` scope) costs nearly all of the model's
Dice with the few sites of a hospital consortium (docs/deployment.md, "Site privacy"). A site that must have it
still can (``--privacy-scope dp_update --enforce-scope``); everyone else sees what they chose when they provision.
"""

from __future__ import annotations

import argparse
import copy
import math
from dataclasses import dataclass
from pathlib import Path

DP_FILTER = "fedseg3d.filters.gaussian_dp.GaussianDPFilter"
DP_SCOPE = "dp_update"
ROUNDS_SHOWN = (1, 5, 20)


@dataclass(frozen=True)
class PrivacyChoice:
    """What the admin chose; ``None`` keeps the template's value.

    Attributes:
        default_scope: scope a job gets when its ``meta.json`` names none.
        enforce: offer only ``default_scope``; a job naming another scope is not deployed.
        clip_norm: the DP scope's L2 clip norm C.
        noise_multiplier: the DP scope's sigma (noise std sigma * C).
        dp_rounds: calibrate sigma so that the site's budget covers exactly this many DP rounds (all jobs together).
        epsilon_budget: the site's lifetime epsilon budget.
        delta: the budget's delta.
    """

    default_scope: str | None = None
    enforce: bool = False
    clip_norm: float | None = None
    noise_multiplier: float | None = None
    dp_rounds: int | None = None
    epsilon_budget: float | None = None
    delta: float | None = None


def _positive(option: str, value: float | None) -> None:
    if value is None:
        return
    if isinstance(value, bool) or not isinstance(value, int | float) or not 0 < value < math.inf:
        raise ValueError(f"{option} must be a finite number > 0, got {value!r}")


def check_choice(choice: PrivacyChoice) -> None:
    """Refuse values out of range, naming the command-line option.

    Raises:
        ValueError: a value out of range, or both ``--dp-noise-multiplier`` and ``--dp-rounds``.
    """
    _positive("--dp-clip-norm", choice.clip_norm)
    _positive("--dp-noise-multiplier", choice.noise_multiplier)
    _positive("--epsilon-budget", choice.epsilon_budget)
    if choice.delta is not None and not 0 < choice.delta < 1:
        raise ValueError(f"--delta must be in (0, 1), got {choice.delta!r}")
    if choice.dp_rounds is not None and (isinstance(choice.dp_rounds, bool) or choice.dp_rounds < 1):
        raise ValueError(f"--dp-rounds must be an integer >= 1, got {choice.dp_rounds!r}")
    if choice.dp_rounds is not None and choice.noise_multiplier is not None:
        raise ValueError("give --dp-noise-multiplier or --dp-rounds, not both: --dp-rounds calibrates the noise")
    if choice.enforce and not choice.default_scope:
        raise ValueError("--enforce-scope needs --privacy-scope: the one scope the site will offer")


def dp_filter_args(privacy: dict, source: str) -> dict:
    """The ``args`` of the DP scope's ``GaussianDPFilter`` in a privacy policy (the dict itself, not a copy).

    Raises:
        ValueError: the policy has no ``dp_update`` scope with that filter, naming ``source``.
    """
    for scope in privacy.get("scopes", []):
        if scope.get("name") == DP_SCOPE:
            for item in scope.get("task_result_filters", []):
                if item.get("path") == DP_FILTER:
                    return item.setdefault("args", {})
    raise ValueError(f"{source}: scopes: no '{DP_SCOPE}' scope with a {DP_FILTER} task result filter")


def render(
    choice: PrivacyChoice, privacy_template: dict, budget_template: dict, source: str = "privacy.json"
) -> tuple[dict, dict]:
    """The site's ``privacy.json`` and ``privacy_budget.json`` for ``choice`` (the templates are not changed).

    Raises:
        ValueError: a value out of range, or a default scope the template does not define (naming ``source``).
    """
    from fedseg3d.privacy.accounting import noise_multiplier_for

    check_choice(choice)
    privacy, budget = copy.deepcopy(privacy_template), copy.deepcopy(budget_template)
    names = [scope.get("name") for scope in privacy.get("scopes", [])]
    default = choice.default_scope or privacy.get("default_scope")
    if default not in names:
        raise ValueError(f"--privacy-scope: '{default}' is not a scope of {source} (it has: {', '.join(names)})")
    privacy["default_scope"] = default
    if choice.enforce:
        privacy["scopes"] = [scope for scope in privacy["scopes"] if scope.get("name") == default]
    for field, value in (("epsilon_budget", choice.epsilon_budget), ("delta", choice.delta)):
        if value is not None:
            budget[field] = float(value)
    dp_options = {"--dp-clip-norm": choice.clip_norm, "--dp-noise-multiplier": choice.noise_multiplier}
    dp_options["--dp-rounds"] = choice.dp_rounds
    given = [option for option, value in dp_options.items() if value is not None]
    if DP_SCOPE not in [scope.get("name") for scope in privacy["scopes"]]:
        if given:
            raise ValueError(f"{', '.join(given)}: the site offers no '{DP_SCOPE}' scope, so this would change nothing")
    else:
        args = dp_filter_args(privacy, source)
        if choice.clip_norm is not None:
            args["clip_norm"] = float(choice.clip_norm)
        if choice.noise_multiplier is not None:
            args["noise_multiplier"] = float(choice.noise_multiplier)
        if choice.dp_rounds is not None:
            try:
                sigma = noise_multiplier_for(
                    budget["epsilon_budget"], budget["delta"], 1.0, choice.dp_rounds, budget.get("accountant", "rdp")
                )
            except ValueError as err:
                raise ValueError(f"--dp-rounds {choice.dp_rounds}: {err}") from err
            args["noise_multiplier"] = math.ceil(sigma * 100) / 100  # more noise, never more epsilon, than asked
    return privacy, budget


def describe(privacy: dict, budget: dict) -> list[str]:
    """What a site with these files does, one line each, with the DP scope's epsilon from the project's accountant."""
    from fedseg3d.privacy.accounting import epsilon_for, rounds_affordable, site_update_mechanism

    eps, delta, accountant = budget["epsilon_budget"], budget["delta"], budget.get("accountant", "rdp")
    names = [scope["name"] for scope in privacy["scopes"]]
    lines = [
        f"scopes offered: {', '.join(names)}; a job whose meta.json names no scope gets '{privacy['default_scope']}'"
        + ("; no other scope is offered, so no job can opt out" if len(names) == 1 else ""),
        f"budget: epsilon {eps:g} at delta {delta:g} ({accountant}) over all jobs, spent in local/privacy_ledger.json",
    ]
    for scope in privacy["scopes"]:
        filters = [f["path"].rsplit(".", 1)[-1] for f in scope.get("task_result_filters", [])]
        if scope["name"] == DP_SCOPE:
            args = dp_filter_args(privacy, "privacy.json")
            sigma = args["noise_multiplier"]
            spent = ", ".join(
                f"{epsilon_for([site_update_mechanism(sigma, n)], delta, accountant):.2f} after {n}"
                for n in ROUNDS_SHOWN
            )
            rounds = rounds_affordable(sigma, eps, delta, accountant=accountant)
            lines.append(
                f"  {scope['name']}: GaussianDPFilter clip {args['clip_norm']:g}, noise multiplier {sigma:g}: epsilon "
                f"{spent} rounds; the budget covers {rounds} rounds, then the site refuses to send"
            )
        else:
            lines.append(f"  {scope['name']}: {', '.join(filters) or 'no site filter'}")
    lines.append("  what each scope costs in Dice: docs/deployment.md, 'Site privacy'")
    return lines


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The provisioning options of the privacy choice (``provision``, ``add-site``, ``renew``)."""
    group = parser.add_argument_group(
        "site privacy", "written into each site's local/privacy.json and privacy_budget.json; defaults: the templates"
    )
    group.add_argument(
        "--privacy-scope",
        metavar="SCOPE",
        help="scope a job gets when its meta.json names none: 'plain' (no site filter; the template's default) or "
        "'dp_update' (site-level DP on every update; costs most of the Dice with few sites)",
    )
    group.add_argument(
        "--enforce-scope", action="store_true", help="offer only --privacy-scope: a job asking another is not deployed"
    )
    group.add_argument("--dp-clip-norm", type=float, metavar="C", help="dp_update: L2 clip norm of one round's update")
    sigma = group.add_mutually_exclusive_group()
    sigma.add_argument("--dp-noise-multiplier", type=float, metavar="SIGMA", help="dp_update: noise std / clip norm")
    sigma.add_argument(
        "--dp-rounds", type=int, metavar="N", help="dp_update: calibrate the noise so the budget covers N rounds"
    )
    group.add_argument("--epsilon-budget", type=float, metavar="EPS", help="the site's lifetime epsilon budget")
    group.add_argument("--delta", type=float, help="the budget's delta")


def choice_from_args(args: argparse.Namespace) -> PrivacyChoice:
    """The ``PrivacyChoice`` of parsed options (checked later, by ``render``)."""
    return PrivacyChoice(
        default_scope=args.privacy_scope,
        enforce=args.enforce_scope,
        clip_norm=args.dp_clip_norm,
        noise_multiplier=args.dp_noise_multiplier,
        dp_rounds=args.dp_rounds,
        epsilon_budget=args.epsilon_budget,
        delta=args.delta,
    )


def template_paths(policies_dir: Path) -> tuple[Path, Path]:
    """The site templates of ``privacy.json`` and ``privacy_budget.json`` under a ``site_policies`` folder."""
    return Path(policies_dir) / "site" / "privacy.json", Path(policies_dir) / "site" / "privacy_budget.json"
