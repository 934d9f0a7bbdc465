"""The condition encoder's share of one step (dataset.conditions=encoder_inputs): the sizes of its inputs
(InputLengths), and what its lyric and timbre stacks, text projector and packing save for backward, hold while it
runs and leave alive for the decoder (layer costs from activations.py)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, List, Tuple, Union

from acestep_ft.config import Conditions, Config
from acestep_ft.model.acestep import encoder_dims
from acestep_ft.preflight.activations import (
    F32, Shape, band_mask_bytes, encoder_layer_cost, layer_temporaries, layer_workspace, norm_cost,
)
from acestep_ft.preflight.dtypes import autocast_bytes, autocast_dtype, frozen_dtype
from acestep_ft.preflight.trainset import EncoderTrain, LayerTrain


@dataclass(frozen=True)
class InputLengths:
    """Sizes of a batch of condition-encoder inputs (dataset.conditions=encoder_inputs), each padded to the batch's
    longest. The defaults are the official trainer's: a 256-token caption, 512 lyric tokens
    (preprocess.lyric_max_tokens), one zero timbre reference of one frame (real reference audio: 750 frames)."""

    text: int = 256       # Lt caption tokens (text_hidden_states [B, Lt, D_text])
    lyric: int = 512      # Ll lyric tokens (lyric_token_ids [B, Ll])
    refs: int = 1         # R timbre references per sample (refer_audio_latents [B*R, Tr, 64])
    ref_frames: int = 1   # Tr frames per reference

    @property
    def length(self) -> int:
        """L of the encoder's output, what the decoder attends to: Ll + R + Lt."""
        return self.lyric + self.refs + self.text


Condition = Union[int, InputLengths]
"""What a batch carries for the condition: L tokens of encoder outputs, or the encoder's InputLengths."""


def runs_encoder(cfg: Config) -> bool:
    """The step runs the condition encoder (dataset.conditions=encoder_inputs): encoder and token table on the
    device."""
    return cfg.dataset.conditions == Conditions.encoder_inputs


def condition_lengths(cfg: Config, cond: Condition) -> Condition:
    """`cond`, checked against dataset.conditions: an int L for encoder_outputs, InputLengths for encoder_inputs."""
    wanted = InputLengths if runs_encoder(cfg) else int
    if not isinstance(cond, wanted):
        raise TypeError(f"dataset.conditions={cfg.dataset.conditions} needs the condition as {wanted.__name__}, got "
                        f"{cond!r}" + (" (e.g. InputLengths(text=256, lyric=512, refs=1, ref_frames=1))"
                                       if wanted is InputLengths else " (L, the condition length)"))
    return cond


@dataclass
class _EncoderCost:
    """The condition encoder's share of one step."""

    pieces: List[Tuple[int, int, int]]  # in forward order: (saved bytes, trained params, backward temporaries)
    forward: int  # peak while it runs forward: what it has saved so far, its inputs, outputs, the running stack's
    # working set (building its band mask, or the kept mask and one layer's)
    output: int  # kept through the decoder's forward: the output [B,L,E], its CFG-dropped copy, the fp32 mask

    @property
    def saved(self) -> int:
        return sum(p[0] for p in self.pieces)


def _stack_cost(s: Shape, layers: List[LayerTrain], lin: Dict[str, Tuple[int, int]], embed_in: int,
                embed_trained: int, norm_trained: int, bias_rows: List[int],
                key_rows: int) -> Tuple[List[Tuple[int, int, int]], int, int]:
    """(pieces, mask build, layer workspace) of one encoder stack on s.M rows: embed_tokens (Linear from embed_in,
    keeps its a-cast input when it trains) -> layers -> norm. bias_rows: the mask bias rows of each layer; key_rows:
    rows of its key-padding mask (0: none). mask build: building its band mask beside the embedded stream [M, H],
    before its layers save anything (16 * N^2 bytes: at short widths and long references the timbre stack's peak);
    layer workspace: the kept mask and one layer's working set, beside what its layers save."""
    pieces = [(s.a * s.M * embed_in if embed_trained else 0, embed_trained, 0)]
    in_grad = embed_trained > 0
    for lt, rows in zip(layers, bias_rows):
        act, cast = encoder_layer_cost(s, lt, lin, in_grad, rows)
        in_grad = in_grad or lt.trainable > 0
        pieces.append((act + cast + (s.a * lt.weights if s.a != F32 else 0), lt.trainable,
                       layer_temporaries(s) if in_grad else 0))
    pieces.append((norm_cost(s.M, s.H, s.H, s.a, norm_trained > 0, in_grad), norm_trained, 0))
    build, kept = band_mask_bytes(s, key_rows)
    layer_ws = max((layer_workspace(s, rows) for rows in bias_rows), default=0)
    return pieces, build + s.a * s.M * s.H if build else 0, kept + layer_ws


