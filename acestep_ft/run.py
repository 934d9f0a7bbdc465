"""train(cfg): the only place that wires config, data, model, trainable set, optimizer, resume and loop together.

Order: checks that need no weights -> accelerator + seed -> model -> trainable set -> data -> optimizer ->
resume -> loop -> final save and loss plot.
"""

from __future__ import annotations

import gc
import os
from dataclasses import replace
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Tuple

import torch
from accelerate import Accelerator
from accelerate.utils import gather_object, set_seed
from omegaconf import OmegaConf
from torch import nn
from tqdm.auto import tqdm

from acestep_ft.config import Config, Device, FullMode, HardwareConfig, LoraMode, MixedPrecision, PreprocessedDataset
from acestep_ft.data import BatchStream, build_dataset
from acestep_ft.data.crop import capped_lengths, seconds_to_frames
from acestep_ft.data.sampler import LengthBucketSampler
from acestep_ft.data.prefetch import Prefetcher
from acestep_ft.data.dataset import resolve_cache_policy
from acestep_ft.data.fingerprint import compare_fingerprints, make_fingerprint, read_fingerprint
from acestep_ft.model import load_model, save_full_model
from acestep_ft.model.checkpoint_io import condition_encoder_digest
from acestep_ft.model.variants import build_meta_model
from acestep_ft.train.checkpoint import (
    TrainingState, capture_rng, load_checkpoint, resolve_resume, restore_rng, save_checkpoint, signature,
)
from acestep_ft.train.ema import Ema
from acestep_ft.train.loop import LoopParts, train_loop
from acestep_ft.train.metrics import METRICS_FILE, MetricsSink, plot_loss
from acestep_ft.train.optim import build_optimizer, build_scheduler, group_table, param_groups
from acestep_ft.train.trainable import count_parameters, make_trainable


def unmatched_lora_targets(decoder: nn.Module, targets: List[str]) -> List[str]:
    """Targets that match no Linear of the decoder under PEFT's rule (name == t or name ends with "." + t)."""
    names = [n for n, m in decoder.named_modules() if isinstance(m, nn.Linear)]
    return [t for t in targets if not any(n == t or n.endswith("." + t) for n in names)]


def resolve_hardware(hw: HardwareConfig, cuda: bool, cuda_bf16: bool) -> Tuple[bool, str]:
    """(use the CPU, Accelerate mixed_precision) for the preset on a machine with or without a (bf16) CUDA GPU."""
    on_cpu = hw.device == Device.cpu or (hw.device == Device.auto and not cuda)
    precision = str(hw.mixed_precision)
    if hw.mixed_precision == MixedPrecision.auto:
        precision = "bf16" if not on_cpu and cuda_bf16 else "no"
    return on_cpu, precision


