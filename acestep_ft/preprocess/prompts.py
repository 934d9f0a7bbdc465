"""Text prompts -> the conditions preprocessing would have stored for them: what training previews
(train.samples.prompts) and `python -m acestep_ft.generate` render.

    samples = encode_prompts(prompts, model, model_cfg, text_dir, vae, device, dtype, key)   # once; encoders freed

A prompt goes through exactly the path that gave the training data its conditions (`Encoders.condition`: the official
SFT_GEN_PROMPT caption prompt, metas bpm / keyscale / timesignature N/A and the prompt's duration, padded to
preprocess.text_max_tokens; the lyric text of preprocess.lyric_format, tokenized as preprocessing does, through the
text encoder's embedding table; the model's own condition encoder with one zero timbre reference), so a preview hears
conditions shaped like the ones the model trains on. `pre` holds those preprocessing settings (default: the
PreprocessConfig defaults); pass the data's own when it was preprocessed with others. Official inference pads the
caption to the longest prompt of its batch and wraps the lyrics as
"# Languages\\n{lang}\\n\\n# Lyric\\n{lyrics}<|endoftext|>" (lyric_format=official_template); the decoder attends to
padding tokens too, so the formats give different conditions.
context_latents = cat(silence_latent[:T], ones) as in preprocessing, T = 25 latent frames per second of the prompt's
duration.
"""

from __future__ import annotations

import copy
import gc
from pathlib import Path
from typing import Any, List, Optional, Sequence

import torch
from torch import nn

from acestep_ft.config import PreprocessConfig, PromptSample
from acestep_ft.data.batch import Sample, sample_from
from acestep_ft.data.crop import FRAMES_PER_SECOND

from .captions import Song
from .encoders import LATENT_CHANNELS, Encoders, context_latents, load_silence, load_text_encoder


def prompt_frames(seconds: float) -> int:
    """Latent frames of a prompt of `seconds` (at least one)."""
    return max(1, int(round(seconds * FRAMES_PER_SECOND)))


def encode_prompts(prompts: Sequence[PromptSample], model: nn.Module, model_cfg: Any, text_dir: Path, vae: Any,
                   device: Any, dtype: torch.dtype, text_key: str,
                   pre: Optional[PreprocessConfig] = None, inputs: bool = False) -> List[Sample]:
    """One Sample per prompt (key prompt-<i>, float32 on the CPU; target_latents zeros: there is no target), encoded
    once with the text encoder in `text_dir` (model.text_encoder_adapter merged when set) and `model`'s condition
    encoder, on `device` in `dtype` as preprocessing runs them, with the token lengths and lyric format of `pre` (None
    = the PreprocessConfig defaults). `inputs`: the samples carry the condition encoder's inputs instead of its
    outputs (as preprocess.store=inputs writes them, caption token ids included), for a run whose step encodes them
    with the encoders it trains. The text encoder and any device copy of the condition encoder are freed before
    returning, so nothing of them stays on the device. `vae` only provides the sample rate the encoders record."""
    tokenizer, text_model = load_text_encoder(text_dir, model_cfg.text_hidden_dim, text_key,
                                              model_cfg.text_encoder_adapter)
    device = torch.device(device)
    in_place = all(p.device == device and p.dtype == dtype for p in model.encoder.parameters())
    # a copy when it must move or change dtype: the model's own weights stay as loaded (a full export writes them)
    condition_encoder = (model.encoder if in_place else copy.deepcopy(model.encoder)).to(device=device, dtype=dtype)
    was_training = condition_encoder.training
    silence = None
    if model_cfg.path is not None:
        dit = Path(model_cfg.path).expanduser()
        silence, _ = load_silence(dit if dit.is_dir() else dit.parent, model_cfg.variant)
    settings = pre if pre is not None else PreprocessConfig(input_dir="", output_dir="")
    encoders = Encoders(vae, text_model.to(device=device, dtype=dtype), tokenizer, condition_encoder.eval(), silence,
                        {}, settings, device, dtype)
    try:
        samples = []
        for i, prompt in enumerate(prompts):
            song, frames = Song(caption=prompt.caption, lyrics=prompt.lyrics), prompt_frames(prompt.duration)
            tensors = {"target_latents": torch.zeros(frames, LATENT_CHANNELS), "attention_mask": torch.ones(frames),
                       "context_latents": context_latents(silence, frames)}
            if inputs:
                tensors.update(encoders.stored_inputs(encoders.encoder_inputs(song, prompt.duration)))
            else:
                tensors["encoder_hidden_states"], tensors["encoder_attention_mask"] = encoders.condition(
                    song, prompt.duration)
            samples.append(sample_from(f"prompt-{i}", {k: v.float() if v.is_floating_point() else v
                                                       for k, v in tensors.items()}))
        return samples
    finally:
        condition_encoder.train(was_training)
        del encoders, text_model, condition_encoder
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
