"""User errors end in a message and an exit status, never a traceback: 2 for a bad command line or config, 1 for a
refused or failed run. One subprocess per way out of train.py (Hydra's composition, the config check, the memory
preflight, the data, the resume check, a damaged checkpoint); the config check's many messages in-process."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from acestep_ft.checks import check_config
from acestep_ft.config import register_configs
from acestep_ft.errors import ConfigError
from conftest import sample_dict

ROOT = Path(__file__).resolve().parents[1]
ENV = {k: v for k, v in os.environ.items() if k != "HYDRA_FULL_ERROR"}


def train(tmp_path, *overrides, run_dir=None):
    cmd = [sys.executable, "train.py", "hardware=cpu", "train.max_steps=2", "train.plot=false", *overrides,
           f"hydra.run.dir={run_dir or tmp_path / 'run'}"]
    return subprocess.run(cmd, cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("finished")
    proc = train(run_dir, run_dir=run_dir)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return run_dir


def empty_dir(tmp_path):
    (tmp_path / "data").mkdir()
    return [f"dataset.path={tmp_path / 'data'}"]


def bad_pt(tmp_path):
    (tmp_path / "data").mkdir()
    for i in range(3):
        d = sample_dict(30, width=64, seed=i)
        if i == 1:
            d["target_latents"] = d["target_latents"][:, :60]  # a wrong latent width
        torch.save(d, tmp_path / "data" / f"song_{i}.pt")
    return [f"dataset.path={tmp_path / 'data'}"]


def fake_checkpoint_dir(tmp_path):
    (tmp_path / "ckpt").mkdir()
    (tmp_path / "ckpt" / "config.json").write_text("{}")
    return [f"model.path={tmp_path / 'ckpt'}"]


CASES = [  # (overrides, setup, exit status, text the message must hold)
    (["mode.rnak=4"], None, 2, "Key 'rnak' not in 'LoraMode'"),
    (["mode=full", "mode.rank=4"], None, 2, "Key 'rank' not in 'FullMode'"),
    (["dataset=preprocessed"], None, 2, "dataset.path is required"),
    (["optim.lr=0", "train.save_every=0"], None, 2, "optim.lr=0.0 must be > 0"),
    (["dataset=preprocessed"], empty_dir, 1, "data"),
    (["dataset=preprocessed", "dataset.bucket_seconds=0"], bad_pt, 1, "song_1.pt"),
    (["model=acestep15_turbo", "mode=full"], fake_checkpoint_dir, 1, "mode=full without a device budget"),
]


@pytest.mark.parametrize("overrides,setup,status,message", CASES,
                         ids=["hydra-key", "hydra-group", "missing", "check", "empty-data", "bad-data", "preflight"])
def test_train_py_errors_are_a_message_and_a_status(tmp_path, overrides, setup, status, message):
    proc = train(tmp_path, *overrides, *(setup(tmp_path) if setup else []))
    assert proc.returncode == status, proc.stdout[-2000:] + proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert message in proc.stderr, proc.stderr[-3000:]
    assert not (tmp_path / "run" / "metrics.jsonl").exists()


@pytest.mark.slow
def test_resume_refusals_come_before_the_model_and_leave_the_run_alone(finished_run, tmp_path):
    record = (finished_run / ".hydra" / "overrides.yaml").read_text()
    proc = train(tmp_path, "train.resume=auto", "optim.lr=1e-2", run_dir=finished_run)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    assert "optim.lr: checkpoint 0.003, now 0.01" in proc.stderr and "train.resume_strict=false" in proc.stderr
    assert "model tiny:" not in proc.stdout  # refused before the model was built
    assert (finished_run / ".hydra" / "overrides.yaml").read_text() == record
    proc = train(tmp_path, "train.resume=auto", "mode=full", run_dir=finished_run)
    assert proc.returncode == 1 and "mode: checkpoint 'lora', config 'full'" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_a_damaged_checkpoint_given_by_path_is_named(finished_run, tmp_path):
    import shutil

    copy = tmp_path / "copy"
    shutil.copytree(finished_run, copy)
    ckpt = copy / "checkpoints" / "step-00000002"
    state = ckpt / "training_state.pt"
    state.write_bytes(state.read_bytes()[:1000])
    proc = train(tmp_path, f"train.resume={ckpt}", run_dir=copy)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    assert f"checkpoint {ckpt} is damaged: training_state.pt is 1000 bytes" in proc.stderr


def test_traceback_on_request(tmp_path):
    proc = subprocess.run([sys.executable, "train.py", "optim.lr=-1", f"hydra.run.dir={tmp_path}"], cwd=ROOT,
                          env={**ENV, "HYDRA_FULL_ERROR": "1"}, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2 and "Traceback" in proc.stderr and "optim.lr=-1.0 must be > 0" in proc.stderr


def checked(tmp_path, *overrides):
    """check_config's verdict on a composed config (the same checks train.py runs before any weights)."""
    register_configs()
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        cfg = OmegaConf.to_object(compose(config_name="config", overrides=["hardware=cpu", *overrides]))
    with pytest.raises(ConfigError) as err:
        check_config(cfg, tmp_path)
    return str(err.value)


