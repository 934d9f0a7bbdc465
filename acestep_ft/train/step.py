"""One training micro-step as a function: batch in, scalar loss out (no optimizer, no logging)."""

from __future__ import annotations

from typing import Callable, Optional, Tuple

import torch
from torch import Tensor

from acestep_ft.config import ObjectiveConfig
from acestep_ft.data.batch import Batch
from acestep_ft.train.objective import apply_cfg_dropout, draw, flow_loss, interpolate, velocity_target


Encode = Callable[[Batch], Tuple[Tensor, Tensor]]
"""Batch of condition-encoder inputs -> (encoder_hidden_states [B, L, H_enc], encoder_attention_mask [B, L])."""


def batch_condition(batch: Batch, encode: Optional[Encode]) -> Tuple[Tensor, Tensor]:
    """The condition of a batch: the stored encoder outputs, or `encode(batch)` for data that carries the encoder's
    inputs (train/conditioning.py)."""
    if encode is None:
        return batch.encoder_hidden_states, batch.encoder_attention_mask
    return encode(batch)


def flow_matching_loss(
    decoder: Callable[..., Tensor],
    null_embedding: Tensor,
    batch: Batch,
    cfg: ObjectiveConfig,
    timestep_mu: float,
    timestep_sigma: float,
    generator: Optional[torch.Generator] = None,
    encode: Optional[Encode] = None,
) -> Tensor:
    """The official training forward (official `forward`, ACESTEP15.md section d) on precomputed conditions, or,
    with `encode`, on conditions the condition encoder computes from the batch first (after the random draws, which
    keep the official order).

    `decoder` is the DiT (possibly wrapped by PEFT / Accelerate); `null_embedding` [1, 1, H_enc] replaces the
    condition of CFG-dropped samples. Masks reach the decoder and the loss only when the objective asks for them.
    """
    x0 = batch.target_latents  # [B, T, 64]
    d = draw(x0, cfg.cfg_ratio, cfg.timesteps, timestep_mu, timestep_sigma, generator)
    hidden, encoder_mask = batch_condition(batch, encode)
    condition = apply_cfg_dropout(hidden, null_embedding, d.cfg_keep)  # [B, L, H_enc]
    pred = predict_velocity(decoder, batch, interpolate(x0, d.noise, d.t), d.t, condition, encoder_mask,
                            cfg.attention_mask)
    return flow_loss(pred, velocity_target(x0, d.noise), batch.attention_mask if cfg.loss_mask else None)


def predict_velocity(decoder: Callable[..., Tensor], batch: Batch, x_t: Tensor, t: Tensor, condition: Tensor,
                     encoder_mask: Tensor, use_masks: bool) -> Tensor:
    """The decoder's velocity for x_t [B, T, 64] at t [B] (r = t), given the condition [B, L, H_enc] and its mask
    [B, L] and the batch's context latents; the masks reach the decoder only with `use_masks`
    (objective.attention_mask)."""
    masks = {}
    if use_masks:
        masks = {"attention_mask": batch.attention_mask, "encoder_attention_mask": encoder_mask}
    return decoder(hidden_states=x_t, timestep=t, timestep_r=t, encoder_hidden_states=condition,
                   context_latents=batch.context_latents, **masks)
