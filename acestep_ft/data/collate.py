"""Stack samples into a `Batch`: zero-pad T and L to the batch maximum, masks padded with 0 (the official collate).

The output tensors are new memory (samples, which a cache may share, are never modified).
"""

from __future__ import annotations

from torch import Tensor
from torch.nn.utils.rnn import pad_sequence

from acestep_ft.data.batch import Batch, Sample


def _pad(tensors: list[Tensor]) -> Tensor:
    """[N_i, *rest] each -> [B, max N_i, *rest], zero-padded at the end of dim 0."""
    return pad_sequence(tensors, batch_first=True, padding_value=0.0)


def _check_compatible(samples: list[Sample]) -> None:
    first = samples[0]
    width = first.encoder_hidden_states.shape[-1]
    for s in samples:
        if s.encoder_hidden_states.shape[-1] != width:
            raise ValueError(
                f"collate: sample '{s.key}' has encoder width {s.encoder_hidden_states.shape[-1]} but sample "
                f"'{first.key}' has {width}; all samples of a dataset must come from the same encoder."
            )
        for name in ("target_latents", "attention_mask", "encoder_hidden_states", "encoder_attention_mask",
                     "context_latents"):
            value = getattr(s, name)
            if value.dtype != getattr(first, name).dtype:
                raise ValueError(
                    f"collate: sample '{s.key}' has {name} of dtype {value.dtype} but sample '{first.key}' has "
                    f"{getattr(first, name).dtype}; build samples with the dataset readers (they return float32)."
                )


def collate(samples: list[Sample]) -> Batch:
    """B samples -> one Batch, keys kept in order.

    target_latents [B, T, 64], attention_mask [B, T], encoder_hidden_states [B, L, H_enc],
    encoder_attention_mask [B, L], context_latents [B, T, 128]; T = max T_i, L = max L_i.
    """
    if not samples:
        raise ValueError("collate: got an empty list of samples")
    _check_compatible(samples)
    return Batch(
        keys=[s.key for s in samples],
        target_latents=_pad([s.target_latents for s in samples]),
        attention_mask=_pad([s.attention_mask for s in samples]),
        encoder_hidden_states=_pad([s.encoder_hidden_states for s in samples]),
        encoder_attention_mask=_pad([s.encoder_attention_mask for s in samples]),
        context_latents=_pad([s.context_latents for s in samples]),
    )

