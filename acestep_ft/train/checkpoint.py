"""Training checkpoints: everything needed to continue a run exactly where it stopped.

Layout of `<run_dir>/checkpoints/step-00000050/`:
  adapter/              mode=lora: PEFT adapter (adapter_config.json + adapter_model.safetensors), loads in official inference
  model/                mode=full: the whole model in the official layout (config.json + model.safetensors, fp32)
  training_state.pt     optimizer, scheduler, sampler position, RNG states, step, trained-tensor signature
  config.yaml           the resolved run config

A checkpoint is written into a hidden temp directory beside its final name and renamed into place when complete,
so a crash mid-write never leaves a half checkpoint that resume could pick up.
"""

from __future__ import annotations

import random
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Dict, Optional

import numpy as np
import torch
from safetensors.torch import load_file
from torch import nn

from acestep_ft.train.trainable import load_adapter_weights, save_adapter, trainable_state_dict

STATE_FILE = "training_state.pt"
PREFIX = "step-"


@dataclass
class TrainingState:
    """The parts of a run that are not weights."""

    step: int                      # optimizer steps completed
    optimizer: Dict[str, Any]
    scheduler: Dict[str, Any]
    sampler: Dict[str, Any]
    rng: Dict[str, Any]
    signature: Dict[str, list]     # trained tensor name -> shape, to refuse resuming into another setup
    mode: str


def capture_rng() -> Dict[str, Any]:
    """Every RNG the loop touches (python, numpy, torch CPU and all CUDA devices)."""
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng(state: Dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def signature(decoder: nn.Module) -> Dict[str, list]:
    return {k: list(v.shape) for k, v in trainable_state_dict(decoder).items()}


def checkpoint_dir(run_dir: Path, step: int) -> Path:
    return Path(run_dir) / "checkpoints" / f"{PREFIX}{step:08d}"


def save_checkpoint(
    run_dir: Path,
    state: TrainingState,
    decoder: nn.Module,
    save_full: Callable[[Path], None],
    config_yaml: str,
    keep_last: int,
) -> Path:
    """Write a checkpoint atomically and delete all but the newest `keep_last`. Returns its directory."""
    final = checkpoint_dir(run_dir, state.step)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{final.name}-", dir=final.parent))
    try:
        if state.mode == "lora":
            save_adapter(decoder, tmp / "adapter")
        else:
            save_full(tmp / "model")
        torch.save(state.__dict__, tmp / STATE_FILE)
        (tmp / "config.yaml").write_text(config_yaml)
        if final.exists():  # re-saving the same step (e.g. after a resume): replace the old one whole
            shutil.rmtree(final)
        tmp.rename(final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    for old in list_checkpoints(run_dir)[:-keep_last] if keep_last > 0 else []:
        shutil.rmtree(old, ignore_errors=True)
    return final


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


def load_checkpoint(path: Path, decoder: nn.Module, mode: str) -> TrainingState:
    """Load the trained weights into `decoder` and return the rest. Refuses a checkpoint of another setup."""
    state = TrainingState(**torch.load(Path(path) / STATE_FILE, map_location="cpu", weights_only=False))
    problems = []
    if state.mode != mode:
        problems.append(f"mode: checkpoint {state.mode!r}, config {mode!r}")
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
    if mode == "lora":
        load_adapter_weights(decoder, Path(path) / "adapter")
    else:
        weights = load_file(str(Path(path) / "model" / "model.safetensors"))
        decoder.load_state_dict({k[len("decoder."):]: v for k, v in weights.items() if k.startswith("decoder.")})
    return state
