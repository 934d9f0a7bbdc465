"""The sweep summary from what jobs leave on disk: ranking, outcomes, swept-key columns, jobs that never started or
left no result, the per-job outcome record, and the command that rebuilds it."""

import csv
import json
import signal
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from acestep_ft.errors import ConfigError, UserError
from acestep_ft.sweep import (
    RESULT_FILE, SUMMARY_CSV, SUMMARY_MD, collect, describe_exit, job_outcome, main, planned_jobs, write_summary,
)

COMMON = ["hardware=cpu", "train.max_steps=3"]


def write_grid(sweep: Path, task, params=None):
    """multirun.yaml as Hydra's BasicSweeper saves it (only the keys the summary reads)."""
    cfg = {"hydra": {"sweeper": {"_target_": "hydra._internal.core_plugins.basic_sweeper.BasicSweeper",
                                 "max_batch_size": None, "params": params},
                     "overrides": {"task": list(task)}}}
    sweep.mkdir(parents=True, exist_ok=True)
    OmegaConf.save(OmegaConf.create(cfg), sweep / "multirun.yaml")


def make_job(sweep: Path, num: int, overrides, result=None, losses=(), val=()):
    job = sweep / f"{num}_{','.join(overrides)}"
    job.mkdir(parents=True)
    records = [{"step": s + 1, "train/loss": loss, "perf/step_time_s": 0.25, "mem/host_peak_rss_gb": 0.5}
               for s, loss in enumerate(losses)]
    for step, value in val:
        records[step - 1]["val/loss"] = value
    if records:
        (job / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    if result is not None:
        (job / RESULT_FILE).write_text(json.dumps({"job": num, "overrides": list(overrides), "wall_s": 12.0,
                                                   **result}))
    return job


OK = {"status": "ok", "exit_code": 0, "signal": None, "error": None}


def test_rows_are_ranked_and_every_job_is_listed(tmp_path):
    write_grid(tmp_path, ["optim.lr=1e-3,3e-3,0", "mode.rank=4,8", *COMMON])
    grid, swept = planned_jobs(tmp_path)
    assert swept == ["optim.lr", "mode.rank"] and len(grid) == 6
    assert [o for o in grid[0] if o.startswith(("optim", "mode"))] == ["optim.lr=0.001", "mode.rank=4"]
    make_job(tmp_path, 0, grid[0], OK, losses=[2.0, 1.9, 1.8], val=[(3, 1.7)])
    make_job(tmp_path, 1, grid[1], OK, losses=[2.0, 1.6, 1.5], val=[(2, 1.4), (3, 1.45)])
    make_job(tmp_path, 2, grid[2], {"status": "stopped", "exit_code": 143, "signal": "SIGTERM", "error": None},
             losses=[2.0, 1.0])
    make_job(tmp_path, 3, grid[3], losses=[2.0])  # no result.json: running, or killed
    make_job(tmp_path, 4, grid[4], {"status": "failed", "exit_code": 2, "signal": None,
                                    "error": "Config check failed:\n  - optim.lr=0.0 must be > 0"})
    # job 5 never started: no directory

    rows, cols = collect(tmp_path)
    assert cols == ["optim.lr", "mode.rank"]
    assert [r["job"] for r in rows] == [1, 0, 2, 3, 4, 5]  # finished by best val loss, then the others
    assert [r["outcome"] for r in rows] == ["ok", "ok", "stopped by SIGTERM (exit 143)",
                                            "no result (running, or killed)", "failed (exit 2)", "not started"]
    assert rows[0]["best_val_loss"] == 1.4 and rows[0]["final_val_loss"] == 1.45
    assert rows[0]["swept"] == {"optim.lr": "0.001", "mode.rank": "8"}
    assert rows[-1]["swept"] == {"optim.lr": "0", "mode.rank": "8"} and rows[-1]["dir"] == ""

    markdown = write_summary(tmp_path)
    with open(tmp_path / SUMMARY_CSV) as f:
        table = list(csv.DictReader(f))
    assert [int(r["job"]) for r in table] == [1, 0, 2, 3, 4, 5]
    assert table[0]["best_val_loss"] == "1.4" and float(table[0]["train_loss_last10"]) == pytest.approx(1.7)
    assert float(table[0]["steps_per_s"]) == pytest.approx(4.0) and table[0]["peak_mem_of"] == "host rss"
    assert table[4]["outcome"] == "failed (exit 2)" and table[4]["exit_code"] == "2"
    assert table[4]["error"] == "Config check failed: - optim.lr=0.0 must be > 0"
    assert table[5]["best_val_loss"] == "" and table[5]["dir"] == ""
    assert (tmp_path / SUMMARY_MD).read_text() == markdown
    body = [line for line in markdown.splitlines() if line.startswith("| ") and not line.startswith("| rank")]
    assert [int(line.split("|")[2]) for line in body] == [1, 0, 2, 3, 4, 5]
    assert "job 4 (failed (exit 2)): Config check failed: - optim.lr=0.0 must be > 0" in markdown


def test_without_validation_finished_jobs_rank_by_train_loss_and_keys_come_from_the_jobs(tmp_path):
    # no multirun.yaml (another sweeper, or a copied directory): the swept keys are those that differ
    make_job(tmp_path, 0, ["optim.lr=0.001", "hardware=cpu"], OK, losses=[2.0, 1.2])
    make_job(tmp_path, 1, ["optim.lr=0.003", "hardware=cpu"], OK, losses=[2.0, 0.8])
    rows, cols = collect(tmp_path)
    assert cols == ["optim.lr"] and [r["job"] for r in rows] == [1, 0]
    assert rows[0]["train_loss"] == pytest.approx(1.4) and rows[0]["best_val_loss"] is None


def test_the_command_rebuilds_the_files(tmp_path, capsys):
    make_job(tmp_path, 0, ["optim.lr=0.001"], OK, losses=[1.0])
    assert main([str(tmp_path)]) == 0 and (tmp_path / SUMMARY_CSV).exists()
    assert "| 1 | 0 |" in capsys.readouterr().out
    assert main([str(tmp_path / "missing")]) == 2
    (tmp_path / "empty").mkdir()
    assert main([str(tmp_path / "empty")]) == 1


@pytest.mark.parametrize("error,status,code,sig", [
    (None, "ok", 0, None),
    (SystemExit(0), "ok", 0, None),
    (SystemExit(128 + signal.SIGTERM), "stopped", 143, "SIGTERM"),
    (SystemExit(-1), "stopped", -1, None),  # submitit's handler after requeueing
    (KeyboardInterrupt(), "stopped", 130, "SIGINT"),
    (ConfigError("bad"), "failed", 2, None),
    (UserError("refused"), "failed", 1, None),
    (RuntimeError("boom"), "failed", 1, None),
])
def test_describe_exit(error, status, code, sig):
    got = describe_exit(error)
    assert (got["status"], got["exit_code"], got["signal"]) == (status, code, sig)


def hydra_cfg(sweep: Path, num: int, overrides):
    return OmegaConf.create({"runtime": {"output_dir": str(sweep / f"{num}_job")}, "sweep": {"dir": str(sweep)},
                             "job": {"num": num}, "overrides": {"task": list(overrides)}})


def test_job_outcome_records_how_a_job_ended_and_refreshes_the_summary(tmp_path, monkeypatch):
    monkeypatch.delenv("RANK", raising=False)
    with job_outcome(hydra_cfg(tmp_path, 0, ["optim.lr=1"])):
        pass
    with pytest.raises(ConfigError):
        with job_outcome(hydra_cfg(tmp_path, 1, ["optim.lr=0"])):
            raise ConfigError("optim.lr=0.0 must be > 0")
    result = json.loads((tmp_path / "1_job" / RESULT_FILE).read_text())
    assert result["status"] == "failed" and result["exit_code"] == 2 and result["job"] == 1
    assert result["overrides"] == ["optim.lr=0"] and result["error"] == "optim.lr=0.0 must be > 0"
    assert result["wall_s"] >= 0
    table = list(csv.DictReader(open(tmp_path / SUMMARY_CSV)))
    assert [(r["job"], r["outcome"]) for r in table] == [("0", "ok"), ("1", "failed (exit 2)")]

    with pytest.raises(SystemExit):  # the job again (continued), stopped by a signal this time
        with job_outcome(hydra_cfg(tmp_path, 1, ["optim.lr=0"])):
            raise SystemExit(128 + signal.SIGUSR2)
    result = json.loads((tmp_path / "1_job" / RESULT_FILE).read_text())
    assert result["signal"] == "SIGUSR2" and result["earlier"] == "failed (exit 2)"

    monkeypatch.setenv("RANK", "1")  # only the main process of a multi-process job writes
    with job_outcome(hydra_cfg(tmp_path, 2, [])):
        pass
    assert not (tmp_path / "2_job").exists()


def test_a_saved_experiments_grid_comes_from_hydra_sweeper_params(tmp_path):
    write_grid(tmp_path, ["hardware=cpu"], params={"mode.rank": "4,16", "optim.lr": "1e-3,3e-3"})
    grid, swept = planned_jobs(tmp_path)
    assert swept == ["mode.rank", "optim.lr"] and len(grid) == 4 and all("hardware=cpu" in job for job in grid)
