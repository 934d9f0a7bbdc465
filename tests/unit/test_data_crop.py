"""crop_window / crop_sample / capped_lengths: deterministic, in bounds, consistent slices of one sample."""

import random

import pytest
import torch

from acestep_ft.data.batch import Sample
from acestep_ft.data.crop import capped_lengths, crop_sample, crop_window, seconds_to_frames


def make_sample(t=100, length=7, width=16):
    frames = torch.arange(t, dtype=torch.float32)
    return Sample(
        key="clip",
        target_latents=frames[:, None].repeat(1, 64),
        attention_mask=torch.ones(t),
        encoder_hidden_states=torch.randn(length, width),
        encoder_attention_mask=torch.ones(length),
        context_latents=frames[:, None].repeat(1, 128) + 0.5,
    )


def test_short_clips_are_kept_whole():
    assert crop_window(100, 100, seed=0, epoch=0, index=0) == (0, 100)
    assert crop_window(40, 100, seed=0, epoch=3, index=9) == (0, 40)
    assert crop_window(500, None, seed=0, epoch=0, index=0) == (0, 500)
    assert crop_window(500, 0, seed=0, epoch=0, index=0) == (0, 500)


def test_window_is_in_bounds_and_a_pure_function_of_its_arguments():
    rng = random.Random(0)
    py_state, torch_state = random.getstate(), torch.get_rng_state()
    for _ in range(500):
        length, max_frames = rng.randint(1, 7000), rng.randint(1, 6000)
        args = (length, max_frames, rng.randint(-5, 10**9), rng.randint(0, 50), rng.randint(0, 10**6))
        start, end = crop_window(*args)
        assert 0 <= start < end <= length and end - start == min(length, max_frames)
        assert crop_window(*args) == (start, end)
    # no global RNG was consumed
    assert random.getstate() == py_state and torch.equal(torch.get_rng_state(), torch_state)


def test_windows_vary_with_seed_epoch_and_index_and_cover_the_clip():
    starts = {crop_window(6000, 1000, seed=0, epoch=e, index=0)[0] for e in range(200)}
    assert len(starts) > 150 and min(starts) < 500 and max(starts) > 4500
    assert crop_window(6000, 1000, 0, 0, 0) != crop_window(6000, 1000, 0, 0, 1)
    assert crop_window(6000, 1000, 0, 0, 0) != crop_window(6000, 1000, 1, 0, 0)
    assert {crop_window(3, 2, 7, e, 0)[0] for e in range(100)} == {0, 1}  # both ends reachable


def test_crop_sample_slices_every_time_tensor_consistently_as_views():
    s = make_sample(100)
    start, end = crop_window(100, 30, seed=1, epoch=2, index=3)
    c = crop_sample(s, start, end)
    assert c.key == s.key
    assert c.target_latents.shape == (30, 64) and c.context_latents.shape == (30, 128)
    assert c.attention_mask.shape == (30,)
    assert torch.equal(c.target_latents[:, 0], torch.arange(start, end, dtype=torch.float32))
    assert torch.equal(c.context_latents[:, 0], torch.arange(start, end, dtype=torch.float32) + 0.5)
    assert c.encoder_hidden_states is s.encoder_hidden_states
    assert c.encoder_attention_mask is s.encoder_attention_mask
    for a, b in [(c.target_latents, s.target_latents), (c.context_latents, s.context_latents),
                 (c.attention_mask, s.attention_mask)]:
        assert a.untyped_storage().data_ptr() == b.untyped_storage().data_ptr()  # a view, no copy
    assert s.target_latents.shape == (100, 64)  # the original is untouched
    assert crop_sample(s, 0, 100) is s
    with pytest.raises(ValueError, match="outside"):
        crop_sample(s, 90, 101)
    with pytest.raises(ValueError, match="outside"):
        crop_sample(s, 5, 5)


def test_capped_lengths_and_seconds():
    assert capped_lengths([100, 7000, 6000], 6000) == [100, 6000, 6000]
    assert capped_lengths([100, 7000], None) == [100, 7000]
    assert capped_lengths([100, 7000], 0) == [100, 7000]
    assert seconds_to_frames(240) == 6000 and seconds_to_frames(10.0) == 250
    assert seconds_to_frames(None) == 0 and seconds_to_frames(0) == 0
