"""Optimizer, parameter groups and learning-rate schedule.

Parameter groups come from name patterns in the config (`optim.param_groups`), each with an LR multiplier; LoRA and
full fine-tuning use the same mechanism (a LoRA run only has adapter tensors to place). Weight decay is decided by the
module that owns a parameter, not by its name: only the `weight` of an nn.Linear or a convolution decays (PEFT's
lora_A / lora_B are such Linears); biases, norm weights, nn.Embedding tables and free-standing parameters (adaLN
`scale_shift_table`, `null_condition_emb`, special tokens) take 0, as usual for transformers. `optim.decay_all` decays
every trainable tensor instead, as the official trainer does. The optimizer class is a config leaf
(`optim.optimizer._target_`), so any torch-compatible optimizer plugs in without code.

What a few optimizers need beyond that is one row of OPTIMIZER_TRAITS, read by the config check
(`optimizer_problems`), the resume (`group_settings`), the loop (`training_mode`, `optimizer_metrics`) and the
evaluation hooks (`evaluation_mode`): Prodigy (conf/optim/prodigy.yaml) keeps its step-size estimate d in its param
groups and takes one lr for all of them; schedule-free AdamW (schedulefree.yaml) warms up by itself, keeps its step
count and train/eval flag in its groups, and trains at one point (y) while it evaluates at another (the average x);
Adafactor (adafactor.yaml) must not compute its own lr.
"""

from __future__ import annotations

import inspect
import math
import re
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Dict, Iterator, List, Optional, Set, Tuple

import torch
from hydra.utils import get_class, instantiate
from omegaconf import OmegaConf
from torch import nn

from acestep_ft.config import OptimConfig, Schedule

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
    groups = [{k: v for k, v in g.items() if k != "pattern"} for g in param_groups(module, cfg)]
    return instantiate(OmegaConf.create(constructor_spec(cfg)), params=groups, lr=cfg.lr, _convert_="all")


def constructor_spec(cfg: OptimConfig) -> Dict[str, Any]:
    """`cfg.optimizer` as a plain dict, less the kwargs of the schema default (AdamW's betas / eps) that the class
    does not take and that still hold their default value: an optim YAML merges into that default and cannot delete
    its keys (optim=adafactor inherits betas, which Adafactor has no use for). A kwarg set on purpose is kept, so the
    constructor still refuses a misspelled one."""
    spec = OmegaConf.to_container(OmegaConf.create(dict(cfg.optimizer)))
    params = inspect.signature(get_class(spec["_target_"])).parameters
    if any(p.kind == inspect.Parameter.VAR_KEYWORD for p in params.values()):
        return spec
    inherited = OptimConfig().optimizer
    return {k: v for k, v in spec.items() if k == "_target_" or k in params or k not in inherited or inherited[k] != v}


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


# ---------------------------------------------------------------------------------------------------------------
# What some optimizers need beyond torch's contract (conf/optim/prodigy.yaml, adafactor.yaml, schedulefree.yaml).


@dataclass(frozen=True)
class OptimizerTraits:
    """An optimizer class's needs, as data: every consumer (config check, resume, loop, logging) reads this table."""

    running_keys: Tuple[str, ...] = ()
    """param_group entries the optimizer writes itself while it trains (Prodigy's step size d, schedule-free's step
    count and train/eval flag): state restored from a checkpoint, never overwritten by the configured settings."""
    logged_keys: Tuple[str, ...] = ()
    """param_group entries worth a metric, logged as train/opt/<key> (first group)."""
    one_lr: bool = False
    """Every group must have the same lr (or 0): the optimizer raises otherwise, so lr_mult may only be 1 or 0."""
    own_schedule: bool = False
    """The optimizer warms up and averages by itself: the LambdaLR must stay constant with no warmup."""
    required: Tuple[Tuple[str, Any, str], ...] = ()
    """(optimizer kwarg, value it must have, why): kwargs whose constructor default does not fit our lr handling
    (an absent kwarg counts as wrong)."""
    deepspeed: bool = True
    """Works under hardware.distributed=deepspeed, whose ZeRO optimizer steps flat partitions of the weights."""


_SCHEDULE_FREE = OptimizerTraits(
    running_keys=("k", "train_mode", "weight_sum", "lr_max", "scheduled_lr"), logged_keys=("scheduled_lr",),
    own_schedule=True, deepspeed=False)

# by class name (the last part of optim.optimizer._target_); classes not listed need nothing special
OPTIMIZER_TRAITS: Dict[str, OptimizerTraits] = {
    "Prodigy": OptimizerTraits(running_keys=("d", "d_max", "d_numerator", "d_denom", "d_hat", "k"),
                               logged_keys=("d",), one_lr=True, deepspeed=False),
    "Adafactor": OptimizerTraits(required=(
        ("relative_step", False, "its default (true) computes its own lr and refuses the one this trainer passes "
                                 "(optim.lr, scheduled by optim.schedule)"),)),
    "AdamWScheduleFree": _SCHEDULE_FREE,
    "RAdamScheduleFree": _SCHEDULE_FREE,
    "SGDScheduleFree": _SCHEDULE_FREE,
}