def check_config(cfg: Config, run_dir: Path) -> Optional[Path]:
    """Problems visible without loading weights, all reported at once, each with its fix.

    Returns the checkpoint to resume from (None for a fresh start).
    """
    problems = []
    if isinstance(cfg.mode, FullMode) and not cfg.mode.i_understand_vram_risk and cfg.model.variant != "tiny":
        problems.append(
            "mode=full trains every decoder weight (~16 bytes per parameter with AdamW: ~25 GB for the 2B "
            "decoder before activations). Confirm with mode.i_understand_vram_risk=true, or use mode=lora."
        )
    if cfg.model.path is None and cfg.model.variant != "tiny":
        problems.append(
            f"model variant {cfg.model.variant!r} needs its weights: set model.path=/path/to/checkpoint-dir "
            f"(the directory with config.json and model.safetensors). Random init is only for model=tiny."
        )
    if cfg.model.path is not None and not Path(os.path.expanduser(cfg.model.path)).exists():
        problems.append(f"model.path={cfg.model.path} does not exist.")
    if isinstance(cfg.dataset, PreprocessedDataset) and not Path(os.path.expanduser(cfg.dataset.path)).exists():
        problems.append(f"dataset.path={cfg.dataset.path} does not exist: give the preprocessed tensor directory.")
    for name, value in [("train.max_steps", cfg.train.max_steps), ("train.grad_accum", cfg.train.grad_accum),
                        ("train.save_every", cfg.train.save_every), ("train.log_every", cfg.train.log_every),
                        ("hardware.batch_size", cfg.hardware.batch_size)]:
        if value < 1:
            problems.append(f"{name}={value} must be >= 1.")
    if cfg.train.stop_at_step is not None and not 0 < cfg.train.stop_at_step <= cfg.train.max_steps:
        problems.append(f"train.stop_at_step={cfg.train.stop_at_step} must be in 1..train.max_steps.")
    if cfg.hardware.device == Device.cuda and not torch.cuda.is_available():
        problems.append("hardware.device=cuda but no CUDA GPU is visible: use hardware=cpu or hardware=auto, or "
                        "check the CUDA install (torch.cuda.is_available() is False).")
    on_cpu, _ = resolve_hardware(cfg.hardware, torch.cuda.is_available(), False)
    if cfg.hardware.mixed_precision == MixedPrecision.fp16 and on_cpu:
        problems.append("hardware.mixed_precision=fp16 needs a CUDA GPU; on the CPU use bf16 or no.")
    if isinstance(cfg.mode, LoraMode):
        missing = unmatched_lora_targets(build_meta_model(cfg.model).decoder, list(cfg.mode.target_modules))
        if missing:
            problems.append(f"mode.target_modules {missing} match no Linear layer of the decoder; valid names "
                            "include q_proj, k_proj, v_proj, o_proj (self_attn./cross_attn. prefixes allowed), "
                            "gate_proj, up_proj, down_proj, condition_embedder.")
    resume_from = None
    try:
        resume_from = resolve_resume(cfg.train.resume, run_dir)
    except FileNotFoundError as err:
        problems.append(str(err))
    if problems:
        raise SystemExit("Config check failed:\n" + "\n".join(f"  - {p}" for p in problems))
    return resume_from


def check_data_fingerprint(cfg: Config, model: nn.Module, say) -> None:
    """Refuse data preprocessed with another model or condition encoder (dataset.allow_fingerprint_mismatch=true
    overrides). Legacy .pt data has no fingerprint: say that it cannot be checked."""
    if not isinstance(cfg.dataset, PreprocessedDataset):
        return
    data_fp = read_fingerprint(cfg.dataset.path)
    if data_fp is None:
        say("data fingerprint: none (legacy .pt data); which condition encoder produced it cannot be checked")
        return
    ours = make_fingerprint(cfg.model.variant, condition_encoder_digest(model), None, None, None, {})
    problems = compare_fingerprints(data_fp, ours)
    if problems and not cfg.dataset.allow_fingerprint_mismatch:
        raise SystemExit(f"The data in {cfg.dataset.path} was not made for this model:\n  " + "\n  ".join(problems)
                         + "\n(dataset.allow_fingerprint_mismatch=true trains anyway.)")
    say("data fingerprint: " + ("MISMATCH accepted (dataset.allow_fingerprint_mismatch=true):\n  "
                                + "\n  ".join(problems) if problems else "matches the model"))


