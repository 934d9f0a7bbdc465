"""The dtypes the estimate assumes: the autocast dtype of hardware.mixed_precision and the frozen weights' dtype
(model.frozen_dtype), for a CUDA GPU with bf16 or, with hardware.device=cpu, the CPU."""

from __future__ import annotations

import torch

from acestep_ft.config import Config, MixedPrecision, resolve_frozen_dtype


def autocast_bytes(cfg: Config) -> int:
    """Bytes per element of the autocast dtype: 2 for bf16/fp16 (auto = bf16 on a CUDA GPU); 4 = no autocast
    (mixed_precision no, or auto on the CPU)."""
    precision, device = str(cfg.hardware.mixed_precision), str(cfg.hardware.device)
    return 4 if precision == "no" or (precision == "auto" and device == "cpu") else 2


def autocast_dtype(precision: MixedPrecision) -> torch.dtype | None:
    """The autocast dtype of hardware.mixed_precision on a CUDA GPU (auto = bf16 there); None = fp32, no autocast."""
    match str(precision):
        case "auto" | "bf16":
            return torch.bfloat16
        case "fp16":
            return torch.float16
    return None


def frozen_dtype(cfg: Config, world_size: int = 1) -> torch.dtype:
    """The dtype run.py gives the frozen weights (model.frozen_dtype), for the device the estimate assumes: the CPU
    for hardware.device=cpu, else a CUDA GPU with bf16 (mixed_precision auto)."""
    on_cpu = str(cfg.hardware.device) == "cpu"
    precision = str(cfg.hardware.mixed_precision)
    if precision == "auto":
        precision = "no" if on_cpu else "bf16"
    return getattr(torch, resolve_frozen_dtype(cfg.model, cfg.hardware, on_cpu, precision, world_size))
