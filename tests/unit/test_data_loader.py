"""BatchStream: collated batches in sampler order; NaN/Inf in the data stops training naming the sample."""

import pytest
import torch

from acestep_ft.config import SyntheticDataset
from acestep_ft.data import BatchStream, DataError, EpochBatchSampler, InMemorySource, make_synthetic_samples


def test_nan_in_a_sample_is_reported_by_key_and_tensor():
    samples = make_synthetic_samples(SyntheticDataset(num_samples=4), 16)
    samples[2].context_latents[3, 7] = float("nan")
    stream = BatchStream(InMemorySource(samples), EpochBatchSampler(4, 4, seed=0, shuffle=False))
    with pytest.raises(DataError, match=rf"sample '{samples[2].key}' \(generated sample 2\): key 'context_latents' holds NaN"):
        stream.next_batch()


def test_batches_follow_the_sampler():
    samples = make_synthetic_samples(SyntheticDataset(num_samples=6), 16)
    stream = BatchStream(InMemorySource(samples), EpochBatchSampler(6, 2, seed=3, shuffle=True))
    sampler = EpochBatchSampler(6, 2, seed=3, shuffle=True)
    for _ in range(4):
        batch = stream.next_batch()
        assert batch.keys == [samples[i].key for i in sampler.next_batch()]
        assert batch.target_latents.dtype == torch.float32
