"""Audio tokenizer (`tokenizer.*`) and detokenizer (`detokenizer.*`): 25 Hz latents <-> 5 Hz FSQ codes.

Used only for cover / LM-hint conditioning (`context_latents` of cover samples) and frozen in every trainer, but the
keys must exist for strict loading. Path: latents [B, T, 64] -> windows of 5 frames -> `audio_acoustic_proj` ->
attention pooler (CLS token per window) [B, T/5, H] -> residual FSQ (levels 8,8,8,5,5,5 = 64 000 codes) -> detokenizer
expands every code back to 5 frames [B, T, 64].

`ResidualFSQ` reimplements vector-quantize-pytorch's ResidualFSQ (>= 1.27.15, the version range the official
requirements allow): tanh soft clamp to 1 + 1/(L-1), then per quantizer a hard clamp to [-1, 1] and the
symmetry-preserving rounding `2/(L-1) * floor((L-1)(z+1)/2 + 0.5) - 1`, computed in fp32.
"""

from __future__ import annotations

from typing import List, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from .layers import EncoderStack, StackDims


def _linear32(layer: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Apply a Linear (or Identity) in fp32 whatever the weight dtype (the official XL code forces fp32 here too)."""
    if isinstance(layer, nn.Linear):
        bias = None if layer.bias is None else layer.bias.float()
        return F.linear(x.float(), layer.weight.float(), bias)
    return x.float()


class ResidualFSQ(nn.Module):
    """Residual finite scalar quantizer; holds only `project_in` / `project_out` (all other state is derived)."""

    def __init__(self, dim: int, levels: List[int], num_quantizers: int):
        super().__init__()
        self.levels, self.num_quantizers = list(levels), num_quantizers
        n = len(self.levels)
        self.project_in = nn.Linear(dim, n) if dim != n else nn.Identity()
        self.project_out = nn.Linear(n, dim) if dim != n else nn.Identity()

    @property
    def codebook_size(self) -> int:
        size = 1
        for level in self.levels:
            size *= level
        return size

    def _constants(self, device: torch.device):
        levels = torch.tensor(self.levels, device=device)  # int64 [C]
        basis = torch.cumprod(torch.tensor([1] + self.levels[:-1], device=device), dim=0)  # mixed-radix digits
        scales = torch.stack([levels.float() ** -q for q in range(self.num_quantizers)])  # [Q, C]
        return levels, basis, scales

    def forward(self, x: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """x [B, N, dim] -> (quantized [B, N, dim] in x.dtype, indices int32 [B, N, Q])."""
        levels, basis, scales = self._constants(x.device)
        with torch.autocast(device_type=x.device.type, enabled=False):
            z = _linear32(self.project_in, x)  # [B, N, C]
            clamp = 1 + 1 / (levels - 1)
            z = (z / clamp).tanh() * clamp  # soft clamp so the hard clamp below rarely bites
            residual, total, indices = z, torch.zeros_like(z), []
            for q in range(self.num_quantizers):
                zq = (residual / scales[q]).clamp(-1.0, 1.0)
                bracket = ((levels - 1) * (zq + 1) / 2.0) + 0.5
                bracket = bracket + (bracket.floor() - bracket).detach()  # floor with straight-through gradient
                code = (2.0 / (levels - 1)) * bracket - 1.0  # [B, N, C] in [-1, 1]
                indices.append((bracket.detach().round().long() * basis).sum(-1).to(torch.int32))
                quantized = code * scales[q]
                residual = residual - quantized.detach()
                total = total + quantized
            out = _linear32(self.project_out, total)
        return out.to(x.dtype), torch.stack(indices, dim=-1)

    def get_output_from_indices(self, indices: torch.Tensor) -> torch.Tensor:
        """indices [B, N, Q] -> quantized [B, N, dim] (fp32); e.g. for 5 Hz audio codes from the LM."""
        levels, basis, scales = self._constants(indices.device)
        digits = (indices.long()[..., None] // basis) % levels  # [B, N, Q, C]
        codes = digits * (2.0 / (levels - 1)) - 1.0
        return _linear32(self.project_out, (codes * scales).sum(dim=-2))


class AttentionPooler(EncoderStack):
    """Windows [B, N, P, H] -> prepend a CLS `special_token` per window -> encoder stack -> CLS output [B, N, H]."""

    def __init__(self, dims: StackDims, num_layers: int):
        super().__init__(dims, dims.hidden_size, num_layers)
        self.special_token = nn.Parameter(torch.randn(1, 1, dims.hidden_size) * 0.02)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, p, h = x.shape
        x = self.embed_tokens(x)
        cls = self.special_token.to(x.dtype).expand(b, n, 1, h)
        x = torch.cat([cls, x], dim=2).reshape(b * n, p + 1, h)  # [B*N, 1+P, H]
        return self.run_layers(x)[:, 0].reshape(b, n, h)


class AceStepAudioTokenizer(nn.Module):
    """25 Hz latents -> 5 Hz quantized hints + code indices."""

    def __init__(self, dims: StackDims, latent_dim: int, num_pooler_layers: int, pool_window_size: int,
                 fsq_dim: int, fsq_levels: List[int], fsq_num_quantizers: int):
        super().__init__()
        self.pool_window_size = pool_window_size
        self.audio_acoustic_proj = nn.Linear(latent_dim, dims.hidden_size)
        self.attention_pooler = AttentionPooler(dims, num_pooler_layers)
        self.quantizer = ResidualFSQ(fsq_dim, fsq_levels, fsq_num_quantizers)

    def forward(self, windows: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """windows [B, N, P, 64] -> (quantized [B, N, H], indices [B, N, Q])."""
        return self.quantizer(self.attention_pooler(self.audio_acoustic_proj(windows)))

    def tokenize(self, x: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """x [B, T, 64] with T a multiple of pool_window_size."""
        b, t, c = x.shape
        return self.forward(x.reshape(b, t // self.pool_window_size, self.pool_window_size, c))


class AudioTokenDetokenizer(EncoderStack):
    """5 Hz hints [B, N, H] -> each token + P learned `special_tokens` -> encoder stack -> `proj_out` -> [B, N*P, 64]."""

    def __init__(self, dims: StackDims, latent_dim: int, num_layers: int, pool_window_size: int):
        super().__init__(dims, dims.hidden_size, num_layers)
        self.pool_window_size = pool_window_size
        self.special_tokens = nn.Parameter(torch.randn(1, pool_window_size, dims.hidden_size) * 0.02)
        self.proj_out = nn.Linear(dims.hidden_size, latent_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, h = x.shape
        p = self.pool_window_size
        x = self.embed_tokens(x)[:, :, None, :].expand(b, n, p, h) + self.special_tokens.to(x.dtype)  # [B, N, P, H]
        x = self.run_layers(x.reshape(b * n, p, h))  # [B*N, P, H]
        return self.proj_out(x).reshape(b, n * p, -1)
