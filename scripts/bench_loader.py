"""Input-pipeline benchmark: today's per-sample `torch.load` loader against acestep_ft (v3 shards / .pt files, every
cache policy), and what each does to a training step.

    python scripts/bench_loader.py [--samples 1000] [--min-seconds 10] [--max-seconds 240] [--batch-size 4]
                                   [--steps 60] [--repeats 3] [--train-steps 30] [--train-repeats 2]
                                   [--cache-gb 4] [--workdir DIR] [--keep] [--json PATH] [--skip-train] [--skip-cold]

About 8 minutes on a 2-core CPU machine with the defaults (0.5-2.5 of them writing the ~9 GB dataset, skipped when a
kept one is reused). Needs free disk for both formats (~4.4 MB per clip each) and RAM to hold them in the page cache
for the "warm" numbers.

1. Dataset. `--samples` synthetic clips with the real tensor sizes of the ACE-Step 1.5 preprocessors (bf16):
   target_latents [T, 64], attention_mask [T], encoder_hidden_states [769, 2048], encoder_attention_mask [769],
   context_latents [T, 128], T = 25 frames/s, durations uniform in [--min-seconds, --max-seconds] (~4.4 MB for a
   3-minute clip). Written once into --workdir in both formats: an official-style directory of per-sample .pt
   files with manifest.json (pt/), and a v3 dataset written by `write_v3` (v3/). A later run with the same
   parameters and --workdir reuses it (the default --workdir is derived from the parameters). Without --keep, what
   this run generated is deleted at the end.
2. Loaders, each fed `--steps` batches of `--batch-size`, repeated `--repeats` times (median reported):
   - baseline: the official / Side-Step loader: a torch Dataset doing one `torch.load(weights_only=True)` per file,
     torch DataLoader(num_workers=0) over random batches, their collate (zero-pad with `new_zeros` + `torch.cat`,
     `torch.stack`; the batch stays in the stored dtype, bf16). A num_workers=2 variant is reported as a reference.
   - acestep_ft: `build_dataset` + `LengthBucketSampler` (10 s buckets) + `BatchStream` for v3 (cache none = pread,
     mmap, ram_lru; mmap and none also with checksums off) and .pt (none, ram_lru). ram_lru is also measured in its
     second epoch, after one full epoch filled the cache.
   Each loader's output batch is then converted to float32, as the model here (fp32 on the CPU) needs it: the
   baseline's trainers do it in `.to(device, dtype)`, acestep_ft in `Batch.float()` (the Prefetcher). Both rates are
   reported: "loader" = batches as the loader hands them over (stored dtype; .pt sources of acestep_ft hand over
   float32), "-> fp32" = including that conversion (on a GPU it runs on the device after the copy).
   "warm" = the dataset files are in the OS page cache (the steady state of a dataset that fits in RAM); "cold" =
   evicted with posix_fadvise(DONTNEED) before each run. Time to first batch (TTFB) counts building the source
   (index, lengths), the sampler and the first batch. samples/s and MB/s are over batches 2..N.
3. Training steps with the tiny decoder (hardware cpu, fp32, LoRA as in conf/config.yaml) but encoder width 2048, so
   every step moves the real condition tensors, through the real `train_loop`: (a) the baseline loader,
   synchronous; (b) acestep_ft v3 (mmap, the `cache=auto` choice) + 10 s length buckets + `Prefetcher` (background
   thread, which also converts the batch to float32); (c) (b) read synchronously, without the Prefetcher; (d)
   control: (b) fed the baseline's random batches (isolates prefetching from padding); (e) reference: the baseline
   with DataLoader worker processes. The synchronous pipelines convert to float32 in the training thread, as the
   baseline's trainers do. All pipelines train on exactly the same clips: the first --train-steps full batches of
   the bucketed sampler, and those clips shuffled into random batches for (a), (d), (e). Same model init and seed. Step 1's wait for its
   batch (the time to first batch) is left out of the mean step time and reported on its own; median step time and
   data stall (time waiting for a batch / step time, as train_loop logs it) cover steps 2..N.
4. Prints the tables (with the machine: cores, RAM, CPU model, torch version, load average) and `--json PATH`.

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
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
from omegaconf import OmegaConf  # noqa: E402
from torch.utils.data import DataLoader, Dataset  # noqa: E402

from acestep_ft.config import (  # noqa: E402
    CacheConfig, LoraMode, ModelConfig, ObjectiveConfig, OptimConfig, PreprocessedDataset, TrainConfig,
)
from acestep_ft.data import BatchStream, build_dataset  # noqa: E402
from acestep_ft.data.batch import Batch  # noqa: E402
from acestep_ft.data.collate import collate  # noqa: E402
from acestep_ft.data.crop import capped_lengths, seconds_to_frames  # noqa: E402
from acestep_ft.data.fingerprint import make_fingerprint  # noqa: E402
from acestep_ft.data.prefetch import Prefetcher  # noqa: E402
from acestep_ft.data.pt_format import REQUIRED_KEYS, validate_sample  # noqa: E402
from acestep_ft.data.sampler import LengthBucketSampler  # noqa: E402
from acestep_ft.data.v3_reader import V3Directory  # noqa: E402
from acestep_ft.data.v3_writer import write_v3  # noqa: E402
from acestep_ft.errors import ConfigError, UserError, reported_errors  # noqa: E402

FPS = 25
LATENT, CONTEXT = 64, 128
MB = 1e6
MARKER = "bench_dataset.json"
DATA_VERSION = 1


# ---------------------------------------------------------------------------------------------------------- machine
def machine_info() -> Dict[str, Any]:
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
            "loadavg_start": [round(x, 2) for x in os.getloadavg()]}


def say(*args) -> None:
    print(*args, flush=True)


LOAD: Dict[str, list] = {}


def note_load(phase: str) -> None:
    """Load averages (1/5/15 min) when a phase ends (other processes share this machine)."""
    LOAD[phase] = [round(x, 2) for x in os.getloadavg()]


# ---------------------------------------------------------------------------------------------------------- dataset
def dataset_params(a: argparse.Namespace) -> Dict[str, Any]:
    return {"version": DATA_VERSION, "samples": a.samples, "min_seconds": a.min_seconds, "max_seconds": a.max_seconds,
            "condition_length": a.condition_length, "encoder_width": a.encoder_width, "dtype": "bfloat16",
            "seed": a.data_seed}


def clip_lengths(p: Dict[str, Any]) -> List[int]:
    g = torch.Generator().manual_seed(p["seed"])
    lo, hi = round(p["min_seconds"] * FPS), round(p["max_seconds"] * FPS)
    return torch.randint(lo, hi + 1, (p["samples"],), generator=g).tolist()


def sample_name(i: int) -> str:
    return f"song_{i:05d}"


def stored_bytes(t_len: int, p: Dict[str, Any]) -> int:
    """Bytes of one sample's five bf16 tensors."""
    return 2 * (t_len * (LATENT + 1 + CONTEXT) + p["condition_length"] * (p["encoder_width"] + 1))


