"""What trains, decided on the meta model (no weights, no memory) and cached per (model, mode) config: per DiT
layer and condition-encoder layer which Linears train (plain, LoRA, DoRA, LoKr / LoHa) or stay frozen, which norms
and adaLN tables train, and the parameter counts the estimate's weight, gradient and optimizer terms need; with
mode.text_encoder=lora also the text encoder's (its LoRA'd Qwen3 layers, built from its config.json on the meta
device).

    ts = train_set(cfg)          # TrainSet: ts.layers[i].linears["self_attn.q_proj"] -> "lora", ts.trainable, ...
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Tuple

from torch import nn

from acestep_ft.config import AdapterMode, Config
from acestep_ft.model.variants import build_meta_model
from acestep_ft.train.adapters import is_adapter_tensor
from acestep_ft.train.text_encoder import meta_text_model, trains_text_encoder
from acestep_ft.train.trainable import DecoderAndEncoder, make_trainable, parts_of


@dataclass
class LayerTrain:
    """Which parts of one DiT layer train. linears: name -> "train" | "lora" | "dora" | "kron" (LoKr / LoHa) |
    "frozen"."""

    linears: Dict[str, str]
    norms: bool  # RMSNorm weights (self_attn_norm, q_norm, ...) train
    table: bool  # the adaLN scale_shift_table trains
    params: int  # every parameter of the layer, adapters included
    trainable: int
    weights: int  # trainable Linear weights (what autocast caches a copy of)


@dataclass
class EncoderTrain:
    """Which parts of the condition encoder train (a full fine-tune's condition_encoder stages); all frozen else."""

    params: int  # every condition-encoder parameter
    trainable: int
    lyric: List[LayerTrain]  # lyric_encoder.layers.*
    timbre: List[LayerTrain]  # timbre_encoder.layers.*
    parts: Dict[str, int]  # trained params of text_projector, {lyric,timbre}_encoder.{embed_tokens,norm}
    layer_linears: Dict[str, Tuple[int, int]]  # name in a layer -> (in, out)


@dataclass
class TextTrain:
    """The text encoder with its LoRA (mode.text_encoder=lora): a transformers Qwen3Model, sizes from its config."""

    params: int  # base parameters (token embeddings, layers, final norm), without the LoRA
    trainable: int  # LoRA parameters (all of what trains in it)
    layers: List[LayerTrain]  # layers.*: which Linears carry a LoRA ("lora") or stay frozen
    layer_linears: Dict[str, Tuple[int, int]]  # name in a layer -> (in, out)
    hidden: int  # D_text
    heads: int
    kv_heads: int
    head_dim: int
    intermediate: int
    attn_implementation: str  # "sdpa" (transformers' default) or "eager"


@dataclass
class TrainSet:
    decoder_params: int  # adapters included
    trainable: int  # everything the optimizer steps: decoder, condition encoder, text encoder LoRA
    tensors: List[Tuple[str, Tuple[int, ...]]]  # trainable (name as the optimizer sees it, shape)
    layers: List[LayerTrain]
    head: Dict[str, bool]  # proj_in, condition_embedder, time_embed, tail (norm_out/proj_out/table) train
    head_weights: int  # trainable Linear/Conv weights outside the layers
    head_trainable: int
    tail_trainable: int
    encoder: EncoderTrain
    layer_linears: Dict[str, Tuple[int, int]] = field(default_factory=dict)  # name -> (in, out)
    text: Optional[TextTrain] = None  # mode.text_encoder=lora


PEFT_PREFIX = "base_model.model."  # what PEFT puts before the names of the module it wraps


_TRAIN_SETS: Dict[Tuple[str, str], TrainSet] = {}  # (repr(model cfg), repr(mode cfg)) -> TrainSet
ENCODER_PARTS = ("text_projector", "lyric_encoder.embed_tokens", "lyric_encoder.norm", "timbre_encoder.embed_tokens",
                 "timbre_encoder.norm")


def _numel(shape) -> int:
    return math.prod(shape)


def _layer_train(module: nn.Module, pre: str, plain: set, adapters: Dict[str, Tuple[int, ...]],
                 adapted: Dict[str, str]) -> LayerTrain:
    """What trains in the layer of `module` whose names start with `pre`; names relative to `module`: `plain` the
    trained non-adapter tensors, `adapters` the adapter tensors, `adapted` Linear -> adapter kind."""
    names = {n: tuple(p.shape) for n, p in module.named_parameters() if n.startswith(pre)}
    linears = [n for n, m in module.named_modules() if isinstance(m, nn.Linear) and n.startswith(pre)]
    extra = sum(_numel(s) for n, s in adapters.items() if n.startswith(pre))
    return LayerTrain(
        linears={n[len(pre):]: adapted.get(n, "train" if n + ".weight" in plain else "frozen") for n in linears},
        norms=any(n in plain for n in names if "norm" in n),
        table=pre + "scale_shift_table" in plain,
        params=sum(_numel(s) for s in names.values()) + extra,
        trainable=sum(_numel(s) for n, s in names.items() if n in plain) + extra,
        weights=sum(_numel(names[n + ".weight"]) for n in linears if n + ".weight" in plain) + extra)


def _linear_shapes(module: nn.Module, pre: str) -> Dict[str, Tuple[int, int]]:
    return {n[len(pre):]: (m.in_features, m.out_features) for n, m in module.named_modules()
            if isinstance(m, nn.Linear) and n.startswith(pre)}


def _encoder_train(encoder: nn.Module, trained: Dict[str, Tuple[int, ...]]) -> EncoderTrain:
    """`trained`: the encoder's trained tensors, names relative to it."""
    plain = set(trained)
    stacks = {name: [_layer_train(encoder, f"{name}.layers.{i}.", plain, {}, {})
                     for i in range(len(encoder.get_submodule(name).layers))]
              for name in ("lyric_encoder", "timbre_encoder")}
    return EncoderTrain(
        params=sum(p.numel() for p in encoder.parameters()), trainable=sum(_numel(s) for s in trained.values()),
        lyric=stacks["lyric_encoder"], timbre=stacks["timbre_encoder"],
        parts={part: sum(_numel(s) for n, s in trained.items() if n.startswith(part + ".")) for part in ENCODER_PARTS},
        layer_linears=_linear_shapes(encoder, "lyric_encoder.layers.0."))


def _split_trained(trained_module: nn.Module, trained: Dict[str, Tuple[int, ...]]) -> Tuple[Dict, Dict, Dict]:
    """(decoder-relative, encoder-relative, text-encoder-relative) names of the trained tensors of `make_trainable`'s
    module: the PEFT-wrapped decoder (base_model.model.*), the decoder itself, or `DecoderAndEncoder` (decoder.*,
    encoder.*, text_encoder.*; its decoder and text encoder PEFT-wrapped where adapters train)."""
    if not isinstance(trained_module, DecoderAndEncoder):
        return {n.removeprefix(PEFT_PREFIX): s for n, s in trained.items()}, {}, {}
    return tuple({n.removeprefix(prefix).removeprefix(PEFT_PREFIX): s for n, s in trained.items()
                  if n.startswith(prefix)} for prefix in ("decoder.", "encoder.", "text_encoder."))


def _adapter_kinds(wrapped: nn.Module) -> Dict[str, str]:
    """Linear name (relative to the module PEFT wrapped) -> its adapter kind: "lora", "dora" or "kron" (LoKr /
    LoHa)."""
    from peft.tuners.lora import LoraLayer
    from peft.tuners.lycoris_utils import LycorisLayer

    kinds: Dict[str, str] = {}
    for n, m in wrapped.named_modules():
        if isinstance(m, LoraLayer):
            kinds[n.removeprefix(PEFT_PREFIX)] = "dora" if m.use_dora["default"] else "lora"
        elif isinstance(m, LycorisLayer):
            kinds[n.removeprefix(PEFT_PREFIX)] = "kron"
    return kinds


def _text_train(model_cfg, wrapped: nn.Module, trained: Dict[str, Tuple[int, ...]]) -> TextTrain:
    """`wrapped`: the PEFT-wrapped text encoder of the trained module; `trained`: its LoRA tensors, names relative to
    the text encoder."""
    text = meta_text_model(model_cfg)  # unwrapped: the names and Linears before PEFT
    kinds = _adapter_kinds(wrapped)
    c = text.config
    return TextTrain(
        params=sum(p.numel() for p in text.parameters()), trainable=sum(_numel(s) for s in trained.values()),
        layers=[_layer_train(text, f"layers.{i}.", set(), trained, kinds) for i in range(len(text.layers))],
        layer_linears=_linear_shapes(text, "layers.0."), hidden=c.hidden_size, heads=c.num_attention_heads,
        kv_heads=c.num_key_value_heads, head_dim=c.head_dim, intermediate=c.intermediate_size,
        attn_implementation=str(c._attn_implementation))


def _train_set(model_cfg, mode_cfg) -> TrainSet:
    decoder = build_meta_model(model_cfg).decoder  # unwrapped: the names and Linears before PEFT
    names = {n: tuple(p.shape) for n, p in decoder.named_parameters()}
    model = build_meta_model(model_cfg)
    text = meta_text_model(model_cfg) if trains_text_encoder(mode_cfg) else None
    wrapped = make_trainable(model, mode_cfg, text)  # PEFT itself decides the adapter tensors (meta device: no memory)
    trained = {n: tuple(p.shape) for n, p in wrapped.named_parameters() if p.requires_grad}
    parts = dict(parts_of(wrapped))
    adapted = _adapter_kinds(parts["decoder."]) if isinstance(mode_cfg, AdapterMode) else {}
    in_decoder, in_encoder, in_text = _split_trained(wrapped, trained)
    plain = {n for n in in_decoder if not is_adapter_tensor(n)}
    adapters = {n: s for n, s in in_decoder.items() if is_adapter_tensor(n)}
    layers = [_layer_train(decoder, f"layers.{i}.", plain, adapters, adapted) for i in range(len(decoder.layers))]
    head_names = {"proj_in": ("proj_in.",), "condition_embedder": ("condition_embedder.",),
                  "time_embed": ("time_embed.", "time_embed_r."),
                  "tail": ("norm_out.", "proj_out.", "scale_shift_table")}
    head = {k: any(n in plain and n.startswith(p) for n in names for p in ps) for k, ps in head_names.items()}
    conv_or_linear = [n for n in plain if not n.startswith("layers.") and n.endswith(".weight") and "norm" not in n]
    return TrainSet(
        decoder_params=sum(_numel(s) for s in names.values()) + sum(_numel(s) for s in adapters.values()),
        trainable=sum(_numel(s) for s in trained.values()),
        tensors=list(trained.items()),
        layers=layers,
        head=head,
        head_weights=sum(_numel(names[n]) for n in conv_or_linear),
        head_trainable=sum(_numel(names[n]) for n in plain if n.startswith(("proj_in", "condition_embedder",
                                                                            "time_embed"))),
        tail_trainable=sum(_numel(names[n]) for n in plain if n.startswith(("norm_out", "proj_out",
                                                                            "scale_shift_table"))),
        encoder=_encoder_train(model.encoder, in_encoder),
        layer_linears=_linear_shapes(decoder, "layers.0."),
        text=_text_train(model_cfg, parts["text_encoder."], in_text) if text is not None else None,
    )


def train_set(cfg: Config) -> TrainSet:
    """Trainable tensors of `cfg.mode` on `cfg.model` (meta device; cached)."""
    key = (repr(cfg.model), repr(cfg.mode))
    if key not in _TRAIN_SETS:
        _TRAIN_SETS[key] = _train_set(cfg.model, cfg.mode)
    return _TRAIN_SETS[key]
