"""The types that cross the data -> train boundary: one `Sample`, and a padded `Batch` of them."""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Callable, List

import torch
from torch import Tensor


@dataclass
class Sample:
    """One preprocessed track, exactly the tensors of the official per-sample .pt file.

    Any float dtype (v3 sources hand out read-only-by-contract bf16 views into a mapped shard): never modify a
    Sample's tensors in place; `collate` copies them into the batch's own memory.
    """

    key: str                        # unique sample name (file stem or generated id)
    target_latents: Tensor          # [T, 64]  VAE latents, 25 frames/s
    attention_mask: Tensor          # [T]      1 = real frame
    encoder_hidden_states: Tensor   # [L, H_enc] condition-encoder output, valid tokens first
    encoder_attention_mask: Tensor  # [L]      1 = real token
    context_latents: Tensor         # [T, 128] cat(source latents, chunk mask)


@dataclass
class Batch:
    """Samples zero-padded to the longest T and L of the batch (masks padded with 0), in the stored dtype."""

    keys: List[str]                 # B sample names
    target_latents: Tensor          # [B, T, 64]
    attention_mask: Tensor          # [B, T]
    encoder_hidden_states: Tensor   # [B, L, H_enc]
    encoder_attention_mask: Tensor  # [B, L]
    context_latents: Tensor         # [B, T, 128]

    def tensors(self) -> List[Tensor]:
        return [getattr(self, f.name) for f in fields(self) if isinstance(getattr(self, f.name), Tensor)]

    def _map(self, fn: Callable[[Tensor], Tensor]) -> "Batch":
        return Batch(**{f.name: (fn(v) if isinstance(v, Tensor) else v)
                        for f in fields(self) for v in [getattr(self, f.name)]})

    def to(self, device: torch.device | str, non_blocking: bool = False) -> "Batch":
        return self._map(lambda t: t.to(device, non_blocking=non_blocking))

    def float(self) -> "Batch":
        """float32 copies of bf16/fp16 fields (what the model is fed); float32 fields are returned as they are."""
        return self._map(lambda t: t.float())

    def pin_memory(self) -> "Batch":
        return self._map(lambda t: t if t.is_pinned() else t.pin_memory())
