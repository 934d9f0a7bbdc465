"""The one error type of the input pipeline: `DataError`, raised for anything wrong with the data itself.

Every message says where (file and, where it applies, tensor key), what was found, what was expected, and how to fix
it, so a user with a broken dataset directory can act on the message without reading code.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

from acestep_ft.errors import UserError


class DataError(UserError, ValueError):
    """Bad or missing training data (a file, a manifest entry, a tensor's shape/dtype/values). A UserError (exit
    status 1) and, for older callers, a ValueError."""


def data_error(
    where: str | Path,
    problem: str,
    *,
    key: Optional[str] = None,
    found: Optional[str] = None,
    expected: Optional[str] = None,
    fix: Optional[str] = None,
) -> DataError:
    """Build a `DataError` with the standard layout; `raise data_error(...)` at the call site.

    Example: ``/data/song.pt: key 'context_latents': wrong shape; found [100, 65], expected [100, 128] ...``
    """
    head = f"{where}: " + (f"key '{key}': " if key is not None else "") + problem
    parts = [head]
    if found is not None:
        parts.append(f"found {found}")
    if expected is not None:
        parts.append(f"expected {expected}")
    message = "; ".join(parts) + "."
    if fix:
        message += f" Fix: {fix}"
    return DataError(message)
