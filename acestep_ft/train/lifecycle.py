"""The run's life around the loop: a run directory used before, damaged checkpoints, leftovers of killed writes,
signals (preemption, Ctrl-C) and losses that stop being finite.

    problem = relaunch_problem(run_dir, cfg.train)        # checks: never overwrite an earlier run silently
    resume_from, notes = choose_checkpoint(cfg.train.resume, run_dir)   # the newest intact one, saying why
    prepare_run_dir(run_dir, cfg.train.overwrite, say)    # main process: clear an overwritten run, clean leftovers
    stop = StopSignals(); stop.install()                  # SIGTERM / SIGINT / SIGUSR1 / SIGUSR2 -> stop after the step
    ...; if stop.agreed(acc): save and leave the loop
    stop.uninstall(); stop.hand_on()                      # then exit with stop_status(stop.signum)

Exit statuses: a run stopped by signal N after saving exits 128 + N (130 Ctrl-C, 143 SIGTERM, 138 SIGUSR1,
140 SIGUSR2); a second signal kills the process at once with the default action of that signal.
"""

from __future__ import annotations

import os
import shutil
import signal
import sys
from pathlib import Path
from typing import Callable, Dict, List, Optional, Tuple

import torch
from accelerate import Accelerator

from acestep_ft.config import TrainConfig
from acestep_ft.errors import ConfigError, UserError
from acestep_ft.train.checkpoint import (
    PREFIX, STATE_FILE, TRASH_PREFIX, damaged, has_manifest, list_checkpoints, manifest_problem, step_of,
)
from acestep_ft.train.metrics import METRICS_FILE

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1, signal.SIGUSR2)
# What an earlier run leaves in its directory (cleared by train.overwrite=true; .hydra/ is rewritten by the new run).
RUN_OUTPUTS = ("checkpoints", "export", "samples", "preflight", "tensorboard", "wandb", METRICS_FILE,
               "loss_curve.png", ".wandb_id")


# -- relaunch into a used directory ----------------------------------------------------------------------------
def relaunch_problem(run_dir: Path, train: TrainConfig) -> Optional[str]:
    """Why this start would destroy an earlier run in `run_dir` (None: it would not)."""
    if train.overwrite and train.resume is not None:
        return (f"train.overwrite=true deletes the run that train.resume={train.resume} would continue: choose one.")
    if train.overwrite or train.resume is not None:
        return None
    found = list_checkpoints(run_dir)
    if not found and not (Path(run_dir) / "export").exists():
        return None
    newest = f"newest checkpoint: step {step_of(found[-1])}, {found[-1]}" if found else "an export, no checkpoints"
    return (f"the run directory {run_dir} already holds a run ({newest}). Continue it with train.resume=auto, start a "
            "new run with another hydra.run.dir=..., or delete it and start over with train.overwrite=true.")


def prepare_run_dir(run_dir: Path, overwrite: bool, say: Callable[[str], None]) -> None:
    """Main process, before training: delete an earlier run's outputs when `overwrite`, and the hidden leftovers of
    writes that a kill interrupted (temp and trash directories: a model's worth of disk each)."""
    run_dir = Path(run_dir)
    if overwrite:
        gone = [name for name in RUN_OUTPUTS if (run_dir / name).exists()]
        for name in gone:
            _delete(run_dir / name)
        if gone:
            say(f"train.overwrite=true: deleted the earlier run's {', '.join(gone)} in {run_dir}")
    left = clean_leftovers(run_dir)
    if left:
        say(f"removed {len(left)} leftover(s) of interrupted writes ({sum(size for _, size in left) / 2**20:.1f} MiB): "
            + ", ".join(str(path.relative_to(run_dir)) for path, _ in left))


def clean_leftovers(run_dir: Path) -> List[Tuple[Path, int]]:
    """Delete the hidden temp / swap / trash entries that killed writes leave in the run directory and its
    checkpoints/ and samples/ folders; returns (path, bytes) of each."""
    removed = []
    for folder in (Path(run_dir), Path(run_dir) / "checkpoints", Path(run_dir) / "samples"):
        if not folder.is_dir():
            continue
        for entry in sorted(folder.iterdir()):
            name = entry.name
            if name.startswith(".") and (".tmp-" in name or ".old-" in name or name.startswith(TRASH_PREFIX)
                                         or name.endswith(".tmp")):
                removed.append((entry, _size(entry)))
                _delete(entry)
    return removed


def _size(path: Path) -> int:
    if path.is_file():
        return path.stat().st_size
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def _delete(path: Path) -> None:
    """Rename to a hidden trash name, then delete: a kill midway never leaves a half-deleted visible entry."""
    trash = path.with_name(f"{TRASH_PREFIX}{path.name}-{os.getpid()}")
    os.replace(path, trash)
    if trash.is_dir():
        shutil.rmtree(trash, ignore_errors=True)
    else:
        trash.unlink(missing_ok=True)


