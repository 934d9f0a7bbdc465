"""The types that cross the data -> train boundary: one `Sample`, a padded `Batch` of them, and the condition sets.

A sample carries its condition as one (or both) of two sets (`dataset.conditions` picks which one a run reads):
- encoder_outputs: what the condition encoder produced at preprocessing (`encoder_hidden_states` + mask), the official
  and Side-Step .pt layout; training runs only the decoder.
- encoder_inputs: what the condition encoder consumes (caption text-encoder states, lyric token ids, timbre reference
  latents); training runs the condition encoder in every step, so it can train.
Fields of a set the sample does not carry are None.
"""

from __future__ import annotations

from dataclasses import KW_ONLY, dataclass, fields
from typing import Callable, Iterable, List, Mapping, Optional

import torch
from torch import Tensor

from acestep_ft.config import Conditions

COMMON_KEYS = ("target_latents", "attention_mask", "context_latents")
OUTPUT_KEYS = ("encoder_hidden_states", "encoder_attention_mask")
INPUT_KEYS = ("text_hidden_states", "text_attention_mask", "lyric_token_ids", "lyric_attention_mask",
              "refer_audio_latents")
OPTIONAL_INPUT_KEYS = ("text_token_ids",)
"""Carried by some encoder_inputs data only (caption token ids, for training the text encoder later)."""
ID_KEYS = ("lyric_token_ids", "text_token_ids")
"""Integer token ids: int64 in a Sample / Batch, never converted to float."""
SET_KEYS = {Conditions.encoder_outputs: OUTPUT_KEYS, Conditions.encoder_inputs: INPUT_KEYS}


@dataclass(frozen=True)
class ConditionWidths:
    """The model's condition sizes a dataset is checked against (`build_dataset(..., widths)`)."""

    encoder: int  # H_enc: width of encoder_hidden_states (model encoder_hidden_size, or hidden_size when unset)
    text: int     # D_text: width of text_hidden_states (model.text_hidden_dim)
    vocab: int    # token ids must lie in [0, vocab) (model.text_vocab_size)


def encoder_width_of(widths: int | ConditionWidths) -> int:
    """H_enc of `widths` (an int is H_enc itself)."""
    return widths if isinstance(widths, int) else widths.encoder


def inputs_widths(widths: int | ConditionWidths, where: str) -> ConditionWidths:
    """`widths` as ConditionWidths, required to read encoder_inputs data (ValueError for a plain H_enc int)."""
    if isinstance(widths, ConditionWidths):
        return widths
    raise ValueError(f"{where}: dataset.conditions=encoder_inputs needs ConditionWidths(encoder, text, vocab) (the "
                     f"text-encoder width and vocabulary to check the data against), got the int {widths!r}")


def carried_sets(keys: Iterable[str]) -> list[Conditions]:
    """The condition sets a sample with these keys carries: a set counts as soon as one of its keys is present (a
    missing partner key is then a 'missing key' problem, not a missing set)."""
    present = set(keys)
    return [c for c, names in SET_KEYS.items() if present & set(names)]


def set_keys(conditions: Conditions) -> tuple[str, ...]:
    """The keys of one condition set, its optional ones included."""
    return SET_KEYS[Conditions(conditions)] + (OPTIONAL_INPUT_KEYS if conditions == Conditions.encoder_inputs else ())


