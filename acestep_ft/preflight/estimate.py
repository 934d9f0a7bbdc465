"""Peak device memory of one training step, estimated from the config alone (no weights, no GPU, ~ms per call).

    from acestep_ft.preflight.estimate import InputLengths, estimate_memory
    est = estimate_memory(cfg, batch=4, frames=6000, cond=769)       # one device; encoder outputs as data
    est = estimate_memory(cfg, 4, 6000, InputLengths(text=256, lyric=512, refs=1, ref_frames=1))  # encoder_inputs
    print(est.table()); est.total                                    # bytes

What one step holds on the device (run.py / train/loop.py): the decoder (PEFT-wrapped for LoRA; tokenizer and
detokenizer stay in host RAM, and so does the condition encoder unless dataset.conditions=encoder_inputs), the
float32 batch, the optimizer state, the EMA copy, and, during the step, autocast weight copies, saved activations,
gradients and the optimizer's temporaries. Those last ones do not all peak together, so the estimate walks the
step and keeps the highest point:

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
- saved activations per DiT layer: what autograd keeps, enumerated op by op in activations.py (RMSNorm keeps its
  fp32 input, the normalized a-copy when its weight trains, the fp32 modulated value when adaLN trains; each
  Linear keeps its input when its weight trains (Linears reading the same row-major input share one copy; the
  decoder makes the residual stream row-major after proj_in's Conv1d); SDPA keeps q, k, v,
  out (a*M*Q each side) and a bias a*N^2 on sliding layers; flex (self-attention) keeps q, out and the un-repeated
  k, v (a*M*V each), no bias, its o_proj input taken as a view as for SDPA (not yet measured on a CUDA GPU); eager
  keeps q, k, v, fp32 and a-probabilities (f + a) * B*heads*N*Nk; SwiGLU keeps 4 * a*M*I; LoRA keeps its dropout
  copy a*M*in, mask 1*M*in and a*M*r (DoRA also the base and adapter outputs, 2a*M*out); LoKr / LoHa keep their
  own input copy a*M*in and the materialized a-cast update a*out*in; a frozen Linear whose input needs a gradient
  keeps its a-cast weight under autocast, unless the frozen weights already are in the autocast dtype).
- checkpointed layers keep only their input (a*M*H); in the backward pass one layer at a time is recomputed.
- autocast weight cache: a * trainable Linear/Conv weights, alive until the forward returns (checkpointed layers
  drop theirs then; the others keep them as saved tensors until their backward).
- gradients grow layer by layer as the backward pass walks down (4 * trainable of the layers done), while
  the activations of those layers are freed; the backward of one layer also holds its stream gradients
  (2*a + f) * M*H and SwiGLU gradients 3 * a*M*I.
- head/tail: x_t, noise, fp32 condition, proj_in / condition_embedder inputs, norm_out, proj_out, fp32 output
  and the MSE's saved pred and target.

Condition encoder (dataset.conditions=encoder_inputs: the step runs it on the batch first; Lt caption, Ll lyric
tokens, R references of Tr frames per sample, L = Ll + R + Lt; layer costs as for the DiT, minus cross-attention
and adaLN, reusing the same functions)
- weights           4 * trained + bytes of the frozen dtype * frozen encoder params (never sharded), and the text
                    encoder's token table V x D_text in the frozen dtype.
- batch             the encoder's inputs instead of its output: caption states [B,Lt,D_text], lyric ids [B,Ll] and
                    references [B*R,Tr,64] with their masks and ids.
- trained stages    (a full fine-tune's condition_encoder stages; the trained module is DecoderAndEncoder) keep,
                    per trained or gradient-carrying layer of the lyric (B*Ll rows) and timbre (B*R*Tr rows) stacks,
                    what a DiT layer keeps; its fp32 RMSNorm outputs make autocast give each Linear its own a-copy
                    of its input; packing keeps both concatenations; the condition then needs a gradient, so every
                    DiT layer keeps its cross-attention and stream for backward even where the decoder is frozen.
                    These activations live through the decoder's forward and backward; the encoder's backward walks
                    them down while its fp32 gradients grow; its optimizer states, EMA copy and gradients enter
                    those terms (optimizer groups by the trained module's decoder.* / encoder.* names).
- frozen            runs without autograd (keeps nothing for backward).
- its forward       one more phase: its inputs in the frozen dtype, its outputs, what its trained stacks saved so
                    far, and the running stack's working set: one layer's with the stack's kept bool band mask, or,
                    before its layers, the band mask being built from two int64 [N, N] (|i - j|), 16 * N^2 (sdpa,
                    eager). It rarely beats the decoder's peak, except at small widths with long references: the
                    timbre stack's N = Tr = 750 frames make that build the step's peak.
- its output        [B,L,E] (autocast dtype, or fp32 when trained or fp32 norms reach it), its CFG-dropped copy
                    and the fp32 mask stay alive through the decoder's forward.

Text encoder (mode.text_encoder=lora, text_encoder_terms.py: the step runs the Qwen3 text encoder on the caption's
token ids [B, Lt] before the condition encoder, with autograd; sizes from its config.json)
- weights           bytes of the frozen dtype * its params + 4 * its LoRA (mode.text_lora); the LoRA's gradients,
                    optimizer states and EMA copy are in those terms (it is part of the trained module).
- batch             + the caption token ids, 8 * B*Lt.
- activations       every layer keeps what a condition-encoder layer keeps, each adapted Linear its own a-copy of
                    its input (PEFT casts it to fp32 first) and o_proj's LoRA a copy of the attention output; its
                    attention keeps q, out and the un-repeated k, v (causal SDPA with GQA, no mask). They live from
                    its forward through the decoder's and the condition encoder's backward, then its backward walks
                    them down while the LoRA's gradients grow. The condition then needs a gradient: every DiT layer
                    keeps its cross-attention inputs, and a frozen condition encoder runs with autograd, keeping the
                    text_projector's a-cast weight and the packing's [B,L,E] gather input.

Optimizer-step high-water mark: all gradients (4 * trainable; ZeRO-2/3 and FSDP: / world) + the optimizer's
temporaries (torch AdamW and schedule-free with foreach, as on a CUDA GPU: one fp32 sqrt buffer the size of the
largest parameter group; Adafactor: two fp32 buffers the size of the largest tensor; Prodigy: one; 8-bit and fused
kernels: none).

Tested against `trace.py` (a real step under FakeTensorMode + MemTracker) in tests/unit/test_preflight_estimate.py
(the trained text encoder: tests/unit/test_preflight_text_encoder.py) and against torch.cuda.max_memory_allocated in
tests/test_preflight_gpu.py, with encoder outputs and inputs.

Modules: this one assembles the terms and walks the step; trainset.py decides what trains, optimizer_terms.py the
optimizer's state and temporaries, dtypes.py the autocast and frozen dtypes, activations.py what one transformer
layer saves, encoder_terms.py the condition encoder's share, text_encoder_terms.py the trained text encoder's.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import List, Tuple

import torch

from acestep_ft.config import Config, LoraMode
from acestep_ft.model.decoder import checkpointed_layers
from acestep_ft.preflight.activations import F32, Shape, layer_cost, layer_temporaries, norm_cost, reads_input
from acestep_ft.preflight.dtypes import autocast_bytes, autocast_dtype, frozen_dtype
from acestep_ft.preflight.encoder_terms import Condition, InputLengths, condition_lengths, encoder_cost, runs_encoder
from acestep_ft.preflight.optimizer_terms import optimizer_terms
from acestep_ft.preflight.text_encoder_terms import text_cost, text_ids_bytes, text_weight_bytes
from acestep_ft.preflight.trainset import TrainSet, train_set
from acestep_ft.train.text_encoder import trains_text_encoder

__all__ = ["Condition", "InputLengths", "MemoryEstimate", "Term", "TrainSet", "autocast_dtype", "batch_bytes",
           "condition_lengths", "encoder_weight_terms", "estimate_memory", "frozen_dtype", "optimizer_terms",
           "runs_encoder", "train_set"]

GIB = 2**30
PREFETCH_BATCHES = 4  # hardware.device_prefetch on a CUDA GPU: in use + queue of 2 + one held by the worker


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


def _shape(cfg: Config, batch: int, frames: int, cond_len: int, world_size: int = 1) -> Shape:
    m = cfg.model
    a = autocast_bytes(cfg)
    return Shape(B=batch, N=-(-frames // m.patch_size), L=cond_len, H=m.hidden_size,
                 Q=m.num_attention_heads * m.head_dim, V=m.num_key_value_heads * m.head_dim,
                 I=m.intermediate_size, E=m.encoder_hidden_size or m.hidden_size, heads=m.num_attention_heads,
                 a=a, frozen_cast=a != F32 and frozen_dtype(cfg, world_size) != autocast_dtype(
                     cfg.hardware.mixed_precision),
                 eager=str(m.attn_implementation) == "eager", flex=str(m.attn_implementation) == "flex",
                 window=m.sliding_window if m.use_sliding_window else None)


def batch_bytes(cfg: Config, batch: int, frames: int, cond: Condition) -> int:
    """One float32 batch on the device: target [B,T,C], context [B,T,in-C], mask [B,T], and the condition: encoder
    outputs [B,L,E] + mask, or encoder inputs: caption states [B,Lt,D_text] + mask, lyric ids [B,Ll] int64 + mask,
    references [B*R,Tr,64] + their int64 owners, each sample's own Lt and Ll (int64), and with mode.text_encoder=
    lora the caption token ids [B,Lt] int64 (which data without a trained text encoder may carry too: 8*B*Lt, left
    out)."""
    m = cfg.model
    latents = F32 * batch * frames * (m.in_channels + 1)
    if isinstance(cond, int):
        return latents + F32 * batch * cond * ((m.encoder_hidden_size or m.hidden_size) + 1)
    refs = batch * cond.refs
    text_ids = text_ids_bytes(batch, cond.text) if trains_text_encoder(cfg.mode) else 0
    return (latents + F32 * batch * cond.text * (m.text_hidden_dim + 1) + (8 + F32) * batch * cond.lyric
            + F32 * refs * cond.ref_frames * m.timbre_hidden_dim + 8 * refs + 2 * 8 * batch + text_ids)


def encoder_weight_terms(cfg: Config, ts: TrainSet, frozen: torch.dtype) -> List[Term]:
    """The condition encoder's weights (trained ones fp32, the rest in the frozen dtype; never sharded: a frozen
    encoder sits beside the sharded module, and training it needs a mode.unfreeze stage, which runs under ddp only)
    and the text encoder's token table [V, D_text] (frozen dtype) on the device; with mode.text_encoder=lora also the
    text encoder itself (its own copy of the table included) with its LoRA."""
    es, m, tt = ts.encoder, cfg.model, ts.text
    dtype = str(frozen).replace("torch.", "")
    terms = [Term("condition encoder", F32 * es.trainable + frozen.itemsize * (es.params - es.trainable),
                  f"{es.params:.4g} params: {es.trainable:.3g} trained fp32, the rest {dtype}"),
             Term("token table", frozen.itemsize * m.text_vocab_size * m.text_hidden_dim,
                  f"text encoder's lyric embedding table {m.text_vocab_size} x {m.text_hidden_dim} {dtype} "
                  "(model.text_vocab_size x model.text_hidden_dim)")]
    if tt is not None:
        terms.append(Term("text encoder", text_weight_bytes(tt, frozen),
                          f"Qwen3 text encoder (mode.text_encoder=lora), {tt.params:.4g} params {dtype} + its LoRA, "
                          f"{tt.trainable:.3g} params fp32 (rank {cfg.mode.text_lora.rank})"))
    return terms


def _resident_terms(cfg: Config, ts: TrainSet, batch: int, frames: int, cond: Condition,
                    W: int) -> Tuple[List[Term], int, str]:
    """Terms alive the whole step: weights (decoder; condition encoder and token table for encoder_inputs data),
    optimizer states, EMA, batches. Also returns the optimizer-step temporaries and their detail."""
    hw = cfg.hardware
    dist = str(hw.distributed) if W > 1 else "single"
    zero = hw.zero_stage if dist == "deepspeed" else 0
    fsdp = dist == "fsdp"
    n_train = ts.trainable
    n_dec = n_train - ts.encoder.trainable - (ts.text.trainable if ts.text is not None else 0)
    shard_params = fsdp or zero == 3
    frozen = frozen_dtype(cfg, W)
    weights = F32 * n_dec + frozen.itemsize * (ts.decoder_params - n_dec)
    if shard_params:
        weights = 0 if hw.offload and fsdp else weights // W
    terms = [Term("weights", weights, f"decoder, {ts.decoder_params:.4g} params: {n_dec:.3g} trained fp32, "
                  f"the rest {str(frozen).replace('torch.', '')} (model.frozen_dtype)"
                  + ("; sharded / " + str(W) if shard_params else "") + ("; offloaded" if fsdp and hw.offload
                                                                          else ""))]
    if runs_encoder(cfg):
        terms += encoder_weight_terms(cfg, ts, frozen)
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
    what = (f"condition {cond}" if isinstance(cond, int) else f"encoder inputs: caption {cond.text}"
            + (" (states and token ids)" if trains_text_encoder(cfg.mode) else "")
            + f", lyrics {cond.lyric}, {cond.refs} x {cond.ref_frames} reference frames")
    terms.append(Term("batches", n_batches * batch_bytes(cfg, batch, frames, cond),
                      f"{n_batches} x fp32 batch [{batch} x {frames} frames, {what}]"
                      + (" (device prefetch: in use + queue of 2 + one in the worker)" if n_batches > 1 else "")))
    return terms, opt_temp, opt_temp_detail


def estimate_memory(cfg: Config, batch: int, frames: int, cond: Condition, world_size: int = 1) -> MemoryEstimate:
    """Peak device memory of one steady-state training step on ONE device (see the module docstring). `cond`: the
    condition length L (dataset.conditions=encoder_outputs) or the InputLengths of the encoder's inputs."""
    cond = condition_lengths(cfg, cond)
    cond_len = cond if isinstance(cond, int) else cond.length
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
    terms, opt_temp, opt_temp_detail = _resident_terms(cfg, ts, batch, frames, cond, W)
    grad_div = W if fsdp or zero >= 2 else 1
    text = None if isinstance(cond, int) or ts.text is None else text_cost(cfg, ts.text, batch, cond.text)
    enc = None if isinstance(cond, int) else encoder_cost(cfg, ts.encoder, batch, cond, W, text is not None)

    # --- forward / backward, walked ---
    ckpt = checkpointed_layers(hw.gradient_checkpointing, m.num_hidden_layers)
    bias_rows = batch if cfg.objective.attention_mask else 1
    embedder_trains = ts.head["condition_embedder"]
    cond_grad = embedder_trains or ts.encoder.trainable > 0 or text is not None  # the condition needs a gradient
    temb_grad = ts.head["time_embed"]
    in_grad = ts.head["proj_in"] or temb_grad
    layers = []  # (saved when not checkpointed, all casts of the layer, checkpoint input, grads, trainable casts)
    for i, lt in enumerate(ts.layers):
        act, frozen_cast = layer_cost(s, lt, ts.layer_linears, rank, dropout, in_grad, cond_grad, temb_grad,
                                      s.window is not None and i % 2 == 0, bias_rows)
        layers.append((act, frozen_cast, a * M * H, F32 * lt.trainable // grad_div, a * lt.weights))
        in_grad = in_grad or lt.trainable > 0 or cond_grad
    cond_shared = any(reads_input(lt.linears[n], dropout)
                      for lt in ts.layers for n in ("cross_attn.k_proj", "cross_attn.v_proj"))
    head_saved = ((a * batch * T * m.in_channels if ts.head["proj_in"] else 0)
                  + (a * K * s.E if embedder_trains else 0) + (a * K * H if cond_shared else 0)
                  + (a * s.E * H if cond_grad and not embedder_trains and s.frozen_cast else 0)  # its cast weight
                  + (M * s.N if s.eager and s.window is not None else 0))  # eager keeps the bool band mask
    fwd_only = (F32 * 2 * batch * T * C  # noise, x_t
                + (F32 * K * s.E if enc is None else enc.output)  # the (CFG-dropped) condition
                + F32 * batch * T * m.in_channels  # cat(context, x_t)
                + (0 if cond_shared else a * K * H)
                + (s.N * s.N if s.window is not None and not s.eager and not s.flex else 0))  # bool band mask
    tail_in = ts.head["tail"] or any(lt.trainable for lt in ts.layers) or in_grad
    tail_saved = (norm_cost(M, H, H, a, ts.head["tail"], tail_in) + (F32 * M * H if ts.head["tail"] or temb_grad else 0)
                  + (a * M * H if ts.head["tail"] else 0) + F32 * batch * T * C)  # + pred kept by the MSE
    head_grads = F32 * ts.head_trainable // grad_div
    tail_grads = F32 * ts.tail_trainable // grad_div
    cache_head = a * ts.head_weights if a != F32 else 0
    enc_saved = 0 if enc is None else enc.saved
    enc_part = {"condition encoder activations": enc_saved} if enc_saved else {}
    text_saved = 0 if text is None else text.saved  # alive from the text encoder's forward to its backward
    text_part = {"text encoder activations": text_saved} if text is not None else {}

    def saved(i: int) -> int:
        act, frozen_cast, ckpt_in, _, train_cast = layers[i]
        if i in ckpt:
            return ckpt_in
        return act + frozen_cast + (train_cast if a != F32 else 0)

    layer_saved = sum(saved(i) for i in range(len(layers)))
    ckpt_casts = sum(layers[i][4] for i in ckpt) if a != F32 else 0  # in the autocast cache until forward returns
    transient = layer_temporaries(s)
    phases = []  # (bytes, what, {component: bytes})
    if text is not None:
        phases.append((F32 * batch * T * C + text.forward + text_saved, "in the text encoder's forward pass",
                       {"activations": F32 * batch * T * C, "text encoder activations": text.forward + text_saved}))
    if enc is not None:
        phases.append((F32 * batch * T * C + enc.forward + text_saved,
                       "in the condition encoder's forward pass",
                       {"activations": F32 * batch * T * C,
                        "condition encoder activations": enc.forward, **text_part}))
    layer_casts = sum(layers[i][1] + layers[i][4] for i in range(len(layers)) if i not in ckpt) if a != F32 else 0
    phases.append((head_saved + fwd_only + layer_saved + ckpt_casts + cache_head + tail_saved + enc_saved
                   + text_saved, "at the end of the forward pass",
                   {"activations": head_saved + fwd_only + layer_saved - layer_casts + tail_saved,
                    "autocast weight copies": ckpt_casts + cache_head + layer_casts, **enc_part, **text_part}))
    live_layers = layer_saved
    grads = tail_grads
    acts_fixed = head_saved  # the tail's saved tensors (and the MSE target) went with the first backward nodes
    for i in reversed(range(len(layers))):
        act, frozen_cast, ckpt_in, g, train_cast = layers[i]
        recompute = (act + frozen_cast + (train_cast if a != F32 else 0)) if i in ckpt else 0
        casts_live = sum(layers[j][1] + (layers[j][4] if a != F32 else 0) for j in range(i + 1) if j not in ckpt)
        if i in ckpt:
            casts_live += frozen_cast + (train_cast if a != F32 else 0)
        total = acts_fixed + live_layers + recompute + transient + grads + g + cache_head + enc_saved + text_saved
        phases.append((total, f"in the backward pass of DiT layer {i} of {len(layers)}",
                       {"activations": acts_fixed + live_layers + recompute - casts_live,
                        "autocast weight copies": casts_live + cache_head,
                        "gradients": grads + g,
                        "backward temporaries": transient, **enc_part, **text_part}))
        live_layers -= saved(i)
        grads += g
    grads += head_grads
    for piece_saved, params, temporaries in reversed(enc.pieces if enc is not None else []):
        g = F32 * params // grad_div
        if piece_saved or g or temporaries:
            phases.append((acts_fixed + enc_saved + text_saved + grads + g + temporaries,
                           "in the backward pass of the condition encoder",
                           {"activations": acts_fixed, "condition encoder activations": enc_saved, **text_part,
                            "gradients": grads + g, "backward temporaries": temporaries}))
        enc_saved -= piece_saved
        grads += g
    for piece_saved, params, temporaries in reversed(text.pieces if text is not None else []):
        g = F32 * params // grad_div
        if piece_saved or g or temporaries:
            phases.append((acts_fixed + text_saved + grads + g + temporaries,
                           "in the backward pass of the text encoder",
                           {"activations": acts_fixed, "text encoder activations": text_saved,
                            "gradients": grads + g, "backward temporaries": temporaries}))
        text_saved -= piece_saved
        grads += g
    phases.append((acts_fixed + grads, "at the end of the backward pass",
                   {"activations": acts_fixed, "gradients": grads}))
    all_grads = F32 * ts.trainable // grad_div
    phases.append((all_grads + opt_temp, "in the optimizer step",
                   {"gradients": all_grads, "optimizer temporaries": opt_temp}))
    peak, where, parts = max(phases, key=lambda p: p[0])
    inputs = "" if isinstance(cond, int) else (f"lyrics {batch} x {cond.lyric}, {batch * cond.refs} references x "
                                               f"{cond.ref_frames} frames, caption {batch} x {cond.text}")
    details = {
        "activations": f"saved for backward {where} ({batch} x {s.N} tokens, condition {cond_len}, "
                       f"{len(ckpt)}/{len(layers)} layers checkpointed, "
                       f"{'eager' if s.eager else 'flex' if s.flex else 'sdpa'}, "
                       f"{'fp32' if a == F32 else 'autocast ' + str(a * 8) + '-bit'})",
        "autocast weight copies": f"{'bf16/fp16' if a != F32 else ''} casts of weights alive {where}",
        "gradients": f"fp32 gradients alive {where}" + (f" (sharded / {grad_div})" if grad_div > 1 else ""),
        "backward temporaries": "one layer's stream gradients (2a+4)*M*H and SwiGLU gradients 3a*M*I",
        "optimizer temporaries": opt_temp_detail,
        "condition encoder activations": f"{where}: saved by its trained layers for backward, + while it runs, its "
                                         "inputs, outputs and the running stack's band mask build or one layer's "
                                         f"working set ({inputs})"
                                         + ("; its caption path and packing are in the text encoder's gradient path"
                                            if text is not None else ""),
        "text encoder activations": f"{where}: saved for backward by every layer of the LoRA'd text encoder "
                                    f"({len(ts.text.layers) if ts.text else 0} layers on {batch} x "
                                    f"{0 if isinstance(cond, int) else cond.text} caption tokens; its gradient "
                                    "reaches the LoRA through them), + while it runs, the embeddings and one "
                                    "layer's working set",
    }
    for name, value in parts.items():
        terms.append(Term(name, int(value), details[name]))
    if fsdp or zero == 3:
        gathered = 2 * F32 * max(lt.params for lt in ts.layers)
        terms.append(Term("gathered layers", gathered,
                          "unsharded fp32 weights of the running and the prefetched layer"))
    return MemoryEstimate(terms)
