"""The one training loop: micro-batches -> loss -> accumulate -> clip -> step -> log -> checkpoint.

Accelerate owns devices, autocast and gradient accumulation; LoRA and full fine-tuning differ only in which module
is passed in. Everything the loop needs arrives as plain objects, so tests can drive it directly.
"""

from __future__ import annotations

import math
import resource
import sys
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional, Tuple

import torch
from accelerate import Accelerator
from torch import nn
from tqdm.auto import tqdm

from acestep_ft.config import ObjectiveConfig, TrainConfig
from acestep_ft.train.early_stop import EarlyStopping
from acestep_ft.train.ema import Ema
from acestep_ft.train.metrics import MetricsSink
from acestep_ft.train.step import flow_matching_loss
from acestep_ft.train.trainable import drop_held_grads


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
    held: List[Tuple[int, List[nn.Parameter]]] = field(default_factory=list)  # staged unfreezing: (start, params)
    steps_per_epoch: int = 1           # optimizer steps per pass over the training data
    validate: Optional[Callable[[], float]] = None  # validation loss of the current weights (None: no split)
    early_stop: EarlyStopping = field(default_factory=EarlyStopping)
    generate: Optional[Callable[[int], Dict[str, float]]] = None  # sample latents at a step; returns metrics


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
    """Run optimizer steps from `start_step` to `cfg.max_steps` (or `cfg.stop_at_step`, or an early stop); returns
    the per-step losses.

    After a step: validate every `cfg.val_every` steps (0 = every epoch) and at the end, generate samples every
    `cfg.samples.every_epochs` epochs and at the end (max_steps, not stop_at_step: a split run evaluates exactly
    when the uninterrupted one does), then checkpoint every `cfg.save_every` steps, at the end, at
    a new best validation loss and when stopping early.
    """
    acc = parts.accelerator
    stop = min(cfg.max_steps, cfg.stop_at_step) if cfg.stop_at_step is not None else cfg.max_steps
    val_every = cfg.val_every or parts.steps_per_epoch
    sample_every = cfg.samples.every_epochs * parts.steps_per_epoch
    params = [p for p in parts.decoder.parameters() if p.requires_grad]
    losses: List[float] = []
    bar = tqdm(total=cfg.max_steps, initial=start_step, disable=not acc.is_main_process, desc="train",
               unit="step", dynamic_ncols=True, file=sys.stdout, mininterval=1.0)
    parts.decoder.train()
    step = start_step
    if parts.early_stop.should_stop:
        acc.print(f"early stop: the resumed run had already stopped at step {step} (train.early_stop.patience="
                   f"{cfg.early_stop.patience}); raise the patience to continue")
        stop = step
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
                    drop_held_grads(parts.held, step)  # weights whose unfreeze stage has not started yet
                    norm = acc.clip_grad_norm_(params, grad_clip if grad_clip > 0 else math.inf)
                    grad_norm = float("nan") if norm is None else float(norm)  # DeepSpeed may not report one
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
        metrics: Dict[str, float] = {}
        if step % cfg.log_every == 0 or step == stop:
            metrics = {
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
            }
        improved = False
        if parts.validate is not None and (step % val_every == 0 or step == cfg.max_steps):
            val_loss = parts.validate()
            improved = parts.early_stop.update(val_loss, step)
            metrics.update({"val/loss": val_loss, "val/best": parts.early_stop.best})
        if parts.generate is not None and sample_every and (step % sample_every == 0 or step == cfg.max_steps):
            metrics.update(parts.generate(step))
        if metrics:
            sink.log(step, metrics)
        bar.set_postfix(loss=f"{step_loss:.4f}", lr=f"{lr:.2e}", refresh=False)
        bar.update(1)
        stopping = parts.early_stop.should_stop
        if step % cfg.save_every == 0 or step == stop or improved or stopping:
            save(step)
        if stopping:
            acc.print(f"early stop at step {step}: no validation improvement of more than "
                       f"{cfg.early_stop.min_delta} in {cfg.early_stop.patience} evaluations; best "
                       f"{parts.early_stop.best:.6f} at step {parts.early_stop.best_step}")
            break
    bar.close()
    return losses