@dataclass
class Sample:
    """One preprocessed track: the tensors of the official per-sample .pt file, or the condition encoder's inputs
    in place of its output (see the module docstring), or both.

    Any float dtype (v3 sources hand out read-only-by-contract bf16 views into a mapped shard): never modify a
    Sample's tensors in place; `collate` copies them into the batch's own memory. Masks are float, ids int64.
    """

    key: str                                       # unique sample name (file stem or generated id)
    target_latents: Tensor                         # [T, 64]  VAE latents, 25 frames/s
    attention_mask: Tensor                         # [T]      1 = real frame
    encoder_hidden_states: Optional[Tensor]        # [L, H_enc] condition-encoder output, valid tokens first
    encoder_attention_mask: Optional[Tensor]       # [L]      1 = real token
    context_latents: Tensor                        # [T, 128] cat(source latents, chunk mask)
    _: KW_ONLY
    text_hidden_states: Optional[Tensor] = None    # [Lt, D_text] caption prompt through the text encoder
    text_attention_mask: Optional[Tensor] = None   # [Lt]     1 = real token
    lyric_token_ids: Optional[Tensor] = None       # [Ll]     int64 in [0, text vocabulary)
    lyric_attention_mask: Optional[Tensor] = None  # [Ll]     1 = real token
    refer_audio_latents: Optional[Tensor] = None   # [R, Tr, 64] timbre references (official zero one: [1, 1, 64])
    text_token_ids: Optional[Tensor] = None        # [Lt]     int64 caption token ids (optional)

    @property
    def conditions(self) -> list[Conditions]:
        """The condition sets this sample carries."""
        return carried_sets(k for k in OUTPUT_KEYS + INPUT_KEYS if getattr(self, k) is not None)

    @property
    def condition_length(self) -> int:
        """Tokens the decoder attends to: L of encoder_hidden_states, or for encoder_inputs the condition encoder's
        output length Ll + R + Lt (lyric tokens, one per reference, caption tokens)."""
        if self.encoder_hidden_states is not None:
            return int(self.encoder_hidden_states.shape[0])
        return int(self.lyric_token_ids.shape[0] + self.refer_audio_latents.shape[0]
                   + self.text_hidden_states.shape[0])


def sample_from(key: str, tensors: Mapping[str, Tensor]) -> Sample:
    """A Sample of the common tensors and whichever condition fields `tensors` holds (the others None)."""
    return Sample(key, tensors["target_latents"], tensors["attention_mask"], tensors.get("encoder_hidden_states"),
                  tensors.get("encoder_attention_mask"), tensors["context_latents"],
                  **{k: tensors[k] for k in INPUT_KEYS + OPTIONAL_INPUT_KEYS if k in tensors})


@dataclass
class Batch:
    """Samples zero-padded to the longest T, L, Lt and Ll of the batch (masks and ids padded with 0), in the stored
    float dtype; timbre references packed. Fields of a condition set the samples do not carry are None."""

    keys: List[str]                                # B sample names
    target_latents: Tensor                         # [B, T, 64]
    attention_mask: Tensor                         # [B, T]
    encoder_hidden_states: Optional[Tensor]        # [B, L, H_enc]
    encoder_attention_mask: Optional[Tensor]       # [B, L]
    context_latents: Tensor                        # [B, T, 128]
    _: KW_ONLY
    text_hidden_states: Optional[Tensor] = None    # [B, Lt, D_text]
    text_attention_mask: Optional[Tensor] = None   # [B, Lt]
    lyric_token_ids: Optional[Tensor] = None       # [B, Ll] int64
    lyric_attention_mask: Optional[Tensor] = None  # [B, Ll]
    refer_audio_latents: Optional[Tensor] = None   # [N, Tr, 64] every sample's references, packed (N = sum of R_i)
    refer_audio_order: Optional[Tensor] = None     # [N] int64 batch index of each reference (refer_audio_order_mask)
    text_token_ids: Optional[Tensor] = None        # [B, Lt] int64
    text_lengths: Optional[Tensor] = None          # [B] int64 each sample's own Lt (before the batch padding)
    lyric_lengths: Optional[Tensor] = None         # [B] int64 each sample's own Ll (before the batch padding)

    def tensors(self) -> List[Tensor]:
        return [getattr(self, f.name) for f in fields(self) if isinstance(getattr(self, f.name), Tensor)]

    def _map(self, fn: Callable[[Tensor], Tensor]) -> "Batch":
        return Batch(**{f.name: (fn(v) if isinstance(v, Tensor) else v)
                        for f in fields(self) for v in [getattr(self, f.name)]})

    def to(self, device: torch.device | str, non_blocking: bool = False) -> "Batch":
        return self._map(lambda t: t.to(device, non_blocking=non_blocking))

    def float(self) -> "Batch":
        """float32 copies of bf16/fp16 fields (what the model is fed); float32 and integer fields are returned as
        they are."""
        return self._map(lambda t: t.float() if t.is_floating_point() else t)

    def pin_memory(self) -> "Batch":
        return self._map(lambda t: t if t.is_pinned() else t.pin_memory())
