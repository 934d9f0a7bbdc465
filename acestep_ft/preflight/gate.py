"""The memory gate: estimate a run's peak device memory before any weights load, and refuse, rewrite or warn.

    verdict = preflight(cfg, world_size=1)     # Verdict: the estimate, the budget, fits or not, the config to train
    verdict.report()                           # the term table, the verdict line, suggestions when it does not fit

Budget = `hardware.memory_gb` (presets set it) or the visible GPU's total memory, minus `preflight.overhead_gb`; on
the CPU without `hardware.memory_gb` there is no budget and the gate only reports.

The worst case is the largest micro-batch the sampler can build from the actual data (lengths read from the index,
the .pt headers or the synthetic draws; the crop cap applied): the batch with the most padded frames and the
batch of the longest clip, whichever estimates higher, with the longest condition. For dataset.conditions=
encoder_inputs the condition is the encoder's inputs (`InputLengths`): synthetic data's dataset.text_length and
dataset.lyric_length with its one one-frame reference; for preprocessed data the caption, lyric and reference sizes
of the sample with the longest condition (Ll + R + Lt), the one sample read for it (preprocessing pads captions to
one length and stores one reference per song, so its lyric length bounds what any batch pads to).

With mode.text_encoder=lora the estimate adds the text encoder's weights, LoRA and activations (the caption length
Lt as above; see estimate.py).

Rewrite order (`preflight.policy=rewrite`; each step only when still over budget, the first setting that fits wins):
  1. train.ema.on_cpu=true (the EMA copy leaves the device; nothing computed changes)
  2. hardware.gradient_checkpointing: 0.25, 0.5, then every layer (recompute instead of keeping activations)
  3. halve hardware.batch_size (and hardware.max_frames_per_batch) and multiply train.grad_accum to match, down to
     batch 1: the effective batch per optimizer step stays the same
  4. optim: torch AdamW -> fused AdamW (no step temporaries; same update up to rounding), then bitsandbytes
     AdamW8bit (same betas, eps, weight decay)
  5. several processes: hardware.distributed=fsdp (shards weights, gradients, optimizer state); then
     hardware.offload=true (neither with mode.text_encoder=lora, which runs under ddp only)
The trained parameter set, the effective batch and the data never change; each change is printed, and the
rewritten config with a diff is written into the run directory.
"""

from __future__ import annotations

import copy
import os
import re
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable, Iterator, List, Optional, Tuple

import torch
from omegaconf import OmegaConf

from acestep_ft.config import (
    CacheConfig, CachePolicy, Config, Device, Distributed, FullMode, LoraMode, MixedPrecision, PreflightPolicy,
    SyntheticDataset, flatten, resolve_hardware,
)
from acestep_ft.data.batch import ConditionWidths, Sample
from acestep_ft.data.crop import capped_lengths, seconds_to_frames
from acestep_ft.data.sampler import sampler_for
from acestep_ft.distributed import strategy_problems
from acestep_ft.errors import UserError
from acestep_ft.model.decoder import checkpointed_layers
from acestep_ft.preflight.estimate import Condition, InputLengths, MemoryEstimate, estimate_memory, runs_encoder

GIB = 2**30
ADAMW = "torch.optim.AdamW"
ADAMW_8BIT = "bitsandbytes.optim.AdamW8bit"
REFUSED = "the memory preflight refuses this run (estimated before any weights load):\n"


@dataclass
class DataShape:
    """What the estimate needs from the data: T per sample (after the crop cap), the longest condition L (for
    encoder_inputs: Ll + R + Lt) and, for encoder_inputs data, the encoder's input sizes."""

    lengths: List[int]
    max_cond_len: int
    where: str  # for the report: "32 generated samples", "/data/x (index)"
    inputs: Optional[InputLengths] = None  # dataset.conditions=encoder_inputs

    @property
    def condition(self) -> Condition:
        """What `estimate_memory` takes: the InputLengths of encoder_inputs data, else L."""
        return self.max_cond_len if self.inputs is None else self.inputs


