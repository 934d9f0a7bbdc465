"""Input-pipeline benchmark: Side-Step's default loader against acestep_ft's defaults, as a loader and inside
training steps, on the same synthetic clips, repeated (min / median / max of the repeats).

    python scripts/bench_loader.py [--quick] [--samples N] [--min-seconds 10] [--max-seconds 240]
                                   [--loader-samples N] [--train-steps N] [--repeats 3] [--override KEY=VALUE ...]
                                   [--threads N] [--workdir DIR] [--keep] [--json PATH] [--skip-train]

Measured on a 2-core CPU machine shared with other processes (load average 1-5), with the dataset reused: 10 and
14 minutes with the defaults, 7.4 minutes with --threads 1 (writing the 2 x 4 GiB dataset took 5.3 more minutes at
a load average of ~10; --keep keeps it for the next run). --quick (120 clips, 60 clips per loader run, 5 training
steps) is the smoke check: 1.5 minutes with --threads 1 at a load average of 1-2.6 (its 0.5 GiB dataset reused),
12 minutes with 2 threads at a load average of ~5. On a busy CPU pass --threads 1: with torch's 2 intra-op threads
and the cores oversubscribed, each parallel region waits for its second thread to be scheduled, and training steps
ran ~3x slower. Needs free disk for both formats (~4.4 MB per clip each) and RAM to hold them in the page cache
(every figure is "warm": the files are read once before each phase).

1. Dataset. `--samples` synthetic clips with the real tensor sizes of the ACE-Step 1.5 preprocessors (bf16):
   target_latents [T, 64], attention_mask [T], encoder_hidden_states [769, 2048], encoder_attention_mask [769],
   context_latents [T, 128], T = 25 frames/s, durations uniform in [--min-seconds, --max-seconds] (~4.4 MB for a
   3-minute clip). Written once into --workdir in both formats: an official-style directory of per-sample .pt
   files with manifest.json (pt/), and a v3 dataset written by `write_v3` (v3/). A later run with the same
   parameters and --workdir reuses it (the default --workdir is derived from the parameters). Without --keep, what
   this run generated is deleted at the end.
2. The baseline, `sidestep_default`: Side-Step's default loader (its vendored `PreprocessedTensorDataset`,
   `collate_preprocessed_batch` and `PreprocessedDataModule.train_dataloader`, with the defaults of its
   `training_defaults.py`), re-implemented here: the manifest's .pt files; `cache_in_ram` unset = every sample is
   preloaded with `torch.load` into a RAM cache when the .pt files total less than 4 GiB, else none (then one
   `torch.load(weights_only=True)` per read); every read, cached or not, scans target_latents,
   encoder_hidden_states and context_latents with `torch.isnan(t).any() or torch.isinf(t).any()`; torch DataLoader
   with batch_size=1, shuffle, num_workers=4, prefetch_factor=2, persistent_workers=True, pin_memory (when a CUDA
   GPU is present); their collate (zero-pad with `new_zeros` + `torch.cat`, `torch.stack`, stored dtype bf16);
   gradient accumulation 4. Their training step converts the batch with `.to(device, dtype)` in the training
   thread; here that is float32 on the CPU.
3. acestep_ft: the defaults of conf/ (composed with Hydra, `dataset=preprocessed dataset.path=v3/` plus any
   --override), wired as run.py does with the public data API: `resolve_cache_policy` (cache=auto: mmap for v3),
   `build_dataset` (dataset.verify_checksums default first_read), `sampler_for` (hardware.batch_size, 10 s length
   buckets), `BatchStream`, `Prefetcher` (on a CPU device it prepares batches synchronously and converts them to
   float32). Improvements to acestep_ft/data/ and to conf/ defaults show up here without changes.
4. Loaders, `--repeats` rounds, configurations interleaved within a round. The main pair reads the same clips:
   those of the first batches of acestep_ft's sampler holding at least --loader-samples clips; sidestep_default
   reads them one per batch in a shuffled order. Rate = clips / s delivered as float32 batches (what the model
   takes), after the first batch; time to first batch (TTFB) includes building the dataset (Side-Step: its RAM
   preload), starting workers and the first batch. References: sidestep_default with its RAM cache the other way
   round (as it is for datasets on the other side of 4 GiB); the previous, simplified baseline (torch.load per file,
   num_workers=0, batches of 4, no scan, no cache); acestep_ft reading the .pt files (cache=auto); acestep_ft v3 in
   its second epoch (checksums already verified under first_read; other clips of the same size distribution).
5. Training steps through the real `train_loop` with the tiny decoder (cpu, fp32, LoRA) but encoder width 2048, so
   every step moves the real condition tensors. (a) sidestep_default, batch 1 x accum 4; (b) acestep_ft's default,
   batch hardware.batch_size x accum train.grad_accum (4 x 1), bucketed; (c) control: acestep_ft's loader fed
   exactly (a)'s micro-batches in (a)'s order (isolates the input pipeline from the batch composition). (b) trains
   its sampler's first --train-steps optimizer steps; (a) and (c) train those clips shuffled, in whole steps of 4
   (at most 3 clips left out), so every figure is per sample. Same model init and seed. Each run checks that it
   trained exactly the planned clips. Per run: time per 4 samples (= 4 x busy time / samples; busy time =
   all step time minus the wait for the very first micro-batch, reported as step 1's TTFB), mean optimizer step,
   data stall = waits for input / busy time (as train_loop's data/stall_frac, without that first wait).
6. Prints the tables with min / median / max over the repeats (ratios per round, then min / median / max), the
   machine (cores, RAM, CPU model, torch version, load average at the start, after each phase and at each round)
   and, with `--json PATH`, every single run.

Exit status: 0 done, 1 refused (a --workdir holding data this benchmark did not write), 2 bad options.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import hashlib
import json
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import torch
from hydra import compose, initialize_config_dir
from hydra.errors import HydraException
from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException
from torch.utils.data import DataLoader, Dataset

from acestep_ft.config import LoraMode, ModelConfig, OptimConfig, TrainConfig, register_configs, to_typed
from acestep_ft.data import BatchStream, build_dataset
from acestep_ft.data.batch import Batch
from acestep_ft.data.crop import capped_lengths, seconds_to_frames
from acestep_ft.data.dataset import resolve_cache_policy
from acestep_ft.data.fingerprint import make_fingerprint
from acestep_ft.data.prefetch import Prefetcher
from acestep_ft.data.pt_format import REQUIRED_KEYS
from acestep_ft.data.sampler import sampler_for
from acestep_ft.data.v3_writer import write_v3
from acestep_ft.errors import ConfigError, UserError, reported_errors

FPS = 25
LATENT, CONTEXT = 64, 128
MB = 1e6
MARKER = "bench_dataset.json"
DATA_VERSION = 1
QUICK = {"samples": 120, "loader_samples": 60, "train_steps": 5}
FULL = {"samples": 1000, "loader_samples": 400, "train_steps": 30}

# Side-Step's defaults (sidestep_engine/training_defaults.py and vendor/data_module.py)
SIDESTEP_BATCH_SIZE = 1
SIDESTEP_GRAD_ACCUM = 4
SIDESTEP_NUM_WORKERS = 4  # 2 on Windows
SIDESTEP_PREFETCH_FACTOR = 2
SIDESTEP_PERSISTENT_WORKERS = True
SIDESTEP_RAM_CACHE_BYTES = 4 * 1024**3  # cache_in_ram=None: preload everything when the .pt files total less
SIDESTEP_SCANNED = ("target_latents", "encoder_hidden_states", "context_latents")


# ---------------------------------------------------------------------------------------------------------- machine
def machine_info() -> dict[str, Any]:
    cpu = "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    ram_gib = None
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal"):
                ram_gib = round(int(line.split()[1]) / 2**20, 1)
    except OSError:
        pass
    return {"cores": os.cpu_count(), "ram_gib": ram_gib, "cpu": cpu, "torch": torch.__version__,
            "torch_threads": torch.get_num_threads(), "python": platform.python_version(),
            "cuda": torch.cuda.is_available(), "loadavg_start": loadavg()}


def loadavg() -> list[float]:
    """1/5/15-minute load averages: other processes share this machine, and the figures depend on it."""
    return [round(x, 2) for x in os.getloadavg()]


def say(*args) -> None:
    print(*args, flush=True)


# ---------------------------------------------------------------------------------------------------------- dataset
def dataset_params(a: argparse.Namespace) -> dict[str, Any]:
    return {"version": DATA_VERSION, "samples": a.samples, "min_seconds": a.min_seconds, "max_seconds": a.max_seconds,
            "condition_length": a.condition_length, "encoder_width": a.encoder_width, "dtype": "bfloat16",
            "seed": a.data_seed}


def clip_lengths(p: dict[str, Any]) -> list[int]:
    g = torch.Generator().manual_seed(p["seed"])
    lo, hi = round(p["min_seconds"] * FPS), round(p["max_seconds"] * FPS)
    return torch.randint(lo, hi + 1, (p["samples"],), generator=g).tolist()


def sample_name(i: int) -> str:
    return f"song_{i:05d}"


def stored_bytes(t_len: int, p: dict[str, Any]) -> int:
    """Bytes of one sample's five bf16 tensors."""
    return 2 * (t_len * (LATENT + 1 + CONTEXT) + p["condition_length"] * (p["encoder_width"] + 1))


