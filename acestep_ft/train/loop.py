"""The one training loop: micro-batches -> loss -> accumulate -> clip -> (finite?) step -> log -> checkpoint.

Accelerate owns devices, autocast and gradient accumulation; LoRA and full fine-tuning differ only in which module
is passed in. Everything the loop needs arrives as plain objects, so tests can drive it directly.
"""

from __future__ import annotations

import math
import resource
import signal
import sys
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional, Tuple

import torch
from accelerate import Accelerator
from accelerate.utils import DistributedType
from torch import nn
from tqdm.auto import tqdm

from acestep_ft.config import NonfinitePolicy, ObjectiveConfig, TrainConfig
from acestep_ft.errors import UserError
from acestep_ft.train.early_stop import EarlyStopping
from acestep_ft.train.ema import Ema
from acestep_ft.train.lifecycle import StopSignals
from acestep_ft.train.metrics import MetricsSink
from acestep_ft.train.optim import optimizer_metrics, training_mode
from acestep_ft.train.step import Encode, flow_matching_loss
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
    stop: Optional[StopSignals] = None  # stop requests by signal (None: signals keep their default action)
    nonfinite_skips: int = 0           # non-finite steps dropped so far (restored on resume)
    nonfinite_in_a_row: int = 0        # of those, the latest consecutive ones (restored on resume)
    encode: Optional[Encode] = None    # the condition encoder, for data that carries its inputs (else None)


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
    save: Callable[[int, Optional[str]], None],
    grad_clip: float,
) -> List[float]:
    """Run optimizer steps from `start_step` to `cfg.max_steps` (or `cfg.stop_at_step`, an early stop, a stop signal
    or a non-finite halt); returns the per-step losses.

    After a step: validate every `cfg.val_every` steps (0 = every epoch) and at the end, generate samples every
    `cfg.samples.every_epochs` epochs and at the end (max_steps, not stop_at_step: a split run evaluates exactly
    when the uninterrupted one does), then `save(step, note)` every `cfg.save_every` steps, at the end, at a new best
    validation loss, when stopping early and when a stop signal arrived (`parts.stop`, agreed by all processes).

    A non-finite loss or gradient norm is caught before the optimizer applies it: `cfg.nonfinite=halt` saves the last
    finite state (noted as such) and raises UserError; `skip` drops the step (no update, no scheduler / EMA step) and
    halts the same way after `cfg.max_nonfinite_skips` such steps in a row.
    """
    acc = parts.accelerator
    stop = min(cfg.max_steps, cfg.stop_at_step) if cfg.stop_at_step is not None else cfg.max_steps
    val_every = cfg.val_every or parts.steps_per_epoch
    sample_every = cfg.samples.every_epochs * parts.steps_per_epoch
    params = [p for p in parts.decoder.parameters() if p.requires_grad]
    # DeepSpeed applies the update inside backward(): a non-finite step cannot be held back there
    can_hold_back = acc.distributed_type != DistributedType.DEEPSPEED
    losses: List[float] = []
    bar = tqdm(total=cfg.max_steps, initial=start_step, disable=not acc.is_main_process, desc="train",
               unit="step", dynamic_ncols=True, file=sys.stdout, mininterval=1.0)
    parts.decoder.train()
    training_mode(parts.optimizer)  # schedule-free: weights at the training point y (a resumed one already is)
    step, saved_at = start_step, None
    if parts.early_stop.should_stop:
        acc.print(f"early stop: the resumed run had already stopped at step {step} (train.early_stop.patience="
                   f"{cfg.early_stop.patience}); raise the patience to continue")
        stop = step
    with bar:  # closed on the way out, so an error message starts on its own line
        while step < stop:
            started = time.perf_counter()
            out = accumulate_and_step(parts, cfg.grad_accum, params, grad_clip, step, can_hold_back)
            step_loss, grad_norm, improved = out.loss, out.grad_norm, False
            if not out.applied:
                parts.nonfinite_skips += 1
                parts.nonfinite_in_a_row += 1
                what = (f"non-finite loss {step_loss} / gradient norm {grad_norm} at step {step + 1} (samples "
                        f"{out.bad_keys})")
                if cfg.nonfinite == NonfinitePolicy.halt or parts.nonfinite_in_a_row >= cfg.max_nonfinite_skips:
                    # the checkpoint of this step, when one was just written, is the last finite state already
                    halt_on_nonfinite(parts, cfg, step, what, save if can_hold_back and saved_at != step else None,
                                      saved_at == step)
                tqdm.write(f"{what}: step skipped, no update ({parts.nonfinite_in_a_row} in a row, "
                           f"{parts.nonfinite_skips} in all; train.nonfinite=skip halts at {cfg.max_nonfinite_skips} "
                           "in a row)")
            else:
                parts.nonfinite_in_a_row = 0
                lrs = {f"train/lr/{g['name']}": g["lr"] for g in parts.optimizer.param_groups}
                lr = parts.scheduler.get_last_lr()[0]
                step += 1
                if not acc.optimizer_step_was_skipped:  # fp16: the scaler skipped an inf/nan step; keep the LR
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
                        **optimizer_metrics(parts.optimizer),  # e.g. Prodigy's step size estimate d
                        "perf/step_time_s": elapsed,
                        "perf/samples_per_s": out.samples / elapsed,
                        "perf/frames_per_s": out.frames / elapsed,
                        "data/pad_frac": 1.0 - out.frames / out.padded,  # latent frames of the batch: padding
                        "data/stall_frac": out.waited / elapsed,  # share of the step spent waiting for input
                        **peak_memory_gb(acc.device),
                        **({"train/nonfinite_skips": parts.nonfinite_skips}
                           if cfg.nonfinite == NonfinitePolicy.skip else {}),
                    }
                if parts.validate is not None and (step % val_every == 0 or step == cfg.max_steps):
                    val_loss = parts.validate()
                    improved = parts.early_stop.update(val_loss, step)
                    metrics.update({"val/loss": val_loss, "val/best": parts.early_stop.best})
                if parts.generate is not None and sample_every and (step % sample_every == 0
                                                                    or step == cfg.max_steps):
                    metrics.update(parts.generate(step))
                if metrics:
                    sink.log(step, metrics)
                bar.set_postfix(loss=f"{step_loss:.4f}", lr=f"{lr:.2e}", refresh=False)
                bar.update(1)
            stopping = parts.early_stop.should_stop
            signalled = parts.stop.agreed(acc) if parts.stop is not None else None  # collective (processes agree)
            if out.applied and (step % cfg.save_every == 0 or step == stop or improved or stopping) or signalled:
                save(step, f"stopped by {signal.Signals(signalled).name}" if signalled else None)
                saved_at = step
            if stopping:
                acc.print(f"early stop at step {step}: no validation improvement of more than "
                           f"{cfg.early_stop.min_delta} in {cfg.early_stop.patience} evaluations; best "
                           f"{parts.early_stop.best:.6f} at step {parts.early_stop.best_step}")
                break
            if signalled:
                acc.print(f"stopped by {signal.Signals(signalled).name} after step {step}: checkpoint saved")
                break
    return losses


