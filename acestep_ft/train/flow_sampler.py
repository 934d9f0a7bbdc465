"""The flow sampler of official ACE-Step 1.5 inference (`generate_audio`), with each variant's own settings.

    sampler = resolve_sampler(cfg.train.samples.sampler, model_cfg.is_turbo)   # nulls -> the variant's defaults
    latents = sample_latents(decoder, batch, noise, sampler.steps, sampler.shift, use_masks=False,
                             guidance_scale=sampler.guidance_scale, null_embedding=model.null_condition_emb)

Variants (official modeling files `acestep/models/{turbo,base,sft}/modeling_acestep_v15_*.py`, `generate_audio`):
- turbo (guidance-distilled): 8 Euler steps on a fixed table per shift, only shifts 1, 2 and 3 (default 3), no CFG.
  The tables equal `flow_schedule(8, shift)`; other shifts are refused here (the official code rounds them to the
  nearest valid one with a warning). Other step counts use the same formula (off the distilled schedule).
- base / sft: 30 Euler steps on linspace(1, 0) with the optional shift t' = s t / (1 + (s - 1) t) (default 1), CFG
  with guidance 7.0 applied by APG (`acestep/models/common/apg_guidance.py` apg_forward: momentum -0.75, norm
  threshold 2.5, projection over dims=[1]); the unconditional branch is `null_condition_emb` expanded to the
  condition's shape, run in the same forward with the batch doubled. guidance_scale 1 = no CFG branch at all.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Callable, Optional, Sequence

import torch
from torch import Tensor

from acestep_ft.config import SamplerConfig
from acestep_ft.data.batch import Batch
from acestep_ft.errors import ConfigError
from acestep_ft.train.step import predict_velocity

TURBO_STEPS, TURBO_SHIFT, TURBO_SHIFTS = 8, 3.0, (1.0, 2.0, 3.0)
BASE_STEPS, BASE_SHIFT, BASE_GUIDANCE = 30, 1.0, 7.0
APG_MOMENTUM, APG_NORM_THRESHOLD, APG_DIMS = -0.75, 2.5, (1,)


@dataclass(frozen=True)
class Sampler:
    """Resolved sampler settings (no nulls)."""

    steps: int
    shift: float
    guidance_scale: float  # 1 = no CFG
    defaults_of: str       # "turbo" or "base/sft": whose defaults filled the nulls

    def describe(self) -> str:
        cfg = "no CFG" if self.guidance_scale == 1.0 else f"APG guidance {self.guidance_scale:g}"
        return f"{self.steps} Euler steps, shift {self.shift:g}, {cfg} ({self.defaults_of} defaults for unset values)"


def resolve_sampler(cfg: SamplerConfig, is_turbo: bool, key: str = "sampler") -> Sampler:
    """The variant's official defaults for the null fields of `cfg`; ConfigError (naming `key`.<field>) for settings
    the variant cannot sample with."""
    if is_turbo:
        steps = TURBO_STEPS if cfg.steps is None else cfg.steps
        shift = TURBO_SHIFT if cfg.shift is None else float(cfg.shift)
        guidance = 1.0 if cfg.guidance_scale is None else float(cfg.guidance_scale)
    else:
        steps = BASE_STEPS if cfg.steps is None else cfg.steps
        shift = BASE_SHIFT if cfg.shift is None else float(cfg.shift)
        guidance = BASE_GUIDANCE if cfg.guidance_scale is None else float(cfg.guidance_scale)
    problems = []
    if steps < 1:
        problems.append(f"{key}.steps={steps} must be >= 1.")
    if not shift > 0:
        problems.append(f"{key}.shift={shift:g} must be > 0 (1 = no shift).")
    if not guidance >= 1.0:
        problems.append(f"{key}.guidance_scale={guidance:g} must be >= 1 (1 = no classifier-free guidance).")
    if is_turbo and shift not in TURBO_SHIFTS:
        problems.append(f"{key}.shift={shift:g}: the turbo model is distilled for shifts 1, 2 and 3 only (official "
                        "turbo inference has a fixed timestep table for each). Fix: one of them, or unset it (3).")
    if is_turbo and guidance != 1.0:
        problems.append(f"{key}.guidance_scale={guidance:g}: the turbo model is guidance-distilled and official turbo "
                        "inference runs no CFG branch. Fix: unset it (1).")
    if problems:
        raise ConfigError("Sampler settings:\n  " + "\n  ".join(problems))
    return Sampler(steps, shift, guidance, "turbo" if is_turbo else "base/sft")


def flow_schedule(steps: int, shift: float) -> Tensor:
    """Sampler timesteps from 1 (noise) to 0 (data), steps + 1 values, with the official shift
    t' = s t / (1 + (s - 1) t)."""
    t = torch.linspace(1.0, 0.0, steps + 1)
    return shift * t / (1 + (shift - 1) * t) if shift != 1.0 else t


