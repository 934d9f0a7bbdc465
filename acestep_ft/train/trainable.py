"""Which weights train: a PEFT adapter on the decoder (mode=lora | lokr | loha, train/adapters.py) or the whole
decoder (mode=full).

Every mode returns the module the loop calls and optimizes; they differ only in what requires grad and in what a
save writes (a PEFT adapter directory + its ComfyUI file, or the full model in the official layout).
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Tuple, Union

import torch
from peft import PeftModel
from peft.utils import get_peft_model_state_dict
from torch import nn

from acestep_ft.atomic import atomic_directory
from acestep_ft.config import AdapterMode, FullMode, TrainModule, UnfreezeStage
from acestep_ft.model.checkpoint_io import save_full_model
from acestep_ft.train.adapters import peft_config, save_adapter, wrap

ModeConfig = Union[AdapterMode, FullMode]


def make_trainable(model: nn.Module, mode: ModeConfig) -> nn.Module:
    """Freeze everything, then unfreeze what the mode trains. Returns the decoder to call and optimize.

    Adapter modes: the decoder wrapped by PEFT (keys relative to the decoder, as official inference expects); the
    adapter starts fresh (mode.init_adapter is loaded by the caller, `adapters.init_from_adapter`).
    Full: the decoder itself.
    """
    model.requires_grad_(False)
    match mode:
        case AdapterMode():
            return wrap(model.decoder, peft_config(mode))
        case FullMode():
            if not mode.unfreeze:
                model.decoder.requires_grad_(True)
            for name in unfreeze_starts(model.decoder, mode.unfreeze, steps_per_epoch=1):
                model.decoder.get_parameter(name).requires_grad_(True)
            return model.decoder
    raise TypeError(f"unknown mode config {type(mode).__name__}")


def cast_frozen_(model: nn.Module, dtype: torch.dtype) -> None:
    """Frozen floating-point tensors of `model` to `dtype` (model.frozen_dtype), trained ones (requires_grad, adapters
    included) to float32 masters, in place. Call after `make_trainable`; a parameter stays the same object."""
    for p in model.parameters():
        target = torch.float32 if p.requires_grad else dtype
        if p.is_floating_point() and p.dtype != target:
            p.data = p.data.to(target)


def trained_at_load(mode: ModeConfig) -> Callable[[str], bool]:
    """Which model keys `make_trainable` will train (before it runs): loading them in float32 keeps a full
    fine-tune's fp32 checkpoint exact; everything else can load straight into the frozen dtype."""
    if isinstance(mode, FullMode):
        return lambda key: key.startswith("decoder.")
    return lambda key: False


def unfreeze_starts(decoder: nn.Module, stages: Sequence[UnfreezeStage], steps_per_epoch: int) -> Dict[str, int]:
    """Staged unfreezing (mode.unfreeze): decoder parameter name -> first optimizer step at which it trains.

    A parameter matched by several stages starts with the earliest. Stages for other modules than the decoder, bad
    patterns and patterns matching nothing raise ValueError (the config check reports them before any work).
    """
    starts: Dict[str, int] = {}
    for i, stage in enumerate(stages):
        if stage.module != TrainModule.decoder:
            raise ValueError(
                f"mode.unfreeze[{i}]: module={stage.module}: its outputs come from the dataset (encoder_hidden_states "
                "are precomputed by the preprocessor), so its weights would never receive a gradient. Remove the "
                "stage, or train on data that carries the condition encoder's inputs instead of its outputs.")
        try:
            rx = re.compile(stage.pattern)
        except re.error as err:
            raise ValueError(f"mode.unfreeze[{i}].pattern={stage.pattern!r} is not a valid regex: {err}") from None
        if stage.at_step < 0 or (stage.at_epoch is not None and stage.at_epoch < 0):
            raise ValueError(f"mode.unfreeze[{i}]: at_step={stage.at_step} / at_epoch={stage.at_epoch} must be >= 0")
        start = stage.at_step if stage.at_epoch is None else stage.at_epoch * steps_per_epoch
        matched = [n for n, _ in decoder.named_parameters() if rx.search(n)]
        if not matched:
            raise ValueError(f"mode.unfreeze[{i}].pattern={stage.pattern!r} matches no decoder parameter (names look "
                             "like layers.0.self_attn.q_proj.weight, proj_in.1.weight, time_embed.linear_1.weight)")
        for name in matched:
            starts[name] = min(start, starts.get(name, start))
    return starts


def held_back(decoder: nn.Module, starts: Dict[str, int]) -> List[Tuple[int, List[nn.Parameter]]]:
    """(start step, parameters) for the stages that do not train from step 0; see `drop_held_grads`."""
    by_start: Dict[int, List[nn.Parameter]] = {}
    for name, p in decoder.named_parameters():
        if starts.get(name, 0) > 0 and p.requires_grad:
            by_start.setdefault(starts[name], []).append(p)
    return sorted(by_start.items(), key=lambda item: item[0])


def drop_held_grads(held: List[Tuple[int, List[nn.Parameter]]], steps_done: int) -> None:
    """Before an optimizer step: forget the gradients of weights whose stage has not started.

    Held-back weights stay in the optimizer and in the backward pass (so multi-process gradient reduction sees the
    same parameters every step), but optimizers skip a parameter without a gradient: no update, no weight decay, no
    moment accumulated until its stage starts.
    """
    for start, params in held:
        if steps_done < start:
            for p in params:
                p.grad = None


def trainable_state_dict(decoder: nn.Module, weights: Optional[Dict[str, torch.Tensor]] = None
                         ) -> Dict[str, torch.Tensor]:
    """The trained weights only: adapter tensors (PEFT key names) or the full decoder state. `weights` = the
    decoder's full state dict gathered elsewhere (sharded runs); default: the module's own."""
    if isinstance(decoder, PeftModel):
        return get_peft_model_state_dict(decoder, state_dict=weights)
    return decoder.state_dict() if weights is None else weights


def write_trained(model: nn.Module, decoder: nn.Module, directory: Path, dtype: torch.dtype,
                  weights: Optional[Dict[str, torch.Tensor]] = None, comfyui: bool = False) -> Path:
    """The trained weights as a user takes them elsewhere: the PEFT adapter directory (adapter modes; `comfyui`: also
    its ComfyUI file) or the whole model in the official layout (mode=full: config.json + model.safetensors + the
    official support files it can copy or write; loads in official ACE-Step inference).

    `weights` = the decoder's full state dict (keys of the unwrapped decoder) when the live one is sharded or
    replaced (EMA); default: the module's own.
    """
    if isinstance(decoder, PeftModel):
        save_adapter(decoder, directory, dtype, weights, comfyui)
        return Path(directory)
    state = model.state_dict()
    if weights is not None:
        state.update({f"decoder.{k}": v for k, v in weights.items()})
    return save_full_model(model, directory, dtype=dtype, state=state)


def export_trained(model: nn.Module, decoder: nn.Module, directory: Path, dtype: torch.dtype,
                   weights: Optional[Dict[str, torch.Tensor]] = None, comfyui: bool = False) -> Path:
    """`write_trained` into `directory` atomically (the final export of a run)."""
    with atomic_directory(directory) as tmp:
        write_trained(model, decoder, tmp, dtype, weights, comfyui)
    return Path(directory)


def count_parameters(module: nn.Module) -> tuple[int, int]:
    """(trainable, total) parameter counts."""
    trainable = sum(p.numel() for p in module.parameters() if p.requires_grad)
    total = sum(p.numel() for p in module.parameters())
    return trainable, total
