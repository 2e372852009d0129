"""Site-level differential privacy for outgoing weight differences: clip, add Gaussian noise, charge the ledger.

The Gaussian mechanism of DP-FedAvg (McMahan et al., "Learning Differentially Private Recurrent Language Models",
ICLR 2018), applied by each site to its own update before it leaves: the global L2 norm of the whole weight
difference (all keys together) is clipped to ``clip_norm`` C, then N(0, (sigma * C)^2) noise is added to every
element, every round. One round is one Gaussian mechanism with sensitivity C and noise multiplier sigma, so the
epsilon of a site's updates over rounds and jobs comes from an Opacus accountant (``fedseg3d.privacy.accounting``),
never from a formula here.

What the epsilon means: the server (or anyone who sees the updates) cannot tell, beyond (epsilon, delta), whether a
site took part with its data or sent a zero update ("add/remove" neighbouring, sensitivity C, as in the paper).
With ``neighbouring="replace"`` (any two datasets of the site) the sensitivity is 2C and the filter accounts with
sigma / 2. Not covered: the DXO meta the learner adds (``NUM_STEPS_CURRENT_ROUND`` reveals the amount of local
work), validation metrics, timing. No amplification from the server's client sampling is claimed.

Fail closed: every problem raises and the unfiltered update never leaves. A bad argument raises in ``__init__``; at
run time a DXO that is not ``WEIGHT_DIFF`` (the learner must send differences), a value that is not a floating
numpy array, a NaN or infinity, or an exhausted budget raise in ``process``. Integer arrays are rejected, not passed
through: the learner already keeps integer state (``num_batches_tracked``) local, so one arriving here means the
model split is broken, and an integer leaving unnoised would leak while a noised one would no longer be an integer.
Error replies (return code not OK) leave with their return code only: any payload they carry is dropped.
This is a plain ``Filter``, not an ``nvflare.apis.dxo_filter.DXOFilter``: that base class passes shareables that are
not DXOs, and DXO kinds it was not configured for, through unchanged, which is failing open.

What FLARE does when this filter raises (nvflare 2.9.0, ``nvflare/private/fed/client/client_runner.py``,
``ClientRunner._do_task``): ``apply_filters`` propagates the exception, the runner logs it and returns a *new*
``make_reply(ReturnCode.TASK_RESULT_FILTER_ERROR)`` (an empty Shareable with only the return code), so the executor's
result is dropped and never sent. On the server, ``BaseModelController`` (``FedAvg``) treats a non-OK return code by
its ``ignore_result_error`` mode: by default it panics (ends the job) when the round can no longer reach
``min_responses``, and otherwise skips that site for the round.

Where the budget comes from and how a release is charged or refused: ``fedseg3d.privacy.spend``, the same rule
DP-SGD follows (site settings only, never the job, which the server writes). Without a budget file the filter refuses
with ``require_budget=True``; otherwise it warns once, still clips and noises, and reports the epsilon of this job's
releases only (``dp_scope = "job"``). Sites that mean it list this filter in their ``local/privacy.json`` scope with
``require_budget: true``.

Limitations: noise comes from numpy's PCG64 and floating-point Gaussian sampling, which is not hardened against
the floating-point attacks of Mironov (CCS 2012) and Jin et al. (S&P 2022). A fixed ``seed`` makes the noise
reproducible by anyone who knows it (including the server, which can read the job config): tests only.
"""

from __future__ import annotations

import copy
import math
import numbers
import threading
from collections.abc import Mapping
from pathlib import Path

import numpy as np
from nvflare.apis.dxo import DXO, DataKind, from_shareable
from nvflare.apis.filter import Filter
from nvflare.apis.fl_constant import FLContextKey, FLMetaKey, ReturnCode
from nvflare.apis.fl_context import FLContext
from nvflare.apis.shareable import ReservedHeaderKey, Shareable, make_reply

from fedseg3d.privacy.accounting import ACCOUNTANTS, SITE_UPDATE, site_update_mechanism
from fedseg3d.privacy.ledger import PrivacyBudgetExceeded
from fedseg3d.privacy.record import META_DELTA, META_EPSILON, META_SCOPE, META_UNIT
from fedseg3d.privacy.site_budget import PRIVACY_DIR_ENV
from fedseg3d.privacy.spend import PrivacySpend, Release

__all__ = [
    "META_DELTA", "META_EPSILON", "META_SCOPE", "META_UNIT", "PRIVACY_DIR_ENV",
    "GaussianDPFilter", "check_update", "clip_and_noise", "global_l2_norm",
]  # fmt: skip
NEIGHBOURING = {"add_remove": 1.0, "replace": 2.0}  # sensitivity in units of clip_norm
# Clip slightly inside C so that the cast back to float32 (relative error <= 2**-24 per element) cannot push the
# released norm above C. Clipping harder than needed costs nothing in privacy.
_CLIP_MARGIN = 1.0 - 1e-6


