"""Optimizer and learning-rate schedule.

Weight decay skips norms, biases, embeddings and the adaLN tables (1-D or table-like tensors), as usual for
transformers. The optimizer class is a config leaf (`optim.optimizer._target_`), so any torch-compatible optimizer
plugs in without code.
"""

from __future__ import annotations

import math
from typing import Dict, List

import torch
from hydra.utils import instantiate
from omegaconf import OmegaConf
from torch import nn

from acestep_ft.config import OptimConfig

NO_DECAY_MARKERS = ("norm", "bias", "embed", "scale_shift_table", "special_token")


def takes_weight_decay(name: str, param: torch.Tensor) -> bool:
    """Matrices decay; vectors, norms, biases, embeddings and modulation tables do not."""
    return param.ndim >= 2 and not any(marker in name for marker in NO_DECAY_MARKERS)


def param_groups(module: nn.Module, weight_decay: float) -> List[Dict]:
    """Two groups of the trainable parameters: with and without weight decay (empty groups dropped)."""
    decay, no_decay = [], []
    for name, p in module.named_parameters():
        if p.requires_grad:
            (decay if takes_weight_decay(name, p) else no_decay).append(p)
    groups = [
        {"name": "decay", "params": decay, "weight_decay": weight_decay},
        {"name": "no_decay", "params": no_decay, "weight_decay": 0.0},
    ]
    groups = [g for g in groups if g["params"]]
    if not groups:
        raise ValueError("no trainable parameters: check mode.target_modules against the decoder's module names")
    return groups


def build_optimizer(module: nn.Module, cfg: OptimConfig) -> torch.optim.Optimizer:
    """Instantiate `cfg.optimizer` over the parameter groups with lr from the config."""
    spec = OmegaConf.create(cfg.optimizer) if isinstance(cfg.optimizer, dict) else cfg.optimizer
    return instantiate(spec, params=param_groups(module, cfg.weight_decay), lr=cfg.lr, _convert_="all")


def lr_factor(step: int, total_steps: int, cfg: OptimConfig) -> float:
    """Multiplier of the peak LR at optimizer step `step` (0-based): linear warmup, then cosine or constant."""
    if cfg.warmup_steps > 0 and step < cfg.warmup_steps:
        return (step + 1) / cfg.warmup_steps
    if cfg.schedule == "constant":
        return 1.0
    decay_steps = max(1, total_steps - cfg.warmup_steps)
    progress = min(1.0, (step - cfg.warmup_steps) / decay_steps)
    cosine = 0.5 * (1.0 + math.cos(math.pi * progress))
    return cfg.min_lr_ratio + (1.0 - cfg.min_lr_ratio) * cosine


def build_scheduler(optimizer: torch.optim.Optimizer, total_steps: int, cfg: OptimConfig):
    """LambdaLR over `lr_factor`; stepped once per optimizer step by the loop."""
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: lr_factor(step, total_steps, cfg))
