"""Screen a round's site updates before they are aggregated: broken, outlying, lazy, replayed or mis-weighted ones.

Pure numpy (no FLARE): the ``ScreenedAggregator`` feeds it the decoded updates of one round and excludes what it
flags. Every rule compares a site with *this round's other sites* and with *its own accepted history*, using robust
statistics, so no threshold is tuned per job:

- **non-finite**: any NaN or infinity.
- **free rider**: the update is (numerically) the model it was sent: a ``WEIGHT_DIFF`` whose norm is at most
  ``FREE_RIDER_RATIO`` of the round's median, or ``WEIGHTS`` equal to the round's global model to that precision.
- **replay**: the update's SHA-256 equals one received in an earlier round (from any site).
- **norm**: with ``x = log(norm)``, the site's ``x`` is more than ``k`` robust deviations (``1.4826 * MAD``) from
  the median of the round's updates, *and* from the median of its own accepted history (when it has one). The
  deviation is never taken below ``log(2)``, so with ``k = 3.5`` a norm within ``2 ** 3.5``, about 11x, of the
  median is never an outlier: sites that train for epochs take more steps the more data they hold, and their norms
  differ by several times in clean runs. A 100x update stands out; a 5x one needs ``norm_bound``.
- **direction**: the cosine of the update with the coordinate-wise median of the *other* sites' updates is more
  than ``k`` robust deviations below the round's median cosine, the deviation never below ``COSINE_FLOOR`` -- and
  only in a round whose updates agree (median cosine more than ``k`` deviations above zero). Late in training honest
  updates are nearly orthogonal (a POC run's round 13 had a median cosine of -0.004 and one honest site at -0.26):
  there is then no common direction to deviate from, and a reversed near-orthogonal update does little harm.
- **sample count**: the count the site declares (its aggregation weight) is more than ``k`` robust deviations (in
  log, the unit never below ``log(2)``) from its own accepted history, or is not a positive number.

``k`` (``z_threshold``, default 3.5) is the one constant a user may change: Iglewicz and Hoaglin's cut-off for the
modified z-score, under which a normal sample flags about one value in 2,000. The round rules need three or more
updates (with two, neither can be called the outlier); the history rules need one accepted round of the site's own.

Differential privacy: the Gaussian filter adds noise of norm about ``sigma * C * sqrt(d)`` to every update, which
dominates it. All sites' norms are then nearly equal (the log floor holds, a 100x update still stands out)
and all cosines are near zero (the cosine floor holds), so a noisy round excludes nothing clean; but a sign-flipped
or noise update is hidden by the noise, as DP means it to be. Compressed updates are screened after the server's
dequantize filter, i.e. as they will be aggregated.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass, field

import numpy as np

DEFAULT_Z = 3.5
MAD_TO_SIGMA = 1.4826  # MAD of a normal sample times this estimates its standard deviation
LOG_FLOOR = math.log(2.0)  # the smallest deviation unit of a log norm or log sample count
COSINE_FLOOR = 0.05  # cosines closer than this are never told apart (DP noise puts all of them near zero)
FREE_RIDER_RATIO = 1e-6  # below a millionth of the others' movement, a site did not train
MIN_SITES_FOR_ROUND_RULES = 3

WEIGHT_DIFF = "WEIGHT_DIFF"
WEIGHTS = "WEIGHTS"


@dataclass(frozen=True)
class SiteUpdate:
    """One site's update as the server will aggregate it.

    Attributes:
        site: the site's name.
        params: array name -> array (decoded, after the server's result filters).
        kind: ``"WEIGHT_DIFF"`` (local minus global) or ``"WEIGHTS"`` (the full local model).
        num_samples: the count the site declares (its weight in the mean); None when it sent none.
    """

    site: str
    params: dict[str, np.ndarray]
    kind: str = WEIGHT_DIFF
    num_samples: float | None = None


@dataclass(frozen=True)
class Verdict:
    """What the screen decided about one update, and why (``reasons`` is empty when it is accepted)."""

    site: str
    round: int
    digest: str
    norm: float
    cosine: float | None
    num_samples: float | None
    reasons: tuple[str, ...] = ()

    @property
    def accepted(self) -> bool:
        return not self.reasons

    def as_dict(self) -> dict:
        return {
            "site": self.site,
            "round": self.round,
            "digest": self.digest,
            "norm": self.norm,
            "cosine": self.cosine,
            "num_samples": self.num_samples,
            "accepted": self.accepted,
            "reasons": list(self.reasons),
        }


def params_digest(params: dict[str, np.ndarray]) -> str:
    """SHA-256 of a parameter dict (names, dtypes, shapes and bytes, in name order): equal iff the arrays are."""
    digest = hashlib.sha256()
    for name in sorted(params):
        array = np.ascontiguousarray(params[name])
        digest.update(f"{name}|{array.dtype.str}|{array.shape}|".encode())
        digest.update(array.tobytes())
    return digest.hexdigest()


def l2_norm(params: dict[str, np.ndarray]) -> float:
    return float(math.sqrt(sum(float(np.sum(np.square(v, dtype=np.float64))) for v in params.values())))


def robust_scale(values: np.ndarray, floor: float) -> float:
    """``1.4826 * MAD`` of ``values``, never below ``floor``."""
    if values.size == 0:
        return floor
    return max(MAD_TO_SIGMA * float(np.median(np.abs(values - np.median(values)))), floor)


def _outlying(value: float, sample: np.ndarray, k: float, floor: float) -> tuple[bool, float, float]:
    """Whether ``value`` lies more than ``k`` robust deviations from the median of ``sample``; (flag, median, dev)."""
    centre = float(np.median(sample))
    scale = robust_scale(sample, floor)
    return abs(value - centre) > k * scale, centre, scale


@dataclass
class SiteRecord:
    """A site's accepted history (log norms, declared sample counts) and its exclusions so far."""

    log_norms: list[float] = field(default_factory=list)
    log_samples: list[float] = field(default_factory=list)
    excluded_rounds: list[int] = field(default_factory=list)


class UpdateScreen:
    """Screens each round's updates against the round and each site's accepted history (see the module docstring).

    Args:
        z_threshold: ``k``, robust deviations beyond which a value is an outlier (default 3.5).
        history: how many of a site's accepted rounds its history keeps (recent ones: training changes norms).
    """

    def __init__(self, z_threshold: float = DEFAULT_Z, history: int = 5) -> None:
        if not isinstance(z_threshold, int | float) or not z_threshold > 0:
            raise ValueError(f"z_threshold must be a positive number, got {z_threshold!r}")
        if not isinstance(history, int) or history < 1:
            raise ValueError(f"history must be a positive integer, got {history!r}")
        self.k = float(z_threshold)
        self.history = history
        self.sites: dict[str, SiteRecord] = {}
        self._seen: dict[str, tuple[int, str]] = {}  # digest -> (round, site) of updates received before

    def screen(
        self, round_num: int, updates: list[SiteUpdate], reference: dict[str, np.ndarray] | None = None
    ) -> list[Verdict]:
        """Judge one round's updates, then remember the accepted ones as the sites' history.

        Args:
            round_num: the round the updates answer.
            updates: one per site.
            reference: the global model the sites were sent (only used for ``WEIGHTS`` updates, which are screened
                as their difference to it; without it a ``WEIGHTS`` update is screened as is and no free rider is
                found among them).

        Returns:
            One verdict per update, in the order given.
        """
        digests = [params_digest(u.params) for u in updates]
        deltas = [self._delta(u, reference) for u in updates]
        reasons: list[list[str]] = [[] for _ in updates]
        finite = [all(np.all(np.isfinite(v)) for v in d.values()) for d in deltas]
        norms = [l2_norm(d) if ok else float("nan") for d, ok in zip(deltas, finite, strict=True)]
        for i, ok in enumerate(finite):
            if not ok:
                reasons[i].append("non-finite values (NaN or infinity) in the update")
        live = [i for i, ok in enumerate(finite) if ok]
        self._free_riders(updates, norms, live, reference, reasons)
        self._replays(round_num, updates, digests, reasons)
        moving = [i for i in live if not reasons[i]]
        self._norm_rule(updates, norms, moving, reasons)
        cosines = self._direction_rule(deltas, moving, reasons)
        self._sample_rule(updates, reasons)
        verdicts = [
            Verdict(
                site=u.site,
                round=round_num,
                digest=digests[i],
                norm=norms[i],
                cosine=cosines.get(i),
                num_samples=u.num_samples,
                reasons=tuple(reasons[i]),
            )
            for i, u in enumerate(updates)
        ]
        self._remember(round_num, updates, verdicts)
        return verdicts

    @staticmethod
    def _delta(update: SiteUpdate, reference: dict[str, np.ndarray] | None) -> dict[str, np.ndarray]:
        if update.kind == WEIGHT_DIFF:
            return {k: np.asarray(v, dtype=np.float64) for k, v in update.params.items()}
        if update.kind != WEIGHTS:
            raise ValueError(f"update from {update.site}: kind must be {WEIGHT_DIFF} or {WEIGHTS}, got {update.kind!r}")
        ref = reference or {}
        return {
            k: np.asarray(v, dtype=np.float64) - (np.asarray(ref[k], dtype=np.float64) if k in ref else 0.0)
            for k, v in update.params.items()
        }

    def _free_riders(
        self,
        updates: list[SiteUpdate],
        norms: list[float],
        live: list[int],
        reference: dict[str, np.ndarray] | None,
        reasons: list[list[str]],
    ) -> None:
        for i in live:
            if updates[i].kind == WEIGHTS and reference is None:
                continue  # the sent model is unknown: nothing to compare with
            others = [norms[j] for j in live if j != i and norms[j] > 0]
            scale = float(np.median(others)) if others else 0.0
            if norms[i] == 0.0 or (scale > 0 and norms[i] <= FREE_RIDER_RATIO * scale):
                reasons[i].append(
                    f"free rider: the update is the model it was sent (norm {norms[i]:.3g}, others' median {scale:.3g})"
                )

    def _replays(self, round_num: int, updates: list[SiteUpdate], digests: list[str], reasons: list[list[str]]):
        for i, digest in enumerate(digests):
            if digest in self._seen and not reasons[i]:
                seen_round, seen_site = self._seen[digest]
                reasons[i].append(f"replay: identical to the update {seen_site} sent in round {seen_round}")

    def _norm_rule(self, updates: list[SiteUpdate], norms: list[float], moving: list[int], reasons) -> None:
        if len(moving) < MIN_SITES_FOR_ROUND_RULES:
            return
        logs = np.log(np.array([norms[i] for i in moving]))
        for pos, i in enumerate(moving):
            far, centre, scale = _outlying(float(logs[pos]), logs, self.k, LOG_FLOOR)
            if not far:
                continue
            own = self.sites.get(updates[i].site)
            if own is not None and own.log_norms:
                far_own, own_centre, _ = _outlying(float(logs[pos]), np.array(own.log_norms), self.k, LOG_FLOOR)
                if not far_own:
                    continue  # this site's updates are always this size: its data, not an attack
            ratio = math.exp(float(logs[pos]) - centre)
            reasons[i].append(
                f"norm {norms[i]:.3g} is {ratio:.3g}x the round's median {math.exp(centre):.3g} "
                f"(|log ratio| {abs(float(logs[pos]) - centre):.2f} > {self.k:g} x {scale:.2f})"
            )

    def _direction_rule(self, deltas: list[dict[str, np.ndarray]], moving: list[int], reasons) -> dict[int, float]:
        if len(moving) < MIN_SITES_FOR_ROUND_RULES:
            return {}
        keys = sorted(set.intersection(*(set(deltas[i]) for i in moving)))
        vectors = np.stack([np.concatenate([deltas[i][k].ravel() for k in keys]) for i in moving])
        cosines = np.empty(len(moving))
        for pos in range(len(moving)):
            others = np.median(np.delete(vectors, pos, axis=0), axis=0)
            denom = float(np.linalg.norm(vectors[pos]) * np.linalg.norm(others))
            cosines[pos] = float(vectors[pos] @ others) / denom if denom > 0 else 0.0
        centre = float(np.median(cosines))
        scale = robust_scale(cosines, COSINE_FLOOR)
        if centre <= self.k * scale:  # no common direction this round (see the module): nothing to deviate from
            return {i: float(cosines[pos]) for pos, i in enumerate(moving)}
        for pos, i in enumerate(moving):
            if cosines[pos] < centre - self.k * scale:
                reasons[i].append(
                    f"direction: cosine {cosines[pos]:.3f} to the other sites' median update, the round's median "
                    f"is {centre:.3f} (more than {self.k:g} x {scale:.3f} below)"
                )
        return {i: float(cosines[pos]) for pos, i in enumerate(moving)}

    def _sample_rule(self, updates: list[SiteUpdate], reasons: list[list[str]]) -> None:
        for i, update in enumerate(updates):
            count = update.num_samples
            if count is None:
                continue
            if not (isinstance(count, int | float) and math.isfinite(count) and count > 0):
                reasons[i].append(f"sample count {count!r} is not a positive number")
                continue
            own = self.sites.get(update.site)
            if own is None or not own.log_samples:
                continue
            history = np.array(own.log_samples)
            far, centre, _ = _outlying(math.log(count), history, self.k, LOG_FLOOR)
            if far:
                reasons[i].append(
                    f"sample count {count:g} does not fit the site's history (median {math.exp(centre):g})"
                )

    def _remember(self, round_num: int, updates: list[SiteUpdate], verdicts: list[Verdict]) -> None:
        for update, verdict in zip(updates, verdicts, strict=True):
            self._seen.setdefault(verdict.digest, (round_num, update.site))
            own = self.sites.setdefault(update.site, SiteRecord())
            if not verdict.accepted:
                own.excluded_rounds.append(round_num)
                continue
            if verdict.norm > 0:
                own.log_norms = (own.log_norms + [math.log(verdict.norm)])[-self.history :]
            if update.num_samples is not None:
                own.log_samples = (own.log_samples + [math.log(update.num_samples)])[-self.history :]