def check_update(data: object) -> dict[str, np.ndarray]:
    """Validate a weight difference: a non-empty dict of finite floating-point numpy arrays.

    Raises:
        TypeError: not a dict, a non-string key, a value that is not a numpy array, or a non-floating dtype.
        ValueError: empty, or a NaN or infinity anywhere.
    """
    if not isinstance(data, Mapping):
        raise TypeError(f"weight difference must be a dict of numpy arrays, got {type(data).__name__}")
    if not data:
        raise ValueError("weight difference is empty: nothing to protect points to a learner misconfiguration")
    for key, value in data.items():
        if not isinstance(key, str):
            raise TypeError(f"weight difference key {key!r} is not a string")
        if not isinstance(value, np.ndarray):
            raise TypeError(
                f"'{key}' is a {type(value).__name__}, expected a numpy array; have the executor send numpy "
                f"(server_expected_format='numpy')"
            )
        if not np.issubdtype(value.dtype, np.floating):
            raise TypeError(
                f"'{key}' has dtype {value.dtype}; only floating-point arrays may be shared. Integer state such as "
                f"num_batches_tracked must stay local (fedseg3d.models.local_state), not pass through unnoised"
            )
        if not np.isfinite(value).all():
            raise ValueError(f"'{key}' contains NaN or infinity; refusing to release a broken update")
    return dict(data)


def global_l2_norm(arrays: Mapping[str, np.ndarray]) -> float:
    """L2 norm of all arrays taken together, accumulated in float64 so large models do not overflow float32."""
    total = 0.0
    for value in arrays.values():
        flat = value.ravel().astype(np.float64)
        total += float(np.dot(flat, flat))
    return math.sqrt(total)


def clip_and_noise(
    arrays: Mapping[str, np.ndarray], clip_norm: float, noise_std: float, rng: np.random.Generator
) -> tuple[dict[str, np.ndarray], bool]:
    """Scale ``arrays`` so their global L2 norm is at most ``clip_norm``, then add N(0, noise_std^2) per element.

    Computed in float64 one key at a time (memory peaks at two float64 arrays the size of the largest tensor), then cast
    back to each array's dtype. The cast happens after the noise, so it is post-processing and cannot weaken the
    guarantee.

    Returns:
        The noised arrays and whether clipping changed the update.
    """
    norm = global_l2_norm(arrays)
    clipped = norm > clip_norm
    scale = clip_norm / norm * _CLIP_MARGIN if clipped else 1.0
    result = {}
    for key, value in arrays.items():
        released = value.astype(np.float64)  # a copy; in-place ops below keep 0-d arrays as arrays
        released *= scale
        if noise_std > 0:
            released += rng.normal(0.0, noise_std, size=value.shape)
        result[key] = released.astype(value.dtype)
    return result, clipped


