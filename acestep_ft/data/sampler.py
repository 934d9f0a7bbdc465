"""Which sample indices form each batch, epoch after epoch, reproducibly and resumably.

The order of epoch `e` is a function of (seed, e) only: a `torch.Generator` seeded with `seed + EPOCH_STRIDE * e`
draws a permutation (or `range(N)` when `shuffle=False`), cut into consecutive batches; with `drop_last=False` the
last batch of an epoch may be smaller. Iteration never ends: after the last batch of an epoch the next epoch starts.
`state_dict()` = {"epoch", "position"} (position = batches already taken from that epoch), so a run resumed with
`load_state_dict` sees exactly the batches the uninterrupted run would have seen. Nothing here touches global RNGs.

Several processes (`world_size` > 1): every rank draws the same epoch order, wraps it around to a multiple of
`world_size` (as torch's DistributedSampler does; with drop_last it is cut instead) and takes every
`world_size`-th index starting at `rank`, so ranks see disjoint shards of equal length and run the same number of
batches per epoch. The state is the same on every rank.
"""

from __future__ import annotations

import torch

EPOCH_STRIDE = 1_000_003  # a prime, so (seed, epoch) pairs map to distinct generator seeds in practice
_SEED_MOD = 2**63


class EpochBatchSampler:
    """Infinite, deterministic batches of indices in [0, num_samples); every index exactly once per epoch
    (with world_size > 1: once per epoch across ranks, plus up to world_size - 1 wrapped-around repeats)."""

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
        if num_samples < 1:
            raise ValueError(f"EpochBatchSampler: num_samples={num_samples} must be >= 1 (the dataset is empty)")
        if batch_size < 1:
            raise ValueError(f"EpochBatchSampler: batch_size={batch_size} must be >= 1")
        if world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"EpochBatchSampler: need 0 <= rank < world_size, got {rank=}, {world_size=}")
        self.rank = rank
        self.world_size = world_size
        self.num_samples = num_samples
        self.batch_size = batch_size
        self.seed = seed
        self.shuffle = shuffle
        self.drop_last = drop_last
        if drop_last and batch_size > self.shard_size:
            raise ValueError(
                f"EpochBatchSampler: drop_last with batch_size={batch_size} > {self.shard_size} samples per process "
                f"(num_samples={num_samples}, world_size={world_size}) would yield no batch at all; lower the batch "
                "size or set drop_last=False."
            )
        self._epoch = 0
        self._position = 0
        self._batches: list[list[int]] | None = None  # batches of self._epoch, built lazily

    @property
    def shard_size(self) -> int:
        """Indices this process gets per epoch (num_samples when world_size is 1)."""
        if self.drop_last:
            return self.num_samples // self.world_size
        return -(-self.num_samples // self.world_size)

    @property
    def batches_per_epoch(self) -> int:
        full, rest = divmod(self.shard_size, self.batch_size)
        return full + (1 if rest and not self.drop_last else 0)

    @property
    def epoch(self) -> int:
        """Epoch of the most recently returned batch (0 before the first)."""
        return self._epoch

    @property
    def position(self) -> int:
        """Batches already returned from the current epoch."""
        return self._position

    def epoch_order(self, epoch: int) -> list[int]:
        """All indices in the order of `epoch`, shared by every rank (before sharding, batching, dropping)."""
        if not self.shuffle:
            return list(range(self.num_samples))
        g = torch.Generator().manual_seed((self.seed + EPOCH_STRIDE * epoch) % _SEED_MOD)
        return torch.randperm(self.num_samples, generator=g).tolist()

    def epoch_batches(self, epoch: int) -> list[list[int]]:
        """This rank's batches of `epoch`, in order."""
        order = self.epoch_order(epoch)
        total = self.shard_size * self.world_size
        while len(order) < total:  # wrap around so every rank gets shard_size indices
            order = order + order[: total - len(order)]
        order = order[:total][self.rank :: self.world_size]
        n, b = self.batches_per_epoch, self.batch_size
        return [order[i * b : (i + 1) * b] for i in range(n)]

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

    def __iter__(self) -> "EpochBatchSampler":
        return self

    def __next__(self) -> list[int]:
        return self.next_batch()

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self._epoch, "position": self._position}

    def load_state_dict(self, state: dict[str, int]) -> None:
        """Continue exactly after the batch at which `state` was taken (same num_samples/batch_size/seed needed)."""
        missing = {"epoch", "position"} - set(state)
        if missing:
            raise ValueError(f"EpochBatchSampler.load_state_dict: missing {sorted(missing)} in {dict(state)}")
        epoch, position = int(state["epoch"]), int(state["position"])
        if epoch < 0 or not 0 <= position <= self.batches_per_epoch:
            raise ValueError(
                f"EpochBatchSampler.load_state_dict: epoch={epoch}, position={position} is impossible with "
                f"{self.batches_per_epoch} batches per epoch (num_samples={self.num_samples}, "
                f"batch_size={self.batch_size}); resume with the dataset and batch size of the interrupted run."
            )
        self._epoch, self._position, self._batches = epoch, position, None

    def __repr__(self) -> str:
        return (
            f"EpochBatchSampler(num_samples={self.num_samples}, batch_size={self.batch_size}, seed={self.seed}, "
            f"shuffle={self.shuffle}, drop_last={self.drop_last}, rank={self.rank}, world_size={self.world_size}, "
            f"epoch={self._epoch}, position={self._position})"
        )
