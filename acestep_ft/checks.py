"""Checks before anything trains: every problem visible without loading weights (reported together, each with its
fix), and the data fingerprint against the loaded model.

    resume_from, notes = check_config(cfg, run_dir)   # ConfigError listing all problems; the checkpoint to resume
    state = check_resume_config(cfg, resume_from, 1, print)  # before any weights load: refuse another setup
    check_data_fingerprint(cfg, model, print)         # after the model loads: refuse data made for another one
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Tuple

import torch
from torch import nn

from acestep_ft.config import (
    AdapterMode, Conditions, Config, Device, Distributed, FrozenDtype, FullMode, MixedPrecision, NonfinitePolicy,
    PreprocessedDataset, field_default, flatten, resolve_hardware,
)
from acestep_ft.data.fingerprint import ENCODER_INPUTS_IGNORE, compare_fingerprints, make_fingerprint, read_fingerprint
from acestep_ft.distributed import strategy_problems
from acestep_ft.model.checkpoint_io import condition_encoder_digest
from acestep_ft.model.decoder import checkpointed_layers
from acestep_ft.errors import ConfigError, UserError
from acestep_ft.model.variants import build_meta_model
from acestep_ft.preflight.gate import world_size_from_env
from acestep_ft.train.checkpoint import TrainingState, check_resume, read_state, signature
from acestep_ft.train.conditioning import random_table, text_encoder_dir
from acestep_ft.train.lifecycle import choose_checkpoint, relaunch_problem
from acestep_ft.train.optim import optimizer_problems, param_groups
from acestep_ft.train.previews import preview_problems
from acestep_ft.train.text_encoder import meta_text_model, text_lora_problem, trains_text_encoder
from acestep_ft.train.trainable import make_trainable, trained_module, trains_encoder, unfreeze_starts


def unmatched_lora_targets(decoder: nn.Module, targets: List[str]) -> List[str]:
    """Targets that match no Linear of the decoder under PEFT's rule (name == t or name ends with "." + t)."""
    names = [n for n, m in decoder.named_modules() if isinstance(m, nn.Linear)]
    return [t for t in targets if not any(n == t or n.endswith("." + t) for n in names)]


def check_config(cfg: Config, run_dir: Path, requeued: bool = False) -> Tuple[Optional[Path], List[str]]:
    """Problems visible without loading weights, all reported at once (ConfigError), each with its fix. `requeued`:
    the launcher requeues preempted jobs into the same directory (they must continue, not start over).

    Returns the checkpoint to resume from (None for a fresh start) and notes to print about how it was chosen.
    """
    problems = []
    if cfg.model.path is None and cfg.model.variant != "tiny":
        problems.append(
            f"model variant {cfg.model.variant!r} needs its weights: set model.path=/path/to/checkpoint-dir "
            f"(the directory with config.json and model.safetensors). Random init is only for model=tiny."
        )
    problems += model_path_problems(cfg.model.path)
    if isinstance(cfg.mode, AdapterMode):
        problems += init_adapter_problems(cfg.mode)
    if not cfg.optim.lr > 0:
        problems.append(f"optim.lr={cfg.optim.lr} must be > 0 (the peak learning rate, e.g. 1e-4).")
    if cfg.optim.weight_decay < 0 or cfg.optim.grad_clip < 0:
        problems.append("optim.weight_decay and optim.grad_clip must be >= 0 (grad_clip 0 = no clipping).")
    problems += optimizer_problems(cfg.optim, cfg.hardware.distributed)
    if cfg.train.nonfinite == NonfinitePolicy.skip and cfg.train.max_nonfinite_skips < 1:
        problems.append(f"train.max_nonfinite_skips={cfg.train.max_nonfinite_skips} must be >= 1.")
    if cfg.train.nonfinite == NonfinitePolicy.skip and cfg.hardware.distributed == Distributed.deepspeed:
        problems.append("train.nonfinite=skip cannot hold a step back under hardware.distributed=deepspeed (DeepSpeed "
                        "applies the update inside backward): use train.nonfinite=halt.")
    if requeued and cfg.train.resume != "auto":
        problems.append("this launcher requeues preempted and timed-out jobs into the same run directory: use "
                        "train.resume=auto, so that a requeued job continues from its newest checkpoint.")
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
    problems += frozen_dtype_problems(cfg, on_cpu)
    if str(cfg.model.attn_implementation) == "flex" and on_cpu:
        problems.append("model.attn_implementation=flex trains on a CUDA GPU only (torch has no FlexAttention backward "
                        "pass on the CPU): use model.attn_implementation=sdpa here.")
    try:
        checkpointed_layers(cfg.hardware.gradient_checkpointing, cfg.model.num_hidden_layers)
    except ValueError as err:
        problems.append(f"hardware.{err}")
    problems += validation_problems(cfg)
    problems += strategy_problems(cfg, on_cpu)
    if isinstance(cfg.mode, FullMode) and cfg.mode.unfreeze:
        try:
            unfreeze_starts(trained_module(build_meta_model(cfg.model), cfg.mode), cfg.mode.unfreeze,
                            steps_per_epoch=1)
        except ValueError as err:
            problems.append(str(err))
    problems += encoder_training_problems(cfg)
    if isinstance(cfg.mode, AdapterMode):
        missing = unmatched_lora_targets(build_meta_model(cfg.model).decoder, list(cfg.mode.target_modules))
        if missing:
            problems.append(f"mode.target_modules {missing} match no Linear layer of the decoder; valid names "
                            "include q_proj, k_proj, v_proj, o_proj (self_attn./cross_attn. prefixes allowed), "
                            "gate_proj, up_proj, down_proj, condition_embedder.")
    if problems:
        raise ConfigError("Config check failed:\n" + "\n".join(f"  - {p}" for p in problems))
    resume_from, notes = choose_checkpoint(cfg.train.resume, run_dir)
    relaunch = relaunch_problem(run_dir, cfg.train, resume_from)
    if relaunch:
        raise ConfigError(relaunch)
    return resume_from, notes


