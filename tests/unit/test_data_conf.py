"""conf/dataset and conf/cache compose against the registered schemas; acestep_ft.data stays model/train-free."""

import ast
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf
from omegaconf.errors import MissingMandatoryValue

from acestep_ft.config import CacheConfig, PreprocessedDataset, SyntheticDataset, register_configs
from acestep_ft.data import DataError, build_dataset

ROOT = Path(__file__).resolve().parents[2]


def _compose(*overrides):
    register_configs()
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base=None):
        return compose(overrides=list(overrides))


def test_synthetic_and_ram_lru_compose_to_typed_configs():
    cfg = _compose("+dataset=synthetic", "+cache=ram_lru", "dataset.num_samples=3")
    dataset, cache = OmegaConf.to_object(cfg.dataset), OmegaConf.to_object(cfg.cache)
    assert isinstance(dataset, SyntheticDataset) and dataset.num_samples == 3
    assert isinstance(cache, CacheConfig) and cache.policy == "ram_lru"
    assert len(build_dataset(dataset, cache, 8)) == 3
    assert _compose("+cache=none").cache.policy == "none"


def test_pt_without_a_path_is_an_error_naming_dataset_path():
    cfg = _compose("+dataset=preprocessed", "+cache=none")
    with pytest.raises(MissingMandatoryValue, match=r"full_key: dataset\.path"):
        OmegaConf.to_object(cfg)
    with pytest.raises(DataError, match=r"dataset=preprocessed needs dataset\.path"):
        build_dataset(PreprocessedDataset(path=""), CacheConfig(), 8)
    dataset = OmegaConf.to_object(_compose("+dataset=preprocessed", "dataset.path=/data/x").dataset)
    assert isinstance(dataset, PreprocessedDataset) and dataset.path == "/data/x"


def test_a_field_of_another_dataset_option_is_an_error():
    with pytest.raises(Exception, match="num_samples"):
        _compose("+dataset=preprocessed", "dataset.path=/x", "dataset.num_samples=3")
    with pytest.raises(Exception, match="path"):
        _compose("+dataset=synthetic", "dataset.path=/x")


def test_data_package_never_imports_model_or_train():
    for path in (ROOT / "acestep_ft" / "data").glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else []
            if isinstance(node, ast.ImportFrom):
                names = [node.module or ""]
            for name in names:
                assert not name.startswith(("acestep_ft.model", "acestep_ft.train")), f"{path.name} imports {name}"
