"""The flow-matching objective: endpoints, timestep distributions, CFG dropout rate, loss masking."""

import math

import pytest
import torch

from acestep_ft.train.objective import (
    TURBO_SHIFT3_TIMESTEPS, apply_cfg_dropout, draw, flow_loss, interpolate, sample_timesteps, velocity_target,
)


def test_interpolation_endpoints_and_velocity():
    x0, noise = torch.randn(3, 5, 64), torch.randn(3, 5, 64)
    assert torch.equal(interpolate(x0, noise, torch.zeros(3)), x0)  # t = 0 is data
    assert torch.equal(interpolate(x0, noise, torch.ones(3)), noise)  # t = 1 is noise
    t = torch.tensor([0.25, 0.5, 0.9])
    xt = interpolate(x0, noise, t)
    # moving along the velocity from x_t by (1 - t) reaches the noise, by -t reaches the data
    v = velocity_target(x0, noise)
    assert torch.allclose(xt + (1 - t).view(-1, 1, 1) * v, noise, atol=1e-6)
    assert torch.allclose(xt - t.view(-1, 1, 1) * v, x0, atol=1e-6)


def test_logit_normal_is_max_of_two_draws():
    g = torch.Generator().manual_seed(0)
    mu, sigma, n = -0.4, 1.0, 200_000
    t = sample_timesteps(n, "logit_normal", mu, sigma, torch.device("cpu"), g)
    assert t.min() > 0 and t.max() < 1
    # P(max(a, b) <= x) = P(a <= x)^2 with a = sigmoid(N(mu, sigma)); check the CDF at a few points
    for x in (0.3, 0.5, 0.7):
        single = 0.5 * (1 + math.erf((math.log(x / (1 - x)) - mu) / (sigma * math.sqrt(2))))
        assert abs((t <= x).float().mean().item() - single**2) < 0.005
    # the max of two draws is skewed toward noise compared with one draw (median of one draw = sigmoid(mu))
    assert t.median() > torch.sigmoid(torch.tensor(mu))


def test_turbo_discrete_uses_the_table_uniformly():
    g = torch.Generator().manual_seed(1)
    t = sample_timesteps(80_000, "turbo_discrete", 0.0, 1.0, torch.device("cpu"), g)
    values, counts = torch.unique(t, return_counts=True)
    assert torch.allclose(values.sort().values, torch.tensor(sorted(TURBO_SHIFT3_TIMESTEPS)))
    assert (counts.float() / len(t) - 1 / 8).abs().max() < 0.01


def test_cfg_dropout_rate_and_whole_condition_replaced():
    g = torch.Generator().manual_seed(2)
    d = draw(torch.zeros(20_000, 1, 4), 0.15, "logit_normal", -0.4, 1.0, g)
    assert abs((~d.cfg_keep).float().mean().item() - 0.15) < 0.01
    enc = torch.randn(4, 6, 8)
    null = torch.randn(1, 1, 8)
    keep = torch.tensor([True, False, True, False])
    out = apply_cfg_dropout(enc, null, keep)
    assert torch.equal(out[0], enc[0]) and torch.equal(out[2], enc[2])
    assert torch.equal(out[1], null[0].expand(6, 8)) and torch.equal(out[3], null[0].expand(6, 8))


def test_draw_order_matches_official_forward():
    """Official order: CFG coin (rand B), noise (randn like x0), then two timestep draws (randn B each)."""
    x0 = torch.randn(3, 7, 64)
    torch.manual_seed(5)
    d = draw(x0, 0.5, "logit_normal", -0.4, 1.0)
    torch.manual_seed(5)
    keep = torch.rand(3) >= 0.5
    noise = torch.randn_like(x0)
    a = torch.sigmoid(torch.randn(3) * 1.0 - 0.4)
    b = torch.sigmoid(torch.randn(3) * 1.0 - 0.4)
    assert torch.equal(d.cfg_keep, keep) and torch.equal(d.noise, noise)
    assert torch.equal(d.t, torch.maximum(a, b))


def test_loss_unmasked_is_plain_mse_and_masked_ignores_padding():
    pred, target = torch.randn(2, 6, 64), torch.randn(2, 6, 64)
    assert torch.allclose(flow_loss(pred, target), ((pred - target) ** 2).mean())
    mask = torch.tensor([[1, 1, 1, 1, 0, 0], [1, 1, 1, 1, 1, 1]], dtype=torch.float32)
    masked = flow_loss(pred, target, mask)
    real = torch.cat([(pred[0, :4] - target[0, :4]) ** 2, (pred[1] - target[1]) ** 2])
    assert torch.allclose(masked, real.mean())
    # padded frames can hold anything without changing the masked loss
    pred2 = pred.clone()
    pred2[0, 4:] = 1e3
    assert torch.allclose(flow_loss(pred2, target, mask), masked)
    assert not torch.allclose(flow_loss(pred2, target), flow_loss(pred, target))


@pytest.mark.parametrize("kind", ["bogus"])
def test_unknown_timestep_kind_is_an_error(kind):
    with pytest.raises(ValueError, match="unknown timestep kind"):
        sample_timesteps(2, kind, 0.0, 1.0, torch.device("cpu"))
