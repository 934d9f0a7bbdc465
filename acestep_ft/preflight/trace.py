"""Peak memory of one real training step, traced without memory or a GPU: the ground truth the estimate is tested on.

    from acestep_ft.preflight.trace import trace_peak
    trace_peak(cfg, batch=2, frames=750, cond=769)       # {"peak": bytes, "Parameter": ..., "Activation": ...}
    trace_peak(cfg, 2, 750, InputLengths(text=256, lyric=512, refs=1, ref_frames=1))  # conditions=encoder_inputs

The composed config's model is built with its real modules under torch's `FakeTensorMode` (tensors carry shapes,
dtypes and storages but no data), made trainable the way `run.py` does it (PEFT LoRA or full, staged unfreezing
counted as started; a condition_encoder stage trains `DecoderAndEncoder`), given the configured optimizer, EMA and
gradient checkpointing, and driven through the step of `train/loop.py`: forward under bf16/fp16 autocast with outputs
cast back to fp32 (what Accelerate wraps around the decoder), flow-matching loss, backward, gradient clipping,
optimizer step, zero_grad, EMA update. With dataset.conditions=encoder_inputs the batch holds the condition
encoder's inputs and the step first runs `Conditioner` (train/conditioning.py: the model's encoder and a token table
of model.text_vocab_size x model.text_hidden_dim in the frozen dtype) under autocast, as run.py's
`condition_encoder`; with mode.text_encoder=lora the Qwen3 text encoder (built from the config.json in
model.text_encoder_path on the meta device, `meta_text_model`) joins the trained module with its LoRA, and the
Conditioner runs it on the batch's caption token ids with autograd, as in training. The first step runs untracked
so the optimizer state exists; torch's `MemTracker` then follows the second step and reports the highest total of
live device tensors with its breakdown (Parameter, Gradient, Optstate, Activation, Temp, Other = the batch and the
EMA copy). A 2B decoder traces in ~20 s on this CPU with little RAM (~1-2 min with the condition encoder or LoRA
when two cores are shared; several more with the 28 layers of a real-size text encoder).

What differs from a CUDA run, and how it is handled:
- Fake CUDA tensors cannot run modules on a CPU build of torch, so the step runs on the CPU device with CPU
  autocast. Its casting lists match CUDA's for everything the decoder calls (linear, conv, matmul and SDPA in low
  precision; the model itself keeps norms, softmax and the loss in fp32); the CUDA allocator's 512-byte rounding is
  not applied (negligible for these tensor sizes).
- torch's AdamW picks the multi-tensor ("foreach") kernels on a CUDA GPU and a per-tensor loop on the CPU; `foreach`
  (default True) forces the CUDA choice so its temporaries are traced.
- LoKr / LoHa module dropout is traced as keeping every module (the higher-memory case).
- Dropout (LoRA's) uses torch's fused kernel, as on CUDA: it keeps a 1-byte mask where the CPU path keeps a noise
  tensor of the input's dtype.
- One process only: DDP buckets, FSDP and DeepSpeed sharding are modeled by the estimate alone.
- With hardware.device_prefetch the CUDA prefetcher keeps up to three more batches on the device; they are added
  as extra batch tensors.
- Data-dependent branches of the condition encoder's step cannot run on fake tensors: the lyric id range check
  (skipped: the ids are drawn in range), `unpack_by_owner`'s reference counts (replaced by the same tensors built
  from the known R references per sample) and `as_stored`'s removal of batch padding (the identity here: every
  sample of the traced batch is as long as the batch, so there is none).
"""

from __future__ import annotations

import contextlib
import math
import types
import warnings
from typing import Dict, Iterator, Optional, Tuple
from unittest import mock

import torch
from torch import nn