def make_sample(i: int, t_len: int, p: dict[str, Any], silence: torch.Tensor):
    """The tensors and metadata of one clip, as the official preprocessor saves them on CUDA (bf16)."""
    g = torch.Generator().manual_seed(p["seed"] * 1_000_003 + i + 1)
    length, width, bf16 = p["condition_length"], p["encoder_width"], torch.bfloat16
    valid = int(torch.randint(length // 3, length + 1, (1,), generator=g))  # packed valid-first
    mask = torch.zeros(length, dtype=bf16)
    mask[:valid] = 1
    tensors = {
        "target_latents": torch.randn(t_len, LATENT, generator=g, dtype=bf16),
        "attention_mask": torch.ones(t_len, dtype=bf16),
        "encoder_hidden_states": torch.randn(length, width, generator=g, dtype=bf16),
        "encoder_attention_mask": mask,
        "context_latents": torch.cat([silence[:t_len], torch.ones(t_len, LATENT, dtype=bf16)], dim=-1),
    }
    meta = {"audio_path": f"/music/{sample_name(i)}.wav", "filename": f"{sample_name(i)}.wav",
            "caption": f"synthetic benchmark clip {i}", "lyrics": "[Instrumental]", "duration": t_len / FPS,
            "bpm": 120, "keyscale": "C major", "timesignature": "4", "is_instrumental": True}
    return tensors, meta


def dir_bytes(path: Path) -> tuple[int, int]:
    """(apparent bytes, bytes allocated on disk) of the files under `path`."""
    size = blocks = 0
    for f in path.rglob("*"):
        if f.is_file():
            st = f.stat()
            size += st.st_size
            blocks += st.st_blocks * 512
    return size, blocks


def prepare_dataset(workdir: Path, p: dict[str, Any]) -> dict[str, Any]:
    """Reuse the dataset in `workdir` when it was written with the same parameters, else (re)generate it."""
    pt_dir, v3_dir, marker = workdir / "pt", workdir / "v3", workdir / MARKER
    info: dict[str, Any] = {"pt": str(pt_dir), "v3": str(v3_dir)}
    if marker.is_file():
        old = json.loads(marker.read_text())
        if old.get("params") == p and old.get("complete"):
            say(f"[data] reusing the dataset in {workdir} (same parameters)")
            return {**old, **info, "generated": False}
        say(f"[data] {workdir} holds a dataset with other parameters or an unfinished write: regenerating")
        shutil.rmtree(pt_dir, ignore_errors=True)
        shutil.rmtree(v3_dir, ignore_errors=True)
    elif pt_dir.exists() or v3_dir.exists():
        raise UserError(f"--workdir {workdir} has pt/ or v3/ but no {MARKER}: not written by this benchmark. Fix: "
                        "choose another --workdir.")
    workdir.mkdir(parents=True, exist_ok=True)
    marker.write_text(json.dumps({"params": p, "complete": False}))
    pt_dir.mkdir()
    lengths = clip_lengths(p)
    silence = (0.5 + 0.05 * torch.randn(max(lengths), LATENT, generator=torch.Generator().manual_seed(7))).bfloat16()
    total = sum(stored_bytes(t, p) for t in lengths)
    say(f"[data] generating {p['samples']} clips of {p['min_seconds']}-{p['max_seconds']} s "
        f"({total / 1e9:.2f} GB of bf16 tensors per format) into {workdir}: .pt files and v3 shards in one pass")
    started = time.perf_counter()

    def items():
        for i, t_len in enumerate(lengths):
            tensors, meta = make_sample(i, t_len, p, silence)
            torch.save({**tensors, "metadata": meta}, pt_dir / f"{sample_name(i)}.pt")
            yield sample_name(i), tensors, meta

    fingerprint = make_fingerprint("bench-synthetic", None, None, None, None, {"generator": "bench_loader", **p})
    summary = write_v3(items(), v3_dir, fingerprint=fingerprint, progress=True)
    manifest = {"metadata": {"name": "bench_loader", "num_samples": p["samples"], "all_instrumental": True},
                "samples": [f"{sample_name(i)}.pt" for i in range(p["samples"])], "num_samples": p["samples"]}
    (pt_dir / "manifest.json").write_text(json.dumps(manifest))
    os.sync()
    pt_size, pt_alloc = dir_bytes(pt_dir)
    v3_size, v3_alloc = dir_bytes(v3_dir)
    record = {"params": p, "complete": True, "seconds": round(time.perf_counter() - started, 1),
              "tensor_bytes": total, "pt_bytes": pt_size, "pt_disk_bytes": pt_alloc, "v3_bytes": v3_size,
              "v3_disk_bytes": v3_alloc, "v3_shards": summary.num_shards}
    marker.write_text(json.dumps(record))
    return {**record, **info, "generated": True}


def warm(*dirs: Path) -> float:
    """Read every file once so that it sits in the page cache; returns MB/s."""
    buf, n, t0 = bytearray(16 << 20), 0, time.perf_counter()
    for d in dirs:
        for f in sorted(d.rglob("*")):
            if f.is_file():
                with open(f, "rb", buffering=0) as fh:
                    while (k := fh.readinto(buf)):
                        n += k
    return n / MB / (time.perf_counter() - t0)


# ---------------------------------------------------------------------------------------------------------- baseline
class PtFileDataset(Dataset):
    """The official per-sample .pt layout read the plain way: manifest paths, one `torch.load` per read."""

    def __init__(self, root: Path) -> None:
        manifest = json.loads((root / "manifest.json").read_text())
        self.paths = [p for p in (root / s for s in manifest["samples"]) if p.exists()]

    def __len__(self) -> int:
        return len(self.paths)

    def load(self, i: int) -> dict[str, Any]:
        return torch.load(self.paths[i], map_location="cpu", weights_only=True)

    def __getitem__(self, i: int) -> dict[str, Any]:
        data = self.load(i)
        missing = set(REQUIRED_KEYS) - data.keys()
        if missing:
            raise KeyError(f"{self.paths[i]} lacks {sorted(missing)}")
        return {**{k: data[k] for k in REQUIRED_KEYS}, "metadata": data.get("metadata", {})}


class SideStepTensorDataset(PtFileDataset):
    """Side-Step's `PreprocessedTensorDataset` with its defaults (no chunking, no repeats, no genre variant):
    `cache_in_ram=None` preloads every sample when the files total less than 4 GiB, and every read scans the three
    float tensors for NaN/Inf (zeroing them in place if found), so a cached read costs a full pass over the sample."""

    def __init__(self, root: Path, cache_in_ram: bool | None = None) -> None:
        super().__init__(root)
        self.file_bytes = sum(os.path.getsize(p) for p in self.paths)
        if cache_in_ram is None:
            cache_in_ram = self.file_bytes < SIDESTEP_RAM_CACHE_BYTES
        self.cache = [PtFileDataset.load(self, i) for i in range(len(self))] if cache_in_ram else None  # the preload

    def load(self, i: int) -> dict[str, Any]:
        return self.cache[i] if self.cache is not None else super().load(i)

    def __getitem__(self, i: int) -> dict[str, Any]:
        sample = super().__getitem__(i)
        for name in SIDESTEP_SCANNED:
            t = sample[name]
            if torch.isnan(t).any() or torch.isinf(t).any():
                t.nan_to_num_(nan=0.0, posinf=0.0, neginf=0.0)
        sample["conditioning_type"] = "caption"
        return sample


def padding_collate(samples: list[dict[str, Any]]) -> dict[str, Any]:
    """Side-Step's (and the official trainer's) `collate_preprocessed_batch`: each tensor zero-padded to the batch's
    longest T or L with `new_zeros` + `torch.cat`, then `torch.stack`; the stored dtype is kept."""
    longest_t = max(s["target_latents"].shape[0] for s in samples)
    longest_l = max(s["encoder_hidden_states"].shape[0] for s in samples)
    out: dict[str, Any] = {}
    for name in REQUIRED_KEYS:
        longest = longest_l if name.startswith("encoder") else longest_t
        padded = []
        for s in samples:
            t = s[name]
            if t.shape[0] < longest:
                t = torch.cat([t, t.new_zeros(longest - t.shape[0], *t.shape[1:])], dim=0)
            padded.append(t)
        out[name] = torch.stack(padded)
    out["metadata"] = [s["metadata"] for s in samples]
    out["conditioning_info"] = [{"name": s["metadata"].get("filename", "?"),
                                 "type": s.get("conditioning_type", "caption")} for s in samples]
    return out


class DataLoaderBatches:
    """A torch DataLoader over .pt files, as a trainer consumes it: `next()` -> (float32 Batch, seconds waited);
    the conversion runs in the caller's thread, as Side-Step's `.to(device, dtype)` in its training step."""

    def __init__(self, dataset: PtFileDataset, order: Sequence[int], batch_size: int, workers: int,
                 prefetch_factor: int | None = None, persistent: bool = False) -> None:
        self.loader = DataLoader(dataset, batch_size=batch_size, sampler=list(order), num_workers=workers,
                                 collate_fn=padding_collate, drop_last=False, pin_memory=torch.cuda.is_available(),
                                 prefetch_factor=prefetch_factor if workers else None,
                                 persistent_workers=persistent and workers > 0)
        self.iterator = iter(self.loader)
        self.policy: str | None = None  # a label for the tables

    def next(self):
        t0 = time.perf_counter()
        raw = next(self.iterator)
        keys = [Path(m["filename"]).stem for m in raw["metadata"]]
        batch = Batch(keys=keys, **{k: raw[k].to("cpu", dtype=torch.float32) for k in REQUIRED_KEYS})
        return batch, time.perf_counter() - t0

    def close(self) -> None:
        """Persistent workers live as long as their iterator: stop them now, not at garbage collection."""
        if hasattr(self.iterator, "_shutdown_workers"):
            self.iterator._shutdown_workers()
        self.iterator = self.loader = None


def sidestep_default(pt_dir: Path, order: Sequence[int], cache_in_ram: bool | None = None) -> DataLoaderBatches:
    """The baseline: Side-Step's default dataset and DataLoader settings."""
    dataset = SideStepTensorDataset(pt_dir, cache_in_ram)
    pipe = DataLoaderBatches(dataset, order, SIDESTEP_BATCH_SIZE, SIDESTEP_NUM_WORKERS, SIDESTEP_PREFETCH_FACTOR,
                             SIDESTEP_PERSISTENT_WORKERS)
    pipe.policy = "RAM cache" if dataset.cache is not None else "no cache"
    return pipe


def previous_baseline(pt_dir: Path, order: Sequence[int]) -> DataLoaderBatches:
    """Reference: the simplified loader this benchmark used to compare against (no scan, no cache, no workers)."""
    return DataLoaderBatches(PtFileDataset(pt_dir), order, 4, 0)


# ---------------------------------------------------------------------------------------------------------- acestep_ft
def compose_defaults(dataset_dir: Path, overrides: Sequence[str]):
    """The typed config of conf/ with the dataset pointed at `dataset_dir` (every other value a project default)."""
    register_configs()
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        try:
            return to_typed(compose(config_name="config",
                                    overrides=["dataset=preprocessed", f"dataset.path={dataset_dir}", *overrides]))
        except (HydraException, OmegaConfBaseException) as err:  # unknown key, bad value, unparsable override
            raise ConfigError(f"--override {' '.join(overrides)} does not compose with conf/: {err}. Fix: give "
                              "KEY=VALUE overrides as on train.py's command line.") from None


class FixedBatches:
    """A sampler handing out a fixed list of batches (the control pipeline's): what BatchStream needs of one."""

    def __init__(self, batches: list[list[int]]) -> None:
        self.batches, self.position, self.epoch = batches, 0, 0

    def next_batch(self) -> list[int]:
        batch = self.batches[self.position % len(self.batches)]
        self.position += 1
        return list(batch)

    def state_dict(self) -> dict[str, int]:
        return {"epoch": 0, "position": self.position}


class AcestepBatches:
    """run.py's input pipeline (build_sources + build_batches + Prefetcher) from the public data API."""

    def __init__(self, cfg, encoder_width: int, device: torch.device, batches: list[list[int]] | None = None):
        """`batches` None = the config's own sampler (`sampler_for`); else exactly these batches (the control)."""
        self.policy, self.why = resolve_cache_policy(cfg.dataset, cfg.cache)
        self.source = build_dataset(cfg.dataset, replace(cfg.cache, policy=self.policy), encoder_width)
        max_frames = seconds_to_frames(cfg.dataset.max_seconds)
        if batches is None:
            self.sampler = sampler_for(cfg, capped_lengths(self.source.lengths, max_frames))
        else:
            self.sampler = FixedBatches(batches)
        cuda_copy = cfg.hardware.device_prefetch and device.type == "cuda"
        stream = BatchStream(self.source, self.sampler, max_frames=max_frames, seed=cfg.train.seed,
                             pin_memory=cuda_copy)
        self.prefetcher = Prefetcher(stream, device, device_prefetch=cfg.hardware.device_prefetch)

    def next(self):
        return self.prefetcher.next()

    def close(self) -> None:
        self.prefetcher.close()
        inner = getattr(self.source, "source", self.source)  # ram_lru wraps the reader
        if hasattr(inner, "close"):
            inner.close()


def planned_batches(cfg, encoder_width: int) -> dict[str, Any]:
    """What acestep_ft's own sampler will hand out: its epoch-0 batches (indices into the source), the source's keys,
    batches per epoch and the sampler's padding over an epoch (against random batches of the same size)."""
    pipe = AcestepBatches(cfg, encoder_width, torch.device("cpu"))
    try:
        return {"batches": pipe.sampler.epoch_batches(0), "keys": pipe.source.keys,
                "per_epoch": pipe.sampler.batches_per_epoch, "padding": pipe.sampler.padding_stats()}
    finally:
        pipe.close()


# ---------------------------------------------------------------------------------------------------------- stats
def spread(values: Sequence[float]) -> dict[str, float]:
    return {"min": min(values), "median": statistics.median(values), "max": max(values)}


def fmt_spread(s: dict[str, float], fmt: str = "{:.1f}", scale: float = 1.0) -> str:
    return " / ".join(fmt.format(scale * s[k]) for k in ("min", "median", "max"))


# ---------------------------------------------------------------------------------------------------------- loaders
def time_loader(make: Callable[[], Any], clips: int, key_bytes: dict[str, int], skip_batches: int = 0) -> dict:
    """Build a pipeline, take float32 batches until `clips` clips arrived after the first (timed) batch.
    `skip_batches` > 0: that many batches are taken first, untimed (to reach a later epoch)."""
    gc.collect()
    t0 = time.perf_counter()
    pipe = make()
    for _ in range(skip_batches):
        pipe.next()
    first, _ = pipe.next()
    ttfb = None if skip_batches else time.perf_counter() - t0  # after a whole epoch it means nothing
    n = stored = 0
    t1 = time.perf_counter()
    while n < clips - len(first.keys):
        batch, _ = pipe.next()
        n += len(batch.keys)
        stored += sum(key_bytes[k] for k in batch.keys)
        del batch
    dt = time.perf_counter() - t1
    info = {"policy": getattr(pipe, "policy", None)}
    pipe.close()
    del pipe, first
    gc.collect()
    return {"ttfb_s": ttfb, "samples_per_s": n / dt, "read_mb_per_s": stored / MB / dt, "samples": n,
            "seconds": dt, **info}


def bench_loaders(a, data, cfg_v3, cfg_pt, key_bytes, plan) -> dict[str, Any]:
    """Every loader configuration, `a.repeats` rounds, interleaved."""
    pt, v3 = Path(data["pt"]), Path(data["v3"])
    batches, keys, per_epoch = plan["batches"], plan["keys"], plan["per_epoch"]
    chosen: list[list[int]] = []
    while sum(len(b) for b in chosen) < a.loader_samples and len(chosen) < len(batches):
        chosen.append(batches[len(chosen)])
    clips = sum(len(b) for b in chosen)
    pt_paths = PtFileDataset(pt).paths
    pt_index = {p.stem: i for i, p in enumerate(pt_paths)}
    shuffled = torch.randperm(clips, generator=torch.Generator().manual_seed(a.seed)).tolist()
    flat = [pt_index[keys[i]] for b in chosen for i in b]
    order = [flat[k] for k in shuffled]  # the same clips, in a random order (Side-Step's shuffle=True)
    pt_bytes = sum(os.path.getsize(p) for p in pt_paths)
    default_cache = pt_bytes < SIDESTEP_RAM_CACHE_BYTES
    other = "on" if not default_cache else "off"
    configs = [
        ("sidestep_default", lambda: sidestep_default(pt, order), 0),
        ("acestep_ft default (v3, cache=auto)", lambda: AcestepBatches(cfg_v3, a.encoder_width, torch.device("cpu")),
         0),
        (f"reference: sidestep_default with its RAM cache {other}",
         lambda: sidestep_default(pt, order, cache_in_ram=not default_cache), 0),
        ("reference: previous simplified baseline", lambda: previous_baseline(pt, order), 0),
        ("reference: acestep_ft default on the .pt files",
         lambda: AcestepBatches(cfg_pt, a.encoder_width, torch.device("cpu")), 0),
        ("reference: acestep_ft default (v3), 2nd epoch",
         lambda: AcestepBatches(cfg_v3, a.encoder_width, torch.device("cpu")), per_epoch),
    ]
    say(f"[loader] {clips} clips per run ({len(chosen)} acestep_ft batches); sidestep_default's RAM cache is "
        f"{'on' if default_cache else 'off'} by default for these {pt_bytes / 2**30:.2f} GiB of .pt files")
    say(f"[loader] warming the page cache: {warm(pt, v3):.0f} MB/s")
    runs: dict[str, list] = {name: [] for name, _, _ in configs}
    rounds = []
    for r in range(a.repeats):
        rounds.append({"round": r + 1, "loadavg": loadavg()})
        for name, make, skip in configs:
            res = time_loader(make, clips, key_bytes, skip)
            runs[name].append(res)
            ttfb = f"TTFB {1000 * res['ttfb_s']:.0f} ms, " if res["ttfb_s"] is not None else ""
            say(f"[loader] {r + 1}/{a.repeats} {name}: {res['samples_per_s']:.1f} samples/s, {ttfb}"
                f"load {rounds[-1]['loadavg'][0]}")
    base = runs["sidestep_default"]
    rows = []
    for name, _, _ in configs:
        rs = runs[name]
        rows.append({"loader": name, "samples_per_s": spread([x["samples_per_s"] for x in rs]),
                     "x_sidestep": spread([x["samples_per_s"] / b["samples_per_s"] for x, b in zip(rs, base)]),
                     "ttfb_s": spread([x["ttfb_s"] for x in rs]) if rs[0]["ttfb_s"] is not None else None,
                     "read_mb_per_s": spread([x["read_mb_per_s"] for x in rs]),
                     "policy": rs[0].get("policy"), "runs": rs})
    return {"clips": clips, "sidestep_cache_default": default_cache, "rows": rows, "rounds": rounds}


# ---------------------------------------------------------------------------------------------------------- training
class RecordingSink:
    """Stands in for MetricsSink: keeps what train_loop logs."""

    def __init__(self) -> None:
        self.rows: list[dict[str, float]] = []

    def log(self, step: int, metrics: dict[str, float]) -> None:
        self.rows.append({"step": step, **metrics})


class Recorded:
    """A pipeline as train_loop sees it, keeping every micro-batch's wait, clips and frames (the first wait is the
    time to first batch, which the step times leave out)."""

    def __init__(self, inner) -> None:
        self.inner, self.waits, self.keys = inner, [], []
        self.frames = self.padded = 0

    def next(self):
        batch, waited = self.inner.next()
        self.waits.append(waited)
        self.keys.extend(batch.keys)
        self.frames += int(batch.attention_mask.sum())
        self.padded += batch.attention_mask.numel()
        return batch, waited

    def close(self) -> None:
        self.inner.close()


def bench_model_config(a) -> ModelConfig:
    yaml = OmegaConf.load(ROOT / "conf" / "model" / "tiny.yaml")
    yaml.pop("defaults")
    return OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(ModelConfig), yaml,
                                               {"encoder_hidden_size": a.encoder_width}))


