"""Stack samples into a `Batch`: zero-pad T and L to the batch maximum, masks padded with 0 (the official collate).
The batch keeps the stored float dtype (bf16 for most preprocessed data); `Batch.float()` converts, on the device.

`length_multiple` > 1 pads T further, up to a multiple of it, so a compiled model meets a bounded set of shapes.

Output memory. Without `buffers` every batch is new memory. With a `BatchBuffers` ring the batch is a set of views
into the ring's next slot, grown only when a batch needs more room than the slot has: the same memory is written
again and again, instead of a fresh allocation that the kernel has to fault in page by page (a batch of 4 four-
minute clips with their condition states is ~22 MB in bf16, ~44 MB in float32). The caller picks the number of slots
so that no batch still in use is written (see `BatchBuffers`). Samples, which a cache may share, are never modified.
"""

from __future__ import annotations

from typing import Dict, List, Optional, Sequence

import torch
from torch import Tensor

from acestep_ft.data.batch import Batch, Sample

FIELDS = ("target_latents", "attention_mask", "encoder_hidden_states", "encoder_attention_mask", "context_latents")
FRAME_FIELDS = ("target_latents", "attention_mask", "context_latents")  # dim 0 is T, the latent frames


def round_up(frames: int, multiple: int) -> int:
    """`frames` rounded up to a multiple of `multiple` (0 or 1 = unchanged)."""
    if multiple < 0:
        raise ValueError(f"length multiple {multiple} must be >= 0 (hardware.length_multiple; 0 = off)")
    return -(-frames // multiple) * multiple if multiple > 1 else frames


class BufferSlot:
    """One batch's worth of output memory: per field a flat grow-only storage that batches are views of."""

    def __init__(self, pin_memory: bool) -> None:
        self.pin_memory = pin_memory
        self._storage: Dict[str, Tensor] = {}

    def tensor(self, name: str, shape: Sequence[int], dtype: torch.dtype) -> Tensor:
        """A contiguous `shape` view of this slot's storage for `name` (contents undefined: the caller writes every
        element). The storage is replaced by a larger one when it is too small, or when the dtype changes."""
        numel = 1
        for n in shape:
            numel *= n
        storage = self._storage.get(name)
        if storage is None or storage.dtype != dtype or storage.numel() < numel:
            storage = torch.empty(numel, dtype=dtype, pin_memory=self.pin_memory)
            self._storage[name] = storage
        return storage[:numel].view(*shape)

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self._storage.values())


class BatchBuffers:
    """A ring of `slots` `BufferSlot`s, handed out in turn: the batch written into a slot stays unchanged until
    `slots` more batches have been taken from the ring. Whoever owns the ring must therefore use a ring of (batches
    alive at once + 1) slots: the batches a consumer may still read, plus the one being written. `Prefetcher` picks
    that number for its own queue depth."""

    def __init__(self, slots: int, pin_memory: bool = False) -> None:
        if slots < 1:
            raise ValueError(f"BatchBuffers: slots={slots} must be >= 1")
        self.slots = [BufferSlot(pin_memory) for _ in range(slots)]
        self.pin_memory = pin_memory
        self.taken = 0  # slots handed out so far; the next one is slots[taken % len(slots)]

    def next_slot(self) -> BufferSlot:
        slot = self.slots[self.taken % len(self.slots)]
        self.taken += 1
        return slot

    @property
    def nbytes(self) -> int:
        """Bytes held by the ring (every slot grows to the largest batch it has held)."""
        return sum(s.nbytes for s in self.slots)


def _dtype(tensors: List[Tensor]) -> torch.dtype:
    """The samples' common float dtype (bf16 data stays bf16: half the bytes to copy and to send to a GPU), else
    float32."""
    dtypes = {t.dtype for t in tensors}
    return dtypes.pop() if len(dtypes) == 1 and tensors[0].is_floating_point() else torch.float32


def _pad(tensors: List[Tensor], length: int, out: Tensor) -> Tensor:
    """[N_i, *rest] each -> `out` [B, length, *rest], zero-padded at the end of dim 0 (length >= every N_i).

    One copy per sample straight into `out`; only the padding tail is zeroed (`out` may hold an older batch)."""
    for i, t in enumerate(tensors):
        out[i, : t.shape[0]].copy_(t)
        out[i, t.shape[0]:length].zero_()
    return out


def _check_compatible(samples: List[Sample]) -> None:
    first = samples[0]
    for s in samples:
        for name in ("target_latents", "encoder_hidden_states", "context_latents"):
            a, b = getattr(s, name), getattr(first, name)
            if a.shape[1:] != b.shape[1:]:
                raise ValueError(
                    f"collate: sample '{s.key}' has {name} of shape {list(a.shape)} but sample '{first.key}' has "
                    f"{list(b.shape)}; all samples of a dataset must have the same widths (same model and encoder)."
                )


def collate(samples: List[Sample], pin_memory: bool = False, length_multiple: int = 0,
            buffers: Optional[BatchBuffers] = None) -> Batch:
    """B samples -> one Batch in the samples' common float dtype (float32 when they differ), keys kept in order.

    target_latents [B, T, 64], attention_mask [B, T], encoder_hidden_states [B, L, H_enc],
    encoder_attention_mask [B, L], context_latents [B, T, 128]; L = max L_i, T = max T_i rounded up to a multiple
    of `length_multiple` (0 = not rounded). `pin_memory` allocates the batch in page-locked memory, ready for an
    asynchronous copy to a GPU. `buffers`: write into the ring's next slot instead of new memory (its own
    pin_memory applies).
    """
    if not samples:
        raise ValueError("collate: got an empty list of samples")
    if buffers is not None and pin_memory and not buffers.pin_memory:
        raise ValueError("collate: pin_memory=True with a BatchBuffers ring of unpinned memory; build the ring "
                         "with BatchBuffers(slots, pin_memory=True)")
    _check_compatible(samples)
    frames = round_up(max(s.target_latents.shape[0] for s in samples), length_multiple)
    slot = buffers.next_slot() if buffers is not None else None
    padded = {}
    for name in FIELDS:
        tensors = [getattr(s, name) for s in samples]
        length = frames if name in FRAME_FIELDS else max(t.shape[0] for t in tensors)
        shape, dtype = (len(tensors), length, *tensors[0].shape[1:]), _dtype(tensors)
        out = (slot.tensor(name, shape, dtype) if slot is not None
               else torch.empty(shape, dtype=dtype, pin_memory=pin_memory))
        padded[name] = _pad(tensors, length, out)
    return Batch(keys=[s.key for s in samples], **padded)


def to_float32(batch: Batch, buffers: Optional[BatchBuffers] = None) -> Batch:
    """`batch.float()`, with the float32 copies of bf16/fp16 fields written into the ring's next slot (one slot per
    call; float32 fields are returned as they are, not copied)."""
    if buffers is None:
        return batch.float()
    slot = buffers.next_slot()

    def convert(name: str) -> Tensor:
        t = getattr(batch, name)
        return t if t.dtype == torch.float32 else slot.tensor(name, t.shape, torch.float32).copy_(t)

    return Batch(keys=list(batch.keys), **{name: convert(name) for name in FIELDS})