class GaussianDPFilter(Filter):
    """Task-result filter: site-level (epsilon, delta)-DP for a site's weight differences (DP-FedAvg).

    Args:
        clip_norm: C, the bound on the global L2 norm of one round's update. Must be > 0.
        noise_multiplier: sigma; the noise std is sigma * C. Must be > 0 unless ``allow_no_noise``.
        seed: seed for the noise generator. Tests only: anyone who knows it can remove the noise. ``None``
            (default) seeds from the operating system.
        allow_no_noise: permit ``noise_multiplier == 0`` (clipping only, epsilon = infinity). A site budget still
            refuses such a release.
        require_budget: raise when the site has no budget file instead of warning (see module doc).
        neighbouring: ``"add_remove"`` (default, sensitivity C) or ``"replace"`` (sensitivity 2C).
        delta: the delta to report at when the site has no budget file; a site budget's delta always wins.
        accountant: ``"rdp"`` or ``"prv"`` when the site has no budget file; a site budget's choice always wins.
        pass_data_kinds: DXO kinds to let through unchanged (for instance ``["METRICS"]`` when this filter is in a
            site privacy scope, which applies to every task). They are not covered by the DP guarantee. Weight
            kinds may not be listed.
        tb_writer_id: id of a FLARE ``LogWriter`` component (the job's ``TBWriter``) to stream the cumulative
            ``dp_epsilon`` to the server's TensorBoard after each release; empty (default) to stream nothing. A
            missing or wrong component is an error at the first release, not silently skipped.

    Raises:
        ValueError: any argument out of range.
    """

    def __init__(
        self,
        clip_norm: float,
        noise_multiplier: float,
        seed: int | None = None,
        allow_no_noise: bool = False,
        require_budget: bool = False,
        neighbouring: str = "add_remove",
        delta: float = 1e-5,
        accountant: str = "rdp",
        pass_data_kinds: list[str] | None = None,
        tb_writer_id: str = "",
    ) -> None:
        super().__init__()
        if not _is_real(clip_norm) or not 0 < clip_norm < math.inf:
            raise ValueError(f"clip_norm must be a finite number > 0, got {clip_norm!r}")
        if not _is_real(noise_multiplier) or not 0 <= noise_multiplier < math.inf:
            raise ValueError(f"noise_multiplier must be a finite number >= 0, got {noise_multiplier!r}")
        if noise_multiplier == 0 and allow_no_noise is not True:
            raise ValueError(
                "noise_multiplier == 0 releases the clipped update as is (epsilon = infinity); "
                "set allow_no_noise=True if that is really intended"
            )
        if seed is not None and (isinstance(seed, bool) or not isinstance(seed, numbers.Integral) or seed < 0):
            raise ValueError(f"seed must be None or an integer >= 0, got {seed!r}")
        if neighbouring not in NEIGHBOURING:
            raise ValueError(f"neighbouring must be one of {sorted(NEIGHBOURING)}, got {neighbouring!r}")
        if not _is_real(delta) or not 0 < delta < 1:
            raise ValueError(f"delta must be a number in (0, 1), got {delta!r}")
        if accountant not in ACCOUNTANTS:
            raise ValueError(f"accountant must be one of {ACCOUNTANTS}, got {accountant!r}")
        for name, flag in (("allow_no_noise", allow_no_noise), ("require_budget", require_budget)):
            if not isinstance(flag, bool):
                raise ValueError(f"{name} must be true or false, got {flag!r}")
        passed = list(pass_data_kinds or [])
        forbidden = {DataKind.WEIGHTS, DataKind.WEIGHT_DIFF, DataKind.COLLECTION}
        if any(not isinstance(kind, str) or kind in forbidden for kind in passed):
            raise ValueError(f"pass_data_kinds {passed!r} may not name weight kinds {sorted(forbidden)}")

        self.clip_norm = float(clip_norm)
        self.noise_multiplier = float(noise_multiplier)
        self.neighbouring = neighbouring
        self.require_budget = require_budget
        self.delta = float(delta)
        self.accountant = accountant
        self.pass_data_kinds = frozenset(passed)
        if not isinstance(tb_writer_id, str):
            raise ValueError(f"tb_writer_id must be a string, got {tb_writer_id!r}")
        self.tb_writer_id = tb_writer_id
        self.seeded = seed is not None
        self._rng = np.random.default_rng(seed)
        self._spends: dict[str, PrivacySpend] = {}  # per site, made at its first release
        self._lock = threading.Lock()
        if self.seeded:
            self.logger.warning(
                "GaussianDPFilter has a fixed seed: its noise can be regenerated and removed; tests only"
            )

    @property
    def accounted_noise_multiplier(self) -> float:
        """sigma divided by the sensitivity in units of C: what the accountant is given."""
        return self.noise_multiplier / NEIGHBOURING[self.neighbouring]

    def process(self, shareable: Shareable, fl_ctx: FLContext) -> Shareable:
        """Clip and noise the weight difference in ``shareable``, charge the site ledger, annotate the DXO meta.

        Raises:
            ValueError, TypeError: the result is not a clean ``WEIGHT_DIFF`` DXO (see module doc).
            PrivacyBudgetExceeded: the site budget would be exceeded; nothing is recorded or released.
            PrivacyLedgerError: the site's budget or ledger file is corrupt.
            FileNotFoundError, RuntimeError: the budget cannot be located though one is expected.
        """
        rc = shareable.get_return_code()
        if rc != ReturnCode.OK:
            self.log_warning(
                fl_ctx, f"result has return code {rc}: sending the code only, any payload dropped", fire_event=False
            )
            return make_reply(rc)
        if shareable.get_header(ReservedHeaderKey.CONTENT_TYPE) != "DXO":
            if any(key != ReservedHeaderKey.HEADERS for key in shareable):
                raise ValueError("task result carries content that is not a DXO; refusing to release it unfiltered")
            return shareable  # headers only: nothing to protect
        dxo = from_shareable(shareable)
        if dxo.data_kind in self.pass_data_kinds:
            self.log_info(fl_ctx, f"passing {dxo.data_kind} through unchanged (listed in pass_data_kinds)")
            return shareable
        if dxo.data_kind != DataKind.WEIGHT_DIFF:
            raise ValueError(
                f"GaussianDPFilter needs a WEIGHT_DIFF DXO but got {dxo.data_kind}: noise calibrated to a clipped "
                f"difference says nothing about full weights. Have the learner send differences (Client API "
                f"executor: params_transfer_type='DIFF')."
            )
        update = check_update(dxo.data)
        spend = self._spend_for(fl_ctx)
        spend.budget()  # before any noise: a site that requires a budget and has none refuses here
        writer = self._tb_writer(fl_ctx)  # before charging: a misconfigured writer must not cost budget
        with self._lock:
            noised, clipped = clip_and_noise(update, self.clip_norm, self.noise_multiplier * self.clip_norm, self._rng)
            release = self._charge(spend, shareable, dxo, fl_ctx)
        self.log_debug(fl_ctx, f"update {'was' if clipped else 'was not'} clipped")  # local log only

        out = DXO(data_kind=DataKind.WEIGHT_DIFF, data=noised, meta=copy.deepcopy(dxo.meta or {}))
        for key, value in release.meta().items():
            out.set_meta_prop(key, value)
        out.add_filter_history(type(self).__name__)
        self.log_info(
            fl_ctx,
            f"DP update released by {fl_ctx.get_identity_name()}: clip_norm={self.clip_norm}, "
            f"noise_multiplier={self.noise_multiplier}, cumulative epsilon={release.epsilon:.4g} at "
            f"delta={release.delta:g} (unit: {SITE_UPDATE}, {release.scope})",
        )
        if writer is not None and math.isfinite(release.epsilon):
            # Streamed after the charge, so TensorBoard never shows a release the ledger does not hold.
            step = _round_of(shareable, dxo, fl_ctx) or 0
            writer.add_scalar("dp_epsilon_site_update", float(release.epsilon), global_step=step)
        return out.update_shareable(shareable)

    def _spend_for(self, fl_ctx: FLContext) -> PrivacySpend:
        """This run's spend at the site, kept so that its job-only history and run id last the job."""
        site = fl_ctx.get_identity_name()
        if site not in self._spends:
            self._spends[site] = PrivacySpend(
                SITE_UPDATE,
                site,
                _site_config_dir(fl_ctx),
                require_budget=self.require_budget,
                delta=self.delta,
                accountant=self.accountant,
            )
        return self._spends[site]

    def _tb_writer(self, fl_ctx: FLContext):
        """The job's LogWriter named by ``tb_writer_id``, or None when streaming is off.

        Raises:
            ValueError: ``tb_writer_id`` is set but names no LogWriter component.
        """
        if not self.tb_writer_id:
            return None
        engine = fl_ctx.get_engine()
        writer = engine.get_component(self.tb_writer_id) if engine is not None else None
        if writer is None or not hasattr(writer, "add_scalar"):
            raise ValueError(f"tb_writer_id '{self.tb_writer_id}' does not name a FLARE LogWriter component")
        return writer

    def _charge(self, spend: PrivacySpend, shareable: Shareable, dxo: DXO, fl_ctx: FLContext) -> Release:
        """Charge this release to the site ledger (or this job's history without a budget); raises, recording
        nothing, when the budget cannot afford it."""
        round_ = _round_of(shareable, dxo, fl_ctx)
        details = {
            "clip_norm": self.clip_norm,
            "noise_multiplier": self.noise_multiplier,
            "neighbouring": self.neighbouring,
            "filter": type(self).__name__,
        }
        mechanism = site_update_mechanism(self.accounted_noise_multiplier)
        try:
            return spend.charge(mechanism, fl_ctx.get_job_id(), round_, details)
        except PrivacyBudgetExceeded as err:
            # Name the site in its log (the error names the budget file); FLARE then sends an empty error reply.
            which = f"round {round_ + 1}" if round_ is not None else "this round"  # 1-based, as site logs
            self.log_error(
                fl_ctx, f"site {fl_ctx.get_identity_name()} refuses to send {which}'s update: {err}", fire_event=False
            )
            raise


def _site_config_dir(fl_ctx: FLContext) -> Path | None:
    """The site's ``local/`` folder, or None outside a FLARE run (a bare FLContext, as in unit tests)."""
    engine = fl_ctx.get_engine()
    if engine is None or not hasattr(engine, "get_workspace"):
        return None
    return Path(engine.get_workspace().get_site_config_dir())


def _round_of(shareable: Shareable, dxo: DXO, fl_ctx: FLContext) -> int | None:
    """The round a result belongs to: the result's header, its DXO meta, or the task's header (FLARE's learner
    executor copies none of these into the reply by itself); None when none holds an int."""
    candidates = [shareable.get_header(FLMetaKey.CURRENT_ROUND), dxo.get_meta_prop(FLMetaKey.CURRENT_ROUND)]
    task = fl_ctx.get_prop(FLContextKey.TASK_DATA)
    if isinstance(task, Shareable):
        candidates.append(task.get_header(FLMetaKey.CURRENT_ROUND))
    for value in candidates:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    return None


def _is_real(value: object) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool)
