"""Weight-decay grouping and the warmup + cosine/constant schedule."""

import math

import pytest
import torch
from torch import nn

from acestep_ft.config import OptimConfig
from acestep_ft.train.optim import build_optimizer, build_scheduler, lr_factor, param_groups


class Tiny(nn.Module):
    def __init__(self):
        super().__init__()
        self.proj = nn.Linear(4, 4)
        self.norm = nn.LayerNorm(4)
        self.scale_shift_table = nn.Parameter(torch.zeros(1, 6, 4))
        self.frozen = nn.Linear(4, 4)
        self.frozen.requires_grad_(False)


def test_groups_split_decay_and_skip_frozen():
    groups = {g["name"]: g for g in param_groups(Tiny(), 0.1)}
    m = Tiny()
    decay_ids = {id(p) for p in param_groups(m, 0.1)[0]["params"]}
    assert decay_ids == {id(m.proj.weight)}
    assert groups["decay"]["weight_decay"] == 0.1 and groups["no_decay"]["weight_decay"] == 0.0
    n_trainable = sum(1 for p in m.parameters() if p.requires_grad)
    assert sum(len(g["params"]) for g in param_groups(m, 0.1)) == n_trainable  # each exactly once


def test_no_trainable_parameters_is_a_clear_error():
    m = Tiny().requires_grad_(False)
    with pytest.raises(ValueError, match="no trainable parameters"):
        param_groups(m, 0.0)


def test_warmup_then_cosine_to_min():
    cfg = OptimConfig(lr=1.0, warmup_steps=4, schedule="cosine", min_lr_ratio=0.1)
    f = [lr_factor(s, 20, cfg) for s in range(20)]
    assert f[:4] == [0.25, 0.5, 0.75, 1.0]
    assert f[4] == pytest.approx(1.0)
    assert all(a >= b for a, b in zip(f[4:], f[5:]))  # monotone decay
    assert lr_factor(20, 20, cfg) == pytest.approx(0.1)
    assert lr_factor(12, 20, cfg) == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 0.5)))


def test_constant_schedule_and_optimizer_from_config():
    cfg = OptimConfig(lr=0.5, warmup_steps=2, schedule="constant")
    opt = build_optimizer(Tiny(), cfg)
    assert isinstance(opt, torch.optim.AdamW)
    sched = build_scheduler(opt, 10, cfg)
    seen = []
    for _ in range(5):
        seen.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert seen == [0.25, 0.5, 0.5, 0.5, 0.5]


def test_other_optimizer_through_target():
    cfg = OptimConfig(optimizer={"_target_": "torch.optim.SGD", "momentum": 0.9}, lr=0.1)
    opt = build_optimizer(Tiny(), cfg)
    assert isinstance(opt, torch.optim.SGD) and opt.defaults["momentum"] == 0.9
