"""Peak memory of one real training step, traced without memory or a GPU: the ground truth the estimate is tested on.

    from acestep_ft.preflight.trace import trace_peak
    trace_peak(cfg, batch=2, frames=750, cond_len=769)   # {"peak": bytes, "Parameter": ..., "Activation": ...}

The composed config's model is built with its real modules under torch's `FakeTensorMode` (tensors carry shapes,
dtypes and storages but no data), made trainable the way `run.py` does it (PEFT LoRA or full, staged unfreezing
counted as started), given the configured optimizer, EMA and gradient checkpointing, and driven through the step
of `train/loop.py`: forward under bf16/fp16 autocast with outputs cast back to fp32 (what Accelerate wraps around
the decoder), flow-matching loss, backward, gradient clipping, optimizer step, zero_grad, EMA update. The first
step runs untracked so the optimizer state exists; torch's `MemTracker` then follows the second step and reports
the highest total of live device tensors with its breakdown (Parameter, Gradient, Optstate, Activation, Temp,
Other = the batch and the EMA copy). A 2B decoder traces in ~20 s on this CPU with little RAM.

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
"""

from __future__ import annotations

import math
import types
import warnings
from typing import Dict

import torch
from torch import nn

from acestep_ft.config import Config
from acestep_ft.data.batch import Batch
from acestep_ft.model.acestep import AceStepModel
from acestep_ft.model.variants import build_meta_model
from acestep_ft.preflight.estimate import autocast_dtype, frozen_dtype
from acestep_ft.train.ema import Ema
from acestep_ft.train.optim import build_optimizer
from acestep_ft.train.step import flow_matching_loss
from acestep_ft.train.trainable import cast_frozen_, make_trainable

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


def random_batch(cfg: Config, batch: int, frames: int, cond_len: int, device: str = "cpu") -> Batch:
    """A float32 batch of the given size (what the prefetcher hands the step)."""
    m = cfg.model
    enc = m.encoder_hidden_size or m.hidden_size
    c = m.audio_acoustic_hidden_dim
    return Batch(
        keys=[f"s{i}" for i in range(batch)],
        target_latents=torch.randn(batch, frames, c, device=device),
        attention_mask=torch.ones(batch, frames, device=device),
        encoder_hidden_states=torch.randn(batch, cond_len, enc, device=device),
        encoder_attention_mask=torch.ones(batch, cond_len, device=device),
        context_latents=torch.randn(batch, frames, m.in_channels - c, device=device),
    )


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
                    made[id(t)] = nn.Parameter(new, requires_grad=t.requires_grad) if isinstance(t, nn.Parameter) else new
                store[name] = made[id(t)]


class StepParts:
    """The trained decoder with its optimizer, EMA and batches, and `step(n)`: one optimizer step of train/loop.py."""

    def __init__(self, cfg: Config, decoder: nn.Module, foreach: bool):
        """foreach: force torch optimizers onto their multi-tensor kernels (what they pick on a CUDA GPU)."""
        self.cfg, self.decoder = cfg, decoder
        # bitsandbytes computes its quantization maps from real numbers at construction: build before any fake mode
        self.optimizer = build_optimizer(decoder, cfg.optim)
        if foreach:
            for group in self.optimizer.param_groups:
                if "foreach" in group:
                    group["foreach"] = True
        self.params = [p for p in decoder.parameters() if p.requires_grad]

    def load(self, batch: int, frames: int, cond_len: int, device: str, batches: int) -> None:
        """EMA copy, null embedding and `batches` random batches on `device` (inside the fake mode when tracing)."""
        cfg, decoder = self.cfg, self.decoder
        self.ema = None
        if cfg.train.ema.enabled:
            self.ema = Ema([(n, p) for n, p in decoder.named_parameters() if p.requires_grad], cfg.train.ema)
        self.module = _Autocast(decoder, autocast_dtype(cfg.hardware.mixed_precision), device.split(":")[0])
        enc = cfg.model.encoder_hidden_size or cfg.model.hidden_size
        self.null_embedding = torch.randn(1, 1, enc, device=device)
        self.batches = [random_batch(cfg, batch, frames, cond_len, device) for _ in range(batches)]

    def step(self, n: int) -> None:
        cfg = self.cfg
        loss = flow_matching_loss(self.module, self.null_embedding, self.batches[0], cfg.objective,
                                  cfg.model.timestep_mu, cfg.model.timestep_sigma)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.params, cfg.optim.grad_clip if cfg.optim.grad_clip > 0 else math.inf)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        if self.ema is not None:
            self.ema.update(n)

    def resident(self) -> list:
        """What lives on the device between steps besides the decoder: optimizer, EMA copy, batches."""
        tensors = [self.null_embedding] + [t for b in self.batches for t in b.tensors()]
        if self.ema is not None and not self.cfg.train.ema.on_cpu:
            tensors += list(self.ema.shadow.values())
        return [self.optimizer] + tensors