def make_sample(i: int, t_len: int, p: Dict[str, Any], silence: torch.Tensor):
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


def prepare_dataset(workdir: Path, p: Dict[str, Any]) -> Dict[str, Any]:
    """Reuse the dataset in `workdir` when it was written with the same parameters, else (re)generate it."""
    pt_dir, v3_dir, marker = workdir / "pt", workdir / "v3", workdir / MARKER
    info: Dict[str, Any] = {"pt": str(pt_dir), "v3": str(v3_dir)}
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
    pt_seconds = [0.0]

    def items():
        for i, t_len in enumerate(lengths):
            tensors, meta = make_sample(i, t_len, p, silence)
            t0 = time.perf_counter()
            torch.save({**tensors, "metadata": meta}, pt_dir / f"{sample_name(i)}.pt")
            pt_seconds[0] += time.perf_counter() - t0
            yield sample_name(i), tensors, meta

    fingerprint = make_fingerprint("bench-synthetic", None, None, None, None, {"generator": "bench_loader", **p})
    summary = write_v3(items(), v3_dir, fingerprint=fingerprint, progress=True)
    manifest = {"metadata": {"name": "bench_loader", "num_samples": p["samples"], "all_instrumental": True},
                "samples": [f"{sample_name(i)}.pt" for i in range(p["samples"])], "num_samples": p["samples"]}
    (pt_dir / "manifest.json").write_text(json.dumps(manifest))
    os.sync()
    elapsed = time.perf_counter() - started
    pt_size, pt_alloc = dir_bytes(pt_dir)
    v3_size, v3_alloc = dir_bytes(v3_dir)
    record = {"params": p, "complete": True, "seconds": round(elapsed, 1), "pt_save_seconds": round(pt_seconds[0], 1),
              "tensor_bytes": total, "pt_bytes": pt_size, "pt_disk_bytes": pt_alloc, "v3_bytes": v3_size,
              "v3_disk_bytes": v3_alloc, "v3_shards": summary.num_shards}
    marker.write_text(json.dumps(record))
    return {**record, **info, "generated": True}


def evict(*dirs: Path) -> None:
    """Drop the files' pages from the OS page cache (works without root for clean pages)."""
    gc.collect()
    for d in dirs:
        for f in d.rglob("*"):
            if f.is_file():
                fd = os.open(f, os.O_RDONLY)
                try:
                    os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
                finally:
                    os.close(fd)


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
class OfficialPtDataset(Dataset):
    """The official ACE-Step 1.5 / Side-Step `PreprocessedTensorDataset`: manifest paths, one torch.load each."""

    def __init__(self, root: Path) -> None:
        manifest = json.loads((root / "manifest.json").read_text())
        paths = [root / s for s in manifest["samples"]]
        self.paths = [p for p in paths if os.path.exists(p)]

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> Dict[str, Any]:
        data = torch.load(self.paths[i], map_location="cpu", weights_only=True)
        return {"key": self.paths[i].stem, **{k: data[k] for k in REQUIRED_KEYS},
                "metadata": data.get("metadata", {})}


def official_collate(batch: List[Dict[str, Any]]) -> Dict[str, Any]:
    """Their `collate_preprocessed_batch`: pad each tensor with new_zeros + cat to the batch max, then stack."""
    max_t = max(s["target_latents"].shape[0] for s in batch)
    max_l = max(s["encoder_hidden_states"].shape[0] for s in batch)
    out: Dict[str, Any] = {"keys": [s["key"] for s in batch]}
    for name, longest in (("target_latents", max_t), ("attention_mask", max_t), ("context_latents", max_t),
                          ("encoder_hidden_states", max_l), ("encoder_attention_mask", max_l)):
        padded = []
        for s in batch:
            t = s[name]
            if t.shape[0] < longest:
                t = torch.cat([t, t.new_zeros(longest - t.shape[0], *t.shape[1:])], dim=0)
            padded.append(t)
        out[name] = torch.stack(padded)
    out["metadata"] = [s["metadata"] for s in batch]
    return out


def to_fp32(batch: Batch) -> Batch:
    """What the model is fed here: float32 (`.float()` returns a float32 tensor itself, without a copy)."""
    return Batch(keys=batch.keys, **{k: getattr(batch, k).float() for k in REQUIRED_KEYS})


