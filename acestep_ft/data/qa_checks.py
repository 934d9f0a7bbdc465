"""Pure dataset QA checks for `python -m acestep_ft.data.validate`: a sample dict in, a list of `Problem`s out.

Nothing here reads files: `validate` does the I/O (streaming, one sample at a time) and feeds each loaded sample to
`check_sample` and its facts to a `Tally`, which produces the dataset-level problems (encoder width, duplicate keys,
duplicate contents) and the statistics (lengths, histogram, padding) once the scan is done.
"""

from __future__ import annotations

import hashlib
import math
import statistics
from collections import Counter
from dataclasses import asdict, dataclass
from typing import Any, Mapping, Optional

import torch
from torch import Tensor

from acestep_ft.data.crop import FRAMES_PER_SECOND, capped_lengths, seconds_to_frames
from acestep_ft.data.pt_format import MASK_KEYS, REQUIRED_KEYS
from acestep_ft.data.sampler import LengthBucketSampler

ERROR, WARNING = "error", "warning"
REPROCESS = "re-run the ACE-Step / Side-Step preprocessing for this sample, or remove it from the dataset."
# key -> expected dims; a letter is a length shared across keys, an int a fixed size
SPEC: dict[str, tuple] = {
    "target_latents": ("T", 64),
    "attention_mask": ("T",),
    "encoder_hidden_states": ("L", "H"),
    "encoder_attention_mask": ("L",),
    "context_latents": ("T", 128),
}


@dataclass(frozen=True)
class Problem:
    """One finding. `check` groups findings of one kind; `key` is the tensor key, `sample` the sample key."""

    severity: str            # "error" (training would fail or learn garbage) or "warning"
    check: str               # short kind, e.g. "non_finite", "shape", "checksum"
    where: str               # file, or shard @ byte offset, or the dataset directory
    message: str             # what was found (and what was expected)
    fix: str
    sample: Optional[str] = None
    key: Optional[str] = None

    def line(self) -> str:
        head = self.where + (f": sample '{self.sample}'" if self.sample is not None else "")
        return head + (f": key '{self.key}'" if self.key is not None else "") + f": {self.message}"

    def to_dict(self) -> dict:
        return asdict(self)


def _shape(t: Tensor) -> str:
    return "[" + ", ".join(str(s) for s in t.shape) + "]"


def _bad_values(t: Tensor) -> int:
    return int((~torch.isfinite(t)).sum()) if t.is_floating_point() else 0


