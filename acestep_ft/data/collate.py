"""Stack samples into a float32 `Batch`: zero-pad T and L to the batch maximum, masks padded with 0 (the official
collate).

The output tensors are new memory (samples, which a cache may share, are never modified).
"""

from __future__ import annotations

import torch
from torch import Tensor

from acestep_ft.data.batch import Batch, Sample


def _pad(tensors: list[Tensor], pin_memory: bool) -> Tensor:
    """[N_i, *rest] each (any float dtype) -> float32 [B, max N_i, *rest], zero-padded at the end of dim 0.

    One copy per sample straight into the (optionally pinned) output; only the padding tail is zeroed.
    """
    longest = max(t.shape[0] for t in tensors)
    out = torch.empty((len(tensors), longest, *tensors[0].shape[1:]), dtype=torch.float32, pin_memory=pin_memory)
    for i, t in enumerate(tensors):
        out[i, : t.shape[0]].copy_(t)
        out[i, t.shape[0]:].zero_()
    return out


def _check_compatible(samples: list[Sample]) -> None:
    first = samples[0]
    for s in samples:
        for name in ("target_latents", "encoder_hidden_states", "context_latents"):
            a, b = getattr(s, name), getattr(first, name)
            if a.shape[1:] != b.shape[1:]:
                raise ValueError(
                    f"collate: sample '{s.key}' has {name} of shape {list(a.shape)} but sample '{first.key}' has "
                    f"{list(b.shape)}; all samples of a dataset must have the same widths (same model and encoder)."
                )


def collate(samples: list[Sample], pin_memory: bool = False) -> Batch:
    """B samples -> one float32 Batch, keys kept in order (bf16/fp16 samples are converted while copying).

    target_latents [B, T, 64], attention_mask [B, T], encoder_hidden_states [B, L, H_enc],
    encoder_attention_mask [B, L], context_latents [B, T, 128]; T = max T_i, L = max L_i.
    `pin_memory` allocates the batch in page-locked memory, ready for an asynchronous copy to a GPU.
    """
    if not samples:
        raise ValueError("collate: got an empty list of samples")
    _check_compatible(samples)
    pad = lambda name: _pad([getattr(s, name) for s in samples], pin_memory)  # noqa: E731
    return Batch(
        keys=[s.key for s in samples],
        target_latents=pad("target_latents"),
        attention_mask=pad("attention_mask"),
        encoder_hidden_states=pad("encoder_hidden_states"),
        encoder_attention_mask=pad("encoder_attention_mask"),
        context_latents=pad("context_latents"),
    )
