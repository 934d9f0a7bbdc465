"""Stack samples into a `Batch`: zero-pad T and L to the batch maximum, masks padded with 0 (the official collate).
The batch keeps the stored float dtype (bf16 for most preprocessed data); `Batch.float()` converts, on the device.
Token ids are int64 (padded with 0) and never converted.

encoder_inputs samples: caption tokens Lt and lyric tokens Ll are padded like L; timbre references are packed, not
padded: refer_audio_latents [N, Tr, 64] holds every sample's R_i references one after another and refer_audio_order
[N] the batch index owning each (the official refer_audio_order_mask). All references of a batch must have one length
Tr: the timbre encoder has no padding mask, so padding a reference would change its result.

`length_multiple` > 1 pads T further, up to a multiple of it, so a compiled model meets a bounded set of shapes.

Output memory. Without `buffers` every batch is new memory. With a `BatchBuffers` ring the batch is a set of views
into the ring's next slot, grown only when a batch needs more room than the slot has: the same memory is written
again and again, instead of a fresh allocation that the kernel has to fault in page by page (a batch of 4 four-
minute clips with their condition states is ~22 MB in bf16, ~44 MB in float32). The caller picks the number of slots
so that no batch still in use is written (see `BatchBuffers`). Samples, which a cache may share, are never modified.
"""

from __future__ import annotations

from dataclasses import fields
from typing import Dict, List, Optional, Sequence

import torch
from torch import Tensor

from acestep_ft.data.batch import (ID_KEYS, INPUT_KEYS, OPTIONAL_INPUT_KEYS, OUTPUT_KEYS, Batch,
                                   Sample)
from acestep_ft.data.errors import data_error

FIELDS = ("target_latents", "attention_mask", "encoder_hidden_states", "encoder_attention_mask", "context_latents")
"""The fields of an encoder_outputs batch (the official collate's)."""
FRAME_FIELDS = ("target_latents", "attention_mask", "context_latents")  # dim 0 is T, the latent frames
SEQUENCE_FIELDS = ("encoder_hidden_states", "encoder_attention_mask", "text_hidden_states", "text_attention_mask",
                   "lyric_token_ids", "lyric_attention_mask", "text_token_ids")  # dim 0 is L, Lt or Ll: padded
CONDITION_FIELDS = OUTPUT_KEYS + INPUT_KEYS + OPTIONAL_INPUT_KEYS  # None in a sample that does not carry them
WIDTH_FIELDS = ("target_latents", "context_latents", "encoder_hidden_states", "text_hidden_states")


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


def _dtype(name: str, tensors: List[Tensor]) -> torch.dtype:
    """The batch dtype of field `name`: int64 for token ids; else the samples' common float dtype (bf16 data stays
    bf16: half the bytes to copy and to send to a GPU), else float32."""
    if name in ID_KEYS:
        return torch.int64
    dtypes = {t.dtype for t in tensors}
    return dtypes.pop() if len(dtypes) == 1 and tensors[0].is_floating_point() else torch.float32


def _pad(tensors: List[Tensor], length: int, out: Tensor) -> Tensor:
    """[N_i, *rest] each -> `out` [B, length, *rest], zero-padded at the end of dim 0 (length >= every N_i).

    One copy per sample straight into `out`; only the padding tail is zeroed (`out` may hold an older batch)."""
    for i, t in enumerate(tensors):
        out[i, : t.shape[0]].copy_(t)
        out[i, t.shape[0]:length].zero_()
    return out


def _carried(sample: Sample) -> List[str]:
    return [name for name in CONDITION_FIELDS if getattr(sample, name) is not None]


def _check_compatible(samples: List[Sample]) -> None:
    """One set of condition fields, one width per field and one reference length Tr across the batch."""
    first = samples[0]
    for s in samples:
        if _carried(s) != _carried(first):
            raise ValueError(
                f"collate: sample '{s.key}' carries {_carried(s)} but sample '{first.key}' carries {_carried(first)}; "
                "all samples of a batch must carry the same condition sets (one dataset read with one "
                "dataset.conditions)")
        for name in WIDTH_FIELDS:
            a, b = getattr(s, name), getattr(first, name)
            if a is not None and a.shape[1:] != b.shape[1:]:
                raise ValueError(
                    f"collate: sample '{s.key}' has {name} of shape {list(a.shape)} but sample '{first.key}' has "
                    f"{list(b.shape)}; all samples of a dataset must have the same widths (same model and encoder)."
                )
        refs, first_refs = s.refer_audio_latents, first.refer_audio_latents
        if refs is not None and refs.shape[1:] != first_refs.shape[1:]:
            raise data_error(
                f"collate: sample '{s.key}'", "timbre reference length differs within the batch",
                key="refer_audio_latents", found=f"[R, Tr, 64] = {list(refs.shape)}",
                expected=f"Tr = {first_refs.shape[1]} as in sample '{first.key}' ({list(first_refs.shape)}): the "
                "timbre encoder has no padding mask, so references cannot be padded to one length",
                fix="preprocess every timbre reference to one length (the official trainer uses one zero reference "
                "[1, 1, 64]), or train with hardware.batch_size=1.")


