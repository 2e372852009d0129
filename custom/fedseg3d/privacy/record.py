"""The privacy record a site attaches to each released update (DXO meta), read by the server's contribution log.

One definition of the key names for all three places that use them: ``GaussianDPFilter`` and the DP-SGD learner
write them at the site after charging the site's ledger; ``fedseg3d.server.contribution_log`` copies them into
``<run dir>/fedseg3d/privacy.jsonl``. Plain Python, no nvflare.
"""

from __future__ import annotations

META_EPSILON = "dp_epsilon"  # cumulative epsilon of the unit at the site, this release included
META_DELTA = "dp_delta"  # the delta that epsilon is computed at (the site budget's)
META_UNIT = "dp_unit"  # what is protected: "site_update" (update filter) or "patient" (DP-SGD)
META_SCOPE = "dp_scope"  # "site_ledger" (all jobs at this site) or "job" (no site budget: this job only)
PRIVACY_META = {META_EPSILON: "epsilon", META_DELTA: "delta", META_UNIT: "unit", META_SCOPE: "scope"}


def privacy_meta(epsilon: float, delta: float, unit: str, scope: str) -> dict[str, float | str]:
    """The meta entries for one release."""
    return {META_EPSILON: float(epsilon), META_DELTA: float(delta), META_UNIT: unit, META_SCOPE: scope}
