"""collate: zero-pad T and L to the batch maximum, masks padded with 0, keys kept, samples untouched."""

import pytest
import torch

from acestep_ft.data import Sample, collate


def sample(key: str, t: int, length: int, width: int = 8) -> Sample:
    g = torch.Generator().manual_seed(t * 100 + length)
    return Sample(
        key=key,
        target_latents=torch.randn(t, 64, generator=g),
        attention_mask=torch.ones(t),
        encoder_hidden_states=torch.randn(length, width, generator=g),
        encoder_attention_mask=torch.ones(length),
        context_latents=torch.randn(t, 128, generator=g),
    )


def test_pads_t_and_l_to_batch_max_with_zero_masks():
    samples = [sample("a", 5, 3), sample("b", 9, 2), sample("c", 7, 6)]
    b = collate(samples)
    assert b.keys == ["a", "b", "c"]
    assert b.target_latents.shape == (3, 9, 64)
    assert b.attention_mask.shape == (3, 9)
    assert b.encoder_hidden_states.shape == (3, 6, 8)
    assert b.encoder_attention_mask.shape == (3, 6)
    assert b.context_latents.shape == (3, 9, 128)
    for i, s in enumerate(samples):
        t, length = s.target_latents.shape[0], s.encoder_hidden_states.shape[0]
        assert torch.equal(b.target_latents[i, :t], s.target_latents)
        assert torch.equal(b.context_latents[i, :t], s.context_latents)
        assert torch.equal(b.encoder_hidden_states[i, :length], s.encoder_hidden_states)
        assert torch.all(b.target_latents[i, t:] == 0) and torch.all(b.context_latents[i, t:] == 0)
        assert torch.all(b.encoder_hidden_states[i, length:] == 0)
        assert b.attention_mask[i].tolist() == [1.0] * t + [0.0] * (9 - t)
        assert b.encoder_attention_mask[i].tolist() == [1.0] * length + [0.0] * (6 - length)


def test_batch_is_new_memory_and_moves_with_to():
    s = sample("a", 4, 2)
    before = s.target_latents.clone()
    b = collate([s])
    b.target_latents.add_(1.0)
    assert torch.equal(s.target_latents, before)
    moved = b.to("cpu")
    assert moved.keys == ["a"] and moved.target_latents.shape == (1, 4, 64)


def test_mismatched_encoder_width_or_empty_batch_is_an_error():
    with pytest.raises(ValueError, match=r"sample 'b' has encoder_hidden_states of shape \[2, 16\] but sample 'a' has \[2, 8\]"):
        collate([sample("a", 4, 2, width=8), sample("b", 4, 2, width=16)])
    with pytest.raises(ValueError, match="empty"):
        collate([])


def test_bf16_samples_become_a_float32_batch_with_exact_values():
    a, b = sample("a", 5, 2), sample("b", 3, 2)
    a16 = Sample(**{k: (v.to(torch.bfloat16) if isinstance(v, torch.Tensor) else v) for k, v in vars(a).items()})
    batch = collate([a16, b])
    assert batch.target_latents.dtype == torch.float32
    assert torch.equal(batch.target_latents[0], a16.target_latents.float())
    assert torch.equal(batch.target_latents[1, 3:], torch.zeros(2, 64))  # padding is zero, not leftover memory


def test_batch_keeps_a_common_stored_dtype_and_float_converts():
    to16 = lambda s: Sample(**{k: (v.to(torch.bfloat16) if isinstance(v, torch.Tensor) else v)  # noqa: E731
                               for k, v in vars(s).items()})
    a, b = to16(sample("a", 5, 2)), to16(sample("b", 3, 2))
    batch = collate([a, b])
    assert batch.target_latents.dtype == torch.bfloat16  # half the bytes to copy and to move to a GPU
    assert torch.equal(batch.float().target_latents[0], a.target_latents.float())
    assert batch.float().encoder_hidden_states.dtype == torch.float32
