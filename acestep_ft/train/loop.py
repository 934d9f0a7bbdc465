"""The one training loop: micro-batches -> loss -> accumulate -> clip -> step -> log -> checkpoint.

Accelerate owns devices, autocast and gradient accumulation; LoRA and full fine-tuning differ only in which module
is passed in. Everything the loop needs arrives as plain objects, so tests can drive it directly.
"""

from __future__ import annotations

import math
import resource
import sys
import time
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Optional

import torch
from accelerate import Accelerator
from torch import nn
from tqdm.auto import tqdm

from acestep_ft.config import ObjectiveConfig, TrainConfig
from acestep_ft.train.ema import Ema
from acestep_ft.train.metrics import MetricsSink
from acestep_ft.train.step import flow_matching_loss


@dataclass
class LoopParts:
    """What one run trains: built by run.py, consumed by `train_loop`."""

    accelerator: Accelerator
    decoder: nn.Module                 # prepared trainable decoder (PEFT-wrapped for LoRA)
    null_embedding: torch.Tensor       # [1, 1, H_enc] on the device
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    batches: Any                       # Prefetcher: next() -> (Batch on the device, seconds waited for it)
    objective: ObjectiveConfig
    timestep_mu: float
    timestep_sigma: float
    ema: Optional[Ema] = None          # averaged weights, updated after each optimizer step


def peak_memory_gb(device: torch.device) -> Dict[str, float]:
    """Peak memory so far: CUDA allocator peak on a GPU, resident-set peak of this process on CPU."""
    if device.type == "cuda":
        return {"mem/peak_alloc_gb": torch.cuda.max_memory_allocated(device) / 2**30}
    kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    return {"mem/host_peak_rss_gb": kib / 2**20}


def train_loop(
    parts: LoopParts,
    cfg: TrainConfig,
    start_step: int,
    sink: MetricsSink,
    save: Callable[[int], None],
    grad_clip: float,
) -> List[float]:
    """Run optimizer steps from `start_step` to `cfg.max_steps` (or `cfg.stop_at_step`); returns per-step losses."""
    acc = parts.accelerator
    stop = min(cfg.max_steps, cfg.stop_at_step) if cfg.stop_at_step is not None else cfg.max_steps
    params = [p for p in parts.decoder.parameters() if p.requires_grad]
    losses: List[float] = []
    bar = tqdm(total=cfg.max_steps, initial=start_step, disable=not acc.is_main_process, desc="train",
               unit="step", dynamic_ncols=True, file=sys.stdout, mininterval=1.0)
    parts.decoder.train()
    step = start_step
    while step < stop:
        started = time.perf_counter()
        step_loss, samples, frames, padded, waited, grad_norm = 0.0, 0, 0, 0, 0.0, float("nan")
        for _ in range(cfg.grad_accum):
            batch, wait_s = parts.batches.next()
            waited += wait_s
            with acc.accumulate(parts.decoder):
                loss = flow_matching_loss(parts.decoder, parts.null_embedding, batch, parts.objective,
                                          parts.timestep_mu, parts.timestep_sigma)
                acc.backward(loss)
                if acc.sync_gradients:
                    grad_norm = float(acc.clip_grad_norm_(params, grad_clip if grad_clip > 0 else math.inf))
                parts.optimizer.step()
                parts.optimizer.zero_grad(set_to_none=True)
            step_loss += float(acc.reduce(loss.detach(), "mean")) / cfg.grad_accum
            samples += len(batch.keys) * acc.num_processes
            frames += int(batch.attention_mask.sum()) * acc.num_processes
            padded += batch.attention_mask.numel() * acc.num_processes
        if not math.isfinite(step_loss):
            raise FloatingPointError(
                f"loss became {step_loss} at step {step + 1} (last batch: samples {batch.keys}). If the data may hold "
                f"NaN/Inf, check it with `python -m acestep_ft.data.validate --dataset-dir DIR`; otherwise lower "
                f"optim.lr, keep optim.grad_clip > 0, or use hardware.mixed_precision=bf16 instead of fp16. The last "
                f"good checkpoint is in the run directory."
            )
        lrs = {f"train/lr/{g['name']}": g["lr"] for g in parts.optimizer.param_groups}
        lr = parts.scheduler.get_last_lr()[0]
        step += 1
        if not acc.optimizer_step_was_skipped:  # fp16: the scaler skipped an inf/nan step; keep the LR in place
            parts.scheduler.step()
            if parts.ema is not None:
                parts.ema.update(step)
        losses.append(step_loss)
        elapsed = time.perf_counter() - started
        if step % cfg.log_every == 0 or step == stop:
            sink.log(step, {
                "train/loss": step_loss,
                "train/lr": lr,  # the first group's
                **(lrs if len(lrs) > 1 else {}),
                "train/grad_norm": grad_norm,
                "perf/step_time_s": elapsed,
                "perf/samples_per_s": samples / elapsed,
                "perf/frames_per_s": frames / elapsed,
                "data/pad_frac": 1.0 - frames / padded,  # latent frames of the batch that are padding
                "data/stall_frac": waited / elapsed,  # share of the step spent waiting for input
                **peak_memory_gb(acc.device),
            })
        bar.set_postfix(loss=f"{step_loss:.4f}", lr=f"{lr:.2e}", refresh=False)
        bar.update(1)
        if step % cfg.save_every == 0 or step == stop:
            save(step)
    bar.close()
    return losses
