"""Synthetic samples: deterministic from dataset.seed only, shapes as documented on Sample, learnable structure."""

import torch

from acestep_ft.config import SyntheticDataset
from acestep_ft.data import Sample, make_synthetic_samples

H = 32


def _assert_same(a: Sample, b: Sample) -> None:
    assert a.key == b.key
    for name in ("target_latents", "attention_mask", "encoder_hidden_states", "encoder_attention_mask",
                 "context_latents"):
        assert torch.equal(getattr(a, name), getattr(b, name)), name


def test_shapes_dtypes_and_lengths_follow_the_config():
    cfg = SyntheticDataset(num_samples=10, min_frames=5, max_frames=9, condition_length=7)
    samples = make_synthetic_samples(cfg, widths=H)
    assert len(samples) == 10
    assert len({s.key for s in samples}) == 10
    for s in samples:
        t = s.target_latents.shape[0]
        assert 5 <= t <= 9
        assert s.target_latents.shape == (t, 64)
        assert s.attention_mask.shape == (t,)
        assert s.encoder_hidden_states.shape == (7, H)
        assert s.encoder_attention_mask.shape == (7,)
        assert s.context_latents.shape == (t, 128)
        for v in (s.target_latents, s.attention_mask, s.encoder_hidden_states, s.encoder_attention_mask,
                  s.context_latents):
            assert v.dtype == torch.float32
            assert torch.isfinite(v).all()
        assert torch.all(s.attention_mask == 1) and torch.all(s.encoder_attention_mask == 1)
        assert torch.all(s.context_latents[:, 64:] == 1)  # chunk mask = ones
    assert len({s.target_latents.shape[0] for s in samples}) > 1  # lengths actually vary


def test_deterministic_from_seed_only_and_independent_of_global_rng():
    cfg = SyntheticDataset(num_samples=4)
    torch.manual_seed(0)
    a = make_synthetic_samples(cfg, H)
    torch.manual_seed(999)
    torch.rand(10)
    b = make_synthetic_samples(cfg, H)
    for x, y in zip(a, b):
        _assert_same(x, y)
    c = make_synthetic_samples(SyntheticDataset(num_samples=4, seed=cfg.seed + 1), H)
    assert not torch.equal(a[0].encoder_hidden_states, c[0].encoder_hidden_states)


def test_sample_i_does_not_depend_on_num_samples():
    few = make_synthetic_samples(SyntheticDataset(num_samples=3), H)
    many = make_synthetic_samples(SyntheticDataset(num_samples=8), H)
    for x, y in zip(few, many):
        _assert_same(x, y)


def test_silence_source_is_one_fixed_pattern_sliced_to_t():
    samples = make_synthetic_samples(SyntheticDataset(num_samples=8, min_frames=4, max_frames=20), H)
    longest = max(samples, key=lambda s: s.target_latents.shape[0])
    for s in samples:
        t = s.target_latents.shape[0]
        assert torch.equal(s.context_latents[:, :64], longest.context_latents[:t, :64])


def test_targets_are_unit_scale_smooth_and_conditions_differ():
    samples = make_synthetic_samples(SyntheticDataset(num_samples=16), H)
    x = torch.cat([s.target_latents for s in samples])
    assert 0.7 < x.std().item() < 1.3
    assert abs(x.mean().item()) < 0.2
    # smooth over frames: consecutive frames much closer than the signal scale
    step = torch.cat([s.target_latents.diff(dim=0) for s in samples])
    assert step.std().item() < 0.6 * x.std().item()
    # the condition carries per-sample information
    conds = torch.stack([s.encoder_hidden_states.mean(0) for s in samples])
    assert conds.std(0).mean().item() > 0.3


def test_bad_config_is_a_clear_error():
    import pytest

    with pytest.raises(ValueError, match="max_frames"):
        make_synthetic_samples(SyntheticDataset(min_frames=10, max_frames=5), H)


def test_lengths_without_making_the_samples():
    from acestep_ft.data.dataset import InMemorySource
    from acestep_ft.data.synthetic import synthetic_lengths

    cfg = SyntheticDataset(num_samples=9, min_frames=5, max_frames=50, condition_length=7)
    source = InMemorySource(make_synthetic_samples(cfg, 16))
    assert synthetic_lengths(cfg) == source.lengths and source.cond_lengths == [7] * 9
