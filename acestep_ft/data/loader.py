"""Batches for the training loop: sampler indices -> samples from the source -> one padded `Batch`.

The loop only sees `next_batch()` and the resumable position (`state_dict` / `load_state_dict`, the sampler's).
"""

from __future__ import annotations

from typing import Any, Dict

from acestep_ft.data.batch import Batch
from acestep_ft.data.collate import collate
from acestep_ft.data.dataset import SampleSource
from acestep_ft.data.sampler import EpochBatchSampler


class BatchStream:
    """An endless stream of collated batches in the sampler's deterministic order."""

    def __init__(self, source: SampleSource, sampler: EpochBatchSampler) -> None:
        self.source, self.sampler = source, sampler

    def next_batch(self) -> Batch:
        return collate([self.source[i] for i in self.sampler.next_batch()])

    def state_dict(self) -> Dict[str, Any]:
        return self.sampler.state_dict()

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        self.sampler.load_state_dict(state)
