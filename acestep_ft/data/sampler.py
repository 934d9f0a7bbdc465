"""Which sample indices form each batch, epoch after epoch: length buckets, a frame budget, reproducible, resumable.

    sampler = LengthBucketSampler(lengths, batch_size, seed, shuffle, bucket_frames=250, max_frames_per_batch=0)
    indices = sampler.next_batch()          # endless; moves to the next epoch after the last batch of one

`lengths[i]` is the latent length (frames, 25 per second) sample i will have in a batch, i.e. after the crop cap
(`crop.capped_lengths`). A batch is padded to its longest clip rounded up to a multiple of `length_multiple`
(0 = not rounded; `collate` pads it so, reading the multiple from the sampler via `BatchStream`): "longest" below
means that padded length, `batch_frames(batch)`. The batches of epoch `e` are a pure function of
(lengths, settings, seed, e):

1. Order. One `torch.Generator` seeded with `seed + EPOCH_STRIDE * e` draws a permutation of all indices
   (`range(N)` when `shuffle=False`).
2. Buckets. With `bucket_frames` > 0, sample i belongs to bucket `lengths[i] // bucket_frames`; each bucket keeps
   the indices in the order of step 1 (a seeded shuffle within the bucket). `bucket_frames=0`: one bucket.
3. Batches. Each bucket is cut into consecutive batches of its capacity: `batch_size`, or with a frame budget
   `min(batch_size, max(1, max_frames_per_batch // longest clip of the bucket))`, so every batch satisfies
   `count * longest <= max_frames_per_batch` -- except a batch of a single clip longer than the budget alone
   (after rounding up: with length_multiple a clip a little under the budget can round up over it):
   such clips are still trained, one per batch (`oversize_indices` lists them; `padding_stats` counts them).
   The capacity is fixed per bucket (not greedy per batch), so the number of batches is the same in every epoch.
   The last batch of a bucket may be smaller; `drop_last=True` drops it.
4. Batch order. With more than one bucket and `shuffle=True`, the same generator permutes the batches, so training
   does not go short -> long. (One bucket: the batches stay in the order of step 1, which makes unbucketed batching
   identical to the plain shuffled batches of the former `EpochBatchSampler`, whose checkpoints still resume.)
5. `worst_case_first` (epoch 0 only): the `world_size` batches with the largest padded size (count x longest
   frames) move to the front, largest first, so every process runs its worst case at its first step.

Several processes (`world_size` > 1). Steps 1-5 give the same global batch list on every rank. It is extended to a
multiple of `world_size` by repeating batches from its start (cycling if there are fewer batches than ranks; like
torch's DistributedSampler, but whole batches), or with `drop_last=True` cut to a multiple instead; rank r takes
global batches r, r + world_size, r + 2 * world_size, ... So every rank runs `batches_per_epoch` batches, and
within an epoch no index is on two ranks except in the (at most world_size - 1) repeated batches at the end.

`state_dict()` = {"epoch", "position" (batches already taken from that epoch), "signature"}; the signature
(num_samples, batch_size, bucket_frames, max_frames_per_batch, world_size, drop_last, shuffle, seed,
worst_case_first, length_multiple when it shapes the batches, and a hash of the lengths when they do) lets
`load_state_dict` refuse a state of another batch setup with a ValueError naming what differs. A state without
signature (older checkpoints) is accepted as long as its position fits; a signature saved before length_multiple
existed counts as length_multiple 0. The state is the same on every rank. Nothing here touches global RNGs.
"""

from __future__ import annotations

import hashlib
from array import array
from typing import Any, Mapping, Optional, Sequence

import torch

from acestep_ft.data.collate import round_up

EPOCH_STRIDE = 1_000_003  # a prime, so (seed, epoch) pairs map to distinct generator seeds in practice
_SEED_MOD = 2**63
# signature keys added after states with signatures were saved: the value that reproduces those states' batches
_ADDED_SIGNATURE_KEYS = {"length_multiple": 0}


def _padded(batch: Sequence[int], lengths: Sequence[int], multiple: int = 0) -> int:
    return len(batch) * round_up(max(lengths[i] for i in batch), multiple)


