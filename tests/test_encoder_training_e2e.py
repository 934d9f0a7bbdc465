"""train.py on data that carries the condition encoder's inputs: a condition_encoder stage trains the encoder from its
step (the export's encoder.* weights move, the frozen decoder's do not), and a run stopped before the stage and resumed
continues exactly as the uninterrupted one."""

import pytest
import torch
from safetensors.torch import load_file

from test_train_e2e import losses, run_train

COMMON = ["mode=full", "dataset=synthetic", "dataset.conditions=encoder_inputs", "train.max_steps=6",
          "train.save_every=3", "train.plot=false"]


def stage(at_step: int) -> str:
    return f"mode.unfreeze=[{{module: condition_encoder, pattern: '.', at_step: {at_step}}}]"


def exported(run_dir):
    return load_file(str(run_dir / "export" / "model.safetensors"))


def test_encoder_stage_trains_the_encoder_from_its_step(tmp_path):
    early, never = tmp_path / "early", tmp_path / "never"
    proc = run_train(early, *COMMON, stage(3))
    assert "the condition encoder runs in every step" in proc.stdout
    run_train(never, *COMMON, stage(1000))
    a, b = exported(early), exported(never)
    assert a.keys() == b.keys()
    moved = [k for k in a if k.startswith("encoder.") and not torch.equal(a[k], b[k])]
    assert len(moved) > 10 and any(k.startswith("encoder.lyric_encoder.") for k in moved)
    assert all(torch.equal(a[k], b[k]) for k in a if not k.startswith("encoder."))  # only the encoder trained
    assert losses(early)[:3] == losses(never)[:3] and losses(early)[3:] != losses(never)[3:]
    from acestep_ft.model import load_model
    from conftest import model_config

    loaded = load_model(model_config("tiny", path=str(early / "export"))).state_dict()  # strict official layout
    assert all(torch.equal(loaded[k], a[k]) for k in moved)


@pytest.mark.slow  # four training subprocesses; CI runs it
def test_resume_across_the_encoder_stage_boundary_is_exact(tmp_path):
    common = [*COMMON, "mode.unfreeze=[{pattern: 'layers\\.1\\.'}, {module: condition_encoder, pattern: "
              "'lyric_encoder|text_projector', at_step: 3}]", "train.ema.enabled=true", "optim.lr=1e-3"]
    whole, parts = tmp_path / "whole", tmp_path / "parts"
    run_train(whole, *common)
    run_train(parts, *common, "train.stop_at_step=2")
    run_train(parts, *common, "train.resume=auto")
    assert losses(parts) == losses(whole) and len(losses(whole)) == 6
    a, b = exported(whole), exported(parts)
    assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.slow  # a preprocessing run and two training runs; the unit test covers the step itself
def test_frozen_encoder_on_stored_inputs_trains_like_the_stored_outputs_of_the_same_songs(tmp_path):
    """preprocess.store=both, then the same run on each set: a frozen condition encoder in the step gives the losses
    of the outputs the preprocessor stored, bit for bit (float32 data, batch 1: the encoder meets the shapes the
    preprocessor gave it)."""
    from dataclasses import replace as with_

    from acestep_ft.config import HardwareConfig
    from acestep_ft.preprocess import pipeline
    from conftest import model_config
    from test_preprocess import build_checkpoints, build_songs, config

    dit, songs = build_checkpoints(tmp_path / "ckpt"), build_songs(tmp_path)
    data = tmp_path / "data"
    assert pipeline.preprocess(config(songs, data, store="both", dtype="float32", max_seconds=1.0),
                               with_(model_config("tiny"), path=str(dit)), HardwareConfig(device="cpu",
                                                                                          mixed_precision="no"),
                               progress=False).ok
    common = ["model=tiny", f"model.path={dit}", "dataset=preprocessed", f"dataset.path={data}", "mode=full",
              "hardware.batch_size=1", "train.max_steps=5", "train.save_every=5", "train.plot=false"]
    run_train(tmp_path / "outputs", *common, "dataset.conditions=encoder_outputs")
    run_train(tmp_path / "inputs", *common, "dataset.conditions=encoder_inputs")
    assert len(losses(tmp_path / "inputs")) == 5 and losses(tmp_path / "inputs") == losses(tmp_path / "outputs")


@pytest.mark.slow  # a two-process run; CI runs it
def test_two_process_ddp_run_keeps_the_trained_encoder_replicas_equal(tmp_path):
    """The encoder runs in the step, outside the DDP-wrapped module's forward: its gradients are still reduced (the
    replica digest covers the encoder's weights), and no trained weight is left without a gradient (the 2B timbre
    CLS token, which no forward reads, is not trained)."""
    import os
    import subprocess
    import sys

    from test_train_e2e import ROOT

    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "train.py",
           "hardware=cpu", *COMMON, "dataset.num_samples=10", "hardware.batch_size=2",
           "mode.unfreeze=[{pattern: 'layers\\.1\\.'}, {module: condition_encoder, pattern: '.', at_step: 2}]",
           f"hydra.run.dir={tmp_path}"]
    proc = subprocess.run(cmd, cwd=ROOT, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, f"torchrun failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"
    assert "replicas: the trained weights agree on all 2 processes" in proc.stdout and len(losses(tmp_path)) == 6
