"""The optimizer presets optim=prodigy / adafactor / schedulefree: composed settings, config problems, state bytes
against the preflight estimate, learning on the tiny model, exact resume (run.py's order: build -> load -> put the
configured settings back) and schedule-free's evaluation weights. The train.py runs are in test_optim_presets_e2e.py."""

import io

import pytest
import torch
from accelerate import Accelerator
from accelerate.optimizer import AcceleratedOptimizer
from hydra.errors import InstantiationException
from omegaconf import OmegaConf
from torch import nn

from acestep_ft.config import Config, FullMode, ObjectiveConfig, OptimConfig, ParamGroupConfig
from acestep_ft.model import load_model
from acestep_ft.preflight.estimate import optimizer_terms, train_set
from acestep_ft.train.checkpoint import apply_optimizer_settings
from acestep_ft.train.optim import (build_optimizer, build_scheduler, constructor_spec, evaluation_mode,
                                    group_settings, optimizer_metrics, optimizer_problems, training_mode)
from acestep_ft.train.step import flow_matching_loss
from acestep_ft.train.trainable import make_trainable
from test_configs import CONF, compose_config
from test_step import TINY, fixture_batch

PRESETS = ["prodigy", "adafactor", "schedulefree"]


def preset_optim(name: str) -> OptimConfig:
    """conf/optim/<name>.yaml over the OptimConfig schema, as the group composes it (the embedded default's own optim
    values left out: test_presets_compose_with_their_own_lr_and_schedule checks those do not override a preset)."""
    yaml = OmegaConf.load(CONF / "optim" / f"{name}.yaml")
    yaml.pop("defaults", None)
    return OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(OptimConfig), yaml))


def preset(name: str, *overrides: str) -> Config:
    """The composed config with optim=<name>, its optim section exactly the preset's."""
    cfg = OmegaConf.to_object(compose_config([f"optim={name}", "hardware=cpu", *overrides]))
    cfg.optim = preset_optim(name)
    return cfg


def test_presets_compose_with_their_own_lr_and_schedule():
    """What each preset sets survives composition with the embedded default (whose optim.lr is for AdamW)."""
    prodigy, adafactor, schedulefree = (OmegaConf.to_object(compose_config([f"optim={n}"])).optim for n in PRESETS)
    assert prodigy.target == "prodigyopt.Prodigy" and prodigy.lr == 1.0
    assert adafactor.target == "transformers.optimization.Adafactor" and adafactor.lr == 1e-4
    assert adafactor.optimizer["relative_step"] is False and adafactor.optimizer["scale_parameter"] is False
    assert schedulefree.target == "schedulefree.AdamWScheduleFree" and schedulefree.lr == 5e-4
    assert schedulefree.schedule == "constant" and schedulefree.warmup_steps == 0
    for cfg in (prodigy, adafactor, schedulefree):
        assert optimizer_problems(cfg) == [], cfg.target


def test_problems_name_each_conflict_and_its_fix():
    sf = preset_optim("schedulefree")
    sf.schedule, sf.warmup_steps = "cosine", 5
    [msg] = optimizer_problems(sf)
    assert "optim.schedule=constant optim.warmup_steps=0" in msg and "optimizer.warmup_steps" in msg
    assert "deepspeed" in optimizer_problems(preset_optim("schedulefree"), "deepspeed")[0]
    pr = preset_optim("prodigy")
    pr.param_groups = [ParamGroupConfig(name="embed", pattern="proj_in", lr_mult=0.1),
                       ParamGroupConfig(name="frozen", pattern="proj_out", lr_mult=0.0)]
    [msg] = optimizer_problems(pr)
    assert "[0.1]" in msg and "lr_mult 1" in msg
    af = OptimConfig(optimizer={"_target_": "transformers.optimization.Adafactor"})
    [msg] = optimizer_problems(af)
    assert "optim.optimizer.relative_step=false" in msg
    assert optimizer_problems(OptimConfig(), "deepspeed") == []  # AdamW: nothing to say


def test_inherited_adamw_kwargs_are_dropped_but_a_chosen_one_is_kept():
    """An optim YAML cannot delete the schema default's betas: Adafactor (no betas) gets it dropped, unless set."""
    cfg = preset_optim("adafactor")
    assert "betas" in cfg.optimizer and "betas" not in constructor_spec(cfg)
    assert constructor_spec(preset_optim("prodigy"))["betas"] == [0.9, 0.99]
    cfg.optimizer["betas"] = [0.5, 0.5]  # set on purpose: the constructor must refuse it, not this code
    assert constructor_spec(cfg)["betas"] == [0.5, 0.5]
    with pytest.raises(InstantiationException, match="unexpected keyword argument 'betas'"):
        build_optimizer(nn.Linear(2, 2), cfg)


