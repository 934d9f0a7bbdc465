"""Variant bookkeeping: full-size key/shape lists on the meta device, guessing a variant from a checkpoint's shapes,
and the official `modeling_acestep_v15_<x>` file name each variant's config.json points to."""

from __future__ import annotations

import re
from typing import Any, Dict, List, Mapping, Sequence, Tuple

import torch

from .acestep import AceStepModel

# config.json `auto_map` target per variant (sft reuses the base sampler file, as in the official repo).
MODELING_MODULE = {
    "turbo": "modeling_acestep_v15_turbo",
    "base": "modeling_acestep_v15_base",
    "sft": "modeling_acestep_v15_base",
    "xl_turbo": "modeling_acestep_v15_xl_turbo",
    "xl_base": "modeling_acestep_v15_xl_base",
    "xl_sft": "modeling_acestep_v15_xl_base",
}

# (decoder layers, decoder hidden) -> human description, for error messages.
KNOWN_SHAPES = {
    (24, 2048): "2B (turbo/base/sft: 24 DiT layers, hidden 2048)",
    (32, 2560): "XL (xl_turbo/xl_base/xl_sft: 32 DiT layers, hidden 2560)",
    (2, 64): "tiny (2 DiT layers, hidden 64)",
}


def modeling_module(cfg: Any) -> str:
    """Official modeling file (without .py) for `cfg.variant`; unknown variants fall back on is_turbo / XL widths."""
    if cfg.variant in MODELING_MODULE:
        return MODELING_MODULE[cfg.variant]
    is_xl = cfg.encoder_hidden_size is not None and cfg.encoder_hidden_size != cfg.hidden_size
    return f"modeling_acestep_v15_{'xl_' if is_xl else ''}{'turbo' if cfg.is_turbo else 'base'}"


def build_meta_model(cfg: Any) -> AceStepModel:
    """Instantiate without allocating memory (every parameter on the meta device)."""
    with torch.device("meta"):
        return AceStepModel(cfg)


def model_key_shapes(cfg: Any) -> List[Tuple[str, Tuple[int, ...]]]:
    """(state-dict key, shape) in state-dict order, for the architecture `cfg` describes (no memory allocated)."""
    return [(k, tuple(v.shape)) for k, v in build_meta_model(cfg).state_dict().items()]


def describe_size(num_layers: int, hidden_size: int) -> str:
    """"XL (...)" / "2B (...)" / "tiny (...)" / "unknown (N DiT layers, hidden H)"."""
    key = (int(num_layers), int(hidden_size))
    return KNOWN_SHAPES.get(key, f"unknown ({key[0]} DiT layers, hidden {key[1]})")


def guess_variant(shapes: Mapping[str, Sequence[int]]) -> str:
    """Describe which known variant a checkpoint's keys look like, e.g. "XL (... 32 DiT layers, hidden 2560)"."""
    layer_ids = {int(m.group(1)) for k in shapes if (m := re.match(r"decoder\.layers\.(\d+)\.", k))}
    if not layer_ids:
        prefixed = [k for k in shapes if k.endswith("decoder.layers.0.self_attn.q_proj.weight")]
        if prefixed:
            prefix = prefixed[0][: -len("decoder.layers.0.self_attn.q_proj.weight")]
            return f"an ACE-Step state dict whose keys carry the prefix {prefix!r} (strip it before loading)"
        return "not an ACE-Step 1.5 DiT state dict (no decoder.layers.* keys)"
    hidden = shapes.get("decoder.norm_out.weight", shapes.get("decoder.layers.0.self_attn_norm.weight", [0]))[0]
    return describe_size(max(layer_ids) + 1, hidden)


def param_counts(cfg: Any) -> Dict[str, int]:
    """Parameter counts by top-level part (meta device), in the layout of tests/assets/acestep15_param_counts.json."""
    model = build_meta_model(cfg)
    parts = {
        "null_condition_emb": model.null_condition_emb.numel(),
        "decoder": sum(p.numel() for p in model.decoder.parameters()),
        "encoder.text_projector": sum(p.numel() for p in model.encoder.text_projector.parameters()),
        "encoder.lyric_encoder": sum(p.numel() for p in model.encoder.lyric_encoder.parameters()),
        "encoder.timbre_encoder": sum(p.numel() for p in model.encoder.timbre_encoder.parameters()),
        "tokenizer": sum(p.numel() for p in model.tokenizer.parameters()),
        "detokenizer": sum(p.numel() for p in model.detokenizer.parameters()),
    }
    parts["total"] = sum(p.numel() for p in model.parameters())
    return parts
