"""CUDA-only end to end: full fine-tuning with bf16 autocast, 8-bit AdamW, gradient checkpointing and device
prefetch, plus exact resume. Skipped on machines without a CUDA GPU."""

import pytest
import torch

from acestep_ft.train.metrics import read_metrics
from test_train_e2e import losses, run_train

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]


def test_full_bf16_8bit_checkpointing_trains_and_resumes(tmp_path):
    common = ["hardware.device=cuda", "hardware.mixed_precision=bf16", "hardware.gradient_checkpointing=1",
              "hardware.device_prefetch=true", "mode=full", "optim=adamw8bit", "optim.lr=1e-3",
              "train.max_steps=40", "train.save_every=20", "dataset.num_samples=16", "train.plot=false"]
    whole = tmp_path / "whole"
    proc = run_train(whole, *common)
    assert "precision bf16" in proc.stdout and "device cuda" in proc.stdout
    got = losses(whole)
    assert len(got) == 40 and all(torch.isfinite(torch.tensor(got)))
    assert sum(got[-8:]) / 8 < sum(got[:8]) / 8  # the loss falls
    state = torch.load(whole / "checkpoints" / "step-00000040" / "training_state.pt", weights_only=False)
    moments = [v for s in state["optimizer"]["state"].values() for k, v in s.items() if k == "state1"]
    assert moments and all(m.dtype == torch.uint8 for m in moments)  # 8-bit optimizer states
    assert read_metrics(whole / "metrics.jsonl")[-1]["mem/peak_alloc_gb"] > 0
    parts = tmp_path / "parts"
    run_train(parts, *common, "train.stop_at_step=20")
    run_train(parts, *common, "train.resume=auto")
    assert losses(parts) == pytest.approx(got, rel=1e-3)  # kernels may differ in the last bits on a GPU