def frozen_dtype_problems(cfg: Config, on_cpu: bool) -> List[str]:
    """An explicit low-precision frozen base needs autocast (fp32 activations cannot meet bf16 weights in a matmul)
    and cannot be sharded by FSDP2 next to fp32 trained tensors."""
    frozen = cfg.model.frozen_dtype
    if frozen in (FrozenDtype.auto, FrozenDtype.float32):
        return []
    precision = cfg.hardware.mixed_precision
    if precision == MixedPrecision.no or (precision == MixedPrecision.auto and on_cpu):
        return [f"model.frozen_dtype={frozen} needs autocast: set hardware.mixed_precision=bf16 (or fp16 on a CUDA "
                "GPU), or model.frozen_dtype=float32 (auto picks float32 without autocast)."]
    if cfg.hardware.distributed == Distributed.fsdp and world_size_from_env() > 1:
        return [f"model.frozen_dtype={frozen} with hardware.distributed=fsdp: FSDP2 all-gathers each layer's "
                "parameters in one dtype, so frozen and trained tensors cannot differ. Use model.frozen_dtype=auto "
                "(float32 under FSDP) or hardware.distributed=ddp."]
    return []


def model_path_problems(path: Optional[str]) -> List[str]:
    """model.path must be an official checkpoint directory (config.json + weights) or a single .safetensors file."""
    if path is None:
        return []
    where = Path(os.path.expanduser(path))
    if not where.exists():
        return [f"model.path={path} does not exist."]
    if where.is_dir() and not (where / "config.json").is_file():
        return [f"model.path={path} has no config.json: give the checkpoint directory itself (e.g. "
                ".../Ace-Step1.5/acestep-v15-turbo, with config.json and model.safetensors), or a single "
                "*.safetensors file."]
    if where.is_file() and where.suffix != ".safetensors":
        return [f"model.path={path} is a file but not a .safetensors file: give the checkpoint directory."]
    return []


