"""Which real variants fit which hardware presets, in LoRA and full mode, by the memory estimate (README table).

    python scripts/preflight_table.py                     # 240 s clips, 1,024 condition tokens
    python scripts/preflight_table.py --seconds 120 --cond 512

Every cell is the gate's verdict for the preset as shipped: the estimate (GiB, before the preflight.overhead_gb
reserve) and either "fits", the changes a rewrite makes to fit (preflight.policy=rewrite; for full mode with the
opt-in), or "no".
Needs no GPU and no weights.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from omegaconf import OmegaConf

from acestep_ft.config import register_configs
from acestep_ft.data.crop import seconds_to_frames
from acestep_ft.errors import reported_errors
from acestep_ft.preflight.gate import GIB, DataShape, config_diff, estimate_config, rewrite_candidates

CONF = Path(__file__).resolve().parents[1] / "conf"
SHORT = {"hardware.gradient_checkpointing": "ckpt", "hardware.batch_size": "batch", "train.grad_accum": "accum",
         "optim.optimizer._target_": "optim", "hardware.max_frames_per_batch": "frames", "train.ema.on_cpu": "ema_cpu"}


def compose_cfg(overrides: list[str]):
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return OmegaConf.to_object(compose(config_name="config", overrides=overrides))


def cell(overrides: list[str], shape: DataShape) -> str:
    cfg = compose_cfg(overrides)
    room = cfg.hardware.memory_gb * GIB - cfg.preflight.overhead_gb * GIB
    need = estimate_config(cfg, shape, 1).total
    if need <= room:
        return f"fits ({need / GIB:.1f})"
    for _, candidate in rewrite_candidates(cfg, shape, 1):
        total = estimate_config(candidate, shape, 1).total
        if total <= room:
            changes = ", ".join(f"{SHORT.get(k, k)}={new.rsplit('.', 1)[-1] if isinstance(new, str) else new}"
                                for k, _, new in config_diff(cfg, candidate) if k != "hardware.max_frames_per_batch")
            return f"rewrite: {changes} ({total / GIB:.1f})"
    return f"no ({need / GIB:.1f})"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=240.0, help="clip length (default 240 s)")
    parser.add_argument("--cond", type=int, default=1024, help="condition tokens (default 1024)")
    args = parser.parse_args()
    if args.seconds <= 0 or args.cond < 1:
        parser.error(f"--seconds {args.seconds:g} must be > 0 and --cond {args.cond} >= 1")
    register_configs()
    shape = DataShape([seconds_to_frames(args.seconds)] * 16, args.cond, "fixed")
    modes = {"LoRA r64": ["mode=lora"], "full AdamW": ["mode=full"], "full 8-bit": ["mode=full", "optim=adamw8bit"]}
    presets = ["24gb", "a100_40", "a100"]
    print(f"clips {args.seconds:g} s, condition {args.cond} tokens, one process, each preset as shipped "
          "(conf/hardware/); in brackets: the peak estimate in GiB, before the preflight.overhead_gb reserve\n")
    print("| variant | mode | " + " | ".join(f"hardware={p}" for p in presets) + " |")
    print("|---|---|" + "---|" * len(presets))
    for variant in ("acestep15_turbo", "acestep15_xl_turbo"):
        for name, mode in modes.items():
            cells = [cell([f"model={variant}", f"hardware={p}", *mode], shape) for p in presets]
            print(f"| {variant} | {name} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    with reported_errors():  # Ctrl-C: exit 130 without a traceback
        main()
