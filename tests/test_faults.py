"""Fault injection on real `python train.py` runs (tiny model, CPU): what reality does to a long run.

Signals mid-run (SIGTERM, SIGINT, SIGUSR1, twice), a relaunch into a used directory, a damaged newest checkpoint,
a torn metrics line, a finished run whose export is missing, kill -9 during saves and deletions, and a full disk
(a small tmpfs, when the tests run as root). Every resume is compared with an uninterrupted run: exactly.
"""

import os
import shlex
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from acestep_ft.config import OptimConfig
from acestep_ft.train.checkpoint import list_checkpoints, manifest_problem
from acestep_ft.train.metrics import read_metrics
from acestep_ft.train.optim import lr_factor

ROOT = Path(__file__).resolve().parents[1]
ENV = {**{k: v for k, v in os.environ.items() if k != "HYDRA_FULL_ERROR"}, "WANDB_MODE": "offline",
       "OMP_NUM_THREADS": "1"}
# 40 steps of 4 clips: long enough (~2 s) to be signalled mid-run, short enough to repeat
COMMON = ["hardware=cpu", "train.max_steps=40", "train.save_every=100", "dataset.num_samples=16", "train.plot=false"]


def command(run_dir, *overrides):
    return [sys.executable, "train.py", *COMMON, *overrides, f"hydra.run.dir={run_dir}"]