from acestep_ft.config import Config
from acestep_ft.data.batch import Batch
from acestep_ft.model import encoder as encoder_module
from acestep_ft.model.acestep import AceStepModel
from acestep_ft.model.variants import build_meta_model
from acestep_ft.preflight.dtypes import autocast_dtype, frozen_dtype
from acestep_ft.preflight.encoder_terms import Condition, InputLengths, condition_lengths, runs_encoder
from acestep_ft.train import conditioning
from acestep_ft.train.conditioning import Conditioner
from acestep_ft.train.ema import Ema
from acestep_ft.train.optim import build_optimizer
from acestep_ft.train.step import flow_matching_loss
from acestep_ft.train.text_encoder import load_text_model, meta_text_model, trains_text_encoder
from acestep_ft.train.trainable import DecoderAndEncoder, cast_frozen_, make_trainable, text_encoder_of

# Batches alive on the device with hardware.device_prefetch: the one in use + the queue (depth 2) + the one the
# worker thread holds while it waits for a free queue slot (acestep_ft/data/prefetch.py).
PREFETCH_BATCHES = 4


class _Autocast(nn.Module):
    """What Accelerate does to the prepared decoder: its forward under autocast, floating outputs cast to fp32."""

    def __init__(self, inner: nn.Module, dtype: torch.dtype | None, device_type: str):
        super().__init__()
        self.inner, self.dtype, self.device_type = inner, dtype, device_type

    def forward(self, **kwargs):
        if self.dtype is None:
            return self.inner(**kwargs)
        with torch.autocast(self.device_type, dtype=self.dtype):
            out = self.inner(**kwargs)
        return out.float()


def random_batch(cfg: Config, batch: int, frames: int, cond: Condition, device: str = "cpu") -> Batch:
    """A float32 batch of the given size (what the prefetcher hands the step): with the condition encoder's outputs
    (`cond` = L), or its inputs (`cond` = InputLengths; dataset.conditions=encoder_inputs): caption states
    [B, Lt, D_text] (and with mode.text_encoder=lora caption token ids [B, Lt] int64), lyric ids [B, Ll] int64 in
    the text vocabulary, R references [B*R, Tr, 64] per sample, every sample as long as the batch (the worst case:
    no padding to drop)."""
    m = cfg.model
    enc = m.encoder_hidden_size or m.hidden_size
    c = m.audio_acoustic_hidden_dim
    common = dict(keys=[f"s{i}" for i in range(batch)],
                  target_latents=torch.randn(batch, frames, c, device=device),
                  attention_mask=torch.ones(batch, frames, device=device),
                  context_latents=torch.randn(batch, frames, m.in_channels - c, device=device))
    lengths = condition_lengths(cfg, cond)
    if isinstance(lengths, int):
        return Batch(**common, encoder_hidden_states=torch.randn(batch, lengths, enc, device=device),
                     encoder_attention_mask=torch.ones(batch, lengths, device=device))
    refs = batch * lengths.refs
    text_ids = None
    if trains_text_encoder(cfg.mode):  # what the text encoder runs on
        text_ids = torch.randint(0, m.text_vocab_size, (batch, lengths.text), device=device)
    return Batch(**common, encoder_hidden_states=None, encoder_attention_mask=None, text_token_ids=text_ids,
                 text_hidden_states=torch.randn(batch, lengths.text, m.text_hidden_dim, device=device),
                 text_attention_mask=torch.ones(batch, lengths.text, device=device),
                 lyric_token_ids=torch.randint(0, m.text_vocab_size, (batch, lengths.lyric), device=device),
                 lyric_attention_mask=torch.ones(batch, lengths.lyric, device=device),
                 refer_audio_latents=torch.randn(refs, lengths.ref_frames, m.timbre_hidden_dim, device=device),
                 refer_audio_order=torch.arange(batch, device=device).repeat_interleave(lengths.refs),
                 text_lengths=torch.full((batch,), lengths.text, device=device),
                 lyric_lengths=torch.full((batch,), lengths.lyric, device=device))


