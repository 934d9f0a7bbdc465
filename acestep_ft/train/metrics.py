"""Where metrics go: metrics.jsonl in the run directory always, plus wandb or tensorboard when configured.

Metric names are prefixed by family: `train/` (loss, lr, grad norm), `perf/` (step time, samples/s),
`mem/` (peak memory), `data/` (input pipeline), `val/` (validation). Only the main process logs.

`run_numbers` reduces a metrics.jsonl to the few numbers a sweep table and tensorboard's HParams view compare
(acestep_ft/sweep.py builds the table); `plot_loss` draws loss_curve.png.
"""

from __future__ import annotations

import json
import math
import os
from enum import Enum
from pathlib import Path
from typing import Any, Callable, Dict, List, Mapping, Optional

from acestep_ft.atomic import atomic_write_bytes
from acestep_ft.config import LoggerConfig

METRICS_FILE = "metrics.jsonl"
LAST_STEPS = 10  # the final train loss of a run is the mean of its last LAST_STEPS logged losses (one is noise)
# run_numbers key -> the tensorboard tag its value is written under at close (shown in the HParams view)
HPARAM_METRICS = {"train_loss": "hparams/train_loss_last10", "best_val_loss": "hparams/best_val_loss",
                  "final_val_loss": "hparams/final_val_loss"}


class MetricsSink:
    """Append-only metrics for one run; a run first drops the lines past the step it starts from (all of them for a
    fresh start, whose directory may hold the metrics of an earlier run that never saved a checkpoint).

    `config` (the resolved config as a nested dict) goes to wandb as the run's config and to tensorboard as HParams
    (flattened, "optim.lr"; the group `choices` as "choice.mode"), whose metric columns (HPARAM_METRICS: final train
    loss, best / final validation loss) are written at close."""

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
        self._tb_hparams: tuple = ()  # tensorboard: the HParams (experiment, session start, session end) summaries
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
                self._tb_hparams = write_hparams_start(self._tb, config, choices)
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

    def log_audio(self, step: int, name: str, audio: Any, rate: int, caption: Optional[str] = None) -> None:
        """A [samples, channels] float waveform to wandb / tensorboard, with its caption (metrics.jsonl holds numbers
        only)."""
        if not self.enabled:
            return
        if self._wandb is not None:
            import wandb

            self._wandb.log({name: wandb.Audio(audio, sample_rate=rate, caption=caption)}, step=step)
        if self._tb is not None:
            import torch

            self._tb.add_audio(name, torch.as_tensor(audio).mean(-1), step, sample_rate=rate)  # mono: tensorboard
            if caption:
                self._tb.add_text(name, caption, step)

    def close(self) -> None:
        if self._wandb is not None:
            self._wandb.finish()
        if self._tb is not None:
            # the HParams view's metric columns: this run's final numbers, read back from metrics.jsonl (which holds
            # the whole run, also when it was resumed)
            records = read_metrics(self.path)
            numbers = run_numbers(records)
            step = records[-1]["step"] if records else 0
            for key, tag in HPARAM_METRICS.items():
                if numbers.get(key) is not None:
                    self._tb.add_scalar(tag, numbers[key], step)
            self._tb.file_writer.add_summary(self._tb_hparams[2], step)  # session end
            self._tb.close()


def flat_hparams(config: Mapping, prefix: str = "") -> Dict[str, Any]:
    """The nested resolved config as tensorboard hparams: dotted keys ("optim.lr"), values that the HParams plugin
    takes (numbers, strings, bools); None, enums, paths and lists become their text."""
    flat: Dict[str, Any] = {}
    for key, value in config.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping) and value:
            flat.update(flat_hparams(value, name + "."))
        elif isinstance(value, Enum):
            flat[name] = value.name
        elif isinstance(value, (bool, int, float, str)):
            flat[name] = value
        else:
            flat[name] = json.dumps(value, default=str) if isinstance(value, (list, tuple, dict)) else str(value)
    return flat


def write_hparams_start(writer: Any, config: Mapping, choices: Mapping[str, str]) -> tuple:
    """The resolved config (and the Hydra group choices, as "choice.mode": "lora") as the HParams plugin's
    experiment and session start, in the run's own tensorboard directory (SummaryWriter.add_hparams would open a
    new subdirectory per call); returns the (experiment, start, end) summaries, the end one written at close after
    the metric values."""
    from torch.utils.tensorboard.summary import hparams

    values = {**{f"choice.{group}": str(choice) for group, choice in sorted(choices.items())}, **flat_hparams(config)}
    summaries = hparams(values, {tag: 0.0 for tag in HPARAM_METRICS.values()})
    writer.file_writer.add_summary(summaries[0])
    writer.file_writer.add_summary(summaries[1])
    return summaries


