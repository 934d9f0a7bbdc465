"""Atomic directory writes: build a directory beside its final name, then swap it into place.

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


def _fsync(path: Path) -> None:
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
                _fsync(Path(root) / name)
        if target.exists():  # swap: move the old one aside, rename the new one in, then delete the old
            old = Path(tempfile.mkdtemp(prefix=f".{target.name}.old-", dir=target.parent))
            os.replace(target, old / target.name)
            os.replace(tmp, target)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, target)
        _fsync(target.parent)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