def train_once(a, model_cfg: ModelConfig, make: Callable[[], Any], grad_accum: int, steps: int) -> dict[str, Any]:
    """`steps` optimizer steps of `grad_accum` micro-batches from `make()` through the real train_loop."""
    from accelerate import Accelerator

    from acestep_ft.config import ObjectiveConfig
    from acestep_ft.model import load_model
    from acestep_ft.train.loop import LoopParts, train_loop
    from acestep_ft.train.optim import build_optimizer, build_scheduler
    from acestep_ft.train.trainable import make_trainable

    acc = Accelerator(cpu=True, mixed_precision="no", gradient_accumulation_steps=grad_accum)
    torch.manual_seed(a.seed)
    model = load_model(model_cfg)
    decoder = make_trainable(model, LoraMode())
    optim_cfg = OptimConfig(lr=1e-4, warmup_steps=0)
    optimizer = build_optimizer(decoder, optim_cfg)
    scheduler = build_scheduler(optimizer, steps, optim_cfg)
    decoder, optimizer = acc.prepare(decoder, optimizer)
    null = model.null_condition_emb.detach().to(acc.device)
    sink = RecordingSink()
    torch.manual_seed(a.seed)
    gc.collect()
    t0 = time.perf_counter()
    batches = Recorded(make())  # reading (and Side-Step's worker processes) start here, as just before the loop
    parts = LoopParts(acc, decoder, null, optimizer, scheduler, batches, ObjectiveConfig(),
                      model_cfg.timestep_mu, model_cfg.timestep_sigma)
    try:
        with open(os.devnull, "w") as devnull, contextlib.redirect_stdout(devnull):  # the loop's tqdm bar
            train_loop(parts, TrainConfig(max_steps=steps, grad_accum=grad_accum, log_every=1, save_every=10**9,
                                          plot=False), 0, sink, lambda step, note=None: None, 1.0)
    finally:
        batches.close()
    wall = time.perf_counter() - t0
    acc.free_memory()
    del model, decoder, optimizer, parts
    gc.collect()
    times = [r["perf/step_time_s"] for r in sink.rows]
    first_wait = batches.waits[0]
    busy = sum(times) - first_wait
    samples = len(batches.keys)
    return {"steps": len(times), "samples": samples, "keys": batches.keys, "ttfb_s": first_wait,
            "first_step_s": times[0], "busy_s": busy, "s_per_4_samples": 4 * busy / samples,
            "step_s_mean": busy / len(times), "step_s_median": statistics.median(times[1:] or times),
            "stall_fraction": (sum(batches.waits) - first_wait) / busy, "samples_per_s": samples / busy,
            "real_frames_per_s": batches.frames / busy, "pad_fraction": 1 - batches.frames / batches.padded,
            "wall_s": wall}