def condition_widths(cfg: Config) -> int | ConditionWidths:
    """The model widths `build_dataset` checks the data against: H_enc, or for encoder_inputs also the text
    encoder's width and vocabulary."""
    width = cfg.model.encoder_hidden_size or cfg.model.hidden_size
    if not runs_encoder(cfg):
        return width
    return ConditionWidths(encoder=width, text=cfg.model.text_hidden_dim, vocab=cfg.model.text_vocab_size)


def data_shape(cfg: Config) -> DataShape:
    """Lengths of the training data without decoding tensors (index, headers, synthetic draws); for preprocessed
    encoder_inputs data, the one sample with the longest condition is read for its input sizes."""
    cap = seconds_to_frames(cfg.dataset.max_seconds)
    if isinstance(cfg.dataset, SyntheticDataset):
        from acestep_ft.data.synthetic import synthetic_lengths

        lengths = capped_lengths(synthetic_lengths(cfg.dataset), cap)
        where = f"{cfg.dataset.num_samples} generated samples"
        if not runs_encoder(cfg):
            return DataShape(lengths, cfg.dataset.condition_length, where)
        inputs = InputLengths(text=cfg.dataset.text_length, lyric=cfg.dataset.lyric_length, refs=1, ref_frames=1)
        return DataShape(lengths, inputs.length, where, inputs)
    from acestep_ft.data.dataset import build_dataset

    source = build_dataset(cfg.dataset, CacheConfig(policy=CachePolicy.none), condition_widths(cfg))
    cond_lengths = source.cond_lengths
    longest = max(range(len(cond_lengths)), key=cond_lengths.__getitem__)
    inputs = input_lengths(source[longest]) if runs_encoder(cfg) else None
    return DataShape(capped_lengths(source.lengths, cap), cond_lengths[longest], f"{cfg.dataset.path}", inputs)


def input_lengths(sample: Sample) -> InputLengths:
    """The condition-encoder input sizes of one encoder_inputs sample."""
    refs = sample.refer_audio_latents  # [R, Tr, 64]
    return InputLengths(text=int(sample.text_hidden_states.shape[0]), lyric=int(sample.lyric_token_ids.shape[0]),
                        refs=int(refs.shape[0]), ref_frames=int(refs.shape[1]))


def worst_batches(cfg: Config, shape: DataShape, world_size: int) -> List[Tuple[int, int]]:
    """(batch, padded frames) candidates for the peak: the batch with the most padded frames and the batch holding
    the longest clip, as the sampler builds them for this config."""
    sampler = sampler_for(cfg, shape.lengths, 0, world_size)
    batches = [(len(b), sampler.batch_frames(b)) for b in sampler.global_batches(0)]  # hardware.length_multiple
    most = max(batches, key=lambda bt: bt[0] * bt[1])
    longest = max(batches, key=lambda bt: (bt[1], bt[0]))
    return sorted({most, longest})


def samples_per_step(cfg: Config, shape: DataShape) -> dict:
    """Length bucket -> clips per optimizer step per process (micro-batch capacity x accumulation): what a
    rewrite must keep."""
    caps = sampler_for(cfg, shape.lengths).bucket_capacities()
    return {bucket: cap * cfg.train.grad_accum for bucket, cap in caps.items()}


def device_budget(cfg: Config) -> Optional[int]:
    """Bytes of device memory per process: hardware.memory_gb, else the visible GPU's (None on the CPU)."""
    if cfg.hardware.memory_gb is not None:
        return int(cfg.hardware.memory_gb * GIB)
    if cfg.hardware.device != Device.cpu and torch.cuda.is_available():
        return int(torch.cuda.get_device_properties(0).total_memory)
    return None


def on_this_machine(cfg: Config) -> Config:
    """`cfg` with hardware.device / mixed_precision auto resolved the way the run will resolve them here."""
    cuda = torch.cuda.is_available()
    on_cpu, precision = resolve_hardware(cfg.hardware, cuda, cuda and torch.cuda.is_bf16_supported())
    resolved = copy.deepcopy(cfg)
    resolved.hardware.device = Device.cpu if on_cpu else Device.cuda
    resolved.hardware.mixed_precision = MixedPrecision(precision)
    return resolved


