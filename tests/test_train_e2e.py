"""End to end: `python train.py` in a subprocess on the tiny model.

Checks exit status, checkpoint files, golden losses (tests/assets/golden_losses.json, regenerated on purpose
with `python scripts/update_golden.py`), and that a run stopped at step k and resumed reproduces the remaining
losses of the uninterrupted run exactly.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from acestep_ft.train.metrics import read_metrics

ROOT = Path(__file__).resolve().parents[1]
GOLDEN = json.loads((ROOT / "tests" / "assets" / "golden_losses.json").read_text())


def run_train(run_dir: Path, *overrides: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "WANDB_MODE": "offline", "HYDRA_FULL_ERROR": "1"}
    cmd = [sys.executable, "train.py", "hardware=cpu", f"hydra.run.dir={run_dir}", *overrides]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, f"train.py failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"
    return proc


def losses(run_dir: Path) -> list:
    return [r["train/loss"] for r in read_metrics(run_dir / "metrics.jsonl")]


def test_golden_losses_and_artifacts(tmp_path):
    run_train(tmp_path, *GOLDEN["overrides"])
    got = losses(tmp_path)
    assert len(got) == len(GOLDEN["losses"])
    assert got == pytest.approx(GOLDEN["losses"], rel=1e-4, abs=1e-6)
    ckpt = tmp_path / "checkpoints" / f"step-{len(got):08d}"
    assert (ckpt / "adapter" / "adapter_config.json").exists()
    assert (ckpt / "adapter" / "adapter_model.safetensors").exists()
    assert (ckpt / "training_state.pt").exists() and (ckpt / "config.yaml").exists()
    assert (tmp_path / "loss_curve.png").stat().st_size > 1000
    assert (tmp_path / ".hydra" / "config.yaml").exists() and not (tmp_path / "train.log").exists()
    umask = os.umask(0)
    os.umask(umask)
    for path, mode in [(ckpt, 0o777), (ckpt / "adapter" / "adapter_model.safetensors", 0o666),
                       (tmp_path / "export", 0o777), (tmp_path / "metrics.jsonl", 0o666)]:
        assert path.stat().st_mode & 0o777 == mode & ~umask, path  # readable by others as the umask allows
    record = read_metrics(tmp_path / "metrics.jsonl")[-1]
    for name in ("train/lr", "train/grad_norm", "perf/step_time_s", "perf/samples_per_s", "data/pad_frac",
                 "mem/host_peak_rss_gb"):
        assert name in record, name
    assert 0.0 <= record["data/pad_frac"] < 1.0


# each adapter type once (slow: CI runs them); LoKr / LoHa with rank and module dropout, so their RNG use is resumed
@pytest.mark.parametrize("mode", ["lora", *(pytest.param(m, marks=pytest.mark.slow) for m in (
    "full", "lora mode.use_dora=true mode.use_rslora=true",
    "lokr mode.rank=4 mode.decompose_both=true mode.rank_dropout=0.2 mode.module_dropout=0.2",
    "loha mode.rank=4 mode.rank_dropout=0.2 mode.module_dropout=0.2"))])
def test_stop_and_resume_reproduces_the_uninterrupted_run(tmp_path, mode):
    common = [f"mode={mode.split()[0]}", *mode.split()[1:], "train.max_steps=8", "train.save_every=4", "dataset.num_samples=6",
              "hardware.batch_size=2", "train.grad_accum=2", "train.plot=false", "train.ema.enabled=true"]
    whole, parts = tmp_path / "whole", tmp_path / "parts"
    run_train(whole, *common)
    proc = run_train(parts, *common, "train.stop_at_step=3")  # stops off the save grid: the stop itself saves
    assert [p.name for p in sorted((parts / "checkpoints").iterdir())] == ["step-00000003"]
    assert not (parts / "export").exists() and "paused: step 3" in proc.stdout  # a pause is not a result
    proc = run_train(parts, *common, "train.resume=auto")
    assert "resumed from" in proc.stdout and (parts / "export").is_dir()
    assert losses(parts) == losses(whole)  # exact, not approximate
    assert len(losses(whole)) == 8
    final = [torch.load(d / "checkpoints" / "step-00000008" / "training_state.pt", weights_only=False)["ema"]
             for d in (whole, parts)]
    assert final[0]["updates"] == final[1]["updates"] == 8
    for name, value in final[0]["shadow"].items():
        assert torch.equal(value, final[1]["shadow"][name]), name


@pytest.mark.slow  # default-suite budget; CI runs it
def test_validation_early_stopping_keeps_the_best_checkpoint(tmp_path):
    # lr 1e-30: updates vanish below fp32 resolution, the weights never change, so the validation loss is flat and early stopping must trigger
    proc = run_train(tmp_path, "optim.lr=1e-30", "train.max_steps=50", "train.save_every=100", "train.keep_last=1",
                     "dataset.val_fraction=0.25", "train.val_every=2", "train.early_stop.patience=2",
                     "train.plot=false")
    records = read_metrics(tmp_path / "metrics.jsonl")
    val = [r["val/loss"] for r in records if "val/loss" in r]
    assert len(val) == 3 and val[0] == val[1] == val[2]  # same weights: exactly the same validation loss
    assert len(losses(tmp_path)) == 6 and "early stop at step 6" in proc.stdout
    best = json.loads((tmp_path / "checkpoints" / "best.json").read_text())
    assert best["step"] == 2
    kept = sorted(p.name for p in (tmp_path / "checkpoints").iterdir() if p.is_dir())
    assert kept == ["step-00000002", "step-00000006"]  # the best survives keep_last=1
    proc = run_train(tmp_path, "optim.lr=1e-30", "train.max_steps=50", "train.save_every=100", "train.keep_last=1",
                     "dataset.val_fraction=0.25", "train.val_every=2", "train.early_stop.patience=2",
                     "train.plot=false", "train.resume=auto")
    assert "had already stopped at step 6" in proc.stdout and len(losses(tmp_path)) == 6


def test_full_finetune_with_validation_unfreezing_and_samples_resumes_exactly(tmp_path):
    common = ["mode=full", "optim.lr=1e-3", "train.max_steps=12", "train.save_every=6", "dataset.num_samples=14",
              "hardware.batch_size=2", "dataset.val_fraction=0.3", "train.val_every=3", "train.ema.enabled=true",
              "train.samples.every_epochs=1", "train.samples.sampler.steps=2", "train.plot=false",
              "mode.unfreeze=[{pattern: 'layers\\.1\\.'},{pattern: '', at_epoch: 1}]"]
    whole, parts = tmp_path / "whole", tmp_path / "parts"
    proc = run_train(whole, *common)
    assert "from step 0" in proc.stdout and "validation:" in proc.stdout
    run_train(parts, *common, "train.stop_at_step=5")
    run_train(parts, *common, "train.resume=auto")
    assert losses(parts) == losses(whole) and len(losses(whole)) == 12

    def val(d):
        return [(r["step"], r["val/loss"]) for r in read_metrics(d / "metrics.jsonl") if "val/loss" in r]

    assert val(parts) == val(whole) and len(val(whole)) == 4
    for name in sorted(p.name for p in (whole / "samples").iterdir()):
        a, b = (load_file(str(d / "samples" / name)) for d in (whole, parts))
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    # the full export loads strictly as the official layout, in the chosen dtype, holding the EMA weights
    shadow = torch.load(whole / "checkpoints" / "step-00000012" / "training_state.pt", weights_only=False)["ema"]
    exported = load_file(str(whole / "export" / "model.safetensors"))
    for name, value in shadow["shadow"].items():
        torch.testing.assert_close(exported[f"decoder.{name}"], value)
    assert json.loads((whole / "export" / "config.json").read_text())["model_type"]


@pytest.mark.slow  # default-suite budget; CI runs it
def test_full_finetune_over_several_epochs_lowers_the_loss(tmp_path):
    run_train(tmp_path, "mode=full", "optim.lr=1e-3", "dataset.num_samples=16", "train.max_steps=40",
              "train.save_every=40", "train.plot=false")  # 4 steps per epoch: 10 epochs
    got = losses(tmp_path)
    assert len(got) == 40 and sum(got[-8:]) / 8 < 0.8 * sum(got[:8]) / 8


def test_lora_export_in_bf16_loads_through_peft(tmp_path):
    from peft import PeftModel

    from acestep_ft.model import load_model
    from conftest import model_config

    run_train(tmp_path, "train.max_steps=3", "train.export_dtype=bfloat16", "train.plot=false")
    weights = load_file(str(tmp_path / "export" / "adapter_model.safetensors"))
    assert weights and all(v.dtype == torch.bfloat16 for v in weights.values())
    wrapped = PeftModel.from_pretrained(load_model(model_config()).decoder, str(tmp_path / "export"))
    assert any("lora_A" in n for n, _ in wrapped.named_parameters())


def run_quick(tmp: Path, *args: str, multirun: bool = False) -> subprocess.CompletedProcess:
    env = {**os.environ, "WANDB_MODE": "offline", "HYDRA_FULL_ERROR": "1", "WANDB_SILENT": "true"}
    where = f"hydra.sweep.dir={tmp}" if multirun else f"hydra.run.dir={tmp}"
    cmd = [sys.executable, "train.py", *args, where, "hardware=cpu", "train.max_steps=2", "train.plot=false"]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, f"{cmd} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"
    return proc


@pytest.mark.slow
def test_wandb_offline_and_tensorboard(tmp_path):
    run_quick(tmp_path / "wb", "logger=wandb")
    assert list((tmp_path / "wb" / "wandb").glob("offline-run-*")), "no offline wandb run written"
    run_quick(tmp_path / "tb", "logger=tensorboard")
    assert list((tmp_path / "tb" / "tensorboard").glob("events.out.tfevents.*"))


@pytest.mark.slow  # default-suite budget; CI runs it
def test_multirun_jobs_get_distinct_directories(tmp_path):
    run_quick(tmp_path, "-m", "optim.lr=1e-4,3e-4", multirun=True)
    jobs = sorted(p for p in tmp_path.iterdir() if p.is_dir() and (p / "metrics.jsonl").exists())
    assert len(jobs) == 2
    lrs = {read_metrics(j / "metrics.jsonl")[-1]["train/lr"] for j in jobs}
    assert len(lrs) == 2


@pytest.mark.slow
def test_experiment_grid_runs(tmp_path):
    run_quick(tmp_path, "-cd", "experiments", "-cn", "lora_rank_lr_grid", "-m", multirun=True)
    jobs = [p for p in tmp_path.iterdir() if (p / "metrics.jsonl").exists()]
    assert len(jobs) == 4  # mode.rank x optim.lr
    ranks = {(j / ".hydra" / "overrides.yaml").read_text().count("mode.rank=16") for j in jobs}
    assert ranks == {0, 1}


@pytest.mark.slow
def test_two_process_cpu_run_resumes_exactly(tmp_path):
    """torchrun with 2 CPU processes (gloo): each rank keeps its own RNG stream through a stop and resume."""
    common = ["hardware=cpu", "train.max_steps=6", "train.save_every=3", "dataset.num_samples=10", "hardware.batch_size=2",
              "train.grad_accum=2", "train.plot=false"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}

    def torchrun(run_dir, *extra):
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
               "train.py", *common, *extra, f"hydra.run.dir={run_dir}"]
        proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=240)
        assert proc.returncode == 0, f"torchrun failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"
        return proc

    whole = torchrun(tmp_path / "whole").stdout
    assert "x 2 process(es)" in whole and "replicas: the trained weights agree on all 2 processes" in whole
    torchrun(tmp_path / "parts", "train.stop_at_step=2")
    torchrun(tmp_path / "parts", "train.resume=auto")
    assert losses(tmp_path / "parts") == losses(tmp_path / "whole")
    assert len(losses(tmp_path / "whole")) == 6


@pytest.mark.slow  # default-suite budget (unit: tests/unit/test_adapters.py); CI runs it
@pytest.mark.parametrize("source", ["export", "export/comfyui/adapter.safetensors"])
def test_warm_start_from_a_trained_adapter_continues_its_update(tmp_path, source):
    """mode.init_adapter: a new run (fresh optimizer, step 0) starts from another run's adapter, given as its PEFT
    export or as the ComfyUI file, with its update kept when the new alpha differs (lr 1e-30: the weights do not move
    in the new run, so its export is the rescaled source)."""
    first, second = tmp_path / "first", tmp_path / "second"
    run_train(first, "mode.rank=4", "mode.alpha=4", "train.max_steps=3", "train.plot=false")
    proc = run_train(second, "mode.rank=4", "mode.alpha=8", f"mode.init_adapter={first / source}", "optim.lr=1e-30",
                     "train.max_steps=2", "train.plot=false")
    assert "init adapter: LORA from" in proc.stdout and "rescaled" in proc.stdout
    assert json.loads((second / "metrics.jsonl").read_text().splitlines()[0])["step"] == 1  # a fresh run
    a = load_file(str(first / "export" / "adapter_model.safetensors"))
    b = load_file(str(second / "export" / "adapter_model.safetensors"))
    assert set(a) == set(b)
    for key in a:
        torch.testing.assert_close(b[key], a[key] * (0.5 if ".lora_B." in key else 1.0), rtol=1e-6, atol=0)
