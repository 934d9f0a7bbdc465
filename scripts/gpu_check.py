"""GPU acceptance check: the gpu-marked tests, then short real-size training runs measured against the memory preflight.

    bash scripts/gpu_check.sh [--out FILE.json]          # on a CUDA machine, within ~8 minutes
    bash scripts/gpu_check.sh --cpu-dry-run --out x.json  # the same rows with the tiny model on the CPU

Rows, in order (each one skipped with a note once the time budget cannot hold it):
  pytest_gpu         `pytest -m gpu tests/test_gpu.py tests/test_preflight_gpu.py` in a subprocess
  checkpoint         a random 2B turbo checkpoint in the official layout (acestep_ft/model/random_checkpoint.py)
  lora_{10,60,240}s  LoRA (the default mode and optimizer) on synthetic clips of 10 s, 60 s, 240 s
  full_{10,60,240}s  full fine-tuning with 8-bit AdamW and gradient checkpointing 1
  lora_60s_prefetch_off, lora_60s_flex, lora_60s_compile: one knob changed against lora_60s (the baseline):
                     hardware.device_prefetch=false, model.attn_implementation=flex, hardware.compile=true (with
                     hardware.length_multiple = the clip length)

Each training row is one in-process call of `acestep_ft.run.train` (what train.py runs, minus Hydra's command line),
so the 2B checkpoint is read from the page cache and Python starts once. Its output goes to <work>/logs/<row>.log.
The first `warmup` steps (compilation, allocator growth) are left out of the timings. Numbers per row:
  step_time_s, samples_per_s, frames_per_s, stall_frac   means of perf/* and data/stall_frac over the timed steps
  peak_gib        CUDA: max of mem/peak_alloc_gb (torch.cuda.max_memory_allocated, reset before the row);
                  CPU: mem/host_peak_rss_gb (the process's peak RSS, reset before the row)
  estimate_gib    the memory preflight's estimate of the same config (`preflight(cfg, 1).estimate.total`)
  estimate_error_pct  100 * (estimate / peak - 1), CUDA only (the CPU has no allocator peak to compare with)
  load_s          from the preflight verdict to the model line of the run's output (checkpoint read + placement)
  save_s          from the last progress-bar update to the "checkpoint:" line (the final checkpoint; full: the
                  whole model in float32 + the optimizer state)
  losses          every step's train/loss (all finite, or the row fails)
A row is "ok", "failed" (with the error and the end of its log) or "skipped" (with the reason). The JSON
(--out) holds every row and is rewritten after each one, so a run cut short still leaves what it measured; the
Markdown table goes to stdout at the end. Exit status: 0 no row failed, 1 a row failed, 2 usage, 124 stopped by a
signal (the table of what finished is printed).
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import io
import json
import math
import os
import platform
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, TextIO

ROOT = Path(__file__).resolve().parents[1]
FRAMES_PER_SECOND = 25
PYTEST_FILES = ["tests/test_gpu.py", "tests/test_preflight_gpu.py"]
BASELINE = "lora_60s"


@dataclass
class Profile:
    """What differs between the CUDA check and its CPU dry run."""

    name: str
    model: List[str]             # model overrides (the checkpoint path is added)
    variant: str                 # random_checkpoint variant for the checkpoint row
    hardware: List[str]
    frames: Dict[int, int]       # clip seconds -> latent frames
    batch_size: int
    condition_length: int        # encoder_hidden_states length; 769 = the official trainer's padding
    warmup: int                  # leading steps left out of the timings
    timed: int                   # steps timed
    compile_warmup: int          # leading steps left out when hardware.compile=true
    cost_s: Dict[str, float]     # rough wall seconds per row kind, for the budget
    draw_device: str             # where the checkpoint's random values are drawn


CUDA = Profile(
    name="cuda", model=["model=acestep15_turbo"], variant="turbo",
    hardware=["hardware=auto", "hardware.device=cuda", "hardware.mixed_precision=bf16"],
    frames={s: s * FRAMES_PER_SECOND for s in (10, 60, 240)}, batch_size=4, condition_length=769,
    warmup=2, timed=4, compile_warmup=2,
    cost_s={"pytest": 150, "checkpoint": 40, "lora": 25, "full": 45, "flex": 50, "compile": 110},
    draw_device="cuda",
)
CPU_DRY_RUN = Profile(
    name="cpu-dry-run", model=["model=tiny"], variant="tiny", hardware=["hardware=cpu"],
    frames={10: 25, 60: 50, 240: 100}, batch_size=2, condition_length=12, warmup=1, timed=2, compile_warmup=1,
    cost_s={"pytest": 60, "checkpoint": 5, "lora": 10, "full": 10, "flex": 15, "compile": 120},
    draw_device="cpu",
)


@dataclass
class Row:
    """One line of the table: a spec, then what happened."""

    slug: str
    kind: str                    # pytest | checkpoint | lora | full | flex | compile (the budget class)
    title: str
    overrides: List[str] = field(default_factory=list)
    frames: Optional[int] = None
    seconds: Optional[int] = None
    warmup: int = 0
    needs_cuda: str = ""         # why the row means nothing without CUDA ("" = runs anywhere)
    compare: str = ""            # what the row changes against the baseline
    result: Dict[str, Any] = field(default_factory=dict)

    def record(self) -> Dict[str, Any]:
        return {"slug": self.slug, "title": self.title, "kind": self.kind, "overrides": self.overrides,
                "frames": self.frames, "seconds": self.seconds, "compare": self.compare, **self.result}


def train_rows(p: Profile) -> List[Row]:
    """The training rows of a profile, in the order they run (cheapest and most important first)."""
    common = [*p.hardware, "dataset=synthetic", f"dataset.condition_length={p.condition_length}",
              f"hardware.batch_size={p.batch_size}", "hardware.max_frames_per_batch=0", "train.plot=false",
              "train.save_every=100000", "train.keep_last=1", "train.export_comfyui=false", "logger=none"]
    full = ["mode=full", "mode.i_understand_vram_risk=true", "optim=adamw8bit", "hardware.gradient_checkpointing=1"]

    def row(slug: str, kind: str, title: str, seconds: int, extra: List[str], warmup: int, **kw: Any) -> Row:
        frames = p.frames[seconds]
        n = warmup + p.timed
        # stop_at_step = the last step: the run saves its checkpoint there but, paused before max_steps, writes no
        # export (a full 2B export is another 3 GB to write)
        data = [f"dataset.min_frames={frames}", f"dataset.max_frames={frames}",
                f"dataset.num_samples={p.batch_size * n}", f"train.max_steps={n + 1}", f"train.stop_at_step={n}"]
        return Row(slug, kind, title, [*common, *data, *extra], frames, seconds, warmup, **kw)

    rows = [row(f"lora_{s}s", "lora", f"LoRA {s} s", s, ["mode=lora"], p.warmup) for s in p.frames]
    rows += [row(f"full_{s}s", "full", f"full 8-bit AdamW GC1 {s} s", s, full, p.warmup) for s in p.frames]
    rows += [
        row("lora_60s_prefetch_off", "lora", "LoRA 60 s, device prefetch off", 60,
            ["mode=lora", "hardware.device_prefetch=false"], p.warmup, compare="hardware.device_prefetch=false",
            needs_cuda="hardware.device_prefetch copies batches to a CUDA device on a side stream; on the CPU "
                       "batches are prepared between steps with it on or off"),
        row("lora_60s_flex", "flex", "LoRA 60 s, flex attention", 60,
            ["mode=lora", "model.attn_implementation=flex"], p.warmup, compare="model.attn_implementation=flex",
            needs_cuda="torch has no FlexAttention backward pass on the CPU (the run refuses "
                       "model.attn_implementation=flex there)"),
        row("lora_60s_compile", "compile", "LoRA 60 s, compiled layers", 60,
            ["mode=lora", "hardware.compile=true", f"hardware.length_multiple={p.frames[60]}"], p.compile_warmup,
            compare="hardware.compile=true"),
    ]
    return rows


class StampedLog(io.TextIOBase):
    """A text stream that writes each line to `file` with the seconds since `start` and keeps (seconds, line), so
    the time between two lines of a run's output can be read afterwards."""

    def __init__(self, file: TextIO, start: float):
        self.file, self.start, self.lines, self._open = file, start, [], ""

    def write(self, text: str) -> int:
        for part in re.split(r"(?<=[\n\r])", text):
            if not part:
                continue
            if not self._open:
                self._open_at = time.perf_counter() - self.start
            self._open += part
            if part[-1] in "\n\r":
                line = self._open.rstrip("\r\n")
                if line.strip():
                    self.lines.append((self._open_at, line))
                    self.file.write(f"[{self._open_at:8.2f}] {line}\n")
                self._open = ""
        return len(text)

    def flush(self) -> None:
        self.file.flush()

    def first(self, pattern: str) -> Optional[float]:
        return next((t for t, line in self.lines if re.search(pattern, line)), None)

    def save_seconds(self) -> Optional[float]:
        """From the progress bar's last update to the first "checkpoint:" line: the final save (None if absent)."""
        saved = next((i for i, (_, line) in enumerate(self.lines) if line.startswith("checkpoint:")), None)
        bars = [t for t, line in self.lines[:saved or 0] if line.startswith("train:")]
        return round(self.lines[saved][0] - bars[-1], 2) if saved is not None and bars else None


