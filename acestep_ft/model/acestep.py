"""`AceStepModel`: the full ACE-Step 1.5 DiT checkpoint (decoder, condition encoder, tokenizer, detokenizer,
null condition), built from `ModelConfig`, with the official state-dict layout (`decoder.*`, `encoder.*`, ...).

Only the decoder runs during training; the rest exists so that official checkpoints load strictly and full
fine-tunes export in the official layout. `prepare_condition` reproduces the official helper of the same name.
"""

from __future__ import annotations

import math
from typing import Any, Dict, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from .decoder import AceStepDiTModel
from .encoder import AceStepConditionEncoder
from .layers import Attention, RMSNorm, StackDims
from .tokenizer import AceStepAudioTokenizer, AudioTokenDetokenizer


def _sliding_window(cfg: Any) -> Optional[int]:
    return int(cfg.sliding_window) if cfg.use_sliding_window else None


ATTN_IMPLEMENTATIONS = ("sdpa", "eager", "flex")


def _attn_impl(cfg: Any) -> str:
    impl = str(cfg.attn_implementation)  # Hydra turns the Literal into a StrEnum; keep a plain str
    if impl not in ATTN_IMPLEMENTATIONS:
        raise ValueError(f"model.attn_implementation must be 'sdpa', 'eager' or 'flex', got {impl!r}")
    return impl


def decoder_dims(cfg: Any) -> StackDims:
    """Widths of the DiT."""
    return StackDims(
        hidden_size=cfg.hidden_size, intermediate_size=cfg.intermediate_size, num_heads=cfg.num_attention_heads,
        num_kv_heads=cfg.num_key_value_heads, head_dim=cfg.head_dim, rms_norm_eps=cfg.rms_norm_eps,
        rope_theta=cfg.rope_theta, sliding_window=_sliding_window(cfg), attn_implementation=_attn_impl(cfg),
    )


def encoder_dims(cfg: Any) -> StackDims:
    """Widths of the condition encoder, tokenizer and detokenizer (`encoder_*` fields; None = same as the DiT)."""
    def pick(value, fallback):
        return fallback if value is None else value

    return StackDims(
        hidden_size=pick(cfg.encoder_hidden_size, cfg.hidden_size),
        intermediate_size=pick(cfg.encoder_intermediate_size, cfg.intermediate_size),
        num_heads=pick(cfg.encoder_num_attention_heads, cfg.num_attention_heads),
        num_kv_heads=pick(cfg.encoder_num_key_value_heads, cfg.num_key_value_heads),
        head_dim=cfg.head_dim, rms_norm_eps=cfg.rms_norm_eps, rope_theta=cfg.rope_theta,
        sliding_window=_sliding_window(cfg), attn_implementation=_attn_impl(cfg),
    )


