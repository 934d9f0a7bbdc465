"""Transformer building blocks shared by every ACE-Step 1.5 stack (Qwen3-style, plain torch).

What lives here: RMSNorm (fp32 math), rotary embedding, grouped-query attention with per-head q/k RMSNorm,
bidirectional band masks for "sliding" layers, the SwiGLU MLP, the pre-norm encoder layer, and `EncoderStack`,
the embed -> layers -> norm skeleton that the lyric encoder, timbre encoder, tokenizer pooler and detokenizer share.

Masks are boolean "may attend" tensors broadcastable to [B, 1, Lq, Lk] (True = keep), or None for full attention;
with attn_implementation "flex", self-attention takes a FlexAttention `BlockMask` instead (`flex_block_mask`), so a
band layer computes only the key tiles near the diagonal. `self_attention_masks` builds whichever the stack needs.
Attribute names are the official ones, so `state_dict()` keys match official checkpoints one to one.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, Dict, List, Optional, Tuple, Union

import torch
import torch.nn.functional as F
from torch import nn

if TYPE_CHECKING:
    from torch.nn.attention.flex_attention import BlockMask

# A self-attention mask as the layers receive it: dense bool (sdpa, eager), a BlockMask (flex), or None (no mask).
Mask = Union[torch.Tensor, "BlockMask", None]


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
    attn_implementation: str  # "sdpa" | "eager" | "flex"

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


def self_attention_masks(
    seq_len: int, window: Optional[int], key_valid: Optional[torch.Tensor], device: torch.device, impl: str
) -> Tuple[Mask, Mask]:
    """(band mask for sliding layers, mask for full layers) of one stack, built once per forward for all its layers.

    window None = no sliding layers (band is None). sdpa / eager get the dense bool masks of `combine_masks`; flex gets
    BlockMasks with the same meaning (`flex_block_mask`)."""
    if impl == "flex":
        band = None if window is None else flex_block_mask(seq_len, window, key_valid, device)
        return band, flex_block_mask(seq_len, None, key_valid, device)
    band = None if window is None else combine_masks(band_mask(seq_len, window, device), key_valid)
    return band, combine_masks(None, key_valid)


# ---------------------------------------------------------------- FlexAttention

FLEX_BLOCK = 128  # flex's default tile (queries x keys); a band of 2*window+1 keys touches ~(2*window+1)/128 + 1 tiles
_compiled_flex: Optional[Callable[..., torch.Tensor]] = None  # torch.compile(flex_attention), made on first CUDA use


def _flex_api() -> Any:
    """`torch.nn.attention.flex_attention`, imported on first use so that sdpa / eager runs never need it."""
    try:
        from torch.nn.attention import flex_attention as api
    except ImportError as err:
        raise ImportError(f"model.attn_implementation=flex needs torch.nn.attention.flex_attention, which torch "
                          f"{torch.__version__} lacks: upgrade torch, or use attn_implementation=sdpa") from err
    return api


def flex_block_mask(
    seq_len: int, window: Optional[int], key_valid: Optional[torch.Tensor], device: torch.device
) -> Optional["BlockMask"]:
    """Self-attention BlockMask with exactly the semantics of `combine_masks(band_mask(...) or None, key_valid)`.

    Element rule (the mask_mod): key kv is visible to query q if |q - kv| <= window (skipped for window None) and kv
    is a valid key; a query row that would see no key at all sees every key (the combine_masks rule). Such rows exist
    only for padded queries (a valid query always sees itself), e.g. padding longer than the window after the last
    valid position, or an all-padding sample: flex itself would return zeros there instead, which would change the
    padded positions' outputs (and a loss that counts padding) against sdpa / eager.

    Tile rule: for every (query tile, key tile) of FLEX_BLOCK x FLEX_BLOCK the number of visible pairs is counted in
    O(B * L * L / FLEX_BLOCK) from prefix sums of `key_valid` (no L x L tensor): 0 = skipped, all = a full tile (no
    mask_mod call), else partial. Returns None when nothing is masked (full attention, no padding); the batch
    dimension is 1 (broadcast) without key_valid.
    """
    if window is not None and window >= seq_len - 1:
        window = None  # the band covers every pair
    if window is None and key_valid is None:
        return None
    api = _flex_api()
    tiles = -(-seq_len // FLEX_BLOCK)
    padded = tiles * FLEX_BLOCK
    valid = torch.ones(1, seq_len, dtype=torch.bool, device=device) if key_valid is None else key_valid.bool()
    valid = F.pad(valid, (0, padded - seq_len))  # [B, P]: False past the end; kernels may read up to P
    rows = torch.arange(padded, device=device) < seq_len  # [P] real query rows
    counts = _visible_keys_per_tile(valid, padded if window is None else window, rows)  # [B, P, tiles]
    empty = (counts.sum(-1) == 0) & rows  # [B, P] rows that see no key -> see every real key
    real_keys = (seq_len - torch.arange(tiles, device=device) * FLEX_BLOCK).clamp(0, FLEX_BLOCK)  # [tiles]
    counts = torch.where(empty[..., None], real_keys, counts)
    per_tile = counts.view(valid.shape[0], tiles, FLEX_BLOCK, tiles).sum(2)  # [B, q tiles, kv tiles]
    mask_mod = _flex_mask_mod(window, None if key_valid is None else valid, empty)
    return _block_mask_from_counts(api, per_tile, mask_mod, seq_len)


def _visible_keys_per_tile(valid: torch.Tensor, window: int, rows: torch.Tensor) -> torch.Tensor:
    """valid [B, P] -> [B, P, P / FLEX_BLOCK]: for each query row, how many valid keys with |q - kv| <= window lie
    in each key tile (prefix-sum differences over the clipped interval; rows outside `rows` count 0)."""
    padded = valid.shape[1]
    prefix = F.pad(valid.long().cumsum(-1), (1, 0))  # [B, P+1]: valid keys before each position
    q = torch.arange(padded, device=valid.device)[:, None]  # [P, 1]
    start = torch.arange(0, padded, FLEX_BLOCK, device=valid.device)[None]  # [1, tiles]
    lo = torch.maximum(start, q - window).clamp(0, padded)
    hi = torch.maximum(torch.minimum(start + FLEX_BLOCK, q + window + 1).clamp(0, padded), lo)  # [P, tiles]
    counts = (prefix[:, hi.flatten()] - prefix[:, lo.flatten()]).view(valid.shape[0], padded, -1)
    return counts * rows[None, :, None]


def _flex_mask_mod(window: Optional[int], valid: Optional[torch.Tensor], empty: torch.Tensor) -> Callable:
    """The element rule of `flex_block_mask` (called by flex only inside partial tiles)."""
    if valid is None:  # a band without padding: no row is empty
        def band(b, h, q, kv):
            return (q - kv).abs() <= window

        return band

    def keep(b, h, q, kv):
        see = valid[b, kv]
        if window is not None:
            see = see & ((q - kv).abs() <= window)
        return see | empty[b, q]

    return keep


def _block_mask_from_counts(api: Any, per_tile: torch.Tensor, mask_mod: Callable, seq_len: int) -> "BlockMask":
    """Visible pairs per tile [B, Tq, Tk] -> BlockMask (partial tiles run mask_mod, full tiles skip it)."""
    full = per_tile == FLEX_BLOCK * FLEX_BLOCK
    partial = (per_tile > 0) & ~full

    def ordered(tiles: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:  # [B, 1, Tq] count, [B, 1, Tq, Tk] ids
        tiles = tiles[:, None]
        ids = torch.argsort(tiles.to(torch.int8), dim=-1, descending=True, stable=True)  # listed tiles first
        return tiles.sum(-1, dtype=torch.int32), ids.to(torch.int32)

    kv_num, kv_ids = ordered(partial)
    full_num, full_ids = ordered(full)
    return api.BlockMask.from_kv_blocks(kv_num, kv_ids, full_num, full_ids, BLOCK_SIZE=FLEX_BLOCK,
                                        mask_mod=mask_mod, seq_lengths=(seq_len, seq_len))


def _flex_kernel(device: torch.device) -> Callable[..., torch.Tensor]:
    """flex_attention to call: on CUDA one module-level `torch.compile` of it (compiled once per process on first use,
    dynamic shapes after the second length, so bucketed lengths do not recompile each time); inside a region that is
    already being compiled (e.g. a compiled DiT layer) the plain function, which that compile fuses; elsewhere (the
    CPU) torch's un-compiled reference path, which materialises the scores and is for correctness, not speed."""
    api = _flex_api()
    if device.type != "cuda" or torch.compiler.is_compiling():
        return api.flex_attention
    global _compiled_flex
    if _compiled_flex is None:
        _compiled_flex = torch.compile(api.flex_attention)
    return _compiled_flex


