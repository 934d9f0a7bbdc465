"""Training checkpoints: everything needed to continue a run exactly where it stopped, verifiable before use.

Layout of `<run_dir>/checkpoints/step-00000050/`:
  adapter/              mode=lora|lokr|loha: PEFT adapter (adapter_config.json + adapter_model.safetensors), loads in
                        official inference; adapter/comfyui/adapter.safetensors: the same in ComfyUI's layout
  model/                mode=full: the whole model in the official layout (config.json + model.safetensors, fp32)
  <adapter|model>/text_encoder/   mode.text_encoder=lora: the text encoder's PEFT LoRA
  training_state.pt     optimizer, scheduler, grad scaler, sampler position, RNG states of every process, step,
                        trained-tensor signature, the resolved config and a note (e.g. an emergency save)
  config.yaml           the resolved run config, readable
  manifest.json         written last: size and xxh3 digest of every other file, checked before a resume
`<run_dir>/checkpoints/best.json` names the checkpoint with the best validation loss; it is kept beside the newest
`train.keep_last` and written before any older checkpoint is deleted, so it never names a deleted one.

Writes are atomic: a checkpoint is built in a hidden temp directory beside its final name and renamed into place
when complete (`atomic_directory`); an old checkpoint is renamed to a hidden trash name before it is deleted. A kill
at any moment leaves only complete checkpoints under `step-N` names (hidden leftovers are cleaned at the next start,
see `lifecycle.clean_leftovers`). Before a save the free disk space is compared with the expected size.
"""

from __future__ import annotations

import errno
import json
import logging
import random
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
from safetensors.torch import load_file
from torch import nn

from acestep_ft.atomic import atomic_directory, atomic_write_bytes, delete_via_trash
from acestep_ft.digest import ALGORITHM, file_digest
from acestep_ft.errors import UserError
from acestep_ft.train.adapters import load_adapter_weights
from acestep_ft.train.text_encoder import TEXT_ADAPTER_DIR
from acestep_ft.train.trainable import parts_of, trainable_state_dict

log = logging.getLogger(__name__)

STATE_FILE = "training_state.pt"
MANIFEST_FILE = "manifest.json"
PREFIX = "step-"
GIB = 2**30


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
    nonfinite_skips: int = 0                 # optimizer steps dropped so far for a non-finite loss or gradient
    nonfinite_in_a_row: int = 0              # ... of which the latest in a row (train.nonfinite=skip halts on these)
    note: Optional[str] = None               # why this checkpoint was written outside the schedule (signal, halt)


# Settings that may change between a run and its resume without changing what is computed.
# Validation settings only decide when the weights are evaluated and kept: the training trajectory stays the same.
RESUMABLE_CHANGES = ("train.resume", "train.resume_strict", "train.stop_at_step", "train.log_every",
                     "train.save_every", "train.keep_last", "train.plot", "logger.", "train.val_every",
                     "train.early_stop.", "train.samples.", "train.export_dtype", "train.ema.for_eval",
                     "train.ema.for_export", "preflight.", "hardware.memory_gb", "train.overwrite",
                     "train.nonfinite", "train.max_nonfinite_skips", "train.export_comfyui", "dataset.verify_checksums",
                     "mode.init_adapter", "cache.")
BEST_FILE = "best.json"
OPTIMIZER_CLASS = "optim.optimizer._target_"


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


def step_of(path: Path) -> int:
    return int(Path(path).name[len(PREFIX):])


# -- manifest: sizes and digests of every file, written last ----------------------------------------------------
def write_manifest(directory: Path) -> None:
    """manifest.json over every other file below `directory` (their sizes also tell the next save what it needs)."""
    directory = Path(directory)
    files = {p.relative_to(directory).as_posix(): {"bytes": p.stat().st_size, ALGORITHM: file_digest(p)}
             for p in sorted(directory.rglob("*")) if p.is_file() and p.name != MANIFEST_FILE}
    record = {"format": 1, "files": files}
    (directory / MANIFEST_FILE).write_text(json.dumps(record, indent=1) + "\n")


