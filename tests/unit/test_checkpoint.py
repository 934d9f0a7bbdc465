"""Checkpoints: atomic writes, retention, resume resolution, exact state round trip, refusal of other setups."""

from pathlib import Path

import pytest
import torch

from acestep_ft.config import FullMode, LoraMode, OptimConfig
from conftest import model_config
from acestep_ft.model import load_model
from acestep_ft.errors import UserError
from acestep_ft.train.checkpoint import (
    TrainingState, apply_optimizer_settings, capture_rng, check_resume, list_checkpoints, load_weights, mark_best,
    read_best, read_state, restore_rng, save_checkpoint, signature,
)
from acestep_ft.train.lifecycle import choose_checkpoint
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


def load_checkpoint(path, decoder, mode, config, strict=True, data_fingerprint=None):
    """What a resume does: the state, checked against the setup without weights, then the weights."""
    state = read_state(path)
    groups = [(g.get("name"), len(g["params"])) for g in state.optimizer["param_groups"]]
    check_resume(state, path, mode, config, strict, data_fingerprint, signature(decoder), groups)
    load_weights(path, decoder, mode)
    return state


def resolve_resume(resume, run_dir):
    return choose_checkpoint(resume, run_dir)[0]


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
    with pytest.raises(UserError, match="data fingerprint: checkpoint aaaa, dataset now bbbb"):
        load_checkpoint(path, decoder, "lora", CONFIG, data_fingerprint="bbbb")
    assert load_checkpoint(path, decoder, "lora", CONFIG, strict=False, data_fingerprint="bbbb").step == 1
    assert load_checkpoint(path, decoder, "lora", CONFIG, data_fingerprint="aaaa").step == 1


def test_resume_paths(tmp_path):
    assert resolve_resume(None, tmp_path) is None
    assert resolve_resume("auto", tmp_path) is None  # nothing yet: a fresh start
    with pytest.raises(UserError, match="nope does not exist"):
        resolve_resume(str(tmp_path / "nope"), tmp_path)
    with pytest.raises(UserError, match="no checkpoint there"):
        resolve_resume(str(tmp_path), tmp_path)  # a directory without checkpoints


def test_resume_into_another_setup_is_refused(tmp_path):
    model, decoder, opt, sched = tiny_setup(LoraMode(rank=4, alpha=4))
    path = write(tmp_path, 1, model, decoder, opt, sched, "lora")
    _, other_rank, _, _ = tiny_setup(LoraMode(rank=8, alpha=8))
    with pytest.raises(UserError, match="trained tensors differ"):
        load_checkpoint(path, other_rank, "lora", CONFIG)
    _, full, _, _ = tiny_setup(FullMode())
    with pytest.raises(UserError, match="mode: checkpoint 'lora', config 'full'"):
        load_checkpoint(path, full, "full", CONFIG)


def test_strict_resume_refuses_a_changed_config_and_lists_what_differs(tmp_path):
    model, decoder, opt, sched = tiny_setup(LoraMode(rank=4, alpha=4))
    path = write(tmp_path, 1, model, decoder, opt, sched, "lora")
    changed = {**CONFIG, "optim.lr": 0.5, "dataset.num_samples": 9}
    with pytest.raises(UserError, match=r"(?s)dataset.num_samples: checkpoint '<absent>', now 9.*"
                                         r"optim.lr: checkpoint 0.001, now 0.5.*resume_strict=false"):
        load_checkpoint(path, decoder, "lora", changed)
    # bookkeeping knobs may change; strict=false accepts the rest
    assert load_checkpoint(path, decoder, "lora", {**CONFIG, "train.save_every": 100}).step == 1
    assert load_checkpoint(path, decoder, "lora", changed, strict=False).step == 1