def estimate_config(cfg: Config, shape: DataShape, world_size: int) -> MemoryEstimate:
    """The estimate of the worst batch of this config on this machine (the higher of the candidate batches)."""
    resolved = on_this_machine(cfg)
    estimates = [estimate_memory(resolved, b, t, shape.condition, world_size)
                 for b, t in worst_batches(cfg, shape, world_size)]
    return max(estimates, key=lambda e: e.total)


@dataclass
class Verdict:
    cfg: Config                      # the config to train (rewritten when the gate changed it)
    estimate: MemoryEstimate
    budget: Optional[int]            # bytes per process, before the overhead reserve
    overhead: int                    # preflight.overhead_gb in bytes
    changes: List[str] = field(default_factory=list)      # "key: old -> new" applied by a rewrite
    suggestions: List[str] = field(default_factory=list)  # when it does not fit

    @property
    def fits(self) -> Optional[bool]:
        return None if self.budget is None else self.estimate.total + self.overhead <= self.budget

    def report(self) -> str:
        lines = [self.estimate.table(), f"reserve: {self.overhead / GIB:.2f} GiB (preflight.overhead_gb: CUDA context, "
                                        "workspaces, fragmentation)"]
        if self.budget is None:
            lines.append("verdict: no device budget (CPU; set hardware.memory_gb to check one)")
        else:
            need = (self.estimate.total + self.overhead) / GIB
            lines.append(f"verdict: {'fits' if self.fits else 'DOES NOT FIT'}: {need:.2f} GiB needed of "
                         f"{self.budget / GIB:.2f} GiB per process")
        lines += [f"  rewritten: {c}" for c in self.changes]
        lines += [f"  suggestion: {s}" for s in self.suggestions]
        return "\n".join(lines)


def _changed(cfg: Config, edit: Callable[[Config], None]) -> Config:
    new = copy.deepcopy(cfg)
    edit(new)
    return new


def _checkpointing_steps(cfg: Config) -> Iterator[Config]:
    """Settings that recompute more layers than now: ratios 0.25, 0.5, then every layer."""
    layers = cfg.model.num_hidden_layers
    now = len(checkpointed_layers(cfg.hardware.gradient_checkpointing, layers))
    for ratio in (0.25, 0.5, 1.0):
        if len(checkpointed_layers(ratio, layers)) > now:
            yield _changed(cfg, lambda c, r=ratio: setattr(c.hardware, "gradient_checkpointing", r))


def _smaller_batch(cfg: Config, shape: DataShape) -> Optional[Config]:
    """Batch (and frame budget) divided by the batch's smallest factor, accumulation multiplied by it, when every
    length bucket's micro-batch shrinks by exactly that factor (else the clips per optimizer step would change:
    a frame budget can cap a bucket below the batch size). None when no such step exists."""
    b = cfg.hardware.batch_size
    if b <= 1:
        return None
    factor = next(f for f in range(2, b + 1) if b % f == 0)

    def edit(c: Config) -> None:
        c.hardware.batch_size = b // factor
        c.hardware.max_frames_per_batch = cfg.hardware.max_frames_per_batch // factor
        c.train.grad_accum = cfg.train.grad_accum * factor

    smaller = _changed(cfg, edit)
    return smaller if samples_per_step(smaller, shape) == samples_per_step(cfg, shape) else None


