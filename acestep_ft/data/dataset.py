"""The entry point of the input pipeline: config -> a map-style `SampleSource`.

The dataset option picks where samples come from (`dataset=synthetic`: generated; `dataset=preprocessed`: a v3
shard directory or official / Side-Step `.pt` files, `dataset.format` detected), `cache.policy` how they are read
(none, mmap, ram_lru; auto chooses and says why), `dataset.conditions` which condition set every sample carries
(encoder_outputs or encoder_inputs, see `batch`; data without that set is a DataError). `.pt` sources return float32
samples; v3 sources return views in the stored dtype (bf16 usually), which `collate` converts. Every sample's widths
equal the model's (H_enc; D_text and the token vocabulary for encoder_inputs).
"""

from __future__ import annotations

import hashlib
import operator
from pathlib import Path
from typing import Protocol, Sequence, Tuple, runtime_checkable

import psutil

from acestep_ft.config import (
    CacheConfig, CachePolicy, Conditions, DataFormat, DatasetConfig, PreprocessedDataset, SyntheticDataset,
)
from acestep_ft.data.batch import ConditionWidths, Sample, inputs_widths
from acestep_ft.data.cache import GIB, apply_cache
from acestep_ft.data.errors import DataError
from acestep_ft.data.pt_format import PtDirectory
from acestep_ft.data.synthetic import make_synthetic_samples
from acestep_ft.data.v3_reader import V3Directory, detect_format


@runtime_checkable
class SampleSource(Protocol):
    """Map-style collection of samples: `len(source)`, `source[i]`, `source.keys` (one name per index),
    `source.lengths` / `source.cond_lengths` (latent frames T / condition tokens per index, known without decoding:
    L of encoder_hidden_states, or Ll + R + Lt for encoder_inputs samples, the condition encoder's output length),
    `source.location(i)` (file or shard)."""

    def __len__(self) -> int: ...

    def __getitem__(self, i: int) -> Sample: ...

    @property
    def keys(self) -> list[str]: ...

    @property
    def lengths(self) -> list[int]: ...

    @property
    def cond_lengths(self) -> list[int]: ...

    def location(self, i: int) -> str: ...


class InMemorySource:
    """A fixed list of samples already in RAM (synthetic data, tests)."""

    def __init__(self, samples: Sequence[Sample]) -> None:
        self.samples = list(samples)

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i: int) -> Sample:
        return self.samples[operator.index(i)]

    @property
    def keys(self) -> list[str]:
        return [s.key for s in self.samples]

    @property
    def lengths(self) -> list[int]:
        return [s.target_latents.shape[0] for s in self.samples]

    @property
    def cond_lengths(self) -> list[int]:
        return [s.condition_length for s in self.samples]

    def location(self, i: int) -> str:
        return f"generated sample {i}"

    def __repr__(self) -> str:
        return f"InMemorySource({len(self)} samples)"


class SubsetSource:
    """The samples `indices` of another source, renumbered 0..len-1 (a train or validation split)."""

    def __init__(self, source: SampleSource, indices: Sequence[int]) -> None:
        self.source, self.indices = source, [int(i) for i in indices]

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int) -> Sample:
        return self.source[self.indices[operator.index(i)]]

    @property
    def keys(self) -> list[str]:
        keys = self.source.keys
        return [keys[i] for i in self.indices]

    @property
    def lengths(self) -> list[int]:
        lengths = self.source.lengths
        return [lengths[i] for i in self.indices]

    @property
    def cond_lengths(self) -> list[int]:
        lengths = self.source.cond_lengths
        return [lengths[i] for i in self.indices]

    def location(self, i: int) -> str:
        return self.source.location(self.indices[i])

    def __repr__(self) -> str:
        return f"SubsetSource({len(self)} of {self.source!r})"


def held_out(key: str, fraction: float) -> bool:
    """Whether sample `key` belongs to the validation split: a hash of the key alone decides, so the split does not
    depend on the seed or the order and stays put when samples are added or removed."""
    digest = hashlib.blake2b(f"val-split:{key}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") / 2**64 < fraction


