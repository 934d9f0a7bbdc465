"""Reused batch buffers: the same contents as fresh collates, memory really reused, and no batch still in use is
ever written (the ring sizes the Prefetcher picks for its paths)."""

import time

import pytest
import torch

from acestep_ft.config import SyntheticDataset
from acestep_ft.data import BatchStream, EpochBatchSampler, InMemorySource, Sample, collate, make_synthetic_samples
from acestep_ft.data.collate import BatchBuffers, to_float32
from acestep_ft.data.prefetch import Prefetcher

FIELDS = ("target_latents", "attention_mask", "encoder_hidden_states", "encoder_attention_mask", "context_latents")


def sample(key: str, t: int, length: int, dtype=torch.float32) -> Sample:
    g = torch.Generator().manual_seed(t * 100 + length)
    return Sample(key, torch.randn(t, 64, generator=g).to(dtype), torch.ones(t, dtype=dtype),
                  torch.randn(length, 8, generator=g).to(dtype), torch.ones(length, dtype=dtype),
                  torch.randn(t, 128, generator=g).to(dtype))


def equal(a, b) -> bool:
    return a.keys == b.keys and all(getattr(a, f).dtype == getattr(b, f).dtype
                                    and torch.equal(getattr(a, f), getattr(b, f)) for f in FIELDS)


def snapshot(batch):
    return batch._map(lambda t: t.clone())


def source(n: int = 12, dtype=torch.float32) -> InMemorySource:
    samples = make_synthetic_samples(SyntheticDataset(num_samples=n, min_frames=8, max_frames=40), 16)
    if dtype != torch.float32:
        samples = [Sample(s.key, *(getattr(s, f).to(dtype) for f in FIELDS)) for s in samples]
    return InMemorySource(samples)


def stream(dtype=torch.float32, seed: int = 0, n: int = 12) -> BatchStream:
    return BatchStream(source(n, dtype), EpochBatchSampler(n, 3, seed=seed, shuffle=True))


def test_ring_collate_equals_fresh_collate_and_clears_an_older_batch_padding():
    ring = BatchBuffers(1)
    big = [sample("a", 30, 9), sample("b", 25, 7)]
    small = [sample("c", 10, 2), sample("d", 4, 5), sample("e", 7, 3)]  # more rows, fewer frames: reshaped views
    for samples in (big, small, big, [sample("f", 3, 1, torch.bfloat16), sample("g", 5, 2, torch.bfloat16)]):
        assert equal(collate(samples, buffers=ring), collate(samples))
    assert ring.slots[0].nbytes > 0


def test_the_ring_reuses_memory_and_grows_only_when_a_batch_needs_more():
    ring = BatchBuffers(2)
    ptrs = [collate([sample("a", 20, 4), sample("b", 12, 4)], buffers=ring).target_latents.data_ptr()
            for _ in range(4)]
    assert ptrs[0] == ptrs[2] and ptrs[1] == ptrs[3] and ptrs[0] != ptrs[1]
    grown = collate([sample("a", 90, 4), sample("b", 12, 4)], buffers=ring).target_latents.data_ptr()
    assert grown != ptrs[0]  # slot 0 was too small: replaced by a larger storage


def test_float32_conversion_into_a_ring_equals_batch_float():
    ring = BatchBuffers(2)
    for dtype in (torch.bfloat16, torch.float32):
        batch = collate([sample("a", 11, 3, dtype), sample("b", 6, 4, dtype)])
        converted = to_float32(batch, ring)
        assert equal(converted, batch.float())
        assert (converted.target_latents.data_ptr() == batch.target_latents.data_ptr()) == (dtype == torch.float32)


@pytest.mark.parametrize("slots", [2, 3, 4])
def test_a_stream_batch_is_unchanged_until_slots_more_are_made(slots):
    plain, reused = stream(torch.bfloat16), stream(torch.bfloat16)
    reused.reuse_buffers(slots)
    expected = [plain.next_batch() for _ in range(3 * slots)]
    held = []
    for k in range(3 * slots):
        held.append((k, reused.next_batch()))
        # the slots - 1 batches before the newest are still intact after it was written ...
        for j, batch in held[-slots:]:
            assert equal(batch, expected[j]), (k, j)
    # ... while older ones were overwritten (unless their slot grew since), so the check above could fail
    assert sum(not equal(batch, expected[j]) for j, batch in held[:-slots]) >= slots


def _wait_for(condition, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "the prefetch worker did not run ahead in time"
        time.sleep(0.005)


def _consume_with_the_worker_ahead(pre: Prefetcher, ahead: BatchStream, plain: BatchStream, depth: int, n: int):
    """Take n batches; after each, let the worker fill its queue and make one more (it then waits to queue it),
    then compare the batch in hand with the plain stream's. Returns how many differed."""
    corrupted = 0
    for k in range(n):
        got, _ = pre.next()
        reference = plain.next_batch().float()
        # k + 1 batches consumed; the worker has made `depth` queued ones + the one it holds
        _wait_for(lambda made=k + 2 + depth: ahead.buffers.taken == made)
        corrupted += not equal(got, reference)
    return corrupted


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])  # fp32: the caller holds the collate slot itself
@pytest.mark.parametrize("depth", [1, 2])
def test_prefetch_thread_never_writes_the_batch_in_hand(dtype, depth):
    plain, ahead = stream(dtype, n=30), stream(dtype, n=30)
    pre = Prefetcher(ahead, torch.device("cpu"), depth=depth, background=True)
    try:
        assert pre.slots == depth + 2 and ahead.buffers is not None
        assert _consume_with_the_worker_ahead(pre, ahead, plain, depth, 3 * pre.slots) == 0
    finally:
        pre.close()


class OneSlotShort(BatchStream):
    def reuse_buffers(self, slots: int) -> None:
        super().reuse_buffers(slots - 1)


def test_a_ring_one_slot_short_is_caught():
    """The check above can fail: with depth + 1 slots the worker writes the caller's batch."""
    plain = stream(n=30)
    ahead = OneSlotShort(source(30), EpochBatchSampler(30, 3, seed=0, shuffle=True))
    pre = Prefetcher(ahead, torch.device("cpu"), depth=2, background=True)
    try:
        assert _consume_with_the_worker_ahead(pre, ahead, plain, 2, 8) > 0
    finally:
        pre.close()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_synchronous_prefetch_uses_two_slots_and_keeps_the_previous_batch_while_making_the_next(dtype):
    plain, reused = stream(dtype), stream(dtype)
    pre = Prefetcher(reused, torch.device("cpu"))
    assert not pre.background and pre.slots == 2
    previous = None
    for _ in range(8):
        got, _ = pre.next()
        if previous is not None:  # the batch handed out before is intact after the next one was made
            assert equal(previous[0], previous[1])
        previous = (got, plain.next_batch().float())
        assert equal(*previous)
    pre.close()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_prefetch_pins_the_ring_and_every_batch_arrives_intact():
    plain = stream(torch.bfloat16, n=30)
    ahead = BatchStream(source(30, torch.bfloat16), EpochBatchSampler(30, 3, seed=0, shuffle=True), pin_memory=True)
    pre = Prefetcher(ahead, torch.device("cuda"), device_prefetch=True)
    try:
        for _ in range(3 * pre.slots):
            got, _ = pre.next()
            expected = plain.next_batch().float()
            assert torch.equal(got.target_latents.cpu(), expected.target_latents)
            assert torch.equal(got.encoder_hidden_states.cpu(), expected.encoder_hidden_states)
        assert all(s.tensor("target_latents", (1,), torch.bfloat16).is_pinned() for s in ahead.buffers.slots)
    finally:
        pre.close()
