"""Server widget that saves the run's round state after every completed round, for ``fedseg3d resume``.

What it saves, and where, is :mod:`fedseg3d.server.run_state`: the global model (FLARE checkpoint format), the round,
the job as submitted, the server's records, and the best global model with its key metric. Why a widget on FLARE's
events rather than a persistor or workflow subclass: it works with whichever ``FedAvg`` variant and persistor a job
uses (it only reads the persistor's public state), and a job without it runs exactly as before.

Events used (FLARE 2.9 ``FedAvg``): ``START_RUN`` (find or start the run's state), ``ROUND_STARTED`` (the first round
of this job, hence the run's round count), ``INITIAL_MODEL_LOADED`` (a continuation job gets back the best model and
its metric, so cross-site evaluation and the model selector continue the run instead of restarting it), and
``AFTER_LEARNABLE_PERSIST`` (FedAvg saved round r's global model: save the state of round r).

What is not saved, and why: the downlink compression encoder's per-site copies (``GlobalModelDeltaEncoder``,
``SiteGapStore``) are not needed, because a new job's first message to each site carries full weights; the uplink
quantiser's error-feedback residual lives at the site and restarts from zero (one round's quantisation error is
dropped, as a lost round would drop it).
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import torch
from nvflare.apis.event_type import EventType
from nvflare.apis.fl_constant import FLContextKey
from nvflare.apis.fl_context import FLContext
from nvflare.apis.job_def import USER_SETTABLE_JOB_META_KEYS, JobMetaKey
from nvflare.app_common.app_constant import AppConstants
from nvflare.app_common.app_event_type import AppEventType
from nvflare.app_opt.pt.file_model_persistor import PTFileModelPersistor
from nvflare.widgets.widget import Widget

from fedseg3d.server import run_state
from fedseg3d.server.contribution_log import OUTPUT_SUBDIR

CONFIG_SUFFIX = ".json"
# What the submitter wrote in meta.json; the server adds the rest (job id, status, times), and a job submitted with
# another job's id is refused by the job store.
SUBMITTED_META = {
    JobMetaKey.JOB_NAME,
    JobMetaKey.DEPLOY_MAP,
    JobMetaKey.RESOURCE_SPEC,
    JobMetaKey.MIN_CLIENTS,
    JobMetaKey.MANDATORY_CLIENTS,
    *USER_SETTABLE_JOB_META_KEYS,
}


def submitted_meta(job_meta: dict) -> dict:
    """The part of a running job's meta that its submitter wrote (what a continuation job is submitted with)."""
    system = {key.value for key in JobMetaKey} - {key.value for key in SUBMITTED_META}
    return {key: value for key, value in job_meta.items() if key not in system}


