"""FedAvg's aggregator with update quality control: screen each round's updates, exclude the flagged ones, aggregate
the rest with a chosen rule.

It plugs into FLARE's documented seam, ``FedAvg(aggregator=...)`` (a ``ModelAggregator``: ``accept_model`` stores a
result, ``aggregate_model`` runs once the round's results are in, ``reset_stats`` at each round's start). Excluding
needs the whole round (a median of one is no statistic), so results are kept until ``aggregate_model``, not summed as
they arrive: memory is one update per site, which FedAvg's streaming sum avoids but which is small next to the model
the server already holds for each site's task.

What the admin sees (server log): one WARNING per excluded update naming the site, round and reason; an ERROR when a
site's updates have been excluded ``exclusions_to_flag`` times (it is then listed in ``fedseg3d/qc/flagged_sites.json``
by ``AuditTrailWriter``, which also records every verdict); an ERROR when too few updates pass.

Too few updates pass (fewer than ``min_sites``): the round keeps the previous global model (an empty difference)
and the job goes on. Why not stop: the exclusions are a statistical judgement, and one bad round should cost one
round, not the job; a site that keeps failing QC is flagged for the admin, who can stop the job. Results of the
round are discarded either way: nothing flagged ever reaches the global model.

A nested component (``FedAvg``'s argument) receives no FLARE events, so it hands its verdicts to the audit trail in
the aggregate's meta (``QC_META_KEY``), which ``AuditTrailWriter`` removes before the model is sent on.
"""

from __future__ import annotations

import math

import numpy as np
from nvflare.apis.dxo import MetaKey
from nvflare.app_common.abstract.fl_model import FLModel, ParamsType
from nvflare.app_common.aggregators.model_aggregator import ModelAggregator

from fedseg3d.server.robust_aggregation import RULES, aggregate
from fedseg3d.server.update_screen import DEFAULT_Z, WEIGHT_DIFF, WEIGHTS, SiteUpdate, UpdateScreen, Verdict

QC_META_KEY = "fedseg3d_update_qc"


def _num_samples(model: FLModel) -> float | None:
    value = (model.meta or {}).get(MetaKey.NUM_STEPS_CURRENT_ROUND)
    return float(value) if isinstance(value, int | float) and not isinstance(value, bool) else None


def _round_of(model: FLModel) -> int | None:
    value = model.current_round if model.current_round is not None else (model.meta or {}).get("current_round")
    return int(value) if value is not None else None