def check_sample(obj: Any, where: str, sample: Optional[str], min_seconds: float = 1.0) -> list[Problem]:
    """Every problem of one loaded sample (a .pt dict or a v3 sample's tensors); never raises on bad content."""
    out: list[Problem] = []

    def add(severity: str, check: str, message: str, key: Optional[str] = None, fix: str = REPROCESS) -> None:
        out.append(Problem(severity, check, where, message, fix, sample, key))

    if not isinstance(obj, Mapping):
        add(ERROR, "not_a_sample", f"is a {type(obj).__name__}, expected a dict with keys {list(REQUIRED_KEYS)}",
            fix="keep only per-sample .pt files of the preprocessor in the dataset directory.")
        return out
    missing = [k for k in REQUIRED_KEYS if k not in obj]
    if missing:
        add(ERROR, "missing_key", f"missing; the sample has keys {sorted(map(str, obj))}", key=", ".join(missing))
    tensors: dict[str, Tensor] = {}
    for k in REQUIRED_KEYS:
        if k in obj and not isinstance(obj[k], Tensor):
            add(ERROR, "not_tensor", f"is a {type(obj[k]).__name__}, expected a torch.Tensor", key=k)
        elif k in obj:
            tensors[k] = obj[k]
    for k, t in tensors.items():
        if k not in MASK_KEYS and not t.is_floating_point():
            add(ERROR, "dtype", f"dtype {t.dtype}, expected a floating dtype (float32, bfloat16 or float16)", key=k)

    # shapes, then one T and one L across keys
    sizes: dict[str, dict[str, int]] = {"T": {}, "L": {}}
    good: dict[str, Tensor] = {}
    for k, t in tensors.items():
        dims = SPEC[k]
        fixed_ok = t.ndim == len(dims) and all(isinstance(d, str) or t.shape[j] == d for j, d in enumerate(dims))
        if not fixed_ok:
            text = "[" + ", ".join(map(str, dims)) + "]"
            add(ERROR, "shape", f"shape {_shape(t)}, expected {text}", key=k)
            continue
        good[k] = t
        for j, d in enumerate(dims):
            if d in sizes:
                sizes[d][k] = int(t.shape[j])
    for letter, first in (("T", "target_latents"), ("L", "encoder_hidden_states")):
        seen = sizes[letter]
        ref_key = first if first in seen else next(iter(seen), None)
        for k, n in seen.items():
            if k != ref_key and n != seen[ref_key]:
                add(ERROR, "length_mismatch", f"{letter} = {n}, but {ref_key} has {letter} = {seen[ref_key]}",
                    key=k)
        if ref_key is not None and seen[ref_key] == 0:
            add(ERROR, "empty", f"{letter} = 0 (an empty {'clip' if letter == 'T' else 'condition'})", key=ref_key,
                fix="remove this sample (training refuses it), or re-run preprocessing for it.")

    # values
    for k, t in tensors.items():
        bad = _bad_values(t)
        if bad:
            add(ERROR, "non_finite", f"{bad} NaN/Inf of {t.numel()} values", key=k,
                fix="re-run preprocessing for this sample (NaN/Inf usually means an fp16 overflow in the VAE or "
                "encoder; preprocess in bf16 or fp32), or remove it from the dataset.")
    for k in MASK_KEYS:
        t = good.get(k)
        if t is None or t.numel() == 0:
            continue
        wrong = int(((t != 0) & (t != 1)).sum())
        if wrong:
            add(ERROR, "mask_values", f"{wrong} of {t.numel()} values are not 0 or 1", key=k)
            continue
        valid = t != 0
        if k == "attention_mask" and not bool(valid.all()):
            add(WARNING, "attention_mask_padding",
                f"{int((~valid).sum())} of {t.numel()} frames are masked out (official data has all ones)", key=k,
                fix="check the preprocessing: padding is added per batch by collate, a stored sample has none.")
        if k == "encoder_attention_mask":
            if not bool(valid.any()):
                add(WARNING, "no_condition", "no valid token (all zeros): the sample trains unconditioned", key=k)
            elif bool((valid[1:] & ~valid[:-1]).any()):
                add(WARNING, "valid_first", "valid tokens are not packed first (a 0 before a 1)", key=k,
                    fix="re-run preprocessing with a version that packs valid tokens first (the model expects "
                    "[valid..., padding...]).")
    ctx = good.get("context_latents")
    if ctx is not None and ctx.shape[0]:
        chunk = ctx[:, 64:]
        off = int((chunk != 1).sum())
        if off:
            add(WARNING, "chunk_mask", f"{off} of {chunk.numel()} chunk-mask values (channels 64-127) are not 1",
                key="context_latents",
                fix="text2music data has an all-ones chunk mask; check that this sample was preprocessed for the "
                "task you train.")
    t_len = sizes["T"].get("target_latents")
    if t_len and t_len / FRAMES_PER_SECOND < min_seconds:
        add(WARNING, "too_short", f"{t_len / FRAMES_PER_SECOND:.2f} s ({t_len} frames), shorter than "
            f"--min-seconds {min_seconds:g}", key="target_latents",
            fix="remove very short clips, or lower --min-seconds if they are intended.")
    return out


def sample_facts(obj: Any) -> tuple[Optional[int], Optional[int], Optional[str]]:
    """(T, H_enc, a digest of the tensors' dtypes, shapes and bytes); None where not readable."""
    if not isinstance(obj, Mapping):
        return None, None, None
    target, hidden = obj.get("target_latents"), obj.get("encoder_hidden_states")
    t_len = int(target.shape[0]) if isinstance(target, Tensor) and target.ndim == 2 else None
    width = int(hidden.shape[-1]) if isinstance(hidden, Tensor) and hidden.ndim == 2 else None
    h = hashlib.blake2b(digest_size=16)
    for k in REQUIRED_KEYS:
        t = obj.get(k)
        if isinstance(t, Tensor):
            h.update(f"{k}/{t.dtype}/{tuple(t.shape)}".encode())
            h.update(t.detach().contiguous().reshape(-1).view(torch.uint8).numpy())
    return t_len, width, h.hexdigest() if t_len else None


