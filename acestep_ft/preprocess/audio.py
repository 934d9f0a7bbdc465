"""Audio files in, stereo float32 at the VAE's sample rate out (chain step 1 of the official preprocessor).

    rels = discover(input_dir)                       # sorted relative paths of wav/flac/mp3/ogg/opus files
    clip = read_audio(input_dir / rels[0], 48000, max_seconds=240.0)   # Clip(samples [2, S], ...)

Mono is duplicated, more than two channels keep the first two (as the official preprocessor), resampling is
`scipy.signal.resample_poly` (polyphase, anti-aliased), and audio longer than `max_seconds` is truncated. A file that
cannot be used raises `AudioProblem` with a one-line reason; the driver reports it and goes on with the next song.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import soundfile as sf
import torch
from scipy.signal import resample_poly
from torch import Tensor

AUDIO_SUFFIXES = (".wav", ".flac", ".mp3", ".ogg", ".opus")
MIN_SECONDS = 1.0
"""Shorter clips are skipped: under a second of music is almost always a broken or placeholder file."""


class AudioProblem(Exception):
    """A file that is skipped, with the reason as the message (unreadable, empty, too short, non-finite)."""


@dataclass
class Clip:
    samples: Tensor          # [2, S] float32 at `sample_rate`, S <= max_seconds * sample_rate
    sample_rate: int         # Hz (the VAE's)
    source_seconds: float    # length of the file before truncation
    source_rate: int         # Hz of the file
    source_channels: int

    @property
    def seconds(self) -> float:
        return self.samples.shape[1] / self.sample_rate


def discover(input_dir: Path) -> list[str]:
    """Relative POSIX paths of the audio files under `input_dir` (recursive, sorted, hidden entries skipped)."""
    found = []
    for path in input_dir.rglob("*"):
        rel = path.relative_to(input_dir)
        if any(part.startswith(".") for part in rel.parts) or not path.is_file():
            continue
        if path.suffix.lower() in AUDIO_SUFFIXES:
            found.append(rel.as_posix())
    return sorted(found)


def to_stereo(data: np.ndarray) -> np.ndarray:
    """[S, C] -> [2, S]: mono duplicated, channels beyond the second dropped (official)."""
    if data.shape[1] == 1:
        data = np.repeat(data, 2, axis=1)
    return np.ascontiguousarray(data[:, :2].T)


def resample(x: np.ndarray, source_rate: int, target_rate: int) -> np.ndarray:
    """[C, S] at source_rate -> [C, S'] at target_rate (polyphase; identity when the rates agree)."""
    if source_rate == target_rate:
        return x
    g = math.gcd(source_rate, target_rate)
    return resample_poly(x, target_rate // g, source_rate // g, axis=-1).astype(np.float32)


def read_audio(path: Path, sample_rate: int, max_seconds: float) -> Clip:
    """Decode `path` with soundfile, to stereo float32 at `sample_rate`, truncated to `max_seconds`."""
    try:
        info = sf.info(str(path))
        keep = min(info.frames, math.ceil(max_seconds * info.samplerate) + 64)  # + a little for the filter's edge
        data, rate = sf.read(str(path), frames=keep, dtype="float32", always_2d=True)
    except Exception as exc:  # soundfile raises LibsndfileError / RuntimeError / ValueError by format
        raise AudioProblem(f"unreadable ({type(exc).__name__}: {str(exc).strip() or 'no detail'})") from None
    if data.shape[0] == 0 or data.shape[1] == 0:
        raise AudioProblem("empty (0 samples)")
    if not np.isfinite(data).all():
        raise AudioProblem("holds NaN/Inf samples")
    source_seconds = max(info.frames, data.shape[0]) / rate
    if source_seconds < MIN_SECONDS:
        raise AudioProblem(f"too short ({source_seconds:.2f} s < {MIN_SECONDS:g} s)")
    stereo = resample(to_stereo(data), rate, sample_rate)[:, : int(max_seconds * sample_rate)]
    return Clip(torch.from_numpy(np.ascontiguousarray(stereo, dtype=np.float32)), sample_rate, source_seconds, rate,
                data.shape[1])
