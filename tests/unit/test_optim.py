"""Weight-decay grouping and the warmup + cosine/constant schedule."""

import math
from pathlib import Path

import pytest
import torch
from torch import nn

from acestep_ft.config import FullMode, OptimConfig, ParamGroupConfig
from acestep_ft.model import load_model
from acestep_ft.train.optim import build_optimizer, build_scheduler, group_table, lr_factor, param_groups
from acestep_ft.train.trainable import make_trainable
from conftest import model_config


class Tiny(nn.Module):
    def __init__(self):
        super().__init__()
        self.proj = nn.Linear(4, 4)
        self.norm = nn.LayerNorm(4)
        self.scale_shift_table = nn.Parameter(torch.zeros(1, 6, 4))
        self.frozen = nn.Linear(4, 4)
        self.frozen.requires_grad_(False)


def test_groups_split_decay_and_skip_frozen():
    m = Tiny()
    groups = {g["name"]: g for g in param_groups(m, OptimConfig(weight_decay=0.1))}
    assert {id(p) for p in groups["default"]["params"]} == {id(m.proj.weight)}
    assert groups["default"]["weight_decay"] == 0.1 and groups["default/no_decay"]["weight_decay"] == 0.0
    n_trainable = sum(1 for p in m.parameters() if p.requires_grad)
    assert sum(len(g["params"]) for g in groups.values()) == n_trainable  # each exactly once


def test_named_groups_get_their_multiplier_and_every_parameter_exactly_one_group():
    torch.manual_seed(0)
    model = load_model(model_config())
    make_trainable(model, FullMode())
    cfg = OptimConfig(lr=1e-3, weight_decay=0.05, param_groups=[
        ParamGroupConfig(name="attention", pattern=r"(self|cross)_attn\.", lr_mult=0.5),
        ParamGroupConfig(name="mlp", pattern=r"\.mlp\.", lr_mult=2.0, weight_decay=0.0),
        ParamGroupConfig(name="also_attention", pattern=r"q_proj", lr_mult=9.0),  # shadowed: first match wins
    ])
    groups = param_groups(model.decoder, cfg)
    seen = [id(p) for g in groups for p in g["params"]]
    trainable = [id(p) for p in model.decoder.parameters() if p.requires_grad]
    assert sorted(seen) == sorted(trainable) and len(seen) == len(set(seen))
    by_name = {g["name"]: g for g in groups}
    assert by_name["attention"]["lr"] == pytest.approx(5e-4) and by_name["attention"]["weight_decay"] == 0.05
    assert by_name["attention/no_decay"]["weight_decay"] == 0.0  # q_norm / k_norm
    assert by_name["mlp"]["lr"] == pytest.approx(2e-3) and by_name["mlp"]["weight_decay"] == 0.0
    assert "also_attention" not in by_name and by_name["default"]["lr"] == pytest.approx(1e-3)
    table = group_table(groups)
    assert table.splitlines()[0].split() == ["group", "pattern", "tensors", "params", "lr", "wd"]
    assert any(line.startswith("attention ") and "0.0005" in line for line in table.splitlines())
    # the scheduler scales every group's own lr
    opt = build_optimizer(model.decoder, cfg)
    sched = build_scheduler(opt, 10, cfg)
    opt.step()
    sched.step()
    lrs = {g["name"]: g["lr"] for g in opt.param_groups}
    assert lrs["mlp"] == pytest.approx(4 * lrs["attention"])


def test_no_trainable_parameters_is_a_clear_error():
    m = Tiny().requires_grad_(False)
    with pytest.raises(ValueError, match="no trainable parameters"):
        param_groups(m, OptimConfig())


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


def test_adamw8bit_from_its_preset_keeps_8_bit_states_and_trains():
    from omegaconf import OmegaConf

    yaml = OmegaConf.load(Path(__file__).resolve().parents[2] / "conf" / "optim" / "adamw8bit.yaml")
    yaml.pop("defaults")
    cfg = OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(OptimConfig), yaml, {"lr": 1e-2}))
    weight = torch.nn.Parameter(torch.randn(128, 64))
    module = torch.nn.Module()
    module.weight = weight
    opt = build_optimizer(module, cfg)
    assert type(opt).__name__ == "AdamW8bit"
    start = (weight.detach() ** 2).sum()
    for _ in range(5):
        opt.zero_grad()
        (weight ** 2).sum().backward()
        opt.step()
    assert opt.state[weight]["state1"].dtype == torch.uint8
    assert (weight.detach() ** 2).sum() < start
