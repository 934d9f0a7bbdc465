"""The run's life around the loop: a run directory used before, damaged checkpoints, leftovers of killed writes and
signals (preemption, Ctrl-C). (Losses that stop being finite are the loop's: `loop.halt_on_nonfinite`.)

    resume_from, notes = choose_checkpoint(cfg.train.resume, run_dir)   # the newest intact one, saying why
    problem = relaunch_problem(run_dir, cfg.train, resume_from)        # never overwrite an earlier run silently
    lock = lock_run_dir(run_dir)                          # main process: one run per directory at a time
    prepare_run_dir(run_dir, cfg.train.overwrite, resume_from, say)    # clear / clean / set aside
    stop = StopSignals(); stop.install()                  # SIGTERM / SIGINT / SIGUSR1 / SIGUSR2 -> stop after the step
    ...; if stop.agreed(acc): save and leave the loop
    stop.uninstall(); stop.hand_on()                      # then exit with stop_status(stop.signum)

Exit statuses: a run stopped by signal N after saving exits 128 + N (130 Ctrl-C, 143 SIGTERM, 138 SIGUSR1,
140 SIGUSR2); a second signal kills the process at once with the default action of that signal.
"""

from __future__ import annotations

import fcntl
import os
import signal
import socket
import sys
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Tuple

import torch
from accelerate import Accelerator

from acestep_ft.atomic import TRASH_PREFIX, delete_via_trash
from acestep_ft.config import TrainConfig
from acestep_ft.errors import ConfigError, UserError
from acestep_ft.train.checkpoint import (
    BEST_FILE, PREFIX, STATE_FILE, damaged, has_manifest, list_checkpoints, manifest_problem, read_best,
    step_of,
)
from acestep_ft.train.metrics import METRICS_FILE

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1, signal.SIGUSR2)
SUPERSEDED_PREFIX = "superseded-"
LOCK_FILE = ".lock"
# What an earlier run leaves in its directory (cleared by train.overwrite=true; .hydra/ is rewritten by the new run).
RUN_OUTPUTS = ("checkpoints", "export", "samples", "preflight", "tensorboard", "wandb", METRICS_FILE,
               "loss_curve.png", ".wandb_id", "result.json")


# -- relaunch into a used directory ----------------------------------------------------------------------------
def relaunch_problem(run_dir: Path, train: TrainConfig, resume_from: Optional[Path]) -> Optional[str]:
    """Why this start would destroy an earlier run in `run_dir` (None: it would not). `resume_from` is the checkpoint
    `choose_checkpoint` picked: continuing a checkpoint of this directory is fine, anything else is not."""
    run_dir = Path(run_dir)
    inside = resume_from is not None and run_dir.resolve() in Path(resume_from).resolve().parents
    if train.overwrite and (train.resume == "auto" or inside):
        return f"train.overwrite=true deletes the run that train.resume={train.resume} would continue: choose one."
    if train.overwrite or inside:
        return None
    found = list_checkpoints(run_dir)
    if not found and not (run_dir / "export").exists():
        return None
    if not found:
        return (f"the run directory {run_dir} holds the export of an earlier run but no checkpoint to continue from: "
                "start the new run in another hydra.run.dir=..., or delete the old one with train.overwrite=true.")
    what = (f"train.resume={train.resume} continues a checkpoint of another directory, but the run directory"
            if resume_from is not None else "the run directory")
    return (f"{what} {run_dir} already holds a run (newest checkpoint: step {step_of(found[-1])}, {found[-1]}). "
            "Continue it with train.resume=auto, start a new run with another hydra.run.dir=..., or delete it and "
            "start over with train.overwrite=true.")


def prepare_run_dir(run_dir: Path, overwrite: bool, resume_from: Optional[Path], say: Callable[[str], None]) -> None:
    """Main process, before training: delete an earlier run's outputs when `overwrite`; finish or remove what killed
    writes left (a model's worth of disk each); set aside the checkpoints past the one a resume continues from (they
    belong to an abandoned continuation, or were damaged), so pruning and later resumes never prefer them."""
    run_dir = Path(run_dir)
    if overwrite:
        gone = [name for name in RUN_OUTPUTS if (run_dir / name).exists()]
        for name in gone:
            delete_via_trash(run_dir / name)
        if gone:
            say(f"train.overwrite=true: deleted the earlier run's {', '.join(gone)} in {run_dir}")
    restored = restore_interrupted_swaps(run_dir / "checkpoints")
    if restored:
        say("restored checkpoint(s) whose replacement a kill interrupted: " + ", ".join(str(p) for p in restored))
    left = clean_leftovers(run_dir)
    if left:
        say(f"removed {len(left)} leftover(s) of interrupted writes ({sum(size for _, size in left) / 2**20:.1f} MiB): "
            + ", ".join(str(path.relative_to(run_dir)) for path, _ in left))
    if resume_from is not None and run_dir.resolve() in Path(resume_from).resolve().parents:
        later = [p for p in list_checkpoints(run_dir) if step_of(p) > step_of(resume_from)]
        for path in later:
            os.replace(path, _free_name(path.with_name(f"{SUPERSEDED_PREFIX}{path.name}")))
        best = read_best(run_dir)
        if best is not None and best.get("step", -1) > step_of(resume_from):
            (run_dir / "checkpoints" / BEST_FILE).unlink()
        if later:
            say(f"set aside {len(later)} checkpoint(s) past step {step_of(resume_from)} as "
                f"{SUPERSEDED_PREFIX}step-N (not resumed from, never pruned; delete them when not needed): "
                + ", ".join(p.name for p in later))


