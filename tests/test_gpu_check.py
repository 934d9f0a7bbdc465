"""scripts/gpu_check.sh: the CPU dry run goes through every row (tiny model, tiny clips) so the GPU check cannot rot;
the row numbers and the Markdown table are read back."""

import importlib.util
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
TRAIN_ROWS = ["lora_10s", "lora_60s", "lora_240s", "full_10s", "full_60s", "full_240s", "lora_60s_prefetch_off",
              "lora_60s_flex", "lora_60s_compile"]
NEED_CUDA = {"lora_60s_prefetch_off", "lora_60s_flex"}  # skipped on the CPU, with the reason
NUMBERS = ["step_time_s", "samples_per_s", "frames_per_s", "stall_frac", "peak_gib", "estimate_gib", "load_s"]


def gpu_check_module():
    spec = importlib.util.spec_from_file_location("gpu_check", ROOT / "scripts" / "gpu_check.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while the file executes
    spec.loader.exec_module(module)
    return module


def test_measured_leaves_out_the_warmup_steps_and_takes_the_peak_of_all():
    records = [{"step": 1, "train/loss": 2.0, "perf/step_time_s": 9.0, "perf/samples_per_s": 0.1,
                "perf/frames_per_s": 10.0, "data/stall_frac": 0.5, "mem/peak_alloc_gb": 3.0},
               {"step": 2, "train/loss": 1.5, "perf/step_time_s": 1.0, "perf/samples_per_s": 4.0,
                "perf/frames_per_s": 400.0, "data/stall_frac": 0.0, "mem/peak_alloc_gb": 5.0},
               {"step": 3, "train/loss": 1.0, "perf/step_time_s": 3.0, "perf/samples_per_s": 2.0,
                "perf/frames_per_s": 200.0, "data/stall_frac": 0.1, "mem/peak_alloc_gb": 4.0}]
    got = gpu_check_module().measured(records, warmup=1)
    assert got["steps_timed"] == 2 and got["step_time_s"] == 2.0 and got["samples_per_s"] == 3.0
    assert got["frames_per_s"] == 300.0 and got["stall_frac"] == pytest.approx(0.05)
    assert got["peak_gib"] == 5.0 and got["peak_of"].startswith("cuda") and got["first_step_s"] == 9.0
    assert got["losses"] == [2.0, 1.5, 1.0]


@pytest.mark.slow
def test_cpu_dry_run_fills_every_row_and_prints_the_table(tmp_path):
    out = tmp_path / "gpu_check.json"
    env = {**os.environ, "WANDB_MODE": "offline"}
    proc = subprocess.run(["bash", "scripts/gpu_check.sh", "--cpu-dry-run", "--out", str(out), "--work-dir",
                           str(tmp_path / "work")], cwd=ROOT, env=env, capture_output=True, text=True, timeout=1200)
    assert proc.returncode == 0, f"gpu_check failed ({proc.returncode}):\n{proc.stdout[-6000:]}\n{proc.stderr[-3000:]}"
    doc = json.loads(out.read_text())
    rows = {r["slug"]: r for r in doc["rows"]}
    assert list(rows) == ["pytest_gpu", "checkpoint", *TRAIN_ROWS]
    assert doc["profile"] == "cpu-dry-run" and doc["interrupted"] is None

    tests = rows["pytest_gpu"]
    assert tests["status"] == "ok" and tests["counts"].get("skipped", 0) > 0  # the gpu tests skip without CUDA
    assert rows["checkpoint"]["status"] == "ok" and rows["checkpoint"]["bytes"] > 10**5
    for slug in TRAIN_ROWS:
        row = rows[slug]
        if slug in NEED_CUDA:
            assert row["status"] == "skipped" and "CUDA" in row["reason"], row
            continue
        assert row["status"] == "ok", row
        for name in NUMBERS:
            assert isinstance(row[name], (int, float)) and math.isfinite(row[name]), (slug, name, row[name])
        assert row["step_time_s"] > 0 and row["peak_gib"] > 0 and row["estimate_gib"] > 0 and 0 <= row["stall_frac"] < 1
        assert row["steps_timed"] >= 1 and all(math.isfinite(v) for v in row["losses"])
        # every frame is real (fixed-length clips): frames/s = samples/s x clip length, step by step and on average
        assert row["frames_per_s"] == pytest.approx(row["samples_per_s"] * row["frames"], rel=1e-6)
        assert row["estimate_error_pct"] is None and row["estimate_note"]  # no allocator peak on the CPU
    assert [rows[f"lora_{s}s"]["frames"] for s in (10, 60, 240)] == [25, 50, 100]

    table = [line for line in proc.stdout.splitlines() if line.startswith("| ")]
    assert table[0].startswith("| row | status | frames | step s |")
    assert len(table) == 1 + len(rows)  # header + one line per row (the separator starts with "|---")
    for line, row in zip(table[1:], doc["rows"], strict=True):
        assert line.startswith(f"| {row['title']} | {row['status']} |")
    compiled = next(line for line in table if line.startswith("| LoRA 60 s, compiled layers |"))
    assert " speed |" in compiled  # compared against the lora_60s baseline
