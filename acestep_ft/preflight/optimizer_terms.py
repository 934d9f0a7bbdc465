"""The optimizer's share of the estimate: its state bytes per trainable parameter and the temporaries of its step,
per optimizer (torch AdamW, bitsandbytes AdamW8bit, Adafactor, Prodigy, schedule-free, SGD), for one unsharded
device (estimate.py applies ZeRO / FSDP sharding and offload)."""

from __future__ import annotations

import math
import re
from typing import Dict, List, Tuple

import torch

from acestep_ft.config import Config
from acestep_ft.preflight.trainset import TrainSet
from acestep_ft.train.optim import takes_weight_decay

BNB_MIN_8BIT = 4096  # bitsandbytes keeps tensors smaller than min_8bit_size in fp32
BNB_BLOCK = 256  # bitsandbytes blockwise quantization: one fp32 absmax per block, per state

def _optimizer_kind(cfg: Config) -> str:
    target = cfg.optim.target
    name = target.rsplit(".", 1)[-1].lower()
    if "8bit" in name and "adam" in name:
        return "adamw8bit"
    if name in ("adamw", "adam"):
        return "adamw"
    if name == "adafactor":
        return "adafactor"
    if name == "prodigy":
        return "prodigy"
    if name.endswith("schedulefree"):  # AdamWScheduleFree, RAdamScheduleFree, SGDScheduleFree
        return "sgd_schedulefree" if name.startswith("sgd") else "schedulefree"
    if name == "sgd":
        return "sgd"
    return "unknown:" + target


def _group_sizes(cfg: Config, ts: TrainSet) -> List[int]:
    """numel of each torch parameter group (same rule as train/optim.py param_groups)."""
    compiled = [re.compile(g.pattern) for g in cfg.optim.param_groups]
    sizes: Dict[tuple, int] = {}
    for name, shape in ts.tensors:
        rel = name
        index = next((i for i, rx in enumerate(compiled) if rx.search(rel)), len(compiled))
        decays = cfg.optim.decay_all or takes_weight_decay(name, torch.empty(shape, device="meta"))
        sizes[(index, decays)] = sizes.get((index, decays), 0) + math.prod(shape)
    return list(sizes.values())


def optimizer_terms(cfg: Config, ts: TrainSet) -> Tuple[int, str, int, str]:
    """(state bytes, detail, step temporaries bytes, detail) for one unsharded device."""
    kind = _optimizer_kind(cfg)
    opts = {k: v for k, v in dict(cfg.optim.optimizer).items() if k != "_target_"}
    n = ts.trainable
    if kind == "adamw":
        temp = 4 * max(_group_sizes(cfg, ts) or [0])
        fused = bool(opts.get("fused"))
        if opts.get("foreach") is False or fused:
            temp = 4 * max((math.prod(s) for _, s in ts.tensors), default=0)
            temp = 0 if fused else temp
        return (8 * n, f"AdamW: 2 x fp32 per trainable param, {n:.3g} params",
                temp, "foreach AdamW: one fp32 sqrt(v) buffer per parameter group (the largest)")
    if kind == "adamw8bit":
        min_size = int(opts.get("min_8bit_size", BNB_MIN_8BIT))
        big = [math.prod(s) for _, s in ts.tensors if math.prod(s) >= min_size]
        small = n - sum(big)
        absmax = sum(2 * 4 * math.ceil(k / BNB_BLOCK) for k in big)
        return (2 * sum(big) + absmax + 8 * small,
                f"AdamW8bit: 2 x uint8 + fp32 absmax per {BNB_BLOCK} for {sum(big):.3g} params in tensors >= "
                f"{min_size}, 2 x fp32 for {small:.3g}", 0, "bitsandbytes updates each tensor in place")
    if kind == "adafactor":  # transformers.optimization.Adafactor; a tensor of 2+ dims is factored
        beta1 = opts.get("beta1") is not None
        state = 0
        for _, s in ts.tensors:
            k = math.prod(s)
            second = 4 * (math.prod(s[:-1]) + math.prod(s[:-2]) * s[-1]) if len(s) >= 2 else 4 * k
            state += second + (4 * k if beta1 else 0) + 4  # + the RMS of the tensor, a 0-dim fp32 tensor
        big = max((math.prod(s) for _, s in ts.tensors), default=0)
        return (state, "Adafactor: fp32 row + column factors per matrix, full fp32 second moment per vector"
                + (", fp32 first moment" if beta1 else ""), 8 * big,
                "two fp32 buffers the size of the largest tensor (squared gradient, factored update)")
    if kind == "prodigy":  # prodigyopt.Prodigy: exp_avg (beta1 > 0), exp_avg_sq, s and p0 (every slice_p-th value)
        slice_p = int(opts.get("slice_p", 1))
        moments = 2 if float(list(opts.get("betas", (0.9, 0.999)))[0]) > 0 else 1
        state = sum(4 * moments * math.prod(s) + 2 * 4 * math.ceil(math.prod(s) / slice_p) for _, s in ts.tensors)
        big = max((math.prod(s) for _, s in ts.tensors), default=0)
        return (state, f"Prodigy: {moments} fp32 moment(s) + fp32 s and p0 (every {slice_p}. value) per param, "
                f"{n:.3g} params (p0 of a tensor that starts at zero, LoRA B, is one value: at most this)",
                4 * big, "one fp32 buffer the size of the largest tensor (sqrt(v), p0 - p)")
    if kind == "sgd_schedulefree":  # schedulefree.SGDScheduleFree: z; it updates in place
        return 4 * n, f"schedule-free SGD: fp32 z per trainable param, {n:.3g} params", 0, "none (in place)"
    if kind == "schedulefree":  # schedulefree.AdamWScheduleFree / RAdamScheduleFree: z and exp_avg_sq
        if opts.get("foreach", True) is False:
            temp, where = 4 * max((math.prod(s) for _, s in ts.tensors), default=0), "the largest tensor"
        else:
            temp, where = 4 * max(_group_sizes(cfg, ts) or [0]), "the largest parameter group (foreach)"
        return (8 * n, f"schedule-free AdamW: 2 x fp32 per trainable param (z, exp_avg_sq), {n:.3g} params",
                temp, f"one fp32 sqrt(v) buffer the size of {where}")
    if kind == "sgd":
        momentum = float(opts.get("momentum", 0) or 0) > 0
        return (4 * n if momentum else 0, "SGD: fp32 momentum buffer" if momentum else "SGD without momentum: none",
                0, "none")
    return (8 * n, f"unknown optimizer {kind[8:]!r}: assumed 2 x fp32 per trainable param (conservative)",
            4 * max(_group_sizes(cfg, ts) or [0]), "assumed one fp32 buffer per parameter group")
