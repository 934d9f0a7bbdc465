"""Training checkpoints: everything needed to continue a run exactly where it stopped.

Layout of `<run_dir>/checkpoints/step-00000050/`:
  adapter/              mode=lora: PEFT adapter (adapter_config.json + adapter_model.safetensors), loads in official inference
  model/                mode=full: the whole model in the official layout (config.json + model.safetensors, fp32)
  training_state.pt     optimizer, scheduler, grad scaler, sampler position, RNG states of every process, step,
                        trained-tensor signature and the resolved config (for the strict resume check)
  config.yaml           the resolved run config, readable
`<run_dir>/checkpoints/best.json` names the checkpoint with the best validation loss; it is kept beside the newest
`train.keep_last`.

A checkpoint is written into a hidden temp directory beside its final name and renamed into place when complete
(`atomic_directory`), so a crash mid-write never leaves a half checkpoint that resume could pick up.
"""

from __future__ import annotations

import json
import logging
import random
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional

import numpy as np
import torch
from safetensors.torch import load_file
from torch import nn

from acestep_ft.atomic import atomic_directory, atomic_write_bytes
from acestep_ft.train.trainable import load_adapter_weights, trainable_state_dict

log = logging.getLogger(__name__)

STATE_FILE = "training_state.pt"
PREFIX = "step-"


@dataclass
class TrainingState:
    """The parts of a run that are not weights."""

    step: int                      # optimizer steps completed
    optimizer: Dict[str, Any]
    scheduler: Dict[str, Any]
    sampler: Dict[str, Any]
    rng: List[Dict[str, Any]]      # one entry per process, in rank order
    signature: Dict[str, list]     # trained tensor name -> shape, to refuse resuming into another setup
    mode: str
    config: Dict[str, Any]         # flattened resolved config ("optim.lr" -> 1e-4)
    scaler: Optional[Dict[str, Any]] = None  # fp16 GradScaler state
    ema: Optional[Dict[str, Any]] = None     # Ema.state_dict() when train.ema.enabled
    early_stop: Optional[Dict[str, Any]] = None  # EarlyStopping.state_dict() when there is a validation split
    data_fingerprint: Optional[str] = None   # digest of the dataset's fingerprint.json (None: data without one)


# Settings that may change between a run and its resume without changing what is computed.
# Validation settings only decide when the weights are evaluated and kept: the training trajectory stays the same.
RESUMABLE_CHANGES = ("train.resume", "train.resume_strict", "train.stop_at_step", "train.log_every",
                     "train.save_every", "train.keep_last", "train.plot", "logger.", "train.val_every",
                     "train.early_stop.", "train.samples.", "train.export_dtype", "train.ema.for_eval",
                     "train.ema.for_export", "preflight.", "hardware.memory_gb")
BEST_FILE = "best.json"


def capture_rng(device: Optional[torch.device] = None) -> Dict[str, Any]:
    """Every RNG this process touches: python, numpy, torch CPU, and its own CUDA device if it has one."""
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if device is not None and device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def restore_rng(state: Dict[str, Any], device: Optional[torch.device] = None) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and device is not None and device.type == "cuda":
        torch.cuda.set_rng_state(state["cuda"], device)


def signature(decoder: nn.Module, weights: Optional[Dict[str, torch.Tensor]] = None) -> Dict[str, list]:
    """Trained tensor name -> shape (from `weights`, the gathered decoder state, when the live one is sharded)."""
    return {k: list(v.shape) for k, v in trainable_state_dict(decoder, weights).items()}


def checkpoint_dir(run_dir: Path, step: int) -> Path:
    return Path(run_dir) / "checkpoints" / f"{PREFIX}{step:08d}"


def save_checkpoint(
    run_dir: Path,
    state: TrainingState,
    write_weights: Callable[[Path], None],
    config_yaml: str,
    keep_last: int,
    keep_step: Optional[int] = None,
) -> Path:
    """Write a checkpoint atomically and delete all but the newest `keep_last` and the one of step `keep_step` (the
    best so far). `write_weights(dir)` writes the trained weights (`adapter/` for LoRA, `model/` for full) into the
    checkpoint directory. Returns its directory."""
    final = checkpoint_dir(run_dir, state.step)
    with atomic_directory(final) as tmp:  # re-saving a step (after a resume) replaces the old one whole
        write_weights(tmp / weights_dir(state.mode))
        torch.save(state.__dict__, tmp / STATE_FILE)
        (tmp / "config.yaml").write_text(config_yaml)
    for old in list_checkpoints(run_dir)[:-keep_last] if keep_last > 0 else []:
        if old != checkpoint_dir(run_dir, keep_step if keep_step is not None else -1):
            shutil.rmtree(old, ignore_errors=True)
    return final


def weights_dir(mode: str) -> str:
    return "adapter" if mode == "lora" else "model"


