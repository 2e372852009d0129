"""The supervised training worker: a killed worker costs one call, and the next call gets the site's state back."""

import functools
import os
import signal
import threading

import numpy as np
import pytest

from fedseg3d.data.datalist import load_datalist
from fedseg3d.data.task import parse_class_names
from fedseg3d.data.transforms import PreprocessConfig
from fedseg3d.models.presets import build_model
from fedseg3d.training.site_trainer import SiteTrainer, TrainingConfig
from fedseg3d.training.worker import WorkerDied, WorkerTrainer

pytestmark = pytest.mark.e2e


def test_killed_worker_fails_one_call_and_restarts_with_the_site_state(tiny_sites, tmp_path, caplog):
    classes = parse_class_names(["background", "organ", "lesion"])
    datalist = load_datalist(tiny_sites / "site-1" / "datalist.json", tiny_sites / "site-1", classes)
    preprocessing = PreprocessConfig.from_dict({"roi_size": [16, 16, 16]}).for_classes(classes)
    training = TrainingConfig(local_steps=1, batch_size=2, keep_batchnorm_local=True)
    factory = functools.partial(SiteTrainer, "site-1", datalist, classes, preprocessing, training, tmp_path)
    weights = {k: v.numpy().copy() for k, v in build_model("unet3d_tiny").state_dict().items()}
    caplog.set_level("INFO")
    worker = WorkerTrainer(factory)
    try:
        first = worker.train_round(weights, 0)
        kept = dict(worker._state.local_state)
        assert worker.rounds_done == 1 and kept, "FedBN keeps batch norm at the site"
        # Killed while it serves a call, as an out-of-memory kill would: frozen first so the call cannot finish.
        os.kill(worker.pid(), signal.SIGSTOP)
        threading.Timer(0.5, os.kill, (worker.pid(), signal.SIGKILL)).start()
        with pytest.raises(WorkerDied, match="died during train_round .*killed by SIGKILL"):
            worker.train_round(weights, 1)
        assert worker.rounds_done == 1, "the killed round did not count"
        worker.evaluate_weights(weights)
        assert worker.restarts == 1
        assert "restored 1 round(s) done" in caplog.text, "the restart says what it restored"
        assert all(np.array_equal(worker._state.local_state[k], v) for k, v in kept.items()), "batch norm kept"
        assert first.num_cases == worker.num_train_cases
    finally:
        worker.close()
