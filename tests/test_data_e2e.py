"""The data pipeline end to end: .pt and v3 give identical batches, training runs on both, the fingerprint gates."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from acestep_ft.config import CacheConfig, PreprocessedDataset
from acestep_ft.data import BatchStream, build_dataset
from acestep_ft.data.crop import capped_lengths
from acestep_ft.data.fingerprint import make_fingerprint
from acestep_ft.data.pt_format import REQUIRED_KEYS
from acestep_ft.data.sampler import LengthBucketSampler
from acestep_ft.data.v3_writer import write_v3
from acestep_ft.model import load_model
from acestep_ft.model.checkpoint_io import condition_encoder_digest
from conftest import model_config, sample_dict

ROOT = Path(__file__).resolve().parents[1]
WIDTH = 64  # the tiny model's encoder width


def make_datasets(root: Path, n: int = 10, fingerprint=None) -> tuple[Path, Path]:
    """The same clips as an official-style .pt directory (manifest.json) and as v3 shards."""
    pt, v3 = root / "pt", root / "v3"
    (pt / "tensors").mkdir(parents=True)
    items = []
    for i in range(n):
        d = sample_dict(t=30 + 37 * i, length=12, width=WIDTH, seed=i)  # 1.2 s .. 14.5 s
        torch.save(d, pt / "tensors" / f"clip{i}.pt")
        items.append((f"clip{i}", {k: d[k] for k in REQUIRED_KEYS}, d["metadata"]))
    (pt / "manifest.json").write_text(json.dumps({"samples": [f"tensors/clip{i}.pt" for i in range(n)]}))
    fp = fingerprint or make_fingerprint("tiny", None, None, None, None, {"source": "test"})
    write_v3(items, v3, shard_bytes=200_000, fingerprint=fp, progress=False)
    return pt, v3


def batches(path: Path, policy: str, n_batches: int = 8):
    source = build_dataset(PreprocessedDataset(path=str(path)), CacheConfig(policy=policy), WIDTH)
    sampler = LengthBucketSampler(capped_lengths(source.lengths, 100), 3, seed=5, shuffle=True, bucket_frames=125)
    stream = BatchStream(source, sampler, max_frames=100, seed=5)
    return [stream.next_batch() for _ in range(n_batches)]


def test_pt_and_v3_give_identical_batches_under_every_cache_policy(tmp_path):
    pt, v3 = make_datasets(tmp_path)
    reference = batches(pt, "none")
    for path, policy in [(pt, "ram_lru"), (pt, "mmap"), (v3, "none"), (v3, "mmap"), (v3, "ram_lru"), (v3, "auto")]:
        for a, b in zip(reference, batches(path, policy)):
            assert a.keys == b.keys, (path.name, policy)
            for field in ("target_latents", "attention_mask", "encoder_hidden_states", "context_latents"):
                # .pt sources decode to float32; v3 batches keep the stored bf16 (converted on the device)
                assert torch.equal(getattr(a, field).float(), getattr(b, field).float()), (path.name, policy, field)
    assert max(b.target_latents.shape[1] for b in reference) <= 100  # cropped to max_frames


def run_train(run_dir: Path, *overrides: str) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "train.py", "hardware=cpu", "train.plot=false", f"hydra.run.dir={run_dir}", *overrides]
    return subprocess.run(cmd, cwd=ROOT, env={**os.environ, "HYDRA_FULL_ERROR": "1"}, capture_output=True,
                          text=True, timeout=300)


@pytest.mark.slow
def test_training_on_v3_and_pt_gives_the_same_losses_and_the_fingerprint_gates(tmp_path):
    torch.manual_seed(0)  # the digest the training run computes: train.seed=0 -> seed 0 before the tiny init
    digest = condition_encoder_digest(load_model(model_config("tiny")))
    pt, v3 = make_datasets(tmp_path / "data", fingerprint=make_fingerprint("tiny", digest, None, None, None, {}))
    common = ["dataset=preprocessed", "dataset.max_seconds=4", "train.max_steps=4", "hardware.batch_size=2"]
    losses = {}
    for name, path in [("pt", pt), ("v3", v3)]:
        proc = run_train(tmp_path / name, *common, f"dataset.path={path}")
        assert proc.returncode == 0, proc.stderr[-3000:]
        losses[name] = [json.loads(line)["train/loss"] for line in (tmp_path / name / "metrics.jsonl").open()]
    assert losses["pt"] == losses["v3"] and len(losses["v3"]) == 4
    assert "matches the model" in run_train(
        tmp_path / "again", *common, f"dataset.path={v3}", "train.max_steps=1").stdout

    _, other = make_datasets(tmp_path / "other", fingerprint=make_fingerprint("turbo", "0123456789abcdef", None,
                                                                             None, None, {}))
    refused = run_train(tmp_path / "refused", *common, f"dataset.path={other}")
    assert refused.returncode != 0
    assert "model_variant: data has 'turbo', training has 'tiny'" in refused.stderr
    assert "condition_encoder_digest" in refused.stderr and not (tmp_path / "refused" / "metrics.jsonl").exists()
    accepted = run_train(tmp_path / "accepted", *common, f"dataset.path={other}",
                         "dataset.allow_fingerprint_mismatch=true", "train.max_steps=1")
    assert accepted.returncode == 0 and "MISMATCH accepted" in accepted.stdout


@pytest.mark.parametrize("policy,expected", [("auto", "mmap")])
def test_auto_cache_picks_mmap_for_v3(tmp_path, policy, expected):
    from acestep_ft.data.dataset import resolve_cache_policy

    _, v3 = make_datasets(tmp_path, n=2)
    chosen, why = resolve_cache_policy(PreprocessedDataset(path=str(v3)), CacheConfig(policy=policy))
    assert chosen == expected and "zero-copy" in why


def test_resume_on_v3_with_buckets_crops_and_cache_is_exact(tmp_path):
    _, v3 = make_datasets(tmp_path / "data", n=12)
    common = ["dataset=preprocessed", f"dataset.path={v3}", "dataset.max_seconds=3", "dataset.bucket_seconds=2",
              "dataset.allow_fingerprint_mismatch=true", "hardware.max_frames_per_batch=200",
              "hardware.batch_size=4", "cache=ram_lru", "train.max_steps=9", "train.save_every=4"]
    whole, parts = tmp_path / "whole", tmp_path / "parts"
    for run_dir, extra in [(whole, []), (parts, ["train.stop_at_step=5"]), (parts, ["train.resume=auto"])]:
        proc = run_train(run_dir, *common, *extra)
        assert proc.returncode == 0, proc.stderr[-3000:]
    read = lambda d: [json.loads(line)["train/loss"] for line in (d / "metrics.jsonl").open()]  # noqa: E731
    assert read(parts) == read(whole) and len(read(whole)) == 9


@pytest.mark.slow
def test_separate_validation_directory(tmp_path):
    """dataset.val_path: v3 training data validated on a .pt directory of other clips, every 2 steps."""
    _, train_v3 = make_datasets(tmp_path / "train", n=6)
    val_pt, _ = make_datasets(tmp_path / "val", n=3)
    proc = run_train(tmp_path / "run", "dataset=preprocessed", f"dataset.path={train_v3}", f"dataset.val_path={val_pt}",
                     "dataset.max_seconds=4", "train.max_steps=4", "train.val_every=2", "hardware.batch_size=2")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "validation: 3 samples from dataset.val_path" in proc.stdout
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if "val/loss" in r] == [2, 4]
    bad = run_train(tmp_path / "bad", "dataset=preprocessed", f"dataset.path={train_v3}",
                    f"dataset.val_path={tmp_path / 'nope'}", "dataset.val_fraction=0.2")
    assert bad.returncode != 0 and "both set" in bad.stderr + bad.stdout and "does not exist" in bad.stderr + bad.stdout
