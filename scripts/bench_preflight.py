"""Memory estimate vs ground truth over a grid of configs, for docs/benchmarks.md.

    python scripts/bench_preflight.py            # CPU: traced step (FakeTensorMode + MemTracker); CUDA: measured
    python scripts/bench_preflight.py --trace    # trace even where a CUDA GPU is present
    python scripts/bench_preflight.py --real     # add real-size rows (2B decoder; each trace takes ~1-2 min)

Prints one row per config: estimate, ground truth, error, and where the estimate puts the peak.
"""

from __future__ import annotations

import argparse
import platform
import time
from pathlib import Path

import torch
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from omegaconf import OmegaConf

from acestep_ft.config import register_configs
from acestep_ft.errors import reported_errors
from acestep_ft.preflight.estimate import Condition, InputLengths, estimate_memory
from acestep_ft.preflight.trace import measure_peak_cuda, trace_peak

CONF = Path(__file__).resolve().parents[1] / "conf"
SMALL = ["model.hidden_size=256", "model.intermediate_size=768", "model.num_hidden_layers=4",
         "model.num_attention_heads=4", "model.num_key_value_heads=2", "model.head_dim=64", "model.sliding_window=16"]
MID = ["model.hidden_size=1024", "model.intermediate_size=3072", "model.num_hidden_layers=8",
       "model.num_attention_heads=8", "model.num_key_value_heads=4", "model.head_dim=128"]
COMMON = ["hardware.mixed_precision=bf16", "hardware.device_prefetch=false"]
# dataset.conditions=encoder_inputs: the condition encoder runs in the step, frozen (LoRA) or trained (full stages)
INPUTS = ["dataset.conditions=encoder_inputs"]
ENCODER = [*INPUTS, "mode=full", "mode.unfreeze=[{module: condition_encoder, pattern: '.'}]"]
LYRICS = [*INPUTS, "mode=full", "mode.unfreeze=[{module: condition_encoder, pattern: lyric_encoder}]"]
OFFICIAL = InputLengths(text=256, lyric=512, refs=1, ref_frames=1)  # the official trainer's padding, L = 769
AUDIO_REF = InputLengths(text=256, lyric=512, refs=1, ref_frames=750)  # a 30 s reference clip

GRID = [  # (label, overrides, batch, frames, cond: L or the encoder's InputLengths)
    ("small full", SMALL + ["mode=full"], 4, 1000, 80),
    ("small full ckpt", SMALL + ["mode=full", "hardware.gradient_checkpointing=1"], 4, 1000, 80),
    ("small full ckpt/2", SMALL + ["mode=full", "hardware.gradient_checkpointing=2"], 4, 1000, 80),
    ("small full eager", SMALL + ["mode=full", "model.attn_implementation=eager"], 2, 1000, 80),
    ("small full fp32", SMALL + ["mode=full", "hardware.mixed_precision=no"], 4, 1000, 80),
    ("small full 8bit+EMA", SMALL + ["mode=full", "optim=adamw8bit", "train.ema.enabled=true"], 4, 1000, 80),
    ("small lora", SMALL + ["mode=lora"], 4, 1000, 80),
    ("small lora B1", SMALL + ["mode=lora"], 1, 1000, 80),
    ("small lora ckpt", SMALL + ["mode=lora", "hardware.gradient_checkpointing=1"], 4, 1000, 80),
    ("small lora eager", SMALL + ["mode=lora", "model.attn_implementation=eager"], 2, 1000, 80),
    ("small lora attn+mlp", SMALL + ["mode=lora", "mode.target_modules=[q_proj,k_proj,v_proj,o_proj,gate_proj,"
                                     "up_proj,down_proj]"], 4, 1000, 80),
    ("small lora, encoder inputs", SMALL + ["mode=lora", *INPUTS], 2, 200, AUDIO_REF),
    ("small encoder", SMALL + ENCODER, 2, 200, AUDIO_REF),
    ("small lyric encoder", SMALL + LYRICS, 2, 200, AUDIO_REF),
    ("mid lora", MID + ["mode=lora"], 2, 3000, 769),
    ("mid full ckpt", MID + ["mode=full", "hardware.gradient_checkpointing=1"], 2, 3000, 769),
    ("mid lora, encoder inputs", MID + ["mode=lora", *INPUTS], 2, 3000, OFFICIAL),
    ("mid encoder", MID + ENCODER, 2, 3000, OFFICIAL),
]
REAL = [
    ("2B full ckpt", ["model=acestep15_turbo", "mode=full", "hardware.gradient_checkpointing=1"], 2, 3000, 769),
    ("2B lora", ["model=acestep15_turbo", "mode=lora"], 2, 3000, 769),
    ("2B lora, encoder inputs", ["model=acestep15_turbo", "mode=lora", *INPUTS], 2, 3000, OFFICIAL),
    ("2B encoder", ["model=acestep15_turbo", *ENCODER], 2, 3000, AUDIO_REF),
]


def describe(cond: Condition) -> str:
    """L, or the encoder's inputs as Lt+Ll+RxTr."""
    return str(cond) if isinstance(cond, int) else f"{cond.text}+{cond.lyric}+{cond.refs}x{cond.ref_frames}"


def config(overrides):
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return OmegaConf.to_object(compose(config_name="config", overrides=list(overrides)))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--trace", action="store_true", help="trace on the CPU even where a CUDA GPU is present")
    parser.add_argument("--real", action="store_true", help="add the real-size (2B) rows")
    args = parser.parse_args()
    register_configs()
    cuda = torch.cuda.is_available() and not args.trace
    machine = torch.cuda.get_device_name() if cuda else f"{platform.processor() or platform.machine()} CPU (trace)"
    truth = "max_memory_allocated" if cuda else "traced peak"
    print(f"machine: {machine}; torch {torch.__version__}; ground truth: {truth}")
    print(f"| config | B x T, L (or Lt+Ll+RxTr) | estimate MiB | {truth} MiB | error | estimate's peak | seconds |")
    print("|---|---|---|---|---|---|---|")
    for label, overrides, batch, frames, cond in GRID + (REAL if args.real else []):
        cfg = config(([] if cuda else ["hardware=cpu"]) + COMMON + overrides)
        est = estimate_memory(cfg, batch, frames, cond)
        started = time.perf_counter()
        peak = (measure_peak_cuda if cuda else trace_peak)(cfg, batch, frames, cond)["peak"]
        took = time.perf_counter() - started
        where = next((t.detail.split(" alive ")[-1] for t in est.terms if t.name == "gradients"), "forward")
        print(f"| {label} | {batch} x {frames}, {describe(cond)} | {est.total / 2**20:.1f} | {peak / 2**20:.1f} | "
              f"{100 * (est.total / peak - 1):+.1f}% | {where} | {took:.1f} |")


if __name__ == "__main__":
    with reported_errors():  # Ctrl-C: exit 130 without a traceback
        main()