class Momentum:
    """The official APG MomentumBuffer: running = update + momentum * running (starting at 0), one per sampler call."""

    def __init__(self, momentum: float = APG_MOMENTUM):
        self.momentum, self.running = momentum, None

    def update(self, value: Tensor) -> Tensor:
        self.running = value if self.running is None else value + self.momentum * self.running
        return self.running


def apg_guidance(cond: Tensor, uncond: Tensor, scale: float, momentum: Optional[Momentum],
                 norm_threshold: float = APG_NORM_THRESHOLD, dims: Sequence[int] = APG_DIMS, eta: float = 0.0
                 ) -> Tensor:
    """Adaptive projected guidance: the (momentum-averaged, norm-capped) difference cond - uncond with its component
    along `cond` dropped (kept times eta), added (scale - 1) times to `cond`. Shapes [B, T, C]; dims=[1] = per
    channel over time, as official inference calls it."""
    diff = cond - uncond
    if momentum is not None:
        diff = momentum.update(diff)
    dims = list(dims)
    if norm_threshold > 0:
        diff = diff * torch.clamp(norm_threshold / diff.norm(p=2, dim=dims, keepdim=True), max=1.0)
    unit = torch.nn.functional.normalize(cond.double(), dim=dims)
    parallel = (diff.double() * unit).sum(dim=dims, keepdim=True) * unit
    orthogonal = diff.double() - parallel
    update = (orthogonal + eta * parallel).to(cond.dtype)
    return cond + (scale - 1.0) * update


def doubled(batch: Batch, null_embedding: Tensor) -> Batch:
    """The CFG batch: every tensor twice, the second half's condition = null_embedding expanded to its shape."""
    twice = batch._map(lambda t: torch.cat([t, t]))
    condition = batch.encoder_hidden_states
    null = null_embedding.to(condition.device, condition.dtype).expand_as(condition)
    return replace(twice, keys=list(batch.keys) * 2, encoder_hidden_states=torch.cat([condition, null]))


@torch.no_grad()
def sample_latents(decoder: Callable[..., Tensor], batch: Batch, noise: Tensor, steps: int, shift: float,
                   use_masks: bool, guidance_scale: float = 1.0, null_embedding: Optional[Tensor] = None) -> Tensor:
    """Euler integration of the learned flow from `noise` (t=1) to latents (t=0) under the batch's conditions:
    x <- x - (t_i - t_{i+1}) * v(x, t_i). With guidance_scale > 1, v = APG of the conditional and the
    null-condition velocities, both from one decoder call on the doubled batch. Returns [B, T, 64] fp32."""
    cfg = guidance_scale > 1.0
    if cfg and null_embedding is None:
        raise ValueError("guidance_scale > 1 needs the model's null_condition_emb")
    run = doubled(batch, null_embedding) if cfg else batch
    momentum = Momentum() if cfg else None
    x = noise.float()
    schedule = flow_schedule(steps, shift).tolist()
    for t_now, t_next in zip(schedule[:-1], schedule[1:]):
        x_in = torch.cat([x, x]) if cfg else x
        t = torch.full((x_in.shape[0],), t_now, device=x.device)
        v = predict_velocity(decoder, run, x_in, t, run.encoder_hidden_states, run.encoder_attention_mask,
                             use_masks).float()
        if cfg:
            cond, uncond = v.chunk(2)
            v = apg_guidance(cond, uncond, guidance_scale, momentum)
        x = x - (t_now - t_next) * v
    return x
