"""Find the per-sample `.pt` files of a preprocessed dataset directory (which files, in which order, under which key).

Three layouts are read unchanged:
- official ACE-Step preprocessor: `manifest.json` = {"metadata": {...}, "samples": [paths], "num_samples": N};
- Side-Step: `preprocess_meta.json` (settings and checksums, no file list) beside the `*.pt` files;
- a bare directory of `*.pt` files.
With a manifest, its "samples" order is kept. Otherwise the directory's `*.pt` files are scanned (not recursive),
sorted by name, skipping Side-Step's pass-1 intermediates `*.tmp.pt`.

A manifest entry is resolved by trying, in order: the dataset directory joined with the entry, the entry as written
(absolute, or relative to the working directory, as the official loader does), and finally the dataset directory
joined with the entry's file name (a dataset directory moved after preprocessing). Windows backslashes are accepted.
Every entry that resolves to nothing is reported by name, all at once, when the index is built.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from acestep_ft.data.errors import DataError, data_error

MANIFEST = "manifest.json"
SIDESTEP_META = "preprocess_meta.json"
INTERMEDIATE_SUFFIX = ".tmp.pt"
MAX_LISTED_MISSING = 20
_WINDOWS_ABS = re.compile(r"^[A-Za-z]:/|^//")


@dataclass(frozen=True)
class SampleIndex:
    """The resolved, existing sample files of one dataset directory, with one unique key per file."""

    root: Path
    paths: list[Path]
    keys: list[str]
    layout: str  # "manifest.json", "preprocess_meta.json + scan" or "scan"


def _candidates(entry: str, root: Path) -> list[Path]:
    """Paths to try for one manifest entry, in order, without duplicates."""
    text = entry.strip().replace("\\", "/")
    as_written = Path(text).expanduser()
    found: list[Path] = []
    if not (as_written.is_absolute() or _WINDOWS_ABS.match(text)):
        found.append(root / as_written)
    found.append(as_written)
    name = PurePosixPath(text).name
    if name:
        found.append(root / name)
    unique: list[Path] = []
    for path in found:
        if path not in unique:
            unique.append(path)
    return unique


def _read_manifest(manifest: Path) -> list[str]:
    try:
        content = json.loads(manifest.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise data_error(
            manifest, "is not valid JSON", found=str(exc),
            fix="repair the file (on Windows write backslashes as \\\\ or use forward slashes), or delete it to "
            "scan the directory's *.pt files instead.",
        ) from exc
    samples = content.get("samples") if isinstance(content, dict) else None
    if not isinstance(samples, list):
        raise data_error(
            manifest, "has no list under \"samples\"", found=type(samples).__name__,
            expected='{"samples": ["a.pt", "b.pt", ...]} as written by the ACE-Step preprocessor',
            fix="re-run preprocessing, or delete manifest.json to scan the directory's *.pt files instead.",
        )
    for i, entry in enumerate(samples):
        if not isinstance(entry, str) or not entry.strip():
            raise data_error(
                manifest, f"samples[{i}] is not a file path", found=repr(entry), expected="a non-empty string",
                fix="correct or remove that entry.",
            )
    if not samples:
        raise data_error(manifest, "lists no samples", fix="re-run preprocessing on a folder with audio files.")
    return samples


def _resolve_manifest(manifest: Path, root: Path) -> list[Path]:
    resolved: list[Path] = []
    missing: list[str] = []
    entries = _read_manifest(manifest)
    for entry in entries:
        tried = _candidates(entry, root)
        hit = next((p for p in tried if p.is_file()), None)
        if hit is None:
            missing.append(f"  - {entry!r} (tried: {', '.join(str(p) for p in tried)})")
        else:
            resolved.append(hit)
    if missing:
        shown = missing[:MAX_LISTED_MISSING]
        more = len(missing) - len(shown)
        listing = "\n".join(shown) + (f"\n  ... and {more} more" if more else "")
        raise DataError(
            f"{manifest}: {len(missing)} of {len(entries)} sample files listed under \"samples\" were not found:\n"
            f"{listing}\nFix: copy the missing .pt files into {root}, correct their paths in manifest.json, or "
            "re-run preprocessing."
        )
    return resolved


def _scan(root: Path) -> list[Path]:
    pts = sorted(p for p in root.glob("*.pt") if p.is_file())
    samples = [p for p in pts if not p.name.endswith(INTERMEDIATE_SUFFIX)]
    if not samples:
        skipped = len(pts) - len(samples)
        hint = (
            f" ({skipped} Side-Step intermediate *{INTERMEDIATE_SUFFIX} files skipped: preprocessing pass 2 did "
            "not finish)" if skipped else ""
        )
        raise data_error(
            root, f"no training samples: no {MANIFEST} and no *.pt files{hint}",
            fix="point dataset.path at the output directory of the ACE-Step or Side-Step preprocessor.",
        )
    return samples


def _unique_keys(paths: list[Path]) -> list[str]:
    """File stems; a repeated stem gets '#2', '#3', ... so keys stay unique."""
    seen: dict[str, int] = {}
    keys: list[str] = []
    for path in paths:
        stem = path.name[: -len(".pt")] if path.name.endswith(".pt") else path.stem
        seen[stem] = seen.get(stem, 0) + 1
        keys.append(stem if seen[stem] == 1 else f"{stem}#{seen[stem]}")
    return keys


def index_directory(path: str | Path) -> SampleIndex:
    """Locate the samples of a dataset directory (a path to its manifest.json is accepted too)."""
    root = Path(path).expanduser()
    if root.is_file() and root.name == MANIFEST:
        root = root.parent
    if not root.is_dir():
        raise data_error(
            root, "dataset directory does not exist" if not root.exists() else "is not a directory",
            fix="set dataset.path to the directory holding the preprocessed .pt files (and manifest.json).",
        )
    manifest = root / MANIFEST
    if manifest.is_file():
        paths, layout = _resolve_manifest(manifest, root), MANIFEST
    else:
        paths = _scan(root)
        layout = f"{SIDESTEP_META} + scan" if (root / SIDESTEP_META).is_file() else "scan"
    return SampleIndex(root=root, paths=paths, keys=_unique_keys(paths), layout=layout)