def mark_best(run_dir: Path, step: int, val_loss: float) -> None:
    """Record checkpoint `step` as the best by validation loss in checkpoints/best.json (written atomically)."""
    record = {"step": step, "val_loss": val_loss, "path": checkpoint_dir(run_dir, step).name}
    atomic_write_bytes(Path(run_dir) / "checkpoints" / BEST_FILE, (json.dumps(record, indent=1) + "\n").encode())


def read_best(run_dir: Path) -> Optional[Dict[str, Any]]:
    path = Path(run_dir) / "checkpoints" / BEST_FILE
    return json.loads(path.read_text()) if path.exists() else None


def list_checkpoints(run_dir: Path) -> list[Path]:
    """Complete checkpoints of a run, oldest first (temp directories are never listed)."""
    root = Path(run_dir) / "checkpoints"
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.is_dir() and p.name.startswith(PREFIX) and (p / STATE_FILE).exists()]
    return sorted(found, key=lambda p: int(p.name[len(PREFIX):]))


def resolve_resume(resume: Optional[str], run_dir: Path) -> Optional[Path]:
    """`train.resume`: None -> fresh start; "auto" -> newest checkpoint of this run dir (or fresh); else a path."""
    if resume is None:
        return None
    if resume == "auto":
        found = list_checkpoints(run_dir)
        return found[-1] if found else None
    path = Path(resume)
    if path.is_dir() and not (path / STATE_FILE).exists():  # a run directory: take its newest checkpoint
        found = list_checkpoints(path)
        if found:
            return found[-1]
    if not (path / STATE_FILE).exists():
        raise FileNotFoundError(
            f"train.resume={resume}: no {STATE_FILE} there; give a checkpoint directory "
            f"(<run>/checkpoints/step-N), a run directory, or train.resume=auto"
        )
    return path


def config_changes(saved: Dict[str, Any], current: Dict[str, Any]) -> List[str]:
    """Flattened config entries that differ, ignoring RESUMABLE_CHANGES, as "key: checkpoint X, now Y"."""
    keys = sorted(set(saved) | set(current))
    return [f"{k}: checkpoint {saved.get(k, '<absent>')!r}, now {current.get(k, '<absent>')!r}" for k in keys
            if saved.get(k) != current.get(k) and not k.startswith(RESUMABLE_CHANGES)]


def load_checkpoint(
    path: Path, decoder: nn.Module, mode: str, config: Dict[str, Any], strict: bool = True,
    data_fingerprint: Optional[str] = None,
) -> TrainingState:
    """Load the trained weights into `decoder` and return the rest.

    Always refused: another mode or another set/shape of trained tensors (the weights cannot go in). With `strict`,
    also refused: another data fingerprint, and any other config difference outside RESUMABLE_CHANGES (model, data,
    optimizer, objective, batch setup, number of processes), since the resumed run would no longer continue the same
    trajectory.
    """
    state = TrainingState(**torch.load(Path(path) / STATE_FILE, map_location="cpu", weights_only=False))
    problems = []
    if state.mode != mode:
        problems.append(f"mode: checkpoint {state.mode!r}, config {mode!r}")
    if state.data_fingerprint != data_fingerprint:
        what = f"data fingerprint: checkpoint {state.data_fingerprint}, dataset now {data_fingerprint}"
        if strict:
            problems.append(what + " (the data was re-preprocessed or replaced; train.resume_strict=false continues)")
        else:
            log.warning("resuming %s on other data (train.resume_strict=false): %s", path, what)
    expected = signature(decoder)
    if state.signature != expected:
        names = sorted(set(state.signature) | set(expected))
        differ = [k for k in names if state.signature.get(k) != expected.get(k)]
        problems.append(f"trained tensors differ ({len(differ)}), e.g. {differ[:5]}")
    if problems:
        raise ValueError(
            f"cannot resume from {path}: " + "; ".join(problems) + ". Resume with the config the run was started "
            "with (see its config.yaml), or start a fresh run."
        )
    changes = config_changes(state.config, config)
    if changes and not strict:
        log.warning("resuming %s with a changed config (train.resume_strict=false):\n  %s", path, "\n  ".join(changes))
    if strict and changes:
        raise ValueError(
            f"cannot resume from {path}: the config differs from the checkpoint's:\n  " + "\n  ".join(changes)
            + "\nResume with the original settings (see its config.yaml), or pass train.resume_strict=false to "
            "continue with the new ones (the run then no longer reproduces an uninterrupted one)."
        )
    if mode == "lora":
        load_adapter_weights(decoder, Path(path) / "adapter")
    else:
        weights = load_file(str(Path(path) / "model" / "model.safetensors"))
        decoder.load_state_dict({k[len("decoder."):]: v for k, v in weights.items() if k.startswith("decoder.")})
    return state