def flex_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, block_mask: Optional["BlockMask"], scale: float
) -> torch.Tensor:
    """FlexAttention for q [B, Hq, L, D] and un-repeated k, v [B, Hkv, L, D] (GQA inside the kernel).

    Under autocast q, k, v are cast to the autocast dtype first, as autocast does for SDPA (q and k leave the fp32
    RMSNorm in fp32, v does not). torch refuses flex's backward pass on the CPU; the error then says what to use."""
    if block_mask is not None and not isinstance(block_mask, _flex_api().BlockMask):
        raise TypeError("attn_implementation=flex: self-attention takes a BlockMask from layers.flex_block_mask "
                        f"(or None), got {type(block_mask).__name__}; build masks with layers.self_attention_masks")
    if torch.is_autocast_enabled(q.device.type):
        dtype = torch.get_autocast_dtype(q.device.type)
        q, k, v = q.to(dtype), k.to(dtype), v.to(dtype)
    kernel = _flex_kernel(q.device)
    try:
        return kernel(q, k, v, block_mask=block_mask, scale=scale, enable_gqa=q.shape[1] != k.shape[1])
    except NotImplementedError as err:
        if q.device.type != "cpu" or "backward" not in str(err):  # only torch's CPU guard gets the explanation
            raise
        raise NotImplementedError(
            f"model.attn_implementation=flex: torch has no FlexAttention backward pass on the CPU ({err}). Train "
            "with flex on a CUDA GPU; on the CPU use attn_implementation=sdpa (the same masks, dense) or eager"
        ) from err


