"""Train ACE-Step 1.5 with acestep-ft.

    python train.py                                   # tiny model, generated data, CPU: a real short run
    python train.py model=acestep15_turbo model.path=/ckpt/acestep-v15-turbo dataset=preprocessed dataset.path=/data hardware=a100
    python train.py -m optim.lr=1e-4,3e-4             # a grid, one directory per job; summary.csv / summary.md
    python train.py -cd experiments -cn lora_rank_lr_grid -m

Exit status: 0 done, 1 refused or failed, 2 usage / config error, 128+N stopped by signal N after saving a checkpoint.
"""

import sys

import hydra
from omegaconf import OmegaConf

from acestep_ft.config import register_configs, to_typed

register_configs()
started = False  # whether Hydra composed the config and called main (else its SystemExit(1) is a usage error)
failed_jobs = []  # (job number, exit status) of the jobs of an in-process multirun that stopped on a user error


@hydra.main(version_base="1.3", config_path="conf", config_name="config")
def main(cfg) -> None:
    global started
    started = True
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    from acestep_ft.errors import UserError, reported_errors
    from acestep_ft.launch import from_hydra
    from acestep_ft.run import train
    from acestep_ft.sweep import job_outcome
    from acestep_ft.train.lifecycle import PipeSafe, stop_status

    if not isinstance(sys.stdout, PipeSafe):  # a closed pipe must not stop a save (multirun: wrap once)
        sys.stdout, sys.stderr = PipeSafe(sys.stdout), PipeSafe(sys.stderr)
    hydra_cfg = HydraConfig.get()
    sweep = hydra_cfg.mode == RunMode.MULTIRUN
    outcome = job_outcome(hydra_cfg, enabled=sweep)  # a sweep job: <job>/result.json, the sweep's summary.csv / .md
    try:
        with outcome, reported_errors(keep_going=sweep):  # a sweep job prints its message; the other jobs still run
            typed = to_typed(cfg)
            result = train(typed, hydra_cfg.runtime.output_dir, from_hydra(cfg, hydra_cfg))
            if result.stopped_by is not None:
                raise SystemExit(stop_status(result.stopped_by))
    except UserError as err:
        if "BasicLauncher" not in str(OmegaConf.select(hydra_cfg, "launcher._target_", default="")):
            raise  # another process's launcher (submitit) records the failure itself
        failed_jobs.append((hydra_cfg.job.num, err.exit_code))


if __name__ == "__main__":
    try:
        main()
    except SystemExit as exit_:
        raise SystemExit(2 if exit_.code == 1 and not started else exit_.code) from None
    if failed_jobs:
        print(f"{len(failed_jobs)} job(s) of the sweep failed (their messages are above): "
              + ", ".join(f"#{num}" for num, _ in failed_jobs), file=sys.stderr)
        raise SystemExit(max(status for _, status in failed_jobs))
