"""Weight-decay grouping (by module type; decay_all) and the warmup + cosine/constant schedule."""

import math
from pathlib import Path
from typing import Dict, List

import pytest
import torch
from peft import LoraConfig, get_peft_model
from torch import nn

from acestep_ft.config import FullMode, LoraMode, OptimConfig, ParamGroupConfig
from acestep_ft.model import load_model
from acestep_ft.model.layers import RMSNorm
from acestep_ft.model.variants import build_meta_model
from acestep_ft.train.optim import (build_optimizer, build_scheduler, decaying_parameters, group_table, lr_factor,
                                    param_groups, takes_weight_decay)
from acestep_ft.train.trainable import make_trainable
from conftest import model_config

KEYS_2B = Path(__file__).resolve().parents[1] / "assets" / "acestep15_2b_keys.txt"
LINEAR_OR_CONV = (nn.Linear, nn.Conv1d, nn.ConvTranspose1d)  # the weight layers the ACE-Step decoder is built from


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


def meta_2b(mode) -> nn.Module:
    """The real-size 2B (turbo) model on the meta device, made trainable by `mode`: real names and shapes, no memory."""
    return make_trainable(build_meta_model(model_config("acestep15_turbo")), mode)


def decay_of(module: nn.Module, groups: List[Dict]) -> Dict[str, float]:
    """Parameter name -> weight decay of the group it landed in."""
    names = {id(p): n for n, p in module.named_parameters()}
    return {names[id(p)]: g["weight_decay"] for g in groups for p in g["params"]}


def test_2b_decoder_decays_exactly_the_linear_and_conv_weights():
    decoder = meta_2b(FullMode())
    decay = decay_of(decoder, param_groups(decoder, OptimConfig(weight_decay=0.1)))
    official = {k.split("\t")[0].removeprefix("decoder.") for k in KEYS_2B.read_text().splitlines()
                if k.startswith("decoder.")}
    assert set(decay) == official  # the official names, each trainable tensor placed once
    # plain Linears whose names contain "embed" (tens of millions of parameters), projections and the patch convs
    for name in ("time_embed.linear_1.weight", "time_embed.linear_2.weight", "time_embed.time_proj.weight",
                 "time_embed_r.linear_1.weight", "time_embed_r.time_proj.weight", "condition_embedder.weight",
                 "layers.0.self_attn.q_proj.weight", "layers.0.cross_attn.o_proj.weight",
                 "layers.23.mlp.down_proj.weight", "proj_in.1.weight", "proj_out.1.weight"):
        assert decay[name] == 0.1, name
    biases = {n for n in official if n.endswith(".bias")}
    norms = {f"{n}.weight" for n, m in decoder.named_modules() if isinstance(m, RMSNorm)}
    tables = {n for n in official if n.endswith("scale_shift_table")}
    assert {"norm_out.weight", "layers.0.self_attn.q_norm.weight", "scale_shift_table"} <= norms | tables
    assert {n for n, wd in decay.items() if wd == 0.0} == biases | norms | tables
    decayed = sum(p.numel() for n, p in decoder.named_parameters() if decay[n] > 0)
    assert decayed == sum(m.weight.numel() for m in decoder.modules() if isinstance(m, LINEAR_OR_CONV))
    # the preflight estimate only has names and shapes; its rule must agree with the module rule here
    assert {n for n, p in decoder.named_parameters() if takes_weight_decay(n, p)} == decaying_parameters(decoder)


def test_free_standing_parameters_do_not_decay():
    model = build_meta_model(model_config("acestep15_turbo")).requires_grad_(True)
    decay = decay_of(model, param_groups(model, OptimConfig(weight_decay=0.1)))
    free = [n for n in decay if "null_condition_emb" in n or "special_token" in n or "scale_shift_table" in n]
    assert "null_condition_emb" in free and any("special_token" in n for n in free)
    assert all(decay[n] == 0.0 for n in free)
    decayed = sum(p.numel() for n, p in model.named_parameters() if decay[n] > 0)
    assert decayed == sum(m.weight.numel() for m in model.modules() if isinstance(m, LINEAR_OR_CONV))


class Mixed(nn.Module):
    """One parameter owner of each kind, with names that would fool a rule by name."""

    def __init__(self):
        super().__init__()
        self.time_embed = nn.Linear(4, 4)  # a Linear, "embed" in its name
        self.conv = nn.Conv1d(4, 4, 2)
        self.unpatch = nn.ConvTranspose2d(4, 4, 2)
        self.tokens = nn.Embedding(8, 4)  # a table: 2-D, but no decay
        self.rms = RMSNorm(4)
        self.ln = nn.LayerNorm(4)
        self.table = nn.Parameter(torch.zeros(1, 6, 4))


def test_rule_is_the_owning_module_type():
    assert decaying_parameters(Mixed()) == {"time_embed.weight", "conv.weight", "unpatch.weight"}


def test_lora_matrices_decay():
    decoder = meta_2b(LoraMode(target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "down_proj"]))
    decay = decay_of(decoder, param_groups(decoder, OptimConfig(weight_decay=0.1)))
    trainable = [n for n, p in decoder.named_parameters() if p.requires_grad]
    assert sorted(decay) == sorted(trainable) and len(trainable) == 24 * 2 * (4 + 4 + 2)
    assert all((".lora_A." in n or ".lora_B." in n) and decay[n] == 0.1 for n in trainable)
    assert {n for n in trainable if takes_weight_decay(n, decoder.get_parameter(n))} == set(trainable)


def test_peft_embedding_and_conv_adapters():
    model = get_peft_model(Mixed(), LoraConfig(r=2, target_modules=["time_embed", "conv", "tokens"]))
    decay = decay_of(model, param_groups(model, OptimConfig(weight_decay=0.1)))
    # lora_embedding_A/B are ParameterDict entries, not Linear weights: they stay undecayed like the table itself
    assert {n for n, wd in decay.items() if wd > 0} == {
        f"base_model.model.{m}.lora_{ab}.default.weight" for m in ("time_embed", "conv") for ab in "AB"}
    assert {n for n in decay if "lora_embedding" in n} == {
        "base_model.model.tokens.lora_embedding_A.default", "base_model.model.tokens.lora_embedding_B.default"}


def test_decay_all_decays_every_trainable_tensor_with_its_groups_decay():
    decoder = meta_2b(FullMode())
    cfg = OptimConfig(weight_decay=0.1, decay_all=True, param_groups=[
        ParamGroupConfig(name="attention", pattern=r"(self|cross)_attn\.", weight_decay=0.02)])
    groups = param_groups(decoder, cfg)
    assert sorted(g["name"] for g in groups) == ["attention", "default"]
    decay = decay_of(decoder, groups)
    trainable = [n for n, p in decoder.named_parameters() if p.requires_grad]
    assert sorted(decay) == sorted(trainable)
    for name in trainable:
        assert decay[name] == (0.02 if "_attn." in name else 0.1), name
    assert decay["layers.0.self_attn.q_norm.weight"] == 0.02 and decay["scale_shift_table"] == 0.1


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
    yaml.pop("defaults", None)
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