def trained_decoder(cfg: Config, meta: bool) -> nn.Module:
    """The decoder the loop trains (PEFT-wrapped for LoRA), checkpointing as configured, LoRA dropout as on CUDA.

    meta: built on the meta device (for the fake trace: PEFT must wrap before the fake mode, since fake tensors
    refuse Module.to); else randomly initialised in host RAM like `load_model` without a path."""
    model = build_meta_model(cfg.model) if meta else AceStepModel(cfg.model)
    if meta and str(cfg.model.attn_implementation) == "flex":
        # MemTracker has no rule for the flex_attention operator, and torch has no flex backward on the CPU: trace
        # the SDPA path (the estimate's flex terms are SDPA's without the N^2 band bias and mask)
        model.set_attn_implementation("sdpa")
    model.decoder.gradient_checkpointing = cfg.hardware.gradient_checkpointing
    decoder = make_trainable(model, cfg.mode)
    cast_frozen_(model, frozen_dtype(cfg))  # as run.py does, for the device the config names
    if meta:
        from peft.tuners.lycoris_utils import LycorisLayer

        for module in decoder.modules():
            if type(module) is nn.Dropout:
                module.__class__ = _FusedDropout
            if isinstance(module, LycorisLayer):
                module.forward = types.MethodType(_every_module_kept, module)
    return decoder.train()


def trace_peak(cfg: Config, batch: int, frames: int, cond_len: int, foreach: bool = True) -> Dict[str, int]:
    """Peak device bytes of a steady-state training step of `cfg` on a micro-batch [batch, frames] with condition
    length `cond_len`, traced on fake tensors: {"peak": total, "Parameter", "Buffer", "Gradient", "Activation",
    "Temp", "Optstate", "Other": bytes of each at the moment of the peak}."""
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.distributed._tools.mem_tracker import MemTracker

    decoder = trained_decoder(cfg, meta=True)
    fake = FakeTensorMode(allow_non_fake_inputs=True)
    with fake:
        fake_parameters_(decoder)
    parts = StepParts(cfg, decoder, foreach)
    with fake, warnings.catch_warnings():
        warnings.simplefilter("ignore")  # optimizer notes about fake tensors
        parts.load(batch, frames, cond_len, "cpu", PREFETCH_BATCHES if cfg.hardware.device_prefetch else 1)
        parts.step(1)  # creates the optimizer state; step 2 is the steady state
        tracker = MemTracker()
        tracker.track_external(decoder, *parts.resident())
        # MemTracker hooks every parameter of a module it sees run to catch its gradient, and torch refuses hooks on
        # frozen tensors: mark those as hooked already (they never get a gradient).
        for p in decoder.parameters():
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


def measure_peak_cuda(cfg: Config, batch: int, frames: int, cond_len: int) -> Dict[str, int]:
    """The same step run for real on the current CUDA GPU: {"peak": torch.cuda.max_memory_allocated during the
    second step, "resident": memory allocated before it}. The decoder, optimizer state, EMA and batches are the
    only things on the GPU, as in run.py (with device prefetch, its extra batches are allocated up front)."""
    torch.manual_seed(0)
    decoder = trained_decoder(cfg, meta=False).to("cuda")
    parts = StepParts(cfg, decoder, foreach=False)
    parts.load(batch, frames, cond_len, "cuda", PREFETCH_BATCHES if cfg.hardware.device_prefetch else 1)
    parts.step(1)
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    resident = torch.cuda.memory_allocated()
    parts.step(2)
    torch.cuda.synchronize()
    out = {"peak": int(torch.cuda.max_memory_allocated()), "resident": int(resident)}
    del parts, decoder
    torch.cuda.empty_cache()
    return out
