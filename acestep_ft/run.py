"""train(cfg): the only place that wires config, data, model, trainable set, optimizer, resume and loop together.

Order: checks that need no weights -> accelerator + seed -> model -> trainable set -> data -> optimizer ->
resume -> loop -> final save and loss plot.
"""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path
from typing import List

import torch
from accelerate import Accelerator
from accelerate.utils import set_seed
from omegaconf import OmegaConf

from acestep_ft.config import Config, FullMode
from acestep_ft.data.dataset import build_dataset
from acestep_ft.data.sampler import EpochBatchSampler
from acestep_ft.model import load_model, save_full_model
from acestep_ft.train.checkpoint import (
    TrainingState, capture_rng, load_checkpoint, resolve_resume, restore_rng, save_checkpoint, signature,
)
from acestep_ft.train.loop import LoopParts, train_loop
from acestep_ft.train.metrics import METRICS_FILE, MetricsSink, plot_loss
from acestep_ft.train.optim import build_optimizer, build_scheduler
from acestep_ft.train.trainable import count_parameters, make_trainable


def check_config(cfg: Config) -> None:
    """Problems visible from the config alone, all reported at once before any weights load."""
    problems = []
    if isinstance(cfg.mode, FullMode) and not cfg.mode.i_understand_vram_risk and cfg.model.variant != "tiny":
        problems.append(
            "mode=full trains every decoder weight (~16 bytes per parameter with AdamW: ~25 GB for the 2B "
            "decoder before activations). Confirm with mode.i_understand_vram_risk=true, or use mode=lora."
        )
    if cfg.model.path is None and cfg.model.variant != "tiny":
        problems.append(
            f"model={cfg.model.variant} needs its weights: set model.path=/path/to/checkpoint-dir "
            f"(the directory with config.json and model.safetensors). Random init is only for model=tiny."
        )
    if cfg.train.grad_accum < 1 or cfg.hardware.batch_size < 1 or cfg.train.max_steps < 1:
        problems.append("train.grad_accum, hardware.batch_size and train.max_steps must be >= 1")
    if problems:
        raise SystemExit("Config check failed:\n" + "\n".join(f"  - {p}" for p in problems))


def train(cfg: Config) -> List[float]:
    """Train one run into `cfg.run_dir`; returns the per-step losses of this invocation."""
    check_config(cfg)
    run_dir = Path(cfg.run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    acc = Accelerator(
        cpu=cfg.hardware.cpu,
        mixed_precision=cfg.hardware.mixed_precision,
        gradient_accumulation_steps=cfg.train.grad_accum,
    )
    print0 = acc.print
    config_yaml = OmegaConf.to_yaml(OmegaConf.structured(cfg))
    set_seed(cfg.train.seed)

    model = load_model(cfg.model)
    decoder = make_trainable(model, cfg.mode)
    trainable, total = count_parameters(model)
    print0(f"model {cfg.model.variant}: {total / 1e6:.2f}M params, mode={cfg.mode.name}: "
           f"{trainable / 1e6:.3f}M trainable ({100 * trainable / total:.2f}%)")

    source = build_dataset(cfg.dataset, cfg.cache, encoder_width=model.null_condition_emb.shape[-1])
    sampler = EpochBatchSampler(len(source), cfg.hardware.batch_size, seed=cfg.train.seed,
                                shuffle=cfg.dataset.shuffle, rank=acc.process_index,
                                world_size=acc.num_processes)
    print0(f"data: {len(source)} samples ({cfg.dataset.kind}), batch {cfg.hardware.batch_size} x accum "
           f"{cfg.train.grad_accum} x {acc.num_processes} process(es), device {acc.device}, "
           f"precision {cfg.hardware.mixed_precision}")

    optimizer = build_optimizer(decoder, cfg.optim)
    scheduler = build_scheduler(optimizer, cfg.train.max_steps, cfg.optim)

    start_step = 0
    resume_from = resolve_resume(cfg.train.resume, run_dir)
    if resume_from is not None:
        state = load_checkpoint(resume_from, decoder, cfg.mode.name)
        optimizer.load_state_dict(state.optimizer)
        scheduler.load_state_dict(state.scheduler)
        sampler.load_state_dict(state.sampler)
        start_step = state.step
        print0(f"resumed from {resume_from} at step {start_step}")

    decoder, optimizer = acc.prepare(decoder, optimizer)
    null_embedding = model.null_condition_emb.detach().to(acc.device)
    if resume_from is not None:
        restore_rng(state.rng)  # last, so nothing above consumes random numbers after the restore

    def save(step: int) -> None:
        acc.wait_for_everyone()
        if acc.is_main_process:
            unwrapped = acc.unwrap_model(decoder)
            path = save_checkpoint(
                run_dir,
                TrainingState(step=step, optimizer=optimizer.state_dict(), scheduler=scheduler.state_dict(),
                              sampler=sampler.state_dict(), rng=capture_rng(), signature=signature(unwrapped),
                              mode=cfg.mode.name),
                unwrapped,
                save_full=lambda d: save_full_model(model, d, dtype=torch.float32),
                config_yaml=config_yaml,
                keep_last=cfg.train.keep_last,
            )
            tqdm_safe_print(acc, f"checkpoint: {path}")
        acc.wait_for_everyone()

    sink = MetricsSink(run_dir, cfg.logger, cfg.choices, OmegaConf.to_container(OmegaConf.structured(cfg)),
                       resume_step=start_step if resume_from is not None else None,
                       enabled=acc.is_main_process)
    parts = LoopParts(acc, decoder, null_embedding, optimizer, scheduler, source, sampler, cfg.objective,
                      cfg.model.timestep_mu, cfg.model.timestep_sigma)
    try:
        losses = train_loop(parts, cfg.train, start_step, sink, save, cfg.optim.grad_clip)
    finally:
        sink.close()
    if acc.is_main_process and cfg.train.plot:
        plot_loss(run_dir / METRICS_FILE, run_dir / "loss_curve.png")
    if losses:
        print0(f"done: step {start_step + len(losses)}, loss {losses[0]:.4f} -> {losses[-1]:.4f}; "
               f"run directory {run_dir.resolve()}")
    acc.end_training()
    return losses


def tqdm_safe_print(acc: Accelerator, message: str) -> None:
    from tqdm.auto import tqdm

    if acc.is_main_process:
        tqdm.write(message)