class BaselineBatches:
    """DataLoader over the official dataset; `next()` -> (fp32 Batch, seconds the caller waited), synchronous."""

    def __init__(self, pt_dir: Path, lengths: List[int], batch_size: int, seed: int, workers: int = 0,
                 batches: Optional[List[List[int]]] = None) -> None:
        dataset = OfficialPtDataset(pt_dir)
        # Random batches (the trainers' shuffle=True): the same permutation as acestep_ft's unbucketed sampler, or
        # the given batch list.
        self.sampler = batches if batches is not None else LengthBucketSampler(lengths, batch_size, seed=seed,
                                                                                shuffle=True, bucket_frames=0)
        self.loader = DataLoader(dataset, batch_sampler=self.sampler, num_workers=workers,
                                 collate_fn=official_collate, prefetch_factor=2 if workers else None)
        self.iterator = iter(self.loader)

    def next_batch(self) -> Batch:
        """The DataLoader's batch, in the stored dtype."""
        raw = next(self.iterator)
        return Batch(keys=raw["keys"], **{k: raw[k] for k in REQUIRED_KEYS})

    def next(self):
        """For train_loop: their training step casts the batch to the model's dtype (fp32 here) in its thread."""
        t0 = time.perf_counter()
        batch = to_fp32(self.next_batch())
        return batch, time.perf_counter() - t0

    def close(self) -> None:
        del self.iterator


# ---------------------------------------------------------------------------------------------------------- loaders
class Loader:
    """One loader configuration of the table."""

    def __init__(self, name: str, build: Callable[[], Any], pad_fraction: Callable[[], float], group: str) -> None:
        self.name, self.build, self.pad_fraction, self.group = name, build, pad_fraction, group


def acestep_stream(path: Path, policy: str, verify: bool, a: argparse.Namespace, lengths_hint: Optional[list] = None,
                   bucket_seconds: Optional[float] = None, drop_last: bool = False):
    bucket = a.bucket_seconds if bucket_seconds is None else bucket_seconds
    cfg = PreprocessedDataset(path=str(path), verify_checksums=verify, bucket_seconds=bucket)
    source = build_dataset(cfg, CacheConfig(policy=policy, max_gb=a.cache_gb), a.encoder_width)
    sampler = LengthBucketSampler(capped_lengths(source.lengths, 0), a.batch_size, seed=a.seed, shuffle=True,
                                  bucket_frames=seconds_to_frames(bucket), drop_last=drop_last)
    return BatchStream(source, sampler, max_frames=0, seed=a.seed)


def batch_stats(batch: Batch, key_bytes: Dict[str, int]) -> tuple[int, int, int, int, int]:
    """(samples, bytes of the batch tensors, stored bytes of its samples, real frames, padded frames)."""
    nbytes = sum(t.numel() * t.element_size() for t in batch.tensors())
    real = int(batch.attention_mask.sum())
    return len(batch.keys), nbytes, sum(key_bytes[k] for k in batch.keys), real, batch.attention_mask.numel()


def run_loader(build: Callable[[], Any], steps: int, key_bytes: Dict[str, int]) -> Dict[str, float]:
    """Build a loader, take `steps` batches, each converted to float32: TTFB (to the first float32 batch) and the
    steady rates over batches 2..steps, with and without the conversion."""
    gc.collect()
    t0 = time.perf_counter()
    stream = build()
    first = to_fp32(stream.next_batch())
    ttfb = time.perf_counter() - t0
    dtype = str(first.encoder_hidden_states.dtype)
    del first
    n = nbytes = sbytes = real = padded = 0
    load_s = cast_s = 0.0
    out_dtype = None
    for _ in range(steps - 1):
        t1 = time.perf_counter()
        b = stream.next_batch()
        t2 = time.perf_counter()
        f = to_fp32(b)
        t3 = time.perf_counter()
        load_s, cast_s = load_s + t2 - t1, cast_s + t3 - t2
        out_dtype = str(b.encoder_hidden_states.dtype).removeprefix("torch.")
        s, nb, sb, r, p = batch_stats(f, key_bytes)
        n, nbytes, sbytes, real, padded = n + s, nbytes + nb, sbytes + sb, real + r, padded + p
        del b, f
    if hasattr(stream, "close"):
        stream.close()
    del stream
    gc.collect()
    dt = load_s + cast_s
    return {"ttfb_s": ttfb, "samples_per_s": n / dt, "loader_samples_per_s": n / load_s,
            "batch_mb_per_s": nbytes / MB / dt, "read_mb_per_s": sbytes / MB / dt,
            "pad_fraction_seen": 1 - real / padded, "seconds": dt, "cast_share": cast_s / dt,
            "output_dtype": out_dtype or dtype}


def second_epoch(build: Callable[[], Any], steps: int, repeats: int, key_bytes: Dict[str, int]) -> Dict[str, Any]:
    """ram_lru: one full epoch fills the cache (timed), then `repeats` windows of `steps` batches of epoch 2."""
    gc.collect()
    stream = build()
    per_epoch = stream.sampler.batches_per_epoch
    t0 = time.perf_counter()
    n = 0
    for _ in range(per_epoch):
        n += len(to_fp32(stream.next_batch()).keys)
    first_epoch = n / (time.perf_counter() - t0)
    cache = stream.source.cache
    hits0, misses0 = cache.hits, cache.misses
    windows = []
    for _ in range(repeats):
        n = nbytes = sbytes = 0
        t1 = time.perf_counter()
        for _ in range(steps):
            s, nb, sb, _, _ = batch_stats(to_fp32(stream.next_batch()), key_bytes)
            n, nbytes, sbytes = n + s, nbytes + nb, sbytes + sb
        dt = time.perf_counter() - t1
        windows.append({"samples_per_s": n / dt, "batch_mb_per_s": nbytes / MB / dt, "read_mb_per_s": sbytes / MB / dt})
    hits, misses = cache.hits - hits0, cache.misses - misses0
    out = {k: statistics.median(w[k] for w in windows) for k in windows[0]}
    out.update({"first_epoch_samples_per_s": first_epoch, "hit_rate": hits / max(1, hits + misses),
                "cache_gib": cache.nbytes / 2**30, "cache_entries": len(cache), "windows": windows})
    del stream, cache
    gc.collect()
    return out


