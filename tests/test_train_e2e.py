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

from acestep_ft.train.metrics import read_metrics

ROOT = Path(__file__).resolve().parents[1]
GOLDEN = json.loads((ROOT / "tests" / "assets" / "golden_losses.json").read_text())


def run_train(run_dir: Path, *overrides: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "WANDB_MODE": "offline", "HYDRA_FULL_ERROR": "1"}
    cmd = [sys.executable, "train.py", f"hydra.run.dir={run_dir}", *overrides]
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


@pytest.mark.parametrize("mode", ["lora", "full"])
def test_stop_and_resume_reproduces_the_uninterrupted_run(tmp_path, mode):
    common = [f"mode={mode}", "train.max_steps=8", "train.save_every=4", "dataset.num_samples=6",
              "hardware.batch_size=2", "train.grad_accum=2", "train.plot=false"]
    whole, parts = tmp_path / "whole", tmp_path / "parts"
    run_train(whole, *common)
    run_train(parts, *common, "train.stop_at_step=3")  # stops off the save grid: the stop itself saves
    assert [p.name for p in sorted((parts / "checkpoints").iterdir())] == ["step-00000003"]
    proc = run_train(parts, *common, "train.resume=auto")
    assert "resumed from" in proc.stdout
    assert losses(parts) == losses(whole)  # exact, not approximate
    assert len(losses(whole)) == 8
