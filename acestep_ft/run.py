"""train(cfg): the only place that wires config, data, model, trainable set, optimizer, resume and loop together.

Order: checks that need no weights (relaunch guard, checkpoint choice) -> memory preflight (may rewrite the config)
-> resume compatibility (no weights yet) -> run directory (clear / clean, .hydra record) -> accelerator + seed ->
model -> trainable set -> data (train / validation split) -> optimizer -> resume -> loop (validation, samples,
checkpoints, stop signals) -> replica check, export, loss plot.
"""

from __future__ import annotations

import errno
import gc
import os
from contextlib import nullcontext
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Tuple

import torch
from accelerate import Accelerator
from accelerate.utils import DistributedType, broadcast_object_list, gather_object, set_seed
from omegaconf import OmegaConf
from torch import nn
from tqdm.auto import tqdm

from acestep_ft.checks import (
    check_config, check_data_fingerprint, check_resume_config, data_fingerprint_digest, flat_config, validation_dir,
)
from acestep_ft.config import (AdapterMode, Conditions, Config, Distributed, FullMode, resolve_frozen_dtype,
                               resolve_hardware)
from acestep_ft.data import BatchStream, ConditionWidths, build_dataset
from acestep_ft.data.batch import Batch, Sample
from acestep_ft.data.crop import capped_lengths, seconds_to_frames
from acestep_ft.data.dataset import SampleSource, resolve_cache_policy, split_train_val
from acestep_ft.data.prefetch import Prefetcher
from acestep_ft.data.sampler import sampler_for
from acestep_ft.distributed import (
    accelerator_kwargs, broadcast_module_, full_state_dict, load_optimizer_state_dict, optimizer_state_dict,
)
from acestep_ft.errors import UserError
from acestep_ft.launch import Launch, write_record
from acestep_ft.model import load_model
from acestep_ft.model.compile import compile_layers
from acestep_ft.model.checkpoint_io import missing_official_files
from acestep_ft.preflight.gate import preflight, world_size_from_env, write_rewrite
from acestep_ft.preprocess.encoders import COMPUTE
from acestep_ft.preprocess.prompts import encode_prompts
from acestep_ft.train.adapters import COMFYUI_FILE, init_from_adapter
from acestep_ft.train.checkpoint import (
    TrainingState, apply_optimizer_settings, capture_rng, load_weights, restore_rng, save_checkpoint, signature,
)
from acestep_ft.train.conditioning import Conditioner, load_token_table, random_table, text_encoder_dir
from acestep_ft.train.early_stop import EarlyStopping
from acestep_ft.train.ema import Ema
from acestep_ft.train.evaluate import ValidationSet, validation_loss
from acestep_ft.train.lifecycle import StopSignals, lock_run_dir, prepare_run_dir, stop_status
from acestep_ft.train.loop import LoopParts, train_loop
from acestep_ft.train.metrics import METRICS_FILE, MetricsSink, plot_loss
from acestep_ft.train.optim import (build_optimizer, build_scheduler, evaluation_mode, group_settings, group_table,
                                    param_groups)
from acestep_ft.train.previews import build_previews, data_settings
from acestep_ft.train.step import Encode
from acestep_ft.train.text_encoder import TEXT_ADAPTER_DIR, load_text_model, trains_text_encoder
from acestep_ft.train.trainable import (
    cast_frozen_, count_parameters, export_trained, held_back, make_trainable, parts_of, text_encoder_of,
    trained_at_load, unfreeze_starts, write_trained,
)


def build_sources(cfg: Config, encoder_width: int, say) -> Tuple[SampleSource, Optional[SampleSource]]:
    """(training source, validation source or None): format + cache policy, then the split."""
    policy, why = resolve_cache_policy(cfg.dataset, cfg.cache)
    say(f"cache: {policy} ({why})")
    # pass the resolved policy on, so auto's directory scan and format detection run once
    cache = replace(cfg.cache, policy=policy)
    widths = ConditionWidths(encoder=encoder_width, text=cfg.model.text_hidden_dim, vocab=cfg.model.text_vocab_size)
    source = build_dataset(cfg.dataset, cache, widths)
    val_path = validation_dir(cfg)
    if val_path is not None:
        val = build_dataset(replace(cfg.dataset, path=val_path, val_path=None), cache, widths)
        say(f"validation: {len(val)} samples from dataset.val_path={val_path}")
        return source, val
    if cfg.dataset.val_fraction > 0:
        source, val = split_train_val(source, cfg.dataset.val_fraction)
        say(f"validation: {len(val)} held-out samples (dataset.val_fraction={cfg.dataset.val_fraction}, chosen by "
            f"key hash), {len(source)} for training")
        return source, val
    return source, None


