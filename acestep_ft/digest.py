"""File digests for integrity checks (checkpoint manifests): xxh3-64, the hash the v3 data format uses, streamed in
blocks so multi-GB weight files never sit in memory (xxh3 runs at several GB/s: reading the file dominates)."""

from __future__ import annotations

from pathlib import Path

import xxhash

ALGORITHM = "xxh3_64"
BLOCK = 16 * 2**20  # bytes per read


def file_digest(path: Path | str) -> str:
    """Hex xxh3-64 of a file's bytes."""
    h = xxhash.xxh3_64()
    with open(path, "rb") as f:
        while block := f.read(BLOCK):
            h.update(block)
    return h.hexdigest()