def build_batches(cfg: Config, encoder_width: int, acc: Accelerator, say) -> BatchStream:
    """Source (format + cache policy) -> length-bucketed sampler for this rank -> cropping, collating stream."""
    policy, why = resolve_cache_policy(cfg.dataset, cfg.cache)
    say(f"cache: {policy} ({why})")
    # pass the resolved policy on, so auto's directory scan and format detection run once
    source = build_dataset(cfg.dataset, replace(cfg.cache, policy=policy), encoder_width=encoder_width)
    max_frames = seconds_to_frames(cfg.dataset.max_seconds)
    sampler = LengthBucketSampler(
        capped_lengths(source.lengths, max_frames), cfg.hardware.batch_size, seed=cfg.train.seed,
        shuffle=cfg.dataset.shuffle, bucket_frames=seconds_to_frames(cfg.dataset.bucket_seconds),
        max_frames_per_batch=cfg.hardware.max_frames_per_batch, worst_case_first=cfg.dataset.worst_case_first,
        rank=acc.process_index, world_size=acc.num_processes)
    pads = sampler.padding_stats()
    say(f"data: {len(source)} samples ({cfg.dataset.kind}), {sampler.batches_per_epoch} batches per epoch per "
        f"process, padding {100 * pads['pad_fraction']:.1f}% of frames (random batches: "
        f"{100 * pads['naive_pad_fraction']:.1f}%), {pads['oversize_samples']} clip(s) over the frame budget")
    cuda_copy = cfg.hardware.device_prefetch and acc.device.type == "cuda"
    return BatchStream(source, sampler, max_frames=max_frames, seed=cfg.train.seed, pin_memory=cuda_copy)


def flat_config(cfg: Config, world_size: int) -> Dict[str, Any]:
    """The resolved config as {"optim.lr": 1e-4, ...} plus the process count: what a strict resume compares."""
    def walk(node: Any, prefix: str) -> Dict[str, Any]:
        if isinstance(node, dict):
            return {k: v for key, value in node.items() for k, v in walk(value, f"{prefix}{key}.").items()}
        return {prefix[:-1]: node}

    flat = walk(OmegaConf.to_container(OmegaConf.structured(cfg), enum_to_str=True), "")
    flat.update({"mode.name": cfg.mode.name, "dataset.kind": cfg.dataset.kind, "world_size": world_size})
    return flat


