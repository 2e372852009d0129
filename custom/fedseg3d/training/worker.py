"""A site's ``SiteTrainer`` in a supervised subprocess, so an out-of-memory kill costs one task, not the job.

Why: FLARE fails the whole job when a site's job process dies (its parent reports the failure and the server calls
``fail_run``), whatever ``min_sites`` says. The kernel's OOM killer picks the process with the most memory, which is
the one that trains. Running the training in a child of the job process keeps the job process alive: the task that
was running fails with a logged reason, and the next task starts a fresh child whose carried-over state
(``fedseg3d.training.site_state``) is restored from the last completed call, so nothing is silently reset.

The child is started with ``spawn`` (a fork of a process holding FLARE's threads and sockets is unsafe), is reused
across tasks (it pays the torch import and data preparation once), and logs through the parent's logging.
"""

from __future__ import annotations

import contextlib
import logging
import logging.handlers
import multiprocessing as mp
import signal
import threading
import time
from collections.abc import Callable
from typing import Any

from fedseg3d.training.site_trainer import SiteTrainer
from fedseg3d.training.worker_state import SiteState, restore, snapshot

logger = logging.getLogger(__name__)

POLL_SECONDS = 0.2
STOP_GRACE_SECONDS = 10


class WorkerDied(RuntimeError):
    """The training subprocess ended without answering; the message says how (signal or exit code)."""


def _exit_reason(exitcode: int | None) -> str:
    if exitcode is not None and exitcode < 0:
        name = signal.Signals(-exitcode).name
        return f"killed by {name}" + (" (an out-of-memory kill looks like this)" if name == "SIGKILL" else "")
    return f"exit code {exitcode}"


class _Relay(logging.Handler):
    """Hands a record from the child to the parent's logger of the same name (and so to FLARE's log files)."""

    def emit(self, record: logging.LogRecord) -> None:
        logging.getLogger(record.name).handle(record)


def _serve(factory: Callable[[], SiteTrainer], state: SiteState | None, conn, stop, log_queue) -> None:
    """The child's loop: build the trainer, restore its state, answer calls until the parent closes the pipe."""
    root = logging.getLogger()
    root.handlers = [logging.handlers.QueueHandler(log_queue)]
    root.setLevel(logging.INFO)
    try:
        trainer = factory()
        if state is not None:
            restore(trainer, state)
    except BaseException as err:  # noqa: BLE001 - any start failure goes back to the parent, which raises it
        conn.send(("error", err))
        return
    conn.send(("ok", {"site_name": trainer.site_name, "num_train_cases": trainer.num_train_cases}))
    while True:
        try:
            request = conn.recv()
        except EOFError:
            return  # the parent is gone
        if request is None:
            return
        method, args, kwargs = request
        try:
            if method in ("train_round", "evaluate_global", "evaluate_weights"):
                kwargs["should_stop"] = stop.is_set
            value = getattr(trainer, method)(*args, **kwargs)
            conn.send(("ok", (value, snapshot(trainer))))
        except BaseException as err:  # noqa: BLE001 - the parent re-raises it as the learner expects
            conn.send(("error", err))