def loader_configs(a, data, lengths) -> List[Loader]:
    pt, v3 = Path(data["pt"]), Path(data["v3"])

    def acestep(path, policy, verify=True):
        return lambda: acestep_stream(path, policy, verify, a)

    def pad_bucketed():
        s = LengthBucketSampler(lengths, a.batch_size, seed=a.seed, shuffle=True,
                                bucket_frames=seconds_to_frames(a.bucket_seconds))
        return s.padding_stats()["pad_fraction"]

    def pad_random():
        s = LengthBucketSampler(lengths, a.batch_size, seed=a.seed, shuffle=True, bucket_frames=0)
        return s.padding_stats()["pad_fraction"]

    return [
        Loader("baseline: torch.load per file, DataLoader(num_workers=0), random batches",
               lambda: BaselineBatches(pt, lengths, a.batch_size, a.seed, 0), pad_random, "pt"),
        Loader("baseline + DataLoader(num_workers=2) (reference)",
               lambda: BaselineBatches(pt, lengths, a.batch_size, a.seed, 2), pad_random, "pt"),
        Loader("acestep_ft v3, cache none (pread)", acestep(v3, "none"), pad_bucketed, "v3"),
        Loader("acestep_ft v3, cache mmap (= cache auto)", acestep(v3, "mmap"), pad_bucketed, "v3"),
        Loader("acestep_ft v3, cache ram_lru (1st epoch)", acestep(v3, "ram_lru"), pad_bucketed, "v3"),
        Loader("acestep_ft v3, cache none, checksums off", acestep(v3, "none", False), pad_bucketed, "v3"),
        Loader("acestep_ft v3, cache mmap, checksums off", acestep(v3, "mmap", False), pad_bucketed, "v3"),
        Loader("acestep_ft .pt, cache none", acestep(pt, "none"), pad_bucketed, "pt"),
        Loader("acestep_ft .pt, cache ram_lru (1st epoch)", acestep(pt, "ram_lru"), pad_bucketed, "pt"),
    ]


def bench_loaders(a, data, lengths, key_bytes) -> List[Dict[str, Any]]:
    pt, v3 = Path(data["pt"]), Path(data["v3"])
    configs = loader_configs(a, data, lengths)
    warm_runs: Dict[str, list] = {c.name: [] for c in configs}
    cold_runs: Dict[str, list] = {c.name: [] for c in configs}
    say(f"[loader] warming the page cache: {warm(pt, v3):.0f} MB/s")
    for r in range(a.repeats):  # configurations interleaved, so a burst of outside load hits all of them alike
        for c in configs:
            warm_runs[c.name].append(run_loader(c.build, a.steps, key_bytes))
            say(f"[loader] warm {r + 1}/{a.repeats} {c.name}: {warm_runs[c.name][-1]['samples_per_s']:.1f} samples/s")
    if not a.skip_cold:
        for r in range(a.repeats):
            for c in configs:
                evict(pt, v3)
                cold_runs[c.name].append(run_loader(c.build, a.steps, key_bytes))
                say(f"[loader] cold {r + 1}/{a.repeats} {c.name}: "
                    f"{cold_runs[c.name][-1]['samples_per_s']:.1f} samples/s, "
                    f"TTFB {1000 * cold_runs[c.name][-1]['ttfb_s']:.0f} ms")
    rows = []
    for c in configs:
        runs0 = warm_runs[c.name][0]
        med = {k: statistics.median(x[k] for x in warm_runs[c.name]) for k in runs0 if isinstance(runs0[k], float)}
        med["output_dtype"] = runs0["output_dtype"]
        row = {"loader": c.name, "group": c.group, **med, "pad_fraction": c.pad_fraction(),
               "runs": warm_runs[c.name]}
        if cold_runs[c.name]:
            row["cold_samples_per_s"] = statistics.median(x["samples_per_s"] for x in cold_runs[c.name])
            row["cold_ttfb_s"] = statistics.median(x["ttfb_s"] for x in cold_runs[c.name])
            row["cold_runs"] = cold_runs[c.name]
        rows.append(row)
    say(f"[loader] warming the page cache again: {warm(pt, v3):.0f} MB/s")
    for path, label in ((v3, "acestep_ft v3, cache ram_lru, 2nd epoch"), (pt, "acestep_ft .pt, cache ram_lru, 2nd epoch")):
        res = second_epoch(lambda: acestep_stream(path, "ram_lru", True, a), a.steps, a.repeats, key_bytes)
        say(f"[loader] {label}: {res['samples_per_s']:.1f} samples/s, hit rate {100 * res['hit_rate']:.0f}% "
            f"({res['cache_entries']} samples, {res['cache_gib']:.2f} GiB cached)")
        rows.append({"loader": label, "group": "v3" if path == v3 else "pt", **res,
                     "pad_fraction": configs[-1].pad_fraction()})
    base = rows[0]["samples_per_s"]
    for row in rows:
        row["x_baseline"] = row["samples_per_s"] / base
    return rows


