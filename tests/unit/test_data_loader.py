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
