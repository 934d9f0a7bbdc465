"""The memory gate: known verdicts (fits / refuse / rewrite), what a rewrite may change, the CLI and the e2e hook."""

import os
import subprocess
import sys

import pytest
import torch
from omegaconf import OmegaConf

from acestep_ft.config import flatten, register_configs
from acestep_ft.distributed import strategy_problems
from acestep_ft.errors import UserError
from acestep_ft.preflight.estimate import InputLengths
from acestep_ft.preflight.gate import (
    GIB, DataShape, config_diff, config_overrides, data_shape, estimate_config, preflight, rewrite_candidates,
    samples_per_step, write_rewrite,
)
from conftest import ROOT
from test_configs import compose_config

LONG = ["dataset.max_frames=6000", "dataset.min_frames=5000", "dataset.num_samples=8"]  # 200-240 s clips
INPUTS = ["dataset.conditions=encoder_inputs"]  # the condition encoder runs in every step
BOTH = [*INPUTS, "mode=full", "mode.unfreeze=[{pattern: '.'},{module: condition_encoder, pattern: '.'}]"]
ENCODER_2B = 404_789_248 + 201_481_216 + 2_097_152  # lyric, timbre encoder, text_projector (ACESTEP15.md)


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
    with pytest.raises(UserError) as refused:
        preflight(cfg, 1)
    text = str(refused.value)
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
    assert samples_per_step(verdict.cfg, data_shape(cfg)) == samples_per_step(cfg, data_shape(cfg))
    with pytest.raises(UserError, match="Refused"):  # the same without rewrite permission
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
    shape = data_shape(cfg)
    assert samples_per_step(verdict.cfg, shape) == samples_per_step(cfg, shape) == {k: 8 for k in samples_per_step(cfg, shape)}
    assert verdict.cfg.mode == cfg.mode  # the trained set never changes


def test_warn_trains_anyway_and_cpu_has_no_budget():
    cfg = cfg_of("model=acestep15_turbo", "hardware=24gb", "hardware.batch_size=8", "hardware.max_frames_per_batch=0",
                 "hardware.gradient_checkpointing=0", "preflight.policy=warn", *LONG)
    verdict = preflight(cfg, 1)
    assert verdict.fits is False and not verdict.changes and verdict.suggestions
    cpu = cfg_of("hardware=cpu")
    assert preflight(cpu, 1).fits is None
    with pytest.raises(UserError, match="without a device budget"):
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


@pytest.mark.slow
def test_cli_prints_the_table_and_exits_by_verdict():
    def cli(*args):
        return subprocess.run([sys.executable, "-m", "acestep_ft.preflight", *args], cwd=ROOT, capture_output=True,
                              text=True, timeout=120)

    refused = cli("mode=full", "hardware=24gb", "model=acestep15_turbo", *LONG)  # the refusal: its report on stderr
    assert refused.returncode == 1 and "DOES NOT FIT" in refused.stderr and "optimizer states" in refused.stderr
    assert "Traceback" not in refused.stderr
    fits = cli("hardware=24gb", "model=acestep15_turbo", *LONG)
    assert fits.returncode == 0 and "verdict: fits" in fits.stdout and "activations" in fits.stdout
    mixed = cli("mode=full", "hardware=a100", "model=acestep15_turbo", "--world-size", "8", "hardware.distributed=fsdp",
                "hardware.gradient_checkpointing=1", *LONG)  # options between overrides, as in the README
    assert mixed.returncode == 0 and "8 process(es)" in mixed.stdout and "sharded / 8" in mixed.stdout
    typo = cli("mode.rnak=3")
    assert typo.returncode == 2 and "mode.rnak" in typo.stderr and "Traceback" not in typo.stderr


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
    assert "hardware.gradient_checkpointing: 0.0 ->" in (tmp_path / "preflight" / "diff.txt").read_text()
    trained = OmegaConf.load(tmp_path / "checkpoints" / "step-00000002" / "config.yaml")
    assert trained.hardware.gradient_checkpointing > 0  # the run trained with the rewritten config