@dataclass
class StepOutcome:
    """One optimizer step's worth of micro-batches."""

    loss: float            # mean micro-batch loss, averaged over processes
    grad_norm: float       # before clipping (nan when the strategy does not report it)
    applied: bool          # False: a non-finite loss or gradient, the update was held back
    bad_keys: List[str]    # samples of the non-finite micro-batches (else of the last one)
    samples: int           # over all processes
    frames: int            # real latent frames, over all processes
    padded: int            # frames including padding, over all processes
    waited: float          # seconds spent waiting for input


def accumulate_and_step(parts: LoopParts, grad_accum: int, params: List[nn.Parameter], grad_clip: float,
                        step: int, can_hold_back: bool) -> StepOutcome:
    """`grad_accum` micro-batches -> backward -> clip -> optimizer step, unless the loss or the gradient norm is
    non-finite (then the gradients are dropped and nothing is applied; DeepSpeed steps inside backward regardless).
    The loss is reduced over processes per micro-batch, so every process takes the same decision."""
    acc = parts.accelerator
    out = StepOutcome(0.0, float("nan"), False, [], 0, 0, 0, 0.0)
    for _ in range(grad_accum):
        batch, wait_s = parts.batches.next()
        out.waited += wait_s
        with acc.accumulate(parts.decoder):
            loss = flow_matching_loss(parts.decoder, parts.null_embedding, batch, parts.objective,
                                      parts.timestep_mu, parts.timestep_sigma, encode=parts.encode)
            acc.backward(loss)
            micro_loss = float(acc.reduce(loss.detach(), "mean"))  # collective: equal on every process
            out.loss += micro_loss / grad_accum
            out.bad_keys += [] if math.isfinite(micro_loss) else list(batch.keys)
            if acc.sync_gradients:
                drop_held_grads(parts.held, step)  # weights whose unfreeze stage has not started yet
                norm = acc.clip_grad_norm_(params, grad_clip if grad_clip > 0 else math.inf)
                out.grad_norm = float("nan") if norm is None else float(norm)  # DeepSpeed may not report one
                # fp16: the grad scaler itself skips steps with inf/nan gradients (and lowers its scale)
                grads_ok = norm is None or acc.scaler is not None or math.isfinite(out.grad_norm)
                out.applied = math.isfinite(out.loss) and grads_ok
                if out.applied or not can_hold_back:
                    parts.optimizer.step()
                elif acc.scaler is not None:  # clipping unscaled the gradients: close the scaler's step as its
                    acc.scaler.update()       # own inf/nan skip would (and lower the scale)
            parts.optimizer.zero_grad(set_to_none=True)
        out.samples += len(batch.keys) * acc.num_processes
        out.frames += int(batch.attention_mask.sum()) * acc.num_processes
        out.padded += batch.attention_mask.numel() * acc.num_processes
    out.bad_keys = out.bad_keys or list(batch.keys)
    return out