def manifest_problem(directory: Path) -> Optional[str]:
    """What is wrong with a checkpoint directory against its manifest (None: every file is there, of the recorded
    size and digest). A checkpoint without a manifest was written by an older version: "unverified"."""
    directory = Path(directory)
    path = directory / MANIFEST_FILE
    if not path.exists():
        return None if (directory / STATE_FILE).exists() else f"no {MANIFEST_FILE} and no {STATE_FILE}"
    try:
        files = json.loads(path.read_text())["files"]
        expected = {name: (int(f["bytes"]), str(f[ALGORITHM])) for name, f in files.items()}
    except (ValueError, KeyError, TypeError) as err:
        return f"{MANIFEST_FILE} is unreadable ({err!r})"
    for name, (size, digest) in expected.items():
        file = directory / name
        if not file.is_file():
            return f"{name} is missing"
        if file.stat().st_size != size:
            return f"{name} is {file.stat().st_size} bytes, the manifest says {size} (truncated or replaced)"
        if file_digest(file) != digest:
            return f"{name} fails its {ALGORITHM} checksum (changed bytes: disk or copy damage)"
    return None


def has_manifest(directory: Path) -> bool:
    return (Path(directory) / MANIFEST_FILE).exists()


def checkpoint_bytes(directory: Path) -> Optional[int]:
    """Total size recorded in a checkpoint's manifest (None without one)."""
    try:
        return sum(int(f["bytes"]) for f in json.loads((Path(directory) / MANIFEST_FILE).read_text())["files"].values())
    except (OSError, ValueError, KeyError, TypeError):
        return None


# -- save ---------------------------------------------------------------------------------------------------------
def save_checkpoint(
    run_dir: Path,
    state: TrainingState,
    write_weights: Callable[[Path], None],
    config_yaml: str,
    keep_last: int,
    keep_step: Optional[int] = None,
    best: Optional[Tuple[int, float]] = None,
    expected_bytes: int = 0,
) -> Path:
    """Write a checkpoint atomically, record it in best.json when `best` = (step, val loss) names it, then delete all
    but the newest `keep_last`, the one of step `keep_step` and the one best.json names. `write_weights(dir)` writes
    the trained weights (`adapter/` for adapter modes, `model/` for full) into the checkpoint directory.

    Refuses (UserError "disk full") before writing when the disk has less free space than the previous checkpoint
    took (or `expected_bytes` before the first one), and when a write fails for lack of space; the previous
    checkpoints stay intact.
    """
    final = checkpoint_dir(run_dir, state.step)
    root = final.parent
    root.mkdir(parents=True, exist_ok=True)
    previous = list_checkpoints(run_dir)
    need = (checkpoint_bytes(previous[-1]) if previous else None) or expected_bytes  # the last save knows best
    free = shutil.disk_usage(root).free
    if free < need:
        raise UserError(disk_full(root, need, free, previous))
    try:
        with atomic_directory(final) as tmp:  # re-saving a step (after a resume) replaces the old one whole
            write_weights(tmp / weights_dir(state.mode))
            torch.save(state.__dict__, tmp / STATE_FILE)
            (tmp / "config.yaml").write_text(config_yaml)
            write_manifest(tmp)
    except (OSError, RuntimeError) as err:
        free = shutil.disk_usage(root).free
        full = getattr(err, "errno", None) in (errno.ENOSPC, errno.EDQUOT) or "No space left" in str(err)
        # torch.save reports a full disk as "file write failed" without an errno: judge by the space left
        if full or free < max(need, 2**20):
            raise UserError(disk_full(root, need, free, previous, while_writing=True)) from err
        raise
    if best is not None and best[0] == state.step:
        mark_best(run_dir, *best)
    protect = {state.step, keep_step, (read_best(run_dir) or {}).get("step")}
    prune_checkpoints(run_dir, keep_last, protect)
    return final


def disk_full(root: Path, need: int, free: int, previous: Sequence[Path], while_writing: bool = False) -> str:
    kept = f"the previous checkpoint {previous[-1]} is intact" if previous else "no earlier checkpoint exists"
    what = "disk full while writing a checkpoint" if while_writing else "disk full: not enough space for a checkpoint"
    return (f"{what} in {root}: a checkpoint needs about {need / GIB:.2f} GiB, {free / GIB:.2f} GiB are free; {kept}. "
            "Free space there, then continue with train.resume=auto.")


def prune_checkpoints(run_dir: Path, keep_last: int, protect: set) -> None:
    """Delete all but the newest `keep_last` checkpoints (0 = keep all) and those whose step is in `protect`, each
    through a hidden trash name, so a kill mid-delete never leaves a half-deleted `step-N`."""
    for old in list_checkpoints(run_dir)[:-keep_last] if keep_last > 0 else []:
        if step_of(old) not in protect:
            delete_via_trash(old)


def weights_dir(mode: str) -> str:
    return "model" if mode == "full" else "adapter"


