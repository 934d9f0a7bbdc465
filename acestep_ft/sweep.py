"""Sweep summaries: one row per job of a Hydra multirun, ranked, as summary.csv and summary.md in the sweep directory.

    python train.py -m optim.lr=1e-3,3e-3 mode.rank=4,8    # writes multirun/<date>/<time>/summary.csv + summary.md
    python -m acestep_ft.sweep multirun/<date>/<time>       # rebuilds them (a continued or requeued sweep)

The table is built only from files in the sweep directory, so every launcher (the basic one, submitit on SLURM) gives
the same: each job's metrics.jsonl (the numbers, `metrics.run_numbers`), its result.json (outcome, exit status,
overrides, wall time; written by train.py through `job_outcome` when a job ends, however it ends) and Hydra's
multirun.yaml (the grid: swept keys, and the jobs that never started). It is written by every job as it ends (under
a lock; this also covers sweeps that end early: a stop signal, a crash, a failed submitit job, after which Hydra
never calls on_multirun_end), by the `SweepSummary` callback when the sweep ends (conf/config.yaml hydra.callbacks),
and by the command above.
"""

from __future__ import annotations

import argparse
import csv
import fcntl
import io
import json
import math
import os
import re
import signal
import socket
import sys
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Dict, Iterator, List, Optional, Tuple

from hydra.experimental.callback import Callback
from omegaconf import OmegaConf

from acestep_ft.atomic import atomic_write_bytes
from acestep_ft.train.metrics import LAST_STEPS, METRICS_FILE, read_metrics, run_numbers

RESULT_FILE = "result.json"
SUMMARY_CSV, SUMMARY_MD = "summary.csv", "summary.md"
GRID_FILE = "multirun.yaml"  # written by Hydra's BasicSweeper into the sweep directory
_LOCK = ".summary.lock"
_NUMBERS = ["best_val_loss", "final_val_loss", "train_loss", "steps", "steps_per_s", "peak_mem_gib", "peak_mem_of",
            "wall_s"]
_CSV_NAMES = {"train_loss": f"train_loss_last{LAST_STEPS}"}
_jobs_here = 0  # jobs this process has run (the basic launcher runs every job of a sweep in one process)


# -- a job's outcome ---------------------------------------------------------------------------------------------
def describe_exit(error: Optional[BaseException]) -> Dict[str, Any]:
    """status ("ok" / "failed" / "stopped"), exit_code, signal name and error message of a job that ended with
    `error` (None: returned normally). Exit statuses are train.py's: 1 failed, 2 config, 128 + N stopped by signal N."""
    from acestep_ft.errors import UserError

    if error is None:
        return {"status": "ok", "exit_code": 0, "signal": None, "error": None}
    if isinstance(error, SystemExit):
        code = error.code if isinstance(error.code, int) or error.code is None else 1
        if not code:
            return {"status": "ok", "exit_code": 0, "signal": None, "error": None}
        if code > 128 and code - 128 in signal.valid_signals():
            return {"status": "stopped", "exit_code": code, "signal": signal.Signals(code - 128).name, "error": None}
        if code < 0:  # submitit's handler exits with -1 after requeueing a preempted / timed-out job
            return {"status": "stopped", "exit_code": code, "signal": None,
                    "error": "ended by the launcher's signal handler (submitit: requeued)"}
        return {"status": "failed", "exit_code": code, "signal": None, "error": None}
    if isinstance(error, KeyboardInterrupt):
        return {"status": "stopped", "exit_code": 130, "signal": "SIGINT", "error": None}
    if isinstance(error, UserError):
        return {"status": "failed", "exit_code": error.exit_code, "signal": None, "error": str(error)}
    return {"status": "failed", "exit_code": 1, "signal": None, "error": f"{type(error).__name__}: {error}"}


def outcome_text(result: Dict[str, Any]) -> str:
    """"ok", "failed (exit 2)", "stopped by SIGTERM (exit 143)" from a result.json record."""
    status, code = result.get("status"), result.get("exit_code")
    if status == "ok":
        return "ok"
    if status == "stopped" and result.get("signal"):
        return f"stopped by {result['signal']} (exit {code})"
    return f"{status} (exit {code})"