def measured_state_bytes(opt: torch.optim.Optimizer) -> int:
    return sum(v.numel() * v.element_size() for s in opt.state.values() for v in s.values() if torch.is_tensor(v))


@pytest.mark.parametrize("name", PRESETS)
@pytest.mark.parametrize("mode", ["full", "lora"])
def test_state_bytes_match_the_estimate(name, mode):
    """optimizer_terms against the tensors the optimizer really holds after one step on the tiny decoder."""
    cfg = preset(name, f"mode={mode}")
    torch.manual_seed(0)
    decoder = make_trainable(load_model(cfg.model), cfg.mode)
    trained = [p for p in decoder.parameters() if p.requires_grad]
    zeros = [p.numel() for p in trained if not p.any()]  # LoRA B, biases: Prodigy keeps one p0 value for them
    opt = build_optimizer(decoder, cfg.optim)
    training_mode(opt)
    for p in trained:
        p.grad = torch.randn_like(p)
    opt.step()
    measured, estimate = measured_state_bytes(opt), optimizer_terms(cfg, train_set(cfg))[0]
    n = sum(p.numel() for p in trained)
    print(f"{name} {mode}: {n} params, estimate {estimate / n:.3f} B/param, measured {measured / n:.3f} B/param")
    if name == "prodigy":
        assert estimate - measured == 4 * (sum(zeros) - len(zeros))  # the estimate counts them in full
    else:
        assert measured == estimate


@pytest.mark.parametrize("name", PRESETS)
def test_each_preset_lowers_the_loss_on_the_tiny_model(name):
    """One fixed batch, the preset's own settings (lr, schedule), full fine-tuning: the loss falls at every step."""
    cfg = preset(name, "mode=full")
    if name != "schedulefree":  # a warmup to fit a 12-step run (schedule-free warms up by itself)
        cfg.optim.warmup_steps = 2
    torch.manual_seed(0)
    model = load_model(cfg.model)
    decoder = make_trainable(model, FullMode())
    opt = build_optimizer(decoder, cfg.optim)
    sched = build_scheduler(opt, 12, cfg.optim)
    training_mode(opt)
    batch = fixture_batch(torch.load(TINY / "ref_outputs.pt", weights_only=True))
    losses = []
    for _ in range(12):
        loss = flow_matching_loss(decoder, model.null_condition_emb, batch, ObjectiveConfig(cfg_ratio=0.0), -0.4,
                                  1.0, torch.Generator().manual_seed(1))  # the same noise every step: a fixed target
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
        losses.append(loss.item())
    assert all(b < a for a, b in zip(losses, losses[1:])), losses
    if name == "prodigy":
        assert optimizer_metrics(opt)["train/opt/d"] > 1e-6  # it raised its step size estimate above d0


class Small(nn.Module):
    """Decaying weights, a bias and a norm: two parameter groups, as in a real run."""

    def __init__(self):
        super().__init__()
        self.a, self.norm, self.b = nn.Linear(8, 16), nn.LayerNorm(16), nn.Linear(16, 4)

    def forward(self, x):
        return self.b(torch.tanh(self.norm(self.a(x))))


