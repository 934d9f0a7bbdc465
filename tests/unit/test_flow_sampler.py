"""The sampler of official inference: each variant's defaults, the turbo tables, and CFG through APG."""

from __future__ import annotations

import pytest
import torch

from acestep_ft.config import SamplerConfig
from acestep_ft.data.batch import Batch
from acestep_ft.errors import ConfigError
from acestep_ft.train.flow_sampler import flow_schedule, resolve_sampler, sample_latents

# official acestep/models/turbo/modeling_acestep_v15_turbo.py generate_audio: SHIFT_TIMESTEPS (fix_nfe=8, without 0)
OFFICIAL_TURBO_TABLES = {
    1.0: [1.0, 0.875, 0.75, 0.625, 0.5, 0.375, 0.25, 0.125],
    2.0: [1.0, 0.9333333333333333, 0.8571428571428571, 0.7692307692307693, 0.6666666666666666, 0.5454545454545454,
          0.4, 0.2222222222222222],
    3.0: [1.0, 0.9545454545454546, 0.9, 0.8333333333333334, 0.75, 0.6428571428571429, 0.5, 0.3],
}


def test_defaults_are_the_variants_own():
    turbo = resolve_sampler(SamplerConfig(), is_turbo=True)
    base = resolve_sampler(SamplerConfig(), is_turbo=False)
    assert (turbo.steps, turbo.shift, turbo.guidance_scale) == (8, 3.0, 1.0)
    assert (base.steps, base.shift, base.guidance_scale) == (30, 1.0, 7.0)
    mixed = resolve_sampler(SamplerConfig(steps=50, guidance_scale=4.0), is_turbo=False)
    assert (mixed.steps, mixed.shift, mixed.guidance_scale) == (50, 1.0, 4.0)
    assert resolve_sampler(SamplerConfig(shift=1), is_turbo=True).shift == 1.0
    assert "no CFG" in turbo.describe() and "APG guidance 7" in base.describe()


@pytest.mark.parametrize("cfg, is_turbo, words", [
    (SamplerConfig(shift=2.5), True, ["train.samples.sampler.shift=2.5", "1, 2 and 3"]),
    (SamplerConfig(guidance_scale=3.0), True, ["guidance_scale=3", "guidance-distilled"]),
    (SamplerConfig(steps=0), False, ["steps=0"]),
    (SamplerConfig(shift=0.0), False, ["shift=0"]),
    (SamplerConfig(guidance_scale=0.5), False, ["guidance_scale=0.5", ">= 1"]),
])
def test_settings_a_variant_cannot_use_are_refused(cfg, is_turbo, words):
    with pytest.raises(ConfigError) as err:
        resolve_sampler(cfg, is_turbo, "train.samples.sampler")
    assert all(w in str(err.value) for w in words), str(err.value)


@pytest.mark.parametrize("shift", [1.0, 2.0, 3.0])
def test_eight_turbo_steps_are_the_official_tables(shift):
    t = flow_schedule(8, shift)
    assert t[-1] == 0.0
    torch.testing.assert_close(t[:-1].double(), torch.tensor(OFFICIAL_TURBO_TABLES[shift], dtype=torch.float64),
                               atol=1e-6, rtol=0)


H, L, T, B = 8, 5, 12, 2
torch.manual_seed(0)
W_COND, W_X = torch.randn(H, 64), torch.randn(64, 64) * 0.2


class Toy:
    """A velocity field that depends on x, t, the condition and the context; records the batch sizes it sees."""

    def __init__(self):
        self.batch_sizes = []

    def __call__(self, hidden_states, timestep, timestep_r, encoder_hidden_states, context_latents, **_):
        self.batch_sizes.append(hidden_states.shape[0])
        cond = encoder_hidden_states.mean(1) @ W_COND                              # [B, 64]
        return (torch.tanh(hidden_states @ W_X) + cond[:, None] * (1 + timestep[:, None, None])
                + 0.1 * context_latents[..., :64])


def toy_batch() -> Batch:
    g = torch.Generator().manual_seed(1)
    return Batch(keys=["a", "b"], target_latents=torch.zeros(B, T, 64), attention_mask=torch.ones(B, T),
                 encoder_hidden_states=torch.randn(B, L, H, generator=g), encoder_attention_mask=torch.ones(B, L),
                 context_latents=torch.randn(B, T, 128, generator=g))


def official_apg_sampler(f, batch, noise, steps, shift, scale, null):
    """An independent re-computation of official base `generate_audio` (ode) with `apg_guidance.apg_forward`."""
    t = torch.linspace(1.0, 0.0, steps + 1)
    if shift != 1.0:
        t = shift * t / (1 + (shift - 1) * t)
    ehs = torch.cat([batch.encoder_hidden_states, null.expand_as(batch.encoder_hidden_states)], dim=0)
    ctx = torch.cat([batch.context_latents, batch.context_latents], dim=0)
    running = 0  # MomentumBuffer(momentum=-0.75)
    xt = noise
    for t_curr, t_prev in zip(t[:-1], t[1:]):
        x = torch.cat([xt, xt], dim=0)
        vt = f(hidden_states=x, timestep=t_curr * torch.ones(x.shape[0]), timestep_r=t_curr * torch.ones(x.shape[0]),
               encoder_hidden_states=ehs, context_latents=ctx)
        pred_cond, pred_uncond = vt.chunk(2)
        diff = pred_cond - pred_uncond
        running = diff + -0.75 * running
        diff = running
        diff = diff * torch.minimum(torch.ones_like(diff), 2.5 / diff.norm(p=2, dim=[1], keepdim=True))
        v0, v1 = diff.double(), torch.nn.functional.normalize(pred_cond.double(), dim=[1])
        parallel = (v0 * v1).sum(dim=[1], keepdim=True) * v1
        orthogonal = (v0 - parallel).float()
        vt = pred_cond + (scale - 1) * (orthogonal + 0.0 * parallel.float())
        xt = xt - vt * (t_curr - t_prev)
    return xt


def test_guidance_one_is_the_plain_sampler_and_runs_no_uncond_branch():
    noise, null = torch.randn(B, T, 64), torch.randn(1, 1, H)
    plain, guided_off = Toy(), Toy()
    a = sample_latents(plain, toy_batch(), noise, 6, 3.0, use_masks=False)
    b = sample_latents(guided_off, toy_batch(), noise, 6, 3.0, use_masks=False, guidance_scale=1.0,
                       null_embedding=null)
    assert torch.equal(a, b) and guided_off.batch_sizes == [B] * 6


def test_apg_guidance_matches_the_official_formula():
    noise, null = torch.randn(B, T, 64), torch.randn(1, 1, H)
    toy = Toy()
    ours = sample_latents(toy, toy_batch(), noise, 5, 2.0, use_masks=False, guidance_scale=7.0, null_embedding=null)
    assert toy.batch_sizes == [2 * B] * 5  # cond and uncond in one call, the batch doubled
    reference = official_apg_sampler(Toy(), toy_batch(), noise, 5, 2.0, 7.0, null)
    torch.testing.assert_close(ours, reference, atol=1e-5, rtol=1e-5)
    plain = sample_latents(Toy(), toy_batch(), noise, 5, 2.0, use_masks=False)
    assert (ours - plain).abs().max() > 1e-2
    with pytest.raises(ValueError, match="null_condition_emb"):
        sample_latents(Toy(), toy_batch(), noise, 5, 2.0, use_masks=False, guidance_scale=7.0)