def bench_training(a, data, cfg_v3, plan) -> dict[str, Any]:
    pt, v3 = Path(data["pt"]), Path(data["v3"])
    batches, keys = plan["batches"], plan["keys"]
    model_cfg = bench_model_config(a)
    per_step = SIDESTEP_BATCH_SIZE * SIDESTEP_GRAD_ACCUM
    ft_batch, ft_accum = cfg_v3.hardware.batch_size, cfg_v3.train.grad_accum
    ft_steps = a.train_steps
    if ft_steps * ft_accum > len(batches):
        raise UserError(f"--train-steps {ft_steps} needs {ft_steps * ft_accum} batches, an epoch has {len(batches)}. "
                        "Fix: lower --train-steps or raise --samples.")
    clips = [i for b in batches[: ft_steps * ft_accum] for i in b]
    ss_steps = len(clips) // per_step  # whole optimizer steps: at most per_step - 1 clips are left out
    perm = torch.randperm(len(clips), generator=torch.Generator().manual_seed(a.seed + 1)).tolist()
    ss_v3_order = [clips[k] for k in perm][: ss_steps * per_step]  # Side-Step's shuffled order of those clips
    pt_index = {p.stem: i for i, p in enumerate(PtFileDataset(pt).paths)}
    ss_pt_order = [pt_index[keys[i]] for i in ss_v3_order]
    cpu = torch.device("cpu")
    bucket = cfg_v3.dataset.bucket_seconds
    configs = [
        ("sidestep_default", (f"batch {SIDESTEP_BATCH_SIZE} x accum {SIDESTEP_GRAD_ACCUM}, DataLoader with "
         f"{SIDESTEP_NUM_WORKERS} worker processes, shuffled"), lambda: sidestep_default(pt, ss_pt_order),
         SIDESTEP_GRAD_ACCUM, ss_steps),
        ("acestep_ft default", (f"batch {ft_batch} x accum {ft_accum}, {bucket:g} s buckets, v3 cache=auto, "
         "Prefetcher"), lambda: AcestepBatches(cfg_v3, a.encoder_width, cpu), ft_accum, ft_steps),
        ("control", (f"acestep_ft's loader fed sidestep_default's micro-batches (batch {SIDESTEP_BATCH_SIZE} x accum "
         f"{SIDESTEP_GRAD_ACCUM}, same order)"),
         lambda: AcestepBatches(cfg_v3, a.encoder_width, cpu, [[i] for i in ss_v3_order]), SIDESTEP_GRAD_ACCUM,
         ss_steps),
    ]
    planned = {"acestep_ft default": sorted(keys[i] for i in clips)}
    planned["sidestep_default"] = planned["control"] = sorted(keys[i] for i in ss_v3_order)
    say(f"[train] acestep_ft default: {len(clips)} clips in {ft_steps} optimizer steps of up to {ft_batch * ft_accum}; "
        f"sidestep_default and control: {len(ss_v3_order)} of them in {ss_steps} steps of {per_step}")
    warm(pt, v3)
    runs: dict[str, list] = {name: [] for name, *_ in configs}
    rounds = []
    for r in range(a.repeats):
        rounds.append({"round": r + 1, "loadavg": loadavg()})
        for name, _, make, accum, steps in configs:
            res = train_once(a, model_cfg, make, accum, steps)
            if sorted(res.pop("keys")) != planned[name]:
                raise RuntimeError(f"{name} trained on other clips than planned: the benchmark's plan and the "
                                   "sampler disagree (fix the plan in bench_training)")
            runs[name].append(res)
            say(f"[train] {r + 1}/{a.repeats} {name}: {res['s_per_4_samples']:.3f} s per 4 samples, mean step "
                f"{res['step_s_mean']:.3f} s, stall {100 * res['stall_fraction']:.1f}% "
                f"(load {rounds[-1]['loadavg'][0]})")
    base = runs["sidestep_default"]
    rows = []
    for name, what, _, accum, steps in configs:
        rs = runs[name]
        row = {"pipeline": name, "what": what, "steps": steps, "samples_per_step": len(planned[name]) / steps,
               "runs": rs, "rounds": rounds}
        for key in ("s_per_4_samples", "step_s_mean", "step_s_median", "stall_fraction", "samples_per_s",
                    "real_frames_per_s", "pad_fraction", "ttfb_s", "first_step_s"):
            row[key] = spread([x[key] for x in rs])
        row["time_vs_sidestep"] = spread([x["s_per_4_samples"] / b["s_per_4_samples"] for x, b in zip(rs, base)])
        row["stall_points_vs_sidestep"] = spread([b["stall_fraction"] - x["stall_fraction"] for x, b in zip(rs, base)])
        rows.append(row)
    return {"clips": len(clips), "sidestep_clips": len(ss_v3_order), "rows": rows, "rounds": rounds}