# ---------------------------------------------------------------------------------------------------------- breakdown
def breakdown(a, data, lengths, p) -> Dict[str, float]:
    """Where the time of one sample / batch goes (warm page cache), ms; medians over a few dozen samples."""
    pt, v3 = Path(data["pt"]), Path(data["v3"])
    idx = list(range(0, len(lengths), max(1, len(lengths) // 32)))[:32]
    src = V3Directory(v3, a.encoder_width, verify_checksums=True, use_mmap=False)
    srcm = V3Directory(v3, a.encoder_width, verify_checksums=True, use_mmap=True)
    src_nock = V3Directory(v3, a.encoder_width, verify_checksums=False, use_mmap=False)
    out: Dict[str, list] = {k: [] for k in ("pt_torch_load", "pt_validate_sample", "v3_pread_checked",
                                            "v3_pread_unchecked", "v3_mmap_checked")}
    for i in idx:
        path = pt / f"{sample_name(i)}.pt"
        t0 = time.perf_counter()
        obj = torch.load(path, map_location="cpu", weights_only=True)
        t1 = time.perf_counter()
        validate_sample(obj, path, a.encoder_width)
        t2 = time.perf_counter()
        src[i]
        t3 = time.perf_counter()
        src_nock[i]
        t4 = time.perf_counter()
        srcm[i]
        t5 = time.perf_counter()
        for k, v in zip(out, (t1 - t0, t2 - t1, t3 - t2, t4 - t3, t5 - t4)):
            out[k].append(1000 * v)
    res = {f"{k}_ms_per_sample": statistics.median(v) for k, v in out.items()}
    # Per batch: acestep_ft's collate, its float32 conversion; the baseline's collate and its cast.
    sampler = LengthBucketSampler(lengths, a.batch_size, seed=a.seed, shuffle=True,
                                  bucket_frames=seconds_to_frames(a.bucket_seconds))
    batches = sampler.epoch_batches(0)[:16]
    col, cast, base, base_cast = [], [], [], []
    for b in batches:
        samples = [srcm[i] for i in b]
        t0 = time.perf_counter()
        batch = collate(samples)
        t1 = time.perf_counter()
        to_fp32(batch)
        t2 = time.perf_counter()
        raw = official_collate([{"key": s.key, "metadata": {}, **{k: getattr(s, k) for k in REQUIRED_KEYS}}
                                for s in samples])
        t3 = time.perf_counter()
        {k: raw[k].to(torch.float32) for k in REQUIRED_KEYS}
        t4 = time.perf_counter()
        for acc_list, v in zip((col, cast, base, base_cast), (t1 - t0, t2 - t1, t3 - t2, t4 - t3)):
            acc_list.append(1000 * v)
    res.update({"collate_ms_per_batch": statistics.median(col), "to_fp32_ms_per_batch": statistics.median(cast),
                "baseline_collate_ms_per_batch": statistics.median(base),
                "baseline_cast_ms_per_batch": statistics.median(base_cast)})
    src.close(), srcm.close(), src_nock.close()
    return res


# ---------------------------------------------------------------------------------------------------------- training
class RecordingSink:
    """Stands in for MetricsSink: keeps what train_loop logs."""

    def __init__(self) -> None:
        self.rows: List[Dict[str, float]] = []

    def log(self, step: int, metrics: Dict[str, float]) -> None:
        self.rows.append({"step": step, **metrics})


class FixedBatches:
    """A sampler that hands out a fixed list of batches (what BatchStream / Prefetcher need of a sampler)."""

    def __init__(self, batches: List[List[int]]) -> None:
        self.batches, self.position, self.epoch = batches, 0, 0

    def next_batch(self) -> List[int]:
        batch = self.batches[self.position % len(self.batches)]
        self.position += 1
        return list(batch)

    def state_dict(self) -> Dict[str, int]:
        return {"epoch": 0, "position": self.position}


class SyncStream:
    """A BatchStream read in the training thread: `next()` -> (batch, seconds waited), like BaselineBatches."""

    def __init__(self, stream) -> None:
        self.stream = stream

    def next(self):
        t0 = time.perf_counter()
        batch = to_fp32(self.stream.next_batch())
        return batch, time.perf_counter() - t0

    def close(self) -> None:
        pass


def training_batches(a, lengths) -> tuple[List[List[int]], List[List[int]]]:
    """(bucketed, random): the first --train-steps batches of the bucketed sampler (drop_last: every batch full),
    and the SAME samples shuffled into random batches, so every pipeline trains on exactly the same clips."""
    try:
        sampler = LengthBucketSampler(lengths, a.batch_size, seed=a.seed, shuffle=True, drop_last=True,
                                      bucket_frames=seconds_to_frames(a.bucket_seconds))
        bucketed = [sampler.next_batch() for _ in range(a.train_steps)]
    except ValueError:  # a dataset too small for one full batch per bucket: batches of neighbours by length
        by_length = sorted(range(len(lengths)), key=lambda i: lengths[i])
        full = [by_length[k:k + a.batch_size] for k in range(0, len(by_length) - a.batch_size + 1, a.batch_size)]
        bucketed = [full[k % len(full)] for k in range(a.train_steps)]
    chosen = [i for b in bucketed for i in b]
    order = torch.randperm(len(chosen), generator=torch.Generator().manual_seed(a.seed)).tolist()
    shuffled = [chosen[k] for k in order]
    return bucketed, [shuffled[k:k + a.batch_size] for k in range(0, len(shuffled), a.batch_size)]


def bench_model_config(a) -> ModelConfig:
    yaml = OmegaConf.load(ROOT / "conf" / "model" / "tiny.yaml")
    yaml.pop("defaults")
    return OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(ModelConfig), yaml,
                                               {"encoder_hidden_size": a.encoder_width}))


def train_once(a, acc, model_cfg, make_batches: Callable[[], Any]) -> Dict[str, Any]:
    from acestep_ft.model import load_model
    from acestep_ft.train.loop import LoopParts, train_loop
    from acestep_ft.train.optim import build_optimizer, build_scheduler
    from acestep_ft.train.trainable import make_trainable

    torch.manual_seed(a.seed)
    model = load_model(model_cfg)
    decoder = make_trainable(model, LoraMode())
    optim_cfg = OptimConfig(lr=1e-4, warmup_steps=0)
    optimizer = build_optimizer(decoder, optim_cfg)
    scheduler = build_scheduler(optimizer, a.train_steps, optim_cfg)
    decoder, optimizer = acc.prepare(decoder, optimizer)
    null = model.null_condition_emb.detach().to(acc.device)
    sink = RecordingSink()
    torch.manual_seed(a.seed)
    gc.collect()
    t0 = time.perf_counter()
    batches = make_batches()  # the prefetch thread starts here, as in run.py just before the loop
    parts = LoopParts(acc, decoder, null, optimizer, scheduler, batches, ObjectiveConfig(),
                      model_cfg.timestep_mu, model_cfg.timestep_sigma)
    try:
        with open(os.devnull, "w") as devnull, contextlib.redirect_stdout(devnull):  # the loop's tqdm bar
            train_loop(parts, TrainConfig(max_steps=a.train_steps, log_every=1, save_every=10**9, plot=False), 0,
                       sink, lambda step: None, 1.0)
    finally:
        batches.close()
    wall = time.perf_counter() - t0
    acc.free_memory()
    rows = sink.rows
    times = [r["perf/step_time_s"] for r in rows]
    waits = [r["data/stall_frac"] * r["perf/step_time_s"] for r in rows]
    frames = [r["perf/frames_per_s"] * r["perf/step_time_s"] for r in rows]
    # Step 1 waits for the first batch (the TTFB, reported on its own): its wait is left out of the step time, its
    # compute kept, so every pipeline is timed over exactly the same clips. The stall is over steps 2..N.
    busy = sum(times) - waits[0]
    return {"first_step_s": times[0], "first_wait_s": waits[0],
            "step_s_median": statistics.median(times[1:]), "step_s_mean": busy / len(times),
            "stall_fraction": sum(waits[1:]) / sum(times[1:]), "wait_s_mean": statistics.mean(waits[1:]),
            "samples_per_s": a.batch_size * len(times) / busy, "real_frames_per_s": sum(frames) / busy,
            "pad_fraction": statistics.mean(r["data/pad_frac"] for r in rows), "wall_s": wall}


def bench_training(a, data, lengths) -> List[Dict[str, Any]]:
    from accelerate import Accelerator

    pt, v3 = Path(data["pt"]), Path(data["v3"])
    acc = Accelerator(cpu=True, mixed_precision="no")
    model_cfg = bench_model_config(a)
    bucketed, shuffled = training_batches(a, lengths)

    def prefetched(batch_list, background=True):
        def make():
            source = build_dataset(PreprocessedDataset(path=str(v3)), CacheConfig(policy="mmap"), a.encoder_width)
            stream = BatchStream(source, FixedBatches(batch_list), max_frames=0, seed=a.seed)
            return Prefetcher(stream, acc.device) if background else SyncStream(stream)
        return make

    configs = [
        ("baseline: torch.load + DataLoader(num_workers=0), synchronous, random batches",
         lambda: BaselineBatches(pt, lengths, a.batch_size, a.seed, 0, shuffled)),
        ("acestep_ft: v3 mmap + 10 s buckets + Prefetcher thread", prefetched(bucketed)),
        ("acestep_ft: v3 mmap + 10 s buckets, synchronous (no Prefetcher)", prefetched(bucketed, background=False)),
        ("control: acestep_ft v3 mmap + Prefetcher, the baseline's random batches", prefetched(shuffled)),
        ("reference: baseline with DataLoader(num_workers=2)",
         lambda: BaselineBatches(pt, lengths, a.batch_size, a.seed, 2, shuffled)),
    ]
    warm(pt, v3)
    runs: Dict[str, list] = {name: [] for name, _ in configs}
    for r in range(a.train_repeats):
        for name, make in configs:
            res = train_once(a, acc, model_cfg, make)
            runs[name].append(res)
            say(f"[train] {r + 1}/{a.train_repeats} {name}: mean step {res['step_s_mean']:.3f} s, "
                f"stall {100 * res['stall_fraction']:.1f}%, {res['real_frames_per_s']:.0f} real frames/s")
    rows = []
    for name, _ in configs:
        keys = [k for k in runs[name][0] if isinstance(runs[name][0][k], float)]
        rows.append({"pipeline": name, **{k: statistics.median(x[k] for x in runs[name]) for k in keys},
                     "runs": runs[name]})
    base = rows[0]
    for row in rows:
        row["step_time_reduction"] = 1 - row["step_s_mean"] / base["step_s_mean"]
        row["speedup"] = base["step_s_mean"] / row["step_s_mean"]
        row["stall_reduction_points"] = base["stall_fraction"] - row["stall_fraction"]
        row["stall_reduction_relative"] = (1 - row["stall_fraction"] / base["stall_fraction"]
                                           if base["stall_fraction"] else 0.0)
    return rows


# ---------------------------------------------------------------------------------------------------------- report
def fmt_table(headers: List[str], rows: List[List[str]]) -> str:
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(headers)]
    line = lambda cells: "| " + " | ".join(c.ljust(w) if i == 0 else c.rjust(w)  # noqa: E731
                                           for i, (c, w) in enumerate(zip(cells, widths))) + " |"
    sep = "|" + "|".join("-" * (w + 2) if i == 0 else "-" * (w + 1) + ":" for i, w in enumerate(widths)) + "|"
    return "\n".join([line(headers), sep] + [line(r) for r in rows])