def init_adapter_problems(mode: AdapterMode) -> List[str]:
    """mode.init_adapter must exist and, when its adapter_config.json says, be of the configured type (shapes and
    targets are checked when it loads, before training)."""
    if mode.init_adapter is None:
        return []
    where = Path(os.path.expanduser(mode.init_adapter))
    if not where.exists():
        return [f"mode.init_adapter={mode.init_adapter} does not exist: give a PEFT adapter directory (a run's export/) "
                "or a ComfyUI-layout .safetensors file."]
    config = where / "adapter_config.json"
    if config.is_file():
        try:
            kind = str(json.loads(config.read_text()).get("peft_type", "")).upper()
        except (OSError, ValueError) as err:
            return [f"mode.init_adapter: {config} is unreadable ({err})."]
        if kind != mode.name.upper():
            return [f"mode.init_adapter={mode.init_adapter} holds a {kind} adapter but mode={mode.name}: use "
                    f"mode={kind.lower()} (with the source's rank and target_modules)."]
    return []


def encoder_training_problems(cfg: Config) -> List[str]:
    """Data that carries the encoder's inputs needs the text encoder's token table (found before any weights load);
    a condition_encoder stage needs such data, and (for now) one replica of the weights per process."""
    problems = []
    if cfg.dataset.conditions == Conditions.encoder_inputs and not random_table(cfg.model):
        try:
            text_encoder_dir(cfg.model)
        except ConfigError as err:
            problems.append(f"dataset.conditions=encoder_inputs embeds lyric ids with the text encoder's token table: "
                            f"{err}")
    problems += text_encoder_problems(cfg)
    if not trains_encoder(cfg.mode):
        return problems
    if cfg.dataset.conditions != Conditions.encoder_inputs:
        problems.append("mode.unfreeze has a condition_encoder stage, but dataset.conditions=encoder_outputs: the data "
                        "holds the encoder's outputs (encoder_hidden_states), so its weights would never receive a "
                        "gradient. Fix: dataset.conditions=encoder_inputs with data preprocessed with "
                        "preprocess.store=inputs or both, or remove the stage.")
    if cfg.hardware.distributed in (Distributed.fsdp, Distributed.deepspeed):
        problems.append(f"hardware.distributed={cfg.hardware.distributed} with a condition_encoder stage is not "
                        "supported yet (the encoder runs outside the sharded decoder): use hardware.distributed=ddp.")
    return problems


def text_encoder_problems(cfg: Config) -> List[str]:
    """mode.text_encoder=lora runs the text encoder in the step: it needs data that carries the caption's token ids,
    the text encoder's directory and LoRA targets it has (one replica per process: `strategy_problems`)."""
    if not trains_text_encoder(cfg.mode):
        return []
    problems = []
    if cfg.dataset.conditions != Conditions.encoder_inputs:
        problems.append("mode.text_encoder=lora runs the text encoder on the caption's token ids, but dataset."
                        "conditions=encoder_outputs holds the condition encoder's outputs. Fix: dataset.conditions="
                        "encoder_inputs with data preprocessed with preprocess.store=inputs or both.")
    try:
        text_encoder_dir(cfg.model)
    except ConfigError as err:
        problems.append(f"mode.text_encoder=lora trains a LoRA on the text encoder: {err}")
    else:
        problems += [p for p in [text_lora_problem(cfg.model, cfg.mode)] if p]
    if cfg.model.text_encoder_adapter is not None:
        problems.append(f"mode.text_encoder=lora trains a fresh LoRA on the base text encoder, and model."
                        f"text_encoder_adapter={cfg.model.text_encoder_adapter} would merge another one under it. "
                        "Fix: model.text_encoder_adapter=null for training (it is for preprocessing, previews and "
                        "generate).")
    return problems  # hardware.distributed: distributed.strategy_problems


def flat_config(cfg: Config, world_size: int) -> Dict[str, Any]:
    """The resolved config as {"optim.lr": 1e-4, ...} plus the process count: what a strict resume compares."""
    flat = flatten(cfg)
    flat.update({"mode.name": cfg.mode.name, "dataset.kind": cfg.dataset.kind, "world_size": world_size})
    return flat


def check_resume_config(cfg: Config, path: Path, world_size: int, say: Callable[[str], None]) -> TrainingState:
    """Read the checkpoint's training state (memory-mapped) and refuse a resume into another setup before any weights
    load: mode, trained tensors and optimizer groups come from the configured model on the meta device."""
    state = read_state(path)
    text = meta_text_model(cfg.model) if trains_text_encoder(cfg.mode) else None
    decoder = make_trainable(build_meta_model(cfg.model), cfg.mode, text)
    groups = [(g["name"], len(g["params"])) for g in param_groups(decoder, cfg.optim)]
    flat = flat_config(cfg, world_size)
    defaults = {k: field_default(cfg, k) for k in flat if k not in state.config}  # settings newer than the checkpoint
    for warning in check_resume(state, path, cfg.mode.name, flat, cfg.train.resume_strict,
                                data_fingerprint_digest(cfg), signature(decoder), groups, defaults):
        say(warning)
    if state.note:
        say(f"{path} was saved with a note: {state.note}")
    return state