# ---------------------------------------------------------------------------------------------------------- report
def fmt_table(headers: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(headers)]
    line = lambda cells: "| " + " | ".join(c.ljust(w) if i == 0 else c.rjust(w)
                                           for i, (c, w) in enumerate(zip(cells, widths))) + " |"
    sep = "|" + "|".join("-" * (w + 2) if i == 0 else "-" * (w + 1) + ":" for i, w in enumerate(widths)) + "|"
    return "\n".join([line(headers), sep] + [line(r) for r in rows])


def report(result: dict[str, Any]) -> str:
    m, d, a = result["machine"], result["dataset"], result["args"]
    lengths = result["lengths"]
    out = [(f"machine: {m['cores']} cores, {m['ram_gib']} GiB RAM, {m['cpu']}, torch {m['torch']} "
           f"({m['torch_threads']} intra-op threads), python {m['python']}, CUDA GPU: {m['cuda']}; load average "
           f"(1/5/15 min) at start {m['loadavg_start']}, after each phase {m.get('loadavg_after_phase')}"),
           f"dataset: {a['samples']} clips, {a['min_seconds']}-{a['max_seconds']} s (T {min(lengths)}-{max(lengths)} "
           f"frames, mean {statistics.mean(lengths):.0f}), L={a['condition_length']}, H_enc={a['encoder_width']}, "
           f"bf16: {d['tensor_bytes'] / 1e9:.2f} GB of tensors; .pt {d['pt_bytes'] / 2**30:.2f} GiB "
           f"({a['samples']} files), v3 {d['v3_bytes'] / 2**30:.2f} GiB ({d['v3_shards']} shards)"
           + (f"; generated in {d['seconds']:.0f} s" if d.get("generated") else " (reused)"),
           f"acestep_ft config: {result['acestep_ft']}",
           f"every figure: min / median / max of {a['repeats']} rounds (ratios: per round, then min / median / max)"]
    if result.get("loaders"):
        lo = result["loaders"]
        rows = [[r["loader"] + (f" [{r['policy']}]" if r.get("policy") else ""), fmt_spread(r["samples_per_s"]),
                 fmt_spread(r["x_sidestep"], "{:.2f}x"),
                 fmt_spread(r["ttfb_s"], "{:.0f}", 1000) if r["ttfb_s"] else "-",
                 fmt_spread(r["read_mb_per_s"], "{:.0f}")] for r in lo["rows"]]
        out += ["", (f"Loader ({lo['clips']} clips per run, warm page cache; samples/s = clips delivered as float32 "
                    "batches after the first batch; sidestep_default's RAM cache is "
                    f"{'on' if lo['sidestep_cache_default'] else 'off'} by default for this dataset):"),
                fmt_table(["loader [cache policy]", "samples/s", "vs sidestep_default", "TTFB ms", "read MB/s"], rows),
                "load average (1 min) at each round: " + ", ".join(str(x["loadavg"][0]) for x in lo["rounds"])]
    if result.get("training"):
        tr = result["training"]
        rows = [[r["pipeline"], fmt_spread(r["s_per_4_samples"], "{:.3f}"),
                 fmt_spread(r["time_vs_sidestep"], "{:.2f}x"), fmt_spread(r["step_s_mean"], "{:.3f}"),
                 f"{r['steps']} x {r['samples_per_step']:.2f}",
                 fmt_spread(r["stall_fraction"], "{:.1f}", 100), fmt_spread(r["samples_per_s"], "{:.2f}"),
                 fmt_spread(r["pad_fraction"], "{:.1f}", 100), fmt_spread(r["ttfb_s"], "{:.0f}", 1000)]
                for r in tr["rows"]]
        out += ["", (f"Training steps (tiny decoder, encoder width {a['encoder_width']}, LoRA, cpu fp32; acestep_ft "
                    f"default trains {tr['clips']} clips, sidestep_default and control {tr['sidestep_clips']} of them "
                    "(whole steps of 4); s per 4 samples = 4 x busy time / samples, busy time = step times without "
                    "the first micro-batch's wait (TTFB); stall = waits / busy time):"),
                fmt_table(["pipeline", "s per 4 samples", "time vs sidestep_default", "mean step s",
                           "steps x samples", "stall %", "samples/s", "pad %", "TTFB ms"], rows)]
        out += [f"  {r['pipeline']}: {r['what']}" for r in tr["rows"]]
        out += ["load average (1 min) at each round: " + ", ".join(str(x["loadavg"][0]) for x in tr["rounds"])]
    if result.get("targets"):
        out += ["", "Targets (vs sidestep_default):"] + [f"  {'MET ' if t['met'] else 'NOT MET'}  {t['target']}: "
                                                         f"{t['value']}" for t in result["targets"]]
    return "\n".join(out)