def rewrite_candidates(cfg: Config, shape: DataShape, world_size: int) -> Iterator[Tuple[str, Config]]:
    """Successively cheaper-on-memory configs in the documented order; each builds on the previous one. Steps the
    run would refuse (see `strategy_problems`) are left out. Yields (step name, config)."""
    on_cpu = on_this_machine(cfg).hardware.device == Device.cpu
    current = cfg

    def step(candidate: Optional[Config]) -> bool:
        nonlocal current
        if candidate is None or strategy_problems(candidate, on_cpu):
            return False
        current = candidate
        return True

    if cfg.train.ema.enabled and not cfg.train.ema.on_cpu:
        if step(_changed(current, lambda c: setattr(c.train.ema, "on_cpu", True))):
            yield "EMA to host RAM", current
    for candidate in _checkpointing_steps(current):
        if step(candidate):
            yield "gradient checkpointing", current
    while step(_smaller_batch(current, shape)):
        yield "smaller micro-batch, more accumulation", current
    target = current.optim.target
    if target == ADAMW and not current.optim.optimizer.get("fused"):
        if step(_changed(current, lambda c: c.optim.optimizer.update({"fused": True}))):
            yield "fused AdamW", current
    before_8bit = current
    if target == ADAMW:
        eight_bit = _changed(current, lambda c: c.optim.optimizer.update({"_target_": ADAMW_8BIT}))
        eight_bit.optim.optimizer.pop("fused", None)  # bitsandbytes takes no such argument
        if step(eight_bit):
            yield "8-bit optimizer", current
    if world_size > 1 and current.hardware.distributed == Distributed.ddp:
        # FSDP2 shards what 8-bit AdamW saves and more, but cannot step bitsandbytes optimizers: shard the config
        # from before the 8-bit step
        if step(_changed(before_8bit, lambda c: setattr(c.hardware, "distributed", Distributed.fsdp))):
            yield "sharding", current
    if current.hardware.distributed != Distributed.ddp and not current.hardware.offload:
        if step(_changed(current, lambda c: setattr(c.hardware, "offload", True))):
            yield "offload", current


def config_diff(old: Config, new: Config) -> List[Tuple[str, Any, Any]]:
    """(key, old value, new value) for every leaf that differs."""
    a, b = flatten(old), flatten(new)
    return [(k, a.get(k), b.get(k)) for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)]


def format_diff(diff: List[Tuple[str, Any, Any]]) -> List[str]:
    return [f"{key}: {old} -> {new}" for key, old, new in diff]