class LengthBucketSampler:
    """Infinite, deterministic batches of indices in [0, len(lengths)); every index exactly once per epoch
    (with world_size > 1: once across ranks, plus the whole batches repeated to even out the ranks)."""

    def __init__(
        self,
        lengths: Sequence[int],
        batch_size: int,
        seed: int,
        shuffle: bool,
        bucket_frames: int = 0,
        max_frames_per_batch: int = 0,
        worst_case_first: bool = False,
        rank: int = 0,
        world_size: int = 1,
        drop_last: bool = False,
        length_multiple: int = 0,
    ) -> None:
        name = type(self).__name__
        self.lengths = [int(t) for t in lengths]
        if not self.lengths:
            raise ValueError(f"{name}: num_samples=0, the dataset is empty")
        if min(self.lengths) < 0:
            raise ValueError(f"{name}: negative length {min(self.lengths)} in lengths")
        if batch_size < 1:
            raise ValueError(f"{name}: batch_size={batch_size} must be >= 1")
        if bucket_frames < 0 or max_frames_per_batch < 0:
            raise ValueError(f"{name}: bucket_frames={bucket_frames} and max_frames_per_batch="
                             f"{max_frames_per_batch} must be >= 0 (0 = off)")
        if length_multiple < 0:
            raise ValueError(f"{name}: length_multiple={length_multiple} must be >= 0 (hardware.length_multiple; "
                             "0 = off)")
        if world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"{name}: need 0 <= rank < world_size, got {rank=}, {world_size=}")
        self.num_samples = len(self.lengths)
        self.batch_size = int(batch_size)
        self.seed = int(seed)
        self.shuffle = bool(shuffle)
        self.bucket_frames = int(bucket_frames)
        self.max_frames_per_batch = int(max_frames_per_batch)
        self.worst_case_first = bool(worst_case_first)
        self.rank, self.world_size = int(rank), int(world_size)
        self.drop_last = bool(drop_last)
        self.length_multiple = int(length_multiple) if length_multiple > 1 else 0  # 1 pads nothing either

        # Epoch-independent layout: bucket of every index, capacity and batch count of every bucket.
        self._bucket_of = [t // self.bucket_frames if self.bucket_frames else 0 for t in self.lengths]
        longest: dict[int, int] = {}
        members: dict[int, int] = {}
        for b, t in zip(self._bucket_of, self.lengths):
            longest[b] = max(longest.get(b, 0), t)
            members[b] = members.get(b, 0) + 1
        self._buckets = sorted(longest)
        self._capacity = {b: self._bucket_capacity(longest[b]) for b in self._buckets}
        self.num_global_batches = sum(
            (members[b] // self._capacity[b]) if self.drop_last else -(-members[b] // self._capacity[b])
            for b in self._buckets
        )
        if self.drop_last:
            self.batches_per_epoch = self.num_global_batches // self.world_size
        else:
            self.batches_per_epoch = -(-self.num_global_batches // self.world_size)
        if self.batches_per_epoch == 0:
            raise ValueError(
                f"{name}: drop_last leaves no batch for each of the {self.world_size} process(es) (num_samples="
                f"{self.num_samples}, batch_size={self.batch_size}, {self.num_global_batches} full batch(es) per "
                "epoch); lower the batch size or set drop_last=False."
            )

        self._epoch = 0
        self._position = 0
        self._batches: Optional[list[list[int]]] = None  # this rank's batches of self._epoch, built lazily

    def bucket_capacities(self) -> dict[int, int]:
        """Bucket -> clips per micro-batch in it (the most; a bucket's last batch may hold fewer)."""
        longest: dict[int, int] = {}
        for bucket, t in zip(self._bucket_of, self.lengths):
            longest[bucket] = max(longest.get(bucket, 0), t)
        return {bucket: self._bucket_capacity(t) for bucket, t in sorted(longest.items())}

    def _bucket_capacity(self, longest: int) -> int:
        if not self.max_frames_per_batch or longest == 0:
            return self.batch_size
        return min(self.batch_size, max(1, self.max_frames_per_batch // round_up(longest, self.length_multiple)))

    def batch_frames(self, batch: Sequence[int]) -> int:
        """T of the collated batch of these indices: its longest clip rounded up to a multiple of length_multiple."""
        return round_up(max(self.lengths[i] for i in batch), self.length_multiple)

    # ------------------------------------------------------------------ introspection
    @property
    def epoch(self) -> int:
        """Epoch of the most recently returned batch (0 before the first)."""
        return self._epoch

    @property
    def position(self) -> int:
        """Batches already returned from the current epoch."""
        return self._position

    @property
    def num_buckets(self) -> int:
        return len(self._buckets)

    @property
    def oversize_indices(self) -> list[int]:
        """Samples longer than max_frames_per_batch on their own (rounded up to length_multiple): each is trained in
        a batch of one, over budget."""
        if not self.max_frames_per_batch:
            return []
        m = self.length_multiple
        return [i for i, t in enumerate(self.lengths) if round_up(t, m) > self.max_frames_per_batch]

    # ------------------------------------------------------------------ batches
    def global_batches(self, epoch: int) -> list[list[int]]:
        """All batches of `epoch` shared by every rank, before they are evened out and dealt to ranks."""
        if epoch < 0:
            raise ValueError(f"{type(self).__name__}: epoch={epoch} must be >= 0")
        g = torch.Generator().manual_seed((self.seed + EPOCH_STRIDE * epoch) % _SEED_MOD)
        if self.shuffle:
            order = torch.randperm(self.num_samples, generator=g).tolist()
        else:
            order = list(range(self.num_samples))
        per_bucket: dict[int, list[int]] = {b: [] for b in self._buckets}
        for i in order:
            per_bucket[self._bucket_of[i]].append(i)
        batches: list[list[int]] = []
        for b in self._buckets:
            idx, cap = per_bucket[b], self._capacity[b]
            stop = len(idx) - len(idx) % cap if self.drop_last else len(idx)
            batches.extend(idx[k : k + cap] for k in range(0, stop, cap))
        if self.shuffle and len(self._buckets) > 1:
            batches = [batches[k] for k in torch.randperm(len(batches), generator=g).tolist()]
        if self.worst_case_first and epoch == 0:
            size = [_padded(b, self.lengths, self.length_multiple) for b in batches]
            ranked = sorted(range(len(batches)), key=lambda k: (-size[k], k))
            front = ranked[: self.world_size]
            chosen = set(front)
            batches = [batches[k] for k in front] + [x for k, x in enumerate(batches) if k not in chosen]
        return batches

    def epoch_batches(self, epoch: int) -> list[list[int]]:
        """This rank's `batches_per_epoch` batches of `epoch`, in order."""
        batches = self.global_batches(epoch)
        total = self.batches_per_epoch * self.world_size
        if total > len(batches):  # repeat from the start so every rank gets the same number of batches
            batches = (batches * -(-total // len(batches)))[:total]
        return [list(b) for b in batches[:total][self.rank :: self.world_size]]

    def next_batch(self) -> list[int]:
        """The next batch of indices (moves to the next epoch after the last batch of this one)."""
        if self._position >= self.batches_per_epoch:
            self._epoch += 1
            self._position = 0
            self._batches = None
        if self._batches is None:
            self._batches = self.epoch_batches(self._epoch)
        batch = self._batches[self._position]
        self._position += 1
        return list(batch)

    def __iter__(self) -> "LengthBucketSampler":
        return self

    def __next__(self) -> list[int]:
        return self.next_batch()

    # ------------------------------------------------------------------ statistics
    def padding_stats(self, epoch: int = 0) -> dict[str, Any]:
        """Real vs padded frames of this rank's batches of `epoch`, and of the naive baseline: the whole dataset
        in a seeded random order cut into batches of batch_size, each padded to its longest clip (both rounded up
        to length_multiple, as collate pads them).

        Keys: batches, samples, real_frames, padded_frames, pad_fraction (= 1 - real / padded),
        max_batch_frames (largest count x longest, the peak-memory batch), oversize_samples, and the same
        naive_* for the baseline (naive_batches, naive_real_frames, naive_padded_frames, naive_pad_fraction,
        naive_max_batch_frames)."""
        L, m = self.lengths, self.length_multiple

        def stats(batches: list[list[int]], prefix: str) -> dict[str, Any]:
            real = sum(L[i] for b in batches for i in b)
            padded = sum(_padded(b, L, m) for b in batches)
            return {
                f"{prefix}batches": len(batches),
                f"{prefix}real_frames": real,
                f"{prefix}padded_frames": padded,
                f"{prefix}pad_fraction": 1.0 - real / padded if padded else 0.0,
                f"{prefix}max_batch_frames": max((_padded(b, L, m) for b in batches), default=0),
            }

        mine = self.epoch_batches(epoch)
        g = torch.Generator().manual_seed((self.seed + EPOCH_STRIDE * epoch) % _SEED_MOD)
        order = torch.randperm(self.num_samples, generator=g).tolist()
        naive = [order[k : k + self.batch_size] for k in range(0, self.num_samples, self.batch_size)]
        out = {"samples": sum(len(b) for b in mine), **stats(mine, ""), **stats(naive, "naive_")}
        out["oversize_samples"] = len(self.oversize_indices)
        return out

    # ------------------------------------------------------------------ resume
    def signature(self) -> dict[str, Any]:
        """What must match for a saved position to mean the same batches."""
        shaped_by_lengths = bool(self.bucket_frames or self.max_frames_per_batch or self.worst_case_first)
        lengths_hash = None
        if shaped_by_lengths:
            lengths_hash = hashlib.blake2b(array("q", self.lengths).tobytes(), digest_size=8).hexdigest()
        return {
            "num_samples": self.num_samples,
            "batch_size": self.batch_size,
            "bucket_frames": self.bucket_frames,
            "max_frames_per_batch": self.max_frames_per_batch,
            "world_size": self.world_size,
            "drop_last": self.drop_last,
            "shuffle": self.shuffle,
            "seed": self.seed,
            "worst_case_first": self.worst_case_first,
            # rounding changes which clips share a batch only through the frame budget or the worst-case order
            "length_multiple": self.length_multiple if self.max_frames_per_batch or self.worst_case_first else 0,
            "lengths_hash": lengths_hash,
        }

    def state_dict(self) -> dict[str, Any]:
        return {"epoch": self._epoch, "position": self._position, "signature": self.signature()}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Continue exactly after the batch at which `state` was taken; refuses a state of another batch setup."""
        name = type(self).__name__
        missing = {"epoch", "position"} - set(state)
        if missing:
            raise ValueError(f"{name}.load_state_dict: missing {sorted(missing)} in {dict(state)}")
        saved = state.get("signature")
        if saved is not None:
            saved = {**_ADDED_SIGNATURE_KEYS, **saved}
            mine = self.signature()
            diffs = [f"{k}: saved {saved[k]!r}, now {mine[k]!r}" for k in mine if k in saved and saved[k] != mine[k]]
            if diffs:
                hint = (" (lengths_hash: the clip lengths differ -- another dataset, or another dataset.max_seconds)"
                        if any(d.startswith("lengths_hash") for d in diffs) else "")
                raise ValueError(
                    f"{name}.load_state_dict: the sampler state was saved with another batch setup, so its position "
                    f"would not mean the same batches: {'; '.join(diffs)}{hint}. Resume with the dataset and "
                    "batch settings of the interrupted run."
                )
        epoch, position = int(state["epoch"]), int(state["position"])
        if epoch < 0 or not 0 <= position <= self.batches_per_epoch:
            raise ValueError(
                f"{name}.load_state_dict: epoch={epoch}, position={position} is impossible with "
                f"{self.batches_per_epoch} batches per epoch (num_samples={self.num_samples}, "
                f"batch_size={self.batch_size}); resume with the dataset and batch size of the interrupted run."
            )
        self._epoch, self._position, self._batches = epoch, position, None

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(num_samples={self.num_samples}, batch_size={self.batch_size}, "
            f"bucket_frames={self.bucket_frames}, max_frames_per_batch={self.max_frames_per_batch}, "
            f"seed={self.seed}, shuffle={self.shuffle}, worst_case_first={self.worst_case_first}, "
            f"drop_last={self.drop_last}, length_multiple={self.length_multiple}, rank={self.rank}, "
            f"world_size={self.world_size}, "
            f"buckets={self.num_buckets}, batches_per_epoch={self.batches_per_epoch}, "
            f"epoch={self._epoch}, position={self._position})"
        )


class EpochBatchSampler(LengthBucketSampler):
    """Unbucketed fixed-size batches from a sample count (the former API, kept for callers without lengths):
    `EpochBatchSampler(n, bs, seed, shuffle, ...)` == `LengthBucketSampler([1] * n, bs, seed, shuffle, ...)`;
    its states load into a `LengthBucketSampler` with real lengths and bucket_frames=0, max_frames_per_batch=0,
    worst_case_first=False (and back)."""

    def __init__(
        self,
        num_samples: int,
        batch_size: int,
        seed: int,
        shuffle: bool,
        drop_last: bool = False,
        rank: int = 0,
        world_size: int = 1,
    ) -> None:
        super().__init__([1] * max(0, num_samples), batch_size, seed=seed, shuffle=shuffle, drop_last=drop_last,
                         rank=rank, world_size=world_size)


def sampler_for(cfg: Any, lengths: Sequence[int], rank: int = 0, world_size: int = 1) -> LengthBucketSampler:
    """The run's sampler for a typed root config (`acestep_ft.config.Config`) over capped `lengths`; it carries
    hardware.length_multiple, which `BatchStream` pads to."""
    from acestep_ft.data.crop import seconds_to_frames

    return LengthBucketSampler(
        lengths, cfg.hardware.batch_size, seed=cfg.train.seed, shuffle=cfg.dataset.shuffle,
        bucket_frames=seconds_to_frames(cfg.dataset.bucket_seconds),
        max_frames_per_batch=cfg.hardware.max_frames_per_batch, worst_case_first=cfg.dataset.worst_case_first,
        rank=rank, world_size=world_size, length_multiple=cfg.hardware.length_multiple)
