"""Batches for the training loop: sampler indices -> samples from the source -> one padded `Batch`.

The loop only sees `next_batch()` and the resumable position (`state_dict` / `load_state_dict`, the sampler's).
"""

from __future__ import annotations

from typing import Any, Dict

import torch

from acestep_ft.data.batch import Batch
from acestep_ft.data.collate import collate
from acestep_ft.data.dataset import SampleSource
from acestep_ft.data.errors import DataError
from acestep_ft.data.sampler import EpochBatchSampler


def check_finite(batch: Batch, indices: list[int]) -> None:
    """NaN/Inf in the input would silently poison training: stop with the sample and tensor that hold them."""
    for name in ("target_latents", "encoder_hidden_states", "context_latents"):
        values = getattr(batch, name)
        if not torch.isfinite(values).all():
            bad = [k for k, row in zip(batch.keys, values) if not torch.isfinite(row).all()]
            raise DataError(
                f"sample(s) {bad} (dataset indices {indices}): key '{name}' holds NaN or Inf values. Fix: re-run "
                f"preprocessing for these samples or remove them; `python -m acestep_ft.data.validate` lists every "
                f"bad sample of a dataset."
            )


class BatchStream:
    """An endless stream of collated batches in the sampler's deterministic order."""

    def __init__(self, source: SampleSource, sampler: EpochBatchSampler) -> None:
        self.source, self.sampler = source, sampler

    def next_batch(self) -> Batch:
        indices = self.sampler.next_batch()
        batch = collate([self.source[i] for i in indices])
        check_finite(batch, indices)
        return batch

    def state_dict(self) -> Dict[str, Any]:
        return self.sampler.state_dict()

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        self.sampler.load_state_dict(state)