@pytest.mark.parametrize("overrides,message", [
    (["optim.lr=-1e-4"], "optim.lr=-0.0001 must be > 0"),
    (["train.save_every=0", "hardware.mixed_precision=fp16"], "train.save_every=0 must be >= 1"),
    (["train.save_every=0", "hardware.mixed_precision=fp16"], "hardware.mixed_precision=fp16 needs a CUDA GPU"),
    (["mode=full", "mode.unfreeze=[{module: condition_encoder, at_step: 5}]"], "would never receive a gradient"),
    (["mode=full", "dataset.conditions=encoder_inputs", "mode.unfreeze=[{module: condition_encoder, pattern: nope}]"],
     "matches no condition_encoder parameter"),
    (["dataset.conditions=encoder_inputs", "model.path=tests/assets/official_tiny"],
     "Qwen3-Embedding-0.6B (beside model.path) does not exist; set model.text_encoder_path="),
    (["mode=full", "mode.unfreeze=[{module: condition_encoder}]", "hardware.distributed=deepspeed"],
     "with a condition_encoder stage is not supported yet"),
    (["train.early_stop.patience=3"], "train.early_stop.patience needs a validation split"),
    (["hardware.gradient_checkpointing=2.5"], "hardware.gradient_checkpointing=2.5"),
    (["model.path=/nonexistent/dir"], "model.path=/nonexistent/dir does not exist"),
    (["hardware.distributed=fsdp"], "hardware.distributed=fsdp needs a CUDA GPU"),
    (["train.nonfinite=skip", "train.max_nonfinite_skips=0"], "train.max_nonfinite_skips=0 must be >= 1"),
    (["train.resume=/nonexistent/run"], "train.resume=/nonexistent/run does not exist"),
    (["train.resume=auto", "train.overwrite=true"], "choose one"),
])
def test_config_check_messages(tmp_path, overrides, message):
    assert message in checked(tmp_path, *overrides)


def test_a_model_path_without_config_json_is_caught_before_loading(tmp_path):
    (tmp_path / "weights").mkdir()
    message = checked(tmp_path, "model=acestep15_turbo", f"model.path={tmp_path / 'weights'}")
    assert "has no config.json" in message


@pytest.mark.slow
def test_a_failing_sweep_job_fails_alone(tmp_path):
    proc = subprocess.run([sys.executable, "train.py", "-m", "hardware=cpu", "train.max_steps=2", "train.plot=false",
                           "optim.lr=0,1e-3", f"hydra.sweep.dir={tmp_path}"], cwd=ROOT, env=ENV, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert "optim.lr=0.0 must be > 0" in proc.stderr and "1 job(s) of the sweep failed" in proc.stderr
    assert [p.name.split("_")[0] for p in tmp_path.iterdir() if (p / "export").is_dir()] == ["1"]  # job 1 still ran