def targets(result: dict[str, Any]) -> list[dict[str, Any]]:
    out = []
    if result.get("loaders"):
        ft = result["loaders"]["rows"][1]
        out.append({"target": "loader >= 5x sidestep_default samples/s (acestep_ft default, float32 batches)",
                    "value": f"{fmt_spread(ft['x_sidestep'], '{:.2f}x')} (min / median / max)",
                    "met": ft["x_sidestep"]["median"] >= 5})
        pad = result["padding"]
        out.append({"target": "padding < 5% (acestep_ft's sampler, whole epoch)",
                    "value": f"{100 * pad['pad_fraction']:.1f}% (random batches of the same size: "
                             f"{100 * pad['naive_pad_fraction']:.1f}%; sidestep_default's batches of 1 pad nothing)",
                    "met": pad["pad_fraction"] < 0.05})
    if result.get("training"):
        ft = result["training"]["rows"][1]
        ratio, points = ft["time_vs_sidestep"], ft["stall_points_vs_sidestep"]
        base = result["training"]["rows"][0]["stall_fraction"]
        out.append({"target": "step time >= 20% faster (time per 4 samples at least 20% lower)",
                    "value": f"{fmt_spread(ratio, '{:.2f}x')} of sidestep_default's time per 4 samples",
                    "met": ratio["median"] <= 0.80})
        out.append({"target": "data stall >= 15% lower",
                    "value": f"sidestep_default {fmt_spread(base, '{:.1f}', 100)} %, acestep_ft "
                             f"{fmt_spread(ft['stall_fraction'], '{:.1f}', 100)} % of the step (points lower: "
                             f"{fmt_spread(points, '{:.1f}', 100)})",
                    "met": ft["stall_fraction"]["median"] <= 0.85 * base["median"]})
    return out


