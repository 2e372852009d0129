"""Model presets and the split between shared and site-local model state."""

from fedseg3d.models.local_state import LocalStateSplit, split_local_state
from fedseg3d.models.presets import PRESETS, PresetUNet, build_model, preset_args

__all__ = ["PRESETS", "LocalStateSplit", "PresetUNet", "build_model", "preset_args", "split_local_state"]