def report(result: Dict[str, Any]) -> str:
    m, d, a = result["machine"], result["dataset"], result["args"]
    out = [f"machine: {m['cores']} cores, {m['ram_gib']} GiB RAM, {m['cpu']}, torch {m['torch']} "
           f"({m['torch_threads']} intra-op threads), python {m['python']}; load average (1/5/15 min) at start "
           f"{m['loadavg_start']}, after each phase {m.get('loadavg_after_phase')}",
           f"dataset: {a['samples']} clips, {a['min_seconds']}-{a['max_seconds']} s (T {min(result['lengths'])}-"
           f"{max(result['lengths'])} frames, mean {statistics.mean(result['lengths']):.0f}), L={a['condition_length']}, "
           f"H_enc={a['encoder_width']}, bf16: {d['tensor_bytes'] / 1e9:.2f} GB of tensors; on disk .pt "
           f"{d['pt_disk_bytes'] / 1e9:.2f} GB ({a['samples']} files), v3 {d['v3_disk_bytes'] / 1e9:.2f} GB "
           f"({d['v3_shards']} shards)" + (f"; generated in {d['seconds']:.0f} s" if d.get("generated") else
                                             " (reused)"),
           f"batches of {a['batch_size']}, {a['steps']} batches per run, median of {a['repeats']} runs; "
           f"buckets {a['bucket_seconds']} s; ram_lru budget {a['cache_gb']} GiB"]
    if result.get("loaders"):
        rows = []
        for r in result["loaders"]:
            rows.append([r["loader"], f"{r['samples_per_s']:.1f}", f"{r['x_baseline']:.2f}x",
                         f"{r['loader_samples_per_s']:.1f}" if "loader_samples_per_s" in r else "-",
                         r.get("output_dtype", "-"),
                         f"{r['batch_mb_per_s']:.0f}", f"{r['read_mb_per_s']:.0f}",
                         f"{1000 * r['ttfb_s']:.0f}" if "ttfb_s" in r else "-",
                         f"{r['cold_samples_per_s']:.1f}" if "cold_samples_per_s" in r else "-",
                         f"{1000 * r['cold_ttfb_s']:.0f}" if "cold_ttfb_s" in r else "-",
                         f"{100 * r['pad_fraction']:.1f}",
                         f"{100 * r['hit_rate']:.0f}% hits" if "hit_rate" in r else ""])
        out += ["", "Loader (warm = dataset in the page cache, cold = evicted before each run):",
                fmt_table(["loader", "-> fp32 samples/s warm", "vs baseline", "loader samples/s warm",
                           "loader output", "fp32 batch MB/s", "read MB/s", "TTFB warm ms", "-> fp32 samples/s cold",
                           "TTFB cold ms", "pad % (epoch)", "note"], rows),
                "-> fp32: float32 batches (what the fp32 model here is fed) per second; loader: batches as the loader "
                "hands them over (output dtype), without that conversion; fp32 batch MB/s: float32 padded batch bytes "
                "per second; read MB/s: stored (bf16) sample bytes per second; TTFB: to the first float32 batch; "
                "pad %: padded frames / all frames over a whole epoch of that sampler."]
    if result.get("breakdown"):
        b = result["breakdown"]
        out += ["", "Where the time goes (warm, medians, ms): " + ", ".join(f"{k} {v:.2f}" for k, v in b.items())]
    if result.get("training"):
        rows = []
        for r in result["training"]:
            rows.append([r["pipeline"], f"{r['step_s_median']:.3f}", f"{r['step_s_mean']:.3f}",
                         f"{1000 * r['wait_s_mean']:.1f}", f"{100 * r['stall_fraction']:.1f}",
                         f"{r['samples_per_s']:.2f}", f"{r['real_frames_per_s']:.0f}", f"{100 * r['pad_fraction']:.1f}",
                         f"{-100 * r['step_time_reduction']:+.1f}%" if r is not result["training"][0] else "-",
                         f"{r['speedup']:.2f}x",
                         f"{1000 * r['first_step_s']:.0f}"])
        out += ["", f"Training steps (tiny decoder, encoder width {a['encoder_width']}, LoRA, cpu fp32; "
                    f"{a['train_steps']} steps over the same {a['train_steps'] * a['batch_size']} clips in every "
                    f"pipeline; step s mean = (all steps - step 1's wait for the first batch) / steps; median step, "
                    f"wait and stall over steps 2..N; median of {a['train_repeats']} runs):",
                fmt_table(["pipeline", "step s median", "step s mean", "wait ms/step", "stall %", "samples/s",
                           "real frames/s", "pad %", "step time vs baseline", "speed vs baseline", "step 1 ms"], rows)]
    if result.get("targets"):
        out += ["", "Targets:"] + [f"  {'MET ' if t['met'] else 'NOT MET'}  {t['target']}: {t['value']}"
                                   for t in result["targets"]]
    return "\n".join(out)