class WorkerTrainer:
    """The ``SiteTrainer`` interface the learner uses, served by a subprocess that is restarted when it dies.

    Args:
        factory: builds the site's trainer in the child; must be picklable (a module-level function or a
            ``functools.partial`` of one).
    """

    def __init__(self, factory: Callable[[], SiteTrainer]) -> None:
        self._factory = factory
        self._context = mp.get_context("spawn")
        self._state: SiteState | None = None
        self._process = None
        self._conn = None
        self._stop = self._context.Event()
        self._log_queue = self._context.Queue()
        self._listener = logging.handlers.QueueListener(self._log_queue, _Relay())
        self._listener.start()
        self.restarts = 0
        self._restarting: threading.Thread | None = None
        self.site_name = "?"
        self.num_train_cases = 0
        self._start()

    @property
    def rounds_done(self) -> int:
        return self._state.rounds_done if self._state is not None else 0

    def _start(self) -> None:
        parent, child = self._context.Pipe()
        self._process = self._context.Process(
            target=_serve, args=(self._factory, self._state, child, self._stop, self._log_queue), daemon=True
        )
        started = time.perf_counter()
        self._process.start()
        child.close()
        self._conn = parent
        info = self._receive(lambda: False, "start")
        self.site_name, self.num_train_cases = info["site_name"], info["num_train_cases"]
        restored = f"; restored {self._state.describe()}" if self._state is not None else ""
        logger.info(
            "%s: training worker pid %d ready in %.1f s%s",
            self.site_name,
            self._process.pid,
            time.perf_counter() - started,
            restored,
        )

    def _receive(self, should_stop: Callable[[], bool], what: str) -> Any:
        while not self._conn.poll(POLL_SECONDS):
            if should_stop():
                self._stop.set()
            if not self._process.is_alive():
                self._died(what)
        try:
            status, value = self._conn.recv()
        except (EOFError, OSError):  # the pipe closed or was reset with the process: say how it ended
            self._died(what)
        if status == "error":
            raise value
        return value

    def _died(self, what: str) -> None:
        self._process.join(STOP_GRACE_SECONDS)
        reason = _exit_reason(self._process.exitcode)
        self._process = None
        raise WorkerDied(f"{self.site_name}: training worker died during {what} ({reason})")

    def _restart_in_background(self) -> None:
        """Start the next worker now, so the site's next task does not wait for its start-up."""
        self.restarts += 1
        logger.warning("%s: starting a fresh training worker (restart %d)", self.site_name, self.restarts)

        def start() -> None:
            try:
                self._start()
            except Exception as err:  # noqa: BLE001 - the next task tries again and reports it
                logger.error("%s: training worker restart failed: %s", self.site_name, err)
                self._process = None

        self._restarting = threading.Thread(target=start, name="training-worker-restart", daemon=True)
        self._restarting.start()

    def _ready(self) -> None:
        """A live worker: the restart in progress, or a new one if the last died between tasks."""
        if self._restarting is not None:
            self._restarting.join()
            self._restarting = None
        if self._process is not None and not self._process.is_alive():
            self._process.join()
            logger.warning(
                "%s: training worker died between tasks (%s)", self.site_name, _exit_reason(self._process.exitcode)
            )
            self._process = None
        if self._process is None:
            self.restarts += 1
            logger.warning("%s: starting a fresh training worker (restart %d)", self.site_name, self.restarts)
            self._start()

    def _call(self, method: str, *args, should_stop: Callable[[], bool] = lambda: False, **kwargs) -> Any:
        self._ready()
        self._stop.clear()
        try:
            try:
                self._conn.send((method, args, kwargs))
            except (BrokenPipeError, ConnectionError):  # it died while the task was being handed over
                self._died(method)
            value, self._state = self._receive(should_stop, method)
        except WorkerDied:
            self._restart_in_background()
            raise
        return value

    def plan_round(self, *args, **kwargs):
        return self._call("plan_round", *args, **kwargs)

    def train_round(self, global_weights, current_round, should_stop=lambda: False, **kwargs):
        return self._call("train_round", global_weights, current_round, should_stop=should_stop, **kwargs)

    def evaluate_global(self, weights, current_round, should_stop=lambda: False):
        return self._call("evaluate_global", weights, current_round, should_stop=should_stop)

    def evaluate_weights(self, weights, should_stop=lambda: False):
        return self._call("evaluate_weights", weights, should_stop=should_stop)

    def shared_weights(self):
        return self._call("shared_weights")

    def privacy_details(self) -> dict:
        return self._call("privacy_details")

    def summary(self) -> str:
        return self._call("summary") + (f"; training worker restarted {self.restarts} time(s)" if self.restarts else "")

    def pid(self) -> int | None:
        """The running worker's process id (None between a death and the next call)."""
        return self._process.pid if self._process is not None else None

    def close(self) -> None:
        """Stop the worker (asked first, killed after a grace period) and the log relay."""
        if self._restarting is not None:
            self._restarting.join()
        if self._process is not None:
            with contextlib.suppress(BrokenPipeError, OSError):
                self._conn.send(None)
            self._process.join(STOP_GRACE_SECONDS)
            if self._process.is_alive():
                self._process.kill()
                self._process.join()
            self._process = None
        self._listener.stop()