class AceStepModel(nn.Module):
    """ACE-Step 1.5 (all variants). Randomly initialised like the official `post_init` (seed torch beforehand)."""

    def __init__(self, cfg: Any):
        super().__init__()
        self.cfg = cfg
        dd, ed = decoder_dims(cfg), encoder_dims(cfg)
        self.decoder = AceStepDiTModel(
            dd, cfg.num_hidden_layers, cfg.in_channels, cfg.audio_acoustic_hidden_dim, cfg.patch_size, ed.hidden_size
        )
        self.encoder = AceStepConditionEncoder(
            ed, cfg.text_hidden_dim, cfg.timbre_hidden_dim, cfg.num_lyric_encoder_hidden_layers,
            cfg.num_timbre_encoder_hidden_layers, bool(cfg.timbre_special_token),
        )
        self.tokenizer = AceStepAudioTokenizer(
            ed, cfg.audio_acoustic_hidden_dim, cfg.num_attention_pooler_hidden_layers, cfg.pool_window_size,
            cfg.fsq_dim, list(cfg.fsq_input_levels), cfg.fsq_input_num_quantizers,
        )
        self.detokenizer = AudioTokenDetokenizer(
            ed, cfg.audio_acoustic_hidden_dim, cfg.num_attention_pooler_hidden_layers, cfg.pool_window_size
        )
        # Unconditional embedding for CFG dropout / guidance; encoder width (2048 also on XL).
        self.null_condition_emb = nn.Parameter(torch.randn(1, 1, ed.hidden_size))
        # The official config.json this model was loaded from (None after random init); save_full_model keeps its
        # unrelated fields so an exported directory stays as close to the source as possible.
        self.source_config: Optional[Dict[str, Any]] = None
        self.source_path: Optional[str] = None  # checkpoint directory/file it was loaded from
        self.init_weights()

    @torch.no_grad()
    def init_weights(self) -> None:
        """Official `_init_weights`: Linear ~ N(0, 0.02) with zero bias, RMSNorm = 1; the rest keeps its own init."""
        for module in self.modules():
            if isinstance(module, nn.Linear):
                module.weight.normal_(0.0, 0.02)
                if module.bias is not None:
                    module.bias.zero_()
            elif isinstance(module, RMSNorm):
                module.weight.fill_(1.0)

    def set_attn_implementation(self, impl: str) -> None:
        """Switch every attention module between "sdpa", "eager" (fp32 softmax) and "flex" (FlexAttention, block-sparse
        band) at run time; the stacks build the matching masks on their next forward."""
        if impl not in ATTN_IMPLEMENTATIONS:
            raise ValueError(f"attn_implementation must be 'sdpa', 'eager' or 'flex', got {impl!r}")
        for module in self.modules():
            if isinstance(module, Attention):
                module.attn_implementation = impl

    def tokenize(
        self, x: torch.Tensor, silence_latent: torch.Tensor, attention_mask: torch.Tensor
    ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Official `tokenize`: latents [B, T, 64] -> (hints [B, N, H], indices [B, N, Q], 5 Hz mask [B, N]).

        T is padded up to a multiple of pool_window_size with silence frames (mask 0 there).
        """
        p = self.cfg.pool_window_size
        pad = (-x.shape[1]) % p
        if pad:
            x = torch.cat([x, silence_latent[:1, :pad].to(x.dtype).expand(x.shape[0], -1, -1)], dim=1)
            attention_mask = F.pad(attention_mask, (0, pad), value=0)
        n = x.shape[1] // p
        chunk = math.ceil(attention_mask.shape[1] / n)
        mask = F.max_pool1d(attention_mask.to(x.dtype)[:, None], kernel_size=chunk, stride=chunk, ceil_mode=True)
        quantized, indices = self.tokenizer.tokenize(x)
        return quantized, indices, mask[:, 0]

    def detokenize(self, quantized: torch.Tensor) -> torch.Tensor:
        """5 Hz hints [B, N, H] -> 25 Hz latents [B, N * pool_window_size, 64]."""
        return self.detokenizer(quantized)

    @torch.no_grad()
    def prepare_condition(
        self,
        text_hidden_states: torch.Tensor,
        text_attention_mask: torch.Tensor,
        lyric_hidden_states: torch.Tensor,
        lyric_attention_mask: torch.Tensor,
        refer_audio_acoustic_hidden_states_packed: torch.Tensor,
        refer_audio_order_mask: torch.Tensor,
        src_latents: torch.Tensor,  # [B, T, 64]; text2music: silence_latent[:, :T]
        chunk_masks: torch.Tensor,  # [B, T, 64]; text2music: ones
        is_covers: torch.Tensor,  # [B]; >0 = replace the source by its tokenize/detokenize round trip
        silence_latent: torch.Tensor,  # [1, Ts, 64]
        attention_mask: torch.Tensor,  # [B, T]
    ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Official `prepare_condition` as used by its training forward (hints tokenized from `src_latents`).

        Returns (encoder_hidden_states [B, L, H_enc], encoder_attention_mask [B, L], context_latents [B, T, 128]).
        """
        enc, enc_mask = self.encoder(
            text_hidden_states, text_attention_mask, lyric_hidden_states, lyric_attention_mask,
            refer_audio_acoustic_hidden_states_packed, refer_audio_order_mask,
        )
        src = src_latents
        if bool((is_covers > 0).any()):
            hints, _, _ = self.tokenize(src_latents, silence_latent, attention_mask)
            hints_25hz = self.detokenize(hints)[:, : src_latents.shape[1]]
            src = torch.where(is_covers[:, None, None] > 0, hints_25hz, src_latents)
        context = torch.cat([src, chunk_masks.to(src.dtype)], dim=-1)  # [B, T, 128], source FIRST
        return enc, enc_mask, context
