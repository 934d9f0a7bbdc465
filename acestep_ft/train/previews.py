"""Previews while training (train.samples; every `every_epochs` epochs and at the end): latents sampled from fixed
noise for the first `num` validation conditions and for the text `prompts`, with the variant's own sampler.

    previews = build_previews(cfg.train.samples, cfg.model, model, acc, source, max_frames, seed, use_masks,
                              log_audio, say, encode)               # encode(text_dir, vae): the prompts, once
    metrics = previews.render(decoder, run_dir, step, acc)          # collective: every process calls it

Files (main process): <run>/samples/step-N.safetensors holds every preview's latents (sample keys and
prompt-<i>-<caption slug>); with a VAE, <run>/samples/step-N/<key>.wav and prompt-<i>-<slug>.wav, also sent to the
logger (prompts with their caption). A prompt starts from noise seeded by its own seed alone, so its clips compare
across steps. Every process runs the same sampler calls in the same order (sharded models see every collective);
the prompts are encoded on the main process (`preprocess/prompts.py`, called by the wiring) and broadcast.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Tuple

import torch
from accelerate import Accelerator
from accelerate.utils import broadcast_object_list
from safetensors.torch import save as save_safetensors
from torch import Tensor, nn

from acestep_ft.atomic import atomic_write_bytes
from acestep_ft.config import (LyricFormat, ModelConfig, PreprocessConfig, PreprocessedDataset, PromptSample,
                               SampleConfig)
from acestep_ft.data.batch import Sample
from acestep_ft.data.collate import collate
from acestep_ft.data.dataset import SampleSource, SubsetSource
from acestep_ft.data.fingerprint import read_fingerprint
from acestep_ft.errors import ConfigError
from acestep_ft.model.checkpoint_io import TEXT_ENCODER_DIR, VAE_DIR
from acestep_ft.train.evaluate import ValidationSet, fixed_noise
from acestep_ft.train.flow_sampler import Sampler, resolve_sampler, sample_latents
from acestep_ft.train.step import Encode
from acestep_ft.train.sample_audio import (
    decode_latents, file_name, load_sample_vae, sibling_dir, slug, vae_dir, vae_rate, wav_bytes,
)

PROMPT_KEYS = ("model.text_encoder_path", "train.samples.vae_path")

LogAudio = Callable[..., None]
"""log_audio(step, name, audio [S, channels] float32, rate, caption=None)"""


@dataclass
class Previews:
    """What a preview renders, set up once at the start of a run."""

    num: int                         # validation conditions (the first `num` samples of `source`)
    source: SampleSource
    max_frames: int                  # crop cap of those conditions (dataset.max_seconds)
    seed: int
    use_masks: bool                  # objective.attention_mask
    sampler: Sampler
    null_embedding: Tensor           # [1, 1, H_enc] on the device: the CFG branch's condition
    prompts: List[Tuple[str, PromptSample, Sample]] = field(default_factory=list)  # (name, prompt, encoded)
    vae: Optional[Any] = None        # main process only; None = latents only
    log_audio: Optional[LogAudio] = None
    encode: Optional[Encode] = None  # the condition encoder, for data that carries its inputs

    @torch.no_grad()
    def render(self, decoder: nn.Module, run_dir: Path, step: int, acc: Accelerator) -> Dict[str, float]:
        """Sample every preview, write it (main process) and return the conditions' metrics."""
        was_training = decoder.training
        decoder.eval()
        try:
            latents, metrics = self._conditions(decoder, acc.device)
            for name, prompt, sample in self.prompts:
                latents[name] = render_prompt(decoder, sample, prompt.seed, self.sampler, self.null_embedding,
                                              acc.device, self.use_masks, self.encode)
        finally:
            decoder.train(was_training)
        if acc.is_main_process:
            self._write(run_dir, step, latents)
        return metrics

    def _conditions(self, decoder: nn.Module, device: torch.device) -> tuple[Dict[str, Tensor], Dict[str, float]]:
        count = min(self.num, len(self.source))
        if count < 1:
            return {}, {}
        first = SubsetSource(self.source, range(count))
        batch, lengths = ValidationSet(first, count, self.max_frames, self.seed).batch(range(count))
        batch = batch.to(device).float()
        if self.encode is not None:
            hidden, mask = self.encode(batch)
            batch = replace(batch, encoder_hidden_states=hidden.float(), encoder_attention_mask=mask)
        noise = fixed_noise(batch.keys, lengths, self.seed, "sample").to(device)
        s = self.sampler
        latents = sample_latents(decoder, batch, noise, s.steps, s.shift, self.use_masks, s.guidance_scale,
                                 self.null_embedding)
        real = batch.attention_mask.bool()
        metrics = {"samples/latent_std": float(latents[real].std()),
                   "samples/mse_to_target": float(((latents - batch.target_latents)[real] ** 2).mean())}
        return {key: latents[i, :n].cpu() for i, (key, n) in enumerate(zip(batch.keys, lengths))}, metrics

    def _write(self, run_dir: Path, step: int, latents: Dict[str, Tensor]) -> None:
        out = run_dir / "samples" / f"step-{step:08d}.safetensors"
        out.parent.mkdir(parents=True, exist_ok=True)
        tensors = {key: value.contiguous() for key, value in latents.items()}
        atomic_write_bytes(out, save_safetensors(tensors, metadata={"format": "pt", "step": str(step)}))
        if self.vae is None:
            return
        captions = {name: prompt.caption for name, prompt, _ in self.prompts}
        for key, latent in tensors.items():
            name = key if key in captions else file_name(key)
            audio = decode_latents(self.vae, latent)
            wav = run_dir / "samples" / f"step-{step:08d}" / f"{name}.wav"
            wav.parent.mkdir(parents=True, exist_ok=True)
            atomic_write_bytes(wav, wav_bytes(audio, vae_rate(self.vae)))
            if self.log_audio is not None:
                self.log_audio(step, f"samples/{name}", audio, vae_rate(self.vae), captions.get(key))


