"""Train ACE-Step 1.5 with acestep-ft.

    python train.py                                   # tiny model, generated data, CPU: a real 2-minute run
    python train.py model=acestep15_turbo model.path=/ckpt/acestep-v15-turbo dataset=pt dataset.path=/data hardware=a100
    python train.py -m optim.lr=1e-4,3e-4             # a grid, one directory per job
    python train.py -cd experiments -cn lora_rank_lr_grid -m
"""

import hydra
from omegaconf import OmegaConf

from acestep_ft.config import register_configs

register_configs()


@hydra.main(version_base="1.3", config_path="conf", config_name="config")
def main(cfg) -> None:
    from hydra.core.hydra_config import HydraConfig

    from acestep_ft.run import train

    runtime = HydraConfig.get().runtime
    cfg.run_dir = runtime.output_dir
    cfg.choices = {k: v for k, v in runtime.choices.items() if not k.startswith("hydra") and v is not None}
    train(OmegaConf.to_object(cfg))


if __name__ == "__main__":
    main()