class Interrupted(Exception):
    """SIGTERM / SIGINT arrived (e.g. the wrapper's time limit): finish the table with what was measured."""


def _interrupt(signum: int, frame: Any) -> None:
    raise Interrupted(f"stopped by {signal.Signals(signum).name}")


def finite_mean(values: List[float]) -> Optional[float]:
    values = [float(v) for v in values if isinstance(v, (int, float)) and math.isfinite(v)]
    return sum(values) / len(values) if values else None


def measured(records: List[Dict], warmup: int) -> Dict[str, Any]:
    """Row numbers from a run's metrics.jsonl records (see the module docstring)."""
    timed = [r for r in records if r.get("step", 0) > warmup]
    cuda = [r["mem/peak_alloc_gb"] for r in records if "mem/peak_alloc_gb" in r]
    host = [r["mem/host_peak_rss_gb"] for r in records if "mem/host_peak_rss_gb" in r]
    return {
        "losses": [r.get("train/loss") for r in records],
        "steps_timed": len(timed),
        "step_time_s": finite_mean([r.get("perf/step_time_s") for r in timed]),
        "samples_per_s": finite_mean([r.get("perf/samples_per_s") for r in timed]),
        "frames_per_s": finite_mean([r.get("perf/frames_per_s") for r in timed]),
        "stall_frac": finite_mean([r.get("data/stall_frac") for r in timed]),
        "first_step_s": records[0].get("perf/step_time_s") if records else None,
        "peak_gib": max(cuda) if cuda else max(host) if host else None,
        "peak_of": "cuda max_memory_allocated" if cuda else "host peak rss" if host else None,
    }