# ---------------------------------------------------------------------------------------------------------- main
def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true",
                    help=f"smoke check: {QUICK['samples']} clips, {QUICK['loader_samples']} clips per loader run, "
                         f"{QUICK['train_steps']} training steps (about a minute)")
    ap.add_argument("--samples", type=int, default=None, help=f"clips in the dataset (default {FULL['samples']})")
    ap.add_argument("--min-seconds", type=float, default=10.0, help="shortest clip")
    ap.add_argument("--max-seconds", type=float, default=240.0, help="longest clip")
    ap.add_argument("--condition-length", type=int, default=769, help="L of encoder_hidden_states")
    ap.add_argument("--encoder-width", type=int, default=2048, help="H_enc of encoder_hidden_states")
    ap.add_argument("--loader-samples", type=int, default=None,
                    help=f"clips per loader run (default {FULL['loader_samples']})")
    ap.add_argument("--train-steps", type=int, default=None,
                    help=f"acestep_ft optimizer steps per training run (default {FULL['train_steps']})")
    ap.add_argument("--repeats", type=int, default=3, help="rounds of every measurement (min / median / max)")
    ap.add_argument("--override", action="append", default=[], metavar="KEY=VALUE",
                    help="Hydra override for acestep_ft's config (e.g. hardware.batch_size=8); repeatable")
    ap.add_argument("--threads", type=int, default=None,
                    help="torch intra-op threads of this process (default: torch's own choice, one per core); "
                         "DataLoader workers always use 1")
    ap.add_argument("--seed", type=int, default=0, help="training seed and shuffle seed")
    ap.add_argument("--data-seed", type=int, default=1234, help="dataset generator seed")
    ap.add_argument("--workdir", type=Path, default=None,
                    help="where the dataset lives (default: a directory under the system temp dir named after the "
                         "dataset parameters, reused by later runs with --keep)")
    ap.add_argument("--keep", action="store_true", help="keep the generated dataset for later runs")
    ap.add_argument("--json", type=Path, default=None, help="also write the results (every run) as JSON here")
    ap.add_argument("--skip-train", action="store_true", help="loader measurements only")
    a = ap.parse_args(argv)
    for key, value in (QUICK if a.quick else FULL).items():
        if getattr(a, key) is None:
            setattr(a, key, value)
    if a.samples < 8 or a.loader_samples < 2 or a.train_steps < 2 or a.repeats < 1 or (a.threads or 1) < 1:
        ap.error("need --samples >= 8, --loader-samples >= 2, --train-steps >= 2, --repeats >= 1, --threads >= 1")
    return a


