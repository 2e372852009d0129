"""FLARE's PyTorch file persistor, with a check that an initial checkpoint fits the job's network.

``PTFileModelPersistor`` already starts a job from ``source_ckpt_file_full_name`` (an absolute path on the server, or
one relative to the app's ``custom`` folder; empty or null: the model's own initialisation). But it sends whatever
the file holds: a checkpoint of another preset or class count is only noticed when every site fails to load it
(``global model lacks N shared key(s)``), and no message names the file. This subclass compares the checkpoint's
keys and shapes with the network the persistor builds and stops the job at the server with the file, the preset and
the differing keys named.
"""

from __future__ import annotations

from nvflare.apis.fl_context import FLContext
from nvflare.app_common.abstract.model import ModelLearnable
from nvflare.app_opt.pt.file_model_persistor import PTFileModelPersistor

from fedseg3d.models.checkpoint import check_state_matches


class PresetModelPersistor(PTFileModelPersistor):
    """``PTFileModelPersistor`` that refuses an initial checkpoint whose keys or shapes differ from the model's.

    Takes the same arguments as FLARE's persistor; ``source_ckpt_file_full_name`` is the job's
    ``initial_checkpoint`` knob.

    Raises:
        ValueError: from ``load_model``, when the checkpoint does not fit (the job stops with this message).
    """

    def load_model(self, fl_ctx: FLContext) -> ModelLearnable:
        learnable = super().load_model(fl_ctx)
        if learnable is None or not self.source_ckpt_file_full_name or self.model is None:
            return learnable  # no checkpoint, or FLARE already stopped the job (file missing or unreadable)
        preset = getattr(self.model, "preset", type(self.model).__name__)
        try:
            check_state_matches(
                self.model.state_dict(),
                self.persistence_manager.var_dict,
                self.source_ckpt_file_full_name,
                f"preset '{preset}'",
            )
        except ValueError as err:
            self.system_panic(reason=str(err), fl_ctx=fl_ctx)
            raise
        self.log_info(fl_ctx, f"initial model: checkpoint {self.source_ckpt_file_full_name} fits preset '{preset}'")
        return learnable