class Check:
    """Runs the rows within the deadline, keeps the results, writes the JSON after each row."""

    def __init__(self, profile: Profile, args: argparse.Namespace, say: Callable[[str], None]):
        self.p, self.args, self.say = profile, args, say
        self.deadline = args.deadline or (time.time() + args.budget_s if args.budget_s else math.inf)
        self.started = time.time()
        self.work = Path(args.work_dir or tempfile.mkdtemp(prefix="gpu_check-"))
        (self.work / "logs").mkdir(parents=True, exist_ok=True)
        self.rows: List[Row] = []
        self.checkpoint: Optional[Path] = Path(args.checkpoint) if args.checkpoint else None
        self.header: Dict[str, Any] = {}

    # -- bookkeeping -------------------------------------------------------------------------------------------
    def left(self) -> float:
        return self.deadline - time.time()

    def document(self) -> Dict[str, Any]:
        return {**self.header, "elapsed_s": round(time.time() - self.started, 1),
                "rows": [r.record() for r in self.rows]}

    def save(self) -> None:
        out = Path(self.args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = out.with_name(f".{out.name}.tmp")
        tmp.write_text(json.dumps(self.document(), indent=1, default=str) + "\n")
        os.replace(tmp, out)

    def skip_reason(self, row: Row) -> Optional[str]:
        """Why `row` does not run (not asked for, needs CUDA, out of time), or None."""
        cost = self.p.cost_s[row.kind]
        if self.args.only and row.slug not in self.args.only:
            return "not in --only"
        if row.needs_cuda and self.p.name != "cuda":
            return f"needs a CUDA GPU: {row.needs_cuda}"
        if self.left() < cost:
            return (f"time budget: {max(0.0, self.left()):.0f} s left, the row needs ~{cost:.0f} s (raise --budget-s "
                    "or pick rows with --only)")
        return None

    def run_row(self, row: Row, body: Callable[[Row], Dict[str, Any]], position: Optional[int] = None) -> None:
        """Skip, run or fail one row; print progress lines; save the JSON. `position`: the row is in the table
        already (started earlier, finished now)."""
        if position is None:
            self.rows.append(row)
        index = f"[{position or len(self.rows)}/{self.planned}]"
        reason = self.skip_reason(row) if position is None else None
        if reason is not None:
            row.result = {"status": "skipped", "reason": reason}
        else:
            budget = f"{self.left():.0f} s of budget left" if math.isfinite(self.left()) else "no time budget"
            self.say(f"{index} {row.title}: {'running' if position is None else 'waiting for it'} ({budget})")
            started = time.perf_counter()
            try:
                row.result = {"status": "ok", **body(row)}
            except Interrupted as err:
                row.result = {"status": "failed", "error": str(err)}
                raise
            except Exception as err:  # noqa: BLE001 - any failure of a row is a result, the check goes on
                row.result = {"status": "failed", "error": f"{type(err).__name__}: {err}"[:2000]}
                log = self.work / "logs" / f"{row.slug}.log"
                if log.exists():
                    row.result["log_tail"] = "\n".join(log.read_text().splitlines()[-15:])
                    row.result["log"] = str(log)
            row.result.setdefault("wall_s", round(time.perf_counter() - started, 2))
        self.say(f"{index} {row.title}: {summary(row)}")
        self.save()

    # -- rows ------------------------------------------------------------------------------------------------
    def start_pytest(self, row: Row) -> Optional[subprocess.Popen]:
        """Start the gpu-marked tests in the background (they overlap the checkpoint write, which is mostly disk),
        or None when the row is skipped (then it is recorded now)."""
        self.rows.append(row)
        reason = self.skip_reason(row)
        if reason is not None:
            row.result = {"status": "skipped", "reason": reason}
            self.say(f"[1/{self.planned}] {row.title}: {summary(row)}")
            return None
        cmd = [sys.executable, "-m", "pytest", "-q", "-m", "gpu", "-p", "no:cacheprovider", *PYTEST_FILES]
        row.result = {"command": " ".join(cmd[1:])}
        self._pytest_started = time.perf_counter()
        self.say(f"[1/{self.planned}] {row.title}: started in the background")
        with (self.work / "logs" / f"{row.slug}.log").open("w") as log:  # the child keeps its own descriptor
            return subprocess.Popen(cmd, cwd=ROOT, env={**os.environ, "WANDB_MODE": "offline"}, stdout=log,
                                    stderr=subprocess.STDOUT, text=True)

    def finish_pytest(self, row: Row, proc: subprocess.Popen) -> Dict[str, Any]:
        limit = self.p.cost_s["pytest"]
        try:
            proc.wait(timeout=max(1.0, limit - (time.perf_counter() - self._pytest_started)))
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
            raise RuntimeError(f"pytest did not finish within {limit:.0f} s (killed)") from None
        output = (self.work / "logs" / f"{row.slug}.log").read_text()
        counts = {k: int(n) for n, k in re.findall(r"(\d+) (passed|failed|skipped|errors?|deselected)", output)}
        if proc.returncode != 0:
            raise RuntimeError(f"pytest exit {proc.returncode}: {counts}")
        return {**row.result, "counts": counts, "passed": counts.get("passed", 0), "skipped": counts.get("skipped", 0),
                "wall_s": round(time.perf_counter() - self._pytest_started, 2)}

    def checkpoint_row(self, row: Row) -> Dict[str, Any]:
        import resource

        from acestep_ft.model.random_checkpoint import model_config_for, write_random_checkpoint

        target = self.work / f"random-{self.p.variant}"
        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        started = time.perf_counter()
        write_random_checkpoint(model_config_for(self.p.variant), target, seed=0, device=self.p.draw_device)
        seconds = time.perf_counter() - started
        self.checkpoint = target
        size = (target / "model.safetensors").stat().st_size
        return {"path": str(target), "write_s": round(seconds, 2), "bytes": size, "drawn_on": self.p.draw_device,
                "host_rss_growth_gib": round((resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 2**20, 3)}

    def train_row(self, row: Row) -> Dict[str, Any]:
        import torch
        from accelerate.state import AcceleratorState

        from acestep_ft.preflight.__main__ import compose_config
        from acestep_ft.preflight.gate import preflight
        from acestep_ft.run import train
        from acestep_ft.sweep import reset_peak_memory
        from acestep_ft.train.metrics import read_metrics

        if self.checkpoint is None:
            raise RuntimeError("no checkpoint: the checkpoint row did not run (give one with --checkpoint DIR)")
        overrides = [*self.p.model, f"model.path={self.checkpoint}", *row.overrides]
        cfg = compose_config(overrides)
        verdict = preflight(cfg, 1)  # the run computes the same verdict again before it loads anything
        run_dir = self.work / "runs" / row.slug
        shutil.rmtree(run_dir, ignore_errors=True)
        AcceleratorState._reset_state(reset_partial_state=True)  # a singleton: each row configures its own
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        reset_peak_memory()
        log_path = self.work / "logs" / f"{row.slug}.log"
        with log_path.open("w") as f:
            log = StampedLog(f, time.perf_counter())
            with contextlib.redirect_stdout(log), contextlib.redirect_stderr(log):
                try:
                    result = train(cfg, run_dir)
                finally:
                    log.flush()
        if result.stopped_by is not None:
            raise RuntimeError(f"the run stopped at a signal ({result.stopped_by})")
        numbers = measured(read_metrics(run_dir / "metrics.jsonl"), row.warmup)
        steps = cfg.train.stop_at_step or cfg.train.max_steps
        if len(numbers["losses"]) != steps or not all(isinstance(v, float) and math.isfinite(v)
                                                      for v in numbers["losses"]):
            raise RuntimeError(f"expected {steps} finite losses, got {numbers['losses']}")
        estimate = verdict.estimate.total / 2**30
        numbers.update(estimate_gib=estimate, preflight_rewrote=verdict.changes,
                       estimate_error_pct=(100 * (estimate / numbers["peak_gib"] - 1)
                                           if numbers["peak_of"] and numbers["peak_of"].startswith("cuda") else None),
                       estimate_note=None if self.p.name == "cuda" else "CPU: no allocator peak to compare with")
        t_verdict, t_model = log.first(r"^verdict:"), log.first(r"^model \S+: [\d.]+M params")
        numbers["load_s"] = None if t_verdict is None or t_model is None else round(t_model - t_verdict, 2)
        numbers["save_s"] = log.save_seconds()
        if not self.args.keep:
            shutil.rmtree(run_dir, ignore_errors=True)  # a full 2B run leaves ~10 GB of checkpoint and export
        del result
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        if row.kind == "compile":
            torch._dynamo.reset()
        return numbers

    # -- all of it --------------------------------------------------------------------------------------------
    def run(self) -> int:
        tests, write = Row("pytest_gpu", "pytest", "pytest -m gpu"), Row("checkpoint", "checkpoint",
                                                                           f"random {self.p.variant} checkpoint")
        rows = [tests, write, *train_rows(self.p)]
        self.planned = len(rows)
        interrupted, proc = None, None
        try:
            proc = self.start_pytest(tests)
            if self.checkpoint is not None:
                self.rows.append(write)
                write.result = {"status": "skipped", "reason": f"--checkpoint {self.checkpoint} given"}
            else:
                self.run_row(write, self.checkpoint_row)
            if proc is not None:  # before any training row: the tests must not share the GPU with a measurement
                self.run_row(tests, lambda row: self.finish_pytest(row, proc), position=1)
            for row in rows[2:]:
                self.run_row(row, self.train_row)
        except Interrupted as err:
            interrupted = str(err)
            if proc is not None and proc.poll() is None:
                proc.kill()
            for row in rows:
                if not row.result.get("status"):
                    if row not in self.rows:
                        self.rows.append(row)
                    row.result = {"status": "skipped", "reason": interrupted}
        self.rows.sort(key=rows.index)
        self.header["interrupted"] = interrupted
        self.save()
        print(markdown(self.document()))
        if interrupted:
            return 124
        return 1 if any(r.result.get("status") == "failed" for r in self.rows) else 0


# -- presentation ---------------------------------------------------------------------------------------------
def _num(value: Any, fmt: str) -> str:
    return "" if value is None else format(value, fmt)


def summary(row: Row) -> str:
    r = row.result
    if r["status"] == "skipped":
        return f"skipped ({r['reason']})"
    if r["status"] == "failed":
        return f"FAILED: {r['error'][:300]}"
    if row.kind == "pytest":
        return f"ok: {r['counts']}"
    if row.kind == "checkpoint":
        return f"ok: {r['bytes'] / 1e9:.3g} GB in {r['write_s']:.1f} s"
    return (f"ok: {_num(r['step_time_s'], '.3f')} s/step, {_num(r['frames_per_s'], '.0f')} frames/s, peak "
            f"{_num(r['peak_gib'], '.3g')} GiB ({r['peak_of']}), estimate {_num(r['estimate_gib'], '.3g')} GiB, "
            f"load {_num(r['load_s'], '.1f')} s, save {_num(r['save_s'], '.1f')} s, wall {r['wall_s']:.0f} s")


def markdown(doc: Dict[str, Any]) -> str:
    """The result as a Markdown table (one line per row) with the machine and settings above it."""
    rows = doc["rows"]
    base = next((r for r in rows if r["slug"] == BASELINE and r.get("status") == "ok"), None)
    lines = [f"## GPU check ({doc['profile']}): {doc['device']}, torch {doc['torch']}",
             "",
             f"batch {doc['batch_size']}, condition length {doc['condition_length']}, timings without the first "
             f"{doc['warmup']} step(s) ({doc['compile_warmup']} with compile), elapsed {doc['elapsed_s']:.0f} s"
             + (f", {doc['interrupted']}" if doc.get("interrupted") else ""),
             "",
             "| row | status | frames | step s | samples/s | frames/s | stall % | peak GiB | estimate GiB | est. err % "
             "| load s | save s | wall s | vs " + BASELINE + " | note |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        status = r.get("status", "?")
        note = r.get("reason") or r.get("error") or ""
        if r["kind"] == "pytest" and status == "ok":
            note = ", ".join(f"{n} {k}" for k, n in r["counts"].items())
        elif r["kind"] == "checkpoint" and status == "ok":
            note = f"{r['bytes'] / 1e9:.3g} GB written in {r['write_s']:.1f} s (drawn on {r['drawn_on']})"
        elif status == "ok" and r.get("preflight_rewrote"):
            note = "preflight rewrote: " + "; ".join(r["preflight_rewrote"])
        versus = ""
        if base is not None and r.get("compare") and status == "ok" and r.get("step_time_s"):
            versus = f"x{base['step_time_s'] / r['step_time_s']:.2f} speed"
        stall = None if r.get("stall_frac") is None else 100 * r["stall_frac"]
        cells = [r["title"], status, _num(r.get("frames"), "d"), _num(r.get("step_time_s"), ".3f"),
                 _num(r.get("samples_per_s"), ".2f"), _num(r.get("frames_per_s"), ".0f"), _num(stall, ".1f"),
                 _num(r.get("peak_gib"), ".3g"), _num(r.get("estimate_gib"), ".3g"),
                 _num(r.get("estimate_error_pct"), "+.1f"), _num(r.get("load_s"), ".1f"), _num(r.get("save_s"), ".1f"),
                 _num(r.get("wall_s"), ".0f"),
                 versus, note.replace("|", "/").replace("\n", " ")[:200]]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    parser.add_argument("--cpu-dry-run", action="store_true", help="tiny model, tiny clips, on the CPU")
    parser.add_argument("--out", default="gpu_check.json", help="JSON result file (default gpu_check.json)")
    parser.add_argument("--budget-s", type=float, default=None,
                        help="wall seconds for everything (default 480 on CUDA, none for the dry run)")
    parser.add_argument("--deadline", type=float, default=None, help="Unix time to finish by (the wrapper's start + "
                        "budget; overrides --budget-s)")
    parser.add_argument("--work-dir", default=None, help="checkpoint, run directories and logs (default: a new "
                        "temporary directory, kept: its path is in the JSON)")
    parser.add_argument("--checkpoint", default=None, help="use this checkpoint directory instead of writing one")
    parser.add_argument("--only", default="", help="comma-separated row slugs to run (the rest are skipped)")
    parser.add_argument("--keep", action="store_true", help="keep the run directories (a full 2B run: ~10 GB)")
    args = parser.parse_args(argv)
    args.only = {s for s in args.only.split(",") if s}

    import torch

    if not args.cpu_dry_run and not torch.cuda.is_available():
        print("no CUDA GPU is visible: run this on a CUDA machine, or use --cpu-dry-run", file=sys.stderr)
        return 2
    profile = CPU_DRY_RUN if args.cpu_dry_run else CUDA
    if args.budget_s is None:
        args.budget_s = 0 if args.cpu_dry_run else 480
    names = {r.slug for r in train_rows(profile)} | {"pytest_gpu", "checkpoint"}
    if args.only - names:
        parser.error(f"--only: unknown rows {sorted(args.only - names)}; rows: {', '.join(sorted(names))}")
    real_stdout = sys.stdout

    def say(text: str) -> None:
        print(text, file=real_stdout, flush=True)

    check = Check(profile, args, say)
    check.header = {
        "profile": profile.name, "device": torch.cuda.get_device_name() if profile.name == "cuda" else
        f"CPU ({platform.processor() or platform.machine()}, {os.cpu_count()} cores)",
        "torch": torch.__version__, "python": platform.python_version(), "batch_size": profile.batch_size,
        "condition_length": profile.condition_length, "warmup": profile.warmup, "timed_steps": profile.timed,
        "compile_warmup": profile.compile_warmup, "budget_s": args.budget_s, "work_dir": str(check.work),
        "started": time.strftime("%Y-%m-%dT%H:%M:%S"),
    }
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, _interrupt)
    say(f"gpu check ({profile.name}): work directory {check.work}, results -> {args.out}")
    try:
        return check.run()
    except Exception:  # a bug of the check itself: still leave the JSON of what finished
        traceback.print_exc()
        check.save()
        return 1


if __name__ == "__main__":
    sys.exit(main())
