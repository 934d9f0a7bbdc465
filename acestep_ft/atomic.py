"""Atomic writes: build a file or directory beside its final name, then swap it into place.

Readers (resume, official loaders) only ever see the old complete directory or the new complete one. Files are
fsynced before the rename so a power cut cannot leave a renamed directory with empty files.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator


def fsync_path(path: Path) -> None:
    """fsync a file or a directory (a directory fsync makes a rename inside it durable)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextmanager
def atomic_directory(target: Path | str) -> Iterator[Path]:
    """Yield an empty hidden temp directory beside `target`; when the block succeeds it replaces `target`.

    On any exception (KeyboardInterrupt included) the temp directory is deleted and `target` is untouched.
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    try:
        yield tmp
        for root, _, files in os.walk(tmp):
            for name in files:
                fsync_path(Path(root) / name)
        if target.exists():  # swap: move the old one aside, rename the new one in, then delete the old
            old = Path(tempfile.mkdtemp(prefix=f".{target.name}.old-", dir=target.parent))
            os.replace(target, old / target.name)
            os.replace(tmp, target)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, target)
        fsync_path(target.parent)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def atomic_write_bytes(path: Path | str, data: bytes) -> None:
    """Write `path` via a temp file in the same directory, fsync, rename: readers see the old file or the new one."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
