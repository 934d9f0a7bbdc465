"""The ACE-Step 1.5 flow-matching objective as pure functions (no modules, no I/O).

Conventions (official `AceStepConditionGenerationModel.forward`, reimplemented line for line by Side-Step):
t = 1 is pure noise, t = 0 is data; x_t = t * noise + (1 - t) * x0; the decoder predicts the velocity
noise - x0; the loss is a plain MSE over every element, padded frames included, unless `loss_mask` is asked for.

Random draws happen in the official order — CFG coin, noise, two timestep draws — so that under the same seed
our training step reproduces the official one exactly.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

# The 8 timesteps of turbo's shift-3 schedule; the original official LoRA trainer draws t uniformly from these.
TURBO_SHIFT3_TIMESTEPS = (1.0, 0.9545454545454546, 0.9, 0.8333333333333334, 0.75, 0.6428571428571429, 0.5, 0.3)

TimestepKind = str  # "logit_normal" | "turbo_discrete" (config.TimestepKind)


@dataclass
class FlowDraws:
    """Everything random in one training step."""

    cfg_keep: Tensor  # [B] bool, False = condition replaced by the null embedding
    noise: Tensor     # [B, T, 64] x1
    t: Tensor         # [B] in (0, 1]


def sample_timesteps(
    batch_size: int,
    kind: TimestepKind,
    mu: float,
    sigma: float,
    device: torch.device,
    generator: Optional[torch.Generator] = None,
) -> Tensor:
    """Training timesteps t [B].

    logit_normal: two draws sigmoid(N(mu, sigma)) per sample and t = their max (the official `sample_t_r` with
    `use_meanflow=False`: r is the min, then discarded since r = t). This skews t toward noise compared with a
    single logit-normal draw. turbo_discrete: uniform over TURBO_SHIFT3_TIMESTEPS.
    """
    match kind:
        case "logit_normal":
            a = torch.sigmoid(torch.randn(batch_size, device=device, generator=generator) * sigma + mu)
            b = torch.sigmoid(torch.randn(batch_size, device=device, generator=generator) * sigma + mu)
            return torch.maximum(a, b)
        case "turbo_discrete":
            table = torch.tensor(TURBO_SHIFT3_TIMESTEPS, device=device)
            idx = torch.randint(len(table), (batch_size,), device=device, generator=generator)
            return table[idx]
    raise ValueError(f"unknown timestep kind {kind!r}; use logit_normal or turbo_discrete")


def draw(
    x0: Tensor,
    cfg_ratio: float,
    kind: TimestepKind,
    mu: float,
    sigma: float,
    generator: Optional[torch.Generator] = None,
) -> FlowDraws:
    """Draw the CFG coin, the noise and the timesteps for a batch of clean latents x0 [B, T, C]."""
    batch = x0.shape[0]
    keep = torch.rand(batch, device=x0.device, generator=generator) >= cfg_ratio
    noise = torch.randn(x0.shape, device=x0.device, dtype=x0.dtype, generator=generator)
    t = sample_timesteps(batch, kind, mu, sigma, x0.device, generator)
    return FlowDraws(cfg_keep=keep, noise=noise, t=t.to(x0.dtype))


def apply_cfg_dropout(encoder_hidden_states: Tensor, null_embedding: Tensor, keep: Tensor) -> Tensor:
    """Replace the WHOLE condition [L, H] of every dropped sample by the null embedding [1, 1, H].

    The encoder mask is left as it is, as in the official code.
    """
    null = null_embedding.to(encoder_hidden_states.dtype).expand_as(encoder_hidden_states)
    return torch.where(keep.view(-1, 1, 1), encoder_hidden_states, null)


def interpolate(x0: Tensor, noise: Tensor, t: Tensor) -> Tensor:
    """x_t = t * noise + (1 - t) * x0, with t [B] broadcast over [B, T, C]."""
    t_ = t.view(-1, 1, 1)
    return t_ * noise + (1.0 - t_) * x0


def velocity_target(x0: Tensor, noise: Tensor) -> Tensor:
    """The flow the decoder learns to predict: noise - x0 [B, T, C]."""
    return noise - x0


def flow_loss(pred: Tensor, target: Tensor, frame_mask: Optional[Tensor] = None) -> Tensor:
    """MSE between predicted and target velocity, computed in fp32.

    frame_mask None: mean over all B*T*C elements (official). frame_mask [B, T] (1 = real frame): mean over the
    real frames only, so padding neither adds loss nor dilutes it.
    """
    pred, target = pred.float(), target.float()
    if frame_mask is None:
        return F.mse_loss(pred, target)
    m = frame_mask.to(pred.dtype).unsqueeze(-1)  # [B, T, 1]
    denom = m.sum() * pred.shape[-1]
    return ((pred - target) ** 2 * m).sum() / denom.clamp_min(1.0)