def _forward_peak(text_saved: int, stacks: List[Tuple[List[Tuple[int, int, int]], int, int]], total_saved: int) -> int:
    """Highest of what the encoder's stacks (run in order after the text_projector) have saved so far plus the
    running stack's mask build (before its own layers save anything) or layer workspace (after, an upper bound),
    and of everything saved once it returns."""
    before, peak = text_saved, total_saved
    for pieces, build, layer_ws in stacks:
        own = sum(p[0] for p in pieces)
        peak = max(peak, before + build, before + own + layer_ws)
        before += own
    return peak


def encoder_cost(cfg: Config, es: EncoderTrain, batch: int, lengths: InputLengths, world_size: int = 1,
                 text_grad: bool = False) -> _EncoderCost:
    """The condition encoder on a batch of `lengths`: text_projector on [B*Lt, D_text], the lyric stack on [B*Ll]
    rows (its sliding layers combine band and key padding into an a-bias [B, Ll, Ll]; the full ones only mask keys,
    [B, 1, Ll]), the timbre stack on [B*R*Tr] rows (a band bias [1, Tr, Tr] on its sliding layers), packed into
    [B, L, E]. Frozen parts keep nothing (a frozen encoder runs without autograd); its output is fp32 unless the
    autocast dtype reaches it (frozen weights in that dtype, final norms frozen).

    text_grad: the caption states need a gradient (mode.text_encoder=lora computes them in the step), so the encoder
    runs with autograd even where it is frozen: the caption's path keeps the frozen text_projector's a-cast weight
    (under autocast, frozen weights in another dtype) and the packing's second gather its input [B, L, E]; the lyric
    and timbre stacks, whose inputs need no gradient, keep nothing more."""
    m, d = cfg.model, encoder_dims(cfg.model)
    a, frozen = autocast_bytes(cfg), frozen_dtype(cfg, world_size)
    frozen_cast = a != F32 and frozen != autocast_dtype(cfg.hardware.mixed_precision)

    def shape(rows: int, tokens: int) -> Shape:
        return Shape(B=rows, N=tokens, L=0, H=d.hidden_size, Q=d.num_heads * d.head_dim,
                     V=d.num_kv_heads * d.head_dim, I=d.intermediate_size, E=d.hidden_size, heads=d.num_heads,
                     a=a, frozen_cast=frozen_cast,
                     eager=d.attn_implementation == "eager", flex=d.attn_implementation == "flex",
                     window=d.sliding_window)

    parts, lin = es.parts, es.layer_linears
    lyric = _stack_cost(shape(batch, lengths.lyric), es.lyric, lin, m.text_hidden_dim,
                        parts["lyric_encoder.embed_tokens"], parts["lyric_encoder.norm"],
                        [batch * d.layer_is_sliding(i) for i in range(len(es.lyric))], batch)
    timbre = _stack_cost(shape(batch * lengths.refs, lengths.ref_frames + int(m.timbre_special_token)),
                         es.timbre, lin, m.timbre_hidden_dim, parts["timbre_encoder.embed_tokens"],
                         parts["timbre_encoder.norm"], [int(d.layer_is_sliding(i)) for i in range(len(es.timbre))], 0)
    projector_cast = a * m.text_hidden_dim * d.hidden_size if text_grad and frozen_cast else 0
    text = (a * batch * lengths.text * m.text_hidden_dim if parts["text_projector"] else projector_cast,
            parts["text_projector"], 0)
    narrow = a != F32 and not frozen_cast and not parts["lyric_encoder.norm"] and not parts["timbre_encoder.norm"]
    out = (a if narrow else F32) * batch * lengths.length * d.hidden_size
    # packing valid tokens first gathers from cat([lyric, timbre]) and then cat([that, text]): gather keeps its input
    gathered = (lengths.lyric + lengths.refs + lengths.length if es.trainable else
                lengths.length if text_grad else 0)
    pack = (a if narrow else F32) * batch * gathered * d.hidden_size
    inputs = frozen.itemsize * batch * (lengths.lyric + lengths.text) * m.text_hidden_dim  # lyric embedding, caption
    pieces = [text, *lyric[0], *timbre[0], (pack, 0, 0)]
    peak = _forward_peak(text[0], [lyric, timbre], sum(p[0] for p in pieces))
    return _EncoderCost(pieces, inputs + 3 * out + peak, 2 * out + F32 * batch * lengths.length)
