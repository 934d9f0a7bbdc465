"""End to end: `python train.py optim=prodigy|adafactor|schedulefree` on the tiny model, stopped and resumed.

Each preset: a run stopped at step 3 and resumed reproduces the uninterrupted run's losses exactly (schedule-free
with a validation split, so its evaluation weights are swapped in and out between checkpoints), and a non-strict
resume with another optim.lr continues with the new lr. Slow (four train.py runs per preset, ~1-2 min each preset on
2 cores): the in-process equivalents are in tests/unit/test_optim_presets.py.
"""

import pytest
from safetensors.torch import load_file

from acestep_ft.train.metrics import read_metrics
from test_train_e2e import losses, run_train

COMMON = ["train.max_steps=8", "train.save_every=4", "dataset.num_samples=8", "hardware.batch_size=2",
          "train.plot=false", "train.export_comfyui=false"]


def val_losses(run_dir):
    return [(r["step"], r["val/loss"]) for r in read_metrics(run_dir / "metrics.jsonl") if "val/loss" in r]


@pytest.mark.slow
@pytest.mark.parametrize("name,extra", [
    ("prodigy", []),
    ("adafactor", ["train.grad_accum=2"]),
    ("schedulefree", ["dataset.val_fraction=0.25", "train.val_every=2"]),
])
def test_preset_trains_resumes_exactly_and_takes_a_new_lr(tmp_path, name, extra):
    common = [f"optim={name}", *COMMON, *extra]
    whole, parts = tmp_path / "whole", tmp_path / "parts"
    run_train(whole, *common)
    run_train(parts, *common, "train.stop_at_step=3")
    proc = run_train(parts, *common, "train.resume=auto")
    assert "resumed from" in proc.stdout and "applied the configured optimizer settings" not in proc.stdout
    assert losses(parts) == losses(whole) and len(losses(whole)) == 8  # exact
    assert val_losses(parts) == val_losses(whole)
    records = read_metrics(whole / "metrics.jsonl")
    if name == "prodigy":
        assert records[-1]["train/opt/d"] >= records[0]["train/opt/d"] > 0  # its step size estimate, logged
    if name == "schedulefree":
        assert len(val_losses(whole)) == 4 and {r["train/lr"] for r in records} == {5e-4}  # constant: its own warmup
        warmup = [r["train/opt/scheduled_lr"] for r in records]  # optimizer.warmup_steps=10 > 8 steps: rising
        assert all(a < b for a, b in zip(warmup, warmup[1:])) and warmup[-1] == pytest.approx(5e-4 * 8 / 10)
        # the export holds the averaged weights x, the checkpoint the training point y (with z: resumes exactly)
        export = load_file(str(whole / "export" / "adapter_model.safetensors"))
        ckpt = load_file(str(whole / "checkpoints" / "step-00000008" / "adapter" / "adapter_model.safetensors"))
        assert export.keys() == ckpt.keys() and any(not (export[k] == ckpt[k]).all() for k in export)

    # train.resume_strict=false with another lr (and two more steps): the new lr applies from the restored step
    lr = {"prodigy": 0.5, "adafactor": 2e-4, "schedulefree": 1e-3}[name]
    proc = run_train(parts, *common, "train.max_steps=10", f"optim.lr={lr}", "train.resume=auto",
                     "train.resume_strict=false")
    assert "applied the configured optimizer settings" in proc.stdout and "base lr" in proc.stdout
    after = [r for r in read_metrics(parts / "metrics.jsonl") if r["step"] > 8]
    assert [r["step"] for r in after] == [9, 10] and all(r["train/lr"] <= lr for r in after)
    if name == "schedulefree":
        assert all(r["train/lr"] == lr for r in after)