class _FusedDropout(nn.Dropout):
    """Dropout as CUDA runs it: torch's fused kernel keeps a bool mask for backward. On the CPU `F.dropout` multiplies
    by a noise tensor of the input's dtype and keeps that (4 bytes per element for PEFT's fp32-cast LoRA input)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p == 0:
            return x
        return torch.native_dropout(x, self.p, True)[0]


def _every_module_kept(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
    """A PEFT LoKr / LoHa layer's training forward when module_dropout keeps the module (the costlier case). PEFT draws
    `torch.rand(1) > module_dropout` to decide, a data-dependent branch fake tensors cannot take."""
    result = self.base_layer(x, *args, **kwargs)
    for adapter in self.active_adapters:
        if adapter in self._available_adapters:
            result = result + self._get_delta_activations(adapter, x, *args, **kwargs)
    return result.to(x.dtype)


def _unpack_known(batch: int, refs: int):
    """`encoder.unpack_by_owner` for `refs` references per sample in batch order, without reading the owners back
    (`.item()`, which fake tensors refuse): the same [B, R, D] output and [B, R] mask, built by the same ops."""

    def unpack(packed: torch.Tensor, owner: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        slot = torch.arange(refs, device=packed.device).repeat(batch)  # [N] position of each row within its owner
        out = packed.new_zeros(batch, refs, packed.shape[1]).index_put((owner.long(), slot), packed)
        mask = torch.zeros(batch, refs, dtype=torch.long, device=packed.device)
        mask[owner.long(), slot] = 1
        return out, mask

    return unpack


class _NoHook:
    def remove(self) -> None:
        pass


def fake_parameters_(module: nn.Module) -> None:
    """Replace every meta parameter and buffer of `module` by a CPU tensor of the active fake mode (same shape, dtype
    and requires_grad; a tensor shared by several modules stays shared). `Module.to` cannot do this: it would try to
    swap tensor internals, which fake tensors refuse."""
    made: Dict[int, torch.Tensor] = {}
    for mod in module.modules():
        for store in (mod._parameters, mod._buffers):
            for name, t in list(store.items()):
                if t is None:
                    continue
                if id(t) not in made:
                    new = torch.empty(t.shape, dtype=t.dtype)
                    is_param = isinstance(t, nn.Parameter)
                    made[id(t)] = nn.Parameter(new, requires_grad=t.requires_grad) if is_param else new
                store[name] = made[id(t)]


class StepParts:
    """The trained module with its optimizer, EMA, batches and (encoder_inputs data) the conditioner, and `step(n)`:
    one optimizer step of train/loop.py."""

    def __init__(self, cfg: Config, trained: nn.Module, foreach: bool):
        """foreach: force torch optimizers onto their multi-tensor kernels (what they pick on a CUDA GPU)."""
        self.cfg, self.trained = cfg, trained
        # bitsandbytes computes its quantization maps from real numbers at construction: build before any fake mode
        self.optimizer = build_optimizer(trained, cfg.optim)
        if foreach:
            for group in self.optimizer.param_groups:
                if "foreach" in group:
                    group["foreach"] = True
        self.params = [p for p in trained.parameters() if p.requires_grad]

    def load(self, batch: int, frames: int, cond: Condition, device: str, batches: int,
             conditioner: Optional[Conditioner]) -> None:
        """EMA copy, null embedding and `batches` random batches on `device` (inside the fake mode when tracing);
        `conditioner` (encoder_inputs: the encoder and token table, on `device`) runs first in every step."""
        cfg, trained = self.cfg, self.trained
        self.ema = None
        if cfg.train.ema.enabled:
            self.ema = Ema([(n, p) for n, p in trained.named_parameters() if p.requires_grad], cfg.train.ema)
        self.device_type = device.split(":")[0]
        self.module = _Autocast(trained, autocast_dtype(cfg.hardware.mixed_precision), self.device_type)
        enc = cfg.model.encoder_hidden_size or cfg.model.hidden_size
        self.null_embedding = torch.randn(1, 1, enc, device=device)
        self.batches = [random_batch(cfg, batch, frames, cond, device) for _ in range(batches)]
        self.conditioner = conditioner

    def encode(self, batch: Batch) -> Tuple[torch.Tensor, torch.Tensor]:
        """The conditioner under the run's autocast (run.py `condition_encoder`)."""
        dtype = autocast_dtype(self.cfg.hardware.mixed_precision)
        with torch.autocast(self.device_type, dtype=dtype) if dtype is not None else contextlib.nullcontext():
            return self.conditioner(batch)

    def step(self, n: int) -> None:
        cfg = self.cfg
        loss = flow_matching_loss(self.module, self.null_embedding, self.batches[0], cfg.objective,
                                  cfg.model.timestep_mu, cfg.model.timestep_sigma,
                                  encode=self.encode if self.conditioner is not None else None)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.params, cfg.optim.grad_clip if cfg.optim.grad_clip > 0 else math.inf)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        if self.ema is not None:
            self.ema.update(n)

    def resident(self) -> list:
        """What lives on the device between steps besides the trained module: optimizer, conditioner (encoder
        weights and token table), EMA copy, batches."""
        tensors = [self.null_embedding] + [t for b in self.batches for t in b.tensors()]
        if self.ema is not None and not self.cfg.train.ema.on_cpu:
            tensors += list(self.ema.shadow.values())
        return [self.optimizer] + ([self.conditioner] if self.conditioner is not None else []) + tensors


