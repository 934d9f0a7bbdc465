"""Held-out evaluation: a validation loss that is a pure function of the weights, and the fixed noise previews start
from (the sampler itself is train/flow_sampler.py).

    val = ValidationSet(source, batch_size, max_frames, seed, rank, world_size)
    loss = validation_loss(accelerator, decoder, val, objective_cfg, mu, sigma)      # same weights -> same number

The validation batches are fixed: the split's samples sorted by length, cut into `batch_size` batches and dealt to
the processes (every process runs as many batches; a process short of real ones repeats its first without counting
it, so sharded models see every collective). Each sample's noise and timestep come from a generator seeded by
(seed, sample key), the condition is never dropped, and a sample's loss is the MSE over its own real frames; the
validation loss is the mean over samples. So two evaluations of the same weights agree exactly.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Iterator, List, Optional, Sequence, Tuple

import torch
from accelerate import Accelerator
from torch import Tensor

from acestep_ft.config import ObjectiveConfig
from acestep_ft.data.batch import Batch
from acestep_ft.data.collate import collate
from acestep_ft.data.crop import crop_sample, crop_window
from acestep_ft.data.dataset import SampleSource
from acestep_ft.train.objective import interpolate, sample_timesteps, velocity_target
from acestep_ft.train.step import Encode, batch_condition, predict_velocity


def sample_generator(seed: int, key: str, purpose: str) -> torch.Generator:
    """A CPU generator determined by (purpose, seed, sample key) alone."""
    digest = hashlib.blake2b(f"{purpose}:{int(seed)}:{key}".encode(), digest_size=8).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest, "little") % 2**63)


def fixed_noise(keys: Sequence[str], lengths: Sequence[int], seed: int, purpose: str, channels: int = 64) -> Tensor:
    """[B, max T, C] float32: sample i's own noise [lengths[i], C] from its generator, zero-padded, so the noise of a
    sample does not depend on which batch it is in."""
    out = torch.zeros(len(keys), max(lengths), channels)
    for i, (key, length) in enumerate(zip(keys, lengths)):
        out[i, :length] = torch.randn(length, channels, generator=sample_generator(seed, key, purpose))
    return out


def per_sample_loss(pred: Tensor, target: Tensor, frame_mask: Tensor) -> Tensor:
    """[B] MSE of each sample over its real frames (frame_mask [B, T], 1 = real), in fp32."""
    m = frame_mask.float().unsqueeze(-1)
    squared = (pred.float() - target.float()) ** 2 * m
    return squared.sum((1, 2)) / (m.sum((1, 2)) * pred.shape[-1]).clamp_min(1.0)


@dataclass
class ValidationSet:
    """This process's fixed validation batches over `source` (see the module docstring)."""

    source: SampleSource
    batch_size: int
    max_frames: int          # crop cap in frames (0 = none); the crop window is fixed per sample
    seed: int
    rank: int = 0
    world_size: int = 1

    def __post_init__(self) -> None:
        lengths = self.source.lengths
        order = sorted(range(len(lengths)), key=lambda i: (lengths[i], i))
        batches = [order[i:i + self.batch_size] for i in range(0, len(order), self.batch_size)]
        mine = batches[self.rank::self.world_size]
        per_process = -(-len(batches) // self.world_size)
        # (indices, counted): fillers repeat the first batch so every process runs the same number of forwards
        self.plan: List[Tuple[List[int], bool]] = [(b, True) for b in mine]
        self.plan += [(batches[0], False)] * (per_process - len(mine))

    def __len__(self) -> int:
        return len(self.source)

    def batch(self, indices: Sequence[int]) -> Tuple[Batch, List[int]]:
        """The collated batch of `indices` (cropped to the fixed window) and each sample's length."""
        samples = []
        for i in indices:
            sample = self.source[i]
            if self.max_frames:
                start, end = crop_window(sample.target_latents.shape[0], self.max_frames, self.seed, 0, i)
                sample = crop_sample(sample, start, end)
            samples.append(sample)
        return collate(samples), [s.target_latents.shape[0] for s in samples]

    def batches(self) -> Iterator[Tuple[Batch, List[int], bool]]:
        for indices, counted in self.plan:
            batch, lengths = self.batch(indices)
            yield batch, lengths, counted


@torch.no_grad()
def validation_loss(acc: Accelerator, decoder: torch.nn.Module, val: ValidationSet, cfg: ObjectiveConfig,
                    timestep_mu: float, timestep_sigma: float, encode: Optional[Encode] = None) -> float:
    """Mean per-sample validation loss over the whole split (all processes), in eval mode, without CFG dropout.
    `encode`: the condition encoder for data that carries its inputs (step.batch_condition)."""
    was_training = decoder.training
    decoder.eval()
    total = torch.zeros(2, dtype=torch.float64, device=acc.device)  # (sum of sample losses, samples)
    try:
        for batch, lengths, counted in val.batches():
            batch = batch.to(acc.device).float()
            noise = fixed_noise(batch.keys, lengths, val.seed, "val").to(acc.device)
            t = torch.cat([sample_timesteps(1, cfg.timesteps, timestep_mu, timestep_sigma, torch.device("cpu"),
                                            sample_generator(val.seed, key, "val-t")) for key in batch.keys])
            t = t.to(acc.device)
            x0 = batch.target_latents
            with acc.autocast():
                hidden, encoder_mask = batch_condition(batch, encode)
                pred = predict_velocity(decoder, batch, interpolate(x0, noise, t), t, hidden, encoder_mask,
                                        cfg.attention_mask)
            if counted:
                losses = per_sample_loss(pred, velocity_target(x0, noise), batch.attention_mask)
                total += torch.stack([losses.double().sum(), torch.tensor(float(len(losses)), dtype=torch.float64,
                                                                          device=acc.device)])
    finally:
        decoder.train(was_training)
    total = acc.reduce(total, "sum")
    return float(total[0] / total[1])
