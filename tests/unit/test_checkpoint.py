"""Checkpoints: atomic writes, retention, resume resolution, exact state round trip, refusal of other setups."""

from pathlib import Path

import pytest
import torch

from acestep_ft.config import FullMode, LoraMode, OptimConfig
from conftest import model_config
from acestep_ft.model import load_model
from acestep_ft.train.checkpoint import (
    TrainingState, capture_rng, list_checkpoints, load_checkpoint, mark_best, read_best, resolve_resume, restore_rng,
    save_checkpoint, signature,
)
from acestep_ft.train.optim import build_optimizer, build_scheduler
from acestep_ft.train.trainable import make_trainable, trainable_state_dict, write_trained



def tiny_setup(mode, seed=0):
    torch.manual_seed(seed)
    model = load_model(model_config())
    decoder = make_trainable(model, mode)
    cfg = OptimConfig(lr=1e-3, warmup_steps=2)
    opt = build_optimizer(decoder, cfg)
    sched = build_scheduler(opt, 10, cfg)
    return model, decoder, opt, sched


def take_steps(decoder, opt, sched, n=3):
    for _ in range(n):
        loss = sum((p.float() ** 2).sum() for p in decoder.parameters() if p.requires_grad)
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()


CONFIG = {"optim.lr": 1e-3, "model.variant": "tiny", "train.save_every": 5}


def write(run_dir, step, model, decoder, opt, sched, mode_name, keep_last=3, write_weights=None, keep_step=None,
          data_fingerprint=None):
    state = TrainingState(step=step, optimizer=opt.state_dict(), scheduler=sched.state_dict(),
                          sampler={"epoch": 0, "position": step}, rng=[capture_rng()], signature=signature(decoder),
                          mode=mode_name, config=CONFIG, data_fingerprint=data_fingerprint)
    write_weights = write_weights or (lambda d: write_trained(model, decoder, d, torch.float32))
    return save_checkpoint(run_dir, state, write_weights, "config: here\n", keep_last, keep_step)


@pytest.mark.parametrize("mode", [LoraMode(rank=4, alpha=4), FullMode()], ids=["lora", "full"])
def test_round_trip_restores_weights_optimizer_scheduler_exactly(tmp_path, mode):
    model, decoder, opt, sched = tiny_setup(mode)
    take_steps(decoder, opt, sched)
    path = write(tmp_path, 3, model, decoder, opt, sched, mode.name)
    assert (path / ("adapter" if mode.name == "lora" else "model")).is_dir()

    model2, decoder2, opt2, sched2 = tiny_setup(mode, seed=1)  # different init: must be overwritten
    state = load_checkpoint(path, decoder2, mode.name, CONFIG)
    opt2.load_state_dict(state.optimizer)
    sched2.load_state_dict(state.scheduler)
    for (k, a), (_, b) in zip(trainable_state_dict(decoder).items(), trainable_state_dict(decoder2).items()):
        assert torch.equal(a, b), k
    s1, s2 = opt.state_dict(), opt2.state_dict()
    assert s1["param_groups"] == s2["param_groups"]
    for i in s1["state"]:
        for name in ("exp_avg", "exp_avg_sq", "step"):
            assert torch.equal(s1["state"][i][name], s2["state"][i][name])
    assert sched.state_dict() == sched2.state_dict() and state.step == 3
    # and both continue identically
    take_steps(decoder, opt, sched, 2)
    take_steps(decoder2, opt2, sched2, 2)
    for (k, a), (_, b) in zip(trainable_state_dict(decoder).items(), trainable_state_dict(decoder2).items()):
        assert torch.equal(a, b), k


def test_rng_round_trip():
    state = capture_rng()
    a = torch.rand(3)
    restore_rng(state)
    assert torch.equal(torch.rand(3), a)


def test_crash_mid_write_keeps_the_previous_checkpoint(tmp_path):
    model, decoder, opt, sched = tiny_setup(FullMode())
    good = write(tmp_path, 1, model, decoder, opt, sched, "full")

    def crash(directory):
        Path(directory).mkdir(parents=True)
        (Path(directory) / "model.safetensors").write_bytes(b"half a file")
        raise KeyboardInterrupt("power cut")

    with pytest.raises(KeyboardInterrupt):
        write(tmp_path, 2, model, decoder, opt, sched, "full", write_weights=crash)
    assert list_checkpoints(tmp_path) == [good]
    assert [p.name for p in (tmp_path / "checkpoints").iterdir()] == [good.name]  # temp dir cleaned up
    assert resolve_resume("auto", tmp_path) == good