@contextmanager
def job_outcome(hydra_cfg: Any, enabled: bool = True) -> Iterator[None]:
    """Around one multirun job (train.py): on the way out, however the job ends, the main process writes
    <job>/result.json and refreshes the sweep's summary; the error, if any, goes on unchanged.

    At the start the process's peak-memory counters are reset (Linux peak RSS, the CUDA allocator's peak once CUDA
    is in use): the basic launcher runs every job in one process, and each job's `mem/*` metrics must be its own."""
    global _jobs_here
    if not enabled or int(os.environ.get("RANK", "0")) != 0:
        yield
        return
    _jobs_here += 1
    job_dir = Path(str(hydra_cfg.runtime.output_dir))
    reset = reset_peak_memory()
    started = time.time()
    error: Optional[BaseException] = None
    try:
        yield
    except BaseException as err:
        error = err
        raise
    finally:
        result = {"job": int(hydra_cfg.job.num), "overrides": [str(o) for o in hydra_cfg.overrides.task],
                  **describe_exit(error), "started": time.strftime("%Y-%m-%dT%H:%M:%S", time.localtime(started)),
                  "wall_s": round(time.time() - started, 3), "host": socket.gethostname()}
        if not reset and _jobs_here > 1:
            result["mem_note"] = "process peak: includes the earlier jobs of this process"
        try:
            earlier = json.loads((job_dir / RESULT_FILE).read_text())
            result["earlier"] = outcome_text(earlier)  # the attempt before this one (requeued, continued, refused)
        except (OSError, ValueError, AttributeError):
            pass
        try:
            job_dir.mkdir(parents=True, exist_ok=True)
            atomic_write_bytes(job_dir / RESULT_FILE, (json.dumps(result, indent=1) + "\n").encode())
            write_summary(Path(os.path.abspath(str(hydra_cfg.sweep.dir))))
        except Exception as err:  # the bookkeeping must never change how the job ends
            print(f"sweep summary: could not record job {result['job']} in {job_dir}: {err}", file=sys.stderr)


def reset_peak_memory() -> bool:
    """Start this process's peak-memory counters afresh; False where the host peak could not be reset."""
    torch = sys.modules.get("torch")  # not imported yet: CUDA was not used in this process, nothing to reset
    if torch is not None and torch.cuda.is_initialized():
        torch.cuda.reset_peak_memory_stats()  # the current device: the one the earlier job of this process used
    try:  # "5" resets the peak resident set size (VmHWM, and with it getrusage's ru_maxrss) on Linux 4.0+
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


# -- the table ---------------------------------------------------------------------------------------------------
def override_key(override: str) -> str:
    return override.split("=", 1)[0].lstrip("~+")


def planned_jobs(sweep_dir: Path) -> Tuple[List[List[str]], List[str]]:
    """(the override list of every job of the grid, in job-number order; the swept keys) from multirun.yaml, as
    Hydra's BasicSweeper expands it; ([], []) for another sweeper or a directory without the file."""
    try:
        from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
        from hydra.core.override_parser.overrides_parser import OverridesParser

        cfg = OmegaConf.load(sweep_dir / GRID_FILE)
        if "BasicSweeper" not in str(OmegaConf.select(cfg, "hydra.sweeper._target_", default="")):
            return [], []
        params = cfg.hydra.sweeper.get("params")  # a saved experiment's grid (hydra.sweeper.params), then the CLI
        args = [f"{k}={v}" for k, v in (OmegaConf.to_container(params, resolve=False) if params else {}).items()]
        args += [str(o) for o in OmegaConf.to_container(cfg.hydra.overrides.task)]
        parsed = OverridesParser.create().parse_overrides(args)
        jobs = [list(job) for batch in BasicSweeper.split_arguments(parsed, None) for job in batch]
        return jobs, [o.get_key_element().lstrip("~+") for o in parsed if o.is_sweep_override()]
    except Exception:  # no grid file, another format, a glob() that needs the config loader: rows from disk only
        return [], []


def job_dirs(sweep_dir: Path) -> List[Path]:
    return sorted(p for p in sweep_dir.iterdir() if p.is_dir() and not p.name.startswith(".") and (
        re.match(r"\d+(_|$)", p.name) or any((p / n).exists() for n in (RESULT_FILE, METRICS_FILE, ".hydra"))))


def _job_number(job_dir: Path, result: Dict) -> Optional[int]:
    if isinstance(result.get("job"), int):
        return result["job"]
    match = re.match(r"(\d+)(_|$)", job_dir.name)
    if match:
        return int(match.group(1))
    try:
        return int(OmegaConf.select(OmegaConf.load(job_dir / ".hydra" / "hydra.yaml"), "hydra.job.num"))
    except Exception:
        return None


def _overrides(job_dir: Path, result: Dict) -> List[str]:
    if isinstance(result.get("overrides"), list):
        return [str(o) for o in result["overrides"]]
    try:
        return [str(o) for o in OmegaConf.load(job_dir / ".hydra" / "overrides.yaml")]
    except Exception:
        return []