def describe(cfg, policy: str, why: str) -> str:
    return (f"hardware.batch_size={cfg.hardware.batch_size}, train.grad_accum={cfg.train.grad_accum}, "
            f"dataset.bucket_seconds={cfg.dataset.bucket_seconds}, dataset.max_seconds={cfg.dataset.max_seconds}, "
            f"dataset.verify_checksums={cfg.dataset.verify_checksums.value}, cache.policy="
            f"{cfg.cache.policy.value} -> {policy} ({why}), hardware.device_prefetch={cfg.hardware.device_prefetch}")


def run_benchmark(a, data, result: dict[str, Any], lengths: list[int], p: dict[str, Any]) -> None:
    phases: dict[str, list] = {}
    cfg_v3 = compose_defaults(Path(data["v3"]), a.override)
    cfg_pt = compose_defaults(Path(data["pt"]), a.override)
    policy, why = resolve_cache_policy(cfg_v3.dataset, cfg_v3.cache)
    result["acestep_ft"] = describe(cfg_v3, policy, why)
    say(f"[config] acestep_ft: {result['acestep_ft']}")
    plan = planned_batches(cfg_v3, a.encoder_width)
    key_bytes = {sample_name(i): stored_bytes(t, p) for i, t in enumerate(lengths)}
    result["padding"] = plan["padding"]
    phases["dataset"] = loadavg()
    result["loaders"] = bench_loaders(a, data, cfg_v3, cfg_pt, key_bytes, plan)
    phases["loaders"] = loadavg()
    if not a.skip_train:
        result["training"] = bench_training(a, data, cfg_v3, plan)
        phases["training"] = loadavg()
    result["machine"]["loadavg_after_phase"] = phases
    result["targets"] = targets(result)


def main(argv=None) -> int:
    a = parse_args(argv)
    if a.threads:
        torch.set_num_threads(a.threads)
    p = dataset_params(a)
    digest = hashlib.sha1(json.dumps(p, sort_keys=True).encode()).hexdigest()[:10]
    workdir = a.workdir or Path(tempfile.gettempdir()) / f"acestep_ft_bench_{digest}"
    if workdir.exists() and not workdir.is_dir():
        raise ConfigError(f"--workdir {workdir} is a file. Fix: give a directory (new, or one this benchmark wrote).")
    existed = workdir.exists()
    started = time.perf_counter()
    result: dict[str, Any] = {"args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(a).items()},
                              "machine": machine_info()}
    say(f"[machine] {result['machine']}")
    data = None
    try:
        data = prepare_dataset(workdir, p)
        lengths = clip_lengths(p)
        result["dataset"] = {k: v for k, v in data.items() if k not in ("pt", "v3", "params")}
        result["lengths"] = lengths
        run_benchmark(a, data, result, lengths, p)
        result["seconds"] = round(time.perf_counter() - started, 1)
        say("")
        say(report(result))
        say(f"\ntotal {result['seconds']:.0f} s")
        if a.json:
            a.json.parent.mkdir(parents=True, exist_ok=True)
            a.json.write_text(json.dumps(result, indent=1))
            say(f"JSON: {a.json}")
    finally:
        if data is not None and data.get("generated") and not a.keep:
            shutil.rmtree(workdir / "pt", ignore_errors=True)
            shutil.rmtree(workdir / "v3", ignore_errors=True)
            (workdir / MARKER).unlink(missing_ok=True)
            if not existed and not any(workdir.iterdir()):
                workdir.rmdir()
            say("[data] removed the generated dataset (pass --keep to reuse it)")
    return 0


if __name__ == "__main__":
    with reported_errors():  # the message only, no traceback
        sys.exit(main())
