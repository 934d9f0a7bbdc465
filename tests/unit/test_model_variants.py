"""Every official variant: an official-layout checkpoint directory (shrunk widths, the variant's own structure and
metadata) is written, loads back strictly and exactly, and is refused under another variant's config."""

import json

import pytest
import torch
from safetensors.torch import load_file

from acestep_ft.config import ModelConfig
from conftest import model_config
from acestep_ft.model import load_model, save_full_model

VARIANTS = {  # yaml -> official modeling file named in auto_map
    "acestep15_turbo": "modeling_acestep_v15_turbo",
    "acestep15_base": "modeling_acestep_v15_base",
    "acestep15_sft": "modeling_acestep_v15_base",
    "acestep15_xl_turbo": "modeling_acestep_v15_xl_turbo",
    "acestep15_xl_base": "modeling_acestep_v15_xl_base",
    "acestep15_xl_sft": "modeling_acestep_v15_xl_base",
}
# Shrink every width by the same factor (2048 -> 64 = /32) so the XL encoder/decoder width split survives.
SHRINK = {"hidden_size": 32, "intermediate_size": 32, "encoder_hidden_size": 32, "encoder_intermediate_size": 32,
          "fsq_dim": 32, "text_hidden_dim": 32}


def shrunk(name: str) -> ModelConfig:
    cfg = model_config(name)
    for field, factor in SHRINK.items():
        if getattr(cfg, field) is not None:
            setattr(cfg, field, getattr(cfg, field) // factor)
    cfg.num_hidden_layers, cfg.num_lyric_encoder_hidden_layers, cfg.num_timbre_encoder_hidden_layers = 2, 1, 1
    cfg.head_dim, cfg.sliding_window = 16, 4
    return cfg


@pytest.mark.parametrize("name", sorted(VARIANTS))
def test_official_layout_directory_loads_strictly(tmp_path, name):
    cfg = shrunk(name)
    torch.manual_seed(0)
    model = load_model(cfg)
    out = save_full_model(model, tmp_path / "ckpt", dtype=torch.float32)
    config = json.loads((out / "config.json").read_text())
    assert config["auto_map"]["AutoModel"] == f"{VARIANTS[name]}.AceStepConditionGenerationModel"
    assert config["model_type"] == "acestep" and config["is_turbo"] == ("turbo" in name)
    assert ("encoder_hidden_size" in config) == ("xl" in name)
    weights = load_file(str(out / "model.safetensors"))
    assert any(k.startswith("decoder.layers.1.") for k in weights) and "null_condition_emb" in weights
    assert ("encoder.timbre_encoder.special_token" in weights)  # present in both (unused by 2B)

    cfg.path = str(out)
    loaded = load_model(cfg)
    for key, value in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value), key


def test_xl_directory_refused_under_a_2b_config(tmp_path):
    xl = shrunk("acestep15_xl_base")
    torch.manual_seed(0)
    out = save_full_model(load_model(xl), tmp_path / "xl", dtype=torch.float32)
    two_b = shrunk("acestep15_base")
    two_b.path = str(out)
    with pytest.raises(ValueError, match="hidden_size"):
        load_model(two_b)
