"""Which weights train: a PEFT adapter on the decoder (mode=lora | lokr | loha, train/adapters.py) or the whole
decoder (mode=full), optionally with staged unfreezing that reaches into the condition encoder.

Every mode returns the module the loop calls and optimizes; they differ only in what requires grad and in what a
save writes (a PEFT adapter directory + its ComfyUI file, or the full model in the official layout). A full
fine-tune with a condition_encoder stage trains `DecoderAndEncoder`, whose parameter names are the official keys
(decoder.*, encoder.*); every other full fine-tune trains the decoder itself (names relative to it). Any mode with
mode.text_encoder=lora trains a `DecoderAndEncoder` that also holds the PEFT-wrapped text encoder (text_encoder.*),
saved as a PEFT directory text_encoder/ inside what the rest writes.
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
from acestep_ft.model.encoder import AceStepConditionEncoder
from acestep_ft.train.adapters import peft_config, save_adapter, wrap
from acestep_ft.train.text_encoder import TEXT_ADAPTER_DIR, text_lora_config, trains_text_encoder

ModeConfig = Union[AdapterMode, FullMode]


class DecoderAndEncoder(nn.Module):
    """The trained module when more than the decoder trains: the DiT decoder (PEFT-wrapped for adapter modes), the
    condition encoder (a full fine-tune's condition_encoder stage) and the text encoder's LoRA (mode.text_encoder=
    lora) under their own prefixes (decoder.*, encoder.*: the official keys; text_encoder.*), so optimizer, parameter
    groups, EMA, DDP, checkpoints and the export see one module. Calling it calls the decoder; the step runs the
    encoders first (train/conditioning.py)."""

    def __init__(self, decoder: nn.Module, encoder: Optional[nn.Module] = None,
                 text_encoder: Optional[nn.Module] = None) -> None:
        super().__init__()
        self.decoder = decoder
        self.encoder = encoder
        self.text_encoder = text_encoder

    def forward(self, **kwargs):
        return self.decoder(**kwargs)

    def parts(self) -> List[Tuple[str, nn.Module]]:
        """(name prefix, module) of each part it holds."""
        return [(prefix, m) for prefix, m in (("decoder.", self.decoder), ("encoder.", self.encoder),
                                              ("text_encoder.", self.text_encoder)) if m is not None]


def _part(weights: Optional[Dict[str, torch.Tensor]], prefix: str) -> Optional[Dict[str, torch.Tensor]]:
    """The tensors of `weights` under `prefix`, without it (None stays None)."""
    if weights is None:
        return None
    return {k[len(prefix):]: v for k, v in weights.items() if k.startswith(prefix)}


def parts_of(trained: nn.Module) -> List[Tuple[str, nn.Module]]:
    """(official prefix, module) of each part of a trained module: `DecoderAndEncoder`'s parts, else the decoder."""
    return trained.parts() if isinstance(trained, DecoderAndEncoder) else [("decoder.", trained)]


def text_encoder_of(trained: nn.Module) -> Optional[nn.Module]:
    """The PEFT-wrapped text encoder that trains with `trained` (mode.text_encoder=lora), else None."""
    return dict(parts_of(trained)).get("text_encoder.")


def trains_encoder(mode: ModeConfig) -> bool:
    """A full fine-tune with a mode.unfreeze stage for the condition encoder."""
    return isinstance(mode, FullMode) and any(s.module == TrainModule.condition_encoder for s in mode.unfreeze)


def trained_module(model: nn.Module, mode: FullMode) -> nn.Module:
    """What a full fine-tune optimizes: `DecoderAndEncoder` when a stage trains the encoder, else the decoder."""
    return DecoderAndEncoder(model.decoder, model.encoder) if trains_encoder(mode) else model.decoder


def make_trainable(model: nn.Module, mode: ModeConfig, text_model: Optional[nn.Module] = None) -> nn.Module:
    """Freeze everything, then unfreeze what the mode trains. Returns the module to call and optimize.

    Adapter modes: the decoder wrapped by PEFT (keys relative to the decoder, as official inference expects); the
    adapter starts fresh (mode.init_adapter is loaded by the caller, `adapters.init_from_adapter`).
    Full: the decoder itself, or `DecoderAndEncoder` when a stage trains the condition encoder.
    mode.text_encoder=lora: `text_model` (the Qwen3 text encoder, `text_encoder.load_text_model`) gets a fresh LoRA
    and joins a `DecoderAndEncoder` as text_encoder.
    """
    model.requires_grad_(False)
    match mode:
        case AdapterMode():
            trained = wrap(model.decoder, peft_config(mode))
        case FullMode():
            trained = trained_module(model, mode)
            if not mode.unfreeze:
                model.decoder.requires_grad_(True)
            for name in unfreeze_starts(trained, mode.unfreeze, steps_per_epoch=1):
                trained.get_parameter(name).requires_grad_(True)
        case _:
            raise TypeError(f"unknown mode config {type(mode).__name__}")
    if not trains_text_encoder(mode):
        return trained
    if text_model is None:
        raise ValueError("mode.text_encoder=lora needs the text encoder module (text_encoder.load_text_model)")
    text_model.requires_grad_(False)
    with torch.random.fork_rng(devices=[]):  # its init draws leave the run's noise and timesteps as without it
        torch.manual_seed(torch.initial_seed() + 1)
        text = wrap(text_model, text_lora_config(mode))
    if isinstance(trained, DecoderAndEncoder):
        trained.text_encoder = text
        return trained
    return DecoderAndEncoder(trained, None, text)


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
        prefixes = ("decoder.", "encoder.") if trains_encoder(mode) else ("decoder.",)
        return lambda key: key.startswith(prefixes)
    return lambda key: False


# Where each module's parameters live in the trained module, and what their names look like (for errors).
_STAGE_NAMES = {TrainModule.decoder: "layers.0.self_attn.q_proj.weight, proj_in.1.weight, time_embed.linear_1.weight",
                TrainModule.condition_encoder: "lyric_encoder.layers.0.mlp.up_proj.weight, timbre_encoder.embed_tokens"
                                               ".weight, text_projector.weight"}


def _never_used(module: nn.Module) -> set:
    """Parameters of a stage's module that no forward pass reads, so they could never get a gradient (and a DDP
    reducer would wait for one): the 2B timbre encoder's `special_token` (only XL prepends it)."""
    if isinstance(module, AceStepConditionEncoder) and not module.timbre_encoder.use_special_token:
        return {"timbre_encoder.special_token"}
    return set()


def _stage_module(trained: nn.Module, module: TrainModule) -> Tuple[nn.Module, str]:
    """(the stage's module inside `trained`, the prefix of its names in `trained`)."""
    if isinstance(trained, DecoderAndEncoder):
        return (trained.decoder, "decoder.") if module == TrainModule.decoder else (trained.encoder, "encoder.")
    if module == TrainModule.decoder:
        return trained, ""
    raise ValueError(f"module={module} needs the condition encoder in the trained module (a full fine-tune with a "
                     "condition_encoder stage builds it)")


def unfreeze_starts(trained: nn.Module, stages: Sequence[UnfreezeStage], steps_per_epoch: int) -> Dict[str, int]:
    """Staged unfreezing (mode.unfreeze): parameter name in `trained` (`trained_module`) -> first optimizer step at
    which it trains. Patterns are searched in names relative to the stage's module (decoder or condition encoder).

    A parameter matched by several stages starts with the earliest. Bad patterns and patterns matching nothing raise
    ValueError (the config check reports them before any work).
    """
    starts: Dict[str, int] = {}
    for i, stage in enumerate(stages):
        try:
            rx = re.compile(stage.pattern)
        except re.error as err:
            raise ValueError(f"mode.unfreeze[{i}].pattern={stage.pattern!r} is not a valid regex: {err}") from None
        if stage.at_step < 0 or (stage.at_epoch is not None and stage.at_epoch < 0):
            raise ValueError(f"mode.unfreeze[{i}]: at_step={stage.at_step} / at_epoch={stage.at_epoch} must be >= 0")
        try:
            module, prefix = _stage_module(trained, stage.module)
        except ValueError as err:
            raise ValueError(f"mode.unfreeze[{i}]: {err}") from None
        start = stage.at_step if stage.at_epoch is None else stage.at_epoch * steps_per_epoch
        unused = _never_used(module)
        matched = [prefix + n for n, _ in module.named_parameters() if rx.search(n) and n not in unused]
        if not matched:
            raise ValueError(f"mode.unfreeze[{i}].pattern={stage.pattern!r} matches no {stage.module} parameter "
                             f"(names look like {_STAGE_NAMES[stage.module]})")
        for name in matched:
            starts[name] = min(start, starts.get(name, start))
    return starts


def held_back(trained: nn.Module, starts: Dict[str, int]) -> List[Tuple[int, List[nn.Parameter]]]:
    """(start step, parameters) for the stages that do not train from step 0; see `drop_held_grads`."""
    by_start: Dict[int, List[nn.Parameter]] = {}
    for name, p in trained.named_parameters():
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
    """The trained weights only: adapter tensors (PEFT key names) or the full decoder state (of each part of a
    `DecoderAndEncoder`, under its prefix). `weights` = the module's full state dict gathered elsewhere (sharded runs);
    default: the module's own."""
    if isinstance(decoder, DecoderAndEncoder):
        return {prefix + k: v for prefix, part in decoder.parts()
                for k, v in trainable_state_dict(part, _part(weights, prefix)).items()}
    if isinstance(decoder, PeftModel):
        return get_peft_model_state_dict(decoder, state_dict=weights)
    return decoder.state_dict() if weights is None else weights


def write_trained(model: nn.Module, decoder: nn.Module, directory: Path, dtype: torch.dtype,
                  weights: Optional[Dict[str, torch.Tensor]] = None, comfyui: bool = False) -> Path:
    """The trained weights as a user takes them elsewhere: the PEFT adapter directory (adapter modes; `comfyui`: also
    its ComfyUI file) or the whole model in the official layout (mode=full: config.json + model.safetensors + the
    official support files it can copy or write; loads in official ACE-Step inference).

    `weights` = the trained module's full state dict (keys of the unwrapped module: relative to the decoder, or the
    official decoder.* / encoder.* keys of `DecoderAndEncoder`) when the live one is sharded or replaced (EMA);
    default: the module's own. A trained text-encoder LoRA goes to `directory`/text_encoder/ (a PEFT directory).
    """
    text = text_encoder_of(decoder)
    if text is not None:  # the rest is written as if it were not there, then the text encoder's adapter beside it
        text_weights = _part(weights, "text_encoder.")
        if decoder.encoder is None:
            rest, weights = decoder.decoder, _part(weights, "decoder.")
        else:
            rest = DecoderAndEncoder(decoder.decoder, decoder.encoder)
            weights = None if weights is None else {k: v for k, v in weights.items()
                                                    if not k.startswith("text_encoder.")}
        write_trained(model, rest, directory, dtype, weights, comfyui)
        save_adapter(text, Path(directory) / TEXT_ADAPTER_DIR, dtype, text_weights)
        return Path(directory)
    if isinstance(decoder, PeftModel):
        save_adapter(decoder, directory, dtype, weights, comfyui)
        return Path(directory)
    state = model.state_dict()
    if weights is not None:
        prefix = "" if isinstance(decoder, DecoderAndEncoder) else "decoder."
        state.update({f"{prefix}{k}": v for k, v in weights.items()})
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
