"""Where metrics go: metrics.jsonl in the run directory always, plus wandb or tensorboard when configured.

Metric names are prefixed by family: `train/` (loss, lr, grad norm), `perf/` (step time, samples/s),
`mem/` (peak memory), `data/` (input pipeline). Only the main process logs.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Callable, Dict, List, Mapping, Optional

from acestep_ft.atomic import atomic_write_bytes
from acestep_ft.config import LoggerConfig

METRICS_FILE = "metrics.jsonl"


class MetricsSink:
    """Append-only metrics for one run; a run first drops the lines past the step it starts from (all of them for a
    fresh start, whose directory may hold the metrics of an earlier run that never saved a checkpoint)."""

    def __init__(
        self,
        run_dir: Path,
        cfg: LoggerConfig,
        choices: Mapping[str, str],
        config: Dict,
        start_step: int = 0,
        enabled: bool = True,
    ):
        self.enabled = enabled
        self.path = Path(run_dir) / METRICS_FILE
        self._wandb = None
        self._tb = None
        if not enabled:
            return
        if self.path.exists():
            truncate_after(self.path, start_step)
        match cfg.backend:
            case "wandb":
                import wandb

                group, tags = wandb_group_and_tags(choices, cfg.tags)
                self._wandb = wandb.init(
                    project=cfg.project,
                    entity=cfg.entity,
                    group=group,
                    tags=tags,
                    config=config,
                    dir=str(run_dir),
                    name=Path(run_dir).name,
                    resume="allow",
                    id=wandb_run_id(Path(run_dir)),
                )
            case "tensorboard":
                from torch.utils.tensorboard import SummaryWriter

                self._tb = SummaryWriter(log_dir=str(Path(run_dir) / "tensorboard"))
            case "none":
                pass

    def log(self, step: int, metrics: Dict[str, float]) -> None:
        if not self.enabled:
            return
        with self.path.open("a") as f:
            f.write(json.dumps({"step": step, **metrics}) + "\n")
        if self._wandb is not None:
            self._wandb.log(metrics, step=step)
        if self._tb is not None:
            for name, value in metrics.items():
                self._tb.add_scalar(name, value, step)

    def log_audio(self, step: int, name: str, audio: Any, rate: int) -> None:
        """A [samples, channels] float waveform to wandb / tensorboard (metrics.jsonl holds numbers only)."""
        if not self.enabled:
            return
        if self._wandb is not None:
            import wandb

            self._wandb.log({name: wandb.Audio(audio, sample_rate=rate)}, step=step)
        if self._tb is not None:
            import torch

            self._tb.add_audio(name, torch.as_tensor(audio).mean(-1), step, sample_rate=rate)  # mono: tensorboard

    def close(self) -> None:
        if self._wandb is not None:
            self._wandb.finish()
        if self._tb is not None:
            self._tb.close()


def wandb_group_and_tags(choices: Mapping[str, str], extra_tags: List[str]) -> tuple[Optional[str], List[str]]:
    """wandb group from the model and mode choices ("model=tiny,mode=lora"); one tag per Hydra group choice."""
    group = ",".join(f"{g}={choices[g]}" for g in ("model", "mode") if g in choices)
    tags = [f"{g}={c}" for g, c in sorted(choices.items())] + list(extra_tags)
    return group or None, tags


def wandb_run_id(run_dir: Path) -> str:
    """A stable wandb id per run directory, so a resumed run continues the same wandb run."""
    id_file = run_dir / ".wandb_id"
    if not id_file.exists():
        id_file.write_text(os.urandom(6).hex())
    return id_file.read_text().strip()


def read_metrics(path: Path, say: Optional[Callable[[str], None]] = None) -> List[Dict]:
    """The records of a metrics.jsonl. Lines that are not JSON objects (a last line torn by a kill mid-write) are
    dropped and, with `say`, reported."""
    if not Path(path).exists():
        return []
    records, bad = [], []
    for number, line in enumerate(Path(path).read_text(errors="replace").splitlines(), start=1):
        try:
            record = json.loads(line) if line.strip() else None
        except ValueError:
            record = "torn"
        if isinstance(record, dict) and isinstance(record.get("step"), int):
            records.append(record)
        elif record is not None:
            bad.append(number)
    if bad and say is not None:
        say(f"{path}: dropped {len(bad)} unreadable line(s) ({', '.join(map(str, bad[:5]))}): a write cut short by "
            "a kill")
    return records


def truncate_after(path: Path, step: int) -> None:
    """Keep only records with step <= `step` (a resumed run rewrites what came after; a fresh start, step 0, keeps
    nothing), saying what was dropped."""
    def say(message: str) -> None:
        print(message, flush=True)

    records = read_metrics(path, say)
    kept = [r for r in records if r["step"] <= step]
    if step == 0 and records:
        say(f"{path}: replacing the {len(records)} record(s) of an earlier start that saved no checkpoint")
    atomic_write_bytes(path, "".join(json.dumps(r) + "\n" for r in kept).encode())


def plot_loss(path: Path, out_png: Path) -> None:
    """loss_curve.png: per-step loss and its running mean."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = [r for r in read_metrics(path) if "train/loss" in r]
    if not records:
        return
    steps = [r["step"] for r in records]
    losses = [r["train/loss"] for r in records]
    window = max(1, len(losses) // 20)
    smooth = [sum(losses[max(0, i - window + 1): i + 1]) / len(losses[max(0, i - window + 1): i + 1])
              for i in range(len(losses))]
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot(steps, losses, alpha=0.35, label="loss")
    ax.plot(steps, smooth, label=f"running mean ({window})")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("flow-matching MSE")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(out_png, dpi=110)
    plt.close(fig)
