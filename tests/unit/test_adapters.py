"""Adapter types (LoRA, DoRA, rsLoRA, LoKr, LoHa) and warm start from a saved adapter (mode.init_adapter)."""

import json

import pytest
import torch

from acestep_ft.checks import init_adapter_problems
from acestep_ft.config import LohaMode, LokrMode, LoraMode
from acestep_ft.errors import UserError
from acestep_ft.model import load_model
from acestep_ft.train.adapters import (
    ADAPTER_CONFIG, COMFYUI_FILE, init_from_adapter, is_adapter_tensor, load_adapter_weights, save_adapter,
)
from acestep_ft.train.trainable import make_trainable
from conftest import model_config

TARGETS = ["q_proj", "v_proj"]
MODES = {
    "lora": LoraMode(rank=4, alpha=8.0, target_modules=TARGETS),
    "dora": LoraMode(rank=4, alpha=8.0, use_dora=True, target_modules=TARGETS),
    "rslora": LoraMode(rank=4, alpha=8.0, use_rslora=True, target_modules=TARGETS),
    "lokr": LokrMode(rank=2, alpha=8.0, decompose_both=True, target_modules=TARGETS),
    "loha": LohaMode(rank=4, alpha=8.0, target_modules=TARGETS),
}


def adapted(mode, seed=0):
    """The tiny decoder with `mode`'s adapter, every adapter tensor random (a trained adapter is not zero)."""
    torch.manual_seed(0)
    decoder = make_trainable(load_model(model_config()), mode)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in decoder.named_parameters():
            if p.requires_grad:
                p.copy_(torch.randn(p.shape, generator=g) * 0.1 + (1.0 if "magnitude" in name else 0.0))
    return decoder


def deltas(decoder) -> dict:
    """Adapted module name -> its weight update (what merging adds to the base weight)."""
    return {n: m.get_delta_weight("default").detach().clone() for n, m in decoder.named_modules()
            if hasattr(m, "get_delta_weight") and isinstance(getattr(m, "scaling", None), dict)}


@pytest.mark.parametrize("kind", list(MODES))
def test_each_type_trains_only_its_adapter_tensors_and_saves_a_peft_directory(kind, tmp_path):
    decoder = adapted(MODES[kind])
    trained = [n for n, p in decoder.named_parameters() if p.requires_grad]
    assert trained and all(is_adapter_tensor(n) for n in trained)
    assert sum(1 for n in trained if ".self_attn.q_proj." in n) >= 2  # every target module carries its tensors
    save_adapter(decoder, tmp_path / "a")
    config = json.loads((tmp_path / "a" / ADAPTER_CONFIG).read_text())
    assert config["peft_type"] == {"lokr": "LOKR", "loha": "LOHA"}.get(kind, "LORA")
    assert config["task_type"] == "FEATURE_EXTRACTION"
    assert config.get("use_dora", False) == (kind == "dora") and config.get("use_rslora", False) == (kind == "rslora")
    fresh = make_trainable(load_model(model_config()), MODES[kind])
    load_adapter_weights(fresh, tmp_path / "a")
    for name, delta in deltas(decoder).items():
        assert torch.equal(deltas(fresh)[name], delta), name


def test_rslora_scales_by_alpha_over_sqrt_rank():
    plain, rs = adapted(MODES["lora"]), adapted(MODES["rslora"])
    name = "base_model.model.layers.0.self_attn.q_proj"
    assert plain.get_submodule(name).scaling["default"] == pytest.approx(8.0 / 4)
    assert rs.get_submodule(name).scaling["default"] == pytest.approx(8.0 / 4 ** 0.5)


@pytest.mark.parametrize("kind", list(MODES))
def test_warm_start_equals_the_source_update_even_with_another_alpha(kind, tmp_path):
    source = adapted(MODES[kind], seed=3)
    save_adapter(source, tmp_path / "src")
    mode = MODES[kind]
    target_mode = type(mode)(**{**mode.__dict__, "alpha": mode.alpha * 4, "init_adapter": str(tmp_path / "src")})
    target = make_trainable(load_model(model_config()), target_mode)
    said = init_from_adapter(target, target_mode.init_adapter, model_config())
    assert "rescaled" in said and "step 0" in said
    want = deltas(source)
    got = deltas(target)
    assert set(got) == set(want) and want
    for name in want:
        torch.testing.assert_close(got[name], want[name], rtol=1e-5, atol=1e-6)
    if kind == "dora":  # the magnitude is taken as trained
        for (n, a), (_, b) in zip(source.named_parameters(), target.named_parameters()):
            if "magnitude" in n:
                assert torch.equal(a, b)


def test_warm_start_refuses_another_type_rank_or_dora(tmp_path):
    save_adapter(adapted(MODES["lokr"]), tmp_path / "lokr")
    save_adapter(adapted(MODES["lora"]), tmp_path / "lora")
    meta = model_config()
    with pytest.raises(UserError, match="LOKR adapter.*use mode=lokr"):
        init_from_adapter(adapted(MODES["lora"]), str(tmp_path / "lokr"), meta)
    wider = LoraMode(rank=8, alpha=8.0, target_modules=TARGETS)
    with pytest.raises(UserError, match="with another shape"):
        init_from_adapter(make_trainable(load_model(model_config()), wider), str(tmp_path / "lora"), meta)
    more = LoraMode(rank=4, alpha=8.0, target_modules=TARGETS + ["o_proj"])
    with pytest.raises(UserError, match="missing tensors"):
        init_from_adapter(make_trainable(load_model(model_config()), more), str(tmp_path / "lora"), meta)
    with pytest.raises(UserError, match="use_dora"):
        init_from_adapter(adapted(MODES["dora"]), str(tmp_path / "lora"), meta)
    with pytest.raises(UserError, match="not found"):
        init_from_adapter(adapted(MODES["lora"]), str(tmp_path / "nowhere.safetensors"), meta)


def test_config_check_names_a_missing_or_mistyped_init_adapter(tmp_path):
    save_adapter(adapted(MODES["loha"]), tmp_path / "loha")
    assert init_adapter_problems(LoraMode()) == []
    assert "does not exist" in init_adapter_problems(LoraMode(init_adapter=str(tmp_path / "x")))[0]
    assert "use mode=loha" in init_adapter_problems(LoraMode(init_adapter=str(tmp_path / "loha")))[0]
    assert init_adapter_problems(LohaMode(init_adapter=str(tmp_path / "loha"))) == []


@pytest.mark.parametrize("kind", ["lora", "dora", "lokr", "loha"])
def test_saved_comfyui_file_warm_starts_like_the_peft_directory(kind, tmp_path):
    """save_adapter(comfyui=True) writes comfyui/adapter.safetensors beside the PEFT files; starting from that file
    gives the same update as starting from the directory."""
    source = adapted(MODES[kind], seed=5)
    save_adapter(source, tmp_path / "src", comfyui=True)
    comfy = tmp_path / "src" / COMFYUI_FILE
    assert comfy.is_file()
    want = deltas(source)
    target = make_trainable(load_model(model_config()), MODES[kind])
    said = init_from_adapter(target, str(comfy), model_config())
    assert "rescaled" not in said
    for name, delta in deltas(target).items():
        torch.testing.assert_close(delta, want[name], rtol=1e-6, atol=1e-7)
