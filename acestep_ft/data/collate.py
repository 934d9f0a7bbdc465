"""Stack samples into a `Batch`: zero-pad T and L to the batch maximum, masks padded with 0 (the official collate).
The batch keeps the stored float dtype (bf16 for most preprocessed data); `Batch.float()` converts, on the device.

The output tensors are new memory (samples, which a cache may share, are never modified).
"""

from __future__ import annotations

import torch
from torch import Tensor

from acestep_ft.data.batch import Batch, Sample


def _pad(tensors: list[Tensor], pin_memory: bool) -> Tensor:
    """[N_i, *rest] each -> [B, max N_i, *rest] zero-padded at the end of dim 0, in the samples' dtype when they
    share one (bf16 data stays bf16: half the bytes to copy and to send to a GPU), else float32.

    One copy per sample straight into the (optionally pinned) output; only the padding tail is zeroed.
    """
    longest = max(t.shape[0] for t in tensors)
    dtypes = {t.dtype for t in tensors}
    dtype = dtypes.pop() if len(dtypes) == 1 and tensors[0].is_floating_point() else torch.float32
    out = torch.empty((len(tensors), longest, *tensors[0].shape[1:]), dtype=dtype, pin_memory=pin_memory)
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
    """B samples -> one Batch in the samples' common float dtype (float32 when they differ), keys kept in order.

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