def _output(slot: Optional[BufferSlot], name: str, shape: Sequence[int], dtype: torch.dtype,
            pin_memory: bool) -> Tensor:
    """Memory for field `name` of the batch: a view into the ring's slot, or new (pinned) memory."""
    if slot is not None:
        return slot.tensor(name, shape, dtype)
    return torch.empty(shape, dtype=dtype, pin_memory=pin_memory)


def _pack_references(samples: List[Sample], slot: Optional[BufferSlot], pin_memory: bool) -> Dict[str, Tensor]:
    """refer_audio_latents [N, Tr, 64] (every sample's references in batch order) and refer_audio_order [N] int64."""
    refs = [s.refer_audio_latents for s in samples]
    counts = [r.shape[0] for r in refs]
    latents = _output(slot, "refer_audio_latents", (sum(counts), *refs[0].shape[1:]),
                      _dtype("refer_audio_latents", refs), pin_memory)
    start = 0
    for r in refs:
        latents[start: start + r.shape[0]].copy_(r)
        start += r.shape[0]
    order = _output(slot, "refer_audio_order", (sum(counts),), torch.int64, pin_memory)
    order.copy_(torch.repeat_interleave(torch.arange(len(refs)), torch.tensor(counts)))
    return {"refer_audio_latents": latents, "refer_audio_order": order}


def collate(samples: List[Sample], pin_memory: bool = False, length_multiple: int = 0,
            buffers: Optional[BatchBuffers] = None) -> Batch:
    """B samples -> one Batch in the samples' common float dtype (float32 when they differ), keys kept in order.

    target_latents [B, T, 64], attention_mask [B, T], context_latents [B, T, 128]; T = max T_i rounded up to a
    multiple of `length_multiple` (0 = not rounded). encoder_outputs samples: encoder_hidden_states [B, L, H_enc],
    encoder_attention_mask [B, L], L = max L_i. encoder_inputs samples: text_hidden_states [B, Lt, D_text],
    text_attention_mask [B, Lt], lyric_token_ids [B, Ll] int64, lyric_attention_mask [B, Ll], text_token_ids
    [B, Lt] int64 (when carried), refer_audio_latents [N, Tr, 64] and refer_audio_order [N] (packed, see the module
    docstring), text_lengths / lyric_lengths [B] int64 (each sample's own Lt / Ll). `pin_memory` allocates the batch
    in page-locked memory, ready for an asynchronous copy to a GPU. `buffers`: write into the ring's next slot
    instead of new memory (its own pin_memory applies).
    """
    if not samples:
        raise ValueError("collate: got an empty list of samples")
    if buffers is not None and pin_memory and not buffers.pin_memory:
        raise ValueError("collate: pin_memory=True with a BatchBuffers ring of unpinned memory; build the ring "
                         "with BatchBuffers(slots, pin_memory=True)")
    _check_compatible(samples)
    frames = round_up(max(s.target_latents.shape[0] for s in samples), length_multiple)
    slot = buffers.next_slot() if buffers is not None else None
    out: Dict[str, Optional[Tensor]] = {}
    for name in FRAME_FIELDS + SEQUENCE_FIELDS:
        tensors = [getattr(s, name) for s in samples]
        if tensors[0] is None:
            out[name] = None
            continue
        length = frames if name in FRAME_FIELDS else max(t.shape[0] for t in tensors)
        shape = (len(tensors), length, *tensors[0].shape[1:])
        out[name] = _pad(tensors, length, _output(slot, name, shape, _dtype(name, tensors), pin_memory))
    if samples[0].refer_audio_latents is not None:
        out.update(_pack_references(samples, slot, pin_memory))
        for name, field in (("text_lengths", "text_hidden_states"), ("lyric_lengths", "lyric_token_ids")):
            lengths = torch.tensor([getattr(s, field).shape[0] for s in samples], dtype=torch.int64)
            out[name] = lengths.pin_memory() if pin_memory else lengths
    return Batch(keys=[s.key for s in samples], **out)


def to_float32(batch: Batch, buffers: Optional[BatchBuffers] = None) -> Batch:
    """`batch.float()`, with the float32 copies of bf16/fp16 fields written into the ring's next slot (one slot per
    call; float32 and integer fields are returned as they are, not copied; None fields stay None)."""
    if buffers is None:
        return batch.float()
    slot = buffers.next_slot()

    def convert(name: str) -> Optional[Tensor]:
        t = getattr(batch, name)
        if t is None or not t.is_floating_point() or t.dtype == torch.float32:
            return t
        return slot.tensor(name, t.shape, torch.float32).copy_(t)

    return Batch(keys=list(batch.keys), **{f.name: convert(f.name) for f in fields(batch) if f.name != "keys"})