class RoundStateKeeper(Widget):
    """Keeps ``<server workspace>/fedseg3d_state/<run>/`` up to date after every completed round.

    Args:
        run_name: names the run whose state this job continues or starts (the job's ``run_name`` knob); empty: this
            job's id. A job whose run already has state continues it (``fedseg3d resume`` sets this).
        persistor_id: the job's ``PTFileModelPersistor`` (FedAvg saves each round's global model through it).
        model_selector_id: the job's ``IntimeModelSelector``, whose best metric a continuation job restores; empty
            when the job has none.

    Raises:
        ValueError: a malformed ``run_name``; at job start, components that are not what the ids say.
    """

    def __init__(
        self, run_name: str = "", persistor_id: str = "persistor", model_selector_id: str = "model_selector"
    ) -> None:
        super().__init__()
        if run_name:
            run_state.check_run_name(run_name)
        self.run_name = run_name
        self.persistor_id = persistor_id
        self.model_selector_id = model_selector_id
        self.state_dir: Path | None = None
        self.state: dict | None = None
        self.resumed = False
        self._job_id = ""
        self._best_round: int | None = None

    def handle_event(self, event_type: str, fl_ctx: FLContext) -> None:
        if event_type == EventType.START_RUN:
            self._start(fl_ctx)
        elif self.state is None:
            return
        elif event_type == AppEventType.ROUND_STARTED:
            self._round_started(fl_ctx)
        elif event_type == AppEventType.INITIAL_MODEL_LOADED and self.resumed:
            self._restore_best(fl_ctx)
        elif event_type == AppEventType.GLOBAL_BEST_MODEL_AVAILABLE:
            self._best_round = fl_ctx.get_prop(AppConstants.CURRENT_ROUND)
        elif event_type == AppEventType.AFTER_LEARNABLE_PERSIST:
            self._save_round(fl_ctx)

    def _persistor(self, fl_ctx: FLContext) -> PTFileModelPersistor:
        persistor = fl_ctx.get_engine().get_component(self.persistor_id)
        if not isinstance(persistor, PTFileModelPersistor):
            raise ValueError(f"RoundStateKeeper: persistor_id '{self.persistor_id}' is not a PTFileModelPersistor")
        return persistor

    def _start(self, fl_ctx: FLContext) -> None:
        engine = fl_ctx.get_engine()
        workspace = engine.get_workspace()
        self._job_id = fl_ctx.get_job_id()
        self._persistor(fl_ctx)  # fail at job start, not after the first round
        run = self.run_name or self._job_id
        self.state_dir = run_state.run_state_dir(workspace.get_root_dir(), run)
        if (self.state_dir / run_state.STATE_FILE).is_file():
            self.state = run_state.read_state(self.state_dir)
            self.resumed = True
            self.log_info(
                fl_ctx,
                f"run {run}: continuing from the state of round {self.state['last_round'] + 1} (1-based) of "
                f"{self.state['total_rounds']} in {self.state_dir}",
            )
            return
        self.state = run_state.new_state(run, total_rounds=0, first_round=0)
        app_dir = Path(workspace.get_app_dir(self._job_id))
        job_copy = self.state_dir / run_state.JOB_DIR
        for path in sorted((app_dir / "config").glob(f"*{CONFIG_SUFFIX}")):
            run_state.atomic_copy(path, job_copy / "app" / "config" / path.name)
        if (app_dir / "custom").is_dir():  # a job that carries its code: the continuation carries the same
            run_state.copy_tree_atomically(app_dir / "custom", job_copy / "app" / "custom")
        # The server writes the job's meta next to its app; the context has it too.
        meta_file = Path(workspace.get_run_dir(self._job_id)) / "meta.json"
        job_meta = json.loads(meta_file.read_text()) if meta_file.is_file() else fl_ctx.get_prop(FLContextKey.JOB_META)
        run_state.atomic_write_json(job_copy / "meta.json", submitted_meta(job_meta or {}))
        self.log_info(fl_ctx, f"run {run}: round state will be saved after every round in {self.state_dir}")

    def _round_started(self, fl_ctx: FLContext) -> None:
        current = int(fl_ctx.get_prop(AppConstants.CURRENT_ROUND))
        if any(job["job_id"] == self._job_id for job in self.state["jobs"]):
            return
        # FedAvg's NUM_ROUNDS is the number of rounds this job runs, counted from its start_round.
        count = int(fl_ctx.get_prop(AppConstants.NUM_ROUNDS) or 0)
        if not self.state["jobs"]:
            self.state.update(first_round=current, total_rounds=current + count)
        elif current != self.state["last_round"] + 1:
            # A new job that reuses a run's name would otherwise mix two runs' models and records.
            reason = (
                f"run {self.state['run']} already has state up to round {self.state['last_round'] + 1} (1-based) in "
                f"{self.state_dir}, but this job starts at round {current + 1}: give it another run_name, or continue "
                "the run with `fedseg3d resume`"
            )
            self.system_panic(reason, fl_ctx)
            self.state = None
            return
        self.state["jobs"].append({"job_id": self._job_id, "start_round": current, "started": time.time()})

    def _restore_best(self, fl_ctx: FLContext) -> None:
        best = self.state.get("best")
        if not best:
            return
        persistor = self._persistor(fl_ctx)
        target = Path(persistor.log_dir) / persistor.best_global_model_file_name
        run_state.atomic_copy(self.state_dir / best["file"], target)
        selector = fl_ctx.get_engine().get_component(self.model_selector_id) if self.model_selector_id else None
        if selector is not None:
            if not hasattr(selector, "best_val_metric"):
                raise ValueError(f"RoundStateKeeper: model_selector_id '{self.model_selector_id}' has no best metric")
            selector.best_val_metric = float(best["metric"])
        self.log_info(
            fl_ctx,
            f"run {self.state['run']}: best global model so far (key metric {best['metric']:.4f}, chosen at round "
            f"{best['round'] + 1}) restored as {target.name}",
        )

    def _save_round(self, fl_ctx: FLContext) -> None:
        current = int(fl_ctx.get_prop(AppConstants.CURRENT_ROUND))
        persistor = self._persistor(fl_ctx)
        model_name = run_state.model_file_name("global_model", current)
        checkpoint = persistor.persistence_manager.to_persistence_dict()
        run_state.atomic_write(self.state_dir / model_name, lambda tmp: torch.save(checkpoint, tmp))
        if self._best_round is not None:
            best_file = Path(persistor.log_dir) / persistor.best_global_model_file_name
            selector = fl_ctx.get_engine().get_component(self.model_selector_id) if self.model_selector_id else None
            if best_file.is_file() and selector is not None:
                name = run_state.model_file_name("best_global_model", self._best_round)
                run_state.atomic_copy(best_file, self.state_dir / name)
                metric = float(selector.best_val_metric)
                self.state["best"] = {"file": name, "metric": metric, "round": self._best_round}
            self._best_round = None
        records = Path(fl_ctx.get_engine().get_workspace().get_run_dir(self._job_id)) / OUTPUT_SUBDIR
        if records.is_dir():
            run_state.copy_tree_atomically(records, self.state_dir / run_state.RECORDS_DIR / self._job_id)
        self.state.update(last_round=current, global_model=model_name, updated=time.time())
        run_state.atomic_write_json(self.state_dir / run_state.STATE_FILE, self.state)
        keep = {model_name, (self.state.get("best") or {}).get("file")}
        run_state.prune_models(self.state_dir, {k for k in keep if k})
        self.log_info(
            fl_ctx,
            f"run {self.state['run']}: round {current + 1}/{self.state['total_rounds']} state saved ({model_name})",
        )
