"""Transformer building blocks shared by every ACE-Step 1.5 stack (Qwen3-style, plain torch).

What lives here: RMSNorm (fp32 math), rotary embedding, grouped-query attention with per-head q/k RMSNorm,
bidirectional band masks for "sliding" layers, the SwiGLU MLP, the pre-norm encoder layer, and `EncoderStack`,
the embed -> layers -> norm skeleton that the lyric encoder, timbre encoder, tokenizer pooler and detokenizer share.

Masks are boolean "may attend" tensors broadcastable to [B, 1, Lq, Lk] (True = keep), or None for full attention.
Attribute names are the official ones, so `state_dict()` keys match official checkpoints one to one.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, List, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn


@dataclass(frozen=True)
class StackDims:
    """Widths of one transformer stack (decoder and condition encoder differ on XL)."""

    hidden_size: int
    intermediate_size: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    rope_theta: float
    sliding_window: Optional[int]  # None = every layer attends fully
    attn_implementation: str  # "sdpa" | "eager"

    def layer_is_sliding(self, layer_idx: int) -> bool:
        # Official default layer_types: even layers "sliding_attention", odd layers "full_attention";
        # the encoder stacks index the same list by their own layer index.
        return self.sliding_window is not None and layer_idx % 2 == 0


class RMSNorm(nn.Module):
    """`w * x / sqrt(mean(x^2) + eps)`, statistics in fp32 so bf16 activations keep their precision."""

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        in_dtype = x.dtype
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x32.to(in_dtype)


class RotaryEmbedding(nn.Module):
    """Default (unscaled) RoPE tables for positions 0..L-1.

    `inv_freq` is computed once on the CPU in fp32 and cached per device instead of being a registered buffer: the
    official buffer is non-persistent anyway, so this way nothing is left on the meta device after meta-device
    construction + `load_state_dict(assign=True)`, and `model.to(torch.bfloat16)` cannot round the frequencies.
    """

    def __init__(self, head_dim: int, theta: float):
        super().__init__()
        self.head_dim = head_dim
        self.theta = float(theta)
        exponent = torch.arange(0, head_dim, 2, dtype=torch.int64, device="cpu").float() / head_dim
        self._inv_freq_cpu = 1.0 / (self.theta**exponent)  # [head_dim/2] fp32, never on meta
        self._inv_freq_by_device: Dict[torch.device, torch.Tensor] = {}

    def inv_freq(self, device: torch.device) -> torch.Tensor:
        if device not in self._inv_freq_by_device:
            self._inv_freq_by_device[device] = self._inv_freq_cpu.to(device)
        return self._inv_freq_by_device[device]

    def forward(self, seq_len: int, device: torch.device, dtype: torch.dtype) -> Tuple[torch.Tensor, torch.Tensor]:
        with torch.autocast(device_type=device.type, enabled=False):
            pos = torch.arange(seq_len, device=device, dtype=torch.float32)
            freqs = pos[:, None] * self.inv_freq(device)[None, :]  # [L, D/2]
            emb = torch.cat([freqs, freqs], dim=-1)  # [L, D]
            return emb.cos().to(dtype), emb.sin().to(dtype)


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat([-x2, x1], dim=-1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x [B, heads, L, D]; cos/sin [L, D]."""
    return x * cos + _rotate_half(x) * sin


def band_mask(seq_len: int, window: int, device: torch.device) -> torch.Tensor:
    """Bidirectional sliding-window mask `|i - j| <= window` -> [1, 1, L, L] bool."""
    idx = torch.arange(seq_len, device=device)
    return ((idx[:, None] - idx[None, :]).abs() <= window)[None, None]