def prompt_dirs(text_encoder_path: Optional[str], vae_path: Optional[str], model_path: Optional[str],
                text_key: str, vae_key: str) -> Tuple[Path, Path]:
    """(text encoder dir, VAE dir) to render prompts with: the settings, else the official layout beside the DiT;
    ConfigError naming each missing directory and the key to set."""
    found, missing = [], []
    for setting, sibling, key, what in ((text_encoder_path, TEXT_ENCODER_DIR, text_key, "text encoder + tokenizer"),
                                        (vae_path, VAE_DIR, vae_key, "VAE")):
        path = sibling_dir(setting, model_path, sibling, key, f"the checkpoint's {what}")
        if path is None:
            where = (f"{Path(model_path).expanduser().parent / sibling} (beside model.path) does not exist"
                     if model_path is not None else "model.path is not set, so there is no default")
            missing.append(f"{what}: {where}; set {key}=<the checkpoint's {sibling}/>")
        found.append(path)
    if missing:
        raise ConfigError("Rendering text prompts needs these directories:\n  " + "\n  ".join(missing))
    return found[0], found[1]


def data_settings(dataset: Any) -> Optional[PreprocessConfig]:
    """The tokenization the training data was preprocessed with (its fingerprint's settings), so text prompts render
    the way the model saw its captions and lyrics: lyric format and token lengths; None = the preprocessing defaults
    (synthetic or legacy .pt data). Data written before preprocess.lyric_format existed used raw lyrics."""
    fp = read_fingerprint(dataset.path) if isinstance(dataset, PreprocessedDataset) else None
    if fp is None:
        return None
    settings = fp.get("settings") or {}
    known = {k: settings[k] for k in ("text_max_tokens", "lyric_max_tokens") if k in settings}
    return PreprocessConfig(input_dir="", output_dir="", lyric_format=settings.get("lyric_format", LyricFormat.raw),
                            **known)


def prompt_name(index: int, prompt: PromptSample) -> str:
    """prompt-<i>-<caption slug>: the prompt's file and logger name."""
    return f"prompt-{index}-{slug(prompt.caption)}"


def prompt_noise(seed: int, frames: int) -> Tensor:
    """[frames, 64] float32 starting noise from a CPU generator seeded by `seed` alone."""
    return torch.randn(frames, 64, generator=torch.Generator().manual_seed(int(seed)))


