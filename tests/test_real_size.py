"""Random-init checkpoints in the official layout (acestep_ft/model/random_checkpoint.py), and a real-size smoke run.

Fast: a tiny checkpoint loads strictly, its values follow the model's own initialisation, the write is deterministic.
Slow (`-m slow`, ~8 min on 2 CPU cores, ~15 GiB RAM): a random 2B turbo checkpoint is written tensor by tensor (the
official key list and shapes, bf16), then `train.py model=acestep15_turbo model.path=...` runs 2 LoRA steps on 10 s
clips on the CPU. Prints the write time and peak RSS, the load time, the training run's peak RSS and wall time
(`pytest -m slow -s tests/test_real_size.py`).
"""

import ast
import json
import math
import os
import re
import resource
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
import torch
from safetensors import safe_open

from acestep_ft.model import load_model, official_config
from acestep_ft.model.acestep import AceStepModel
from acestep_ft.model.random_checkpoint import model_config_for, stream_safetensors, write_random_checkpoint
from acestep_ft.model.variants import build_meta_model
from acestep_ft.train.metrics import read_metrics

ROOT = Path(__file__).resolve().parents[1]
ASSETS = ROOT / "tests" / "assets"
GIB = 2**30


def header_shapes(path: Path) -> dict:
    """{key: (shape, dtype)} from a safetensors file's header (no tensor is read)."""
    with safe_open(str(path), framework="pt") as f:
        return {k: (tuple(f.get_slice(k).get_shape()), f.get_slice(k).get_dtype()) for k in f.keys()}


def asset_key_list(name: str) -> dict:
    """tests/assets/acestep15_*_keys.txt: "key<TAB>[shape]" per line -> {key: shape}."""
    rows = [line.split("\t") for line in (ASSETS / name).read_text().splitlines() if line.strip()]
    return {key: tuple(ast.literal_eval(shape)) for key, shape in rows}


def test_tiny_random_checkpoint_loads_strictly_and_follows_the_model_init(tmp_path):
    cfg = model_config_for("tiny")
    out = write_random_checkpoint(cfg, tmp_path / "ckpt", seed=0)
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "model.safetensors", "silence_latent.pt"]
    assert json.loads((out / "config.json").read_text()) == json.loads(
        json.dumps(official_config(build_meta_model(cfg), torch.bfloat16)))
    meta = build_meta_model(cfg)
    expected = {k: (tuple(v.shape), "BF16") for k, v in meta.state_dict().items()}
    assert header_shapes(out / "model.safetensors") == expected
    cfg.path = str(out)
    loaded = load_model(cfg)  # strict: every key and shape, config.json checked against the config
    torch.manual_seed(0)
    reference = AceStepModel(model_config_for("tiny")).state_dict()
    for key, value in loaded.state_dict().items():
        ref = reference[key]
        if torch.all(ref == 1) or torch.all(ref == 0):  # RMSNorm weights, Linear biases
            assert torch.equal(value, ref), key
        else:  # same distribution: the spread agrees (a 64-value tensor's estimate is only good to ~25%)
            tolerance = 0.1 if ref.numel() >= 1000 else 0.35
            assert value.float().std().item() == pytest.approx(ref.std().item(), rel=tolerance), key
            assert abs(value.float().mean().item()) < 3 * ref.std().item() / math.sqrt(ref.numel()) + 1e-3, key
    assert torch.equal(torch.load(out / "silence_latent.pt"), torch.zeros(1, 64, 15000))


def test_random_checkpoint_is_deterministic_per_seed(tmp_path):
    cfg = model_config_for("tiny")
    a, b, c = (write_random_checkpoint(cfg, tmp_path / name, seed=seed)
               for name, seed in (("a", 0), ("b", 0), ("c", 1)))
    data = [(d / "model.safetensors").read_bytes() for d in (a, b, c)]
    assert data[0] == data[1] and data[0] != data[2]


def test_stream_safetensors_refuses_tensors_out_of_header_order(tmp_path):
    specs = [("a", (2, 3)), ("b", (4,))]
    with pytest.raises(ValueError, match="tensor b"):
        stream_safetensors(tmp_path / "x.safetensors", specs, iter([("b", torch.zeros(4)), ("a", torch.zeros(2, 3))]))
    stream_safetensors(tmp_path / "y.safetensors", specs, iter([("a", torch.ones(2, 3)), ("b", torch.arange(4.0))]))
    with safe_open(str(tmp_path / "y.safetensors"), framework="pt") as f:
        assert torch.equal(f.get_tensor("b"), torch.arange(4.0).bfloat16())
        assert f.get_tensor("a").dtype == torch.bfloat16 and f.get_tensor("a").shape == (2, 3)


