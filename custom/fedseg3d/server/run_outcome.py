"""The server's record of whether a run finished its workflows or was cut short.

Why: FLARE's simulator exits 0 when a run ends early because every site stopped (a site's config error at start,
a site process that died): it then aborts the server itself, and only a fatal error on the server gives a non-zero
exit. POC and production record a job status; the simulator does not. The server's abort signal tells the two
apart: in a run that finished, the server reaches ``ABOUT_TO_END_RUN`` before anything aborts it; in a run that was
cut short, the abort comes first. This widget writes ``<run dir>/fedseg3d/run_outcome.json`` at that point, and
``fedseg3d simulate`` reads it for its exit status.
"""

from __future__ import annotations

import json
from pathlib import Path

from nvflare.apis.event_type import EventType
from nvflare.apis.fl_constant import FLContextKey, ReservedKey
from nvflare.apis.fl_context import FLContext
from nvflare.widgets.widget import Widget

from fedseg3d.server.contribution_log import OUTPUT_SUBDIR

OUTCOME_FILE = "run_outcome.json"


class RunOutcome(Widget):
    """Writes ``{"completed": bool, "workflows": [{"id", "aborted"}]}`` when the server's run ends.

    ``completed`` is False when the run's abort signal fired before the server began to end the run (a site
    failure that stopped the federation, a fatal server error, an abort by an admin).
    """

    def __init__(self) -> None:
        super().__init__()
        self._workflows: list[dict] = []

    def handle_event(self, event_type: str, fl_ctx: FLContext) -> None:
        if event_type == EventType.START_WORKFLOW:
            self._workflows.append({"id": fl_ctx.get_prop(FLContextKey.WORKFLOW), "aborted": False})
        elif event_type == EventType.END_WORKFLOW and self._workflows:
            self._workflows[-1]["aborted"] = _aborted(fl_ctx)
        elif event_type == EventType.ABOUT_TO_END_RUN:
            run_dir = Path(fl_ctx.get_engine().get_workspace().get_run_dir(fl_ctx.get_job_id()))
            out = run_dir / OUTPUT_SUBDIR / OUTCOME_FILE
            out.parent.mkdir(parents=True, exist_ok=True)
            outcome = {"completed": not _aborted(fl_ctx), "workflows": self._workflows}
            out.write_text(json.dumps(outcome, indent=1) + "\n")
            if not outcome["completed"]:
                self.log_error(fl_ctx, f"the run was aborted before its workflows finished: {self._workflows}")


def _aborted(fl_ctx: FLContext) -> bool:
    signal = fl_ctx.get_prop(ReservedKey.RUN_ABORT_SIGNAL)
    return bool(signal is not None and signal.triggered)


def read_outcome(run_dir: Path) -> dict | None:
    """The outcome a run's server wrote, or None when it wrote none (a job without this widget, or a server that
    never reached the end of its run)."""
    path = Path(run_dir) / OUTPUT_SUBDIR / OUTCOME_FILE
    return json.loads(path.read_text()) if path.is_file() else None
