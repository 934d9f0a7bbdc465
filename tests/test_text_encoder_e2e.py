"""mode.text_encoder=lora end to end, on data preprocessed from audio with the tiny random Qwen3 text encoder: the step
runs the text encoder on the caption token ids (with a fresh LoRA it gives the stored text states, so the first loss
equals the frozen run's), the LoRA trains, is saved beside the trained weights as text_encoder/, loads with PEFT on the
text encoder as the consumer loads it, is merged by model.text_encoder_adapter wherever the text encoder is loaded, and
a run stopped and resumed continues exactly."""

from dataclasses import replace as with_
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from test_train_e2e import losses, run_train


@pytest.fixture(scope="module")
def stored(tmp_path_factory):
    """(DiT directory, data preprocessed with preprocess.store=inputs in float32) of the tiny checkpoint tree."""
    from acestep_ft.config import HardwareConfig
    from acestep_ft.preprocess import pipeline
    from conftest import model_config
    from test_preprocess import build_checkpoints, build_songs, config

    root = tmp_path_factory.mktemp("text_lora")
    dit, songs = build_checkpoints(root / "ckpt"), build_songs(root)
    data = root / "data"
    assert pipeline.preprocess(config(songs, data, store="inputs", dtype="float32", max_seconds=1.0),
                               with_(model_config("tiny"), path=str(dit)),
                               HardwareConfig(device="cpu", mixed_precision="no"), progress=False).ok
    return dit, data


def common(dit: Path, data: Path, *more: str) -> list:
    return ["model=tiny", f"model.path={dit}", "dataset=preprocessed", f"dataset.path={data}",
            "dataset.conditions=encoder_inputs", "hardware.batch_size=1", "train.max_steps=4", "train.save_every=2",
            "train.plot=false", "optim.lr=1e-2", *more]


def text_dir(dit: Path) -> Path:
    return dit.parent / "Qwen3-Embedding-0.6B"


def test_text_encoder_lora_trains_saves_and_loads_with_peft(stored, tmp_path):
    from peft import PeftModel
    from transformers import AutoModel

    from acestep_ft.preprocess.encoders import load_text_encoder

    dit, data = stored
    lora, frozen = tmp_path / "lora", tmp_path / "frozen"
    proc = run_train(lora, *common(dit, data, "mode=lora", "mode.text_encoder=lora", "mode.text_lora.rank=4"))
    assert "the text encoder runs in every step" in proc.stdout
    run_train(frozen, *common(dit, data, "mode=lora"))
    # a fresh LoRA adds exactly zero: the text encoder in the step gives the stored text states of these songs
    assert losses(lora)[0] == losses(frozen)[0] and losses(lora)[1:] != losses(frozen)[1:]

    adapter = lora / "export" / "text_encoder"
    assert (lora / "export" / "adapter_config.json").is_file()  # the decoder's adapter stays where it was
    assert (lora / "checkpoints" / "step-00000002" / "adapter" / "text_encoder" / "adapter_config.json").is_file()
    assert not (frozen / "export" / "text_encoder").exists()
    weights = load_file(str(adapter / "adapter_model.safetensors"))
    ups = [v for k, v in weights.items() if "lora_B" in k]
    assert ups and all(float(v.abs().max()) > 0 for v in ups)  # every targeted projection trained

    # the consumer's way: PeftModel.from_pretrained on the text encoder; our loaders merge the same adapter
    ids = torch.tensor([[2, 5, 7, 1, 1]])
    with torch.no_grad():
        base = AutoModel.from_pretrained(str(text_dir(dit)), dtype=torch.float32).eval()
        plain = base(input_ids=ids).last_hidden_state
        adapted = PeftModel.from_pretrained(base, str(adapter)).eval()(input_ids=ids).last_hidden_state
        _, merged = load_text_encoder(text_dir(dit), 32, "model.text_encoder_path", str(adapter))
        assert (adapted - plain).abs().max() > 1e-4
        torch.testing.assert_close(merged(input_ids=ids).last_hidden_state, adapted, rtol=1e-5, atol=1e-5)

    # generate: the export's text-encoder LoRA is named, and used when model.text_encoder_adapter says so
    import soundfile as sf

    from acestep_ft.generate import generate
    from test_previews_generate import generate_config

    said = []
    generate(generate_config(dit, tmp_path / "plain.wav", adapter=str(lora / "export")), say=said.append)
    assert any(f"model.text_encoder_adapter={adapter}" in line for line in said)
    config = generate_config(dit, tmp_path / "adapted.wav", adapter=str(lora / "export"))
    generate(with_(config, model=with_(config.model, text_encoder_adapter=str(adapter))), say=said.append)
    assert f"text encoder: the LoRA in {adapter} merged" in said[-1]
    assert abs(sf.read(str(tmp_path / "plain.wav"))[0] - sf.read(str(tmp_path / "adapted.wav"))[0]).max() > 1e-4


