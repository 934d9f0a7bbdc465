"""Shared test helpers (tests/ is on sys.path through this conftest, so test modules `from conftest import ...`)."""

from pathlib import Path

from omegaconf import OmegaConf

from acestep_ft.config import ModelConfig

ROOT = Path(__file__).resolve().parents[1]


def model_config(name: str = "tiny", **overrides) -> ModelConfig:
    """conf/model/<name>.yaml merged over the ModelConfig schema, as Hydra composes it, as a typed object."""
    yaml = OmegaConf.load(ROOT / "conf" / "model" / f"{name}.yaml")
    assert list(yaml.pop("defaults")) == ["base_model", "_self_"]
    return OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(ModelConfig), yaml, overrides))