def run(run_dir, *overrides, status=0):
    proc = subprocess.run(command(run_dir, *overrides), cwd=ROOT, env=ENV, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == status, f"exit {proc.returncode}:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    return proc


def losses(run_dir):
    return [(r["step"], r["train/loss"]) for r in read_metrics(run_dir / "metrics.jsonl")]


def wait_for_steps(run_dir, proc, n):
    """Block until the run has logged `n` steps (it must still be running then)."""
    deadline = time.time() + 300
    while time.time() < deadline:
        if len(losses(run_dir)) >= n:
            return
        assert proc.poll() is None, "the run ended before it could be signalled"
        time.sleep(0.02)
    raise AssertionError("the run did not reach the step")


@pytest.fixture(scope="module")
def baseline(tmp_path_factory):
    """The uninterrupted run every interrupted one must reproduce."""
    run_dir = tmp_path_factory.mktemp("baseline")
    run(run_dir)
    assert len(losses(run_dir)) == 40
    return losses(run_dir)


@pytest.mark.parametrize("sig", [signal.SIGTERM, pytest.param(signal.SIGINT, marks=pytest.mark.slow),
                                 pytest.param(signal.SIGUSR1, marks=pytest.mark.slow)])
def test_a_signal_saves_after_the_step_and_the_printed_command_resumes_exactly(tmp_path, baseline, sig):
    proc = subprocess.Popen(command(tmp_path), cwd=ROOT, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    wait_for_steps(tmp_path, proc, 3)
    proc.send_signal(sig)
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 128 + sig, (proc.returncode, out[-2000:], err[-2000:])
    assert "Traceback" not in err and "KeyboardInterrupt" not in err
    (saved,) = list_checkpoints(tmp_path)  # off the save grid: the stop itself saved
    step = int(saved.name.split("-")[1])
    assert 3 <= step < 40 and manifest_problem(saved) is None
    assert [s for s, _ in losses(tmp_path)] == list(range(1, step + 1))  # metrics flushed up to the saved step
    assert not (tmp_path / "export").exists()
    resume = out.strip().splitlines()[-1].strip()
    assert resume.startswith("python train.py") and "train.resume=auto" in resume, out[-2000:]
    if sig == signal.SIGTERM:  # a kill while metrics.jsonl was being appended leaves a torn last line
        with open(tmp_path / "metrics.jsonl", "a") as f:
            f.write('{"step": %d, "train/lo' % (step + 1))
    proc = subprocess.run([sys.executable, *shlex.split(resume)[1:]], cwd=ROOT, env=ENV, capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    if sig == signal.SIGTERM:
        assert "dropped 1 unreadable line" in proc.stdout
    assert losses(tmp_path) == baseline  # exact: the resumed run continues the same trajectory
    assert (tmp_path / "export").is_dir()


def test_a_second_signal_exits_at_once(tmp_path):
    # long steps (8 clips of up to 12 s), so that the second signal arrives while the first step still runs
    proc = subprocess.Popen(command(tmp_path, "train.save_every=2", "hardware.batch_size=8",
                                    "dataset.max_frames=300"), cwd=ROOT, env=ENV, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    wait_for_steps(tmp_path, proc, 2)
    proc.send_signal(signal.SIGTERM)
    time.sleep(0.2)  # signals of one kind that arrive together are delivered once
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == -signal.SIGTERM and "exiting now, without saving" in err
    assert all(manifest_problem(p) is None for p in list_checkpoints(tmp_path))  # what was saved stays intact


@pytest.mark.slow
def test_relaunch_is_refused_a_missing_export_is_written_and_overwrite_starts_over(tmp_path):
    run(tmp_path, "train.max_steps=4", "train.save_every=2")
    record = (tmp_path / ".hydra" / "overrides.yaml").read_text()
    metrics = (tmp_path / "metrics.jsonl").read_text()
    proc = run(tmp_path, "train.max_steps=4", "optim.lr=1e-3", status=2)
    message = proc.stderr
    assert f"the run directory {tmp_path} already holds a run (newest checkpoint: step 4" in message
    assert "train.resume=auto" in message and "hydra.run.dir" in message and "train.overwrite=true" in message
    assert (tmp_path / ".hydra" / "overrides.yaml").read_text() == record  # a refused start changes nothing
    assert (tmp_path / "metrics.jsonl").read_text() == metrics

    # killed after its last checkpoint, before the export: resuming the finished run writes the export
    shutil.rmtree(tmp_path / "export")
    proc = run(tmp_path, "train.max_steps=4", "train.resume=auto")
    assert "already finished at step 4" in proc.stdout and (tmp_path / "export" / "adapter_model.safetensors").exists()
    assert (tmp_path / "metrics.jsonl").read_text() == metrics

    proc = run(tmp_path, "train.max_steps=2", "train.overwrite=true")
    assert "deleted the earlier run's checkpoints" in proc.stdout
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step-00000002"] and len(losses(tmp_path)) == 2


@pytest.mark.slow
def test_a_damaged_newest_checkpoint_falls_back_to_the_newest_intact_one(tmp_path, baseline):
    run(tmp_path, "train.save_every=10", "train.stop_at_step=30")
    newest = tmp_path / "checkpoints" / "step-00000030"
    adapter = newest / "adapter" / "adapter_model.safetensors"
    data = bytearray(adapter.read_bytes())
    data[-50] ^= 0xFF  # 8 flipped bits inside a LoRA matrix: the file still parses
    adapter.write_bytes(bytes(data))
    proc = run(tmp_path, "train.save_every=10", "train.resume=auto")
    assert f"skipping {newest}: damaged (adapter/adapter_model.safetensors fails its xxh3_64 checksum" in proc.stdout
    assert "resumed from" in proc.stdout and "step-00000020 at step 20" in proc.stdout
    assert losses(tmp_path) == baseline


@pytest.mark.slow  # default-suite budget (unit: tests/unit/test_checkpoint.py, test_optim_presets.py); CI runs it
def test_non_strict_resume_trains_with_the_changed_optimizer_settings(tmp_path):
    run(tmp_path, "train.stop_at_step=20")
    proc = run(tmp_path, "train.resume=auto", "train.resume_strict=false", "optim.lr=1e-2", "optim.weight_decay=0.5")
    assert "optim.lr: checkpoint 0.003, now 0.01" in proc.stdout and "weight_decay 0.01 -> 0.5" in proc.stdout
    lr = {r["step"]: r["train/lr"] for r in read_metrics(tmp_path / "metrics.jsonl")}
    schedule = OptimConfig(lr=1e-2, warmup_steps=5)
    assert lr[21] == pytest.approx(1e-2 * lr_factor(20, 40, schedule))  # the new peak lr, at the restored step
    assert lr[20] == pytest.approx(3e-3 * lr_factor(19, 40, OptimConfig(lr=3e-3, warmup_steps=5)))
    state = torch.load(tmp_path / "checkpoints" / "step-00000040" / "training_state.pt", weights_only=False)
    assert {g["weight_decay"] for g in state["optimizer"]["param_groups"]} == {0.5}  # what the config claims


@pytest.mark.slow
def test_kill_9_during_saves_and_deletions_never_leaves_a_broken_checkpoint(tmp_path, baseline):
    # a checkpoint every step, one kept: the run spends most of its time writing and deleting checkpoints
    args = ["train.save_every=1", "train.keep_last=1"]
    for i, after in enumerate((3, 9)):
        proc = subprocess.Popen(command(tmp_path, *args, *(["train.resume=auto"] if i else [])), cwd=ROOT, env=ENV,
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        wait_for_steps(tmp_path, proc, after)
        time.sleep(0.01 * i)
        proc.kill()
        proc.wait()
        found = list_checkpoints(tmp_path)
        assert found and all(manifest_problem(p) is None for p in found), found
    proc = run(tmp_path, *args, "train.resume=auto")
    hidden = [p.name for p in (tmp_path / "checkpoints").iterdir() if p.name.startswith(".")]
    assert not hidden, hidden  # leftovers of the killed writes were cleaned at the start
    assert losses(tmp_path) == baseline


@pytest.mark.slow
@pytest.mark.skipif(os.geteuid() != 0, reason="mounting a small tmpfs needs root")
def test_a_full_disk_stops_with_a_clear_message_and_keeps_the_last_checkpoint(tmp_path):
    disk = tmp_path / "disk"
    disk.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=6m", "tmpfs", str(disk)]).returncode != 0:
        pytest.skip("tmpfs mount not permitted here")
    try:
        run_dir = disk / "run"
        proc = run(run_dir, "train.save_every=1", "train.keep_last=0", status=1)  # each checkpoint ~1.9 MB
        assert "disk full" in proc.stderr and "GiB are free" in proc.stderr and "is intact" in proc.stderr
        found = list_checkpoints(run_dir)
        assert found and all(manifest_problem(p) is None for p in found)
        assert not [p for p in (run_dir / "checkpoints").iterdir() if p.name.startswith(".")]  # no temp left
        for old in found[:-1]:  # make room, then the run continues from the last checkpoint
            subprocess.run(["rm", "-r", str(old)], check=True)
        proc = run(run_dir, "train.save_every=1", "train.keep_last=1", "train.resume=auto")
        assert "resumed from" in proc.stdout and len(losses(run_dir)) == 40
    finally:
        subprocess.run(["umount", str(disk)])


@pytest.mark.slow
def test_two_processes_agree_on_the_stop_step_when_only_one_is_signalled(tmp_path):
    import psutil

    common = ["hardware=cpu", "train.max_steps=30", "train.save_every=100", "dataset.num_samples=16",
              "hardware.batch_size=2", "train.plot=false"]

    def torchrun(run_dir, *extra):
        return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "train.py",
                *common, *extra, f"hydra.run.dir={run_dir}"]

    whole = subprocess.run(torchrun(tmp_path / "whole"), cwd=ROOT, env=ENV, capture_output=True, text=True,
                           timeout=600)
    assert whole.returncode == 0, whole.stderr[-3000:]
    parts = tmp_path / "parts"
    proc = subprocess.Popen(torchrun(parts), cwd=ROOT, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    wait_for_steps(parts, proc, 3)
    workers = [p for p in psutil.Process(proc.pid).children(recursive=True) if "train.py" in " ".join(p.cmdline())]
    (rank1,) = [p for p in workers if p.environ().get("RANK") == "1"]
    rank1.send_signal(signal.SIGUSR1)  # rank 0 never sees the signal
    out, err = proc.communicate(timeout=300)
    (saved,) = list_checkpoints(parts)
    step = int(saved.name.split("-")[1])
    assert f"stopped by SIGUSR1 after step {step}: checkpoint saved" in out, out[-2000:] + err[-2000:]
    assert manifest_problem(saved) is None and len(losses(parts)) == step
    resumed = subprocess.run(torchrun(parts, "train.resume=auto"), cwd=ROOT, env=ENV, capture_output=True, text=True,
                             timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert losses(parts) == losses(tmp_path / "whole")


@pytest.mark.slow
def test_a_non_finite_loss_halts_with_an_emergency_save_that_resumes(tmp_path):
    proc = run(tmp_path, "optim.lr=1e30", "optim.warmup_steps=0", status=1)  # diverges at step 2
    assert "training halted: non-finite loss" in proc.stderr and "checkpoint step 1" in proc.stderr
    (saved,) = list_checkpoints(tmp_path)
    state = torch.load(saved / "training_state.pt", weights_only=False)
    assert saved.name == "step-00000001" and "emergency save" in state["note"]
    assert all(torch.isfinite(t).all() for t in state["optimizer"]["state"][0].values() if t.is_floating_point())
    # the weights after that step 1 are finite but huge: a resume loads them (and says what they are) and halts again
    proc = run(tmp_path, "optim.lr=1e30", "optim.warmup_steps=0", "train.resume=auto", status=1)
    assert "saved with a note: emergency save" in proc.stdout and "at step 2" in proc.stderr
