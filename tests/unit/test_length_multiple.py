"""hardware.length_multiple: batches are padded to a multiple of it, and the frame budget, padding statistics, oversize
list and resume signature all count that padded length."""

from types import SimpleNamespace

import pytest
import torch

from acestep_ft.config import HardwareConfig, SyntheticDataset, TrainConfig
from acestep_ft.data import BatchStream, InMemorySource, Sample, collate, make_synthetic_samples
from acestep_ft.data.collate import round_up
from acestep_ft.data.sampler import LengthBucketSampler, sampler_for


def sample(key: str, t: int, length: int = 3) -> Sample:
    return Sample(key, torch.randn(t, 64), torch.ones(t), torch.randn(length, 8), torch.ones(length),
                  torch.randn(t, 128))


def test_round_up():
    assert [round_up(t, 250) for t in (1, 249, 250, 251, 500)] == [250, 250, 250, 500, 500]
    assert round_up(37, 0) == round_up(37, 1) == 37
    with pytest.raises(ValueError, match="hardware.length_multiple"):
        round_up(5, -1)


def test_collate_pads_frames_to_the_multiple_and_leaves_the_condition_alone():
    samples = [sample("a", 260, 3), sample("b", 120, 5)]
    b = collate(samples, length_multiple=250)
    assert b.target_latents.shape == (2, 500, 64) and b.context_latents.shape == (2, 500, 128)
    assert b.attention_mask.shape == (2, 500) and b.encoder_hidden_states.shape == (2, 5, 8)
    assert b.attention_mask.sum(1).tolist() == [260.0, 120.0]
    assert torch.equal(b.target_latents[0, :260], samples[0].target_latents)
    assert not b.target_latents[0, 260:].any() and not b.context_latents[1, 120:].any()
    assert collate(samples, length_multiple=0).target_latents.shape == (2, 260, 64)


def test_frame_budget_counts_the_rounded_length():
    # 8 clips of 260 frames: 3 fit a 1000-frame budget unrounded, only 2 once each batch is padded to 500
    plain = LengthBucketSampler([260] * 8, 4, seed=0, shuffle=False, max_frames_per_batch=1000)
    rounded = LengthBucketSampler([260] * 8, 4, seed=0, shuffle=False, max_frames_per_batch=1000,
                                  length_multiple=250)
    assert [len(b) for b in plain.epoch_batches(0)] == [3, 3, 2]
    assert [len(b) for b in rounded.epoch_batches(0)] == [2, 2, 2, 2]
    assert rounded.batch_frames([0, 1]) == 500 and plain.batch_frames([0, 1]) == 260


def test_every_batch_of_a_wide_distribution_fits_the_budget_after_rounding():
    lengths = [int(x) for x in torch.randint(20, 2500, (300,), generator=torch.Generator().manual_seed(0))]
    s = LengthBucketSampler(lengths, 8, seed=1, shuffle=True, bucket_frames=100, max_frames_per_batch=2000,
                            length_multiple=300)
    oversize = set(s.oversize_indices)
    assert oversize == {i for i, t in enumerate(lengths) if t > 1800} and oversize  # 1801.. rounds to 2100
    for b in s.epoch_batches(0):
        frames = s.batch_frames(b)
        assert frames % 300 == 0 and frames >= max(lengths[i] for i in b)
        assert len(b) * frames <= 2000 or (len(b) == 1 and b[0] in oversize)
    stats, padded = s.padding_stats(), [len(b) * s.batch_frames(b) for b in s.epoch_batches(0)]
    assert stats["padded_frames"] == sum(padded) and stats["max_batch_frames"] == max(padded)
    assert stats["real_frames"] == sum(lengths) and stats["oversize_samples"] == len(oversize)


def test_a_clip_under_the_budget_that_rounds_over_it_is_oversize():
    s = LengthBucketSampler([960, 910, 100], 2, seed=0, shuffle=False, max_frames_per_batch=1000,
                            length_multiple=300)
    assert s.oversize_indices == [0, 1]  # both round up to 1200
    assert s.padding_stats()["oversize_samples"] == 2
    assert LengthBucketSampler([960, 910, 100], 2, seed=0, shuffle=False, max_frames_per_batch=1000,
                               length_multiple=250).oversize_indices == []  # 1000 fits


def test_stream_from_sampler_for_pads_to_the_configured_multiple():
    data = SyntheticDataset(num_samples=24, min_frames=30, max_frames=140, condition_length=4)
    cfg = SimpleNamespace(hardware=HardwareConfig(batch_size=4, max_frames_per_batch=400, length_multiple=64),
                          train=TrainConfig(), dataset=data)
    source = InMemorySource(make_synthetic_samples(data, 8))
    sampler = sampler_for(cfg, source.lengths)
    assert sampler.length_multiple == 64
    stream = BatchStream(source, sampler)
    for _ in range(2 * sampler.batches_per_epoch):
        batch = stream.next_batch()
        frames = batch.target_latents.shape[1]
        assert frames % 64 == 0 and frames - 64 < int(batch.attention_mask.sum(1).max())
        assert len(batch.keys) * frames <= 400


def test_the_memory_preflight_sizes_the_padded_batch():
    from acestep_ft.preflight.gate import DataShape, worst_batches

    data = SyntheticDataset(num_samples=24, min_frames=30, max_frames=140, condition_length=4)
    cfg = SimpleNamespace(hardware=HardwareConfig(batch_size=4, length_multiple=64), train=TrainConfig(), dataset=data)
    shape = DataShape(lengths=[40] * 8, max_cond_len=4, where="test")
    assert worst_batches(cfg, shape, 1) == [(4, 64)]
    cfg.hardware.length_multiple = 0
    assert worst_batches(cfg, shape, 1) == [(4, 40)]


def test_invalid_multiple_is_an_error_naming_the_setting():
    with pytest.raises(ValueError, match="length_multiple=-2"):
        LengthBucketSampler([10, 20], 2, seed=0, shuffle=False, length_multiple=-2)


def test_resume_signature_counts_the_multiple_only_where_it_shapes_the_batches():
    def make(multiple, budget=0, **kw):
        return LengthBucketSampler([100, 300, 700, 50] * 5, 4, seed=0, shuffle=True, bucket_frames=250,
                                   max_frames_per_batch=budget, length_multiple=multiple, **kw)

    # without a frame budget the same clips share a batch whatever the padding: a changed multiple resumes
    state = make(250).state_dict()
    make(0).load_state_dict(state)
    # with a budget the batches differ: refused, naming the setting
    with pytest.raises(ValueError, match="length_multiple: saved 250, now 0"):
        make(0, budget=1500).load_state_dict(make(250, budget=1500).state_dict())
    # a state saved before the key existed was made unrounded
    old = make(0, budget=1500).state_dict()
    del old["signature"]["length_multiple"]
    make(0, budget=1500).load_state_dict(old)
    with pytest.raises(ValueError, match="length_multiple: saved 0, now 250"):
        make(250, budget=1500).load_state_dict(old)
