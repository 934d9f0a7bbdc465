"""Listening: text-prompt previews while training, and `python -m acestep_ft.generate`, on the tiny official-layout
checkpoint tree of test_preprocess (dit/ + vae/ at 2.4 kHz, hop 96 + a tiny Qwen3 text encoder)."""

from __future__ import annotations

import shutil
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import soundfile as sf
import torch
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from omegaconf import OmegaConf
from safetensors.torch import load_file

from acestep_ft.config import GenerateRoot, HardwareConfig, SamplerConfig, register_configs
from acestep_ft.errors import ConfigError
from acestep_ft.preprocess.encoders import Encoders
from acestep_ft.run import train
from acestep_ft.train.flow_sampler import resolve_sampler
from conftest import model_config
from test_preprocess import build_checkpoints

ROOT = Path(__file__).resolve().parents[1]
RATE, HOP = 2400, 96  # the tiny VAE: 25 latent frames/s
PROMPTS = ('train.samples.prompts=[{caption: "lofi piano warm", duration: 2.0, seed: 1}, '
           '{caption: "synth pop", lyrics: "la da di", duration: 1.5, seed: 2}]')
register_configs()


def train_config(run_dir: Path, *overrides: str):
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        cfg = compose(config_name="config", overrides=[
            "model=tiny", "hardware=cpu", "train.max_steps=4", "dataset.num_samples=4", "hardware.batch_size=2",
            "train.samples.every_epochs=1", "train.samples.num=1", "train.samples.sampler.steps=2", "train.plot=false",
            *overrides])
    return OmegaConf.to_object(cfg)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """(DiT dir, run dir, Encoders.condition calls): a LoRA run with two prompts, previews every epoch (2 steps)."""
    root = tmp_path_factory.mktemp("listen")
    dit = build_checkpoints(root / "ckpt")
    calls = []
    real = Encoders.condition

    def counting(self, song, duration_s):
        calls.append(song.caption)
        return real(self, song, duration_s)

    Encoders.condition = counting
    try:
        train(train_config(root / "run", f"model.path={dit}", PROMPTS), root / "run")
    finally:
        Encoders.condition = real
    return dit, root / "run", calls


def test_prompt_previews_are_encoded_once_and_written_at_every_preview(trained):
    dit, run, calls = trained
    assert calls == ["lofi piano warm", "synth pop"]  # once, although rendered at steps 2 and 4
    for step in (2, 4):
        latents = load_file(str(run / "samples" / f"step-{step:08d}.safetensors"))
        assert latents["prompt-0-lofi-piano-warm"].shape == (50, 64) and latents["prompt-1-synth-pop"].shape == (38, 64)
        for name, seconds in (("prompt-0-lofi-piano-warm", 2.0), ("prompt-1-synth-pop", 1.5)):
            audio, rate = sf.read(str(run / "samples" / f"step-{step:08d}" / f"{name}.wav"))
            assert rate == RATE and audio.shape[1] == 2 and abs(audio.shape[0] - seconds * RATE) <= HOP
            assert float(abs(audio).max()) > 0
        assert len(list((run / "samples" / f"step-{step:08d}").glob("synthetic_*.wav"))) == 1  # train.samples.num
    first, last = (load_file(str(run / "samples" / f"step-{s:08d}.safetensors")) for s in (2, 4))
    assert not torch.equal(first["prompt-0-lofi-piano-warm"], last["prompt-0-lofi-piano-warm"])  # weights moved


def test_prompts_without_a_text_encoder_or_vae_are_refused_before_training(trained, tmp_path):
    dit, _, _ = trained
    with pytest.raises(ConfigError) as err:
        train(train_config(tmp_path / "a", f"model.path={dit}", PROMPTS,
                           f"model.text_encoder_path={tmp_path / 'nope'}"), tmp_path / "a")
    assert "model.text_encoder_path" in str(err.value) and str(tmp_path / "nope") in str(err.value)
    lonely = tmp_path / "ckpt" / "dit"
    shutil.copytree(dit, lonely)  # no vae/ and no Qwen3-Embedding-0.6B/ beside it
    with pytest.raises(ConfigError) as err:
        train(train_config(tmp_path / "b", f"model.path={lonely}", PROMPTS), tmp_path / "b")
    message = str(err.value)
    assert "train.samples.vae_path" in message and str(tmp_path / "ckpt" / "vae") in message
    assert "model.text_encoder_path" in message and "Qwen3-Embedding-0.6B" in message
    assert not (tmp_path / "b" / "checkpoints").exists()


