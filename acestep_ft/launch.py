"""How a run was launched, read from Hydra by train.py: the group choices (logger tags), the `.hydra/` record of the
run (written only once the run is accepted, so a refused start leaves an earlier run's record untouched), the command
that continues the run, and whether the launcher requeues jobs into the same directory (submitit on SLURM).
"""

from __future__ import annotations

import shlex
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Mapping

from omegaconf import OmegaConf

from acestep_ft.atomic import atomic_write_bytes

RECORD_DIR = ".hydra"
# overrides that the continue command sets itself
_REPLACED = ("train.resume=", "train.overwrite=")


@dataclass
class Launch:
    """What `acestep_ft.run.train` needs to know about how it was started (defaults: a plain call from Python)."""

    choices: Mapping[str, str] = field(default_factory=dict)  # Hydra group choices: model=..., mode=...
    record: Dict[str, str] = field(default_factory=dict)      # file name -> text, written into <run>/.hydra/
    command: List[str] = field(default_factory=lambda: ["python", "train.py"])  # the run's command line, without
    # train.resume / train.overwrite / hydra.run.dir
    requeues: bool = False  # the launcher requeues preempted jobs into the same run directory

    def continue_command(self, run_dir: Path) -> str:
        """The command line that continues this run from its newest checkpoint (the run directory quoted for Hydra,
        then every word for the shell: sweep job directories hold '=' and ',')."""
        quoted = str(run_dir).replace("\\", "\\\\").replace("'", "\\'")
        words = self.command + ["train.resume=auto", f"hydra.run.dir='{quoted}'"]
        return " ".join(shlex.quote(str(word)) for word in words)


def from_hydra(cfg: Any, hydra_cfg: Any) -> Launch:
    """Launch of the Hydra job running now (`cfg` = the composed task config, `hydra_cfg` = HydraConfig.get())."""
    choices = {k: v for k, v in hydra_cfg.runtime.choices.items() if not k.startswith("hydra") and v is not None}
    task = [o for o in hydra_cfg.overrides.task if not o.startswith(_REPLACED)]
    config_args = []  # -cd / -cn of a saved experiment, taken from the command line as given
    argv = sys.argv[1:]
    for i, arg in enumerate(argv):
        if arg in ("-cd", "--config-dir", "-cn", "--config-name", "-cp", "--config-path") and i + 1 < len(argv):
            config_args += [arg, argv[i + 1]]
        elif arg.startswith(("--config-dir=", "--config-name=", "--config-path=")):
            config_args.append(arg)
    record = {
        "config.yaml": OmegaConf.to_yaml(cfg),
        "hydra.yaml": OmegaConf.to_yaml(OmegaConf.create({"hydra": hydra_cfg})),
        "overrides.yaml": OmegaConf.to_yaml(OmegaConf.create(list(hydra_cfg.overrides.task))),
    }
    target = str(OmegaConf.select(hydra_cfg, "launcher._target_", default=""))
    script = sys.argv[0] if Path(sys.argv[0]).name == "train.py" else "train.py"  # not a launcher's own script
    return Launch(choices=choices, record=record, command=["python", script, *config_args, *task],
                  requeues="submitit" in target and "Slurm" in target)


def write_record(run_dir: Path, record: Mapping[str, str]) -> None:
    """<run>/.hydra/: the composed config, Hydra's config and the overrides of this start (as Hydra writes them)."""
    if not record:
        return
    folder = Path(run_dir) / RECORD_DIR
    folder.mkdir(parents=True, exist_ok=True)
    for name, text in record.items():
        atomic_write_bytes(folder / name, text.encode())