def base_optimizer(optimizer: Any) -> Any:
    """The optimizer inside Accelerate's AcceleratedOptimizer (and DeepSpeed's wrapper): follows `.optimizer`."""
    while hasattr(getattr(optimizer, "optimizer", None), "param_groups"):
        optimizer = optimizer.optimizer
    return optimizer


def traits(optimizer: Any) -> OptimizerTraits:
    """OPTIMIZER_TRAITS of a class path (`optim.optimizer._target_`) or an optimizer object (wrapped or not)."""
    name = optimizer.rsplit(".", 1)[-1] if isinstance(optimizer, str) else type(base_optimizer(optimizer)).__name__
    return OPTIMIZER_TRAITS.get(name, OptimizerTraits())


def optimizer_problems(cfg: OptimConfig, distributed: Optional[str] = None) -> List[str]:
    """Config problems of `cfg.optimizer` with this trainer (its lr schedule, parameter groups, hardware.distributed
    = `distributed`), each with its fix, for the checks before a run (acestep_ft/checks.py)."""
    t, target = traits(cfg.target), cfg.target
    opts = dict(cfg.optimizer)
    problems = []
    if t.own_schedule and (cfg.schedule != Schedule.constant or cfg.warmup_steps > 0):
        problems.append(
            f"{target} schedules itself (warmup: optim.optimizer.warmup_steps; no decay, it averages the weights "
            f"instead): set optim.schedule=constant optim.warmup_steps=0 (now optim.schedule={cfg.schedule}, "
            f"optim.warmup_steps={cfg.warmup_steps}), as optim=schedulefree does.")
    if t.one_lr:
        mults = sorted({g.lr_mult for g in cfg.param_groups} - {0.0, 1.0})
        if mults:
            problems.append(f"{target} takes one learning rate for all parameter groups (its step size d is shared): "
                            f"optim.param_groups lr_mult {mults} cannot apply; use lr_mult 1 (or 0 to freeze a "
                            "group), or another optimizer.")
    for key, value, why in t.required:
        if opts.get(key) != value:
            problems.append(f"{target} needs optim.optimizer.{key}={str(value).lower()} (now "
                            f"{opts.get(key, '<its default>')}): {why}.")
    if not t.deepspeed and distributed == "deepspeed":
        problems.append(f"{target} is not supported with hardware.distributed=deepspeed (ZeRO steps flat weight "
                        "partitions, per process): use hardware.distributed=ddp or fsdp.")
    return problems


def group_settings(optimizer: Any) -> List[Dict[str, Any]]:
    """The configured settings of each param group (no params, no running state): what a resume puts back over the
    restored groups (train/checkpoint.py apply_optimizer_settings), so Prodigy keeps its d and schedule-free its
    step count and train/eval flag."""
    skip = {"params", *traits(optimizer).running_keys}
    return [{k: v for k, v in g.items() if k not in skip} for g in optimizer.param_groups]


def optimizer_metrics(optimizer: Any) -> Dict[str, float]:
    """train/opt/<key> of the first group for the optimizer's logged_keys (Prodigy's d: its step size is d x lr)."""
    group = optimizer.param_groups[0]
    return {f"train/opt/{k}": float(group[k]) for k in traits(optimizer).logged_keys if k in group}


def _has_modes(optimizer: Any) -> bool:
    return callable(getattr(optimizer, "train", None)) and callable(getattr(optimizer, "eval", None))


def training_mode(optimizer: Any) -> None:
    """Put an optimizer with train/eval modes (schedule-free) in train mode: the weights are the point y where
    gradients are taken. A no-op for other optimizers, and for a resumed one (checkpoints are saved in train mode)."""
    base = base_optimizer(optimizer)
    if _has_modes(base):
        base.train()


@contextmanager
def evaluation_mode(optimizer: Any) -> Iterator[None]:
    """Within: the weights are the optimizer's evaluation weights (schedule-free: the average x, not the training
    point y); validation, samples and the export run inside, checkpoints outside (train mode: y and z resume
    exactly). A no-op for optimizers without train/eval. Accelerate's wrapper is looked through (base_optimizer).
    Leaving calls train(), which recomputes y from x and z: the same on an uninterrupted and a resumed run, though
    not bit-identical to the y before. Outermost when combined with EMA weights (ema.applied() inside)."""
    base = base_optimizer(optimizer)
    switch = _has_modes(base) and all(g.get("train_mode", True) for g in base.param_groups)
    if switch:
        base.eval()
    try:
        yield
    finally:
        if switch:
            base.train()