def combine_masks(geometry: Optional[torch.Tensor], key_valid: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    """AND a geometry mask [1,1,Lq,Lk] with a key-padding mask [B, Lk] (1/True = valid) -> [B|1, 1, Lq, Lk]."""
    if key_valid is None:
        return geometry
    keys = key_valid.bool()[:, None, None, :]  # [B, 1, 1, Lk]
    mask = keys if geometry is None else geometry & keys
    # A query row with no visible key (e.g. a sample whose condition is all padding) would give NaN;
    # let such rows see every key instead, which is what the official (unmasked) decoder does for them.
    return mask | ~mask.any(dim=-1, keepdim=True)


class Attention(nn.Module):
    """GQA attention with per-head q/k RMSNorm; RoPE only for self-attention (official: none in cross-attn)."""

    def __init__(self, dims: StackDims):
        super().__init__()
        h, d = dims.hidden_size, dims.head_dim
        self.num_heads, self.num_kv_heads, self.head_dim = dims.num_heads, dims.num_kv_heads, d
        self.attn_implementation = dims.attn_implementation
        self.q_proj = nn.Linear(h, dims.num_heads * d, bias=False)
        self.k_proj = nn.Linear(h, dims.num_kv_heads * d, bias=False)
        self.v_proj = nn.Linear(h, dims.num_kv_heads * d, bias=False)
        self.o_proj = nn.Linear(dims.num_heads * d, h, bias=False)
        self.q_norm = RMSNorm(d, dims.rms_norm_eps)
        self.k_norm = RMSNorm(d, dims.rms_norm_eps)

    def forward(
        self,
        x: torch.Tensor,  # [B, Lq, H]
        kv: Optional[torch.Tensor] = None,  # [B, Lk, H] cross-attention source (same width), None = self-attention
        rope: Optional[Tuple[torch.Tensor, torch.Tensor]] = None,
        mask: Optional[torch.Tensor] = None,  # bool, broadcastable to [B, 1, Lq, Lk]
    ) -> torch.Tensor:
        b, lq, _ = x.shape
        src = x if kv is None else kv
        lk = src.shape[1]
        # Norm is applied per head, before RoPE (Qwen3 order).
        q = self.q_norm(self.q_proj(x).view(b, lq, self.num_heads, self.head_dim)).transpose(1, 2)  # [B, Hq, Lq, D]
        k = self.k_norm(self.k_proj(src).view(b, lk, self.num_kv_heads, self.head_dim)).transpose(1, 2)  # [B, Hkv, Lk, D]
        v = self.v_proj(src).view(b, lk, self.num_kv_heads, self.head_dim).transpose(1, 2)  # [B, Hkv, Lk, D]
        if rope is not None and kv is None:
            cos, sin = rope
            q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        groups = self.num_heads // self.num_kv_heads
        if groups > 1:  # kv head j serves query heads j*groups .. j*groups+groups-1
            k = k.repeat_interleave(groups, dim=1)
            v = v.repeat_interleave(groups, dim=1)
        out = attention(q, k, v, mask, self.head_dim**-0.5, self.attn_implementation)  # [B, Hq, Lq, D]
        return self.o_proj(out.transpose(1, 2).reshape(b, lq, self.num_heads * self.head_dim))


def attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: Optional[torch.Tensor], scale: float, impl: str
) -> torch.Tensor:
    """Scaled dot-product attention; `eager` reproduces the official path (softmax in fp32)."""
    if impl == "sdpa":
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale)
    scores = torch.matmul(q, k.transpose(-1, -2)) * scale  # [B, Hq, Lq, Lk]
    if mask is not None:
        scores = scores.masked_fill(~mask, torch.finfo(scores.dtype).min)
    probs = torch.softmax(scores, dim=-1, dtype=torch.float32).to(q.dtype)
    return torch.matmul(probs, v)


class MLP(nn.Module):
    """SwiGLU: down(silu(gate(x)) * up(x)), no biases."""

    def __init__(self, hidden_size: int, intermediate_size: int):
        super().__init__()
        self.gate_proj = nn.Linear(hidden_size, intermediate_size, bias=False)
        self.up_proj = nn.Linear(hidden_size, intermediate_size, bias=False)
        self.down_proj = nn.Linear(intermediate_size, hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class EncoderLayer(nn.Module):
    """Pre-norm block: x += attn(norm(x)); x += mlp(norm(x))."""

    def __init__(self, dims: StackDims):
        super().__init__()
        self.self_attn = Attention(dims)
        self.input_layernorm = RMSNorm(dims.hidden_size, dims.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(dims.hidden_size, dims.rms_norm_eps)
        self.mlp = MLP(dims.hidden_size, dims.intermediate_size)

    def forward(self, x: torch.Tensor, rope, mask: Optional[torch.Tensor]) -> torch.Tensor:
        x = x + self.self_attn(self.input_layernorm(x), rope=rope, mask=mask)
        return x + self.mlp(self.post_attention_layernorm(x))


class EncoderStack(nn.Module):
    """`embed_tokens` -> N encoder layers (alternating band/full, RoPE) -> `norm`.

    Subclasses add their own parameters (special tokens, output projections) and input/output reshaping.
    """

    def __init__(self, dims: StackDims, in_dim: int, num_layers: int):
        super().__init__()
        self.dims = dims
        self.embed_tokens = nn.Linear(in_dim, dims.hidden_size)
        self.norm = RMSNorm(dims.hidden_size, dims.rms_norm_eps)
        self.rotary_emb = RotaryEmbedding(dims.head_dim, dims.rope_theta)
        self.layers = nn.ModuleList([EncoderLayer(dims) for _ in range(num_layers)])

    def run_layers(self, x: torch.Tensor, key_valid: Optional[torch.Tensor] = None) -> torch.Tensor:
        """x [B, L, H] (already embedded), key_valid [B, L] or None -> normed [B, L, H]."""
        seq_len = x.shape[1]
        rope = self.rotary_emb(seq_len, x.device, x.dtype)
        full = combine_masks(None, key_valid)
        band = None
        if self.dims.sliding_window is not None:
            band = combine_masks(band_mask(seq_len, self.dims.sliding_window, x.device), key_valid)
        for i, layer in enumerate(self.layers):
            x = layer(x, rope, band if self.dims.layer_is_sliding(i) else full)
        return self.norm(x)


def layer_types(num_layers: int) -> List[str]:
    """The official default `layer_types` (written into / checked against config.json); with
    `use_sliding_window: false` the list stays the same and the band is simply not applied."""
    return ["sliding_attention" if i % 2 == 0 else "full_attention" for i in range(num_layers)]