def mark_best(run_dir: Path, step: int, val_loss: float) -> None:
    """Record checkpoint `step` as the best by validation loss in checkpoints/best.json (written atomically)."""
    record = {"step": step, "val_loss": val_loss, "path": checkpoint_dir(run_dir, step).name}
    atomic_write_bytes(Path(run_dir) / "checkpoints" / BEST_FILE, (json.dumps(record, indent=1) + "\n").encode())


def read_best(run_dir: Path) -> Optional[Dict[str, Any]]:
    path = Path(run_dir) / "checkpoints" / BEST_FILE
    try:
        return json.loads(path.read_text()) if path.exists() else None
    except ValueError:
        return None  # a torn best.json (written atomically, so only by hand) protects nothing


def list_checkpoints(run_dir: Path) -> list[Path]:
    """Checkpoints of a run, oldest first: `step-N` directories with a training state (temp and trash directories
    are hidden and never listed; whether the files are intact is `manifest_problem`'s question)."""
    root = Path(run_dir) / "checkpoints"
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.is_dir() and p.name.startswith(PREFIX) and p.name[len(PREFIX):].isdigit()
             and ((p / STATE_FILE).exists() or (p / MANIFEST_FILE).exists())]
    return sorted(found, key=step_of)


# -- resume -------------------------------------------------------------------------------------------------------
def damaged(path: Path, problem: str) -> str:
    return (f"checkpoint {path} is damaged: {problem}. Resume from an earlier checkpoint (train.resume=auto takes the "
            "newest intact one), or start over in another hydra.run.dir.")


def read_state(path: Path) -> TrainingState:
    """training_state.pt of a checkpoint, memory-mapped (tensors are read when used), as a TrainingState."""
    file = Path(path) / STATE_FILE
    try:
        raw = torch.load(file, map_location="cpu", weights_only=False, mmap=True)
        return TrainingState(**raw)
    except FileNotFoundError:
        raise UserError(damaged(Path(path), f"{STATE_FILE} is missing")) from None
    except Exception as err:  # torch/pickle raise many types for a damaged file; all mean the same here
        raise UserError(damaged(Path(path), f"{STATE_FILE} cannot be read ({type(err).__name__}: {err})")) from err


def config_changes(saved: Dict[str, Any], current: Dict[str, Any],
                   defaults: Optional[Dict[str, Any]] = None) -> List[str]:
    """Flattened config entries that differ, ignoring RESUMABLE_CHANGES, as "key: checkpoint X, now Y". A key the
    checkpoint lacks (it predates the setting) is unchanged when its current value is its default (`defaults`)."""
    defaults = defaults or {}
    keys = sorted(set(saved) | set(current))
    return [f"{k}: checkpoint {saved.get(k, '<absent>')!r}, now {current.get(k, '<absent>')!r}" for k in keys
            if saved.get(k) != current.get(k) and not k.startswith(RESUMABLE_CHANGES)
            and not (k not in saved and k in defaults and current.get(k) == defaults[k])]


def group_layout(optimizer_state: Dict[str, Any]) -> Optional[List[Tuple[Any, int]]]:
    """(name, tensor count) per parameter group of a saved optimizer state (None: a sharded format without groups)."""
    groups = optimizer_state.get("param_groups") if isinstance(optimizer_state, dict) else None
    return None if groups is None else [(g.get("name"), len(g["params"])) for g in groups]