def render_prompt(decoder: Callable[..., Tensor], sample: Sample, seed: int, sampler: Sampler,
                  null_embedding: Optional[Tensor], device: Any, use_masks: bool = False,
                  encode: Optional[Encode] = None) -> Tensor:
    """[T, 64] float32 latents (CPU) sampled for one encoded prompt from its seed's noise with `sampler`; a prompt
    that carries the condition encoder's inputs is encoded first with `encode` (the encoders as they train now)."""
    batch = collate([sample]).to(device).float()
    if batch.encoder_hidden_states is None:
        hidden, mask = encode(batch)
        batch = replace(batch, encoder_hidden_states=hidden.float(), encoder_attention_mask=mask)
    noise = prompt_noise(seed, sample.target_latents.shape[0])[None].to(device)
    latents = sample_latents(decoder, batch, noise, sampler.steps, sampler.shift, use_masks, sampler.guidance_scale,
                             null_embedding)
    return latents[0].cpu()


def preview_problems(spec: SampleConfig, model_cfg: ModelConfig) -> List[str]:
    """train.samples settings that cannot work (with train.samples.every_epochs), each with its fix; needs no
    weights: the sampler settings for this variant, the number of conditions, and the text encoder and VAE
    directories that prompts need."""
    problems = []
    if spec.num < 0 or (spec.num == 0 and not spec.prompts):
        problems.append(f"train.samples.num={spec.num} must be >= 1 (or 0 with train.samples.prompts).")
    for check in (lambda: resolve_sampler(spec.sampler, model_cfg.is_turbo, "train.samples.sampler"),
                  lambda: spec.prompts and prompt_dirs(model_cfg.text_encoder_path, spec.vae_path, model_cfg.path,
                                                       *PROMPT_KEYS)):
        try:
            check()
        except ConfigError as err:
            problems.append(str(err))
    bad = [f"train.samples.prompts[{i}].duration={p.duration} must be > 0" for i, p in enumerate(spec.prompts)
           if not p.duration > 0]
    return problems + bad


def build_previews(spec: SampleConfig, model_cfg: ModelConfig, model: nn.Module, acc: Accelerator,
                   source: SampleSource, max_frames: int, seed: int, use_masks: bool,
                   log_audio: Optional[LogAudio], say: Callable[[str], None],
                   encode: Callable[[Path, Any], List[Sample]], condition: Optional[Encode] = None) -> Previews:
    """Resolve the sampler, find and load the VAE (main process), and have `encode(text_dir, vae)` encode the prompts
    once (main process; the result is broadcast). Refuses (ConfigError, on every process) what `preview_problems`
    reports."""
    problems = preview_problems(spec, model_cfg)
    if problems:
        raise ConfigError("\n".join(problems))
    sampler = resolve_sampler(spec.sampler, model_cfg.is_turbo, "train.samples.sampler")
    vae = load_sample_vae(spec, model_cfg.path) if acc.is_main_process else None
    where = vae_dir(spec.vae_path, model_cfg.path)
    say(f"samples: {sampler.describe()}; " + (f"latents decoded to audio with the VAE in {where}" if where is not None
                                              else "latents only (no VAE: set train.samples.vae_path)"))
    prompts: List[Tuple[str, PromptSample, Sample]] = []
    if spec.prompts:
        text_dir, _ = prompt_dirs(model_cfg.text_encoder_path, spec.vae_path, model_cfg.path, *PROMPT_KEYS)
        encoded = encode(text_dir, vae) if acc.is_main_process else None
        if acc.num_processes > 1:
            encoded = broadcast_object_list([encoded])[0]
        prompts = [(prompt_name(i, p), p, sample) for i, (p, sample) in enumerate(zip(spec.prompts, encoded))]
        how = ("tokenized once with the text encoder in {} (now freed), encoded at every preview by the encoders "
               "this run trains" if condition is not None else "encoded once with the text encoder in {} (now freed)")
        say(f"samples: {len(prompts)} text prompt(s) {how.format(text_dir)}, rendered at every preview: "
            + ", ".join(name for name, _, _ in prompts))
    null_embedding = model.null_condition_emb.detach().float().to(acc.device)
    return Previews(spec.num, source, max_frames, seed, use_masks, sampler, null_embedding, prompts, vae, log_audio,
                    condition)