def split_train_val(source: SampleSource, fraction: float) -> Tuple[SubsetSource, SubsetSource]:
    """(train, validation) subsets of `source` for `dataset.val_fraction`; both must be non-empty."""
    if not 0.0 < fraction < 1.0:
        raise ValueError(f"dataset.val_fraction={fraction} must be in (0, 1) (0 = no validation split)")
    val = [i for i, key in enumerate(source.keys) if held_out(key, fraction)]
    train = sorted(set(range(len(source))) - set(val))
    if not val or not train:
        raise ValueError(
            f"dataset.val_fraction={fraction} puts {len(val)} of {len(source)} samples in the validation split and "
            f"{len(train)} in training; both need at least one: change val_fraction or give dataset.val_path")
    return SubsetSource(source, train), SubsetSource(source, val)


def resolve_format(cfg: PreprocessedDataset) -> str:
    """`dataset.format`, with auto replaced by what the directory holds."""
    if not cfg.path:
        raise DataError(
            "dataset=preprocessed needs dataset.path: the directory written by the ACE-Step or Side-Step "
            "preprocessor, or a v3 dataset. Fix: add dataset.path=/path/to/dataset on the command line."
        )
    return detect_format(cfg.path) if cfg.format == DataFormat.auto else str(cfg.format)


def choose_cache_policy(fmt: str, dataset_bytes: int, free_bytes: int, max_gb: float) -> Tuple[str, str]:
    """cache.policy=auto: (policy, why). Pure: the caller measures the dataset and the free RAM."""
    if fmt == "v3_sharded":
        return "mmap", "v3 shards are read zero-copy through the page cache"
    if fmt == "synthetic":
        return "none", "generated samples already live in RAM"
    decoded = 2 * dataset_bytes  # .pt files are often bf16; decoded samples are float32
    gib = decoded / GIB
    if decoded <= max_gb * GIB and decoded <= free_bytes // 2:
        return "ram_lru", f"the decoded .pt dataset (~{gib:.2f} GiB) fits cache.max_gb and half the free RAM"
    return "none", (f"the decoded .pt dataset (~{gib:.2f} GiB) exceeds cache.max_gb={max_gb} or half the free RAM "
                    f"({free_bytes / GIB:.1f} GiB free); convert it to v3 shards for fast reads")


def resolve_cache_policy(dataset_cfg: DatasetConfig, cache_cfg: CacheConfig) -> Tuple[str, str]:
    """The policy to use and why (auto decides from format, dataset size on disk and free RAM)."""
    if cache_cfg.policy != CachePolicy.auto:
        return str(cache_cfg.policy), "as configured (cache.policy)"
    if isinstance(dataset_cfg, SyntheticDataset):
        return choose_cache_policy("synthetic", 0, 0, cache_cfg.max_gb)
    fmt = resolve_format(dataset_cfg)
    size = sum(f.stat().st_size for f in Path(dataset_cfg.path).rglob("*") if f.is_file())
    return choose_cache_policy(fmt, size, psutil.virtual_memory().available, cache_cfg.max_gb)


def build_dataset(dataset_cfg: DatasetConfig, cache_cfg: CacheConfig,
                  widths: int | ConditionWidths) -> SampleSource:
    """The sample source described by `dataset_cfg`, read and cached as `cache_cfg` says, whose samples carry the
    condition set `dataset_cfg.conditions` (the other set's fields None).

    `widths`: the model's condition-encoder width H_enc (an int: encoder_outputs only), or `ConditionWidths(encoder,
    text, vocab)` (required for encoder_inputs: D_text = model.text_hidden_dim, ids < model.text_vocab_size). Samples
    of other widths, and data without the requested set, are rejected with a DataError.
    """
    conditions = dataset_cfg.conditions
    if conditions == Conditions.encoder_inputs:
        inputs_widths(widths, "build_dataset")
    policy, _ = resolve_cache_policy(dataset_cfg, cache_cfg)
    use_mmap = policy == "mmap"
    match dataset_cfg:
        case SyntheticDataset():
            source: SampleSource = InMemorySource(make_synthetic_samples(dataset_cfg, widths))
        case PreprocessedDataset():
            match resolve_format(dataset_cfg):
                case "v3_sharded":
                    source = V3Directory(dataset_cfg.path, widths, dataset_cfg.verify_checksums, use_mmap,
                                         conditions=conditions)
                case _:
                    source = PtDirectory(dataset_cfg.path, widths, use_mmap=use_mmap, conditions=conditions)
        case other:
            raise ValueError(f"unknown dataset config {type(other).__name__}; choose dataset=synthetic or "
                             "dataset=preprocessed")
    return apply_cache(source, policy, cache_cfg.max_gb)