def test_settings_newer_than_the_checkpoint_count_as_unchanged_at_their_default():
    """A checkpoint written before a setting existed was trained with its default: resuming it after an upgrade
    must not be refused, but the setting at another value is a change."""
    from types import SimpleNamespace

    from acestep_ft.config import HardwareConfig, field_default
    from acestep_ft.train.checkpoint import config_changes

    cfg = SimpleNamespace(hardware=HardwareConfig(device="cpu", compile=True), model=model_config())
    saved = {"optim.lr": 0.001}
    current = {"optim.lr": 0.001, "hardware.compile": False, "model.frozen_dtype": "auto"}
    defaults = {k: field_default(cfg, k) for k in current}
    assert defaults["hardware.compile"] is False and defaults["model.frozen_dtype"] == "auto"
    assert config_changes(saved, current, defaults) == []
    assert config_changes(saved, current) == ["hardware.compile: checkpoint '<absent>', now False",
                                              "model.frozen_dtype: checkpoint '<absent>', now 'auto'"]
    changed = {**current, "hardware.compile": True}
    assert config_changes(saved, changed, defaults) == ["hardware.compile: checkpoint '<absent>', now True"]


# -- integrity: manifest, fallback, deletion, disk -------------------------------------------------------------
def flip_bits(path, offset_from_end=100, count=8):
    data = bytearray(path.read_bytes())
    for k in range(count):
        data[len(data) - offset_from_end + k] ^= 1 << (k % 8)
    path.write_bytes(bytes(data))


def lora_run(tmp_path, steps=(1, 2, 3), keep_last=0):
    model, decoder, opt, sched = tiny_setup(LoraMode(rank=2, alpha=2))
    return [write(tmp_path, s, model, decoder, opt, sched, "lora", keep_last=keep_last) for s in steps]


