"""Background prefetch: same batches in the same order, resumable position, errors surface, CUDA copy path."""

import time

import pytest
import torch

from acestep_ft.config import SyntheticDataset
from acestep_ft.data import BatchStream, DataError, EpochBatchSampler, InMemorySource, make_synthetic_samples
from acestep_ft.data.prefetch import Prefetcher


def stream(seed=0):
    source = InMemorySource(make_synthetic_samples(SyntheticDataset(num_samples=10), 16))
    return BatchStream(source, EpochBatchSampler(len(source), 3, seed=seed, shuffle=True))


def test_prefetched_batches_equal_the_plain_stream_and_state_is_the_consumed_position():  # background thread
    plain, ahead = stream(), stream()
    pre = Prefetcher(ahead, torch.device("cpu"), depth=3, background=True)
    try:
        for _ in range(5):
            expected = plain.next_batch()
            got, waited = pre.next()
            assert got.keys == expected.keys and torch.equal(got.target_latents, expected.target_latents)
            assert waited >= 0.0
        time.sleep(0.2)  # let the worker read ahead
        assert pre.state_dict() == plain.state_dict()  # not the read-ahead position
        assert ahead.state_dict() != plain.state_dict()
    finally:
        pre.close()
    resumed = stream()
    resumed.load_state_dict(pre.state_dict())
    assert resumed.next_batch().keys == plain.next_batch().keys


class Broken:
    def next_batch(self):
        raise DataError("shard-00003.tar: sample 'x' is corrupted")

    def state_dict(self):
        return {}


def test_worker_errors_reach_the_consumer():
    pre = Prefetcher(Broken(), torch.device("cpu"), background=True)
    with pytest.raises(DataError, match="shard-00003.tar"):
        pre.next()
    pre.close()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_device_prefetch_copies_on_a_side_stream():
    plain = stream()
    pre = Prefetcher(stream(), torch.device("cuda"), device_prefetch=True)
    try:
        for _ in range(4):
            got, _ = pre.next()
            expected = plain.next_batch()
            assert got.target_latents.is_cuda
            assert torch.equal(got.target_latents.cpu(), expected.target_latents.float())
    finally:
        pre.close()


def test_cpu_default_is_the_synchronous_plain_path():
    plain = stream()
    pre = Prefetcher(stream(), torch.device("cpu"))
    assert not pre.background
    for _ in range(3):
        got, waited = pre.next()
        expected = plain.next_batch()
        assert got.keys == expected.keys and waited > 0.0
        assert got.target_latents.dtype == torch.float32
    assert pre.state_dict() == plain.state_dict()
    pre.close()
