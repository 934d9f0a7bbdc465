"""The text encoder's share of one step when its LoRA trains (mode.text_encoder=lora): the transformers Qwen3 text
encoder (train/text_encoder.py) runs on the caption's token ids [B, Lt] under the run's autocast and with autograd
through every layer, since the gradient reaches its LoRA from the condition encoder above it. So each of its layers
keeps what activations.py counts for it until its backward, its weights (frozen dtype) and LoRA (fp32 masters) live
on the device with the trained module, and the batch carries the token ids.

    cost = text_cost(cfg, ts.text, batch=4, text_len=256)   # TextCost: per layer (saved, params, temporaries)
    text_weight_bytes(ts.text, torch.bfloat16)              # its weights on the device

The LoRA's gradients, optimizer states and EMA copy are counted with the rest of the trained module's (the LoRA is
part of `ts.trainable`); its optimizer's parameter groups see the text_encoder.* names.

Attention: transformers' SDPA path calls the kernel with is_causal and enable_gqa when no attention mask is given
(`run_text_encoder` gives none), so the flash kernel keeps q, the output, the un-repeated k, v and the fp32
log-sum-exp (what activations.py counts for flex) and no mask bias. Not modeled: without autocast on a CUDA GPU
(hardware.mixed_precision=no), the flash kernel does not take fp32 and torch may fall back to the math kernel, which
keeps the [B, heads, Lt, Lt] probabilities.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import List, Tuple

import torch

from acestep_ft.config import Config
from acestep_ft.preflight.activations import (
    F32, Shape, layer_temporaries, layer_workspace, norm_cost, text_layer_cost,
)
from acestep_ft.preflight.dtypes import autocast_bytes, autocast_dtype, frozen_dtype
from acestep_ft.preflight.trainset import TextTrain

TOKEN_ID_BYTES = 8  # text_token_ids are int64


@dataclass
class TextCost:
    """The text encoder's share of one step's activations."""

    pieces: List[Tuple[int, int, int]]  # in forward order: (saved bytes, trained params, backward temporaries)
    forward: int  # while it runs forward, besides what it saves: the embeddings, the stream, one layer's working set

    @property
    def saved(self) -> int:
        return sum(p[0] for p in self.pieces)


def text_weight_bytes(tt: TextTrain, frozen: torch.dtype) -> int:
    """The text encoder on the device: its base weights in the frozen dtype, its LoRA in fp32 (never sharded:
    mode.text_encoder=lora runs under ddp only)."""
    return frozen.itemsize * tt.params + F32 * tt.trainable


def text_ids_bytes(batch: int, text_len: int) -> int:
    """The caption token ids [B, Lt] int64 of one batch (what the text encoder runs on)."""
    return TOKEN_ID_BYTES * batch * text_len


def text_shape(cfg: Config, tt: TextTrain, batch: int, text_len: int) -> Shape:
    """The text encoder's stack on B captions of Lt tokens (no condition: L = 0)."""
    a = autocast_bytes(cfg)
    eager = tt.attn_implementation == "eager"
    return Shape(B=batch, N=text_len, L=0, H=tt.hidden, Q=tt.heads * tt.head_dim, V=tt.kv_heads * tt.head_dim,
                 I=tt.intermediate, E=tt.hidden, heads=tt.heads, a=a,
                 frozen_cast=a != F32 and frozen_dtype(cfg) != autocast_dtype(cfg.hardware.mixed_precision),
                 eager=eager, flex=not eager,  # SDPA with enable_gqa (see the module docstring) keeps what flex does
                 window=None)


def text_cost(cfg: Config, tt: TextTrain, batch: int, text_len: int) -> TextCost:
    """What the LoRA'd text encoder keeps for backward and needs while it runs, on `batch` captions of `text_len`
    tokens: the RoPE cos / sin [1, Lt, head_dim] (in the embeddings' dtype, kept by every layer's q and k products),
    each layer from the first one whose input or LoRA needs a gradient (its token embeddings are frozen, so layer
    0's input needs none), and the final norm's fp32 input."""
    s = text_shape(cfg, tt, batch, text_len)
    lora = cfg.mode.text_lora
    stream = frozen_dtype(cfg).itemsize  # the embeddings' dtype, which the residual stream keeps (or promotes to)
    pieces = [(stream * 2 * text_len * tt.head_dim, 0, 0)]
    in_grad = False
    for lt in tt.layers:
        act, cast = text_layer_cost(s, lt, tt.layer_linears, in_grad, lora.rank, lora.dropout > 0)
        in_grad = in_grad or lt.trainable > 0
        pieces.append((act + cast + (s.a * lt.weights if s.a != F32 else 0), lt.trainable,
                       layer_temporaries(s) if in_grad else 0))
    pieces.append((norm_cost(s.M, s.H, s.H, s.a, False, in_grad), 0, 0))
    forward = stream * s.M * s.H + layer_workspace(s, 0)  # + the token embeddings
    return TextCost(pieces, forward)