def build_batches(cfg: Config, source: SampleSource, acc: Accelerator, say) -> BatchStream:
    """Length-bucketed sampler for this rank over `source` -> cropping, collating stream."""
    max_frames = seconds_to_frames(cfg.dataset.max_seconds)
    sampler = sampler_for(cfg, capped_lengths(source.lengths, max_frames), acc.process_index, acc.num_processes)
    pads = sampler.padding_stats()
    say(f"data: {len(source)} samples ({cfg.dataset.kind}), {sampler.batches_per_epoch} batches per epoch per "
        f"process, padding {100 * pads['pad_fraction']:.1f}% of frames (random batches: "
        f"{100 * pads['naive_pad_fraction']:.1f}%), {pads['oversize_samples']} clip(s) over the frame budget")
    cuda_copy = cfg.hardware.device_prefetch and acc.device.type == "cuda"
    return BatchStream(source, sampler, max_frames=max_frames, seed=cfg.train.seed, pin_memory=cuda_copy)


def evaluation_hooks(cfg: Config, acc: Accelerator, model: nn.Module, decoder: nn.Module, ema: Optional[Ema],
                     optimizer: torch.optim.Optimizer, train_source: SampleSource,
                     val_source: Optional[SampleSource], run_dir: Path, sink: MetricsSink,
                     encode: Optional[Encode]) -> Tuple[Optional[Callable[[], float]], Optional[Callable[[int], Dict]]]:
    """(validate, generate) for the loop: the validation loss of the current weights (None without a split) and the
    previews at a step (None unless train.samples.every_epochs; train/previews.py, whose setup encodes the text
    prompts once, here). Both use the EMA weights when train.ema.for_eval, and `encode` for data that carries the
    condition encoder's inputs."""
    def evaluation_weights():
        return ema.applied() if ema is not None and cfg.train.ema.for_eval else nullcontext()

    val_set = None if val_source is None else ValidationSet(
        val_source, cfg.hardware.batch_size, seconds_to_frames(cfg.dataset.max_seconds), cfg.train.seed,
        acc.process_index, acc.num_processes)
    previews = None
    if cfg.train.samples.every_epochs:
        def encode_prompt_texts(text_dir: Path, vae: Any) -> List[Sample]:  # the prompts, once, on the main process
            dtype = COMPUTE.get(str(acc.mixed_precision), torch.float32)
            return encode_prompts(cfg.train.samples.prompts, model, cfg.model, text_dir, vae, acc.device, dtype,
                                  "model.text_encoder_path", data_settings(cfg.dataset), inputs=encode is not None)

        previews = build_previews(cfg.train.samples, cfg.model, model, acc, val_source or train_source,
                                  seconds_to_frames(cfg.dataset.max_seconds), cfg.train.seed,
                                  cfg.objective.attention_mask, sink.log_audio, acc.print, encode_prompt_texts, encode)
    elif cfg.train.samples.prompts:
        acc.print("samples: train.samples.prompts are rendered only with train.samples.every_epochs > 0")

    def validate() -> float:
        with evaluation_mode(optimizer), evaluation_weights():  # schedule-free's average x, then EMA if chosen
            return validation_loss(acc, decoder, val_set, cfg.objective, cfg.model.timestep_mu,
                                   cfg.model.timestep_sigma, encode)

    def generate(step: int) -> Dict[str, float]:
        with evaluation_mode(optimizer), evaluation_weights(), acc.autocast():
            return previews.render(decoder, run_dir, step, acc)

    return (validate if val_set is not None else None), (generate if previews is not None else None)


def gathered_weights(acc: Accelerator, decoder: nn.Module) -> Optional[Dict[str, torch.Tensor]]:
    """Collective. The decoder's full weights gathered on the main process when a strategy shards or wraps them
    (FSDP, DeepSpeed); None otherwise: the live module is read directly (no host copy of frozen base weights)."""
    if acc.distributed_type in (DistributedType.FSDP, DistributedType.DEEPSPEED):
        return full_state_dict(acc, decoder)
    return None


