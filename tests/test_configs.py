"""Every option of every config group, and every experiment file, composes into a typed Config."""

from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.errors import ConfigCompositionException
from omegaconf import OmegaConf, open_dict
from omegaconf.errors import ConfigAttributeError, ConfigKeyError, MissingMandatoryValue, ValidationError

from acestep_ft.config import Config, FullMode, LoraMode, register_configs

ROOT = Path(__file__).resolve().parents[1]
CONF = ROOT / "conf"
GROUPS = ["model", "mode", "dataset", "cache", "optim", "hardware", "logger"]
OVERRIDE_ERRORS = (ConfigCompositionException, ConfigAttributeError, ConfigKeyError, ValidationError)

register_configs()


def compose_config(overrides=(), config_dir=CONF, name="config"):
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(config_dir), version_base="1.3"):
        return compose(config_name=name, overrides=list(overrides))


def options(group):
    return sorted(p.stem for p in (CONF / group).glob("*.yaml"))


@pytest.mark.parametrize("group,option", [(g, o) for g in GROUPS for o in options(g)])
def test_every_group_option_composes(group, option):
    overrides = [f"{group}={option}"]
    if group == "dataset" and option == "preprocessed":
        overrides.append("dataset.path=/data/somewhere")
    cfg = OmegaConf.to_object(compose_config(overrides))
    assert isinstance(cfg, Config)
    picked = getattr(cfg, group)
    assert is_dataclass_instance(picked)
    if group == "mode":
        assert picked.name == option


def is_dataclass_instance(obj):
    return hasattr(obj, "__dataclass_fields__")


def test_every_group_has_options():
    for group in GROUPS:
        assert options(group), f"conf/{group}/ has no options"


def test_default_is_lora_tiny_auto_device():
    cfg = OmegaConf.to_object(compose_config())
    assert isinstance(cfg.mode, LoraMode)
    assert cfg.model.variant == "tiny" and cfg.hardware.device == "auto" and cfg.dataset.kind == "synthetic"


def test_full_mode_has_its_own_schema():
    cfg = OmegaConf.to_object(compose_config(["mode=full"]))
    assert isinstance(cfg.mode, FullMode)


@pytest.mark.parametrize("overrides", [
    ["mode.rnak=4"],                 # typo
    ["mode=full", "mode.rank=4"],    # a LoRA knob on full mode
    ["optim.lrr=1"],
    ["train.max_step=3"],
    ["dataset.path=/x"],              # a field of dataset=preprocessed on dataset=synthetic
    ["mode.name=full"],               # the mode is picked by the group, not a field
    ["objective.timesteps=uniform"], # not one of the Literal choices
    ["mode.rank=lots"],              # wrong type
])
def test_bad_overrides_fail_before_any_work(overrides):
    with pytest.raises(OVERRIDE_ERRORS):
        OmegaConf.to_object(compose_config(overrides))


def test_pt_dataset_requires_a_path():
    with pytest.raises(MissingMandatoryValue, match=r"full_key: dataset\.path"):
        OmegaConf.to_object(compose_config(["dataset=preprocessed"]))


@pytest.mark.parametrize("experiment", sorted(p.stem for p in (ROOT / "experiments").glob("*.yaml")))
def test_every_experiment_composes(experiment):
    GlobalHydra.instance().clear()
    # experiments extend `config` from conf/, found through their hydra.searchpath (file://conf) from the repo root
    import os

    cwd = os.getcwd()
    os.chdir(ROOT)
    try:
        with initialize_config_dir(config_dir=str(ROOT / "experiments"), version_base="1.3"):
            cfg = compose(config_name=experiment, return_hydra_config=True)
    finally:
        os.chdir(cwd)
    sweep = cfg.hydra.sweeper.params
    with open_dict(cfg):
        del cfg["hydra"]
    typed = OmegaConf.to_object(cfg)
    assert isinstance(typed, Config)
    # every swept key names a real field
    for key in sweep or {}:
        OmegaConf.select(OmegaConf.structured(typed), key, throw_on_missing=True)
        assert OmegaConf.select(OmegaConf.structured(typed), key) is not None


def test_cpu_preset_pins_fp32_cpu():
    hw = OmegaConf.to_object(compose_config(["hardware=cpu"])).hardware
    assert hw.device == "cpu" and hw.mixed_precision == "no"
