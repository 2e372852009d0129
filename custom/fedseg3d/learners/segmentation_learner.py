"""The FLARE learner: turns FLARE tasks into ``SiteTrainer`` calls and builds the replies.

Why a classic ``Learner`` under ``LearnerExecutor`` rather than a Client API script: the site keeps state across
rounds (its batch-norm layers, its best local model, its privacy ledger) in one object that FLARE creates once per
job; the executor already maps the train / validate / submit_model tasks of FedAvg and cross-site evaluation onto
it; and the whole round trip can be unit-tested with real FLARE Shareables and a bare ``FLContext``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from nvflare.apis.dxo import DXO, DataKind, MetaKey, from_shareable
from nvflare.apis.fl_constant import ReturnCode
from nvflare.apis.fl_context import FLContext
from nvflare.apis.shareable import Shareable, make_reply
from nvflare.apis.signal import Signal
from nvflare.app_common.abstract.learner_spec import Learner
from nvflare.app_common.app_constant import AppConstants, ValidateType
from nvflare.app_common.tracking.log_writer import LogWriter
from nvflare.app_opt.pt.fedproxloss import PTFedProxLoss

from fedseg3d.data.datalist import load_datalist
from fedseg3d.data.errors import DataError
from fedseg3d.data.site_config import SiteConfig, find_site_config
from fedseg3d.data.transforms import PreprocessConfig
from fedseg3d.privacy.accounting import PATIENT, Mechanism, cost_of, epsilon_for
from fedseg3d.privacy.ledger import (
    RUN_DETAIL,
    PrivacyBudgetExceeded,
    PrivacyLedger,
    PrivacyLedgerError,
    SiteBudget,
    SpendEntry,
    new_run_id,
)
from fedseg3d.privacy.record import privacy_meta
from fedseg3d.privacy.site_budget import find_site_budget, where_looked
from fedseg3d.training.dpsgd import DPSGDConfig
from fedseg3d.training.site_trainer import SiteTrainer, TrainingConfig

LOG_EVERY_STEPS = 10
# Delta reported when a site runs DP-SGD without a budget file (require_privacy_budget=false); a budget's delta wins.
# The same default as GaussianDPFilter's ``delta``.
JOB_ONLY_DELTA = 1e-5


class SegmentationLearner(Learner):
    """Federated 3D segmentation at one site: FedAvg or FedBN, with validation and per-site checkpoints.

    Args:
        class_names: class index (as a string, JSON keys are strings) -> name; index 0 is background.
        preprocessing: the job's preprocessing block (see ``PreprocessConfig``).
        training: the job's training block (see ``TrainingConfig``).
        tb_writer_id: id of a FLARE ``TBWriter`` component that streams metrics to the server's TensorBoard;
            empty to disable.
        dp_sgd: patient-level DP-SGD (see ``fedseg3d.training.dpsgd.DPSGDConfig``); ``None`` or ``{}`` for plain
            training. With DP-SGD every round is charged to the site's privacy ledger (unit ``patient``) after
            training and before the update is returned; a round the budget cannot afford is refused (checked
            before training too, so no work is wasted) and the site replies with an error, sending nothing.
        require_privacy_budget: with DP-SGD, refuse to train when the site has no privacy budget file. When
            false, such a site still trains with DP-SGD and reports the epsilon of this job only.
    """

    def __init__(
        self,
        class_names: dict[str, str],
        preprocessing: dict[str, Any] | None = None,
        training: dict[str, Any] | None = None,
        tb_writer_id: str = "tb_writer",
        dp_sgd: dict[str, Any] | None = None,
        require_privacy_budget: bool = True,
    ) -> None:
        super().__init__()
        # Parse now: a bad job config fails at job start with the field named, not in the middle of round 3.
        self.class_names = {int(k): str(v) for k, v in class_names.items()}
        if sorted(self.class_names) != list(range(len(self.class_names))) or len(self.class_names) < 2:
            raise ValueError(f"class_names must map 0..N-1 (N >= 2) to names, got {class_names}")
        self.preprocessing = PreprocessConfig.from_dict(preprocessing)
        self.training = TrainingConfig(**(training or {}))
        self.tb_writer_id = tb_writer_id
        self.dp_sgd = DPSGDConfig.from_dict(dp_sgd)
        if not isinstance(require_privacy_budget, bool):
            raise ValueError(f"require_privacy_budget must be true or false, got {require_privacy_budget!r}")
        self.require_privacy_budget = require_privacy_budget
        self._job_privacy_history: list[Mechanism] = []
        self._run_id = new_run_id()  # tells this run's ledger entries apart (the simulator reuses its job id)
        self._calibration: dict[str, Any] | None = None  # target_epsilon: the noise this site picked (first round)
        self._site_config_dir: str | None = None
        self.trainer: SiteTrainer | None = None
        self.setup_error: str | None = None
        self.tb_writer: LogWriter | None = None
        self.site_name = "?"

    # ----------------------------------------------------------------------------------------------- lifecycle
    def initialize(self, parts: dict, fl_ctx: FLContext) -> None:
        """Prepare the site's data. A data error is remembered, not raised: every task then fails with that
        message, so the server sees which site is broken and why while the other sites carry on."""
        self.site_name = fl_ctx.get_identity_name()
        if self.tb_writer_id:
            writer = parts.get(self.tb_writer_id)
            if not isinstance(writer, LogWriter):
                raise ValueError(f"tb_writer_id '{self.tb_writer_id}' does not name a FLARE LogWriter component")
            self.tb_writer = writer
        try:
            self.trainer = self._make_trainer(fl_ctx)
        except (DataError, ValueError) as err:
            self.setup_error = str(err)
            self.log_error(fl_ctx, f"site data not usable, this site will fail its tasks: {err}")

    def _make_trainer(self, fl_ctx: FLContext) -> SiteTrainer:
        workspace = fl_ctx.get_engine().get_workspace()
        self._site_config_dir = workspace.get_site_config_dir()
        site_config = SiteConfig.from_file(
            find_site_config(self.site_name, workspace.get_site_config_dir()), site_name=self.site_name
        )
        if site_config.num_threads > 0:
            torch.set_num_threads(site_config.num_threads)
        output_dir = site_config.output_dir or Path(workspace.get_app_dir(fl_ctx.get_job_id())) / "site_models"
        datalist = load_datalist(site_config.datalist, site_config.data_root, label_names=self.class_names)
        self.log_info(fl_ctx, f"site config {site_config.datalist}: data root {site_config.data_root}")
        return SiteTrainer(
            site_name=self.site_name,
            datalist=datalist,
            class_names=self.class_names,
            # Site facts: the site's intensity handling replaces the job's; its label IDs map to the job's classes.
            preprocessing=site_config.preprocessing_for(self.preprocessing),
            training=self.training,
            output_dir=output_dir,
            device=site_config.device,
            skip_bad_cases=site_config.skip_bad_cases,
            dp_sgd=self.dp_sgd,
            # FedProx: FLARE's own proximal term (mu/2 * sum of squared parameter differences to the round's start).
            proximal_loss=PTFedProxLoss(mu=self.training.fedprox_mu) if self.training.fedprox_mu > 0 else None,
            relabel=site_config.label_map.for_classes(self.class_names) if site_config.label_map else None,
        )

    def _not_ready(self, fl_ctx: FLContext) -> Shareable | None:
        if self.trainer is not None:
            return None
        self.log_error(fl_ctx, f"refusing task: {self.setup_error}")
        return make_reply(ReturnCode.EXECUTION_EXCEPTION)

    # ------------------------------------------------------------------------------------------------- tasks
    def train(self, data: Shareable, fl_ctx: FLContext, abort_signal: Signal) -> Shareable:
        """One FL round: global weights in, weight difference (shared keys only) out, weighted by case count."""
        if (reply := self._not_ready(fl_ctx)) is not None:
            return reply
        weights = self._received_weights(data, fl_ctx)
        if weights is None:
            return make_reply(ReturnCode.BAD_TASK_DATA)
        current_round = int(data.get_header(AppConstants.CURRENT_ROUND, 0))
        total_rounds = data.get_header(AppConstants.NUM_ROUNDS, "?")
        self.log_info(
            fl_ctx, f"round {current_round + 1}/{total_rounds}: training on {self.trainer.num_train_cases} cases"
        )

        try:
            self.training.learning_rate_for(current_round, total_rounds)  # refuse before any privacy work or training
        except ValueError as err:
            self.log_error(fl_ctx, str(err))
            return make_reply(ReturnCode.EXECUTION_EXCEPTION)

        budget = None
        if self.dp_sgd is not None:
            try:
                budget = self._privacy_budget_or_refuse(current_round, total_rounds, fl_ctx)
            except (PrivacyBudgetExceeded, PrivacyLedgerError, RuntimeError, FileNotFoundError, ValueError) as err:
                self.log_error(fl_ctx, f"site {self.site_name} refuses round {current_round + 1}: {err}")
                return make_reply(ReturnCode.EXECUTION_EXCEPTION)

        def progress(step: int, loss: float) -> None:
            if step % LOG_EVERY_STEPS == 0:
                self.log_info(fl_ctx, f"round {current_round + 1}/{total_rounds} step {step}: loss {loss:.4f}")

        try:
            result = self.trainer.train_round(
                weights, current_round, lambda: abort_signal.triggered, progress, total_rounds=total_rounds
            )
        except FloatingPointError as err:
            self.log_error(fl_ctx, str(err))
            return make_reply(ReturnCode.EXECUTION_EXCEPTION)
        if abort_signal.triggered:
            return make_reply(ReturnCode.TASK_ABORTED)
        self.log_info(
            fl_ctx,
            f"round {current_round + 1}/{total_rounds} done: loss {result.train.mean_loss:.4f}, "
            f"{result.train.steps} steps in {result.train.seconds:.1f} s at learning rate "
            f"{result.metrics['learning_rate']:.3g}, "
            f"local val Dice {result.local_eval.mean_dice:.4f} {result.local_eval.class_dice}",
        )
        meta = {
            MetaKey.NUM_STEPS_CURRENT_ROUND: result.num_cases,
            MetaKey.CURRENT_ROUND: current_round,  # lets result filters (the DP ledger) name the round
            "site_metrics": result.metrics,
        }
        if self.dp_sgd is not None:
            try:
                meta.update(self._charge_round(budget, result.privacy, current_round, fl_ctx))
            except (PrivacyBudgetExceeded, PrivacyLedgerError) as err:
                self.log_error(fl_ctx, f"site {self.site_name} refuses to send round {current_round + 1}: {err}")
                return make_reply(ReturnCode.EXECUTION_EXCEPTION)
        self._stream(result.metrics, current_round)
        self._stream({"train_cases_per_second": result.num_cases / max(result.train.seconds, 1e-9)}, current_round)
        dxo = DXO(data_kind=DataKind.WEIGHT_DIFF, data=result.update, meta=meta)
        return dxo.to_shareable()

    # ------------------------------------------------------------------------------------------ DP-SGD ledger
    def _privacy_budget_or_refuse(self, current_round: int, total_rounds: Any, fl_ctx: FLContext) -> SiteBudget | None:
        """The site's budget, after calibrating the noise (``target_epsilon``, first round only) and checking that
        the coming round fits in the budget (so a refused round wastes no work).

        Raises:
            RuntimeError: no budget while ``require_privacy_budget``, or a calibration without the number of rounds.
            ValueError: ``target_epsilon`` cannot be reached.
            PrivacyBudgetExceeded: the planned round would exceed the budget (checked again when charging).
        """
        budget = find_site_budget(self._site_config_dir, self.site_name)
        if budget is None and self.require_privacy_budget:
            looked = where_looked(self._site_config_dir)
            raise RuntimeError(f"DP-SGD needs a site privacy budget and none was found (looked in {looked})")
        if self.dp_sgd.target_epsilon and self._calibration is None:
            self._calibrate_noise(budget, current_round, total_rounds, fl_ctx)
        if budget is None:
            return None
        planned = self.trainer.planned_privacy(current_round, total_rounds)
        ledger = PrivacyLedger(budget.ledger_file, accountant=budget.accountant)
        history = [e.mechanism for e in ledger.entries() if e.unit == PATIENT]
        cost = cost_of(history, planned, budget.delta, budget.accountant)
        if not cost.epsilon_after <= budget.epsilon_budget:
            raise PrivacyBudgetExceeded(
                PATIENT, cost.epsilon_before, cost.epsilon_after, budget.epsilon_budget, budget.delta,
                f"{budget.ledger_file}; budget file {budget.source}",
            )  # fmt: skip
        return budget

    def _calibrate_noise(
        self, budget: SiteBudget | None, current_round: int, total_rounds: Any, fl_ctx: FLContext
    ) -> None:
        """Pick this site's noise multiplier for ``target_epsilon`` over the rounds the job has left, once.

        The rate and steps are this site's own (its patient count), the delta and accountant those the site ledger
        uses (the budget's; without one, ``JOB_ONLY_DELTA`` and RDP, as ``_charge_round`` reports). The number of
        rounds comes from the server's task header: a server that announced fewer rounds than it runs gets a site
        that spends more than the target, which the site budget still bounds.
        """
        if isinstance(total_rounds, bool) or not isinstance(total_rounds, int) or total_rounds <= current_round:
            raise RuntimeError(
                f"dp_sgd.target_epsilon needs the job's number of rounds from the task header "
                f"'{AppConstants.NUM_ROUNDS}' (got {total_rounds!r} at round {current_round + 1})"
            )
        delta, accountant = (budget.delta, budget.accountant) if budget is not None else (JOB_ONLY_DELTA, "rdp")
        rounds = total_rounds - current_round
        n_patients = self.trainer.num_train_cases
        lr_ratios = self.trainer.learning_rate_ratios(current_round, total_rounds)
        calibrated = self.dp_sgd.calibrated(n_patients, rounds, delta, accountant, lr_ratios)
        self.trainer.dp_sgd = calibrated
        # From the method the rounds train with, so the log and the record cannot drift from what really runs.
        per_round = [
            self.trainer.dp_sgd_for_round(r, total_rounds).noise_multiplier for r in range(current_round, total_rounds)
        ]
        self._calibration = {
            "target_epsilon": self.dp_sgd.target_epsilon,
            "noise_multiplier": calibrated.noise_multiplier,
            "noise_multipliers_by_round": per_round,
            "rounds": rounds,
            "steps": rounds * calibrated.steps_for(n_patients),
            "sample_rate": calibrated.patients_per_step / n_patients,
            "delta": delta,
            "accountant": accountant,
        }
        schedule = (
            f" (noise_lr_exponent {calibrated.noise_lr_exponent:g}: {per_round[0]:.4g} in round {current_round + 1} "
            f"to {per_round[-1]:.4g} in round {total_rounds})"
            if calibrated.noise_lr_exponent
            else ""
        )
        self.log_info(
            fl_ctx,
            f"DP-SGD noise calibrated at {self.site_name}: noise_multiplier={calibrated.noise_multiplier:.4g}"
            f"{schedule} for target epsilon {self.dp_sgd.target_epsilon:g} over {rounds} round(s) "
            f"({self._calibration['steps']} steps at sample rate {self._calibration['sample_rate']:.4g}, "
            f"{n_patients} patients), delta={delta:g}, {accountant} accountant",
        )

    def _charge_round(
        self, budget: SiteBudget | None, mechanism: Mechanism, current_round: int, fl_ctx: FLContext
    ) -> dict[str, Any]:
        """Record this round's DP-SGD release and return the privacy meta for the reply (and log and stream it)."""
        if budget is None:
            self._job_privacy_history.append(mechanism)
            delta = JOB_ONLY_DELTA
            epsilon, scope = epsilon_for(self._job_privacy_history, delta), "job"
        else:
            entry = SpendEntry(
                job_id=str(fl_ctx.get_job_id() or "unknown"),
                round=current_round,
                unit=PATIENT,
                noise_multiplier=mechanism.noise_multiplier,
                sample_rate=mechanism.sample_rate,
                steps=mechanism.steps,
                details={
                    "site": self.site_name,
                    RUN_DETAIL: self._run_id,
                    "max_grad_norm": self.dp_sgd.max_grad_norm,
                    "patients_per_step": self.dp_sgd.patients_per_step,
                    "patches_per_patient": self.dp_sgd.patches_per_patient,
                    "patients": self.trainer.num_train_cases,
                    "learner": type(self).__name__,
                    **({"target_epsilon": self._calibration["target_epsilon"]} if self._calibration else {}),
                },
            )
            ledger = PrivacyLedger(budget.ledger_file, accountant=budget.accountant)
            epsilon = ledger.charge(entry, budget_epsilon=budget.epsilon_budget, delta=budget.delta)
            delta, scope = budget.delta, "site_ledger"
        self.log_info(
            fl_ctx,
            f"DP-SGD round {current_round + 1} charged at {self.site_name}: {mechanism.steps} steps, noise_multiplier="
            f"{mechanism.noise_multiplier}, sample_rate={mechanism.sample_rate:.4g}; cumulative epsilon={epsilon:.4g} "
            f"at delta={delta:g} (unit: {PATIENT}, {scope})",
        )
        self._stream({"dp_epsilon_patient": epsilon}, current_round)
        return privacy_meta(epsilon, delta, PATIENT, scope)

    def validate(self, data: Shareable, fl_ctx: FLContext, abort_signal: Signal) -> Shareable:
        """Dice of a received model on this site's validation cases (with this site's own batch norm in FedBN).

        Before training this scores the incoming global model, which the server uses to keep the best one;
        in cross-site evaluation it scores the server's and other sites' models.
        """
        if (reply := self._not_ready(fl_ctx)) is not None:
            return reply
        weights = self._received_weights(data, fl_ctx)
        if weights is None:
            return make_reply(ReturnCode.BAD_TASK_DATA)
        result = self.trainer.evaluate_weights(weights, lambda: abort_signal.triggered)
        if abort_signal.triggered:
            return make_reply(ReturnCode.TASK_ABORTED)
        metrics = result.as_metrics("val_")
        validate_type = data.get_header(AppConstants.VALIDATE_TYPE)
        if validate_type == ValidateType.BEFORE_TRAIN_VALIDATE:
            current_round = int(data.get_header(AppConstants.CURRENT_ROUND, 0))
            self.log_info(fl_ctx, f"global model at round {current_round + 1}: val Dice {result.mean_dice:.4f}")
            self._stream({f"global_{k}": v for k, v in metrics.items()}, current_round)
            return DXO(data_kind=DataKind.METRICS, data={MetaKey.INITIAL_METRICS: metrics}).to_shareable()
        model_owner = data.get_header(AppConstants.MODEL_OWNER, "?")
        self.log_info(fl_ctx, f"cross-site evaluation of {model_owner}'s model: val Dice {result.mean_dice:.4f}")
        return DXO(data_kind=DataKind.METRICS, data=metrics).to_shareable()

    def get_model_for_validation(self, model_name: str, fl_ctx: FLContext) -> Shareable:
        """This site's final local model for cross-site evaluation: only the shared part ever leaves the site.

        The final model, not the best checkpoint: in FedBN each evaluating site pairs the received weights with its
        current batch norm, which matches the final weights and not an earlier checkpoint's.
        """
        if (reply := self._not_ready(fl_ctx)) is not None:
            return reply
        return DXO(data_kind=DataKind.WEIGHTS, data=self.trainer.shared_weights()).to_shareable()

    def abort(self, fl_ctx: FLContext) -> None:
        self.log_info(fl_ctx, "abort requested; the running task stops at the next step")

    def finalize(self, fl_ctx: FLContext) -> None:
        if self.trainer is not None:
            self.log_info(
                fl_ctx,
                f"finished after {self.trainer.rounds_done} round(s); best local val Dice "
                f"{self.trainer.best_local_dice:.4f}, models in {self.trainer.output_dir}",
            )

    # --------------------------------------------------------------------------------------------- helpers
    def _received_weights(self, data: Shareable, fl_ctx: FLContext) -> dict | None:
        try:
            dxo = from_shareable(data)
        except ValueError as err:
            self.log_error(fl_ctx, f"task data is not a DXO: {err}")
            return None
        if dxo.data_kind != DataKind.WEIGHTS:
            self.log_error(fl_ctx, f"expected full model weights (WEIGHTS), got {dxo.data_kind}")
            return None
        return dxo.data

    def _stream(self, metrics: dict[str, float], step: int) -> None:
        if self.tb_writer is None:
            return
        for tag, value in metrics.items():
            self.tb_writer.add_scalar(tag, float(value), global_step=int(step))