def test_preprocessing_with_the_trained_adapter_changes_the_text_states_and_the_fingerprint(stored, tmp_path):
    """model.text_encoder_adapter: preprocessing runs the adapted text encoder; the data's fingerprint says so."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModel

    from acestep_ft.config import HardwareConfig
    from acestep_ft.data.fingerprint import read_fingerprint
    from acestep_ft.preprocess import pipeline
    from conftest import model_config
    from test_preprocess import build_songs, config

    dit, data = stored
    peft = get_peft_model(AutoModel.from_pretrained(str(text_dir(dit))), LoraConfig(r=2, target_modules=["v_proj"]))
    with torch.no_grad():
        for name, p in peft.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.5, generator=torch.Generator().manual_seed(1))
    peft.save_pretrained(str(tmp_path / "adapter"))
    out = tmp_path / "adapted"
    model = with_(model_config("tiny"), path=str(dit), text_encoder_adapter=str(tmp_path / "adapter"))
    assert pipeline.preprocess(config(build_songs(tmp_path), out, store="inputs", dtype="float32", max_seconds=1.0),
                               model, HardwareConfig(device="cpu", mixed_precision="no"), progress=False).ok
    before, after = read_inputs(data), read_inputs(out)
    assert before.keys() == after.keys() and len(before) == 5
    for key in before:
        assert torch.equal(before[key].text_token_ids, after[key].text_token_ids)
        assert torch.equal(before[key].lyric_token_ids, after[key].lyric_token_ids)
        assert not torch.allclose(before[key].text_hidden_states, after[key].text_hidden_states)
    assert read_fingerprint(data)["text_encoder_digest"] != read_fingerprint(out)["text_encoder_digest"]


def read_inputs(path: Path) -> dict:
    """key -> Sample of an encoder_inputs dataset (tiny model widths)."""
    from acestep_ft.config import Conditions
    from acestep_ft.data import ConditionWidths
    from acestep_ft.data.v3_reader import V3Directory

    v3 = V3Directory(path, ConditionWidths(encoder=64, text=32, vocab=256), conditions=Conditions.encoder_inputs)
    return {v3[i].key: v3[i] for i in range(len(v3))}


@pytest.mark.slow  # three training subprocesses; CI runs it
def test_resume_with_a_text_encoder_lora_is_exact(stored, tmp_path):
    dit, data = stored
    args = common(dit, data, "mode=full", "mode.text_encoder=lora", "train.ema.enabled=true",
                  "mode.unfreeze=[{pattern: 'layers\\.1\\.'}, {module: condition_encoder, pattern: 'text_projector',"
                  " at_step: 2}]")
    whole, parts = tmp_path / "whole", tmp_path / "parts"
    run_train(whole, *args)
    run_train(parts, *args, "train.stop_at_step=1")
    run_train(parts, *args, "train.resume=auto")
    assert len(losses(whole)) == 4 and losses(parts) == losses(whole)
    for name in ("model.safetensors", "text_encoder/adapter_model.safetensors"):
        a, b = load_file(str(whole / "export" / name)), load_file(str(parts / "export" / name))
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.slow  # a two-process run; CI runs it
def test_two_process_ddp_run_keeps_the_text_encoder_lora_replicas_equal(stored, tmp_path):
    """The text encoder runs in the step, outside the DDP-wrapped module's forward: its LoRA's gradients are still
    reduced (the replica digest covers them) and both processes start from the same LoRA."""
    import os
    import subprocess
    import sys

    from test_train_e2e import ROOT

    dit, data = stored
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "train.py",
           "hardware=cpu", *common(dit, data, "mode=lora", "mode.text_encoder=lora"), f"hydra.run.dir={tmp_path}"]
    proc = subprocess.run(cmd, cwd=ROOT, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, f"torchrun failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"
    assert "replicas: the trained weights agree on all 2 processes" in proc.stdout and len(losses(tmp_path)) == 4
    assert (tmp_path / "export" / "text_encoder" / "adapter_model.safetensors").is_file()
