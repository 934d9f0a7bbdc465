"""One clip from text with a trained adapter or a full fine-tune: encode the prompt, sample, decode, write a wav.

    python -m acestep_ft.generate model=acestep15_turbo model.path=/ckpt/acestep-v15-turbo \\
        adapter=outputs/2026-01-01/12-00-00/export 'prompt="lo-fi hip hop, mellow piano"' duration=30 seed=0 \\
        output=clip.wav
    python -m acestep_ft.generate model=acestep15_base model.path=/ckpt/acestep-v15-base prompt=... sampler.steps=50

`adapter` = a PEFT adapter directory (a run's export/, a checkpoint's adapter/), loaded the way official inference
loads it (PeftModel.from_pretrained on model.decoder), or a ComfyUI-layout .safetensors file; without it the model is
used as model.path holds it (a full fine-tune's export/ is a model directory). The text encoder and VAE default to the
official layout beside model.path (<model.path>/../Qwen3-Embedding-0.6B, <model.path>/../vae). The sampler settings
default to the variant's own (turbo: 8 steps, shift 3, no CFG; base / sft: 30 steps, shift 1, APG guidance 7).
A caption with commas needs Hydra quoting: 'prompt="a, b"'.

Exit status: 0 written, 1 a file or adapter that cannot be used, 2 a usage / config error; errors print their
message only (HYDRA_FULL_ERROR=1 adds the traceback).
"""

from __future__ import annotations

import os
import tempfile
import time
from contextlib import ExitStack
from datetime import datetime
from pathlib import Path
from typing import Any, Callable

import hydra
import torch
from torch import Tensor, nn

from acestep_ft.atomic import atomic_write_bytes
from acestep_ft.checks import model_path_problems
from acestep_ft.config import GenerateRoot, PromptSample, register_configs, resolve_hardware, to_typed
from acestep_ft.errors import ConfigError, UserError, reported_errors
from acestep_ft.model import load_model
from acestep_ft.preprocess.encoders import COMPUTE, loading
from acestep_ft.preprocess.prompts import encode_prompts
from acestep_ft.train.flow_sampler import resolve_sampler
from acestep_ft.train.previews import prompt_dirs, render_prompt
from acestep_ft.train.sample_audio import decode_latents, load_vae, vae_rate, wav_bytes
from acestep_ft.train.text_encoder import TEXT_ADAPTER_DIR

register_configs()
_started = False  # set once Hydra has composed the config and runs main()


def adapter_directory(adapter: str, stack: ExitStack) -> Path:
    """The PEFT adapter directory `adapter` names (a ComfyUI file is first written as one into a temporary
    directory that `stack` removes)."""
    path = Path(os.path.expanduser(adapter))
    if not path.exists():
        raise ConfigError(f"adapter={adapter} does not exist: give a PEFT adapter directory (a run's export/), a "
                          "checkpoint directory or a ComfyUI-layout .safetensors file.")
    if path.is_file():
        if path.suffix != ".safetensors":
            raise UserError(f"adapter={adapter} is neither a PEFT adapter directory nor a .safetensors file.")
        try:
            from acestep_ft.train.comfyui import write_peft
        except ImportError as err:
            raise UserError(f"adapter={adapter}: reading ComfyUI-layout files needs acestep_ft.train.comfyui, which "
                            f"this installation lacks ({err}). Fix: give the run's export/ directory (PEFT).") from err
        peft_dir = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="acestep-adapter-"))) / "peft"
        try:
            write_peft(path, peft_dir)
        except ValueError as err:
            raise UserError(f"adapter={adapter}: {err}") from err
        return peft_dir
    if not (path / "adapter_config.json").is_file() and (path / "adapter" / "adapter_config.json").is_file():
        path = path / "adapter"  # a checkpoint directory (checkpoints/step-N/)
    if not (path / "adapter_config.json").is_file():
        if (path / "config.json").is_file():
            raise ConfigError(f"adapter={adapter} is a full model directory, not an adapter: use model.path={adapter} "
                              "and leave adapter unset.")
        raise UserError(f"adapter={adapter} has no adapter_config.json: give a PEFT adapter directory (a run's "
                        "export/ or checkpoints/step-N/adapter/) or a ComfyUI .safetensors file.")
    return path


def apply_adapter(decoder: nn.Module, directory: Path, name: str) -> str:
    """Insert the PEFT adapter in `directory` into `decoder` in place (PeftModel.from_pretrained, as official
    inference does); calling `decoder` afterwards applies it. Returns a line describing it."""
    from peft import PeftModel

    try:
        peft_model = PeftModel.from_pretrained(decoder, str(directory), is_trainable=False)
    except (RuntimeError, ValueError, KeyError, OSError) as err:
        raise UserError(f"adapter={name} does not fit this model ({type(err).__name__}: "
                        f"{str(err).splitlines()[0][:300]}). Fix: the model group and model.path it was trained "
                        "on.") from err
    kind = peft_model.peft_config["default"].peft_type.value
    size = sum(p.numel() for n, p in decoder.named_parameters() if any(k in n for k in (".lora_", ".lokr_", ".hada_")))
    return f"adapter: {kind} from {name} ({size / 1e6:.3f}M parameters)"