def collect(sweep_dir: Path) -> Tuple[List[Dict[str, Any]], List[str]]:
    """(one row per job, ranked; the swept keys). A job directory without result.json is still running or was
    killed; a job of the grid without a directory never started."""
    sweep_dir = Path(sweep_dir)
    grid, swept = planned_jobs(sweep_dir)
    rows = []
    for job_dir in job_dirs(sweep_dir):
        try:
            result = json.loads((job_dir / RESULT_FILE).read_text())
        except (OSError, ValueError):
            result = {}
        num = _job_number(job_dir, result)
        overrides = _overrides(job_dir, result) or (grid[num] if num is not None and num < len(grid) else [])
        numbers = run_numbers(read_metrics(job_dir / METRICS_FILE))
        if numbers["peak_mem_of"] == "host rss" and result.get("mem_note"):
            numbers["peak_mem_of"] += f" ({result['mem_note']})"
        rows.append({"job": num, "dir": job_dir.name, "overrides": overrides, "status": result.get("status", "unknown"),
                     "outcome": outcome_text(result) if result else "no result (running, or killed)",
                     "exit_code": result.get("exit_code"), "error": result.get("error"),
                     "earlier": result.get("earlier"), **numbers, "wall_s": result.get("wall_s")})
    seen = [set(r["overrides"]) for r in rows]
    for num, overrides in enumerate(grid):
        if set(overrides) not in seen:
            rows.append({"job": num, "dir": "", "overrides": overrides, "status": "not started",
                         "outcome": "not started", "exit_code": None, "error": None, "earlier": None,
                         **{k: None for k in _NUMBERS}})
    if not swept:  # no grid: the keys whose values differ between jobs (or that only some jobs set)
        known = [{override_key(o): o for o in r["overrides"]} for r in rows if r["overrides"]]
        keys = list(dict.fromkeys(k for given in known for k in given))
        swept = [k for k in keys if len({given.get(k) for given in known}) > 1]
    for row in rows:
        given = {override_key(o): o.split("=", 1)[1] if "=" in o else "" for o in row["overrides"]}
        row["swept"] = {key: given.get(key, "") for key in swept}
    rows.sort(key=rank_key)
    return rows, swept


def rank_key(row: Dict[str, Any]) -> Tuple:
    """Finished jobs first, ranked by best validation loss, those without validation by final train loss; then the
    others (failed, stopped, running, not started) in the same order; ties by job number."""
    if row["best_val_loss"] is not None:
        tier, value = 0, row["best_val_loss"]
    elif row["train_loss"] is not None:
        tier, value = 1, row["train_loss"]
    else:
        tier, value = 2, 0.0
    num = row["job"] if row["job"] is not None else math.inf
    return (row["status"] != "ok", tier, value, num, row["dir"])


def _number(value: Any, digits: int) -> str:
    if value is None:
        return ""
    if isinstance(value, int):
        return str(value)
    return f"{value:.{digits}g}"


def to_csv(rows: List[Dict[str, Any]], swept: List[str]) -> str:
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(["job", *swept, "outcome", "exit_code", *(_CSV_NAMES.get(k, k) for k in _NUMBERS), "error",
                     "dir"])
    for row in rows:
        writer.writerow(["" if row["job"] is None else row["job"], *(row["swept"][k] for k in swept), row["outcome"],
                         "" if row["exit_code"] is None else row["exit_code"],
                         *(row[k] if k == "peak_mem_of" else _number(row[k], 7) for k in _NUMBERS),
                         one_line(row["error"]), row["dir"]])
    return out.getvalue()


def one_line(text: Optional[str], limit: int = 0) -> str:
    """A (multi-line) message on one line, cut to `limit` characters (0: whole)."""
    flat = " ".join((text or "").split())
    return flat[:limit - 1] + "…" if limit and len(flat) > limit else flat


def _cell(text: Any) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def _wall(seconds: Optional[float]) -> str:
    if seconds is None:
        return ""
    return f"{seconds:.0f} s" if seconds < 120 else f"{seconds / 60:.1f} min" if seconds < 7200 else \
        f"{seconds / 3600:.1f} h"


