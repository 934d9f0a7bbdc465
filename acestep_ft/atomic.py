"""Atomic writes: build a file or directory beside its final name, then swap it into place.

Readers (resume, official loaders) only ever see the old complete directory or the new complete one. Files are
fsynced before the rename so a power cut cannot leave a renamed directory with empty files.

`tempfile` makes its temp directories 0700 and temp files 0600; renamed into place as they are, checkpoints and
exports would be unreadable to anyone else (an inference service running as another user). So the temp is chmodded
to what a plain `mkdir`/`open` would give: 0o777 or 0o666 less the process umask, and so is everything written into
a temp directory (some writers, e.g. safetensors' save_file, create 0600 files).
"""

from __future__ import annotations

import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator


def current_umask() -> int:
    """The process umask, read without changing it where the OS shows it (Linux), else by setting and restoring it."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    old = os.umask(0o077)  # strict in the brief window before the restore, in case another thread creates a file
    os.umask(old)
    return old


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
        umask = current_umask()
        os.chmod(tmp, 0o777 & ~umask)
        yield tmp
        for root, dirs, files in os.walk(tmp):
            for name in dirs:
                os.chmod(Path(root) / name, 0o777 & ~umask)
            for name in files:  # some writers (safetensors) create 0600 files: make them what open() would give
                os.chmod(Path(root) / name, 0o666 & ~umask)
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
            os.fchmod(f.fileno(), 0o666 & ~current_umask())
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


TRASH_PREFIX = ".trash-"


def delete_via_trash(path: Path | str) -> None:
    """Rename `path` to a hidden trash name beside it, then delete it: a kill midway never leaves a half-deleted
    visible entry (a hidden `.trash-*` one is left instead, which the next run start removes)."""
    path = Path(path)
    trash = path.with_name(f"{TRASH_PREFIX}{path.name}-{os.getpid()}")
    os.replace(path, trash)
    if trash.is_dir():
        shutil.rmtree(trash, ignore_errors=True)
    else:
        trash.unlink(missing_ok=True)