def test_rewrite_steps_come_in_the_documented_order():
    cfg = cfg_of("model=acestep15_turbo", "hardware=a100", "hardware.batch_size=4", "hardware.max_frames_per_batch=0",
                 "hardware.gradient_checkpointing=0", "train.ema.enabled=true", *LONG)
    shape = data_shape(cfg)
    names = [name for name, _ in rewrite_candidates(cfg, shape, 1)]
    assert names == ["EMA to host RAM"] + ["gradient checkpointing"] * 3 + [
        "smaller micro-batch, more accumulation"] * 2 + ["fused AdamW", "8-bit optimizer"]
    plain = cfg_of("model=acestep15_turbo", "mode=full", "hardware=a100", "hardware.gradient_checkpointing=1",
                   "hardware.batch_size=1", *LONG)
    steps = dict(rewrite_candidates(plain, shape, 4))
    assert list(steps) == ["fused AdamW", "8-bit optimizer", "sharding", "offload"]
    sharded = steps["sharding"]  # FSDP2 cannot step bitsandbytes: sharding starts again from fused torch AdamW
    assert sharded.hardware.distributed == "fsdp" and sharded.optim.optimizer["_target_"] == "torch.optim.AdamW"
    assert not strategy_problems(sharded, on_cpu=False)


def test_a_frame_budget_that_caps_the_batch_is_not_halved():
    """24 clips of 7,000 frames, batch 4, budget 24,000: 3 clips per micro-batch. Halving to batch 2 / budget 12,000
    would give 1 clip x 2 accumulation = 2 per step, not 3: the gate must not offer it."""
    cfg = cfg_of("model=acestep15_turbo", "hardware=a100", "hardware.gradient_checkpointing=1", "dataset.num_samples=24")
    shape = DataShape([7000] * 24, 12, "fixed")
    assert list(samples_per_step(cfg, shape).values()) == [3]
    assert "smaller micro-batch, more accumulation" not in [n for n, _ in rewrite_candidates(cfg, shape, 1)]
    even = DataShape([5000] * 24, 12, "fixed")  # 4 clips fit the budget: halving keeps 4 per step
    halved = dict(rewrite_candidates(cfg, even, 1))["smaller micro-batch, more accumulation"]
    assert samples_per_step(halved, even) == samples_per_step(cfg, even)
    assert list(samples_per_step(cfg, even).values()) == [4]


def test_strategy_refusals():
    assert any("bitsandbytes" in p for p in strategy_problems(
        cfg_of("hardware=a100", "hardware.distributed=fsdp", "optim=adamw8bit"), on_cpu=False))
    assert any("mode.unfreeze" in p for p in strategy_problems(
        cfg_of("hardware=a100", "hardware.distributed=fsdp", "mode=full", "mode.unfreeze=[{pattern: layers}]"),
        on_cpu=False))
    assert strategy_problems(cfg_of("hardware=a100", "hardware.distributed=fsdp"), on_cpu=False) == []


