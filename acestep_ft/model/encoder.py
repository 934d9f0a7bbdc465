"""The condition encoder (`encoder.*` keys): text, lyrics and reference-audio timbre -> one packed sequence.

Frozen in every trainer (its output is precomputed at preprocessing time), but it must load strictly and reproduce the
official numerics so that our preprocessing, if any, matches. Output layout per row: the valid tokens of
[lyrics, timbre refs, text] in that order, then all padding (`pack_sequences`).
"""

from __future__ import annotations

from typing import Tuple

import torch
from torch import nn

from .layers import EncoderStack, StackDims


def pack_sequences(
    h1: torch.Tensor, h2: torch.Tensor, m1: torch.Tensor, m2: torch.Tensor
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Concatenate [h1, h2] and stably move each row's valid tokens to the front.

    h1 [B, L1, D], h2 [B, L2, D], masks [B, L1] / [B, L2] (1 = valid) -> ([B, L1+L2, D], bool mask [B, L1+L2]).
    """
    hidden = torch.cat([h1, h2], dim=1)  # [B, L, D]
    mask = torch.cat([m1.long(), m2.long()], dim=1)  # [B, L]
    order = mask.argsort(dim=1, descending=True, stable=True)  # valid first, original order kept
    hidden = torch.gather(hidden, 1, order[..., None].expand_as(hidden))
    positions = torch.arange(mask.shape[1], device=mask.device)
    return hidden, positions[None] < mask.sum(dim=1, keepdim=True)


class AceStepLyricEncoder(EncoderStack):
    """Lyric token embeddings [B, L, 1024] -> [B, L, H_enc]; padded lyric tokens are masked as keys."""

    def __init__(self, dims: StackDims, text_hidden_dim: int, num_layers: int):
        super().__init__(dims, text_hidden_dim, num_layers)

    def forward(self, lyric_hidden_states: torch.Tensor, lyric_attention_mask: torch.Tensor) -> torch.Tensor:
        return self.run_layers(self.embed_tokens(lyric_hidden_states), lyric_attention_mask)


class AceStepTimbreEncoder(EncoderStack):
    """Packed reference latents [N, Tr, 64] -> one vector per reference, unpacked to [B, max_refs, H_enc] + mask.

    2B reads frame 0 of the encoded reference (the official CLS prepend is commented out, `special_token` unused);
    XL prepends `special_token` and reads that position (`use_special_token`).
    """

    def __init__(self, dims: StackDims, timbre_hidden_dim: int, num_layers: int, use_special_token: bool):
        super().__init__(dims, timbre_hidden_dim, num_layers)
        self.use_special_token = use_special_token
        self.special_token = nn.Parameter(torch.randn(1, 1, dims.hidden_size))

    def forward(self, packed: torch.Tensor, order_mask: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        x = self.embed_tokens(packed)  # [N, Tr, H]
        if self.use_special_token:
            x = torch.cat([self.special_token.expand(x.shape[0], 1, -1).to(x.dtype), x], dim=1)  # [N, 1+Tr, H]
        pooled = self.run_layers(x)[:, 0]  # [N, H], no padding mask (official)
        return unpack_by_owner(pooled, order_mask)


def unpack_by_owner(packed: torch.Tensor, owner: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """Scatter rows of `packed` [N, D] into [B, max_count, D] by batch index `owner` [N], keeping their order.

    B = max(owner) + 1 (official convention). Returns (unpacked, long mask [B, max_count]).
    """
    n, d = packed.shape
    owner = owner.long()
    b = int(owner.max().item()) + 1
    counts = torch.bincount(owner, minlength=b)  # [B]
    max_count = int(counts.max().item())
    # Slot of each row within its owner = number of earlier rows with the same owner.
    same = owner[:, None] == owner[None, :]  # [N, N]
    earlier = torch.ones(n, n, dtype=torch.bool, device=owner.device).tril(-1)
    slot = (same & earlier).sum(dim=1)  # [N]
    out = packed.new_zeros(b, max_count, d).index_put((owner, slot), packed)
    mask = torch.zeros(b, max_count, dtype=torch.long, device=packed.device)
    mask[owner, slot] = 1
    return out, mask


class AceStepConditionEncoder(nn.Module):
    """text_projector (Linear, no bias) + lyric encoder + timbre encoder, packed valid-first."""

    def __init__(self, dims: StackDims, text_hidden_dim: int, timbre_hidden_dim: int, num_lyric_layers: int,
                 num_timbre_layers: int, timbre_special_token: bool):
        super().__init__()
        self.text_projector = nn.Linear(text_hidden_dim, dims.hidden_size, bias=False)
        self.lyric_encoder = AceStepLyricEncoder(dims, text_hidden_dim, num_lyric_layers)
        self.timbre_encoder = AceStepTimbreEncoder(dims, timbre_hidden_dim, num_timbre_layers, timbre_special_token)

    def forward(
        self,
        text_hidden_states: torch.Tensor,  # [B, Lt, 1024]
        text_attention_mask: torch.Tensor,  # [B, Lt]
        lyric_hidden_states: torch.Tensor,  # [B, Ll, 1024]
        lyric_attention_mask: torch.Tensor,  # [B, Ll]
        refer_audio_acoustic_hidden_states_packed: torch.Tensor,  # [N, Tr, 64]
        refer_audio_order_mask: torch.Tensor,  # [N] batch index of each reference
    ) -> Tuple[torch.Tensor, torch.Tensor]:
        """-> (encoder_hidden_states [B, Ll+R+Lt, H_enc], encoder_attention_mask bool [B, Ll+R+Lt])."""
        text = self.text_projector(text_hidden_states)
        lyric = self.lyric_encoder(lyric_hidden_states, lyric_attention_mask)
        timbre, timbre_mask = self.timbre_encoder(refer_audio_acoustic_hidden_states_packed, refer_audio_order_mask)
        hidden, mask = pack_sequences(lyric, timbre, lyric_attention_mask, timbre_mask)
        return pack_sequences(hidden, text, mask, text_attention_mask)