def test_leftover_temp_dir_is_never_resumed(tmp_path):
    model, decoder, opt, sched = tiny_setup(LoraMode(rank=2, alpha=2))
    good = write(tmp_path, 5, model, decoder, opt, sched, "lora")
    stale = tmp_path / "checkpoints" / ".tmp-step-00000009-abc"
    stale.mkdir()
    (stale / "training_state.pt").write_bytes(b"junk")
    incomplete = tmp_path / "checkpoints" / "step-00000010"  # no training_state.pt
    incomplete.mkdir()
    assert resolve_resume("auto", tmp_path) == good
    assert resolve_resume(str(tmp_path), tmp_path / "elsewhere") == good  # a run dir given as the path


def test_keep_last(tmp_path):
    model, decoder, opt, sched = tiny_setup(LoraMode(rank=2, alpha=2))
    for step in (1, 2, 3, 4):
        write(tmp_path, step, model, decoder, opt, sched, "lora", keep_last=2)
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step-00000003", "step-00000004"]


def test_keep_last_plus_the_best(tmp_path):
    model, decoder, opt, sched = tiny_setup(LoraMode(rank=2, alpha=2))
    for step in (1, 2, 3, 4, 5):
        write(tmp_path, step, model, decoder, opt, sched, "lora", keep_last=2, keep_step=2)
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step-00000002", "step-00000004", "step-00000005"]
    mark_best(tmp_path, 2, 0.5)
    assert read_best(tmp_path) == {"step": 2, "val_loss": 0.5, "path": "step-00000002"}


def test_changed_data_fingerprint_is_refused_unless_not_strict(tmp_path):
    model, decoder, opt, sched = tiny_setup(LoraMode(rank=4, alpha=4))
    path = write(tmp_path, 1, model, decoder, opt, sched, "lora", data_fingerprint="aaaa")
    with pytest.raises(ValueError, match="data fingerprint: checkpoint aaaa, dataset now bbbb"):
        load_checkpoint(path, decoder, "lora", CONFIG, data_fingerprint="bbbb")
    assert load_checkpoint(path, decoder, "lora", CONFIG, strict=False, data_fingerprint="bbbb").step == 1
    assert load_checkpoint(path, decoder, "lora", CONFIG, data_fingerprint="aaaa").step == 1


def test_resume_paths(tmp_path):
    assert resolve_resume(None, tmp_path) is None
    assert resolve_resume("auto", tmp_path) is None  # nothing yet: a fresh start
    with pytest.raises(FileNotFoundError, match="no training_state.pt"):
        resolve_resume(str(tmp_path / "nope"), tmp_path)


def test_resume_into_another_setup_is_refused(tmp_path):
    model, decoder, opt, sched = tiny_setup(LoraMode(rank=4, alpha=4))
    path = write(tmp_path, 1, model, decoder, opt, sched, "lora")
    _, other_rank, _, _ = tiny_setup(LoraMode(rank=8, alpha=8))
    with pytest.raises(ValueError, match="trained tensors differ"):
        load_checkpoint(path, other_rank, "lora", CONFIG)
    _, full, _, _ = tiny_setup(FullMode())
    with pytest.raises(ValueError, match="mode: checkpoint 'lora', config 'full'"):
        load_checkpoint(path, full, "full", CONFIG)


def test_strict_resume_refuses_a_changed_config_and_lists_what_differs(tmp_path):
    model, decoder, opt, sched = tiny_setup(LoraMode(rank=4, alpha=4))
    path = write(tmp_path, 1, model, decoder, opt, sched, "lora")
    changed = {**CONFIG, "optim.lr": 0.5, "dataset.num_samples": 9}
    with pytest.raises(ValueError, match=r"(?s)dataset.num_samples: checkpoint '<absent>', now 9.*"
                                         r"optim.lr: checkpoint 0.001, now 0.5.*resume_strict=false"):
        load_checkpoint(path, decoder, "lora", changed)
    # bookkeeping knobs may change; strict=false accepts the rest
    assert load_checkpoint(path, decoder, "lora", {**CONFIG, "train.save_every": 100}).step == 1
    assert load_checkpoint(path, decoder, "lora", changed, strict=False).step == 1