class Tally:
    """Per-sample facts accumulated during the scan (ints and short strings, never tensors)."""

    def __init__(self) -> None:
        self.frames: list[int] = []
        self.widths: list[tuple[str, Optional[str], int]] = []
        self.keys: list[tuple[str, str]] = []  # (sample key, where)
        self.digests: dict[str, tuple[str, str]] = {}
        self.content_dups: list[Problem] = []

    def add(self, where: str, sample: str, obj: Any) -> None:
        t_len, width, digest = sample_facts(obj)
        if t_len is not None:
            self.frames.append(t_len)
        if width is not None:
            self.widths.append((where, sample, width))
        if digest is not None:
            first = self.digests.setdefault(digest, (sample, where))
            if first[1] != where:
                self.content_dups.append(Problem(
                    WARNING, "duplicate_content", where, f"same tensors as sample '{first[0]}' ({first[1]})",
                    "remove one copy (a duplicate is trained twice as often).", sample))

    def width_problems(self, expected: Optional[int]) -> tuple[Optional[int], list[Problem]]:
        """(width the samples are judged by: `expected`, else the most common one; problems of other widths)."""
        counts = Counter(w for _, _, w in self.widths)
        if expected is None:
            if not counts:
                return None, []
            expected = counts.most_common(1)[0][0]
        out = [Problem(ERROR, "encoder_width", where, f"H_enc = {w}, expected {expected}",
                       f"re-run preprocessing for this sample with the checkpoint of the variant you train "
                       f"(encoder_hidden_size {expected}), or remove it.", sample, "encoder_hidden_states")
               for where, sample, w in self.widths if w != expected]
        return expected, out

    def key_problems(self, origin: str) -> list[Problem]:
        """Sample keys that occur more than once (the same entry listed twice, or two files with one name)."""
        seen: dict[str, list[str]] = {}
        for key, where in self.keys:
            seen.setdefault(key, []).append(where)
        out = []
        for key, places in seen.items():
            if len(places) > 1:
                same = len(set(places)) == 1
                what = f"the same file listed {len(places)} times" if same else "different files: " + ", ".join(places)
                fix = (f"remove the repeated entries from {origin}." if same
                       else "rename all but one of the files (keys must be unique), or remove the duplicates.")
                out.append(Problem(ERROR, "duplicate_key", places[0],
                                   f"key occurs {len(places)} times in {origin} ({what})", fix, key))
        return out


def length_stats(frames: list[int]) -> dict:
    if not frames:
        return {"count": 0, "total_hours": 0.0, "min_s": None, "median_s": None, "max_s": None}
    sec = [f / FRAMES_PER_SECOND for f in frames]
    return {"count": len(sec), "total_hours": sum(sec) / 3600, "min_s": min(sec),
            "median_s": statistics.median(sec), "max_s": max(sec)}


def histogram(frames: list[int], bucket_seconds: float, max_bins: int = 40) -> dict:
    """Clip counts per length bucket [lo, hi) seconds; bins are widened (x k) when there would be > max_bins."""
    width = bucket_seconds if bucket_seconds and bucket_seconds > 0 else 10.0
    if not frames:
        return {"bucket_seconds": width, "bins": []}
    top = max(frames) / FRAMES_PER_SECOND
    width *= max(1, math.ceil((math.floor(top / width) + 1) / max_bins))
    counts = Counter(int(f / FRAMES_PER_SECOND // width) for f in frames)
    bins = [{"lo_s": b * width, "hi_s": (b + 1) * width, "count": counts.get(b, 0)}
            for b in range(min(counts), max(counts) + 1)]
    return {"bucket_seconds": width, "bins": bins}


def padding(frames: list[int], batch_size: int, bucket_seconds: float, max_frames_per_batch: int,
            max_seconds: Optional[float], seed: int = 0) -> Optional[dict]:
    """`LengthBucketSampler.padding_stats` of the configured batching (lengths after the crop cap), which also
    holds the naive pad-to-longest random batches (naive_*)."""
    if not frames:
        return None
    lengths = capped_lengths(frames, seconds_to_frames(max_seconds))
    sampler = LengthBucketSampler(lengths, batch_size, seed=seed, shuffle=True,
                                  bucket_frames=seconds_to_frames(bucket_seconds),
                                  max_frames_per_batch=max_frames_per_batch)
    return {**sampler.padding_stats(), "batches_per_epoch": sampler.batches_per_epoch,
            "num_buckets": sampler.num_buckets}
