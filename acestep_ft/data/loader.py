"""Batches for the training loop: sampler indices -> samples from the source -> random crop -> one padded `Batch`.

The loop only sees `next_batch()` and the resumable position (`state_dict` / `load_state_dict`, the sampler's).
Crops are a pure function of (seed, epoch, index), so a resumed run crops exactly as the uninterrupted one.
T is padded to the sampler's `length_multiple` (`hardware.length_multiple`), the length its frame budget counted.
Values are not re-checked here (a pass over every batch costs more than the read): every source guarantees finite
tensors (.pt files are validated on read; v3 samples were validated when written and are checksummed on read;
generated data is finite), and the loop stops on a non-finite loss naming the batch's samples.

Each batch is new memory unless its consumer calls `reuse_buffers(slots)` (the `Prefetcher` does, with the slot
count its queue needs); from then on batches are views into a ring of `slots` reused buffers.
"""

from __future__ import annotations

from typing import Any, Dict, Optional

from acestep_ft.data.batch import Batch
from acestep_ft.data.collate import BatchBuffers, collate
from acestep_ft.data.crop import crop_sample, crop_window
from acestep_ft.data.dataset import SampleSource
from acestep_ft.data.sampler import LengthBucketSampler


class BatchStream:
    """An endless stream of collated batches in the sampler's deterministic order."""

    def __init__(self, source: SampleSource, sampler: LengthBucketSampler, max_frames: int = 0, seed: int = 0,
                 pin_memory: bool = False) -> None:
        """`max_frames` > 0 crops longer clips to a random window of that many frames (seeded by `seed`)."""
        self.source, self.sampler = source, sampler
        self.max_frames, self.seed, self.pin_memory = max_frames, seed, pin_memory
        # a sampler without the attribute (a fixed batch list in a benchmark) pads to the longest clip only
        self.length_multiple = getattr(sampler, "length_multiple", 0)
        self.buffers: Optional[BatchBuffers] = None

    def reuse_buffers(self, slots: int) -> None:
        """Collate every later batch into a ring of `slots` reused buffers (pinned when the stream pins) instead of
        new memory: a batch then stays unchanged only until `slots` more batches have been made, so `slots` must
        exceed the number of batches a consumer may still read while the next one is made."""
        self.buffers = BatchBuffers(slots, pin_memory=self.pin_memory)

    def _sample(self, i: int, epoch: int):
        sample = self.source[i]
        if self.max_frames:
            start, end = crop_window(sample.target_latents.shape[0], self.max_frames, self.seed, epoch, i)
            sample = crop_sample(sample, start, end)
        return sample

    def next_batch(self) -> Batch:
        indices = self.sampler.next_batch()
        epoch = self.sampler.epoch  # the epoch of this batch
        return collate([self._sample(i, epoch) for i in indices], pin_memory=self.pin_memory,
                       length_multiple=self.length_multiple, buffers=self.buffers)

    def state_dict(self) -> Dict[str, Any]:
        return self.sampler.state_dict()

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        self.sampler.load_state_dict(state)
