"""Deterministic random crops of long clips to `dataset.max_seconds`.

    start, end = crop_window(T, max_frames, seed, epoch, index)   # pure function of its arguments
    sample = crop_sample(sample, start, end)                       # views along T, condition unchanged

The window of sample `index` in epoch `epoch` depends only on (T, max_frames, seed, epoch, index): a blake2b hash
of (seed, epoch, index) picks the start uniformly among the T - max_frames + 1 possible ones, so a resumed run crops
exactly as the uninterrupted one would, every process agrees, and no global RNG is touched. Clips no longer than
max_frames (or max_frames None / 0) are kept whole. The sampler batches by the cropped length,
`capped_lengths(lengths, max_frames)` = min(T, max_frames) per clip.
"""

from __future__ import annotations

import hashlib
from dataclasses import replace
from typing import Optional, Sequence

from acestep_ft.data.batch import Sample

FRAMES_PER_SECOND = 25
"""VAE latent frames per second of audio."""


def seconds_to_frames(seconds: Optional[float]) -> int:
    """Latent frames in `seconds` of audio (rounded); None or <= 0 -> 0, meaning "off" for max/bucket settings."""
    if seconds is None or seconds <= 0:
        return 0
    return max(1, int(round(seconds * FRAMES_PER_SECOND)))


def _uniform(seed: int, epoch: int, index: int, n: int) -> int:
    """A number in [0, n) determined by (seed, epoch, index) alone."""
    digest = hashlib.blake2b(f"crop:{int(seed)}:{int(epoch)}:{int(index)}".encode(), digest_size=16).digest()
    return int.from_bytes(digest, "little") % n  # 128-bit value: the modulo bias is negligible


def crop_window(length: int, max_frames: Optional[int], seed: int, epoch: int, index: int) -> tuple[int, int]:
    """(start, end) of the frames of sample `index` to train on in `epoch`; end - start = min(length, max_frames)."""
    if length < 0:
        raise ValueError(f"crop_window: length={length} must be >= 0")
    if not max_frames or max_frames <= 0 or length <= max_frames:
        return 0, length
    start = _uniform(seed, epoch, index, length - max_frames + 1)
    return start, start + max_frames


def crop_sample(sample: Sample, start: int, end: int) -> Sample:
    """`sample` restricted to frames [start, end): target_latents, attention_mask and context_latents are sliced
    along T (views, no copy); the condition (either set) and the key unchanged."""
    length = sample.target_latents.shape[0]
    if not 0 <= start < end <= length:
        raise ValueError(f"crop_sample: window [{start}, {end}) is outside the {length} frames of {sample.key!r}")
    if start == 0 and end == length:
        return sample
    return replace(
        sample,
        target_latents=sample.target_latents[start:end],
        attention_mask=sample.attention_mask[start:end],
        context_latents=sample.context_latents[start:end],
    )


def capped_lengths(lengths: Sequence[int], max_frames: Optional[int]) -> list[int]:
    """Frames each clip has after cropping: min(T, max_frames); unchanged when max_frames is None or 0."""
    if not max_frames or max_frames <= 0:
        return [int(t) for t in lengths]
    return [min(int(t), int(max_frames)) for t in lengths]