def cast_inputs(decoder: nn.Module, dtype: torch.dtype) -> Callable[..., Tensor]:
    """`decoder` called with its floating-point inputs in the weights' dtype (official inference runs in bf16)."""
    def run(**kwargs: Any) -> Tensor:
        return decoder(**{k: v.to(dtype) if torch.is_tensor(v) and v.is_floating_point() else v
                          for k, v in kwargs.items()})
    return run


def generate(cfg: GenerateRoot, say: Callable[[str], None] = print) -> Path:
    """Write the clip `cfg` describes; returns its path."""
    started = time.perf_counter()
    problems = model_path_problems(cfg.model.path)
    if cfg.model.path is None and cfg.model.variant != "tiny":
        problems.append("model.path is required (the DiT checkpoint directory); random init is only for model=tiny.")
    if not cfg.duration > 0:
        problems.append(f"duration={cfg.duration} must be > 0 (seconds).")
    if problems:
        raise ConfigError("\n".join(problems))
    sampler = resolve_sampler(cfg.sampler, cfg.model.is_turbo)
    for trained in {cfg.adapter, cfg.model.path} - {None}:  # a run's export with a text-encoder LoRA beside it
        beside = Path(os.path.expanduser(trained)) / TEXT_ADAPTER_DIR
        if beside.is_dir() and cfg.model.text_encoder_adapter is None:
            say(f"note: {beside} holds the text-encoder LoRA trained with these weights; pass "
                f"model.text_encoder_adapter={beside} to render with it (now: the text encoder as it is)")
    text_dir, vae_dir = prompt_dirs(cfg.model.text_encoder_path, cfg.vae_path, cfg.model.path,
                                    "model.text_encoder_path", "vae_path")
    cuda = torch.cuda.is_available()
    if str(cfg.hardware.device) == "cuda" and not cuda:
        raise ConfigError("hardware.device=cuda but no CUDA GPU is visible: use hardware=cpu or hardware=auto.")
    on_cpu, precision = resolve_hardware(cfg.hardware, cuda, cuda and torch.cuda.is_bf16_supported())
    device = torch.device("cpu") if on_cpu else torch.device("cuda", torch.cuda.current_device())
    dtype = COMPUTE.get(precision, torch.float32)

    with ExitStack() as stack:  # holds the PEFT copy of a ComfyUI file until the adapter is in the model
        adapter_dir = adapter_directory(cfg.adapter, stack) if cfg.adapter is not None else None
        torch.manual_seed(cfg.seed)  # model=tiny without model.path: random weights, reproducible
        with loading("DiT", Path(cfg.model.path or "."), "model.path=<an ACE-Step 1.5 DiT directory of this variant>"):
            model = load_model(cfg.model, device=device, dtype=dtype).eval()
        vae = load_vae(vae_dir, "vae_path", device)
        prompt = PromptSample(caption=cfg.prompt, lyrics=cfg.lyrics, duration=cfg.duration, seed=cfg.seed)
        encoded = encode_prompts([prompt], model, cfg.model, text_dir, vae, device, dtype, "model.text_encoder_path")[0]
        adapter = "adapter: none" if adapter_dir is None else apply_adapter(model.decoder, adapter_dir, cfg.adapter)
        if cfg.model.text_encoder_adapter is not None:
            adapter += f"; text encoder: the LoRA in {cfg.model.text_encoder_adapter} merged"
    model.decoder.to(device=device, dtype=dtype).eval()  # the adapter's tensors too
    loaded = time.perf_counter()

    latents = render_prompt(cast_inputs(model.decoder, dtype), encoded, cfg.seed, sampler,
                            model.null_condition_emb.detach(), device)
    audio = decode_latents(vae, latents)
    out = Path(os.path.expanduser(cfg.output)) if cfg.output else (
        Path("generated") / f"{datetime.now():%Y-%m-%d-%H-%M-%S}-seed{cfg.seed}.wav")
    out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(out, wav_bytes(audio, vae_rate(vae)))
    done = time.perf_counter()
    say(f"wrote {out} ({audio.shape[0] / vae_rate(vae):.2f} s of audio at {vae_rate(vae)} Hz, seed {cfg.seed})\n"
        f"sampler: {sampler.describe()}\n{adapter}\nmodel {cfg.model.variant} on {device} ({str(dtype)[6:]}); took "
        f"{done - started:.1f} s ({loaded - started:.1f} s loading and encoding, {done - loaded:.1f} s sampling and "
        "decoding)")
    return out


@hydra.main(version_base="1.3", config_path="../conf", config_name="generate")
def main(cfg) -> None:
    global _started
    _started = True
    with reported_errors():  # a refusal exits 1, a config error 2: the message only
        typed = to_typed(cfg)
        generate(typed)


if __name__ == "__main__":
    try:
        main()
    except SystemExit as stopped:
        if stopped.code == 1 and not _started:  # Hydra refused the command line (unknown key, bad value): usage
            raise SystemExit(2) from None
        raise