def to_markdown(sweep_dir: Path, rows: List[Dict[str, Any]], swept: List[str]) -> str:
    counts: Dict[str, int] = {}
    for row in rows:
        counts[row["status"]] = counts.get(row["status"], 0) + 1
    has_val = any(r["best_val_loss"] is not None for r in rows)
    lines = [f"# Sweep {sweep_dir}", "",
             f"{len(rows)} job(s): " + ", ".join(f"{n} {s}" for s, n in counts.items()) + ". Ranked: finished jobs "
             + ("by best validation loss (jobs without validation by final train loss)" if has_val
                else "by final train loss (no job has a validation split)") + ", then the others.", ""]
    header = ["rank", "job", *swept, "outcome", "best val loss", "final val loss",
              f"train loss (mean of last {LAST_STEPS})", "steps", "steps/s", "peak mem GiB", "wall", "dir"]
    lines += ["| " + " | ".join(_cell(h) for h in header) + " |", "|" + "---|" * len(header)]
    for rank, row in enumerate(rows, start=1):
        mem = f"{row['peak_mem_gib']:.2f} ({row['peak_mem_of']})" if row["peak_mem_gib"] is not None else ""
        cells = [rank, "" if row["job"] is None else row["job"], *(row["swept"][k] for k in swept), row["outcome"],
                 _number(row["best_val_loss"], 5), _number(row["final_val_loss"], 5), _number(row["train_loss"], 5),
                 _number(row["steps"], 5), _number(row["steps_per_s"], 3), mem, _wall(row["wall_s"]),
                 f"`{row['dir']}`" if row["dir"] else ""]
        lines.append("| " + " | ".join(_cell(c) for c in cells) + " |")
    notes = [f"- job {r['job']} ({r['outcome']}): {one_line(r['error'], 300)}"
             + (f" [the attempt before: {r['earlier']}]" if r.get("earlier") else "")
             for r in rows if r["error"]]
    if notes:
        lines += ["", "Messages:", *notes]
    lines += ["", f"Columns: train loss = mean of the last {LAST_STEPS} logged `train/loss` values; steps/s = 1 / mean "
              "`perf/step_time_s` (training steps only, the first left out); peak mem = highest `mem/peak_alloc_gb` "
              "on CUDA (allocated tensors, without the CUDA context and cache; main process) or `mem/host_peak_rss_gb`"
              " on the CPU (peak resident set of the process); wall = the job's latest attempt. `python -m "
              "acestep_ft.sweep DIR` rebuilds this file and summary.csv.", ""]
    return "\n".join(lines)


@contextmanager
def _locked(sweep_dir: Path) -> Iterator[None]:
    """Jobs that end together (a SLURM array) write the summary one at a time, each reading what the others left."""
    handle = open(sweep_dir / _LOCK, "a")
    try:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX)
        except OSError:  # a file system without locks: the last writer still reads every finished job
            pass
        yield
    finally:
        handle.close()


def write_summary(sweep_dir: Path) -> Optional[str]:
    """Write summary.csv and summary.md into `sweep_dir`; returns the Markdown (None: no jobs found)."""
    sweep_dir = Path(sweep_dir)
    with _locked(sweep_dir):
        rows, swept = collect(sweep_dir)
        if not rows:
            return None
        markdown = to_markdown(sweep_dir, rows, swept)
        atomic_write_bytes(sweep_dir / SUMMARY_CSV, to_csv(rows, swept).encode())
        atomic_write_bytes(sweep_dir / SUMMARY_MD, markdown.encode())
    return markdown


class SweepSummary(Callback):
    """Hydra callback (conf/config.yaml hydra.callbacks): the sweep's summary once every job has ended."""

    def on_multirun_end(self, config: Any, **kwargs: Any) -> None:
        sweep_dir = Path(os.path.abspath(str(config.hydra.sweep.dir)))
        try:
            markdown = write_summary(sweep_dir)
        except Exception as err:  # never turn a finished sweep into a failed one
            print(f"sweep summary: could not write it into {sweep_dir}: {err}", file=sys.stderr)
            return
        if markdown is not None:
            print(f"\nsweep summary: {sweep_dir / SUMMARY_MD} (and {SUMMARY_CSV})\n" + markdown, flush=True)


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m acestep_ft.sweep", description="(Re)build summary.csv and "
                                     "summary.md of Hydra multirun directories from their job directories.")
    parser.add_argument("sweep_dirs", nargs="+", type=Path, metavar="SWEEP_DIR", help="multirun/<date>/<time>")
    args = parser.parse_args(argv)
    status = 0
    for sweep_dir in args.sweep_dirs:
        if not sweep_dir.is_dir():
            print(f"{sweep_dir}: not a directory", file=sys.stderr)
            status = 2
            continue
        markdown = write_summary(sweep_dir)
        if markdown is None:
            print(f"{sweep_dir}: no job directories found", file=sys.stderr)
            status = 1
        else:
            print(markdown)
    return status


if __name__ == "__main__":
    raise SystemExit(main())