def trained_model(cfg: Config, meta: bool) -> Tuple[AceStepModel, nn.Module]:
    """(the model, the module the loop trains: the PEFT-wrapped decoder, the decoder, or `DecoderAndEncoder`, which
    holds the text encoder with mode.text_encoder=lora), checkpointing as configured, frozen weights in the frozen
    dtype, LoRA dropout as on CUDA.

    meta: built on the meta device (for the fake trace: PEFT must wrap before the fake mode, since fake tensors
    refuse Module.to); else randomly initialised in host RAM like `load_model` without a path (the text encoder
    loaded from model.text_encoder_path)."""
    model = build_meta_model(cfg.model) if meta else AceStepModel(cfg.model)
    if meta and str(cfg.model.attn_implementation) == "flex":
        # MemTracker has no rule for the flex_attention operator, and torch has no flex backward on the CPU: trace
        # the SDPA path (the estimate's flex terms are SDPA's without the N^2 band bias and mask)
        model.set_attn_implementation("sdpa")
    model.decoder.gradient_checkpointing = cfg.hardware.gradient_checkpointing
    text = None
    if trains_text_encoder(cfg.mode):  # the Qwen3 text encoder joins the trained module (text_encoder.*)
        text = meta_text_model(cfg.model) if meta else load_text_model(cfg.model)
    trained = make_trainable(model, cfg.mode, text)
    for module in (model, text):  # as run.py does, for the device the config names
        if module is not None:
            cast_frozen_(module, frozen_dtype(cfg))
    if meta:
        from peft.tuners.lycoris_utils import LycorisLayer

        for module in trained.modules():
            if type(module) is nn.Dropout:
                module.__class__ = _FusedDropout
            if isinstance(module, LycorisLayer):
                module.forward = types.MethodType(_every_module_kept, module)
    return model, trained.train()


def _on_device(cfg: Config, model: AceStepModel, trained: nn.Module) -> list:
    """The modules run.py puts on the device: the trained module (with the text encoder when its LoRA trains), and
    for encoder_inputs data the condition encoder (part of the trained module when it trains)."""
    parts = [trained]
    if runs_encoder(cfg) and not (isinstance(trained, DecoderAndEncoder) and trained.encoder is not None):
        parts.append(model.encoder)
    return parts


@contextlib.contextmanager
def _fake_safe_encoder(batch: int, lengths: Condition) -> Iterator[None]:
    """For encoder_inputs batches: the condition encoder's data-dependent steps replaced (see the module docstring)."""
    if not isinstance(lengths, InputLengths):
        yield
        return
    with (mock.patch.object(encoder_module, "unpack_by_owner", _unpack_known(batch, lengths.refs)),
          mock.patch.object(conditioning, "as_stored", _unpadded)):
        yield


def _unpadded(hidden: torch.Tensor, mask: torch.Tensor, batch: Batch) -> Tuple[torch.Tensor, torch.Tensor]:
    """`conditioning.as_stored` for a batch without padding between its samples (random_batch's): the rows as they
    are."""
    return hidden, mask


