"""User errors: one exception type for everything a user can fix (config, data, checkpoints, disk), raised where the
problem is found and printed once, as its message, by the entry points (train.py, scripts/, `python -m ...`).

    raise ConfigError("optim.lr=0 must be > 0.")                  # exit 2: usage / config
    raise UserError("cannot resume from ...: ... Fix: ...")        # exit 1: refused or failed

    def main() -> int:
        with reported_errors():                                    # message only, exit status from the error
            ...

Exit statuses of every entry point: 0 done, 1 refused or failed, 2 usage / config error, 128+N stopped by signal N
after saving a checkpoint (130 Ctrl-C, 143 SIGTERM, 138 SIGUSR1, 140 SIGUSR2). `HYDRA_FULL_ERROR=1` in the environment
prints the traceback as well.
"""

from __future__ import annotations

import os
import sys
import traceback
from contextlib import contextmanager
from typing import Iterator

EXIT_FAILED = 1
EXIT_USAGE = 2
EXIT_INTERRUPTED = 130  # Ctrl-C outside the training loop (nothing to save)
TRACEBACK_ENV = "HYDRA_FULL_ERROR"


class UserError(Exception):
    """Something the user can fix; the message names the file / setting and the fix. Exit status 1."""

    exit_code = EXIT_FAILED


class ConfigError(UserError):
    """A setting or command line that cannot work. Exit status 2."""

    exit_code = EXIT_USAGE


def show_tracebacks() -> bool:
    return os.environ.get(TRACEBACK_ENV, "") not in ("", "0")


@contextmanager
def reported_errors(keep_going: bool = False) -> Iterator[None]:
    """Turn a UserError into its message on stderr and its exit status, and Ctrl-C into exit 130, without a
    traceback (unless HYDRA_FULL_ERROR=1). `keep_going` (a job of a Hydra multirun): print the message, then raise
    the error on, so the launcher records this job as failed and runs the others."""
    try:
        yield
    except UserError as err:
        if show_tracebacks():
            traceback.print_exc()
        print(f"Error: {err}", file=sys.stderr, flush=True)
        if keep_going:
            raise
        raise SystemExit(err.exit_code) from None
    except KeyboardInterrupt:
        if show_tracebacks():
            traceback.print_exc()
        print("Interrupted (Ctrl-C).", file=sys.stderr, flush=True)
        raise SystemExit(EXIT_INTERRUPTED) from None
