"""The FLARE learner: turns FLARE tasks into ``SiteTrainer`` calls and builds the replies.

Why a classic ``Learner`` under ``LearnerExecutor`` rather than a Client API script: the site keeps state across
rounds (its batch-norm layers, its best local model, its privacy ledger) in one object that FLARE creates once per
job; the executor already maps the train / validate / submit_model tasks of FedAvg and cross-site evaluation onto
it; and the whole round trip can be unit-tested with real FLARE Shareables and a bare ``FLContext``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from nvflare.apis.dxo import DXO, DataKind, MetaKey, from_shareable
from nvflare.apis.fl_constant import ReturnCode
from nvflare.apis.fl_context import FLContext
from nvflare.apis.shareable import Shareable, make_reply
from nvflare.apis.signal import Signal
from nvflare.app_common.abstract.learner_spec import Learner
from nvflare.app_common.app_constant import AppConstants, DefaultCheckpointFileName, ValidateType
from nvflare.app_common.tracking.log_writer import LogWriter
from nvflare.app_opt.pt.fedproxloss import PTFedProxLoss

from fedseg3d.data.errors import DataError
from fedseg3d.data.site_config import SiteConfig, find_site_config
from fedseg3d.data.task import JobConfigError, parse_class_names, per_class_values
from fedseg3d.data.transforms import PreprocessConfig
from fedseg3d.privacy.accounting import PATIENT, Mechanism
from fedseg3d.privacy.ledger import PrivacyBudgetExceeded, PrivacyLedgerError
from fedseg3d.privacy.spend import PrivacySpend
from fedseg3d.training.dpsgd import DPSGDConfig
from fedseg3d.training.site_trainer import SiteTrainer, TrainingConfig

# FLARE's cross-site evaluation names the server's models "SRV_" + file name; this one is the job's final global model.
FINAL_GLOBAL_MODEL = f"SRV_{DefaultCheckpointFileName.GLOBAL_MODEL}"
# Why a site refuses a round: no budget, or one it cannot afford; an unreadable ledger; settings that do not fit it.
REFUSALS = (PrivacyBudgetExceeded, PrivacyLedgerError, RuntimeError, FileNotFoundError, ValueError)


class SegmentationLearner(Learner):
    """Federated 3D segmentation at one site: FedAvg or FedBN, with validation and per-site checkpoints.

    Args:
        class_names: the consortium's classes, background first: a list of names or its JSON text (the job's
            ``class_names`` knob), or ``{"0": name, ...}``.
        preprocessing: the job's preprocessing block (see ``PreprocessConfig``).
        training: the job's training block (see ``TrainingConfig``).
        tb_writer_id: id of a FLARE ``TBWriter`` component that streams metrics to the server's TensorBoard;
            empty to disable.
        dp_sgd: patient-level DP-SGD (``fedseg3d.training.dpsgd.DPSGDConfig``); ``None`` or ``{}`` for plain
            training. Each DP-SGD round is checked against the site's budget before training and charged to its
            ledger (``fedseg3d.privacy.spend``) before the update is returned; a refused round sends nothing.
        require_budget: with DP-SGD, refuse to train when the site has no privacy budget file. When false, such a
            site still trains with DP-SGD and reports the epsilon of this job only.

    Raises:
        JobConfigError, ValueError: the job's settings are malformed or do not fit together (e.g. a per-class list
            whose length is not the class count); FLARE then stops the job at start with this message.
    """

    def __init__(
        self,
        class_names: list[str] | str | dict[str, str],
        preprocessing: dict[str, Any] | None = None,
        training: dict[str, Any] | None = None,
        tb_writer_id: str = "tb_writer",
        dp_sgd: dict[str, Any] | None = None,
        require_budget: bool = True,
    ) -> None:
        super().__init__()
        # Parse now: a bad job config fails at job start with the field named, not in the middle of round 3, and is
        # reported as the job's error (JobConfigError), never as a site whose data is not usable.
        self.class_names = parse_class_names(class_names)
        self.preprocessing = PreprocessConfig.from_dict(preprocessing).for_classes(self.class_names)
        self.training = TrainingConfig(**(training or {}))
        per_class_values(self.training.class_loss_weights, self.class_names, "training.class_loss_weights")
        self.tb_writer_id = tb_writer_id
        self.dp_sgd = DPSGDConfig.from_dict(dp_sgd)
        if not isinstance(require_budget, bool):
            raise ValueError(f"require_budget must be true or false, got {require_budget!r}")
        self.require_budget = require_budget
        self.trainer: SiteTrainer | None = None
        self.spend: PrivacySpend | None = None  # DP-SGD only: the site ledger this site's rounds are charged to
        self.setup_error: str | None = None
        self.tb_writer: LogWriter | None = None
        self.site_name = "?"

    def initialize(self, parts: dict, fl_ctx: FLContext) -> None:
        """Prepare the site's data. A data error is remembered, not raised: every task then fails with that
        message, so the server sees which site is broken and why while the other sites carry on."""
        self.site_name = fl_ctx.get_identity_name()
        if self.tb_writer_id:
            writer = parts.get(self.tb_writer_id)
            if not isinstance(writer, LogWriter):
                raise ValueError(f"tb_writer_id '{self.tb_writer_id}' does not name a FLARE LogWriter component")
            self.tb_writer = writer
        workspace = fl_ctx.get_engine().get_workspace()
        try:
            trainer = self._make_trainer(workspace, fl_ctx)
        except JobConfigError:
            raise  # the job's fault, not this site's data: stop the job with it (the constructor checks most)
        except (DataError, ValueError) as err:
            self.setup_error = str(err)
            self.log_error(fl_ctx, f"site data not usable, this site will fail its tasks: {err}")
            return
        self.start(trainer, workspace.get_site_config_dir())

    def start(self, trainer: SiteTrainer, site_config_dir: str | Path | None) -> None:
        """Serve tasks with ``trainer``, DP-SGD rounds charged to the budget in ``site_config_dir`` (also for tests)."""
        self.trainer = trainer
        self.site_name = trainer.site_name
        if self.dp_sgd is not None:
            self.spend = PrivacySpend(PATIENT, self.site_name, site_config_dir, require_budget=self.require_budget)

    def _make_trainer(self, workspace: Any, fl_ctx: FLContext) -> SiteTrainer:
        site_dir = workspace.get_site_config_dir()
        site_config = SiteConfig.from_file(find_site_config(self.site_name, site_dir), site_name=self.site_name)
        return SiteTrainer.from_site_config(
            site_config,
            self.class_names,
            self.preprocessing,
            self.training,
            default_output_dir=Path(workspace.get_app_dir(fl_ctx.get_job_id())) / "site_models",
            dp_sgd=self.dp_sgd,
            # FedProx: FLARE's own proximal term (mu/2 * sum of squared parameter differences to the round's start).
            proximal_loss=PTFedProxLoss(mu=self.training.fedprox_mu) if self.training.fedprox_mu > 0 else None,
            job_id=str(fl_ctx.get_job_id()),
        )

    def _not_ready(self, fl_ctx: FLContext) -> Shareable | None:
        if self.trainer is not None:
            return None
        self.log_error(fl_ctx, f"refusing task: {self.setup_error}")
        return make_reply(ReturnCode.EXECUTION_EXCEPTION)

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

        try:  # refuse before any training: a round the settings or the budget cannot afford wastes no work
            accounting = self.spend.accounting() if self.spend is not None else ()
            planned = self.trainer.plan_round(current_round, total_rounds, *accounting)
            if planned is not None:
                self.spend.check(planned)
        except REFUSALS as err:
            self.log_error(fl_ctx, f"site {self.site_name} refuses round {current_round + 1}: {err}")
            return make_reply(ReturnCode.EXECUTION_EXCEPTION)
        try:
            result = self.trainer.train_round(
                weights, current_round, lambda: abort_signal.triggered, total_rounds=total_rounds
            )
        except FloatingPointError as err:
            self.log_error(fl_ctx, str(err))
            return make_reply(ReturnCode.EXECUTION_EXCEPTION)
        if abort_signal.triggered:
            return make_reply(ReturnCode.TASK_ABORTED)
        self.log_info(fl_ctx, f"round {current_round + 1}/{total_rounds} done: {result.summary()}")
        meta = {
            MetaKey.NUM_STEPS_CURRENT_ROUND: result.num_cases,
            MetaKey.CURRENT_ROUND: current_round,  # lets result filters (the DP ledger) name the round
            "site_metrics": result.metrics,
        }
        if result.privacy is not None:
            try:
                meta.update(self._charge(result.privacy, current_round, fl_ctx))
            except REFUSALS as err:
                self.log_error(fl_ctx, f"site {self.site_name} refuses to send round {current_round + 1}: {err}")
                return make_reply(ReturnCode.EXECUTION_EXCEPTION)
        self._stream(result.metrics, current_round)
        self._stream({"train_cases_per_second": result.num_cases / max(result.train.seconds, 1e-9)}, current_round)
        dxo = DXO(data_kind=DataKind.WEIGHT_DIFF, data=result.update, meta=meta)
        return dxo.to_shareable()

    def _charge(self, released: Mechanism, current_round: int, fl_ctx: FLContext) -> dict[str, Any]:
        """Charge this round's DP-SGD release to the site ledger; the privacy meta for the reply."""
        details = {**self.trainer.privacy_details(), "learner": type(self).__name__}
        release = self.spend.charge(released, fl_ctx.get_job_id(), current_round, details)
        self.log_info(
            fl_ctx,
            f"DP-SGD round {current_round + 1} charged at {self.site_name}: {released}; cumulative epsilon="
            f"{release.epsilon:.4g} at delta={release.delta:g} (unit: {PATIENT}, {release.scope})",
        )
        self._stream({"dp_epsilon_patient": release.epsilon}, current_round)
        return release.meta()

    def validate(self, data: Shareable, fl_ctx: FLContext, abort_signal: Signal) -> Shareable:
        """Dice of a received model on this site's validation cases (with this site's own batch norm in FedBN).

        Before training this scores the incoming global model, which the server uses to keep the best one over all
        sites and the site to keep the best one for itself (``site_models/best_global_model.pt``);
        in cross-site evaluation it scores the server's and other sites' models.
        """
        if (reply := self._not_ready(fl_ctx)) is not None:
            return reply
        weights = self._received_weights(data, fl_ctx)
        if weights is None:
            return make_reply(ReturnCode.BAD_TASK_DATA)

        def stop() -> bool:
            return abort_signal.triggered

        validate_type = data.get_header(AppConstants.VALIDATE_TYPE)
        current_round = int(data.get_header(AppConstants.CURRENT_ROUND, 0))
        model_owner = data.get_header(AppConstants.MODEL_OWNER, "?")
        if validate_type == ValidateType.BEFORE_TRAIN_VALIDATE:
            # The round's global model: the site keeps it (with its own batch norm) when it is the best one here.
            result = self.trainer.evaluate_global(weights, current_round, stop)
        elif model_owner == FINAL_GLOBAL_MODEL:
            # Cross-site evaluation of the job's last global model, which no round validated: a candidate too.
            result = self.trainer.evaluate_global(weights, self.trainer.rounds_done, stop)
        else:
            result = self.trainer.evaluate_weights(weights, stop)
        if abort_signal.triggered:
            return make_reply(ReturnCode.TASK_ABORTED)
        metrics = result.as_metrics("val_")
        if validate_type == ValidateType.BEFORE_TRAIN_VALIDATE:
            self.log_info(fl_ctx, f"global model at round {current_round + 1}: val Dice {result.mean_dice:.4f}")
            self._stream({f"global_{k}": v for k, v in metrics.items()}, current_round)
            return DXO(data_kind=DataKind.METRICS, data={MetaKey.INITIAL_METRICS: metrics}).to_shareable()
        self.log_info(fl_ctx, f"cross-site evaluation of {model_owner}'s model: val Dice {result.mean_dice:.4f}")
        return DXO(data_kind=DataKind.METRICS, data=metrics).to_shareable()

    def get_model_for_validation(self, model_name: str, fl_ctx: FLContext) -> Shareable:
        """This site's final local model for cross-site evaluation: only the shared part ever leaves the site.

        The final model: each evaluating site pairs the received weights with its own batch norm, recalibrated for
        those weights (FedBN), so the matrix compares the models the jobs ended with.
        """
        if (reply := self._not_ready(fl_ctx)) is not None:
            return reply
        return DXO(data_kind=DataKind.WEIGHTS, data=self.trainer.shared_weights()).to_shareable()

    def abort(self, fl_ctx: FLContext) -> None:
        self.log_info(fl_ctx, "abort requested; the running task stops at the next step")

    def finalize(self, fl_ctx: FLContext) -> None:
        if self.trainer is not None:
            self.log_info(fl_ctx, f"finished: {self.trainer.summary()}")

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
