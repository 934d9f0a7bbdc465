"""Shared test helpers (tests/ is on sys.path through this conftest, so test modules `from conftest import ...`)."""

from pathlib import Path

import torch
from omegaconf import OmegaConf

from acestep_ft.config import ModelConfig

ROOT = Path(__file__).resolve().parents[1]


def model_config(name: str = "tiny", **overrides) -> ModelConfig:
    """conf/model/<name>.yaml merged over the ModelConfig schema, as Hydra composes it, as a typed object."""
    yaml = OmegaConf.load(ROOT / "conf" / "model" / f"{name}.yaml")
    assert list(yaml.pop("defaults")) == ["base_model", "_self_"]
    return OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(ModelConfig), yaml, overrides))


def sample_dict(t: int, length: int = 9, width: int = 16, dtype=torch.bfloat16, seed: int = 0) -> dict:
    """One track as the official / Side-Step preprocessor saves it (bf16 like a CUDA run), metadata included."""
    g = torch.Generator().manual_seed(seed)
    silence = torch.randn(t, 64, generator=g)
    mask = torch.ones(length)
    mask[length - 2:] = 0
    return {
        "target_latents": torch.randn(t, 64, generator=g).to(dtype),
        "attention_mask": torch.ones(t, dtype=dtype),
        "encoder_hidden_states": torch.randn(length, width, generator=g).to(dtype),
        "encoder_attention_mask": mask.to(dtype),
        "context_latents": torch.cat([silence, torch.ones(t, 64)], -1).to(dtype),
        "metadata": {"audio_path": f"/music/{seed}.wav", "filename": f"{seed}.wav", "caption": f"lofi piano {seed}",
                     "lyrics": "[Instrumental]", "duration": t / 25, "bpm": 90, "keyscale": "C major",
                     "timesignature": "4", "is_instrumental": True, "genre": None},
    }


def changed(d: dict, **change) -> dict:
    """`d` with keys replaced (value) or removed (None): a sample with one thing wrong."""
    d = dict(d)
    for k, v in change.items():
        if v is None:
            del d[k]
        else:
            d[k] = v
    return d
