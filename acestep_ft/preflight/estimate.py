"""Peak device memory of one training step, estimated from the config alone (no weights, no GPU, ~ms per call).

    from acestep_ft.preflight.estimate import estimate_memory
    est = estimate_memory(cfg, batch=4, frames=6000, cond_len=769)   # one device
    print(est.table()); est.total                                    # bytes

What one step holds on the device (run.py / train/loop.py): the decoder (PEFT-wrapped for LoRA; the
condition encoder, tokenizer and detokenizer stay in host RAM), the float32 batch, the optimizer state, the EMA
copy, and, during the step, autocast weight copies, saved activations, gradients and the optimizer's
temporaries. Those last ones do not all peak together, so the estimate walks the step and keeps the highest point:

    total = resident + max(forward/backward high-water mark, optimizer-step high-water mark)

Symbols: B batch, T padded frames, N = ceil(T / patch) tokens, L condition length, M = B*N and K = B*L rows,
H hidden, Q = heads*head_dim, V = kv_heads*head_dim, I intermediate, E condition width, C latent channels,
a = bytes of the autocast dtype (2 for bf16/fp16, 4 without autocast), f = 4 (fp32).

Resident (the whole step)
- weights           4 * trained params + bytes of model.frozen_dtype * frozen decoder params (auto: bf16 on a CUDA GPU
                    with autocast, fp32 on the CPU and under multi-process FSDP); FSDP: / world, ZeRO-3: / world.
- optimizer states  AdamW: 8 * trainable; AdamW8bit: 2 bytes + 2 fp32 absmax per 256 values for tensors of
                    >= 4096 values, 8 bytes for smaller ones; Adafactor: 4 * (rows + cols) per matrix (rows = all
                    dims but the last), 4 * n per vector, + 4 * n with beta1, + a 4-byte RMS per tensor;
                    Prodigy: 16 * n (exp_avg, exp_avg_sq, s, p0; s and p0 / slice_p; 12 * n with beta1 = 0; p0 is
                    one value for a tensor that starts at zero, LoRA B: counted in full, an upper bound);
                    schedule-free AdamW: 8 * n (z, exp_avg_sq), SGD: 4 * n (z); SGD: 4 * n with momentum, else 0;
                    unknown: 8 * n (stated).
                    ZeRO >= 1 and FSDP: / world; offload: 0 on the device.
- EMA               4 * trainable (0 with train.ema.on_cpu); sharded like the weights under FSDP.
- batches           4 * (B*T*(C + C_ctx + 1) + B*L*(E + 1)) per batch; 4 batches with device prefetch (the one in
                    use, a queue of 2, one held by the worker), else 1.
- DDP buckets       none: the run sets gradient_as_bucket_view, so gradients are views into DDP's buckets.

Forward/backward high-water mark (walked layer by layer; adapter/full/unfreeze decided per tensor on the meta model)
- saved activations per DiT layer: what autograd keeps, enumerated op by op in `_LayerCost` (RMSNorm keeps its
  fp32 input, the normalized a-copy when its weight trains, the fp32 modulated value when adaLN trains; each
  Linear keeps its input when its weight trains (Linears reading the same row-major input share one copy; the
  decoder makes the residual stream row-major after proj_in's Conv1d); SDPA keeps q, k, v,
  out (a*M*Q each side) and a bias a*N^2 on sliding layers; flex (self-attention) keeps q, out and the un-repeated
  k, v (a*M*V each), no bias, its o_proj input taken as a view as for SDPA (not yet measured on a CUDA GPU); eager
  keeps q, k, v, fp32 and a-probabilities (f + a) * B*heads*N*Nk; SwiGLU keeps 4 * a*M*I; LoRA keeps its dropout copy a*M*in, mask 1*M*in and a*M*r
  (DoRA also the base and adapter outputs, 2a*M*out); LoKr / LoHa keep their own input copy a*M*in and the
  materialized a-cast update a*out*in; a frozen Linear whose input needs a gradient keeps its a-cast weight under
  autocast, unless the frozen weights already are in the autocast dtype).
- checkpointed layers keep only their input (a*M*H); in the backward pass one layer at a time is recomputed.
- autocast weight cache: a * trainable Linear/Conv weights, alive until the forward returns (checkpointed layers
  drop theirs then; the others keep them as saved tensors until their backward).
- gradients grow layer by layer as the backward pass walks down (4 * trainable of the layers done), while
  the activations of those layers are freed; the backward of one layer also holds its stream gradients
  (2*a + f) * M*H and SwiGLU gradients 3 * a*M*I.
- head/tail: x_t, noise, fp32 condition, proj_in / condition_embedder inputs, norm_out, proj_out, fp32 output
  and the MSE's saved pred and target.

Optimizer-step high-water mark: all gradients (4 * trainable; ZeRO-2/3 and FSDP: / world) + the optimizer's
temporaries (torch AdamW and schedule-free with foreach, as on a CUDA GPU: one fp32 sqrt buffer the size of the
largest parameter group; Adafactor: two fp32 buffers the size of the largest tensor; Prodigy: one; 8-bit and fused
kernels: none).

Tested against `trace.py` (a real step under FakeTensorMode + MemTracker) in tests/unit/test_preflight_estimate.py
and against torch.cuda.max_memory_allocated in tests/test_preflight_gpu.py.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from typing import Dict, List, Tuple

import torch
from torch import nn

from acestep_ft.config import AdapterMode, Config, FullMode, LoraMode, MixedPrecision, resolve_frozen_dtype
from acestep_ft.model.decoder import checkpointed_layers
from acestep_ft.model.variants import build_meta_model
from acestep_ft.train.optim import takes_weight_decay
from acestep_ft.train.adapters import is_adapter_tensor
from acestep_ft.train.trainable import make_trainable, unfreeze_starts

GIB = 2**30
PREFETCH_BATCHES = 4  # hardware.device_prefetch on a CUDA GPU: in use + queue of 2 + one held by the worker
BNB_MIN_8BIT = 4096  # bitsandbytes keeps tensors smaller than min_8bit_size in fp32
BNB_BLOCK = 256  # bitsandbytes blockwise quantization: one fp32 absmax per block, per state

ATTN = ("q_proj", "k_proj", "v_proj", "o_proj")
MLP = ("gate_proj", "up_proj", "down_proj")


@dataclass
class Term:
    """One line of the estimate: what it is, its bytes, and how they were computed."""

    name: str
    bytes: int
    detail: str


@dataclass
class MemoryEstimate:
    terms: List[Term]  # every term, printed by the gate; no hidden constants

    @property
    def total(self) -> int:
        return sum(t.bytes for t in self.terms)

    def table(self) -> str:
        """Aligned text table: term, size (GiB, or MiB when the total is under 1 GiB), detail; then the total."""
        unit, scale = ("GiB", GIB) if self.total >= GIB else ("MiB", 2**20)
        rows = [(t.name, f"{t.bytes / scale:.2f}", t.detail) for t in self.terms]
        rows.append(("total", f"{self.total / scale:.2f}", "peak device memory of one training step (estimate)"))
        w0 = max(len(r[0]) for r in rows)
        w1 = max(len(r[1]) for r in rows)
        lines = [f"{'term':<{w0}}  {unit:>{w1}}  detail"]
        for i, (name, gib, detail) in enumerate(rows):
            if i == len(rows) - 1:
                lines.append("-" * (w0 + w1 + 10))
            lines.append(f"{name:<{w0}}  {gib:>{w1}}  {detail}")
        return "\n".join(lines)


# ---------------------------------------------------------------------------------------------------------------
# What trains: decided on the meta model, cached per (model, mode) config.


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
class TrainSet:
    decoder_params: int  # adapters included
    trainable: int
    tensors: List[Tuple[str, Tuple[int, ...]]]  # trainable (name, shape)
    layers: List[LayerTrain]
    head: Dict[str, bool]  # proj_in, condition_embedder, time_embed, tail (norm_out/proj_out/table) train
    head_weights: int  # trainable Linear/Conv weights outside the layers
    head_trainable: int
    tail_trainable: int
    layer_linears: Dict[str, Tuple[int, int]] = field(default_factory=dict)  # name -> (in, out)


_TRAIN_SETS: Dict[Tuple[str, str], TrainSet] = {}  # (repr(model cfg), repr(mode cfg)) -> TrainSet


def _train_set(model_cfg, mode_cfg) -> TrainSet:
    decoder = build_meta_model(model_cfg).decoder
    names = {n: tuple(p.shape) for n, p in decoder.named_parameters()}
    linears = {n: m for n, m in decoder.named_modules() if isinstance(m, nn.Linear)}
    trained: Dict[str, Tuple[int, ...]] = {}
    adapted: Dict[str, str] = {}  # Linear name -> its adapter kind
    match mode_cfg:
        case AdapterMode():  # PEFT itself decides the tensors (on the meta device: no memory)
            from peft.tuners.lora import LoraLayer
            from peft.tuners.lycoris_utils import LycorisLayer

            wrapped = make_trainable(build_meta_model(model_cfg), mode_cfg)
            trained = {n: tuple(p.shape) for n, p in wrapped.named_parameters() if p.requires_grad}
            for n, m in wrapped.named_modules():
                if isinstance(m, LoraLayer):
                    adapted[n.removeprefix("base_model.model.")] = "dora" if m.use_dora["default"] else "lora"
                elif isinstance(m, LycorisLayer):
                    adapted[n.removeprefix("base_model.model.")] = "kron"
        case FullMode():
            chosen = names if not mode_cfg.unfreeze else unfreeze_starts(decoder, mode_cfg.unfreeze, 1)
            trained = {n: names[n] for n in names if n in chosen}
        case _:
            raise TypeError(f"unknown mode config {type(mode_cfg).__name__}")
    plain = {n for n in trained if not is_adapter_tensor(n)}

    def numel(shape) -> int:
        return math.prod(shape)

    layers = []
    for i in range(len(decoder.layers)):
        pre = f"layers.{i}."
        kinds = {}
        for n, m in linears.items():
            if n.startswith(pre):
                rel = n[len(pre):]
                kinds[rel] = adapted.get(n, "train" if n + ".weight" in plain else "frozen")
        own = [n for n in names if n.startswith(pre)]
        lora_numel = sum(numel(s) for n, s in trained.items() if f".{pre}" in n and is_adapter_tensor(n))
        layers.append(LayerTrain(
            linears=kinds,
            norms=any(n in plain for n in own if "norm" in n),
            table=pre + "scale_shift_table" in plain,
            params=sum(numel(names[n]) for n in own) + lora_numel,
            trainable=sum(numel(names[n]) for n in own if n in plain) + lora_numel,
            weights=sum(numel(names[n]) for n in own if n in plain and n[:-len(".weight")] in linears)
            + lora_numel))
    head_names = {"proj_in": ("proj_in.",), "condition_embedder": ("condition_embedder.",),
                  "time_embed": ("time_embed.", "time_embed_r."),
                  "tail": ("norm_out.", "proj_out.", "scale_shift_table")}
    head = {k: any(n in plain and n.startswith(p) for n in names for p in ps) for k, ps in head_names.items()}
    conv_or_linear = [n for n in plain if not n.startswith("layers.") and n.endswith(".weight") and "norm" not in n]
    lora_all = sum(numel(s) for n, s in trained.items() if is_adapter_tensor(n))
    return TrainSet(
        decoder_params=sum(numel(s) for s in names.values()) + lora_all,
        trainable=sum(numel(s) for s in trained.values()),
        tensors=list(trained.items()),
        layers=layers,
        head=head,
        head_weights=sum(numel(names[n]) for n in conv_or_linear if not n.startswith(("norm_out", "proj_out")))
        + sum(numel(names[n]) for n in conv_or_linear if n.startswith("proj_out")),
        head_trainable=sum(numel(names[n]) for n in plain if n.startswith(("proj_in", "condition_embedder",
                                                                          "time_embed"))),
        tail_trainable=sum(numel(names[n]) for n in plain if n.startswith(("norm_out", "proj_out",
                                                                          "scale_shift_table"))),
        layer_linears={n[len("layers.0."):]: (m.in_features, m.out_features)
                       for n, m in linears.items() if n.startswith("layers.0.")},
    )


def train_set(cfg: Config) -> TrainSet:
    """Trainable tensors of `cfg.mode` on `cfg.model` (meta device; cached)."""
    key = (repr(cfg.model), repr(cfg.mode))
    if key not in _TRAIN_SETS:
        _TRAIN_SETS[key] = _train_set(cfg.model, cfg.mode)
    return _TRAIN_SETS[key]


# ---------------------------------------------------------------------------------------------------------------
# Optimizer


def _optimizer_kind(cfg: Config) -> str:
    target = cfg.optim.target
    name = target.rsplit(".", 1)[-1].lower()
    if "8bit" in name and "adam" in name:
        return "adamw8bit"
    if name in ("adamw", "adam"):
        return "adamw"
    if name == "adafactor":
        return "adafactor"
    if name == "prodigy":
        return "prodigy"
    if name.endswith("schedulefree"):  # AdamWScheduleFree, RAdamScheduleFree, SGDScheduleFree
        return "sgd_schedulefree" if name.startswith("sgd") else "schedulefree"
    if name == "sgd":
        return "sgd"
    return "unknown:" + target


def _group_sizes(cfg: Config, ts: TrainSet) -> List[int]:
    """numel of each torch parameter group (same rule as train/optim.py param_groups)."""
    compiled = [re.compile(g.pattern) for g in cfg.optim.param_groups]
    sizes: Dict[tuple, int] = {}
    for name, shape in ts.tensors:
        rel = name
        index = next((i for i, rx in enumerate(compiled) if rx.search(rel)), len(compiled))
        decays = cfg.optim.decay_all or takes_weight_decay(name, torch.empty(shape, device="meta"))
        sizes[(index, decays)] = sizes.get((index, decays), 0) + math.prod(shape)
    return list(sizes.values())


def optimizer_terms(cfg: Config, ts: TrainSet) -> Tuple[int, str, int, str]:
    """(state bytes, detail, step temporaries bytes, detail) for one unsharded device."""
    kind = _optimizer_kind(cfg)
    opts = {k: v for k, v in dict(cfg.optim.optimizer).items() if k != "_target_"}
    n = ts.trainable
    if kind == "adamw":
        temp = 4 * max(_group_sizes(cfg, ts) or [0])
        fused = bool(opts.get("fused"))
        if opts.get("foreach") is False or fused:
            temp = 4 * max((math.prod(s) for _, s in ts.tensors), default=0)
            temp = 0 if fused else temp
        return (8 * n, f"AdamW: 2 x fp32 per trainable param, {n:.3g} params",
                temp, "foreach AdamW: one fp32 sqrt(v) buffer per parameter group (the largest)")
    if kind == "adamw8bit":
        min_size = int(opts.get("min_8bit_size", BNB_MIN_8BIT))
        big = [math.prod(s) for _, s in ts.tensors if math.prod(s) >= min_size]
        small = n - sum(big)
        absmax = sum(2 * 4 * math.ceil(k / BNB_BLOCK) for k in big)
        return (2 * sum(big) + absmax + 8 * small,
                f"AdamW8bit: 2 x uint8 + fp32 absmax per {BNB_BLOCK} for {sum(big):.3g} params in tensors >= "
                f"{min_size}, 2 x fp32 for {small:.3g}", 0, "bitsandbytes updates each tensor in place")
    if kind == "adafactor":  # transformers.optimization.Adafactor; a tensor of 2+ dims is factored
        beta1 = opts.get("beta1") is not None
        state = 0
        for _, s in ts.tensors:
            k = math.prod(s)
            second = 4 * (math.prod(s[:-1]) + math.prod(s[:-2]) * s[-1]) if len(s) >= 2 else 4 * k
            state += second + (4 * k if beta1 else 0) + 4  # + the RMS of the tensor, a 0-dim fp32 tensor
        big = max((math.prod(s) for _, s in ts.tensors), default=0)
        return (state, "Adafactor: fp32 row + column factors per matrix, full fp32 second moment per vector"
                + (", fp32 first moment" if beta1 else ""), 8 * big,
                "two fp32 buffers the size of the largest tensor (squared gradient, factored update)")
    if kind == "prodigy":  # prodigyopt.Prodigy: exp_avg (beta1 > 0), exp_avg_sq, s and p0 (every slice_p-th value)
        slice_p = int(opts.get("slice_p", 1))
        moments = 2 if float(list(opts.get("betas", (0.9, 0.999)))[0]) > 0 else 1
        state = sum(4 * moments * math.prod(s) + 2 * 4 * math.ceil(math.prod(s) / slice_p) for _, s in ts.tensors)
        big = max((math.prod(s) for _, s in ts.tensors), default=0)
        return (state, f"Prodigy: {moments} fp32 moment(s) + fp32 s and p0 (every {slice_p}. value) per param, "
                f"{n:.3g} params (p0 of a tensor that starts at zero, LoRA B, is one value: at most this)",
                4 * big, "one fp32 buffer the size of the largest tensor (sqrt(v), p0 - p)")
    if kind == "sgd_schedulefree":  # schedulefree.SGDScheduleFree: z; it updates in place
        return 4 * n, f"schedule-free SGD: fp32 z per trainable param, {n:.3g} params", 0, "none (in place)"
    if kind == "schedulefree":  # schedulefree.AdamWScheduleFree / RAdamScheduleFree: z and exp_avg_sq
        if opts.get("foreach", True) is False:
            temp, where = 4 * max((math.prod(s) for _, s in ts.tensors), default=0), "the largest tensor"
        else:
            temp, where = 4 * max(_group_sizes(cfg, ts) or [0]), "the largest parameter group (foreach)"
        return (8 * n, f"schedule-free AdamW: 2 x fp32 per trainable param (z, exp_avg_sq), {n:.3g} params",
                temp, f"one fp32 sqrt(v) buffer the size of {where}")
    if kind == "sgd":
        momentum = float(opts.get("momentum", 0) or 0) > 0
        return (4 * n if momentum else 0, "SGD: fp32 momentum buffer" if momentum else "SGD without momentum: none",
                0, "none")
    return (8 * n, f"unknown optimizer {kind[8:]!r}: assumed 2 x fp32 per trainable param (conservative)",
            4 * max(_group_sizes(cfg, ts) or [0]), "assumed one fp32 buffer per parameter group")


# ---------------------------------------------------------------------------------------------------------------
# Activations


@dataclass
class _Shape:
    B: int
    N: int
    L: int
    H: int
    Q: int
    V: int
    I: int  # noqa: E741
    E: int
    heads: int
    a: int  # bytes of the autocast dtype
    frozen_cast: bool  # frozen weights get an autocast copy (autocast on, frozen dtype is not the autocast dtype)
    eager: bool
    flex: bool  # self-attention through FlexAttention (cross-attention stays SDPA)
    window: int | None

    @property
    def M(self) -> int:
        return self.B * self.N

    @property
    def K(self) -> int:
        return self.B * self.L


F32 = 4


def _norm(rows: int, width: int, norm_dim: int, a: int, trains: bool, in_grad: bool) -> int:
    """RMSNorm over `norm_dim`: pow keeps the fp32 input and rsqrt keeps its output when the input needs a gradient;
    `weight * normed` keeps the normalized a-copy when the weight trains."""
    kept = F32 * rows * (width + width // norm_dim) if in_grad else 0
    return kept + (a * rows * width if trains else 0)


def _attention(s: _Shape, rows: int, keys: int, q_len: int, k_len: int, bias_rows: int, flex: bool = False) -> int:
    """What the attention kernel keeps for q [rows, Q] and GQA-repeated k, v [keys, Q] (all in a).

    SDPA: q, k, v, the output (o_proj reads a view of it) and the fp32 log-sum-exp; a boolean mask becomes an
    a-bias [bias_rows, q_len, k_len] per call. Eager: q, k, v, the fp32 softmax output and its a-copy (read by the
    second matmul). Flex: q, the un-repeated k and v (GQA inside the kernel), the output and the fp32 log-sum-exp;
    its block mask is a few small tile tables."""
    if flex:
        return 2 * s.a * rows * s.Q + 2 * s.a * keys * s.V + F32 * s.B * s.heads * q_len
    qkv = s.a * rows * s.Q + 2 * s.a * keys * s.Q
    if not s.eager:
        return qkv + s.a * rows * s.Q + F32 * s.B * s.heads * q_len + s.a * bias_rows * q_len * k_len
    probs = s.B * s.heads * q_len * k_len
    return qkv + (F32 + (s.a if s.a != F32 else 0)) * probs


def _linears(s: _Shape, lt: LayerTrain, lin: Dict[str, Tuple[int, int]], names: Tuple[str, ...], rows: int,
             in_grad: bool, counted_elsewhere: bool, rank: int, dropout: bool) -> Tuple[int, int]:
    """(activation bytes, frozen-weight-cast bytes) that the Linears `names` reading one input keep.

    train: the input; Linears reading one input share it (the decoder keeps the residual stream row-major), counted
    once here unless `counted_elsewhere` (the condition, counted in the head; an attention output).
    lora: the adapter's dropout output + bool mask (a + 1) * rows * in (dropout > 0; else the input as for train)
    and its rank-r activation a * rows * r; the frozen base keeps its a-cast weight (autocast) if the input needs
    a gradient. dora: lora + the base and adapter outputs the magnitude's gradient reads, 2a * rows * out (with
    dropout, the base runs again on the dropped input with another a-cast weight). kron (LoKr / LoHa, which
    materialize the update and call F.linear with it): its own a-copy of the input + the a-cast update a * out * in.
    frozen: the cast weight only.
    """
    act = cast = 0
    shared = False
    for name in names:
        kind = lt.linears[name]
        fan_in, fan_out = lin[name]
        if kind != "train" and in_grad and s.frozen_cast:
            cast += s.a * fan_in * fan_out
        if kind == "frozen":
            continue
        if kind in ("lora", "dora"):
            act += s.a * rows * rank
        if kind == "dora":
            act += 2 * s.a * rows * fan_out + (s.a * fan_in * fan_out if dropout and s.frozen_cast else 0)
        if kind == "kron":  # its own a-cast input (PEFT casts the input to the update's fp32 first) + the update
            act += s.a * rows * fan_in + s.a * fan_in * fan_out
        elif kind in ("lora", "dora") and dropout:
            act += (s.a + 1) * rows * fan_in
        else:
            shared = True
    return act + (s.a * rows * lin[names[0]][0] if shared and not counted_elsewhere else 0), cast


def _reads_input(kind: str, dropout: bool) -> bool:
    """The Linear keeps its own input for backward (a trained weight, an adapter without dropout, LoKr / LoHa)."""
    return kind in ("train", "kron") or kind in ("lora", "dora") and not dropout


def _o_proj(s: _Shape, lt: LayerTrain, lin: Dict[str, Tuple[int, int]], name: str, rank: int,
            dropout: bool) -> Tuple[int, int]:
    """o_proj reads the attention output: a view of it for SDPA (already counted), a row-major copy for eager."""
    act, cast = _linears(s, lt, lin, (name,), s.M, True, True, rank, dropout)
    if s.eager and _reads_input(lt.linears[name], dropout):
        act += s.a * s.M * s.Q
    return act, cast


def layer_cost(s: _Shape, lt: LayerTrain, lin: Dict[str, Tuple[int, int]], rank: int, dropout: bool,
               in_grad: bool, cond_grad: bool, temb_grad: bool, sliding: bool, bias_rows: int) -> Tuple[int, int]:
    """(saved activation bytes, frozen-weight-cast bytes) of one DiT layer that is not checkpointed."""
    M, K, H, a = s.M, s.K, s.H, s.a
    mod = lt.table or temb_grad  # adaLN shift/scale/gate need a gradient
    act = cast = 0

    def add(pair: Tuple[int, int]) -> None:
        nonlocal act, cast
        act, cast = act + pair[0], cast + pair[1]

    def out_grad(name: str, inp: bool) -> bool:
        return inp or lt.linears[name] != "frozen"

    # self-attention: h = norm(x) * (1 + scale) + shift -> q, k, v -> RoPE -> SDPA -> o_proj -> * gate
    act += _norm(M, H, H, a, lt.norms, in_grad)
    act += F32 * M * H if mod else 0
    h_grad = in_grad or mod or lt.norms
    add(_linears(s, lt, lin, ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"), M, h_grad, False,
                 rank, dropout))
    act += _norm(M, s.Q, s.Q // s.heads, a, lt.norms, out_grad("self_attn.q_proj", h_grad))
    act += _norm(M, s.V, s.Q // s.heads, a, lt.norms, out_grad("self_attn.k_proj", h_grad))
    act += _attention(s, M, M, s.N, s.N, bias_rows if sliding and s.window is not None else 0, s.flex)
    add(_o_proj(s, lt, lin, "self_attn.o_proj", rank, dropout))
    act += a * M * H if mod else 0  # o_proj output kept by "* gate"
    x_grad = in_grad or h_grad and any(k != "frozen" for n, k in lt.linears.items() if n.startswith("self_attn."))
    x_grad = x_grad or mod
    # cross-attention: q from norm(x), k and v from the condition (one tensor shared by all layers)
    act += _norm(M, H, H, a, lt.norms, x_grad)
    h2_grad = x_grad or lt.norms
    add(_linears(s, lt, lin, ("cross_attn.q_proj",), M, h2_grad, False, rank, dropout))
    act += _norm(M, s.Q, s.Q // s.heads, a, lt.norms, out_grad("cross_attn.q_proj", h2_grad))
    kv = _linears(s, lt, lin, ("cross_attn.k_proj", "cross_attn.v_proj"), K, cond_grad, True, rank, dropout)
    add(kv)
    act += _norm(K, s.V, s.Q // s.heads, a, lt.norms, out_grad("cross_attn.k_proj", cond_grad))
    act += _attention(s, M, K, s.N, s.L, bias_rows if bias_rows > 1 else 0)
    add(_o_proj(s, lt, lin, "cross_attn.o_proj", rank, dropout))
    x_grad = x_grad or any(k != "frozen" for n, k in lt.linears.items() if n.startswith("cross_attn."))
    # MLP: h = norm(x) * (1 + c_scale) + c_shift -> down(silu(gate(h)) * up(h)) * c_gate
    act += _norm(M, H, H, a, lt.norms, x_grad)
    act += F32 * M * H if mod else 0
    h3_grad = x_grad or mod or lt.norms
    add(_linears(s, lt, lin, ("mlp.gate_proj", "mlp.up_proj"), M, h3_grad, False, rank, dropout))
    if h3_grad or lt.linears["mlp.gate_proj"] != "frozen":
        act += 3 * a * M * s.I  # silu input, silu output, up output
    if lt.linears["mlp.down_proj"] == "train":
        act += a * M * s.I  # the product, down_proj's input
    else:
        add(_linears(s, lt, lin, ("mlp.down_proj",), M, True, True, rank, dropout))
        if lt.linears["mlp.down_proj"] != "frozen" and _reads_input(lt.linears["mlp.down_proj"], dropout):
            act += a * M * s.I
    act += a * M * H if mod else 0  # down_proj output kept by "* c_gate"
    return act, cast


# ---------------------------------------------------------------------------------------------------------------
# The step, walked


def _autocast_bytes(cfg: Config) -> int:
    """Bytes per element of the autocast dtype: 2 for bf16/fp16 (auto = bf16 on a CUDA GPU); 4 = no autocast
    (mixed_precision no, or auto on the CPU)."""
    precision, device = str(cfg.hardware.mixed_precision), str(cfg.hardware.device)
    return 4 if precision == "no" or (precision == "auto" and device == "cpu") else 2


def autocast_dtype(precision: MixedPrecision) -> torch.dtype | None:
    """The autocast dtype of hardware.mixed_precision on a CUDA GPU (auto = bf16 there); None = fp32, no autocast."""
    match str(precision):
        case "auto" | "bf16":
            return torch.bfloat16
        case "fp16":
            return torch.float16
    return None


def frozen_dtype(cfg: Config, world_size: int = 1) -> torch.dtype:
    """The dtype run.py gives the frozen weights (model.frozen_dtype), for the device the estimate assumes: the CPU
    for hardware.device=cpu, else a CUDA GPU with bf16 (mixed_precision auto)."""
    on_cpu = str(cfg.hardware.device) == "cpu"
    precision = str(cfg.hardware.mixed_precision)
    if precision == "auto":
        precision = "no" if on_cpu else "bf16"
    return getattr(torch, resolve_frozen_dtype(cfg.model, cfg.hardware, on_cpu, precision, world_size))


def _shape(cfg: Config, batch: int, frames: int, cond_len: int, world_size: int = 1) -> _Shape:
    m = cfg.model
    a = _autocast_bytes(cfg)
    return _Shape(B=batch, N=-(-frames // m.patch_size), L=cond_len, H=m.hidden_size,
                  Q=m.num_attention_heads * m.head_dim, V=m.num_key_value_heads * m.head_dim,
                  I=m.intermediate_size, E=m.encoder_hidden_size or m.hidden_size, heads=m.num_attention_heads,
                  a=a, frozen_cast=a != F32 and frozen_dtype(cfg, world_size) != autocast_dtype(cfg.hardware.mixed_precision),
                  eager=str(m.attn_implementation) == "eager", flex=str(m.attn_implementation) == "flex",
                  window=m.sliding_window if m.use_sliding_window else None)


def batch_bytes(cfg: Config, batch: int, frames: int, cond_len: int) -> int:
    """One float32 batch on the device: target [B,T,C], context [B,T,in-C], mask [B,T], condition [B,L,E], mask."""
    m = cfg.model
    e = m.encoder_hidden_size or m.hidden_size
    return F32 * (batch * frames * (m.in_channels + 1) + batch * cond_len * (e + 1))


def estimate_memory(cfg: Config, batch: int, frames: int, cond_len: int, world_size: int = 1) -> MemoryEstimate:
    """Peak device memory of one steady-state training step on ONE device (see the module docstring)."""
    ts = train_set(cfg)
    s = _shape(cfg, batch, frames, cond_len, world_size)
    hw, m = cfg.hardware, cfg.model
    a, M, K, H, T, C = s.a, s.M, s.K, s.H, frames, m.audio_acoustic_hidden_dim
    W = max(1, world_size)
    dist = str(hw.distributed) if W > 1 else "single"
    zero = hw.zero_stage if dist == "deepspeed" else 0
    fsdp = dist == "fsdp"
    rank = cfg.mode.rank if isinstance(cfg.mode, LoraMode) else 0
    dropout = isinstance(cfg.mode, LoraMode) and cfg.mode.dropout > 0
    n_train = ts.trainable
    terms: List[Term] = []

    # --- resident ---
    shard_params = fsdp or zero == 3
    frozen = frozen_dtype(cfg, W)
    weights = F32 * n_train + frozen.itemsize * (ts.decoder_params - n_train)
    if shard_params:
        weights = 0 if hw.offload and fsdp else weights // W
    terms.append(Term("weights", weights, f"decoder, {ts.decoder_params:.4g} params: {n_train:.3g} trained fp32, "
                      f"the rest {str(frozen).replace('torch.', '')} (model.frozen_dtype)"
                      + ("; sharded / " + str(W) if shard_params else "") + ("; offloaded" if fsdp and hw.offload
                                                                              else "")))
    state, state_detail, opt_temp, opt_temp_detail = optimizer_terms(cfg, ts)
    if fsdp or zero >= 1:
        state, state_detail = state // W, state_detail + f"; sharded / {W}"
    if hw.offload and (fsdp or zero >= 1):
        state, state_detail, opt_temp = 0, state_detail + "; offloaded to host RAM", 0
    terms.append(Term("optimizer states", state, state_detail))
    if cfg.train.ema.enabled and not cfg.train.ema.on_cpu:
        ema = F32 * n_train // (W if fsdp else 1)
        terms.append(Term("EMA", ema, f"fp32 copy of {n_train:.3g} trained params" + (" (sharded)" if fsdp else "")))
    n_batches = PREFETCH_BATCHES if hw.device_prefetch else 1
    terms.append(Term("batches", n_batches * batch_bytes(cfg, batch, frames, cond_len),
                      f"{n_batches} x fp32 batch [{batch} x {frames} frames, condition {cond_len}]"
                      + (" (device prefetch: in use + queue of 2 + one in the worker)" if n_batches > 1 else "")))
    grad_div = W if fsdp or zero >= 2 else 1

    # --- forward / backward, walked ---
    ckpt = checkpointed_layers(hw.gradient_checkpointing, m.num_hidden_layers)
    bias_rows = batch if cfg.objective.attention_mask else 1
    cond_grad = ts.head["condition_embedder"]
    temb_grad = ts.head["time_embed"]
    in_grad = ts.head["proj_in"] or temb_grad
    layers = []  # (saved when not checkpointed, all casts of the layer, checkpoint input, grads, trainable casts)
    for i, lt in enumerate(ts.layers):
        act, frozen_cast = layer_cost(s, lt, ts.layer_linears, rank, dropout, in_grad, cond_grad, temb_grad,
                                      s.window is not None and i % 2 == 0, bias_rows)
        layers.append((act, frozen_cast, a * M * H, F32 * lt.trainable // grad_div, a * lt.weights))
        in_grad = in_grad or lt.trainable > 0
    cond_shared = any(_reads_input(lt.linears[n], dropout)
                      for lt in ts.layers for n in ("cross_attn.k_proj", "cross_attn.v_proj"))
    head_saved = ((a * batch * T * m.in_channels if ts.head["proj_in"] else 0)
                  + (a * K * s.E if cond_grad else 0) + (a * K * H if cond_shared else 0)
                  + (M * s.N if s.eager and s.window is not None else 0))  # eager keeps the bool band mask
    fwd_only = (F32 * (2 * batch * T * C + K * s.E)  # noise, x_t, CFG-dropped condition (fp32)
                + F32 * batch * T * m.in_channels  # cat(context, x_t)
                + (0 if cond_shared else a * K * H)
                + (s.N * s.N if s.window is not None and not s.eager and not s.flex else 0))  # bool band mask
    tail_in = ts.head["tail"] or any(lt.trainable for lt in ts.layers) or in_grad
    tail_saved = (_norm(M, H, H, a, ts.head["tail"], tail_in) + (F32 * M * H if ts.head["tail"] or temb_grad else 0)
                  + (a * M * H if ts.head["tail"] else 0) + F32 * batch * T * C)  # + pred kept by the MSE
    head_grads = F32 * ts.head_trainable // grad_div
    tail_grads = F32 * ts.tail_trainable // grad_div
    cache_head = a * ts.head_weights if a != F32 else 0

    def saved(i: int) -> int:
        act, frozen_cast, ckpt_in, _, train_cast = layers[i]
        if i in ckpt:
            return ckpt_in
        return act + frozen_cast + (train_cast if a != F32 else 0)

    layer_saved = sum(saved(i) for i in range(len(layers)))
    ckpt_casts = sum(layers[i][4] for i in ckpt) if a != F32 else 0  # in the autocast cache until forward returns
    transient = (2 * a + F32) * M * H + 3 * a * M * s.I  # stream gradients + SwiGLU gradients of one layer
    phases = []  # (bytes, what, {component: bytes})
    layer_casts = sum(layers[i][1] + layers[i][4] for i in range(len(layers)) if i not in ckpt) if a != F32 else 0
    phases.append((head_saved + fwd_only + layer_saved + ckpt_casts + cache_head + tail_saved,
                   "at the end of the forward pass",
                   {"activations": head_saved + fwd_only + layer_saved - layer_casts + tail_saved,
                    "autocast weight copies": ckpt_casts + cache_head + layer_casts}))
    live_layers = layer_saved
    grads = tail_grads
    acts_fixed = head_saved  # the tail's saved tensors (and the MSE target) went with the first backward nodes
    for i in reversed(range(len(layers))):
        act, frozen_cast, ckpt_in, g, train_cast = layers[i]
        recompute = (act + frozen_cast + (train_cast if a != F32 else 0)) if i in ckpt else 0
        casts_live = sum(layers[j][1] + (layers[j][4] if a != F32 else 0) for j in range(i + 1) if j not in ckpt)
        if i in ckpt:
            casts_live += frozen_cast + (train_cast if a != F32 else 0)
        total = acts_fixed + live_layers + recompute + transient + grads + g + cache_head
        phases.append((total, f"in the backward pass of DiT layer {i} of {len(layers)}",
                       {"activations": acts_fixed + live_layers + recompute - casts_live,
                        "autocast weight copies": casts_live + cache_head,
                        "gradients": grads + g,
                        "backward temporaries": transient}))
        live_layers -= saved(i)
        grads += g
    grads += head_grads
    phases.append((acts_fixed + grads, "at the end of the backward pass",
                   {"activations": acts_fixed, "gradients": grads}))
    all_grads = F32 * n_train // grad_div
    phases.append((all_grads + opt_temp, "in the optimizer step",
                   {"gradients": all_grads, "optimizer temporaries": opt_temp}))
    peak, where, parts = max(phases, key=lambda p: p[0])
    details = {
        "activations": f"saved for backward {where} ({batch} x {s.N} tokens, condition {cond_len}, "
                       f"{len(ckpt)}/{len(layers)} layers checkpointed, "
                       f"{'eager' if s.eager else 'flex' if s.flex else 'sdpa'}, {'fp32' if a == F32 else 'autocast ' + str(a * 8) + '-bit'})",
        "autocast weight copies": f"{'bf16/fp16' if a != F32 else ''} casts of weights alive {where}",
        "gradients": f"fp32 gradients alive {where}" + (f" (sharded / {grad_div})" if grad_div > 1 else ""),
        "backward temporaries": "one layer's stream gradients (2a+4)*M*H and SwiGLU gradients 3a*M*I",
        "optimizer temporaries": opt_temp_detail,
    }
    for name, value in parts.items():
        terms.append(Term(name, int(value), details[name]))
    if fsdp or zero == 3:
        gathered = 2 * F32 * max(lt.params for lt in ts.layers)
        terms.append(Term("gathered layers", gathered, "unsharded fp32 weights of the running and the prefetched layer"))
    return MemoryEstimate(terms)