def generate_config(dit: Path, out: Path, **kw) -> GenerateRoot:
    return GenerateRoot(model=replace(model_config("tiny"), path=str(dit)), hardware=HardwareConfig(device="cpu"),
                        prompt="lofi piano warm", duration=2.0, seed=3, sampler=SamplerConfig(steps=3),
                        output=str(out), **kw)


def test_generate_renders_a_clip_that_the_trained_adapter_changes(trained, tmp_path):
    from acestep_ft.generate import generate

    dit, run, _ = trained
    said = []
    generate(generate_config(dit, tmp_path / "lora.wav", adapter=str(run / "export")), say=said.append)
    sampler = resolve_sampler(SamplerConfig(steps=3), model_config("tiny").is_turbo)  # tiny's own defaults
    assert f"wrote {tmp_path / 'lora.wav'}" in said[0] and f"sampler: {sampler.describe()}" in said[0]
    assert "adapter: LORA" in said[0] and "took" in said[0]
    lora, rate = sf.read(str(tmp_path / "lora.wav"))
    assert rate == RATE and lora.shape[1] == 2 and abs(lora.shape[0] - 2.0 * RATE) <= HOP
    generate(generate_config(dit, tmp_path / "base.wav"), say=said.append)
    base, _ = sf.read(str(tmp_path / "base.wav"))
    assert base.shape == lora.shape and abs(base - lora).max() > 1e-3  # the adapter changes the clip
    generate(generate_config(dit, tmp_path / "again.wav", adapter=str(run / "export")), say=said.append)
    assert (tmp_path / "again.wav").read_bytes() == (tmp_path / "lora.wav").read_bytes()  # seeded: reproducible
    # the run's ComfyUI-layout file is the same adapter
    comfy = run / "export" / "comfyui" / "adapter.safetensors"
    generate(generate_config(dit, tmp_path / "comfy.wav", adapter=str(comfy)), say=said.append)
    assert abs(sf.read(str(tmp_path / "comfy.wav"))[0] - lora).max() <= 2 / 32768


def test_generate_config_composes():
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        cfg = OmegaConf.to_object(compose(config_name="generate", overrides=[
            'prompt="lo-fi hip hop, mellow piano"', "sampler.steps=12", "model=acestep15_turbo"]))
        assert isinstance(cfg, GenerateRoot) and cfg.prompt == "lo-fi hip hop, mellow piano"
        assert cfg.sampler == SamplerConfig(steps=12) and cfg.model.is_turbo and cfg.duration == 10.0
        with pytest.raises(Exception, match="prompt"):
            OmegaConf.to_object(compose(config_name="generate"))


@pytest.mark.slow
def test_generate_command_line_writes_the_wav(trained, tmp_path):
    dit, run, _ = trained

    def cli(*args):
        return subprocess.run([sys.executable, "-m", "acestep_ft.generate", "model=tiny", f"model.path={dit}",
                               "prompt=lofi piano warm", "duration=2", "seed=3", "sampler.steps=3", "hardware=cpu",
                               f"hydra.run.dir={tmp_path / 'hydra'}", *args], cwd=ROOT, capture_output=True,
                              text=True, timeout=300)

    proc = cli(f"adapter={run / 'export'}", f"output={tmp_path / 'lora.wav'}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"wrote {tmp_path / 'lora.wav'}" in proc.stdout and "adapter: LORA" in proc.stdout
    audio, rate = sf.read(str(tmp_path / "lora.wav"))
    assert rate == RATE and abs(audio.shape[0] - 2.0 * RATE) <= HOP
    proc = cli(f"adapter={tmp_path / 'nope'}", f"output={tmp_path / 'x.wav'}")
    assert proc.returncode == 2 and "does not exist" in proc.stderr and "Traceback" not in proc.stderr


def test_generate_refuses_what_it_cannot_use(trained, tmp_path):
    from acestep_ft.errors import UserError
    from acestep_ft.generate import generate

    dit, run, _ = trained
    with pytest.raises(ConfigError, match="adapter=.*does not exist"):
        generate(generate_config(dit, tmp_path / "x.wav", adapter=str(tmp_path / "nope")))
    with pytest.raises(ConfigError, match="full model directory"):
        generate(generate_config(dit, tmp_path / "x.wav", adapter=str(dit)))
    with pytest.raises(UserError, match="no adapter_config.json"):
        generate(generate_config(dit, tmp_path / "x.wav", adapter=str(tmp_path)))
    with pytest.raises(ConfigError, match="shift=2.5"):
        generate(replace(generate_config(dit, tmp_path / "x.wav"),
                         model=replace(model_config("tiny"), path=str(dit), is_turbo=True),
                         sampler=SamplerConfig(shift=2.5)))
    assert not (tmp_path / "x.wav").exists()