def halt_on_nonfinite(parts: LoopParts, cfg: TrainConfig, step: int, what: str,
                      save: Optional[Callable[[int, Optional[str]], None]], saved: bool = False) -> None:
    """Stop the run on a non-finite step: save the last finite state (the weights after `step`, which the bad step
    never touched) as a checkpoint noted as an emergency save, unless `saved` (the checkpoint of `step` was written
    just before the bad step, with the data position before it), then raise UserError saying what to try."""
    if save is not None:
        save(step, f"emergency save: halted on a {what}; the weights are those after step {step}, the data position "
                   "is after the failing batch")
    if saved:
        where = (f"The last finite state is checkpoint step {step}, saved just before the failing step; resuming "
                 "from it repeats that step.")
    elif save is not None:
        where = (f"The last finite state is saved as checkpoint step {step} (its note says so); resuming from it "
                 "continues after the failing batch.")
    else:
        where = "The last good checkpoint is in the run directory (DeepSpeed applied the step)."
    why = (f"{cfg.max_nonfinite_skips} non-finite steps in a row (train.nonfinite=skip)"
           if cfg.nonfinite == NonfinitePolicy.skip else "train.nonfinite=halt")
    raise UserError(
        f"training halted: {what}; {why}. {where} If the data may hold NaN/Inf, check it with `python -m "
        "acestep_ft.data.validate --dataset-dir DIR`; otherwise lower optim.lr (with train.resume=auto "
        "train.resume_strict=false), keep optim.grad_clip > 0, use hardware.mixed_precision=bf16 instead of fp16, or "
        "train.nonfinite=skip to drop such steps.")