def small_run(cfg: OptimConfig, steps: int, stop: int, resume_cfg: OptimConfig = None):
    """Losses of `steps` optimizer steps; with `stop`, the run saves after `stop` steps and a fresh model, optimizer
    and scheduler (built from `resume_cfg`, default `cfg`) continue from that save as run.py does. A validation in
    evaluation_mode every 2 steps, as the loop does. Returns (losses, the apply_optimizer_settings changes, opt)."""
    data = torch.randn(64, 8, generator=torch.Generator().manual_seed(0))
    target = torch.tanh(data @ torch.randn(8, 4, generator=torch.Generator().manual_seed(1)))  # learnable

    def build(c):
        torch.manual_seed(0)
        model = Small()
        opt = build_optimizer(model, c)
        return model, opt, build_scheduler(opt, steps, c)

    model, opt, sched = build(cfg)
    training_mode(opt)
    losses, changes = [], []
    for step in range(steps + 1):
        if step == stop:
            saved = io.BytesIO()
            torch.save({"model": model.state_dict(), "opt": opt.state_dict(), "sched": sched.state_dict()}, saved)
            saved.seek(0)
            state = torch.load(saved, weights_only=False)
            model, opt, sched = build(resume_cfg or cfg)
            fresh = group_settings(opt)
            model.load_state_dict(state["model"])
            sched.load_state_dict(state["sched"])
            opt.load_state_dict(state["opt"])
            changes = apply_optimizer_settings(opt, sched, fresh)
            training_mode(opt)
        if step == steps:
            break
        idx = torch.arange(step * 8, step * 8 + 8) % 64
        loss = nn.functional.mse_loss(model(data[idx]), target[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
        losses.append(loss.item())
        if step % 2 == 1:
            with evaluation_mode(opt), torch.no_grad():
                losses.append(nn.functional.mse_loss(model(data), target).item())
    return losses, changes, opt


@pytest.mark.parametrize("name", PRESETS + ["adamw"])
def test_a_resumed_run_reproduces_the_uninterrupted_one_exactly(name):
    cfg = preset_optim(name)
    cfg.warmup_steps = 0 if name == "schedulefree" else 3
    whole, _, _ = small_run(cfg, 10, stop=-1)
    parts, changes, _ = small_run(cfg, 10, stop=4)
    assert parts == whole and changes == []
    assert whole[-1] < whole[1]  # the validation loss (full data, in evaluation_mode) fell


@pytest.mark.parametrize("name", PRESETS)
def test_a_non_strict_resume_takes_the_new_lr_and_keeps_the_running_state(name):
    """train.resume_strict=false with another optim.lr: the new base lr applies from the restored step, while
    Prodigy's d and schedule-free's step count / train mode come from the checkpoint."""
    cfg = preset_optim(name)
    changed = preset_optim(name)
    changed.lr = cfg.lr * 2
    _, _, before = small_run(cfg, 4, stop=-1)
    _, changes, after = small_run(cfg, 4, stop=4, resume_cfg=changed)  # resumed after the last step: as saved
    assert any("base lr" in c for c in changes), changes
    assert all(g["initial_lr"] == changed.lr for g in after.param_groups)
    for key in ("d", "d_max", "k", "train_mode", "weight_sum", "lr_max"):
        assert [g.get(key) for g in after.param_groups] == [g.get(key) for g in before.param_groups], key


def schedulefree_with_state():
    cfg = preset_optim("schedulefree")
    torch.manual_seed(0)
    model = Small()
    opt = build_optimizer(model, cfg)
    training_mode(opt)
    for _ in range(3):
        model(torch.randn(4, 8)).square().mean().backward()
        opt.step()
        opt.zero_grad()
    return model, opt


@pytest.mark.parametrize("wrap", [False, True], ids=["plain", "accelerate"])
def test_evaluation_mode_swaps_in_the_averaged_weights_and_back(wrap):
    model, opt = schedulefree_with_state()
    beta1 = opt.param_groups[0]["betas"][0]
    y = {n: p.detach().clone() for n, p in model.named_parameters()}
    x = {n: torch.lerp(p, opt.state[p]["z"], 1 - 1 / beta1) for n, p in model.named_parameters()}
    handle = Accelerator(cpu=True).prepare(opt) if wrap else opt
    assert isinstance(handle, AcceleratedOptimizer) == wrap
    with evaluation_mode(handle):
        for n, p in model.named_parameters():
            torch.testing.assert_close(p, x[n])
        with evaluation_mode(handle):  # nested (EMA weights inside, say): stays in eval mode, no second switch
            assert not opt.param_groups[0]["train_mode"]
        assert not opt.param_groups[0]["train_mode"]
    assert opt.param_groups[0]["train_mode"]
    for n, p in model.named_parameters():
        torch.testing.assert_close(p, y[n])
    assert not torch.equal(x["a.weight"], y["a.weight"])


def test_evaluation_mode_is_a_no_op_for_other_optimizers():
    model = Small()
    opt = build_optimizer(model, OptimConfig())
    before = [p.detach().clone() for p in model.parameters()]
    with evaluation_mode(Accelerator(cpu=True).prepare(opt)):
        assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))
    training_mode(opt)
    assert optimizer_metrics(opt) == {}


def test_group_settings_leave_out_what_the_optimizer_writes_itself():
    model = Small()
    prodigy = build_optimizer(model, preset_optim("prodigy"))
    sf = build_optimizer(model, preset_optim("schedulefree"))
    assert {"d", "d_max", "d_numerator", "k"}.isdisjoint(group_settings(prodigy)[0])
    assert {"d0", "d_coef", "betas", "weight_decay", "lr"} <= set(group_settings(prodigy)[0])
    assert {"k", "train_mode", "weight_sum", "lr_max", "scheduled_lr"}.isdisjoint(group_settings(sf)[0])
    assert {"warmup_steps", "betas", "lr"} <= set(group_settings(sf)[0])
    assert "params" not in group_settings(prodigy)[0]