class Attention(nn.Module):
    """GQA attention with per-head q/k RMSNorm; RoPE only for self-attention (official: none in cross-attn).

    With attn_implementation "flex" only self-attention runs FlexAttention (mask: a BlockMask or None);
    cross-attention keeps SDPA with its dense key-padding mask, since it has no band whose tiles could be skipped.
    """

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
        mask: Mask = None,  # bool, broadcastable to [B, 1, Lq, Lk]; flex self-attention: a BlockMask
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
        impl = self.attn_implementation
        if impl == "flex" and kv is not None:
            impl = "sdpa"  # cross-attention: key padding only (see the class docstring)
        groups = self.num_heads // self.num_kv_heads
        if groups > 1 and impl != "flex":  # kv head j serves query heads j*groups .. j*groups+groups-1
            k = k.repeat_interleave(groups, dim=1)
            v = v.repeat_interleave(groups, dim=1)
        out = attention(q, k, v, mask, self.head_dim**-0.5, impl)  # [B, Hq, Lq, D]
        return self.o_proj(out.transpose(1, 2).reshape(b, lq, self.num_heads * self.head_dim))


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: Mask, scale: float, impl: str) -> torch.Tensor:
    """Scaled dot-product attention; `eager` reproduces the official path (softmax in fp32); `flex` takes a BlockMask
    and k, v with their own (fewer) heads."""
    if impl == "flex":
        return flex_attention(q, k, v, mask, scale)
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

    def forward(self, x: torch.Tensor, rope, mask: Mask) -> torch.Tensor:
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
        impl = self.layers[0].self_attn.attn_implementation if len(self.layers) else self.dims.attn_implementation
        band, full = self_attention_masks(seq_len, self.dims.sliding_window, key_valid, x.device, impl)
        for i, layer in enumerate(self.layers):
            x = layer(x, rope, band if self.dims.layer_is_sliding(i) else full)
        return self.norm(x)


def layer_types(num_layers: int) -> List[str]:
    """The official default `layer_types` (written into / checked against config.json); with
    `use_sliding_window: false` the list stays the same and the band is simply not applied."""
    return ["sliding_attention" if i % 2 == 0 else "full_attention" for i in range(num_layers)]
