"""The entry point of the input pipeline: config -> a map-style `SampleSource`.

The training loop does:  indices = sampler.next_batch();  batch = collate([source[i] for i in indices]).
The dataset option (`dataset=synthetic|pt`) picks where samples come from (synthetic, or a directory of preprocessed `.pt` files) and
`cache.policy` whether decoded samples stay in RAM. Every source returns float32 `Sample`s whose
encoder_hidden_states width equals the model's `encoder_width`.
"""

from __future__ import annotations

import operator
from typing import Protocol, Sequence, runtime_checkable

from acestep_ft.config import CacheConfig, DatasetConfig, PreprocessedDataset, SyntheticDataset
from acestep_ft.data.batch import Sample
from acestep_ft.data.cache import apply_cache
from acestep_ft.data.errors import DataError
from acestep_ft.data.pt_format import PtDirectory
from acestep_ft.data.synthetic import make_synthetic_samples


@runtime_checkable
class SampleSource(Protocol):
    """Map-style collection of samples: `len(source)`, `source[i]`, `source.keys` (one name per index),
    `source.lengths` (latent frames T per index, known without decoding), `source.location(i)` (file or shard)."""

    def __len__(self) -> int: ...

    def __getitem__(self, i: int) -> Sample: ...

    @property
    def keys(self) -> list[str]: ...

    @property
    def lengths(self) -> list[int]: ...

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

    def location(self, i: int) -> str:
        return f"generated sample {i}"

    def __repr__(self) -> str:
        return f"InMemorySource({len(self)} samples)"


def build_dataset(dataset_cfg: DatasetConfig, cache_cfg: CacheConfig, encoder_width: int) -> SampleSource:
    """The sample source described by `dataset_cfg`, wrapped by the cache policy of `cache_cfg`.

    `encoder_width` is the model's condition-encoder width H_enc (encoder_hidden_size, or hidden_size when unset);
    `.pt` samples of another width are rejected with a DataError when read.
    """
    match dataset_cfg:
        case SyntheticDataset():
            source: SampleSource = InMemorySource(make_synthetic_samples(dataset_cfg, encoder_width))
        case PreprocessedDataset():
            if not dataset_cfg.path:
                raise DataError(
                    "dataset=preprocessed needs dataset.path: the directory written by the ACE-Step or Side-Step "
                    "preprocessor. Fix: add dataset.path=/path/to/preprocessed_tensors on the command line."
                )
            source = PtDirectory(dataset_cfg.path, encoder_width)
        case other:
            raise ValueError(f"unknown dataset config {type(other).__name__}; choose dataset=synthetic or dataset=preprocessed")
    return apply_cache(source, cache_cfg)