@pytest.mark.parametrize("damage", ["flip adapter bits", "truncate state", "flip header", "delete config"])
def test_a_damaged_newest_checkpoint_is_named_and_auto_falls_back(tmp_path, damage):
    first, second = lora_run(tmp_path, steps=(1, 2))
    adapter = second / "adapter" / "adapter_model.safetensors"
    match damage:
        case "flip adapter bits":  # 8 flipped bits in the tensor data: nothing but a checksum can see them
            flip_bits(adapter)
        case "truncate state":
            state = second / "training_state.pt"
            state.write_bytes(state.read_bytes()[: state.stat().st_size // 2])
        case "flip header":
            data = bytearray(adapter.read_bytes())
            data[10] ^= 0xFF
            adapter.write_bytes(bytes(data))
        case "delete config":
            (second / "config.yaml").unlink()
    with pytest.raises(UserError, match=rf"checkpoint {second} is damaged"):
        choose_checkpoint(str(second), tmp_path / "elsewhere")
    chosen, notes = choose_checkpoint("auto", tmp_path)
    assert chosen == first
    assert str(second) in notes[0] and "damaged" in notes[0] and str(first) in notes[-1]


def test_every_checkpoint_damaged_is_refused_and_a_legacy_one_is_unverified(tmp_path):
    (only,) = lora_run(tmp_path, steps=(1,))
    flip_bits(only / "training_state.pt")
    with pytest.raises(UserError, match="no intact checkpoint"):
        choose_checkpoint("auto", tmp_path)
    (legacy,) = lora_run(tmp_path / "old", steps=(1,))
    (legacy / "manifest.json").unlink()  # written before checkpoints carried a manifest
    chosen, notes = choose_checkpoint("auto", tmp_path / "old")
    assert chosen == legacy and "cannot be verified" in notes[0]


def test_a_damaged_state_file_is_a_clear_error_naming_the_path(tmp_path):
    (path,) = lora_run(tmp_path, steps=(1,))
    (path / "training_state.pt").write_bytes(b"PK\x03\x04 not a zip")
    with pytest.raises(UserError, match=rf"checkpoint {path} is damaged: training_state.pt cannot be read"):
        read_state(path)


def test_deletion_goes_through_a_hidden_trash_name(tmp_path, monkeypatch):
    import shutil as shutil_module

    lora_run(tmp_path, steps=(1, 2))
    seen = []
    real_rmtree = shutil_module.rmtree

    def killed_rmtree(path, *args, **kwargs):  # a kill mid-delete: the directory is half gone
        seen.append(Path(path).name)
        (Path(path) / "training_state.pt").unlink()

    monkeypatch.setattr(shutil_module, "rmtree", killed_rmtree)
    model, decoder, opt, sched = tiny_setup(LoraMode(rank=2, alpha=2))
    write(tmp_path, 3, model, decoder, opt, sched, "lora", keep_last=2)
    monkeypatch.setattr(shutil_module, "rmtree", real_rmtree)
    assert seen and seen[0].startswith(".trash-step-00000001")
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step-00000002", "step-00000003"]
    assert resolve_resume("auto", tmp_path).name == "step-00000003"


def test_best_json_is_written_before_the_old_best_is_deleted(tmp_path):
    model, decoder, opt, sched = tiny_setup(LoraMode(rank=2, alpha=2))
    state = lambda step: TrainingState(step=step, optimizer=opt.state_dict(), scheduler=sched.state_dict(),  # noqa
                                       sampler={}, rng=[capture_rng()], signature=signature(decoder), mode="lora",
                                       config=CONFIG)
    weights = lambda d: write_trained(model, decoder, d, torch.float32)  # noqa: E731
    save_checkpoint(tmp_path, state(1), weights, "", keep_last=1, keep_step=1, best=(1, 0.9))
    save_checkpoint(tmp_path, state(2), weights, "", keep_last=1, keep_step=1, best=(1, 0.9))
    assert read_best(tmp_path)["step"] == 1 and len(list_checkpoints(tmp_path)) == 2
    save_checkpoint(tmp_path, state(3), weights, "", keep_last=1, keep_step=3, best=(3, 0.5))
    assert read_best(tmp_path)["step"] == 3
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step-00000003"]
    for step in (4, 5):  # the best survives keep_last=1 even when the caller forgets it
        save_checkpoint(tmp_path, state(step), weights, "", keep_last=1)
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step-00000003", "step-00000005"]


def test_a_save_without_disk_space_is_refused_and_keeps_the_previous_one(tmp_path, monkeypatch):
    import shutil as shutil_module
    from collections import namedtuple

    (good,) = lora_run(tmp_path, steps=(1,))
    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil_module, "disk_usage", lambda path: usage(10**9, 10**9, 1000))
    model, decoder, opt, sched = tiny_setup(LoraMode(rank=2, alpha=2))
    with pytest.raises(UserError, match=rf"disk full: not enough space .* GiB are free; the previous checkpoint "
                                        rf"{good} is intact"):
        write(tmp_path, 2, model, decoder, opt, sched, "lora")
    assert list_checkpoints(tmp_path) == [good] and choose_checkpoint("auto", tmp_path)[0] == good


def test_non_strict_resume_applies_the_new_optimizer_settings(tmp_path):
    model, decoder, opt, sched = tiny_setup(LoraMode(rank=4, alpha=4))
    take_steps(decoder, opt, sched, 3)
    path = write(tmp_path, 3, model, decoder, opt, sched, "lora")
    # the resumed run is configured with lr 1e-2 and weight decay 0.5 (was 1e-3 / 0.01)
    _, decoder2, _, _ = tiny_setup(LoraMode(rank=4, alpha=4))
    cfg = OptimConfig(lr=1e-2, weight_decay=0.5, warmup_steps=2)
    opt2 = build_optimizer(decoder2, cfg)
    sched2 = build_scheduler(opt2, 10, cfg)
    fresh = [{k: v for k, v in g.items() if k != "params"} for g in opt2.param_groups]
    state = load_checkpoint(path, decoder2, "lora", {**CONFIG, "optim.lr": 1e-2}, strict=False)
    opt2.load_state_dict(state.optimizer)
    sched2.load_state_dict(state.scheduler)
    assert opt2.param_groups[0]["weight_decay"] == 0.01  # what torch restores: the old values
    changes = apply_optimizer_settings(opt2, sched2, fresh)
    assert any("weight_decay 0.01 -> 0.5" in c for c in changes) and any("base lr 0.001 -> 0.01" in c for c in changes)
    decays = {g["weight_decay"] for g in opt2.param_groups}
    assert 0.5 in decays and 0.01 not in decays
    # the current lr is the new peak at the restored point of the schedule, and the schedule goes on from there
    from acestep_ft.train.optim import lr_factor
    assert opt2.param_groups[0]["lr"] == pytest.approx(1e-2 * lr_factor(3, 10, cfg))
    assert sched2.get_last_lr()[0] == opt2.param_groups[0]["lr"]
    sched2.step()
    assert opt2.param_groups[0]["lr"] == pytest.approx(1e-2 * lr_factor(4, 10, cfg))
    # a strict resume changes nothing
    assert apply_optimizer_settings(opt2, sched2, [{k: v for k, v in g.items() if k != "params"}
                                                   for g in opt2.param_groups]) == []
