"""Keep decoded samples in RAM between epochs: the `cache.policy` of the config.

- `none`: every `source[i]` goes to the underlying source (for `.pt` directories: a file read + validation).
- `mmap`: the source maps its files (v3 shards, or .pt files via torch.load(mmap=True)) instead of reading them.
- `ram_lru`: an LRU of decoded `Sample`s bounded by `cache.max_gb` GiB, counting tensor bytes (numel x itemsize).
  A sample larger than the whole budget is returned but never stored. `hits` / `misses` count lookups.

Cached samples are shared objects: consumers must not modify their tensors in place (`collate` copies them).
"""

from __future__ import annotations

import operator
import threading
from collections import OrderedDict
from typing import Optional

from torch import Tensor

from acestep_ft.data.batch import Sample

GIB = 1024**3


def sample_nbytes(sample: Sample) -> int:
    """Bytes held by the sample's tensors."""
    return sum(v.numel() * v.element_size() for v in vars(sample).values() if isinstance(v, Tensor))


class LruSampleCache:
    """Least-recently-used map index -> Sample whose total tensor bytes never exceed `max_bytes`.

    Thread-safe: the device prefetch thread and a validation pass in the main thread may read at the same time.
    """

    def __init__(self, max_bytes: int) -> None:
        if max_bytes < 0:
            raise ValueError(f"cache budget must be >= 0 bytes, got {max_bytes} (set cache.max_gb >= 0)")
        self.max_bytes = int(max_bytes)
        self.nbytes = 0
        self.hits = 0
        self.misses = 0
        self._items: OrderedDict[int, tuple[Sample, int]] = OrderedDict()
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self._items)

    def __contains__(self, index: int) -> bool:
        return index in self._items

    def get(self, index: int) -> Optional[Sample]:
        """The cached sample (now most recently used) or None; counts a hit or a miss."""
        with self._lock:
            item = self._items.get(index)
            if item is None:
                self.misses += 1
                return None
            self.hits += 1
            self._items.move_to_end(index)
            return item[0]

    def put(self, index: int, sample: Sample) -> None:
        """Store `sample`, evicting least recently used entries until it fits; too-large samples are skipped."""
        size = sample_nbytes(sample)
        if size > self.max_bytes:
            return
        with self._lock:
            old = self._items.pop(index, None)
            if old is not None:
                self.nbytes -= old[1]
            while self.nbytes + size > self.max_bytes:
                _, (_, evicted) = self._items.popitem(last=False)
                self.nbytes -= evicted
            self._items[index] = (sample, size)
            self.nbytes += size

    def stats(self) -> dict[str, float]:
        """Counters for logging: hits, misses, entries, GiB held."""
        return {"hits": self.hits, "misses": self.misses, "entries": len(self), "gb": self.nbytes / GIB}


class CachedSource:
    """Wraps a map-style sample source with an `LruSampleCache`; same `__len__` / `__getitem__` / `keys`."""

    def __init__(self, source, cache: LruSampleCache) -> None:
        self.source = source
        self.cache = cache

    def __len__(self) -> int:
        return len(self.source)

    def __getitem__(self, i: int) -> Sample:
        n, i = len(self.source), operator.index(i)
        if -n <= i < 0:
            i += n
        sample = self.cache.get(i)
        if sample is None:
            sample = self.source[i]
            self.cache.put(i, sample)
        return sample

    @property
    def keys(self) -> list[str]:
        return self.source.keys

    @property
    def lengths(self) -> list[int]:
        return self.source.lengths

    @property
    def cond_lengths(self) -> list[int]:
        return self.source.cond_lengths

    def location(self, i: int) -> str:
        return self.source.location(i)

    def __repr__(self) -> str:
        return f"CachedSource({self.source!r}, ram_lru {self.cache.max_bytes / GIB:.3g} GiB)"


def apply_cache(source, policy: str, max_gb: float):
    """The source wrapped for `policy`: ram_lru adds an LRU; none and mmap return it unchanged (mmap is a way of
    reading that the source itself was built with)."""
    match policy:
        case "none" | "mmap":
            return source
        case "ram_lru":
            if max_gb < 0:
                raise ValueError(f"cache.max_gb={max_gb} must be >= 0 (GiB of RAM for decoded samples)")
            return CachedSource(source, LruSampleCache(int(max_gb * GIB)))
        case other:
            raise ValueError(f"unresolved cache.policy={other!r}; choose none, mmap, ram_lru or auto")
