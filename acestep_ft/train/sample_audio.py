"""Sampled latents to audio with the checkpoint's VAE, so a run can be listened to while it trains.

    vae = load_sample_vae(cfg.train.samples, cfg.model.path)   # None: no VAE found, latents only
    audio = decode_latents(vae, latents)                       # [T, 64] latents -> [S, 2] float32 at vae_rate(vae)
    atomic_write_bytes(path, wav_bytes(audio, vae_rate(vae)))

While training, the VAE runs on the CPU in float32 on the main process: it is not part of the training step, so it
takes no device memory the memory preflight did not count (`python -m acestep_ft.generate` puts it on the device).
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
from acestep_ft.model.checkpoint_io import VAE_DIR


def sibling_dir(setting: Optional[str], model_path: Optional[str], sibling: str, key: str, what: str
                ) -> Optional[Path]:
    """`setting` when given (ConfigError naming `key` unless it is a directory), else <model_path>/../<sibling> when
    that exists (the official checkpoint layout), else None."""
    if setting is not None:
        path = Path(os.path.expanduser(setting))
        if not path.is_dir():
            raise ConfigError(f"{key}={setting} is not a directory ({what}, e.g. <checkpoints>/{sibling}).")
        return path
    if model_path is not None:
        beside = Path(os.path.expanduser(model_path)).parent / sibling
        if beside.is_dir():
            return beside
    return None


def vae_dir(vae_path: Optional[str], model_path: Optional[str], key: str = "train.samples.vae_path"
            ) -> Optional[Path]:
    """The VAE directory to decode with: `vae_path`, else <model.path>/../vae if it exists, else None."""
    return sibling_dir(vae_path, model_path, VAE_DIR, key, "the VAE of the checkpoint")


def load_vae(path: Path, key: str, device: Any = "cpu") -> Any:
    """The AutoencoderOobleck in `path` (float32, eval), checked for ACE-Step's latent geometry; UserError naming the
    directory and `key` when it cannot be loaded."""
    from diffusers import AutoencoderOobleck

    from acestep_ft.preprocess.encoders import check_vae, loading

    with loading("VAE (diffusers AutoencoderOobleck)", path, f"{key}=<the checkpoint's vae/>"):
        vae = AutoencoderOobleck.from_pretrained(str(path), torch_dtype=torch.float32).eval()
    check_vae(vae, path)
    return vae.to(device)


def load_sample_vae(cfg: SampleConfig, model_path: Optional[str]) -> Optional[Any]:
    """The AutoencoderOobleck to decode samples with (CPU, float32, eval), or None when there is none."""
    path = vae_dir(cfg.vae_path, model_path)
    return None if path is None else load_vae(path, "train.samples.vae_path")


def vae_rate(vae: Any) -> int:
    return int(vae.config.sampling_rate)


@torch.no_grad()
def decode_latents(vae: Any, latents: torch.Tensor) -> np.ndarray:
    """[T, 64] latents (25 frames/s) -> [S, channels] float32 audio, S = T x the VAE's hop, clipped to [-1, 1]; runs
    where the VAE is."""
    device = next(vae.parameters()).device
    with torch.autocast(device.type, enabled=False):  # fp32 even inside a bf16 training run's autocast
        audio = vae.decode(latents.detach().float().to(device).T[None]).sample[0]  # [channels, S]
    return audio.clamp(-1.0, 1.0).T.contiguous().cpu().numpy()


def wav_bytes(audio: np.ndarray, rate: int) -> bytes:
    """16-bit PCM WAV file contents."""
    import soundfile

    buffer = io.BytesIO()
    soundfile.write(buffer, audio, rate, format="WAV", subtype="PCM_16")
    return buffer.getvalue()


def file_name(key: str) -> str:
    """A sample key (may hold '/', e.g. album/song.flac) as one safe file name."""
    return re.sub(r"[^A-Za-z0-9._-]+", "_", key).strip("._") or "sample"


def slug(text: str, max_chars: int = 40) -> str:
    """A caption as a short lower-case file-name part: "Lo-fi hip hop, mellow piano" -> "lo-fi-hip-hop-mellow-piano"."""
    return re.sub(r"[^a-z0-9]+", "-", text.lower())[:max_chars].strip("-") or "prompt"
