"""Sampled latents to audio with the checkpoint's VAE, so a run can be listened to while it trains.

    vae = load_sample_vae(cfg.train.samples, cfg.model.path)   # None: no VAE found, latents only
    audio = decode_latents(vae, latents)                       # [T, 64] latents -> [S, 2] float32 at vae_rate(vae)
    atomic_write_bytes(path, wav_bytes(audio, vae_rate(vae)))

The VAE runs on the CPU in float32 on the main process: it is not part of the training step, so it takes no device
memory the memory preflight did not count.
"""

from __future__ import annotations

import io
import os
import re
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch

from acestep_ft.config import SampleConfig
from acestep_ft.errors import ConfigError


def vae_dir(cfg: SampleConfig, model_path: Optional[str]) -> Optional[Path]:
    """The VAE directory to decode with: train.samples.vae_path, else <model.path>/../vae if it exists, else None."""
    if cfg.vae_path is not None:
        path = Path(os.path.expanduser(cfg.vae_path))
        if not path.is_dir():
            raise ConfigError(f"train.samples.vae_path={cfg.vae_path} is not a directory (the VAE of the checkpoint, "
                              "e.g. <checkpoints>/vae); unset it to write latents only.")
        return path
    if model_path is not None:
        sibling = Path(os.path.expanduser(model_path)).parent / "vae"
        if sibling.is_dir():
            return sibling
    return None


def load_sample_vae(cfg: SampleConfig, model_path: Optional[str]) -> Optional[Any]:
    """The AutoencoderOobleck to decode samples with (CPU, float32, eval), or None when there is none."""
    path = vae_dir(cfg, model_path)
    if path is None:
        return None
    from diffusers import AutoencoderOobleck

    from acestep_ft.preprocess.encoders import check_vae

    vae = AutoencoderOobleck.from_pretrained(str(path), torch_dtype=torch.float32).eval()
    check_vae(vae, path)
    return vae


def vae_rate(vae: Any) -> int:
    return int(vae.config.sampling_rate)


@torch.no_grad()
def decode_latents(vae: Any, latents: torch.Tensor) -> np.ndarray:
    """[T, 64] latents (25 frames/s) -> [S, channels] float32 audio, S = T x the VAE's hop, clipped to [-1, 1]."""
    with torch.autocast("cpu", enabled=False):  # fp32 even inside a bf16 training run's autocast
        audio = vae.decode(latents.detach().float().cpu().T[None]).sample[0]  # [channels, S]
    return audio.clamp(-1.0, 1.0).T.contiguous().numpy()


def wav_bytes(audio: np.ndarray, rate: int) -> bytes:
    """16-bit PCM WAV file contents."""
    import soundfile

    buffer = io.BytesIO()
    soundfile.write(buffer, audio, rate, format="WAV", subtype="PCM_16")
    return buffer.getvalue()


def file_name(key: str) -> str:
    """A sample key (may hold '/', e.g. album/song.flac) as one safe file name."""
    return re.sub(r"[^A-Za-z0-9._-]+", "_", key).strip("._") or "sample"
