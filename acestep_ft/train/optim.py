"""Optimizer, parameter groups and learning-rate schedule.

Parameter groups come from name patterns in the config (`optim.param_groups`), each with an LR multiplier; LoRA and
full fine-tuning use the same mechanism (a LoRA run only has adapter tensors to place). Weight decay is decided by the
module that owns a parameter, not by its name: only the `weight` of an nn.Linear or a convolution decays (PEFT's
lora_A / lora_B are such Linears); biases, norm weights, nn.Embedding tables and free-standing parameters (adaLN
`scale_shift_table`, `null_condition_emb`, special tokens) take 0, as usual for transformers. `optim.decay_all` decays
every trainable tensor instead, as the official trainer does. The optimizer class is a config leaf
(`optim.optimizer._target_`), so any torch-compatible optimizer plugs in without code.
"""

from __future__ import annotations

import math
import re
from typing import Dict, List, Set

import torch
from hydra.utils import instantiate
from omegaconf import OmegaConf
from torch import nn

from acestep_ft.config import OptimConfig

# Layers whose `weight` is a matrix (or kernel) that weight decay is meant to shrink; isinstance also covers their
# subclasses (bitsandbytes Linear8bitLt / Linear4bit, NonDynamicallyQuantizableLinear).
DECAYING_MODULES = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d,
                    nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)


def decaying_parameters(module: nn.Module) -> Set[str]:
    """Names (as `module.named_parameters()` gives them) of the parameters that take weight decay.

    A parameter decays iff it is the `weight` of a Linear / convolution layer, PEFT's lora_A / lora_B included. Its
    name alone can mislead (`time_embed.linear_1` and `condition_embedder` are plain Linears), so the owning module
    decides. Everything else - biases, norm weights, nn.Embedding tables, PEFT's lora_embedding_A/B (ParameterDict
    entries) and free-standing parameters such as the adaLN `scale_shift_table` - does not decay.
    """
    owners = dict(module.named_modules())
    decaying = set()
    for name, _ in module.named_parameters():
        parent, _, leaf = name.rpartition(".")
        if leaf == "weight" and isinstance(owners[parent], DECAYING_MODULES):
            decaying.add(name)
    return decaying


def takes_weight_decay(name: str, param: torch.Tensor) -> bool:
    """The decay rule from a name and shape alone, for callers that hold no module (the preflight estimate).

    Agrees with `decaying_parameters` on the ACE-Step decoder, LoRA included (a test holds the two together): there
    the `weight` tensors of 2+ dims are exactly the Linear / convolution weights - norm weights are vectors, the
    adaLN tables are not called weight and the decoder has no nn.Embedding. Training uses `decaying_parameters`.
    """
    return param.ndim >= 2 and name.rpartition(".")[2] == "weight"


def param_groups(module: nn.Module, cfg: OptimConfig) -> List[Dict]:
    """torch parameter groups of the trainable parameters: one per (configured group, decays or not).

    Each trainable parameter lands in exactly one group: the first of `cfg.param_groups` whose pattern is found in its
    name, else "default". Linear / convolution weights (`decaying_parameters`) take the group's weight decay, every
    other tensor goes to "<group>/no_decay" with 0; with `cfg.decay_all` every tensor takes the group's weight decay.
    Empty groups are dropped; each group carries its lr (optim.lr x lr_mult) and, for the start-up table, its pattern.
    """
    specs = [(g.name, g.pattern, g.lr_mult, cfg.weight_decay if g.weight_decay is None else g.weight_decay)
             for g in cfg.param_groups] + [("default", "(anything else)", 1.0, cfg.weight_decay)]
    compiled = [re.compile(pattern) for _, pattern, _, _ in specs[:-1]]
    decaying = decaying_parameters(module)
    buckets: Dict[tuple, List[torch.Tensor]] = {}
    for name, p in module.named_parameters():
        if p.requires_grad:
            index = next((i for i, rx in enumerate(compiled) if rx.search(name)), len(specs) - 1)
            buckets.setdefault((index, cfg.decay_all or name in decaying), []).append(p)
    if not buckets:
        raise ValueError("no trainable parameters: check mode.target_modules against the decoder's module names")
    groups = []
    for (index, decays), params in sorted(buckets.items()):
        name, pattern, mult, wd = specs[index]
        groups.append({"name": name if decays else f"{name}/no_decay", "pattern": pattern, "params": params,
                       "lr": cfg.lr * mult, "weight_decay": wd if decays else 0.0})
    return groups


def group_table(groups: List[Dict]) -> str:
    """The start-up table: group, pattern, tensors, parameters, lr, weight decay."""
    rows = [("group", "pattern", "tensors", "params", "lr", "wd")] + [
        (g["name"], g["pattern"], str(len(g["params"])), f"{sum(p.numel() for p in g['params']):,}",
         f"{g['lr']:.3g}", f"{g['weight_decay']:g}") for g in groups]
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() for row in rows)


def build_optimizer(module: nn.Module, cfg: OptimConfig) -> torch.optim.Optimizer:
    """Instantiate `cfg.optimizer` over the parameter groups with lr from the config."""
    spec = OmegaConf.create(cfg.optimizer) if isinstance(cfg.optimizer, dict) else cfg.optimizer
    groups = [{k: v for k, v in g.items() if k != "pattern"} for g in param_groups(module, cfg)]
    return instantiate(spec, params=groups, lr=cfg.lr, _convert_="all")


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
