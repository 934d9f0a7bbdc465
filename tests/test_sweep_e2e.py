"""A real multirun of train.py on the tiny model: summary.csv / summary.md list every job (a failing one included)
with its swept values, numbers and outcome, ranked; the same under submitit's launcher (slow)."""

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from acestep_ft.sweep import RESULT_FILE, SUMMARY_CSV, SUMMARY_MD, main

ROOT = Path(__file__).resolve().parents[1]
ENV = {**{k: v for k, v in os.environ.items() if k != "HYDRA_FULL_ERROR"}, "OMP_NUM_THREADS": "2"}
QUICK = ["hardware=cpu", "train.max_steps=3", "train.val_every=2", "train.plot=false", "dataset.val_fraction=0.25"]


def read_table(sweep: Path):
    with open(sweep / SUMMARY_CSV) as f:
        return list(csv.DictReader(f))


def test_multirun_writes_a_ranked_summary_with_the_failed_job(tmp_path):
    # optim.lr=0 fails the config check: jobs 0 and 2 fail, 1 and 3 train (with validation and tensorboard)
    proc = subprocess.run([sys.executable, "train.py", "-m", *QUICK, "logger=tensorboard", "optim.lr=0,1e-3",
                           "mode.rank=2,4", f"hydra.sweep.dir={tmp_path}"], cwd=ROOT, env=ENV, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 2, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert f"sweep summary: {tmp_path / SUMMARY_MD}" in proc.stdout

    table = read_table(tmp_path)
    assert sorted(int(r["job"]) for r in table) == [0, 1, 2, 3]
    by_job = {int(r["job"]): r for r in table}
    assert {j: (r["optim.lr"], r["mode.rank"]) for j, r in by_job.items()} == {
        0: ("0", "2"), 1: ("0", "4"), 2: ("0.001", "2"), 3: ("0.001", "4")}
    for job in (0, 1):
        assert by_job[job]["outcome"] == "failed (exit 2)" and "optim.lr=0.0 must be > 0" in by_job[job]["error"]
        assert by_job[job]["best_val_loss"] == "" and by_job[job]["train_loss_last10"] == ""
    for job in (2, 3):
        row = by_job[job]
        assert row["outcome"] == "ok" and row["exit_code"] == "0" and int(row["steps"]) == 3
        for key in ("best_val_loss", "final_val_loss", "train_loss_last10", "steps_per_s", "peak_mem_gib", "wall_s"):
            assert float(row[key]) > 0, key
        assert float(row["best_val_loss"]) <= float(row["final_val_loss"]) and row["peak_mem_of"] == "host rss"
        assert (tmp_path / row["dir"] / "metrics.jsonl").exists()
    ok = [r for r in table if r["outcome"] == "ok"]
    assert table[:2] == sorted(ok, key=lambda r: float(r["best_val_loss"])) and table[2]["outcome"] != "ok"

    markdown = (tmp_path / SUMMARY_MD).read_text()
    body = [line.split("|") for line in markdown.splitlines()
            if line.startswith("| ") and not line.startswith("| rank ")]
    assert [int(cells[2]) for cells in body] == [int(r["job"]) for r in table]  # same order as the CSV

    # tensorboard: the job's resolved config as HParams, beside its scalars
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from tensorboard.plugins.hparams.plugin_data_pb2 import HParamsPluginData

    events = EventAccumulator(str(tmp_path / by_job[3]["dir"] / "tensorboard"))
    events.Reload()
    start = HParamsPluginData.FromString(
        events.PluginTagToContent("hparams")["_hparams_/session_start_info"]).session_start_info
    assert start.hparams["optim.lr"].number_value == pytest.approx(1e-3)
    assert start.hparams["mode.rank"].number_value == 4
    assert events.Scalars("hparams/best_val_loss")[-1].value == pytest.approx(float(by_job[3]["best_val_loss"]))

    # rebuilt by hand: the same table
    before = (tmp_path / SUMMARY_CSV).read_text()
    (tmp_path / SUMMARY_CSV).unlink()
    assert main([str(tmp_path)]) == 0 and (tmp_path / SUMMARY_CSV).read_text() == before


@pytest.mark.slow
def test_submitit_sweep_with_a_failed_job_still_gets_its_summary(tmp_path):
    """submitit's local executor standing in for SLURM: a failed job makes Hydra raise after the sweep (no
    on_multirun_end), so the summary comes from the jobs themselves."""
    pytest.importorskip("hydra_plugins.hydra_submitit_launcher")
    sweep = tmp_path / "sweep"
    proc = subprocess.run([sys.executable, "train.py", "-m", "hydra/launcher=submitit_local",
                           "hydra.launcher.timeout_min=10", *QUICK, "optim.lr=0,1e-3", f"hydra.sweep.dir={sweep}"],
                          cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=600)
    assert proc.returncode != 0  # submitit: the failed job's error ends the sweep after all jobs ran
    table = read_table(sweep)
    assert {(r["job"], r["optim.lr"], r["outcome"]) for r in table} == {("0", "0", "failed (exit 2)"),
                                                                      ("1", "0.001", "ok")}
    assert table[0]["job"] == "1" and float(table[0]["best_val_loss"]) > 0
    result = json.loads((sweep / table[1]["dir"] / RESULT_FILE).read_text())
    assert result["status"] == "failed" and "optim.lr=0.0 must be > 0" in result["error"]


@pytest.mark.slow
def test_a_sweep_stopped_by_a_signal_lists_the_stopped_and_the_unstarted_jobs(tmp_path):
    import signal
    import time

    proc = subprocess.Popen([sys.executable, "train.py", "-m", "hardware=cpu", "train.max_steps=2000",
                             "train.plot=false", "optim.lr=1e-3,3e-3", f"hydra.sweep.dir={tmp_path}"], cwd=ROOT,
                            env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 300
    while not any(len(p.read_text().splitlines()) >= 2 for p in tmp_path.glob("0_*/metrics.jsonl")):
        assert proc.poll() is None and time.time() < deadline, "job 0 ended before it could be signalled"
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 143, err[-3000:]
    table = read_table(tmp_path)  # written by the job itself: Hydra ends the sweep without on_multirun_end
    assert [(r["job"], r["optim.lr"], r["outcome"]) for r in table] == [
        ("0", "0.001", "stopped by SIGTERM (exit 143)"), ("1", "0.003", "not started")]
    assert int(table[0]["steps"]) >= 2 and float(table[0]["train_loss_last10"]) > 0