def check_resume(state: TrainingState, path: Path, mode: str, config: Dict[str, Any], strict: bool,
                 data_fingerprint: Optional[str], expected: Dict[str, list],
                 groups: List[Tuple[Any, int]], defaults: Optional[Dict[str, Any]] = None) -> List[str]:
    """Refuse (UserError) a resume that cannot continue this run, or with `strict` would not reproduce it; returns
    the warnings of a non-strict resume. Needs no weights: `expected` is the trained-tensor signature of the configured
    model and `groups` the (name, tensor count) of its optimizer parameter groups, both from the meta device.

    Always refused: another mode, another set/shape of trained tensors, another optimizer class or parameter-group
    layout (the saved state cannot go in). With `strict` also: another data fingerprint and any other config
    difference outside RESUMABLE_CHANGES (model, data, optimizer settings, objective, batch setup, processes).
    """
    problems, warnings = [], []
    if state.mode != mode:
        problems.append(f"mode: checkpoint {state.mode!r}, config {mode!r}")
    if state.signature != expected:
        names = sorted(set(state.signature) | set(expected))
        differ = [k for k in names if state.signature.get(k) != expected.get(k)]
        problems.append(f"trained tensors differ ({len(differ)}), e.g. {differ[:5]}")
    if state.config.get(OPTIMIZER_CLASS) != config.get(OPTIMIZER_CLASS):
        problems.append(f"optimizer class: checkpoint {state.config.get(OPTIMIZER_CLASS)!r}, now "
                        f"{config.get(OPTIMIZER_CLASS)!r} (its saved state cannot be carried over)")
    saved_groups = group_layout(state.optimizer)
    if not problems and saved_groups is not None and saved_groups != groups:
        problems.append(f"optimizer parameter groups (name, tensors): checkpoint {saved_groups}, now {groups} "
                        "(optim.param_groups, optim.decay_all or the trained set changed, or the checkpoint predates "
                        "weight decay by layer type: Linear time_embed / condition_embedder weights now decay)")
    if problems:
        raise UserError(f"cannot resume from {path}: " + "; ".join(problems) + ". Resume with the config the run was "
                        "started with (see its config.yaml), or start a fresh run in another hydra.run.dir.")
    changes = config_changes(state.config, config, defaults)
    if state.data_fingerprint != data_fingerprint:
        changes.insert(0, f"data fingerprint: checkpoint {state.data_fingerprint}, dataset now {data_fingerprint} "
                          "(the data was re-preprocessed or replaced)")
    if changes and strict:
        raise UserError(f"cannot resume from {path}: the run differs from the checkpoint's:\n  " + "\n  ".join(changes)
                        + "\nResume with the original settings (see its config.yaml), or pass train.resume_strict=false"
                        " to continue with the new ones (the run then no longer reproduces an uninterrupted one).")
    if changes:
        warnings.append(f"resuming {path} with changes (train.resume_strict=false); the new settings are in effect, "
                        "optimizer hyperparameters and schedule included:\n  " + "\n  ".join(changes))
    return warnings


def load_weights(path: Path, decoder: nn.Module, mode: str) -> None:
    """Load a checkpoint's trained weights into `decoder` (after `check_resume` accepted it)."""
    folder = Path(path) / weights_dir(mode)
    parts = dict(parts_of(decoder))
    try:
        if "text_encoder." in parts:  # mode.text_encoder=lora: its adapter beside the trained weights
            load_adapter_weights(parts["text_encoder."], folder / TEXT_ADAPTER_DIR)
        if mode != "full":
            load_adapter_weights(parts["decoder."], folder)
        else:  # official keys: decoder.* and encoder.*
            weights = load_file(str(folder / "model.safetensors"))
            for prefix in ("decoder.", "encoder."):
                if prefix in parts:
                    parts[prefix].load_state_dict({k[len(prefix):]: v for k, v in weights.items()
                                                   if k.startswith(prefix)})
    except UserError:
        raise
    except Exception as err:  # safetensors, OSError, a strict load_state_dict: the files do not fit
        raise UserError(damaged(Path(path), f"its weights in {folder} cannot be loaded ({type(err).__name__}: "
                                            f"{err})")) from err


def apply_optimizer_settings(optimizer: torch.optim.Optimizer, scheduler: Any,
                             fresh: List[Dict[str, Any]]) -> List[str]:
    """After loading a checkpoint's optimizer and scheduler state: put back the hyperparameters of the freshly built
    optimizer (`fresh` = its param_groups without "params", taken before the load), so that a non-strict resume runs
    with the configured lr, weight decay, betas, eps and per-group multipliers, and the schedule restarts from the new
    base lr at the restored step. Returns the changes made ("group: key old -> new"); none on a strict resume."""
    changes = []
    for i, (group, new) in enumerate(zip(optimizer.param_groups, fresh)):
        name = new["name"]  # our param_groups name every group
        for key, value in new.items():
            if key in ("params", "lr", "initial_lr", "name", "pattern"):
                continue
            if group.get(key) != value:
                changes.append(f"{name}: {key} {group.get(key)!r} -> {value!r}")
                group[key] = value
        base = new["initial_lr"]  # set by the scheduler built on the fresh optimizer
        if scheduler.base_lrs[i] != base:
            changes.append(f"{name}: base lr {scheduler.base_lrs[i]:.6g} -> {base:.6g}")
            scheduler.base_lrs[i] = base
            group["initial_lr"] = base
        lr = base * scheduler.lr_lambdas[i](scheduler.last_epoch)  # the configured schedule at the restored step
        if group["lr"] != lr:
            changes.append(f"{name}: lr now {group['lr']:.6g} -> {lr:.6g} (schedule)")
            group["lr"] = lr
    scheduler._last_lr = [group["lr"] for group in optimizer.param_groups]
    return changes