def _free_name(path: Path) -> Path:
    n, candidate = 1, path
    while candidate.exists():
        n, candidate = n + 1, path.with_name(f"{path.name}.{n}")
    return candidate


def restore_interrupted_swaps(checkpoints: Path) -> List[Path]:
    """`atomic_directory` replaces `step-N` by moving it into `.step-N.old-*/` and renaming the new one in; a kill
    between the two renames leaves no `step-N`: move the old one back (the new one is then removed as a leftover)."""
    restored = []
    for old in sorted(checkpoints.glob(".*.old-*")) if checkpoints.is_dir() else []:
        name = old.name[1:old.name.index(".old-")]
        if (old / name).is_dir() and not (checkpoints / name).exists():
            os.replace(old / name, checkpoints / name)
            restored.append(checkpoints / name)
    return restored


def lock_run_dir(run_dir: Path) -> Any:
    """Main process: an exclusive lock on <run>/.lock held while the run lives (released when the process ends), so
    a second run started into the same directory is refused instead of cleaning up the first one's writes."""
    run_dir.mkdir(parents=True, exist_ok=True)
    handle = open(run_dir / LOCK_FILE, "a+")
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        handle.seek(0)
        holder = handle.read().strip() or "another process"
        handle.close()
        raise UserError(f"the run directory {run_dir} is in use by a running training ({holder}): wait for it to "
                        "end or stop it, or use another hydra.run.dir.") from None
    handle.seek(0)
    handle.truncate()
    handle.write(f"pid {os.getpid()} on {socket.gethostname()}\n")
    handle.flush()
    return handle


def clean_leftovers(run_dir: Path) -> List[Tuple[Path, int]]:
    """Delete the hidden temp / swap / trash entries that killed writes leave in the run directory and its
    checkpoints/, samples/, .hydra/ and export/ folders; returns (path, bytes) of each."""
    removed = []
    for folder in [Path(run_dir), *(Path(run_dir) / name for name in ("checkpoints", "samples", ".hydra", "export"))]:
        if not folder.is_dir():
            continue
        for entry in sorted(folder.iterdir()):
            name = entry.name
            if name.startswith(".") and (".tmp-" in name or ".old-" in name or name.startswith(TRASH_PREFIX)
                                         or name.endswith(".tmp")):
                removed.append((entry, _size(entry)))
                delete_via_trash(entry)
    return removed


def _size(path: Path) -> int:
    if path.is_file():
        return path.stat().st_size
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


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


class PipeSafe:
    """A console stream that stops writing, instead of raising, once its pipe is closed: `train.py ... | tee log`
    and Ctrl-C kill tee too, and the run must still finish its step and save rather than die on a progress bar."""

    def __init__(self, stream: Any) -> None:
        self._stream, self._closed = stream, False

    def write(self, text: str) -> int:
        if not self._closed:
            try:
                return self._stream.write(text)
            except BrokenPipeError:
                self._closed = True
        return len(text)

    def flush(self) -> None:
        if not self._closed:
            try:
                self._stream.flush()
            except BrokenPipeError:
                self._closed = True

    def __getattr__(self, name: str) -> Any:
        return getattr(self._stream, name)


def _tell(message: str) -> None:
    """Write to stderr from a signal handler: no buffered I/O (not reentrant), and a closed pipe (`| tee` killed by
    the same Ctrl-C) must not raise into the training step the signal interrupted."""
    try:
        os.write(2, message.encode())
    except OSError:
        pass


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
            if signal.getsignal(sig) is not signal.SIG_IGN:  # an ignored signal (e.g. SIGINT of `cmd &`) stays so
                self._previous[sig] = signal.signal(sig, self._handle)

    def uninstall(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)

    def _handle(self, signum: int, frame: object) -> None:
        name = signal.Signals(signum).name
        if self.signum is not None:
            _tell(f"\n{name} again: exiting now, without saving\n")
            signal.signal(signum, signal.SIG_DFL)
            os.kill(os.getpid(), signum)
            return
        self.signum = signum
        _tell(f"\n{name} received: finishing the current optimizer step, then saving a checkpoint (send it again "
              "to exit at once)\n")

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