def train(cfg: Config, run_dir: Path | str, choices: Optional[Mapping[str, str]] = None) -> List[float]:
    """Train one run into `run_dir`; returns the per-step losses of this invocation.

    `choices` are the Hydra group choices (model=..., mode=...), used for logger groups and tags.
    """
    run_dir = Path(run_dir)
    resume_from = check_config(cfg, run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    losses = _train(cfg, run_dir, choices or {}, resume_from)
    # Tear down in order on every process: _train's DDP wrapper and optimizer are freed by now, then all ranks meet
    # and drop the process group together. A gloo rank whose peer already exited can hang in the destructor.
    gc.collect()
    if torch.distributed.is_initialized():
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()
    return losses


def _train(cfg: Config, run_dir: Path, choices: Mapping[str, str], resume_from: Optional[Path]) -> List[float]:
    cuda = torch.cuda.is_available()
    on_cpu, precision = resolve_hardware(cfg.hardware, cuda, cuda and torch.cuda.is_bf16_supported())
    acc = Accelerator(cpu=on_cpu, mixed_precision=precision, gradient_accumulation_steps=cfg.train.grad_accum)
    print0 = acc.print
    config_yaml = OmegaConf.to_yaml(OmegaConf.structured(cfg))
    flat = flat_config(cfg, acc.num_processes)
    set_seed(cfg.train.seed, device_specific=True)  # seed + rank: each process draws its own noise

    model = load_model(cfg.model)
    model.decoder.gradient_checkpointing = cfg.hardware.gradient_checkpointing
    decoder = make_trainable(model, cfg.mode)
    trainable, total = count_parameters(model)
    print0(f"model {cfg.model.variant}: {total / 1e6:.2f}M params, mode={cfg.mode.name}: "
           f"{trainable / 1e6:.3f}M trainable ({100 * trainable / total:.2f}%)")

    check_data_fingerprint(cfg, model, print0)
    batches = build_batches(cfg, model.null_condition_emb.shape[-1], acc, print0)
    print0(f"batch {cfg.hardware.batch_size} x accum "
           f"{cfg.train.grad_accum} x {acc.num_processes} process(es), device {acc.device} "
           f"(hardware.device={cfg.hardware.device}), precision {precision} "
           f"(hardware.mixed_precision={cfg.hardware.mixed_precision})")

    print0("parameter groups:\n" + group_table(param_groups(decoder, cfg.optim)))
    optimizer = build_optimizer(decoder, cfg.optim)
    scheduler = build_scheduler(optimizer, cfg.train.max_steps, cfg.optim)

    start_step, state = 0, None
    if resume_from is not None:
        state = load_checkpoint(resume_from, decoder, cfg.mode.name, flat, cfg.train.resume_strict)
        optimizer.load_state_dict(state.optimizer)
        scheduler.load_state_dict(state.scheduler)
        batches.load_state_dict(state.sampler)
        start_step = state.step
        print0(f"resumed from {resume_from} at step {start_step}")

    decoder, optimizer = acc.prepare(decoder, optimizer)
    null_embedding = model.null_condition_emb.detach().to(acc.device)
    ema = None
    if cfg.train.ema.enabled:
        trained = [(n, p) for n, p in acc.unwrap_model(decoder).named_parameters() if p.requires_grad]
        ema = Ema(trained, cfg.train.ema)
        if state is not None and state.ema is not None:
            ema.load_state_dict(state.ema)
    if state is not None:
        if state.scaler is not None and acc.scaler is not None:
            acc.scaler.load_state_dict(state.scaler)
        if acc.process_index < len(state.rng):
            # last, so nothing above consumes random numbers after the restore
            restore_rng(state.rng[acc.process_index], acc.device)

    if cfg.hardware.device_prefetch and acc.device.type != "cuda":
        print0(f"device prefetch: off on {acc.device.type} (it needs a CUDA device); batches are prepared "
               "synchronously, between steps")
    prefetcher = Prefetcher(batches, acc.device, device_prefetch=cfg.hardware.device_prefetch)

    def save(step: int) -> None:
        rngs = gather_object([capture_rng(acc.device)])  # collective: every process contributes its RNG
        if acc.is_main_process:
            unwrapped = acc.unwrap_model(decoder)
            path = save_checkpoint(
                run_dir,
                TrainingState(step=step, optimizer=optimizer.state_dict(), scheduler=scheduler.state_dict(),
                              sampler=prefetcher.state_dict(), rng=rngs, signature=signature(unwrapped),
                              mode=cfg.mode.name, config=flat,
                              scaler=acc.scaler.state_dict() if acc.scaler is not None else None,
                              ema=ema.state_dict() if ema is not None else None),
                unwrapped,
                save_full=lambda d: save_full_model(model, d, dtype=torch.float32),
                config_yaml=config_yaml,
                keep_last=cfg.train.keep_last,
            )
            tqdm.write(f"checkpoint: {path}")
        acc.wait_for_everyone()

    sink = MetricsSink(run_dir, cfg.logger, choices, OmegaConf.to_container(OmegaConf.structured(cfg)),
                       resume_step=start_step if state is not None else None, enabled=acc.is_main_process)
    parts = LoopParts(acc, decoder, null_embedding, optimizer, scheduler, prefetcher, cfg.objective,
                      cfg.model.timestep_mu, cfg.model.timestep_sigma, ema)
    try:
        losses = train_loop(parts, cfg.train, start_step, sink, save, cfg.optim.grad_clip)
    finally:
        prefetcher.close()
        sink.close()
    if acc.is_main_process and cfg.train.plot:
        plot_loss(run_dir / METRICS_FILE, run_dir / "loss_curve.png")
    if losses:
        k = max(1, len(losses) // 10)  # single steps are noisy: compare the means of the first and last tenth
        print0(f"done: step {start_step + len(losses)}, loss {sum(losses[:k]) / k:.4f} -> {sum(losses[-k:]) / k:.4f} "
               f"(mean of the first / last {k} steps); run directory {run_dir.resolve()}")
    return losses
