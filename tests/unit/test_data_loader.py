"""BatchStream: collated batches in sampler order, in the stored dtype."""

import torch

from acestep_ft.config import SyntheticDataset
from acestep_ft.data import BatchStream, EpochBatchSampler, InMemorySource, make_synthetic_samples


def test_batches_follow_the_sampler():
    samples = make_synthetic_samples(SyntheticDataset(num_samples=6), 16)
    stream = BatchStream(InMemorySource(samples), EpochBatchSampler(6, 2, seed=3, shuffle=True))
    sampler = EpochBatchSampler(6, 2, seed=3, shuffle=True)
    for _ in range(4):
        batch = stream.next_batch()
        assert batch.keys == [samples[i].key for i in sampler.next_batch()]
        assert batch.target_latents.dtype == torch.float32  # generated data is float32


def test_without_a_ring_every_batch_is_new_memory_and_with_one_the_memory_cycles():
    samples = make_synthetic_samples(SyntheticDataset(num_samples=6), 16)
    fresh = BatchStream(InMemorySource(samples), EpochBatchSampler(6, 2, seed=3, shuffle=True))
    held = [fresh.next_batch() for _ in range(6)]  # kept: none of them may be written by a later batch
    reference = BatchStream(InMemorySource(samples), EpochBatchSampler(6, 2, seed=3, shuffle=True))
    for batch in held:
        assert torch.equal(batch.target_latents, reference.next_batch().target_latents)
    assert len({b.target_latents.data_ptr() for b in held}) == 6
    reference.reuse_buffers(2)
    ptrs = [reference.next_batch().encoder_hidden_states.data_ptr() for _ in range(4)]
    assert ptrs[0] == ptrs[2] and ptrs[1] == ptrs[3]  # same-shaped batches: slot 0, 1, 0, 1