def override_value(value: Any) -> str:
    """`value` as Hydra's override grammar reads it back: true / false, null, [a,b], strings quoted where needed."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if value is None:
        return "null"
    if isinstance(value, (list, tuple)):
        return "[" + ",".join(override_value(v) for v in value) + "]"
    plain = re.fullmatch(r"[A-Za-z_][\w./:-]*", str(value)) and value not in ("true", "false", "null")
    return str(value) if not isinstance(value, str) or plain else "'" + value.replace("'", "\\'") + "'"


def config_overrides(old: Config, new: Config) -> List[str]:
    """The command-line overrides that turn `old` into `new`, in the form Hydra accepts: `key=value` for a key of
    `old`, `+key=value` for one `old` lacks (e.g. +optim.optimizer.fused=true), `~key` for one `new` lacks."""
    a, b = flatten(old), flatten(new)
    out = []
    for key in sorted(set(a) | set(b)):
        if key not in b:
            out.append(f"~{key}")
        elif key not in a:
            out.append(f"+{key}={override_value(b[key])}")
        elif a[key] != b[key]:
            out.append(f"{key}={override_value(b[key])}")
    return out


def suggestions(cfg: Config, shape: DataShape, world_size: int, room: int) -> List[str]:
    """What would fit within `room` bytes: each rewrite step, LoRA ranks for a full run, a crop length, a GPU size."""
    out = []
    for name, candidate in rewrite_candidates(cfg, shape, world_size):
        total = estimate_config(candidate, shape, world_size).total
        if total <= room:
            overrides = " ".join(config_overrides(cfg, candidate))
            out.append(f"fits ({total / GIB:.2f} GiB) with the rewrite up to '{name}': {overrides} "
                       "(preflight.policy=rewrite applies it)")
            break
    if isinstance(cfg.mode, FullMode):
        for rank in (256, 128, 64, 32, 16, 8):
            lora = _changed(cfg, lambda c, r=rank: setattr(c, "mode", LoraMode(rank=r, alpha=2.0 * r)))
            total = estimate_config(lora, shape, world_size).total
            if total <= room:
                out.append(f"this fits as LoRA rank {rank} ({total / GIB:.2f} GiB): mode=lora mode.rank={rank}")
                break
    longest = max(shape.lengths)
    for seconds in (120, 60, 30, 15):
        frames = seconds_to_frames(seconds)
        if frames >= longest:
            continue
        cropped = replace(shape, lengths=[min(t, frames) for t in shape.lengths])
        total = estimate_config(cfg, cropped, world_size).total
        if total <= room:
            out.append(f"cropping clips to {seconds} s fits ({total / GIB:.2f} GiB): dataset.max_seconds={seconds} "
                       "(trains on random windows of longer clips)")
            break
    need = estimate_config(cfg, shape, world_size).total
    out.append(f"as configured it needs {need / GIB:.2f} GiB + the reserve per process: a larger GPU, or more "
               "processes with hardware.distributed=fsdp")
    return out


def preflight(cfg: Config, world_size: int, shape: Optional[DataShape] = None) -> Verdict:
    """Estimate, and refuse (UserError), rewrite or warn according to preflight.policy and the full-mode opt-in.

    Returns the verdict; `verdict.cfg` is the config to train.
    """
    shape = shape or data_shape(cfg)
    budget = device_budget(cfg)
    overhead = int(cfg.preflight.overhead_gb * GIB)
    verdict = Verdict(cfg, estimate_config(cfg, shape, world_size), budget, overhead)
    full = isinstance(cfg.mode, FullMode)
    opted_in = full and cfg.mode.i_understand_vram_risk
    if verdict.fits is None:
        if full and not opted_in and cfg.model.variant != "tiny":
            raise UserError(REFUSED + verdict.report() + "\nmode=full without a device budget to check: confirm "
                            "with mode.i_understand_vram_risk=true, or give hardware.memory_gb / a GPU preset.")
        return verdict
    if verdict.fits:
        return verdict
    room = budget - overhead
    verdict.suggestions = suggestions(cfg, shape, world_size, room)
    policy = cfg.preflight.policy
    if policy == PreflightPolicy.auto:
        policy = PreflightPolicy.refuse if full else PreflightPolicy.rewrite
    if full and not opted_in:
        raise UserError(REFUSED + verdict.report() + "\nmode=full does not fit the budget: refused "
                        "(mode.i_understand_vram_risk=true with preflight.policy=rewrite lets the gate rewrite it to "
                        "fit).")
    if policy == PreflightPolicy.warn:
        return verdict
    if policy == PreflightPolicy.rewrite:
        for _, candidate in rewrite_candidates(cfg, shape, world_size):
            estimate = estimate_config(candidate, shape, world_size)
            if estimate.total <= room:
                assert samples_per_step(candidate, shape) == samples_per_step(cfg, shape)
                return Verdict(candidate, estimate, budget, overhead, format_diff(config_diff(cfg, candidate)))
        verdict.suggestions.insert(0, "no rewrite in the documented order fits")
    raise UserError(REFUSED + verdict.report() + f"\nRefused (preflight.policy={cfg.preflight.policy}): the estimate "
                    "exceeds the budget. Apply a suggestion above, or preflight.policy=warn to try anyway.")


def world_size_from_env() -> int:
    """Processes of this launch (torchrun / accelerate launch set WORLD_SIZE) before any process group exists."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def write_rewrite(run_dir: Path, original: Config, verdict: Verdict) -> None:
    """<run>/preflight/: config.yaml (what trains), diff.txt (the changes) and estimate.txt."""
    from acestep_ft.atomic import atomic_write_bytes

    out = Path(run_dir) / "preflight"
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(out / "config.yaml", OmegaConf.to_yaml(OmegaConf.structured(verdict.cfg)).encode())
    atomic_write_bytes(out / "diff.txt", ("\n".join(format_diff(config_diff(original, verdict.cfg))) + "\n").encode())
    atomic_write_bytes(out / "estimate.txt", (verdict.report() + "\n").encode())
