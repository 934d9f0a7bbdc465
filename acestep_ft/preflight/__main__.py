"""`python -m acestep_ft.preflight [hydra overrides]`: the memory estimate and verdict of a config, without training.

    python -m acestep_ft.preflight mode=full hardware=24gb model=acestep15_turbo
    python -m acestep_ft.preflight mode=full hardware=24gb model=acestep15_turbo dataset.max_frames=6000
    python -m acestep_ft.preflight hardware=a100 --world-size 8 hardware.distributed=fsdp mode=full

The overrides are the training command's (`train.py` composes the same `conf/`). Model weights are never read: a
real variant needs no `model.path` here. Synthetic data stands in for a dataset unless `dataset=preprocessed
dataset.path=...` is given (its lengths come from the index or file headers); `dataset.max_frames` sets the
longest generated clip for a what-if. Exit status: 0 = the run would start (fits, no budget to check, or
preflight.policy=warn), 1 = refused or the data could not be read, 2 = usage error.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf
from omegaconf.errors import MissingMandatoryValue

from acestep_ft.config import register_configs
from acestep_ft.preflight.gate import data_shape, preflight

CONF = Path(__file__).resolve().parents[2] / "conf"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m acestep_ft.preflight", description=__doc__.splitlines()[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("overrides", nargs="*", help="Hydra overrides, as for train.py")
    parser.add_argument("--world-size", type=int, default=1, help="processes the run will use (default 1)")
    args = parser.parse_intermixed_args(argv)  # options may stand between the overrides
    register_configs()
    if not CONF.is_dir():
        print(f"config directory {CONF} not found: run from a source checkout of acestep-ft", file=sys.stderr)
        return 2
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        try:
            cfg = OmegaConf.to_object(compose(config_name="config", overrides=args.overrides))
        except MissingMandatoryValue as err:
            print(f"Config: {err.full_key} is required; add {err.full_key}=...", file=sys.stderr)
            return 2
    try:
        shape = data_shape(cfg)
    except (OSError, ValueError) as err:
        print(f"cannot read the dataset's lengths: {err}", file=sys.stderr)
        return 1
    print(f"model {cfg.model.variant}, mode={cfg.mode.name}, {args.world_size} process(es), data: {shape.where} "
          f"(longest clip {max(shape.lengths)} frames = {max(shape.lengths) / 25:.1f} s, condition "
          f"{shape.max_cond_len} tokens)")
    try:
        verdict = preflight(cfg, args.world_size, shape)
    except SystemExit as refused:
        print(refused.code)
        return 1
    print(verdict.report())
    return 0


if __name__ == "__main__":
    sys.exit(main())