def targets(result: Dict[str, Any]) -> List[Dict[str, Any]]:
    out = []
    loaders = {r["loader"]: r for r in result.get("loaders", [])}
    if loaders:
        base = result["loaders"][0]
        mmap = next(r for r in result["loaders"] if "cache mmap (= cache auto)" in r["loader"])
        best = max(result["loaders"][1:], key=lambda r: r["samples_per_s"])
        loader_ratio = mmap["loader_samples_per_s"] / base["loader_samples_per_s"]
        out.append({"target": "loader >= 5x baseline samples/s (v3 mmap, the cache=auto choice, warm)",
                    "value": f"{mmap['x_baseline']:.2f}x to float32 batches, {loader_ratio:.2f}x as handed over "
                             f"(best: {best['loader']}, {best['x_baseline']:.2f}x)",
                    "met": mmap["x_baseline"] >= 5})
        out.append({"target": "padding < 5% (10 s buckets, whole epoch)",
                    "value": f"{100 * mmap['pad_fraction']:.1f}% (baseline random batches "
                             f"{100 * base['pad_fraction']:.1f}%)", "met": mmap["pad_fraction"] < 0.05})
    if result.get("training"):
        base, ours = result["training"][0], result["training"][1]
        out.append({"target": "step time >= 20% faster than the baseline (mean step time at least 20% lower)",
                    "value": f"{-100 * ours['step_time_reduction']:+.1f}% step time, {ours['speedup']:.2f}x steps/s (mean step "
                             f"{ours['step_s_mean']:.3f} s vs {base['step_s_mean']:.3f} s)",
                    "met": ours["step_time_reduction"] >= 0.20})
        out.append({"target": "data stall >= 15% lower than the baseline",
                    "value": f"{100 * base['stall_fraction']:.1f}% -> {100 * ours['stall_fraction']:.1f}% of the step "
                             f"({100 * ours['stall_reduction_points']:.1f} points, "
                             f"{100 * ours['stall_reduction_relative']:.0f}% relative)",
                    "met": ours["stall_reduction_relative"] >= 0.15})
    return out