class ScreenedAggregator(ModelAggregator):
    """Screens (``UpdateScreen``) and aggregates (``robust_aggregation``) one round's site updates.

    Args:
        update_qc: screen and exclude (True) or aggregate everything received (False; verdicts still recorded).
        aggregation_rule: ``weighted_mean`` (FedAvg), ``median``, ``trimmed_mean`` or ``norm_bound``.
        z_threshold: robust deviations beyond which a statistic is an outlier (``UpdateScreen``).
        trim_fraction: share of values dropped at each end by ``trimmed_mean``.
        exclusions_to_flag: exclusions after which a site is marked for the admin.
        min_sites: fewest updates that must pass for the round to change the global model.
    """

    def __init__(
        self,
        update_qc: bool = True,
        aggregation_rule: str = "weighted_mean",
        z_threshold: float = DEFAULT_Z,
        trim_fraction: float = 0.25,
        exclusions_to_flag: int = 3,
        min_sites: int = 1,
    ) -> None:
        super().__init__()
        if aggregation_rule not in RULES:
            raise ValueError(f"aggregation_rule must be one of {sorted(RULES)}, got {aggregation_rule!r}")
        if not 0.0 <= trim_fraction < 0.5:
            raise ValueError(f"trim_fraction must be in [0, 0.5), got {trim_fraction!r}")
        for name, value in (("exclusions_to_flag", exclusions_to_flag), ("min_sites", min_sites)):
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        self.update_qc = bool(update_qc)
        self.rule = aggregation_rule
        self.trim_fraction = float(trim_fraction)
        self.exclusions_to_flag = exclusions_to_flag
        self.min_sites = min_sites
        self.screen = UpdateScreen(z_threshold)
        self.flagged: dict[str, dict] = {}
        self._results: list[FLModel] = []
        self._reference: dict[str, np.ndarray] | None = None  # the last FULL aggregate: WEIGHTS results' base

    def accept_model(self, model: FLModel) -> None:
        self._results.append(model)

    def reset_stats(self) -> None:
        self._results = []

    def aggregate_model(self) -> FLModel:
        results, self._results = self._results, []
        round_num = next((r for r in map(_round_of, results) if r is not None), -1)
        updates = [self._as_update(m) for m in results]
        kinds = {u.kind for u in updates}
        if len(kinds) > 1:
            raise ValueError(f"round {round_num}: sites sent different kinds of update {sorted(kinds)}; cannot mix")
        verdicts = self.screen.screen(round_num, updates, self._reference)
        if self.update_qc:
            self._report(verdicts)
            kept = [i for i, v in enumerate(verdicts) if v.accepted]
        else:
            kept = list(range(len(updates)))
        # nr_accepted: FedAvg overwrites nr_aggregated with the count of results received, QC passed or not.
        meta = {QC_META_KEY: self._summary(round_num, verdicts), "nr_accepted": len(kept)}
        if len(kept) < self.min_sites:
            self.error(
                f"update QC: round {round_num}: {len(kept)} of {len(updates)} updates passed, min_sites is "
                f"{self.min_sites}: the global model is kept unchanged this round"
            )
            return FLModel(params_type=ParamsType.DIFF, params={}, current_round=round_num, meta=meta)
        chosen = [updates[i] for i in kept]
        params = aggregate(
            self.rule, [u.params for u in chosen], [u.num_samples or 1.0 for u in chosen], self.trim_fraction
        )
        if WEIGHTS in kinds:
            self._reference = params
        return FLModel(
            params_type=ParamsType.FULL if WEIGHTS in kinds else ParamsType.DIFF,
            params=params,
            metrics=self._metrics([results[i] for i in kept], [u.num_samples or 1.0 for u in chosen]),
            current_round=round_num,
            meta=meta,
        )

    @staticmethod
    def _as_update(model: FLModel) -> SiteUpdate:
        site = (model.meta or {}).get("client_name", "?")
        kind = WEIGHTS if model.params_type == ParamsType.FULL else WEIGHT_DIFF
        params = {k: np.asarray(v) for k, v in (model.params or {}).items()}
        return SiteUpdate(site=site, params=params, kind=kind, num_samples=_num_samples(model))

    def _report(self, verdicts: list[Verdict]) -> None:
        for verdict in verdicts:
            if verdict.accepted:
                continue
            self.warning(
                f"update QC: round {verdict.round}: excluded the update of {verdict.site}: {'; '.join(verdict.reasons)}"
            )
            rounds = self.screen.sites[verdict.site].excluded_rounds
            if len(rounds) >= self.exclusions_to_flag:
                first = verdict.site not in self.flagged
                self.flagged[verdict.site] = {
                    "exclusions": len(rounds),
                    "rounds": list(rounds),
                    "last_reason": "; ".join(verdict.reasons),
                }
                if first:
                    self.error(
                        f"update QC: site {verdict.site} marked for the admin: {len(rounds)} of its updates excluded "
                        f"(rounds {rounds}); check the site's data, software and integrity"
                    )

    def _summary(self, round_num: int, verdicts: list[Verdict]) -> dict:
        return {
            "round": round_num,
            "update_qc": self.update_qc,
            "aggregation_rule": self.rule,
            "verdicts": [v.as_dict() for v in verdicts],
            "flagged_sites": dict(self.flagged),
        }

    @staticmethod
    def _metrics(results: list[FLModel], weights: list[float]) -> dict | None:
        """Weighted mean of the numeric metrics every kept result reports (as FedAvg's own aggregation does)."""
        metrics = [m.metrics for m in results]
        if not metrics or any(not m for m in metrics):
            return None
        names = set.intersection(*(set(m) for m in metrics))
        total = sum(weights)
        out = {}
        for name in sorted(names):
            values = [m[name] for m in metrics]
            if all(isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v) for v in values):
                out[name] = sum(v * w for v, w in zip(values, weights, strict=True)) / total
        return out or None
