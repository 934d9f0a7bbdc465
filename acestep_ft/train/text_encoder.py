"""The text encoder as a trained module (mode.text_encoder=lora): a PEFT LoRA on the Qwen3 text encoder that trains
with the decoder (and any condition-encoder stage), saved beside the trained weights as `text_encoder/`.

    text = load_text_model(cfg.model)                     # transformers Qwen3 from model.text_encoder_path (float32)
    trained = make_trainable(model, cfg.mode, text)       # trainable.py wraps it: names text_encoder.*
    states = run_text_encoder(trained.text_encoder, ids)  # [B, Lt, D_text], as preprocessing computes them

The step runs the text encoder on the caption's token ids without an attention mask, as the official preprocessing
does (`last_hidden_state` of the padded prompt); its causal attention keeps each sample's own positions independent
of the batch's padding after them. Where a trained adapter is used later (preprocessing, text prompts, generate),
`model.text_encoder_adapter` merges it into the text encoder (`preprocess.encoders.load_text_encoder`).
"""

from __future__ import annotations

from typing import Any, Optional

from peft import LoraConfig
from torch import Tensor, nn

from acestep_ft.config import TextEncoderTraining
from acestep_ft.errors import UserError
from acestep_ft.train.adapters import wrap

TEXT_ADAPTER_DIR = "text_encoder"  # inside a checkpoint's adapter/ or model/, and inside export/
TEXT_KEY = "model.text_encoder_path"


def trains_text_encoder(mode: Any) -> bool:
    """mode.text_encoder=lora."""
    return mode.text_encoder == TextEncoderTraining.lora


def text_lora_config(mode: Any) -> LoraConfig:
    """The PEFT config of mode.text_lora."""
    lora = mode.text_lora
    return LoraConfig(r=lora.rank, lora_alpha=lora.alpha, lora_dropout=lora.dropout,
                      target_modules=list(lora.target_modules))


def load_text_model(model_cfg: Any) -> nn.Module:
    """The text encoder (transformers model, float32, CPU) from model.text_encoder_path or the checkpoint layout;
    the base weights as they are (a LoRA trains on the base, never on a merged model.text_encoder_adapter)."""
    from acestep_ft.preprocess.encoders import load_text_encoder
    from acestep_ft.train.conditioning import text_encoder_dir

    _, model = load_text_encoder(text_encoder_dir(model_cfg), model_cfg.text_hidden_dim, TEXT_KEY)
    return model


def meta_text_model(model_cfg: Any) -> nn.Module:
    """The text encoder built from its config.json on the meta device (no weights, no memory): for checks and the
    memory preflight."""
    import torch
    from transformers import AutoConfig, AutoModel

    from acestep_ft.train.conditioning import text_encoder_dir

    directory = text_encoder_dir(model_cfg)
    try:
        config = AutoConfig.from_pretrained(str(directory))
    except (OSError, ValueError) as err:
        raise UserError(f"{directory}: cannot read the text encoder's config.json ({err}). Fix: {TEXT_KEY}=<the "
                        "checkpoint's Qwen3-Embedding-0.6B/>.") from err
    with torch.device("meta"):
        return AutoModel.from_config(config)


def text_lora_problem(model_cfg: Any, mode: Any) -> Optional[str]:
    """mode.text_lora.target_modules that match nothing in the text encoder (checked on the meta model), or None."""
    try:
        wrap(meta_text_model(model_cfg), text_lora_config(mode))
    except ValueError as err:
        return (f"mode.text_lora.target_modules={list(mode.text_lora.target_modules)} do not fit the text encoder "
                f"({err}); Qwen3 has q_proj, k_proj, v_proj, o_proj, gate_proj, up_proj, down_proj.")
    return None


def run_text_encoder(text_encoder: nn.Module, token_ids: Tensor) -> Tensor:
    """Caption token ids [B, Lt] -> the text encoder's last hidden states [B, Lt, D_text] (no attention mask, as the
    official preprocessing calls it)."""
    return text_encoder(input_ids=token_ids).last_hidden_state