def trace_peak(cfg: Config, batch: int, frames: int, cond: Condition, foreach: bool = True) -> Dict[str, int]:
    """Peak device bytes of a steady-state training step of `cfg` on a micro-batch [batch, frames] with condition
    `cond` (L, or the InputLengths of encoder_inputs data), traced on fake tensors: {"peak": total, "Parameter",
    "Buffer", "Gradient", "Activation", "Temp", "Optstate", "Other": bytes of each at the moment of the peak}."""
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.distributed._tools.mem_tracker import MemTracker

    lengths = condition_lengths(cfg, cond)
    model, trained = trained_model(cfg, meta=True)
    fake = FakeTensorMode(allow_non_fake_inputs=True)
    with fake:
        for module in _on_device(cfg, model, trained):
            fake_parameters_(module)
    parts = StepParts(cfg, trained, foreach)
    with fake, warnings.catch_warnings(), _fake_safe_encoder(batch, lengths):
        warnings.simplefilter("ignore")  # optimizer notes about fake tensors
        conditioner = None
        if isinstance(lengths, InputLengths):
            table = torch.empty(cfg.model.text_vocab_size, cfg.model.text_hidden_dim, dtype=frozen_dtype(cfg))
            # the ids of `random_batch` lie in the table: no range check (a data-dependent branch fake tensors refuse)
            conditioner = Conditioner(model.encoder, table, text_encoder_of(trained),
                                      checked_below=cfg.model.text_vocab_size)
        parts.load(batch, frames, lengths, "cpu", PREFETCH_BATCHES if cfg.hardware.device_prefetch else 1,
                   conditioner)
        parts.step(1)  # creates the optimizer state; step 2 is the steady state
        tracker = MemTracker()
        tracker.track_external(trained, *parts.resident())
        # MemTracker hooks every parameter of a module it sees run to catch its gradient, and torch refuses hooks on
        # frozen tensors: mark those as hooked already (they never get a gradient).
        for module in _on_device(cfg, model, trained):
            for p in module.parameters():
                if not p.requires_grad:
                    tracker._param_to_grad_hook_handles[p] = (_NoHook(), _NoHook())
        with tracker:
            parts.step(2)
        snapshot = tracker.get_tracker_snapshot("peak")
    if not snapshot:
        return {"peak": 0}
    (device_snap,) = snapshot.values()
    out = {"peak": int(device_snap["Total"])}
    out.update({str(getattr(k, "value", k)): int(v) for k, v in device_snap.items() if k != "Total"})
    return out


def measure_peak_cuda(cfg: Config, batch: int, frames: int, cond: Condition) -> Dict[str, int]:
    """The same step run for real on the current CUDA GPU: {"peak": torch.cuda.max_memory_allocated during the
    second step, "resident": memory allocated before it}. The trained module (with mode.text_encoder=lora the text
    encoder), optimizer state, EMA and batches (and for encoder_inputs data the condition encoder and a random token
    table) are the only things on the GPU, as in
    run.py (with device prefetch, its extra batches are allocated up front)."""
    torch.manual_seed(0)
    lengths = condition_lengths(cfg, cond)
    model, trained = trained_model(cfg, meta=False)
    for module in _on_device(cfg, model, trained):
        module.to("cuda")
    parts = StepParts(cfg, trained, foreach=False)
    conditioner = None
    if isinstance(lengths, InputLengths):
        table = torch.randn(cfg.model.text_vocab_size, cfg.model.text_hidden_dim, device="cuda") * 0.02
        conditioner = Conditioner(model.encoder, table.to(frozen_dtype(cfg)), text_encoder_of(trained))
    parts.load(batch, frames, lengths, "cuda", PREFETCH_BATCHES if cfg.hardware.device_prefetch else 1, conditioner)
    parts.step(1)
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    resident = torch.cuda.memory_allocated()
    parts.step(2)
    torch.cuda.synchronize()
    out = {"peak": int(torch.cuda.max_memory_allocated()), "resident": int(resident)}
    del parts, trained, model, conditioner
    torch.cuda.empty_cache()
    return out
