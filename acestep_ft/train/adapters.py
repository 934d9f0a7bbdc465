"""Adapter types on the DiT decoder (mode=lora | lokr | loha) and the files they are saved in and started from.

A new type is a typed mode config (config.py) plus one entry in `peft_config`: PEFT builds, trains, merges and saves
every type the same way. Files:
- a PEFT adapter directory (adapter_config.json + adapter_model.safetensors, decoder-relative keys), which official
  ACE-Step inference loads with PeftModel.from_pretrained(model.decoder, dir);
- beside it `comfyui/adapter.safetensors`, the same adapter in ComfyUI's layout with per-module alpha so that
  strength 1.0 in ComfyUI is the trained update (train/comfyui.py owns that layout).

Warm start (`mode.init_adapter`) reads either file kind, checks type, targets and shapes against the configured
mode, and rescales the update when the source's alpha / rank differs, so the model starts exactly where the source
adapter left it.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any, Dict, Optional, Tuple

import torch
from peft import LoHaConfig, LoKrConfig, LoraConfig, PeftConfig, PeftModel, get_peft_model, set_peft_model_state_dict
from peft.utils import get_peft_model_state_dict
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import nn

from acestep_ft.config import AdapterMode, LohaMode, LokrMode, LoraMode
from acestep_ft.errors import UserError
from acestep_ft.model.variants import build_meta_model

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
COMFYUI_FILE = Path("comfyui") / "adapter.safetensors"
PEFT_TYPES = {"lora": "LORA", "lokr": "LOKR", "loha": "LOHA"}
# Per PEFT type: one tensor per module that the update is linear in (scaling it by c scales the update by c).
UP_TENSOR = {"LORA": re.compile(r"\.lora_B\.weight$"), "LOKR": re.compile(r"\.lokr_w1(_a)?$"),
             "LOHA": re.compile(r"\.hada_w1_a$")}


def peft_config(mode: AdapterMode) -> PeftConfig:
    """The PEFT config that builds the adapter `mode` describes."""
    targets = list(mode.target_modules)
    match mode:
        case LoraMode():
            return LoraConfig(r=mode.rank, lora_alpha=mode.alpha, lora_dropout=mode.dropout, target_modules=targets,
                              use_dora=mode.use_dora, use_rslora=mode.use_rslora)
        case LokrMode():
            return LoKrConfig(r=mode.rank, alpha=mode.alpha, rank_dropout=mode.rank_dropout,
                              module_dropout=mode.module_dropout, target_modules=targets,
                              decompose_both=mode.decompose_both, decompose_factor=mode.decompose_factor)
        case LohaMode():
            return LoHaConfig(r=mode.rank, alpha=mode.alpha, rank_dropout=mode.rank_dropout,
                              module_dropout=mode.module_dropout, target_modules=targets)
    raise TypeError(f"unknown adapter mode {type(mode).__name__}")


def wrap(decoder: nn.Module, config: PeftConfig) -> PeftModel:
    """The decoder with the adapter inserted (only adapter tensors require grad)."""
    peft_model = get_peft_model(decoder, config)
    # Official inference saves and loads adapters as FEATURE_EXTRACTION; the type only matters when a PeftModel class
    # is picked, which happened above, so record the official value for the saved file.
    peft_model.peft_config["default"].task_type = "FEATURE_EXTRACTION"
    return peft_model


def is_adapter_tensor(name: str) -> bool:
    """A tensor name (any PEFT spelling) that belongs to an adapter of one of our types."""
    return any(part in name for part in (".lora_", ".lokr_", ".hada_"))


def save_adapter(decoder: PeftModel, directory: Path, dtype: torch.dtype = torch.float32,
                 weights: Optional[Dict[str, torch.Tensor]] = None, comfyui: bool = False) -> None:
    """PEFT adapter directory (adapter_config.json + adapter_model.safetensors, decoder-relative keys, `dtype`),
    from `weights` (the wrapped decoder's full state dict) when given; `comfyui`: also comfyui/adapter.safetensors."""
    decoder.save_pretrained(str(directory), safe_serialization=True, state_dict=weights)
    path = Path(directory) / ADAPTER_WEIGHTS
    if dtype != torch.float32:
        save_file({k: v.to(dtype) for k, v in load_file(str(path)).items()}, str(path), metadata={"format": "pt"})
    if comfyui:
        from acestep_ft.train.comfyui import write_comfyui

        write_comfyui(Path(directory), Path(directory) / COMFYUI_FILE, base_weights(decoder, weights))


def base_weights(decoder: PeftModel, weights: Optional[Dict[str, torch.Tensor]] = None
                 ) -> Optional[Dict[str, torch.Tensor]]:
    """DoRA only: the frozen weights under the adapted modules ("<module>.weight", decoder-relative), which ComfyUI's
    DoRA scale is relative to; None for other types. `weights` = tensors of the wrapped decoder's state dict that
    replace the live ones (gathered from shards, or EMA)."""
    if not getattr(decoder.peft_config["default"], "use_dora", False):
        return None
    state = {**decoder.state_dict(), **(weights or {})}  # references, no copies
    return {k.removeprefix("base_model.model.").replace(".base_layer.weight", ".weight"): v
            for k, v in state.items() if k.endswith(".base_layer.weight")}


def load_adapter_weights(decoder: PeftModel, directory: Path) -> None:
    """Load adapter weights saved by `save_adapter` into an already-wrapped decoder (resume), refusing any mismatch."""
    _load_strict(decoder, load_file(str(Path(directory) / ADAPTER_WEIGHTS)), str(directory),
                 "resume with the same mode (type, rank and target_modules)")


def _load_strict(decoder: PeftModel, weights: Dict[str, torch.Tensor], where: str, fix: str) -> None:
    expected = {k: tuple(v.shape) for k, v in get_peft_model_state_dict(decoder).items()}
    missing = sorted(set(expected) - set(weights))
    unexpected = sorted(set(weights) - set(expected))
    wrong = [f"{k}: file {list(weights[k].shape)} vs mode {list(expected[k])}"
             for k in sorted(set(expected) & set(weights)) if tuple(weights[k].shape) != expected[k]]
    if missing or unexpected or wrong:
        raise UserError(f"the adapter in {where} does not match the configured mode: {len(missing)} missing tensors "
                        f"{missing[:3]}, {len(unexpected)} unexpected {unexpected[:3]}, {len(wrong)} with another "
                        f"shape {wrong[:3]}. Fix: {fix}.")
    set_peft_model_state_dict(decoder, weights)


def read_adapter(path: Path) -> Tuple[Dict[str, torch.Tensor], dict]:
    """(PEFT state dict, adapter_config dict) from a PEFT adapter directory (a run's export/ or a checkpoint's
    adapter/) or a ComfyUI-layout .safetensors file."""
    path = Path(os.path.expanduser(str(path)))
    if path.is_dir() and (path / "adapter").is_dir() and not (path / ADAPTER_CONFIG).exists():
        path = path / "adapter"  # a checkpoint directory: its adapter/ holds the PEFT files
    if path.is_dir():
        if not (path / ADAPTER_CONFIG).is_file() or not (path / ADAPTER_WEIGHTS).is_file():
            raise UserError(f"{path} is not a PEFT adapter directory: it needs {ADAPTER_CONFIG} and {ADAPTER_WEIGHTS}"
                            " (a run's export/ or checkpoints/step-N/adapter/), or give a ComfyUI .safetensors file")
        try:
            return load_file(str(path / ADAPTER_WEIGHTS)), json.loads((path / ADAPTER_CONFIG).read_text())
        except Exception as err:
            raise UserError(f"cannot read the adapter in {path}: {type(err).__name__}: {err}") from err
    if path.is_file() and path.suffix == ".safetensors":
        from acestep_ft.train.comfyui import from_comfyui

        try:
            with safe_open(str(path), "pt") as f:  # the metadata carries our own files' exact PEFT config
                return from_comfyui({k: f.get_tensor(k) for k in f.keys()}, f.metadata() or {})
        except ValueError as err:
            raise UserError(f"{path}: {err}") from err
    raise UserError(f"adapter {path} not found: give a PEFT adapter directory or a ComfyUI .safetensors file")


def _scalings(decoder: PeftModel) -> Dict[str, float]:
    """Adapter layer name (relative to the PEFT wrapper, without the adapter name) -> the factor its update is
    multiplied by (alpha / r, alpha / sqrt(r) for rsLoRA, per-module patterns applied)."""
    return {name: float(m.scaling["default"]) for name, m in decoder.named_modules()
            if isinstance(getattr(m, "scaling", None), dict) and "default" in m.scaling}


def init_from_adapter(decoder: PeftModel, path: str, model_cfg: Any) -> str:
    """Warm start: load the adapter at `path` into the wrapped `decoder` of a `model_cfg` model (type, targets and
    shapes must match), each module's update rescaled to the source adapter's alpha / rank (read from the source's
    config applied to a decoder on the meta device). Returns a line saying what was loaded."""
    weights, source = read_adapter(Path(path))
    mine = decoder.peft_config["default"]
    kind, my_kind = str(source.get("peft_type", "?")).upper(), mine.peft_type.value
    if kind != my_kind:
        wanted = {v: k for k, v in PEFT_TYPES.items()}.get(kind)
        raise UserError(f"mode.init_adapter={path} is a {kind} adapter but the mode trains {my_kind}"
                        + (f": use mode={wanted}" if wanted else ""))
    if kind == "LORA" and bool(source.get("use_dora", False)) != bool(mine.use_dora):
        raise UserError(f"mode.init_adapter={path} was trained with use_dora={source.get('use_dora', False)}: set "
                        f"mode.use_dora={str(bool(source.get('use_dora', False))).lower()}")
    source_cfg = PeftConfig.from_peft_type(**{k: v for k, v in source.items() if k in _fields(kind)})
    source_scale = _scalings(wrap(build_meta_model(model_cfg).decoder, source_cfg))
    my_scale = _scalings(decoder)
    rescaled = 0
    for key in list(weights):
        up = UP_TENSOR[kind].search(key)
        if up is None:
            continue
        module = key[:up.start()]
        ratio = source_scale.get(module, 1.0) / my_scale.get(module, 1.0)
        if ratio != 1.0:
            weights[key] = weights[key] * ratio
            rescaled += 1
    _load_strict(decoder, weights, str(path), "train the same adapter type with the source's rank and "
                 "target_modules (its adapter_config.json says r, target_modules)")
    return (f"init adapter: {kind} from {path}, {len(weights)} tensors" + (
        f"; {rescaled} rescaled so the update equals the source's (its alpha/rank differs from mode.alpha/mode.rank)"
        if rescaled else "") + " (fresh optimizer and schedule, step 0)")


def _fields(kind: str) -> set:
    cls = {"LORA": LoraConfig, "LOKR": LoKrConfig, "LOHA": LoHaConfig}[kind]
    return set(cls.__dataclass_fields__)