# -- which checkpoint to resume ---------------------------------------------------------------------------------
def choose_checkpoint(resume: Optional[str], run_dir: Path) -> Tuple[Optional[Path], List[str]]:
    """`train.resume` -> (checkpoint to load or None for a fresh start, notes to print).

    auto: the newest intact checkpoint of the run directory (damaged newer ones are reported and skipped); a run
    directory: the same in it; a checkpoint directory: that one, refused when damaged. Every candidate is verified
    against its manifest (sizes and xxh3 digests). UserError when the given checkpoint is damaged or every one is;
    ConfigError when the given path holds no checkpoint.
    """
    if resume is None:
        return None, []
    given = Path(resume).expanduser() if resume != "auto" else None
    if given is not None and not given.exists():
        raise ConfigError(f"train.resume={resume} does not exist; give a checkpoint directory "
                          "(<run>/checkpoints/step-N), a run directory, or train.resume=auto")
    if given is not None and ((given / STATE_FILE).exists() or given.name.startswith(PREFIX)):  # one checkpoint
        problem = manifest_problem(given) if given.is_dir() else "it is not a directory"
        if problem:
            raise UserError(damaged(given, problem))
        return given, [] if has_manifest(given) else [unverified(given)]
    where = Path(run_dir) if given is None else given
    notes = []
    for candidate in reversed(list_checkpoints(where)):
        problem = manifest_problem(candidate)
        if problem is None:
            if notes:
                notes.append(f"resuming from {candidate}, the newest intact checkpoint")
            return candidate, notes + ([] if has_manifest(candidate) else [unverified(candidate)])
        notes.append(f"skipping {candidate}: damaged ({problem})")
    if notes:
        raise UserError(f"train.resume={resume}: no intact checkpoint in {where}:\n  " + "\n  ".join(notes)
                        + "\nStart over with train.overwrite=true (or in another hydra.run.dir).")
    if given is not None:
        raise ConfigError(f"train.resume={resume}: no checkpoint there; give a checkpoint directory "
                        "(<run>/checkpoints/step-N), a run directory, or train.resume=auto")
    return None, []


def unverified(path: Path) -> str:
    return f"{path} has no manifest (written by an older version): its files cannot be verified"


# -- signals ----------------------------------------------------------------------------------------------------
def stop_status(signum: int) -> int:
    """Exit status of a run stopped by signal `signum` after saving: the shell's 128 + N."""
    return 128 + signum


class StopSignals:
    """Turn SIGTERM, SIGINT (Ctrl-C), SIGUSR1 and SIGUSR2 (SLURM's --signal, submitit's preemption signal) into a
    request to stop after the current optimizer step: the loop saves a checkpoint and leaves. A second signal exits
    at once. Installed around the loop only: before it there is nothing to save (Ctrl-C then stops without a trace).
    """

    def __init__(self) -> None:
        self.signum: Optional[int] = None         # the signal received by this process (first one)
        self.agreed_signum: Optional[int] = None  # the signal all processes stop for (see `agreed`)
        self._previous: Dict[int, object] = {}

    def install(self) -> None:
        for sig in STOP_SIGNALS:
            self._previous[sig] = signal.signal(sig, self._handle)

    def uninstall(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)

    def _handle(self, signum: int, frame: object) -> None:
        name = signal.Signals(signum).name
        if self.signum is not None:
            os.write(2, f"\n{name} again: exiting now, without saving\n".encode())
            signal.signal(signum, signal.SIG_DFL)
            os.kill(os.getpid(), signum)
            return
        self.signum = signum
        os.write(2, f"\n{name} received: finishing the current optimizer step, then saving a checkpoint "
                    f"(send it again to exit at once)\n".encode())

    def agreed(self, acc: Accelerator) -> Optional[int]:
        """Collective with several processes: the signal any process received (the largest number), so that every
        process stops after the same step and the checkpoint is consistent; None while no process got one."""
        signum = self.signum or 0
        if acc.num_processes > 1:
            flag = torch.tensor([signum], device=acc.device)
            torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX)
            signum = int(flag.item())
        self.agreed_signum = signum or None
        return self.agreed_signum

    def hand_on(self) -> None:
        """After the checkpoint is saved: give the signal to the Python handler that was installed before ours, if
        any (submitit's, which requeues a preempted SLURM job); the process exits there or in the caller."""
        previous = self._previous.get(self.agreed_signum) if self.agreed_signum else None
        if callable(previous) and previous is not signal.default_int_handler:
            sys.stdout.flush()
            previous(self.agreed_signum, None)
