"""Which weights train: a PEFT LoRA adapter on the decoder (mode=lora) or the whole decoder (mode=full).

Both modes return the module the loop calls and optimizes; they differ only in what requires grad and in what a
save writes (a PEFT adapter directory, or the full model in the official layout).
"""

from __future__ import annotations

from pathlib import Path
from typing import Dict, Union

import torch
from peft import LoraConfig, PeftModel, get_peft_model, set_peft_model_state_dict
from peft.utils import get_peft_model_state_dict
from safetensors.torch import load_file
from torch import nn

from acestep_ft.config import FullMode, LoraMode

ModeConfig = Union[LoraMode, FullMode]

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"


def make_trainable(model: nn.Module, mode: ModeConfig) -> nn.Module:
    """Freeze everything, then unfreeze what the mode trains. Returns the decoder to call and optimize.

    LoRA: the decoder wrapped by PEFT (keys relative to the decoder, as official inference expects).
    Full: the decoder itself.
    """
    model.requires_grad_(False)
    match mode:
        case LoraMode():
            lora = LoraConfig(
                r=mode.rank,
                lora_alpha=mode.alpha,
                lora_dropout=mode.dropout,
                target_modules=list(mode.target_modules),
            )
            peft_model = get_peft_model(model.decoder, lora)
            # Official inference saves and loads adapters as FEATURE_EXTRACTION; the type only matters when a
            # PeftModel class is picked, which happened above, so record the official value for the saved file.
            peft_model.peft_config["default"].task_type = "FEATURE_EXTRACTION"
            return peft_model
        case FullMode():
            model.decoder.requires_grad_(True)
            return model.decoder
    raise TypeError(f"unknown mode config {type(mode).__name__}")


def trainable_state_dict(decoder: nn.Module) -> Dict[str, torch.Tensor]:
    """The trained weights only: adapter tensors (PEFT key names) or the full decoder state."""
    if isinstance(decoder, PeftModel):
        return get_peft_model_state_dict(decoder)
    return decoder.state_dict()


def save_adapter(decoder: PeftModel, directory: Path) -> None:
    """PEFT adapter directory: adapter_config.json + adapter_model.safetensors (fp32, decoder-relative keys)."""
    decoder.save_pretrained(str(directory), safe_serialization=True)


def load_adapter_weights(decoder: PeftModel, directory: Path) -> None:
    """Load adapter weights saved by `save_adapter` into an already-wrapped decoder, refusing any mismatch."""
    weights = load_file(str(Path(directory) / ADAPTER_WEIGHTS))
    result = set_peft_model_state_dict(decoder, weights)
    missing = [k for k in result.missing_keys if "lora_" in k]
    if missing or result.unexpected_keys:
        raise ValueError(
            f"adapter in {directory} does not match the configured LoRA: missing {missing[:5]} "
            f"unexpected {list(result.unexpected_keys)[:5]}; resume with the same mode.rank and mode.target_modules"
        )


def count_parameters(module: nn.Module) -> tuple[int, int]:
    """(trainable, total) parameter counts."""
    trainable = sum(p.numel() for p in module.parameters() if p.requires_grad)
    total = sum(p.numel() for p in module.parameters())
    return trainable, total