@pytest.mark.slow  # default-suite budget; CI runs it
def test_fit_table_script_backs_the_readme_claim():
    proc = subprocess.run([sys.executable, "scripts/preflight_table.py"], cwd=ROOT, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    rows = [line for line in proc.stdout.splitlines() if line.startswith("| acestep15")]
    assert len(rows) == 6
    readme = (ROOT / "README.md").read_text()
    assert all(row in readme for row in rows), "README table is stale: rerun scripts/preflight_table.py"
    assert "| acestep15_turbo | full 8-bit | fits" in proc.stdout  # full 2B on 24 GB with 8-bit AdamW


FUSED = ["model=acestep15_turbo", "mode=full", "mode.i_understand_vram_risk=true", "hardware=a100",
         "hardware.gradient_checkpointing=1", "hardware.batch_size=1", "preflight.policy=warn",
         "preflight.overhead_gb=0", *LONG]


def test_the_fused_adamw_suggestion_is_an_override_hydra_accepts():
    """The suggestion's text, pasted on the command line, composes to the config the rewrite would train."""
    cfg = cfg_of(*FUSED)
    shape = data_shape(cfg)
    fused = dict(rewrite_candidates(cfg, shape, 1))["fused AdamW"]
    low, high = estimate_config(fused, shape, 1).total, estimate_config(cfg, shape, 1).total
    assert low < high  # a budget between the two: only the fused step fits
    budget = f"hardware.memory_gb={(low + high) / 2 / GIB}"
    tight = cfg_of(*FUSED, budget)
    verdict = preflight(tight, 1)
    assert verdict.fits is False
    line = next(s for s in verdict.suggestions if "up to 'fused AdamW'" in s)
    assert "suggestion: " + line in verdict.report()
    pasted = line.split("': ", 1)[1].split(" (preflight.policy=rewrite")[0].split()
    assert pasted == ["+optim.optimizer.fused=true"]
    composed = cfg_of(*FUSED, budget, *pasted)  # Hydra accepts it: `optimizer` has no `fused` key to override
    assert composed.optim.optimizer["fused"] is True
    assert config_diff(composed, dict(rewrite_candidates(tight, shape, 1))["fused AdamW"]) == []


def test_every_rewrite_step_prints_overrides_that_compose_to_it():
    """`config_overrides` of each rewrite step (EMA, checkpointing ratios, batch, fused, 8-bit, sharding, offload,
    and removing a key) composes back to exactly that step's config."""
    cases = [
        ["model=acestep15_turbo", "hardware=a100", "hardware.batch_size=4", "hardware.max_frames_per_batch=0",
         "hardware.gradient_checkpointing=0", "train.ema.enabled=true", *LONG],
        ["model=acestep15_turbo", "mode=full", "hardware=a100", "hardware.gradient_checkpointing=1",
         "hardware.batch_size=1", *LONG],
        ["model=acestep15_turbo", "mode=full", "hardware=a100", "+optim.optimizer.fused=true", *LONG],
    ]
    seen = set()
    for overrides in cases:
        cfg = cfg_of(*overrides)
        for name, candidate in rewrite_candidates(cfg, data_shape(cfg), 4):
            pasted = config_overrides(cfg, candidate)
            seen.update(p[0] for p in pasted)
            assert flatten(cfg_of(*overrides, *pasted)) == flatten(candidate), (name, pasted)
    assert seen >= {"+", "~", "h", "t", "o"}  # added, removed and changed keys all compose


def test_encoder_inputs_shape_comes_from_the_data(tmp_path):
    """Synthetic data: dataset.text_length / lyric_length and one one-frame reference; preprocessed .pt files: the
    input sizes of the sample with the longest condition Ll + R + Lt."""
    synthetic = data_shape(cfg_of(*INPUTS, "dataset.text_length=12", "dataset.lyric_length=40"))
    assert synthetic.inputs == InputLengths(text=12, lyric=40, refs=1, ref_frames=1)
    assert synthetic.max_cond_len == 53 and synthetic.condition == synthetic.inputs
    for i, (frames, lyric, refs) in enumerate([(100, 20, 1), (300, 40, 2), (200, 30, 1)]):
        torch.save({"target_latents": torch.randn(frames, 64), "attention_mask": torch.ones(frames),
                    "context_latents": torch.randn(frames, 128), "text_hidden_states": torch.randn(8, 32),
                    "text_attention_mask": torch.ones(8), "lyric_token_ids": torch.randint(0, 256, (lyric,)),
                    "lyric_attention_mask": torch.ones(lyric), "refer_audio_latents": torch.zeros(refs, 3, 64)},
                   tmp_path / f"s{i}.pt")  # model=tiny: D_text 32, vocabulary 256
    shape = data_shape(cfg_of("dataset=preprocessed", f"dataset.path={tmp_path}", *INPUTS))
    assert sorted(shape.lengths) == [100, 200, 300]
    assert shape.inputs == InputLengths(text=8, lyric=40, refs=2, ref_frames=3) and shape.max_cond_len == 50
    assert data_shape(cfg_of("hardware=cpu")).inputs is None  # encoder outputs: L only


def test_the_gate_counts_the_condition_encoder():
    """The encoder and token table are lines of the estimate the gate compares, and a refusal or a rewrite works as
    for the decoder: the 2B decoder and encoder trained in full do not fit 24 GB with AdamW, but do with 8-bit."""
    with pytest.raises(UserError) as refused:
        preflight(cfg_of("model=acestep15_turbo", "hardware=24gb", *BOTH, *LONG), 1)
    text = str(refused.value)
    assert "DOES NOT FIT" in text and "condition encoder" in text and "token table" in text
    cfg = cfg_of("model=acestep15_turbo", "hardware=24gb", *BOTH, "mode.i_understand_vram_risk=true",
                 "preflight.policy=rewrite", *LONG)
    verdict = preflight(cfg, 1)
    assert verdict.fits and any("AdamW8bit" in c for c in verdict.changes) and verdict.cfg.mode == cfg.mode
    lines = {t.name: t.bytes for t in verdict.estimate.terms}
    cls = 2048  # the 2B timbre CLS token is never read, so it stays frozen (bf16)
    assert lines["condition encoder"] == 4 * (ENCODER_2B - cls) + 2 * cls
    assert lines["token table"] == 2 * 151_669 * 1024