# ---------------------------------------------------------------------------------------------------------- main
def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--samples", type=int, default=1000, help="clips in the synthetic dataset")
    ap.add_argument("--min-seconds", type=float, default=10.0, help="shortest clip")
    ap.add_argument("--max-seconds", type=float, default=240.0, help="longest clip")
    ap.add_argument("--condition-length", type=int, default=769, help="L of encoder_hidden_states")
    ap.add_argument("--encoder-width", type=int, default=2048, help="H_enc of encoder_hidden_states")
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--bucket-seconds", type=float, default=10.0, help="acestep_ft length buckets")
    ap.add_argument("--steps", type=int, default=60, help="batches per loader run")
    ap.add_argument("--repeats", type=int, default=3, help="runs per loader configuration (median reported)")
    ap.add_argument("--train-steps", type=int, default=30, help="optimizer steps per training run")
    ap.add_argument("--train-repeats", type=int, default=2, help="runs per training pipeline (median reported)")
    ap.add_argument("--cache-gb", type=float, default=4.0, help="ram_lru budget (cache.max_gb)")
    ap.add_argument("--seed", type=int, default=0, help="sampler / training seed")
    ap.add_argument("--data-seed", type=int, default=1234, help="dataset generator seed")
    ap.add_argument("--workdir", type=Path, default=None,
                    help="where the dataset lives (default: a directory under the system temp dir named after the "
                         "dataset parameters, reused by later runs with --keep)")
    ap.add_argument("--keep", action="store_true", help="keep the generated dataset for later runs")
    ap.add_argument("--json", type=Path, default=None, help="also write the results as JSON here")
    ap.add_argument("--skip-train", action="store_true", help="loader measurements only")
    ap.add_argument("--skip-cold", action="store_true", help="no cold page-cache runs")
    a = ap.parse_args(argv)
    if a.samples < a.batch_size or a.steps < 2 or a.repeats < 1 or a.train_steps < 2 or a.train_repeats < 1:
        ap.error("need --samples >= --batch-size, --steps >= 2, --train-steps >= 2, repeats >= 1")
    return a


def main(argv=None) -> int:
    a = parse_args(argv)
    p = dataset_params(a)
    digest = hashlib.sha1(json.dumps(p, sort_keys=True).encode()).hexdigest()[:10]
    workdir = a.workdir or Path(tempfile.gettempdir()) / f"acestep_ft_bench_{digest}"
    if workdir.exists() and not workdir.is_dir():
        raise ConfigError(f"--workdir {workdir} is a file. Fix: give a directory (new, or one this benchmark wrote).")
    existed = workdir.exists()
    result: Dict[str, Any] = {"args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(a).items()},
                              "machine": machine_info()}
    data = None
    try:
        data = prepare_dataset(workdir, p)
        say(f"[data] disk use: .pt {data['pt_disk_bytes'] / 1e9:.2f} GB, v3 {data['v3_disk_bytes'] / 1e9:.2f} GB "
            f"({data['v3_shards']} shards)")
        lengths = clip_lengths(p)
        key_bytes = {sample_name(i): stored_bytes(t, p) for i, t in enumerate(lengths)}
        result["dataset"] = {k: v for k, v in data.items() if k not in ("pt", "v3", "params")}
        result["lengths"] = lengths
        note_load("dataset")
        result["loaders"] = bench_loaders(a, data, lengths, key_bytes)
        note_load("loaders")
        result["breakdown"] = breakdown(a, data, lengths, p)
        if not a.skip_train:
            result["training"] = bench_training(a, data, lengths)
            note_load("training")
        result["machine"]["loadavg_end"] = [round(x, 2) for x in os.getloadavg()]
        result["machine"]["loadavg_after_phase"] = dict(LOAD)
        result["targets"] = targets(result)
        say("")
        say(report(result))
        if a.json:
            a.json.parent.mkdir(parents=True, exist_ok=True)
            a.json.write_text(json.dumps(result, indent=1))
            say(f"\nJSON: {a.json}")
    finally:
        if data is not None and data.get("generated") and not a.keep:
            shutil.rmtree(workdir / "pt", ignore_errors=True)
            shutil.rmtree(workdir / "v3", ignore_errors=True)
            (workdir / MARKER).unlink(missing_ok=True)
            if not existed and not any(workdir.iterdir()):
                workdir.rmdir()
            say(f"[data] removed the generated dataset (pass --keep to reuse it)")
    return 0


if __name__ == "__main__":
    with reported_errors():  # the message only, no traceback
        sys.exit(main())
