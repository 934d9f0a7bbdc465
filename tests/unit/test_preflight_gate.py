"""The memory gate: known verdicts (fits / refuse / rewrite), what a rewrite may change, the CLI and the e2e hook."""

import os
import subprocess
import sys

import pytest
from omegaconf import OmegaConf

from acestep_ft.config import FullMode, LoraMode, register_configs
from acestep_ft.preflight.gate import (
    GIB, config_diff, data_shape, effective_batch, estimate_config, preflight, write_rewrite,
)
from conftest import ROOT
from test_configs import compose_config

LONG = ["dataset.max_frames=6000", "dataset.min_frames=5000", "dataset.num_samples=8"]  # 200-240 s clips


def cfg_of(*overrides):
    register_configs()
    return OmegaConf.to_object(compose_config(list(overrides)))


def test_lora_on_an_a100_fits_untouched():
    cfg = cfg_of("model=acestep15_turbo", "hardware=a100", *LONG)
    verdict = preflight(cfg, 1)
    assert verdict.fits and not verdict.changes and verdict.cfg is cfg
    assert "verdict: fits" in verdict.report()


def test_full_adamw_on_24gb_is_refused_with_terms_and_suggestions():
    cfg = cfg_of("model=acestep15_turbo", "mode=full", "hardware=24gb", *LONG)
    with pytest.raises(SystemExit) as refused:
        preflight(cfg, 1)
    text = str(refused.value.code)
    assert "DOES NOT FIT" in text and "optimizer states" in text and "weights" in text
    assert "this fits as LoRA rank" in text and "bitsandbytes.optim.AdamW8bit" in text
    assert "mode.i_understand_vram_risk" in text


def test_full_with_the_opt_in_is_rewritten_to_fit_and_keeps_what_trains():
    cfg = cfg_of("model=acestep15_turbo", "mode=full", "mode.i_understand_vram_risk=true", "hardware=24gb",
                 "preflight.policy=rewrite", *LONG)
    verdict = preflight(cfg, 1)
    assert verdict.fits and verdict.changes
    assert any("AdamW8bit" in c for c in verdict.changes)
    assert verdict.cfg.mode == cfg.mode and verdict.cfg.dataset == cfg.dataset
    assert effective_batch(verdict.cfg, 1) == effective_batch(cfg, 1)
    with pytest.raises(SystemExit, match="Refused"):  # the same without rewrite permission
        preflight(cfg_of("model=acestep15_turbo", "mode=full", "mode.i_understand_vram_risk=true", "hardware=24gb",
                         *LONG), 1)


def test_lora_is_rewritten_in_the_documented_order_keeping_the_effective_batch():
    cfg = cfg_of("model=acestep15_turbo", "hardware=24gb", "hardware.batch_size=4", "hardware.max_frames_per_batch=0",
                 "hardware.gradient_checkpointing=0", "train.grad_accum=2", *LONG)
    before = estimate_config(cfg, data_shape(cfg), 1).total
    verdict = preflight(cfg, 1)  # policy auto = rewrite for LoRA
    assert before + verdict.overhead > verdict.budget and verdict.fits
    changed = {key for key, _, _ in config_diff(cfg, verdict.cfg)}
    assert "hardware.gradient_checkpointing" in changed  # the first step tried
    assert changed <= {"hardware.gradient_checkpointing", "hardware.batch_size", "train.grad_accum",
                       "hardware.max_frames_per_batch", "optim.optimizer.fused", "optim.optimizer._target_"}
    assert effective_batch(verdict.cfg, 1) == effective_batch(cfg, 1) == 8
    assert verdict.cfg.mode == cfg.mode  # the trained set never changes


def test_warn_trains_anyway_and_cpu_has_no_budget():
    cfg = cfg_of("model=acestep15_turbo", "hardware=24gb", "hardware.batch_size=8", "hardware.max_frames_per_batch=0",
                 "hardware.gradient_checkpointing=0", "preflight.policy=warn", *LONG)
    verdict = preflight(cfg, 1)
    assert verdict.fits is False and not verdict.changes and verdict.suggestions
    cpu = cfg_of("hardware=cpu")
    assert preflight(cpu, 1).fits is None
    with pytest.raises(SystemExit, match="without a device budget"):
        preflight(cfg_of("model=acestep15_turbo", "mode=full", "hardware=cpu"), 1)


def test_sharding_over_processes_lowers_the_estimate():
    one = cfg_of("model=acestep15_turbo", "mode=full", "hardware=a100", "hardware.distributed=fsdp",
                 "hardware.gradient_checkpointing=1", *LONG)  # states, not activations, dominate
    shape = data_shape(one)
    assert estimate_config(one, shape, 8).total < 0.5 * estimate_config(one, shape, 1).total


def test_rewrite_files(tmp_path):
    cfg = cfg_of("model=acestep15_turbo", "hardware=24gb", "hardware.batch_size=4", "hardware.max_frames_per_batch=0",
                 "hardware.gradient_checkpointing=0", *LONG)
    verdict = preflight(cfg, 1)
    write_rewrite(tmp_path, cfg, verdict)
    diff = (tmp_path / "preflight" / "diff.txt").read_text()
    assert "hardware.gradient_checkpointing: 0.0 ->" in diff
    assert OmegaConf.load(tmp_path / "preflight" / "config.yaml").hardware.batch_size == verdict.cfg.hardware.batch_size
    assert "verdict: fits" in (tmp_path / "preflight" / "estimate.txt").read_text()


def test_cli_prints_the_table_and_exits_by_verdict():
    def cli(*args):
        return subprocess.run([sys.executable, "-m", "acestep_ft.preflight", *args], cwd=ROOT, capture_output=True,
                              text=True, timeout=120)

    refused = cli("mode=full", "hardware=24gb", "model=acestep15_turbo", *LONG)
    assert refused.returncode == 1 and "DOES NOT FIT" in refused.stdout and "optimizer states" in refused.stdout
    fits = cli("hardware=24gb", "model=acestep15_turbo", *LONG)
    assert fits.returncode == 0 and "verdict: fits" in fits.stdout and "activations" in fits.stdout
    assert cli("mode.rnak=3").returncode != 0


def test_train_applies_a_rewrite_and_records_it(tmp_path):
    """End to end on the tiny model: a budget just under its estimate makes train.py rewrite, say so and train."""
    cfg = cfg_of("hardware=cpu", "hardware.gradient_checkpointing=0")
    need = estimate_config(cfg, data_shape(cfg), 1).total
    env = {**os.environ, "HYDRA_FULL_ERROR": "1"}
    cmd = [sys.executable, "train.py", "hardware=cpu", f"hydra.run.dir={tmp_path}", "train.max_steps=2",
           "train.plot=false", f"hardware.memory_gb={0.9 * need / GIB}", "preflight.overhead_gb=0"]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "rewrote the config to fit" in proc.stdout
    assert "hardware.gradient_checkpointing" in (tmp_path / "preflight" / "diff.txt").read_text()
    assert isinstance(cfg.mode, LoraMode) and not isinstance(cfg.mode, FullMode)