def run_timed(cmd: list, log: Path) -> tuple:
    """Run `cmd` in ROOT; returns (exit status, [(seconds since start, line)], child's rusage, wall seconds).
    Lines are stamped as they arrive (unbuffered child), so the time between two lines is measurable."""
    env = {**os.environ, "WANDB_MODE": "offline", "HYDRA_FULL_ERROR": "1", "PYTHONUNBUFFERED": "1"}
    started = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines = []
    with log.open("w") as f:
        for line in proc.stdout:
            lines.append((time.perf_counter() - started, line.rstrip("\n")))
            f.write(f"{lines[-1][0]:8.2f} {line}")
    _, status, usage = os.wait4(proc.pid, 0)  # this child's own resource usage (RUSAGE_CHILDREN would be the max)
    proc.returncode = os.waitstatus_to_exitcode(status)
    return proc.returncode, lines, usage, time.perf_counter() - started


def first_time(lines: list, pattern: str) -> float:
    hits = [t for t, line in lines if re.search(pattern, line)]
    assert hits, f"no output line matches {pattern!r}"
    return hits[0]


@pytest.mark.slow
def test_real_size_2b_random_checkpoint_trains_two_lora_steps_on_the_cpu(tmp_path):
    if psutil.virtual_memory().available < 16 * GIB:
        pytest.skip(f"needs ~16 GiB of free RAM (the float32 2B model is 9.6 GB), "
                    f"{psutil.virtual_memory().available / GIB:.1f} GiB available")
    cfg = model_config_for("turbo")
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    started = time.perf_counter()
    ckpt = write_random_checkpoint(cfg, tmp_path / "turbo", seed=0)
    write_s = time.perf_counter() - started
    expected = asset_key_list("acestep15_2b_keys.txt")
    found = header_shapes(ckpt / "model.safetensors")
    assert {k: s for k, (s, _) in found.items()} == expected  # 677 keys, official shapes
    assert {d for _, d in found.values()} == {"BF16"}
    numel = json.loads((ASSETS / "acestep15_param_counts.json").read_text())["2b(turbo/base/sft)"]["state_dict_numel"]
    assert numel * 2 < (ckpt / "model.safetensors").stat().st_size < numel * 2 + 2**20
    write_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print(f"\nwrite: {write_s:.1f} s, {(ckpt / 'model.safetensors').stat().st_size / 1e9:.2f} GB, peak RSS of this "
          f"process {write_rss / 2**20:.2f} GiB (before the write {before / 2**20:.2f} GiB)")
    assert write_rss - before < GIB  # tensor by tensor: never the model (4.8 GB bf16, 9.6 GB fp32)

    run_dir = tmp_path / "run"
    cmd = [sys.executable, "train.py", "hardware=cpu", "model=acestep15_turbo", f"model.path={ckpt}",
           "dataset.min_frames=250", "dataset.max_frames=250", "dataset.num_samples=2", "hardware.batch_size=1",
           "train.max_steps=2", "train.plot=false", f"hydra.run.dir={run_dir}"]
    status, lines, usage, wall_s = run_timed(cmd, tmp_path / "train.log")
    output = "\n".join(line for _, line in lines)
    assert status == 0, f"train.py failed ({status}):\n{output[-5000:]}"
    # the preflight verdict is the last line before the model loads; the model line the first after it
    load_s = first_time(lines, r"^model turbo: [\d.]+M params") - first_time(lines, r"^verdict:")
    records = read_metrics(run_dir / "metrics.jsonl")
    losses = [r["train/loss"] for r in records]
    step_s = [r["perf/step_time_s"] for r in records]
    peak_gib = usage.ru_maxrss / 2**20  # KiB on Linux
    print(f"train.py (2 LoRA steps, 1 x 250 frames, CPU fp32): load {load_s:.1f} s, steps {step_s} s, "
          f"losses {losses}, peak RSS {peak_gib:.2f} GiB, wall {wall_s:.1f} s, "
          f"cpu {usage.ru_utime + usage.ru_stime:.0f} s")
    assert len(losses) == 2 and all(math.isfinite(v) for v in losses)
    adapter = run_dir / "checkpoints" / "step-00000002" / "adapter"
    assert (adapter / "adapter_model.safetensors").is_file() and (adapter / "adapter_config.json").is_file()
    assert (run_dir / "export").is_dir()
    # the float32 model (9.6 GB) + the bf16 file's pages mapped while loading (4.8 GB) + 2 GiB: a second copy of the
    # weights anywhere would exceed it
    assert peak_gib < (numel * 4 + numel * 2) / GIB + 2, f"peak RSS {peak_gib:.2f} GiB"
