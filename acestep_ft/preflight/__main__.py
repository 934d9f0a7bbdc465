"""`python -m acestep_ft.preflight [hydra overrides]`: the memory estimate and verdict of a config, without training.

    python -m acestep_ft.preflight mode=full hardware=24gb model=acestep15_turbo
    python -m acestep_ft.preflight mode=full hardware=24gb model=acestep15_turbo dataset.max_frames=6000
    python -m acestep_ft.preflight hardware=a100 --world-size 8 hardware.distributed=fsdp mode=full

The overrides are the training command's (`train.py` composes the same `conf/`). Model weights are never read: a
real variant needs no `model.path` here. Synthetic data stands in for a dataset unless `dataset=preprocessed
dataset.path=...` is given (its lengths come from the index or file headers); `dataset.max_frames` sets the
longest generated clip for a what-if. Exit status: 0 = the run would start (fits, no budget to check, or
preflight.policy=warn; the table on stdout), 1 = refused (the table and the reason on stderr) or the data could not be
read, 2 = usage error (an override Hydra refuses, a required setting missing, a bad option).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from hydra import compose, initialize_config_dir
from hydra.errors import HydraException, OverrideParseException
from omegaconf.errors import OmegaConfBaseException

from acestep_ft.config import TextEncoderTraining, register_configs, to_typed
from acestep_ft.errors import ConfigError, UserError, reported_errors

CONF = Path(__file__).resolve().parents[2] / "conf"


def compose_config(overrides: list[str]):
    """The typed config of `conf/` with these overrides; ConfigError with Hydra's message when they do not compose."""
    register_configs()
    if not CONF.is_dir():
        raise ConfigError(f"config directory {CONF} not found: run from a source checkout of acestep-ft")
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        try:
            return to_typed(compose(config_name="config", overrides=overrides))
        except OverrideParseException as err:
            raise ConfigError(f"cannot parse the override {err.override}: {err}") from None
        except (HydraException, OmegaConfBaseException) as err:  # unknown key, bad value, unknown group option
            cause = f"\n{err.__cause__}" if err.__cause__ is not None else ""
            raise ConfigError(f"{err}{cause}") from None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m acestep_ft.preflight", description=__doc__.splitlines()[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("overrides", nargs="*", help="Hydra overrides, as for train.py")
    parser.add_argument("--world-size", type=int, default=1, help="processes the run will use (default 1)")
    args = parser.parse_intermixed_args(argv)  # options may stand between the overrides
    if args.world_size < 1:
        parser.error(f"--world-size {args.world_size} must be >= 1")
    with reported_errors():  # refusals (UserError) exit 1, config errors 2: the message only
        cfg = compose_config(args.overrides)
        from acestep_ft.preflight.gate import data_shape, preflight  # slow imports (peft, torch) after the usage checks

        try:
            shape = data_shape(cfg)
        except (OSError, ValueError) as err:  # DataError is a ValueError
            raise UserError(f"cannot read the dataset's lengths: {err}") from err
        inputs = shape.inputs
        encoder = ("" if inputs is None else f": the condition encoder runs on captions of {inputs.text}, lyrics of "
                   f"{inputs.lyric} tokens and {inputs.refs} reference(s) of {inputs.ref_frames} frame(s)"
                   + (", the text encoder with its LoRA on the captions' token ids"
                      if cfg.mode.text_encoder == TextEncoderTraining.lora else ""))
        print(f"model {cfg.model.variant}, mode={cfg.mode.name}, {args.world_size} process(es), data: {shape.where} "
              f"(longest clip {max(shape.lengths)} frames = {max(shape.lengths) / 25:.1f} s, condition "
              f"{shape.max_cond_len} tokens{encoder})")
        verdict = preflight(cfg, args.world_size, shape)
        print(verdict.report())
    return 0


if __name__ == "__main__":
    sys.exit(main())
