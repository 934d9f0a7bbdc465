"""Pure dataset QA checks for `python -m acestep_ft.data.validate`: a sample dict in, a list of `Problem`s out.

Nothing here reads files: `validate` does the I/O (streaming, one sample at a time) and feeds each loaded sample to
`check_sample` and its facts to a `Tally`, which produces the dataset-level problems (encoder and text widths, the
condition sets the samples carry, duplicate keys, duplicate contents) and the statistics (lengths, histogram,
padding) once the scan is done. A sample is checked for the common keys and the condition sets it carries (or the
one asked for), with the shapes, dtypes and sizes of `pt_format.SPEC`.
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

from acestep_ft.config import Conditions
from acestep_ft.data.batch import OPTIONAL_INPUT_KEYS, carried_sets
from acestep_ft.data.crop import FRAMES_PER_SECOND, capped_lengths, seconds_to_frames
from acestep_ft.data.pt_format import IDS, KIND_DTYPES, MASK_KEYS, SET_FIX, SPEC, dtype_fits, sample_keys
from acestep_ft.data.sampler import LengthBucketSampler

ERROR, WARNING = "error", "warning"
REPROCESS = ("re-run the preprocessing (scripts/preprocess.py, or the ACE-Step / Side-Step preprocessor) for this "
             "sample, or remove it from the dataset.")
LENGTHS = {"T": "an empty clip", "L": "an empty condition", "Lt": "an empty caption", "Ll": "no lyric token",
           "R": "no timbre reference", "Tr": "an empty timbre reference"}
"""Sizes that must not be 0, and what a 0 means. T, L, Lt and Ll are shared by several keys and must agree."""
WIDTHS = {"encoder": ("H_enc", "encoder_hidden_states"), "text": ("D_text", "text_hidden_states")}


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


def checked_sets(obj: Mapping, conditions: Optional[Conditions]) -> tuple[list[Conditions], bool]:
    """(the condition sets to check in a sample, whether it lacks the requested one): the requested set when the
    sample carries it (or carries none), else the sets it carries; conditions None = every set it carries (the
    official encoder_outputs keys when it carries none)."""
    carried = carried_sets(obj)
    if conditions is None:
        return carried or [Conditions.encoder_outputs], False
    if conditions in carried or not carried:
        return [Conditions(conditions)], False
    return carried, True


def check_sample(obj: Any, where: str, sample: Optional[str], min_seconds: float = 1.0,
                 conditions: Optional[Conditions] = None, vocab: Optional[int] = None) -> list[Problem]:
    """Every problem of one loaded sample (a .pt dict or a v3 sample's tensors); never raises on bad content.

    `conditions`: the condition set to check (a sample without it is an error), None = the sets it carries.
    `vocab`: token ids must be below it (None = only >= 0)."""
    out: list[Problem] = []

    def add(severity: str, check: str, message: str, key: Optional[str] = None, fix: str = REPROCESS) -> None:
        out.append(Problem(severity, check, where, message, fix, sample, key))

    if not isinstance(obj, Mapping):
        add(ERROR, "not_a_sample", f"is a {type(obj).__name__}, expected a dict with keys "
            f"{sample_keys([Conditions.encoder_outputs])}",
            fix="keep only per-sample .pt files of the preprocessor in the dataset directory.")
        return out
    sets, lacking = checked_sets(obj, conditions)
    if lacking:
        add(ERROR, "missing_set", f"carries no {conditions} condition set (it carries {' + '.join(sets)})",
            fix=SET_FIX[Conditions(conditions)])
    keys = sample_keys(sets, [k for k in OPTIONAL_INPUT_KEYS if k in obj])
    missing = [k for k in keys if k not in obj]
    if missing:
        add(ERROR, "missing_key", f"missing; the sample has keys {sorted(map(str, obj))}", key=", ".join(missing))
    tensors: dict[str, Tensor] = {}
    for k in keys:
        if k in obj and not isinstance(obj[k], Tensor):
            add(ERROR, "not_tensor", f"is a {type(obj[k]).__name__}, expected a torch.Tensor", key=k)
        elif k in obj:
            tensors[k] = obj[k]
    for k, t in tensors.items():
        if not dtype_fits(SPEC[k][1], t.dtype):
            add(ERROR, "dtype", f"dtype {t.dtype}, expected {KIND_DTYPES[SPEC[k][1]]}", key=k)
    good, sizes = _check_shapes(tensors, add)
    _check_values(tensors, good, vocab, add)
    t_len = sizes["T"].get("target_latents")
    if t_len and t_len / FRAMES_PER_SECOND < min_seconds:
        add(WARNING, "too_short", f"{t_len / FRAMES_PER_SECOND:.2f} s ({t_len} frames), shorter than "
            f"--min-seconds {min_seconds:g}", key="target_latents",
            fix="remove very short clips, or lower --min-seconds if they are intended.")
    return out


def _check_shapes(tensors: dict[str, Tensor], add) -> tuple[dict[str, Tensor], dict[str, dict[str, int]]]:
    """Tensors of the documented rank and fixed sizes, and per shared size (T, L, ...) the size each key has;
    reports wrong shapes, sizes that disagree across keys, and empty ones."""
    sizes: dict[str, dict[str, int]] = {letter: {} for letter in LENGTHS}
    good: dict[str, Tensor] = {}
    for k, t in tensors.items():
        dims = SPEC[k][0]
        fixed_ok = t.ndim == len(dims) and all(isinstance(d, str) or t.shape[j] == d for j, d in enumerate(dims))
        if not fixed_ok:
            text = "[" + ", ".join(map(str, dims)) + "]"
            add(ERROR, "shape", f"shape {_shape(t)}, expected {text}", key=k)
            continue
        good[k] = t
        for j, d in enumerate(dims):
            if d in sizes:
                sizes[d][k] = int(t.shape[j])
    for letter, seen in sizes.items():
        ref_key = next(iter(seen), None)  # keys come in checking order: the first defines the size
        for k, n in seen.items():
            if k != ref_key and n != seen[ref_key]:
                add(ERROR, "length_mismatch", f"{letter} = {n}, but {ref_key} has {letter} = {seen[ref_key]}",
                    key=k)
        if ref_key is not None and seen[ref_key] == 0:
            add(ERROR, "empty", f"{letter} = 0 ({LENGTHS[letter]})", key=ref_key,
                fix="remove this sample (training refuses it), or re-run preprocessing for it.")
    return good, sizes


def _check_values(tensors: dict[str, Tensor], good: dict[str, Tensor], vocab: Optional[int], add) -> None:
    """NaN/Inf, token ids out of range, mask values, and the warnings about masks and the chunk mask."""
    for k, t in tensors.items():
        bad = _bad_values(t)
        if bad:
            add(ERROR, "non_finite", f"{bad} NaN/Inf of {t.numel()} values", key=k,
                fix="re-run preprocessing for this sample (NaN/Inf usually means an fp16 overflow in the VAE or "
                "encoder; preprocess in bf16 or fp32), or remove it from the dataset.")
        if SPEC[k][1] == IDS and dtype_fits(IDS, t.dtype) and t.numel():
            low, high = int(t.min()), int(t.max())
            if low < 0 or (vocab is not None and high >= vocab):
                bound = f"[0, {vocab}) (--vocab-size)" if vocab is not None else ">= 0"
                add(ERROR, "token_id", f"ids from {low} to {high}, expected ids in {bound}", key=k,
                    fix="tokenize with the model's text encoder and tokenizer (re-run scripts/preprocess.py with it).")
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


@dataclass(frozen=True)
class Facts:
    """What the dataset-level checks need of one sample (ints and short strings, never tensors)."""

    frames: Optional[int]          # T
    widths: dict[str, int]         # "encoder": H_enc, "text": D_text (where readable)
    sets: tuple[str, ...]          # condition sets carried
    token_ids: bool                # carries text_token_ids
    digest: Optional[str]          # of the tensors' dtypes, shapes and bytes


def sample_facts(obj: Any) -> Facts:
    """The `Facts` of one loaded sample; None / empty where not readable."""
    if not isinstance(obj, Mapping):
        return Facts(None, {}, (), False, None)
    target = obj.get("target_latents")
    t_len = int(target.shape[0]) if isinstance(target, Tensor) and target.ndim == 2 else None
    widths = {kind: int(t.shape[-1]) for kind, (_, key) in WIDTHS.items()
              for t in [obj.get(key)] if isinstance(t, Tensor) and t.ndim == 2}
    h = hashlib.blake2b(digest_size=16)
    for k in SPEC:
        t = obj.get(k)
        if isinstance(t, Tensor):
            h.update(f"{k}/{t.dtype}/{tuple(t.shape)}".encode())
            h.update(t.detach().contiguous().reshape(-1).view(torch.uint8).numpy())
    return Facts(t_len, widths, tuple(carried_sets(obj)), "text_token_ids" in obj, h.hexdigest() if t_len else None)


class Tally:
    """Per-sample facts accumulated during the scan (ints and short strings, never tensors)."""

    def __init__(self) -> None:
        self.frames: list[int] = []
        self.widths: dict[str, list[tuple[str, Optional[str], int]]] = {kind: [] for kind in WIDTHS}
        self.sets: list[tuple[str, str, tuple[str, ...], bool]] = []  # (where, sample, sets, has text_token_ids)
        self.keys: list[tuple[str, str]] = []  # (sample key, where)
        self.digests: dict[str, tuple[str, str]] = {}
        self.content_dups: list[Problem] = []

    def add(self, where: str, sample: str, obj: Any) -> None:
        facts = sample_facts(obj)
        if facts.frames is not None:
            self.frames.append(facts.frames)
        for kind, width in facts.widths.items():
            self.widths[kind].append((where, sample, width))
        self.sets.append((where, sample, facts.sets, facts.token_ids))
        if facts.digest is not None:
            first = self.digests.setdefault(facts.digest, (sample, where))
            if first[1] != where:
                self.content_dups.append(Problem(
                    WARNING, "duplicate_content", where, f"same tensors as sample '{first[0]}' ({first[1]})",
                    "remove one copy (a duplicate is trained twice as often).", sample))

    def width_problems(self, expected: Optional[int], kind: str = "encoder") -> tuple[Optional[int], list[Problem]]:
        """(width the samples are judged by: `expected`, else the most common one; problems of other widths) for
        kind "encoder" (H_enc) or "text" (D_text)."""
        counts = Counter(w for _, _, w in self.widths[kind])
        if expected is None:
            if not counts:
                return None, []
            expected = counts.most_common(1)[0][0]
        name, key = WIDTHS[kind]
        what = ("the checkpoint of the variant you train (encoder_hidden_size" if kind == "encoder"
                else "the text encoder of the model you train (text_hidden_dim")
        out = [Problem(ERROR, f"{kind}_width", where, f"{name} = {w}, expected {expected}",
                       f"re-run preprocessing for this sample with {what} {expected}), or remove it.", sample, key)
               for where, sample, w in self.widths[kind] if w != expected]
        return expected, out

    def condition_sets(self, where: str) -> tuple[dict, list[Problem]]:
        """({"all": sets every read sample carries, "some": sets only some carry}, problems): no common set is an
        error, a set carried by some samples only a warning, text_token_ids in some encoder_inputs samples only an
        error (a batch mixing both cannot be collated)."""
        read = [s for s in self.sets if s[2]]
        counts = Counter(c for _, _, sets, _ in read for c in sets)
        every = sorted(c for c, n in counts.items() if n == len(read))
        some = sorted(c for c in counts if c not in every)
        out = []
        if read and not every:
            out.append(Problem(ERROR, "conditions", where, "no condition set is carried by every sample: "
                               + ", ".join(f"{counts[c]} of {len(read)} carry {c}" for c in sorted(counts)),
                               "re-run scripts/preprocess.py so that every sample stores the same sets "
                               "(preprocess.store), or split the dataset."))
        for c in some if every else []:
            out.append(Problem(WARNING, "conditions", where, f"{c} is carried by {counts[c]} of {len(read)} samples "
                               f"only; dataset.conditions={c} fails on the others",
                               f"train with dataset.conditions={every[0]}, or re-run preprocessing for the rest."))
        inputs = [s for s in read if Conditions.encoder_inputs in s[2]]
        with_ids = [s for s in inputs if s[3]]
        if 0 < len(with_ids) < len(inputs):
            without = next(s for s in inputs if not s[3])
            out.append(Problem(ERROR, "text_token_ids", without[0], f"text_token_ids in {len(with_ids)} of "
                               f"{len(inputs)} encoder_inputs samples only (none in this one): a batch mixing both "
                               "cannot be collated", "re-run scripts/preprocess.py for the samples without it, or "
                               "remove text_token_ids from all.", without[1], "text_token_ids"))
        return {"all": every, "some": some}, out

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
