"""ACE-Step 1.5 in plain torch: the model (`AceStepModel`) and official-layout checkpoint I/O."""

from .acestep import AceStepModel
from .checkpoint_io import load_model, official_config, save_full_model
from .variants import guess_variant, model_key_shapes, param_counts

__all__ = [
    "AceStepModel",
    "load_model",
    "save_full_model",
    "official_config",
    "model_key_shapes",
    "param_counts",
    "guess_variant",
]