def run_numbers(records: List[Dict]) -> Dict[str, Any]:
    """The numbers a sweep compares, from a run's metrics records (None where the run did not log them):

    train_loss      mean of the last LAST_STEPS logged `train/loss` values
    best_val_loss   lowest `val/loss` (or `val/best`, which a resumed run carries over); final_val_loss: the last
    steps           last logged step
    steps_per_s     optimizer steps per second of training: 1 / mean `perf/step_time_s` over the logged steps, the
                    first left out (start-up); validation, checkpoints and loading are not included
    peak_mem_gib    highest `mem/peak_alloc_gb` (CUDA: torch.cuda.max_memory_allocated, tensors only, without the
                    CUDA context and the allocator's cache) or, without it, `mem/host_peak_rss_gb` (CPU: peak resident
                    set of the process, everything it holds); peak_mem_of says which ("cuda alloc" / "host rss")
    """
    def finite(key: str) -> List[float]:
        return [float(r[key]) for r in records if isinstance(r.get(key), (int, float)) and math.isfinite(r[key])]

    train = finite("train/loss")
    val = finite("val/loss")
    best = finite("val/best") + val
    times = finite("perf/step_time_s")
    times = times[1:] if len(times) > 2 else times
    cuda, host = finite("mem/peak_alloc_gb"), finite("mem/host_peak_rss_gb")
    return {
        "train_loss": sum(train[-LAST_STEPS:]) / len(train[-LAST_STEPS:]) if train else None,
        "best_val_loss": min(best) if best else None,
        "final_val_loss": val[-1] if val else None,
        "steps": records[-1]["step"] if records else None,
        "steps_per_s": len(times) / sum(times) if times and sum(times) > 0 else None,
        "peak_mem_gib": max(cuda) if cuda else max(host) if host else None,
        "peak_mem_of": "cuda alloc" if cuda else "host rss" if host else None,
    }


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


def plot_loss(path: Path, out_png: Path) -> Any:
    """loss_curve.png: per-step loss and its running mean, the validation loss where the run logged one (same axis),
    and below it the learning rate (per parameter group when there are several). Returns the matplotlib Figure
    (closed; None when there is nothing to plot)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = read_metrics(path)
    train = [r for r in records if "train/loss" in r]
    val = [r for r in records if "val/loss" in r]
    if not train and not val:
        return None
    group_lrs = sorted({k for r in records for k in r if k.startswith("train/lr/")})
    lr_keys = group_lrs or (["train/lr"] if any("train/lr" in r for r in records) else [])
    if lr_keys:
        fig, (ax, lr_ax) = plt.subplots(2, 1, figsize=(7, 5.5), sharex=True, height_ratios=(3, 1))
    else:
        fig, ax = plt.subplots(figsize=(7, 4))
        lr_ax = None
    if train:
        steps = [r["step"] for r in train]
        losses = [r["train/loss"] for r in train]
        window = max(1, len(losses) // 20)
        smooth = [sum(losses[max(0, i - window + 1): i + 1]) / len(losses[max(0, i - window + 1): i + 1])
                  for i in range(len(losses))]
        ax.plot(steps, losses, alpha=0.35, label="train loss")
        ax.plot(steps, smooth, label=f"train running mean ({window})")
    if val:
        ax.plot([r["step"] for r in val], [r["val/loss"] for r in val], "o-", markersize=4, label="validation loss")
    ax.set_ylabel("flow-matching MSE")
    ax.legend()
    ax.grid(alpha=0.3)
    if lr_ax is not None:
        for key in lr_keys:
            points = [(r["step"], r[key]) for r in records if key in r]
            lr_ax.plot([s for s, _ in points], [v for _, v in points],
                       label=key.removeprefix("train/lr/") if group_lrs else "lr")
        lr_ax.set_ylabel("learning rate")
        lr_ax.ticklabel_format(axis="y", style="sci", scilimits=(-2, 3))
        lr_ax.grid(alpha=0.3)
        if group_lrs:
            lr_ax.legend(fontsize="small")
    (lr_ax or ax).set_xlabel("optimizer step")
    fig.tight_layout()
    fig.savefig(out_png, dpi=110)
    plt.close(fig)
    return fig
