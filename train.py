"""Train ACE-Step 1.5 with acestep-ft.

    python train.py                                   # tiny model, generated data, CPU: a real short run
    python train.py model=acestep15_turbo model.path=/ckpt/acestep-v15-turbo dataset=preprocessed dataset.path=/data hardware=a100
    python train.py -m optim.lr=1e-4,3e-4             # a grid, one directory per job
    python train.py -cd experiments -cn lora_rank_lr_grid -m
"""

import hydra
from omegaconf import OmegaConf
from omegaconf.errors import MissingMandatoryValue

from acestep_ft.config import register_configs

register_configs()


@hydra.main(version_base="1.3", config_path="conf", config_name="config")
def main(cfg) -> None:
    from hydra.core.hydra_config import HydraConfig

    from acestep_ft.run import train

    runtime = HydraConfig.get().runtime
    choices = {k: v for k, v in runtime.choices.items() if not k.startswith("hydra") and v is not None}
    try:
        typed = OmegaConf.to_object(cfg)
    except MissingMandatoryValue as err:
        raise SystemExit(f"Config: {err.full_key} is required; add {err.full_key}=... to the command line.") from None
    train(typed, runtime.output_dir, choices)


if __name__ == "__main__":
    main()
