"""The ACE-Step 1.5 DiT (`decoder.*` keys): the flow-matching velocity network that training updates.

Data flow: `cat([context_latents, x_t])` [B,T,192] -> zero-pad T to a multiple of patch_size -> `proj_in` Conv1d patchify
[B,T/2,H] -> N DiT layers (adaLN-modulated self-attention with RoPE, plain cross-attention to the projected condition,
adaLN-modulated SwiGLU) -> adaLN `norm_out` -> `proj_out` ConvTranspose1d unpatchify -> crop to T -> v [B,T,64].
"""

from __future__ import annotations

import math
from typing import Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from .layers import MLP, Attention, Mask, RMSNorm, RotaryEmbedding, StackDims, combine_masks, self_attention_masks


class Transpose12(nn.Module):
    """[B, A, C] <-> [B, C, A]; a parameter-free stand-in for the official `Lambda` so that the convolution sits at
    index 1 of `proj_in` / `proj_out` (keys `decoder.proj_in.1.weight`, ...)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.transpose(1, 2)


class TimestepEmbedding(nn.Module):
    """t -> sinusoid(t * 1000, 256 ch, [cos, sin]) -> MLP -> temb [B, H] and the 6 adaLN vectors [B, 6, H]."""

    def __init__(self, hidden_size: int, in_channels: int = 256, scale: float = 1000.0):
        super().__init__()
        self.in_channels, self.scale = in_channels, scale
        self.linear_1 = nn.Linear(in_channels, hidden_size)
        self.linear_2 = nn.Linear(hidden_size, hidden_size)
        self.time_proj = nn.Linear(hidden_size, hidden_size * 6)

    def sinusoid(self, t: torch.Tensor) -> torch.Tensor:
        half = self.in_channels // 2
        freqs = torch.exp(-math.log(10000.0) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
        args = (t * self.scale)[:, None].float() * freqs[None]  # [B, 128]
        return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)  # [B, 256]

    def forward(self, t: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        temb = self.linear_2(F.silu(self.linear_1(self.sinusoid(t).to(t.dtype))))  # [B, H]
        proj = self.time_proj(F.silu(temb)).unflatten(1, (6, -1))  # [B, 6, H]
        return temb, proj


class DiTLayer(nn.Module):
    """adaLN self-attention (gated) -> cross-attention (ungated, unmodulated) -> adaLN SwiGLU (gated)."""

    def __init__(self, dims: StackDims):
        super().__init__()
        h = dims.hidden_size
        # Learned offsets added to the timestep projection: (shift, scale, gate) for attention and for the MLP.
        self.scale_shift_table = nn.Parameter(torch.randn(1, 6, h) / h**0.5)
        self.self_attn_norm = RMSNorm(h, dims.rms_norm_eps)
        self.self_attn = Attention(dims)
        self.cross_attn_norm = RMSNorm(h, dims.rms_norm_eps)
        self.cross_attn = Attention(dims)
        self.mlp_norm = RMSNorm(h, dims.rms_norm_eps)
        self.mlp = MLP(h, dims.intermediate_size)

    def forward(
        self,
        x: torch.Tensor,  # [B, Tp, H]
        rope: Tuple[torch.Tensor, torch.Tensor],
        temb_proj: torch.Tensor,  # [B, 6, H]
        self_mask: Mask,  # dense bool (sdpa / eager) or a flex BlockMask, built once per decoder forward
        cond: torch.Tensor,  # [B, L, H] (already condition_embedder'ed)
        cross_mask: Optional[torch.Tensor],
    ) -> torch.Tensor:
        shift, scale, gate, c_shift, c_scale, c_gate = (self.scale_shift_table + temb_proj).chunk(6, dim=1)  # [B,1,H]
        h = (self.self_attn_norm(x) * (1 + scale) + shift).type_as(x)
        x = (x + self.self_attn(h, rope=rope, mask=self_mask) * gate).type_as(x)
        x = x + self.cross_attn(self.cross_attn_norm(x).type_as(x), kv=cond, mask=cross_mask)
        h = (self.mlp_norm(x) * (1 + c_scale) + c_shift).type_as(x)
        return (x + self.mlp(h) * c_gate).type_as(x)


def checkpointed_layers(setting: float, num_layers: int) -> set[int]:
    """Indices of the layers to recompute: 0 = none; 1 = all; an integer N >= 2 = every N-th (0, N, 2N, ...);
    0 < r < 1 = round(r * num_layers) layers spread evenly over the stack."""
    if setting < 0 or (setting > 1 and setting != int(setting)):
        raise ValueError(f"gradient_checkpointing={setting}: use 0, 1, an integer N >= 2 or a ratio in (0, 1)")
    if setting == 0:
        return set()
    if setting >= 1:
        return set(range(0, num_layers, int(setting)))
    count = round(setting * num_layers)
    return {int(k * num_layers / count) for k in range(count)}


class AceStepDiTModel(nn.Module):
    """The DiT decoder. Attribute order mirrors the official module so `state_dict()` key order matches too.

    Set `gradient_checkpointing` to recompute DiT layers in the backward pass (see `checkpointed_layers`: 0 = off,
    1 or True = every layer, N = every N-th, 0 < r < 1 = that share; training mode only; non-reentrant
    torch.utils.checkpoint, so it composes with PEFT adapters and frozen base weights). Layers in between keep their
    activations: less recompute for more memory.
    """

    def __init__(self, dims: StackDims, num_layers: int, in_channels: int, out_channels: int, patch_size: int,
                 condition_dim: int):
        super().__init__()
        h = dims.hidden_size
        self.dims, self.patch_size = dims, patch_size
        self.gradient_checkpointing: float = 0
        self.scale_shift_table = nn.Parameter(torch.randn(1, 2, h) / h**0.5)  # final adaLN (shift, scale)
        self.rotary_emb = RotaryEmbedding(dims.head_dim, dims.rope_theta)
        self.layers = nn.ModuleList([DiTLayer(dims) for _ in range(num_layers)])
        self.proj_in = nn.Sequential(
            Transpose12(), nn.Conv1d(in_channels, h, kernel_size=patch_size, stride=patch_size), Transpose12()
        )
        self.time_embed = TimestepEmbedding(h)
        self.time_embed_r = TimestepEmbedding(h)
        self.condition_embedder = nn.Linear(condition_dim, h)
        self.norm_out = RMSNorm(h, dims.rms_norm_eps)
        # ConvTranspose1d weight is [in=H, out=64, k]; stride == kernel, so each patch expands to patch_size frames.
        self.proj_out = nn.Sequential(
            Transpose12(), nn.ConvTranspose1d(h, out_channels, kernel_size=patch_size, stride=patch_size), Transpose12()
        )

    def attn_implementation(self) -> str:
        """The layers' current kernel (AceStepModel.set_attn_implementation may change it after construction)."""
        return self.layers[0].self_attn.attn_implementation if len(self.layers) else self.dims.attn_implementation

    def forward(
        self,
        hidden_states: torch.Tensor,  # [B, T, 64] x_t
        timestep: torch.Tensor,  # [B]
        timestep_r: torch.Tensor,  # [B] (= timestep in all official training/inference)
        encoder_hidden_states: torch.Tensor,  # [B, L, H_enc]
        context_latents: torch.Tensor,  # [B, T, 128] = cat(src_latents, chunk_masks)
        attention_mask: Optional[torch.Tensor] = None,  # [B, T] 1 = real frame
        encoder_attention_mask: Optional[torch.Tensor] = None,  # [B, L] 1 = real token
    ) -> torch.Tensor:
        """Predict the flow velocity v ~ noise - x0, [B, T, 64].

        Masks: the official decoder discards both masks (every patch attends to every patch, padding included, and
        cross-attention sees padded condition tokens). Passing None reproduces that exactly. Passing masks is our
        opt-in knob: with `attention_mask`, padded frames are zeroed at the input and padded patches (a patch is valid
        if any of its frames is) are excluded as self-attention keys; with `encoder_attention_mask`, padded condition
        tokens are excluded as cross-attention keys. Real-frame outputs are then independent of padding content.
        """
        temb_t, proj_t = self.time_embed(timestep)
        # time_embed_r(t - r) is added even when t == r: its constant output is part of the learned function.
        temb_r, proj_r = self.time_embed_r(timestep - timestep_r)
        temb, temb_proj = temb_t + temb_r, proj_t + proj_r  # [B, H], [B, 6, H]

        x = torch.cat([context_latents, hidden_states], dim=-1)  # [B, T, 192], context FIRST
        seq_len = x.shape[1]
        if attention_mask is not None:
            x = x * attention_mask[..., None].to(x.dtype)
        pad = (-seq_len) % self.patch_size
        if pad:
            x = F.pad(x, (0, 0, 0, pad))  # zero frames, as the official code does
        # row-major, not the Conv1d's transposed layout: otherwise every Linear of every layer copies its input
        # (and autograd keeps each copy) for batches of more than one clip
        x = self.proj_in(x).contiguous()  # [B, Tp, H]
        cond = self.condition_embedder(encoder_hidden_states)  # [B, L, H]

        n_patches = x.shape[1]
        patch_valid = None
        if attention_mask is not None:
            m = F.pad(attention_mask.bool(), (0, pad), value=False)
            patch_valid = m.view(m.shape[0], n_patches, self.patch_size).any(-1)  # [B, Tp]
        band, full_mask = self_attention_masks(n_patches, self.dims.sliding_window, patch_valid, x.device,
                                               self.attn_implementation())
        cross_mask = combine_masks(None, encoder_attention_mask)  # dense for every impl: cross-attention is SDPA
        rope = self.rotary_emb(n_patches, x.device, x.dtype)

        recompute = set()
        if self.training and torch.is_grad_enabled():
            recompute = checkpointed_layers(self.gradient_checkpointing, len(self.layers))
        for i, layer in enumerate(self.layers):
            self_mask = band if self.dims.layer_is_sliding(i) else full_mask
            if i in recompute:
                x = checkpoint(layer, x, rope, temb_proj, self_mask, cond, cross_mask, use_reentrant=False)
            else:
                x = layer(x, rope, temb_proj, self_mask, cond, cross_mask)

        shift, scale = (self.scale_shift_table + temb[:, None]).chunk(2, dim=1)  # [B, 1, H] each
        x = (self.norm_out(x) * (1 + scale) + shift).type_as(x)
        return self.proj_out(x)[:, :seq_len]  # [B, T, 64]