def finish_run(cfg: Config, acc: Accelerator, model: nn.Module, decoder: nn.Module, ema: Optional[Ema],
               optimizer: torch.optim.Optimizer, run_dir: Path, losses: List[float], start_step: int,
               finished: bool) -> None:
    """After the loop: the DDP replica check, the export (only when the run reached max_steps or stopped early,
    not at a train.stop_at_step pause), the loss plot and the summary line."""
    if acc.num_processes > 1 and cfg.hardware.distributed == Distributed.ddp:
        digests = gather_object([replica_digest(acc.unwrap_model(decoder))])
        acc.print(f"replicas: the trained weights {'agree' if len(set(digests)) == 1 else 'DIFFER'} on all "
                  f"{acc.num_processes} processes" + ("" if len(set(digests)) == 1 else f" {digests}"))
    if finished:
        if not losses:
            acc.print(f"the run had already finished at step {start_step}: writing its export again")
        with evaluation_mode(optimizer):  # schedule-free: export the averaged weights x
            weights = gathered_weights(acc, decoder)  # collective
            if acc.is_main_process:
                dtype = getattr(torch, str(cfg.train.export_dtype))
                use_ema = ema is not None and cfg.train.ema.for_export
                if use_ema:  # same names: both come from the unwrapped decoder
                    weights = {**(weights or {}), **{n: t.cpu() for n, t in ema.shadow.items()}}
                exported = export_trained(model, acc.unwrap_model(decoder), run_dir / "export", dtype, weights,
                                          comfyui=cfg.train.export_comfyui)
                acc.print(f"export: {exported} ({cfg.train.export_dtype}{', EMA weights' if use_ema else ''}; the best "
                          "validated weights, when there is a split, are named in checkpoints/best.json)")
                missing = missing_official_files(exported, model.cfg) if isinstance(cfg.mode, FullMode) else ""
                if missing:
                    acc.print("export: " + missing)
                elif (exported / COMFYUI_FILE).is_file():
                    acc.print(f"export: {exported / COMFYUI_FILE} (ComfyUI layout: strength 1.0 = the trained update)")
        acc.wait_for_everyone()
    if acc.is_main_process and cfg.train.plot:
        plot_loss(run_dir / METRICS_FILE, run_dir / "loss_curve.png")
    if losses:
        k = max(1, len(losses) // 10)  # single steps are noisy: compare the means of the first and last tenth
        acc.print(f"{'done' if finished else 'paused'}: step {start_step + len(losses)}, loss "
                  f"{sum(losses[:k]) / k:.4f} -> {sum(losses[-k:]) / k:.4f} (mean of the first / last {k} steps); "
                  f"run directory {run_dir.resolve()}")


def condition_encoder(cfg: Config, model: nn.Module, trained: nn.Module, frozen: torch.dtype, acc: Accelerator,
                      say) -> Optional[Encode]:
    """For dataset.conditions=encoder_inputs: the condition encoder, the text encoder's token table and (mode.
    text_encoder=lora) the trained text encoder of `trained` on the device, called under the run's autocast
    (train/conditioning.py); None for data that holds the encoder's outputs."""
    if cfg.dataset.conditions != Conditions.encoder_inputs:
        return None
    text = text_encoder_of(trained)
    conditioner = Conditioner(model.encoder, load_token_table(cfg.model, frozen), text,
                              checked_below=cfg.model.text_vocab_size).to(acc.device)  # the data checks the ids
    count = sum(p.numel() for p in model.encoder.parameters() if p.requires_grad)
    say(f"conditions: the condition encoder runs in every step ({count:,} of its parameters train) on lyric ids "
        f"embedded with the text encoder's table of {conditioner.table.shape[0]:,} tokens "
        + ("(random: model.path is not set)" if random_table(cfg.model) else f"from {text_encoder_dir(cfg.model)}"))
    if text is not None:
        lora = sum(p.numel() for p in text.parameters() if p.requires_grad)
        say(f"conditions: the text encoder runs in every step on the caption token ids with a LoRA of {lora:,} "
            f"parameters (mode.text_encoder=lora, rank {cfg.mode.text_lora.rank}); its adapter is saved as "
            f"{TEXT_ADAPTER_DIR}/ beside the trained weights")

    def encode(batch: Batch) -> Tuple[torch.Tensor, torch.Tensor]:
        with acc.autocast():
            return conditioner(batch)

    return encode


@torch.no_grad()
def replica_digest(module: nn.Module) -> Tuple[float, float]:
    """(sum, sum of squares) of the trained weights in float64: equal on every process while DDP replicas agree."""
    trained = [p.detach().double() for p in module.parameters() if p.requires_grad]
    return (float(sum(p.sum() for p in trained)), float(sum((p * p).sum() for p in trained)))


@dataclass
class RunResult:
    """What one invocation of `train` did."""

    losses: List[float]               # per-step losses of this invocation
    stopped_by: Optional[int] = None  # the signal that stopped it (after a checkpoint was saved)


def train(cfg: Config, run_dir: Path | str, launch: Optional[Launch] = None) -> RunResult:
    """Train one run into `run_dir`. `launch` says how it was started (train.py reads it from Hydra).

    A stop signal ends it after a checkpoint; the caller exits with `lifecycle.stop_status(result.stopped_by)`.
    """
    launch = launch or Launch()
    run_dir = Path(run_dir)
    main_process = int(os.environ.get("RANK", "0")) == 0  # no process group yet
    say = print if main_process else (lambda *_: None)
    resume_from, notes = check_config(cfg, run_dir, launch.requeues)
    for note in notes:
        say(note)
    verdict = preflight(cfg, world_size_from_env())  # refuses (UserError) before any weights load
    say("memory preflight:\n" + verdict.report())
    original, cfg = cfg, verdict.cfg
    state = check_resume_config(cfg, resume_from, world_size_from_env(), say) if resume_from is not None else None
    lock = None
    if main_process:  # the run is accepted: from here on it may change the directory
        lock = lock_run_dir(run_dir)  # held until this process ends
        prepare_run_dir(run_dir, cfg.train.overwrite, resume_from, say)
        write_record(run_dir, launch.record)
        if verdict.changes:
            write_rewrite(run_dir, original, verdict)
            say(f"memory preflight rewrote the config to fit: {run_dir / 'preflight'} holds it and the diff")
    stop = StopSignals()
    try:
        losses = _train(cfg, run_dir, launch, resume_from, state, stop)
    except torch.OutOfMemoryError as err:
        said = {True: "although the memory preflight estimated that it fits", False: "as the memory preflight "
                "predicted (preflight.policy=warn)", None: "(the memory preflight had no budget to check)"}
        raise UserError(
            f"CUDA out of memory {said[verdict.fits]}: {err}\n" + verdict.report()
            + "\nCheckpoints already in the run directory are complete (written atomically). Lower the memory: "
            "preflight.overhead_gb higher (then the gate rewrites or refuses earlier), hardware.gradient_checkpointing"
            "=1, a smaller hardware.batch_size with more train.grad_accum, or optim=adamw8bit.") from err
    except OSError as err:
        if err.errno not in (errno.ENOSPC, errno.EDQUOT):
            raise
        raise UserError(f"disk full while writing {err.filename or run_dir}: free space there, then continue with "
                        f"train.resume=auto (checkpoints already written are complete).") from err
    handed_on: Optional[BaseException] = None
    if stop.agreed_signum is not None:
        say(f"stopped by signal (exit status {stop_status(stop.agreed_signum)}); continue with:\n  "
            f"{launch.continue_command(run_dir)}"
            + ("\n  (with the same launcher and number of processes)" if world_size_from_env() > 1 else ""))
        try:  # before the teardown barrier: no process exits before submitit's handler (rank 0) has requeued
            stop.hand_on()
        except BaseException as err:  # that handler ends the process: after the teardown
            handed_on = err
    # Tear down in order on every process: _train's DDP wrapper and optimizer are freed by now, then all ranks meet
    # and drop the process group together. A gloo rank whose peer already exited can hang in the destructor.
    gc.collect()
    if torch.distributed.is_initialized():
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()
    if lock is not None:
        lock.close()
    if handed_on is not None:
        raise handed_on
    return RunResult(losses, stop.agreed_signum)


def _train(cfg: Config, run_dir: Path, launch: Launch, resume_from: Optional[Path], state: Optional[TrainingState],
           stop: StopSignals) -> List[float]:
    cuda = torch.cuda.is_available()
    on_cpu, precision = resolve_hardware(cfg.hardware, cuda, cuda and torch.cuda.is_bf16_supported())
    acc = Accelerator(cpu=on_cpu, mixed_precision=precision, gradient_accumulation_steps=cfg.train.grad_accum,
                      **accelerator_kwargs(cfg.hardware, on_cpu, cfg.optim.grad_clip, cfg.train.grad_accum))
    print0 = acc.print
    config_yaml = OmegaConf.to_yaml(OmegaConf.structured(cfg))
    flat = flat_config(cfg, acc.num_processes)
    set_seed(cfg.train.seed, device_specific=True)  # seed + rank: each process draws its own noise

    frozen = getattr(torch, resolve_frozen_dtype(cfg.model, cfg.hardware, on_cpu, precision, acc.num_processes))
    model = load_model(cfg.model, dtype=frozen, float32_keys=trained_at_load(cfg.mode))
    model.decoder.gradient_checkpointing = cfg.hardware.gradient_checkpointing
    text_model = load_text_model(cfg.model) if trains_text_encoder(cfg.mode) else None
    decoder = make_trainable(model, cfg.mode, text_model)
    for module in (model, text_model):  # the adapters and any trained weight in float32, the rest stays `frozen`
        if module is not None:
            cast_frozen_(module, frozen)
    if isinstance(cfg.mode, AdapterMode) and cfg.mode.init_adapter is not None and state is None:
        print0(init_from_adapter(dict(parts_of(decoder))["decoder."], cfg.mode.init_adapter, cfg.model))
    if cfg.hardware.compile:
        print0(f"compile: {compile_layers(decoder, acc.device)} DiT layers compiled one by one (hardware.compile=true, "
               "dynamic shapes): the first training step compiles them, the first validation and the first batch of "
               "size 1 once more; new lengths do not")
    if acc.num_processes > 1 and (cfg.model.path is None or cfg.hardware.distributed == Distributed.fsdp):
        # random init (model=tiny) or new LoRA matrices differ per process: make every process start from rank 0's
        # (DDP does this for the decoder itself, but not for null_condition_emb; FSDP2 not at all)
        broadcast_module_(model if cfg.model.path is None else decoder)
    encode = condition_encoder(cfg, model, decoder, frozen, acc, print0)
    trainable, total = count_parameters(model)
    if text_model is not None:  # its LoRA trains with the rest
        trainable += count_parameters(text_model)[0]
    on_device = ("the decoder and the condition encoder go" if text_model is None else "the decoder, the condition "
                 "encoder and the text encoder go") if encode is not None else "the decoder goes"
    print0(f"model {cfg.model.variant}: {total / 1e6:.2f}M params, mode={cfg.mode.name}: "
           f"{trainable / 1e6:.3f}M trainable ({100 * trainable / total:.2f}%, float32), frozen weights in "
           f"{str(frozen).replace('torch.', '')} (model.frozen_dtype={cfg.model.frozen_dtype}); only {on_device} "
           f"to {acc.device}")

    check_data_fingerprint(cfg, model, print0)
    train_source, val_source = build_sources(cfg, model.null_condition_emb.shape[-1], print0)
    batches = build_batches(cfg, train_source, acc, print0)
    steps_per_epoch = max(1, batches.sampler.batches_per_epoch // cfg.train.grad_accum)
    print0(f"batch {cfg.hardware.batch_size} x accum "
           f"{cfg.train.grad_accum} x {acc.num_processes} process(es), device {acc.device} "
           f"(hardware.device={cfg.hardware.device}), precision {precision} "
           f"(hardware.mixed_precision={cfg.hardware.mixed_precision})")

    print0("parameter groups:\n" + group_table(param_groups(decoder, cfg.optim)))
    optimizer = build_optimizer(decoder, cfg.optim)
    scheduler = build_scheduler(optimizer, cfg.train.max_steps, cfg.optim)

    data_digest = data_fingerprint_digest(cfg)
    start_step = 0
    fresh_groups = group_settings(optimizer)  # settings only: Prodigy's d, schedule-free's step count stay restored
    if state is not None:  # checked against this config before the model loaded (check_resume_config)
        load_weights(resume_from, decoder, cfg.mode.name)
        scheduler.load_state_dict(state.scheduler)
        batches.load_state_dict(state.sampler)
        start_step = state.step
        print0(f"resumed from {resume_from} at step {start_step}")

    decoder, optimizer = acc.prepare(decoder, optimizer)
    if state is not None:
        load_optimizer_state_dict(acc, decoder, optimizer, state.optimizer)  # after prepare: may be sharded
        # what is saved in this run's checkpoints and config must be in effect (train.resume_strict=false)
        changed = apply_optimizer_settings(optimizer, scheduler, fresh_groups)
        if changed:
            print0("applied the configured optimizer settings to the restored optimizer:\n  " + "\n  ".join(changed))
    null_embedding = model.null_condition_emb.detach().to(acc.device, torch.float32)
    held = []
    if isinstance(cfg.mode, FullMode) and cfg.mode.unfreeze:
        starts = unfreeze_starts(acc.unwrap_model(decoder), cfg.mode.unfreeze, steps_per_epoch)
        held = held_back(acc.unwrap_model(decoder), starts)
        print0("unfreeze schedule: " + "; ".join(
            [f"{sum(1 for v in starts.values() if v == 0)} tensors from step 0"]
            + [f"{len(ps)} tensors ({sum(p.numel() for p in ps):,} params) from step {at}" for at, ps in held]))
    early_stop = EarlyStopping(cfg.train.early_stop.patience, cfg.train.early_stop.min_delta)
    if state is not None and state.early_stop is not None:
        early_stop.load_state_dict(state.early_stop)
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

    saved_params = trainable if isinstance(cfg.mode, AdapterMode) else total
    expected_bytes = 4 * (saved_params + 2 * trainable)  # fp32 weights + two optimizer moments, until a save says

    def save(step: int, note: Optional[str] = None) -> None:
        # collectives first: every process contributes its RNG, its shard of the weights and optimizer state
        rngs = gather_object([capture_rng(acc.device)])
        weights = gathered_weights(acc, decoder)
        optimizer_state = optimizer_state_dict(acc, decoder, optimizer)
        failure, error, path = [None], None, None
        if acc.is_main_process:
            try:
                path = write_checkpoint(step, note, rngs, weights, optimizer_state)
            except Exception as err:  # e.g. disk full: every process must stop, not wait for this one
                failure, error = [f"{type(err).__name__}: {err}"], err
        failure = broadcast_object_list(failure)
        if error is not None:
            raise error
        if failure[0] is not None:
            raise UserError(f"the main process could not save the checkpoint of step {step}: {failure[0]}")
        if path is not None:
            tqdm.write(f"checkpoint: {path}" + (" (best validation loss so far)" if early_stop.best_step == step
                                                else "") + (f" ({note})" if note else ""))
        acc.wait_for_everyone()

    def write_checkpoint(step: int, note: Optional[str], rngs: List, weights: Optional[Dict],
                         optimizer_state: Dict) -> Path:
        unwrapped = acc.unwrap_model(decoder)
        return save_checkpoint(
            run_dir,
            TrainingState(step=step, optimizer=optimizer_state, scheduler=scheduler.state_dict(),
                          sampler=prefetcher.state_dict(), rng=rngs, signature=signature(unwrapped, weights),
                          mode=cfg.mode.name, config=flat,
                          scaler=acc.scaler.state_dict() if acc.scaler is not None else None,
                          ema=ema.state_dict() if ema is not None else None,
                          early_stop=early_stop.state_dict() if val_source is not None else None,
                          data_fingerprint=data_digest, nonfinite_skips=parts.nonfinite_skips,
                          nonfinite_in_a_row=parts.nonfinite_in_a_row, note=note),
            lambda directory: write_trained(model, unwrapped, directory, torch.float32, weights,
                                            comfyui=cfg.train.export_comfyui),
            config_yaml=config_yaml,
            keep_last=cfg.train.keep_last,
            keep_step=early_stop.best_step,
            best=(early_stop.best_step, early_stop.best) if early_stop.best_step is not None else None,
            expected_bytes=expected_bytes,
        )

    sink = MetricsSink(run_dir, cfg.logger, launch.choices, OmegaConf.to_container(OmegaConf.structured(cfg)),
                       start_step=start_step, enabled=acc.is_main_process)
    validate, generate = evaluation_hooks(cfg, acc, model, decoder, ema, optimizer, train_source, val_source, run_dir,
                                          sink, encode)
    parts = LoopParts(acc, decoder, null_embedding, optimizer, scheduler, prefetcher, cfg.objective,
                      cfg.model.timestep_mu, cfg.model.timestep_sigma, ema, held, steps_per_epoch, validate,
                      early_stop, generate, stop, *((state.nonfinite_skips, state.nonfinite_in_a_row)
                                                    if state is not None else (0, 0)), encode)
    stop.install()
    try:
        losses = train_loop(parts, cfg.train, start_step, sink, save, cfg.optim.grad_clip)
    finally:
        stop.uninstall()
        prefetcher.close()
        sink.close()
    reached = start_step + len(losses) >= cfg.train.max_steps or early_stop.should_stop
    finished = reached and stop.agreed_signum is None
    finish_run(cfg, acc, model, decoder, ema, optimizer, run_dir, losses, start_step, finished)
    return losses