def validation_dir(cfg: Config) -> Optional[str]:
    """dataset.val_path (only preprocessed datasets have one)."""
    return cfg.dataset.val_path if isinstance(cfg.dataset, PreprocessedDataset) else None


def validation_problems(cfg: Config) -> List[str]:
    """Validation split, early stopping and sampling settings that cannot work, each with its fix."""
    problems = []
    val_path = validation_dir(cfg)
    if not 0.0 <= cfg.dataset.val_fraction < 1.0:
        problems.append(f"dataset.val_fraction={cfg.dataset.val_fraction} must be in [0, 1).")
    if val_path is not None and cfg.dataset.val_fraction > 0:
        problems.append("dataset.val_path and dataset.val_fraction are both set: choose one validation split.")
    if val_path is not None and not Path(os.path.expanduser(val_path)).exists():
        problems.append(f"dataset.val_path={val_path} does not exist.")
    has_val = val_path is not None or cfg.dataset.val_fraction > 0
    for knob, value in (("train.early_stop.patience", cfg.train.early_stop.patience),
                        ("train.val_every", cfg.train.val_every)):
        if value > 0 and not has_val:
            problems.append(f"{knob} needs a validation split: set dataset.val_fraction (e.g. 0.1) or "
                            "dataset.val_path.")
    if cfg.train.val_every < 0 or cfg.train.early_stop.patience < 0 or cfg.train.samples.every_epochs < 0:
        problems.append("train.val_every, train.early_stop.patience and train.samples.every_epochs must be >= 0.")
    if cfg.train.samples.every_epochs:
        problems += preview_problems(cfg.train.samples, cfg.model)
    return problems


def data_fingerprint_digest(cfg: Config) -> Optional[str]:
    """Digest of the training data's fingerprint.json, stored in checkpoints (None: synthetic or legacy .pt data)."""
    if not isinstance(cfg.dataset, PreprocessedDataset):
        return None
    fingerprint = read_fingerprint(cfg.dataset.path)
    if fingerprint is None:
        return None
    return hashlib.sha1(json.dumps(fingerprint, sort_keys=True).encode()).hexdigest()[:16]


def check_data_fingerprint(cfg: Config, model: nn.Module, say) -> None:
    """Refuse data preprocessed with another model or condition encoder (dataset.allow_fingerprint_mismatch=true
    overrides), for the training directory and dataset.val_path. Legacy .pt data has no fingerprint: say that it
    cannot be checked."""
    if not isinstance(cfg.dataset, PreprocessedDataset):
        return
    ours = make_fingerprint(cfg.model.variant, condition_encoder_digest(model), None, None, None, {})
    # on encoder inputs the condition encoder runs in training: data of any variant with the same VAE and text
    # encoder fits
    ignore = ENCODER_INPUTS_IGNORE if cfg.dataset.conditions == Conditions.encoder_inputs else ()
    for path in [cfg.dataset.path] + ([cfg.dataset.val_path] if cfg.dataset.val_path else []):
        data_fp = read_fingerprint(path)
        if data_fp is None:
            say(f"data fingerprint of {path}: none (legacy .pt data); which condition encoder produced it cannot be "
                "checked")
            continue
        problems = compare_fingerprints(data_fp, ours, ignore)
        if problems and not cfg.dataset.allow_fingerprint_mismatch:
            raise UserError(f"The data in {path} was not made for this model:\n  " + "\n  ".join(problems)
                             + "\n(dataset.allow_fingerprint_mismatch=true trains anyway.)")
        say(f"data fingerprint of {path}: " + ("MISMATCH accepted (dataset.allow_fingerprint_mismatch=true):\n  "
                                              + "\n  ".join(problems) if problems else "matches the model"))
