"""ram_lru cache: byte budget respected, least recently used evicted, hits and misses counted."""

import pytest
import torch

from acestep_ft.config import CacheConfig, SyntheticDataset
from acestep_ft.data import CachedSource, InMemorySource, LruSampleCache, Sample, build_dataset
from acestep_ft.data.cache import GIB, sample_nbytes


def sample(i: int, t: int = 10) -> Sample:
    return Sample(f"s{i}", torch.zeros(t, 64), torch.ones(t), torch.zeros(3, 8), torch.ones(3), torch.zeros(t, 128))


class CountingSource(InMemorySource):
    def __init__(self, samples):
        super().__init__(samples)
        self.reads = 0

    def __getitem__(self, i):
        self.reads += 1
        return super().__getitem__(i)


def test_sample_nbytes_counts_tensor_bytes():
    assert sample_nbytes(sample(0, t=10)) == 4 * (10 * 64 + 10 + 3 * 8 + 3 + 10 * 128)


def test_lru_respects_budget_and_evicts_least_recently_used():
    size = sample_nbytes(sample(0))
    cache = LruSampleCache(max_bytes=3 * size)
    for i in range(3):
        cache.put(i, sample(i))
    assert cache.get(0) is not None  # 0 is now most recent; 1 is least recent
    cache.put(3, sample(3))
    assert cache.nbytes <= cache.max_bytes and len(cache) == 3
    assert 1 not in cache and all(i in cache for i in (0, 2, 3))
    cache.put(9, sample(9, t=1000))  # larger than the whole budget: not stored, nothing evicted
    assert 9 not in cache and len(cache) == 3


def test_cached_source_counts_hits_and_reads_each_sample_once_within_budget():
    inner = CountingSource([sample(i) for i in range(4)])
    src = CachedSource(inner, LruSampleCache(max_bytes=10 * sample_nbytes(sample(0))))
    for _ in range(3):
        got = [src[i] for i in range(4)]
    assert [s.key for s in got] == inner.keys == src.keys
    assert inner.reads == 4
    assert (src.cache.hits, src.cache.misses) == (8, 4)
    assert src.cache.stats()["entries"] == 4


def test_build_dataset_applies_policy_from_config():
    cfg = SyntheticDataset(num_samples=4)
    plain = build_dataset(cfg, CacheConfig(policy="none"), 8)
    assert not isinstance(plain, CachedSource)
    tiny_budget = 2 * sample_nbytes(plain[0]) / GIB + 1e-12
    cached = build_dataset(cfg, CacheConfig(policy="ram_lru", max_gb=tiny_budget), 8)
    assert isinstance(cached, CachedSource) and len(cached) == 4
    for i in range(4):
        cached[i]
    assert cached.cache.nbytes <= cached.cache.max_bytes
    with pytest.raises(ValueError, match="max_gb"):
        build_dataset(cfg, CacheConfig(policy="ram_lru", max_gb=-1), 8)


def test_auto_cache_policy_decides_from_format_size_and_free_ram():
    from acestep_ft.data.dataset import choose_cache_policy

    gib = 1024**3
    assert choose_cache_policy("v3_sharded", 100 * gib, gib, 4.0)[0] == "mmap"
    assert choose_cache_policy("synthetic", 0, 0, 4.0)[0] == "none"
    assert choose_cache_policy("pt", gib, 16 * gib, 4.0)[0] == "ram_lru"      # 2 GiB decoded fits
    policy, why = choose_cache_policy("pt", 3 * gib, 16 * gib, 4.0)           # 6 GiB decoded > max_gb
    assert policy == "none" and "convert it to v3" in why
    assert choose_cache_policy("pt", gib, 3 * gib, 4.0)[0] == "none"          # > half the free RAM
