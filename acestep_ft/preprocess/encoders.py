"""The frozen encoders of the official preprocessing chain (steps 2-5), loaded once, run per song.

    enc = Encoders.load(model_cfg, preprocess_cfg, hardware_cfg)
    tensors = enc.encode(clip, song, key)      # the 5 tensors of one .pt sample, in preprocess.dtype
    enc.fingerprint(settings)                  # variant + the four weight digests + settings

- VAE: diffusers `AutoencoderOobleck` (`<model.path>/../vae`). Audio is encoded in windows of `chunk_seconds` whose
  `overlap_seconds` on each side are encoded and discarded (official tiled encode). The windows' posterior
  parameters (mean, scale) are stitched and ONE sample `mean + std * noise` is drawn over the whole song from a CPU
  generator seeded by (preprocess.seed, song key): the latents do not depend on the chunking, the device, the order
  of the songs or on resuming, and equal `vae.encode(audio).latent_dist.sample(generator)` of the whole song.
- Text: the official SFT_GEN_PROMPT through the text encoder (`last_hidden_state`, called without an attention
  mask, as the official preprocessor does); lyrics through its token embedding table only.
- Condition encoder: the DiT checkpoint's `encoder.*` with one zero timbre reference [1, 1, 64] (official trainers).
- context_latents = cat(silence_latent[:T], ones[T, 64]); silence_latent.pt comes from the DiT directory. Without one
  only model=tiny proceeds (zeros, recorded in the fingerprint as silence_latent="zeros"); real variants refuse.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator, Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from acestep_ft.config import ExportDtype, HardwareConfig, PreprocessConfig, resolve_hardware
from acestep_ft.data.fingerprint import make_fingerprint, tensor_digest
from acestep_ft.data.v3_reader import FRAMES_PER_SECOND
from acestep_ft.errors import ConfigError, UserError
from acestep_ft.model import load_model
from acestep_ft.model.checkpoint_io import condition_encoder_digest

from .audio import Clip
from .captions import Song, caption_prompt, lyrics_text

log = logging.getLogger(__name__)
LATENT_CHANNELS = 64
SILENCE_NAME = "silence_latent.pt"
STORED = {ExportDtype.float32: torch.float32, ExportDtype.bfloat16: torch.bfloat16, ExportDtype.float16: torch.float16}
COMPUTE = {"no": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def song_seed(seed: int, key: str) -> int:
    """The latent-sampling seed of one song: a function of preprocess.seed and the song key only."""
    return int.from_bytes(hashlib.sha256(f"{seed}:{key}".encode()).digest()[:8], "little") & (2**63 - 1)


def component_paths(model_path: Optional[str], pre: PreprocessConfig) -> tuple[Path, Path, Path]:
    """(DiT dir, VAE dir, text-encoder dir): the official layout puts vae/ and Qwen3-Embedding-0.6B/ beside the DiT."""
    if model_path is None:
        raise ConfigError("model.path is required: the condition encoder's weights decide what the cached "
                          "encoder_hidden_states mean. Fix: model.path=<checkpoints>/acestep-v15-turbo (or your DiT).")
    dit = Path(os.path.expanduser(model_path))
    vae = Path(os.path.expanduser(pre.vae_path)) if pre.vae_path else dit.parent / "vae"
    text = (Path(os.path.expanduser(pre.text_encoder_path)) if pre.text_encoder_path
            else dit.parent / "Qwen3-Embedding-0.6B")
    missing = [f"{name}: {p} (set {knob})" for name, p, knob in
               [("DiT", dit, "model.path"), ("VAE", vae, "preprocess.vae_path"),
                ("text encoder", text, "preprocess.text_encoder_path")] if not p.is_dir()]
    if missing:
        raise ConfigError("Preprocessing needs these directories, not found:\n  " + "\n  ".join(missing))
    return dit, vae, text


def tokenizer_digest(tokenizer: Any) -> str:
    """sha256[:16] of what decides the token ids: the fast tokenizer's JSON (vocab, merges, normalizer, added tokens)
    without its run-time truncation/padding state, plus the pad token and padding side."""
    spec = json.loads(tokenizer.backend_tokenizer.to_str())
    spec.pop("truncation", None)
    spec.pop("padding", None)
    extra = [tokenizer.pad_token, tokenizer.padding_side]
    return hashlib.sha256(json.dumps([spec, extra], sort_keys=True).encode()).hexdigest()[:16]


def load_silence(dit: Path, variant: str) -> tuple[Optional[Tensor], str]:
    """([Ts, 64] float32 or None for zeros, fingerprint label) from the DiT directory's silence_latent.pt."""
    path = dit / SILENCE_NAME
    if not path.is_file():
        if variant != "tiny":
            raise UserError(f"{path} not found: context_latents are built from the checkpoint's silence latent. "
                            f"Fix: copy {SILENCE_NAME} from the official checkpoint directory into {dit}.")
        log.warning("%s not found: model=tiny uses zeros as the silence latent (fingerprint: silence_latent=zeros)",
                    path)
        return None, "zeros"
    raw = torch.load(path, map_location="cpu", weights_only=True)
    if raw.ndim != 3 or raw.shape[0] != 1 or LATENT_CHANNELS not in raw.shape[1:]:
        raise UserError(f"{path}: shape {list(raw.shape)}, expected [1, 64, Ts] (official) or [1, Ts, 64]. Fix: copy "
                        f"{SILENCE_NAME} from the official checkpoint directory.")
    silence = (raw[0].T if raw.shape[1] == LATENT_CHANNELS else raw[0]).float().contiguous()  # [Ts, 64]
    return silence, tensor_digest({"silence_latent": silence})


def context_latents(silence: Optional[Tensor], t_len: int) -> Tensor:
    """[T, 128] = cat(silence[:T] (tiled when T > Ts, as the official pads), ones[T, 64])."""
    if silence is None:
        source = torch.zeros(t_len, LATENT_CHANNELS)
    else:
        source = silence.repeat(-(-t_len // silence.shape[0]), 1)[:t_len]
    return torch.cat([source, torch.ones(t_len, LATENT_CHANNELS)], dim=-1)


@torch.no_grad()
def vae_posterior(vae: Any, audio: Tensor, chunk_frames: int, overlap_frames: int) -> Tensor:
    """Posterior parameters [2*64, T] (mean; pre-softplus scale) of stereo `audio` [2, S], T = S // hop.

    Windows of `chunk_frames` latent frames step by `chunk_frames - 2 * overlap_frames`; each window's first and last
    `overlap_frames` (where it has context) are discarded, so with an overlap wider than the encoder's receptive
    field the result equals encoding the whole song at once.
    """
    hop = int(vae.hop_length)
    device, dtype = next(vae.parameters()).device, next(vae.parameters()).dtype
    t_len = audio.shape[-1] // hop

    def encode(lo: int, hi: int) -> Tensor:
        return vae.encode(audio[None, :, lo:hi].to(device, dtype)).latent_dist.parameters[0].float().cpu()

    if t_len <= chunk_frames:
        return encode(0, audio.shape[-1])[:, :t_len]
    stride = chunk_frames - 2 * overlap_frames
    parts, start = [], 0
    while start < t_len:
        core = min(stride, t_len - start)
        lo = max(0, start - overlap_frames)
        hi = start + core + overlap_frames
        window = encode(lo * hop, audio.shape[-1] if hi >= t_len else hi * hop)
        parts.append(window[:, start - lo: start - lo + core])
        start += core
    return torch.cat(parts, dim=-1)


def sample_latents(params: Tensor, generator: torch.Generator) -> Tensor:
    """diffusers' OobleckDiagonalGaussianDistribution.sample on stitched parameters [128, T] -> [T, 64]."""
    mean, scale = params[None].chunk(2, dim=1)
    std = F.softplus(scale) + 1e-4
    noise = torch.randn(mean.shape, generator=generator, dtype=mean.dtype)
    return (mean + std * noise)[0].T.contiguous()


class Encoders:
    """VAE + text encoder + tokenizer + condition encoder + silence latent on one device, in one compute dtype."""

    def __init__(self, vae, text_model, tokenizer, condition_encoder, silence, digests: dict, pre, device, dtype):
        self.vae, self.text_model, self.tokenizer = vae, text_model, tokenizer
        self.condition_encoder, self.silence, self.digests = condition_encoder, silence, digests
        self.pre, self.device, self.dtype = pre, device, dtype
        self.sample_rate = int(vae.config.sampling_rate)
        self.chunk_frames = round(pre.chunk_seconds * FRAMES_PER_SECOND)
        self.overlap_frames = round(pre.overlap_seconds * FRAMES_PER_SECOND)

    @classmethod
    def load(cls, model_cfg: Any, pre: PreprocessConfig, hw: HardwareConfig) -> "Encoders":
        from diffusers import AutoencoderOobleck

        check_settings(pre)
        dit, vae_dir, text_dir = component_paths(model_cfg.path, pre)
        cuda = torch.cuda.is_available()
        if hw.device == "cuda" and not cuda:
            raise ConfigError("hardware.device=cuda but no CUDA GPU is visible: use hardware=cpu or hardware=auto.")
        on_cpu, precision = resolve_hardware(hw, cuda, cuda and torch.cuda.is_bf16_supported())
        device = torch.device("cpu" if on_cpu else "cuda")
        dtype = COMPUTE[precision]
        # Digests are taken from the weights as stored (loaded in float32 on the CPU), before the cast to the
        # compute dtype, so a bf16 CUDA run and an fp32 CPU run write the same fingerprint, and the condition-encoder
        # digest equals the one training computes from its float32 load.
        with loading("VAE (diffusers AutoencoderOobleck)", vae_dir, "preprocess.vae_path=<the checkpoint's vae/>"):
            vae = AutoencoderOobleck.from_pretrained(str(vae_dir), torch_dtype=torch.float32).eval()
        check_vae(vae, vae_dir)
        tokenizer, text_model = load_text_encoder(text_dir, model_cfg.text_hidden_dim, "preprocess.text_encoder_path")
        with loading("DiT", dit, "model.path=<an ACE-Step 1.5 DiT directory of this model variant>"):
            model = load_model(model_cfg, device="cpu", dtype=torch.float32)
        silence, silence_label = load_silence(dit, model_cfg.variant)
        digests = {"condition_encoder": condition_encoder_digest(model), "vae": tensor_digest(vae.state_dict()),
                   "text_encoder": tensor_digest(text_model.state_dict()), "tokenizer": tokenizer_digest(tokenizer),
                   "silence_latent": silence_label, "variant": model_cfg.variant, "compute_dtype": str(dtype)[6:]}
        condition_encoder = model.encoder.to(device=device, dtype=dtype).eval()
        del model  # the decoder is not needed
        vae, text_model = vae.to(device=device, dtype=dtype), text_model.to(device=device, dtype=dtype)
        return cls(vae, text_model, tokenizer, condition_encoder, silence, digests, pre, device, dtype)

    def fingerprint(self, settings: dict) -> dict:
        d = self.digests
        return make_fingerprint(d["variant"], d["condition_encoder"], d["vae"], d["text_encoder"], d["tokenizer"],
                                {**settings, "sample_rate": self.sample_rate, "silence_latent": d["silence_latent"],
                                 "compute_dtype": d["compute_dtype"]})

    def _tokens(self, text: str, max_length: int) -> tuple[Tensor, Tensor]:
        out = self.tokenizer(text, padding="max_length", max_length=max_length, truncation=True,
                             return_tensors="pt")
        return out.input_ids.to(self.device), out.attention_mask.to(self.device)

    @torch.no_grad()
    def condition(self, song: Song, duration_s: float) -> tuple[Tensor, Tensor]:
        """(encoder_hidden_states [L, H_enc], encoder_attention_mask [L] float) for one song."""
        ids, text_mask = self._tokens(caption_prompt(song, duration_s), self.pre.text_max_tokens)
        text_hidden = self.text_model(ids).last_hidden_state.to(self.dtype)           # [1, Lt, D]
        lyric_ids, lyric_mask = self._tokens(lyrics_text(song), self.pre.lyric_max_tokens)
        lyric_hidden = self.text_model.get_input_embeddings()(lyric_ids).to(self.dtype)  # [1, Ll, D]
        refer = torch.zeros(1, 1, LATENT_CHANNELS, device=self.device, dtype=self.dtype)
        order = torch.zeros(1, device=self.device, dtype=torch.long)
        hidden, mask = self.condition_encoder(text_hidden, text_mask.to(self.dtype), lyric_hidden,
                                              lyric_mask.to(self.dtype), refer, order)
        return hidden[0].float().cpu(), mask[0].float().cpu()

    def latents(self, clip: Clip, key: str) -> Tensor:
        """target_latents [T, 64] float32, sampled with the song's own seed."""
        params = vae_posterior(self.vae, clip.samples, self.chunk_frames, self.overlap_frames)
        return sample_latents(params, torch.Generator().manual_seed(song_seed(self.pre.seed, key)))

    def encode(self, clip: Clip, song: Song, key: str) -> dict[str, Tensor]:
        """The five tensors of one sample (official .pt keys), in preprocess.dtype."""
        target = self.latents(clip, key)
        hidden, mask = self.condition(song, clip.source_seconds)
        t_len = target.shape[0]
        tensors = {"target_latents": target, "attention_mask": torch.ones(t_len),
                   "encoder_hidden_states": hidden, "encoder_attention_mask": mask,
                   "context_latents": context_latents(self.silence, t_len)}
        stored = STORED[self.pre.dtype]
        return {k: v.to(stored).contiguous() for k, v in tensors.items()}


def load_text_encoder(path: Path, text_hidden_dim: int, key: str) -> tuple[Any, Any]:
    """(tokenizer, text model in float32 on the CPU) from a transformers directory; its width must be the condition
    encoder's input. Errors name `key`, the setting that points at it."""
    from transformers import AutoModel, AutoTokenizer

    with loading("text encoder (transformers model + tokenizer)", path, f"{key}=<the checkpoint's text encoder>"):
        tokenizer = AutoTokenizer.from_pretrained(str(path))
        model = AutoModel.from_pretrained(str(path), dtype=torch.float32).eval()
    width = model.get_input_embeddings().weight.shape[1]
    if width != text_hidden_dim:
        raise ConfigError(f"{path}: hidden size {width}, but model.text_hidden_dim={text_hidden_dim} (the condition "
                          f"encoder's input). Fix: {key}=<the text encoder of this checkpoint family>.")
    return tokenizer, model


@contextmanager
def loading(what: str, path: Path, fix: str) -> Iterator[None]:
    """Weights that cannot be loaded (missing or broken files, another architecture) as a UserError naming the
    directory and the fix."""
    try:
        yield
    except (OSError, ValueError) as exc:
        raise UserError(f"{path}: cannot load the {what}: {str(exc).rstrip('.')}. Fix: {fix}.") from exc


def check_settings(pre: PreprocessConfig) -> None:
    """Refuse settings that cannot work, each with its fix, before any weights load."""
    chunk, overlap = round(pre.chunk_seconds * FRAMES_PER_SECOND), round(pre.overlap_seconds * FRAMES_PER_SECOND)
    problems = []
    if overlap < 0 or chunk - 2 * overlap < 1:
        problems.append(f"preprocess.chunk_seconds={pre.chunk_seconds} must exceed 2 x overlap_seconds="
                        f"{pre.overlap_seconds} (each window keeps chunk - 2 x overlap).")
    if pre.max_seconds <= 0 or pre.text_max_tokens < 1 or pre.lyric_max_tokens < 1 or pre.shard_mb < 1:
        problems.append("preprocess.max_seconds, text_max_tokens, lyric_max_tokens and shard_mb must be positive.")
    if problems:
        raise ConfigError("Preprocessing settings:\n  " + "\n  ".join(problems))


def check_vae(vae: Any, where: Path) -> None:
    rate, hop = int(vae.config.sampling_rate), int(vae.hop_length)
    channels = int(vae.config.decoder_input_channels)
    if rate != FRAMES_PER_SECOND * hop or channels != LATENT_CHANNELS:
        raise ConfigError(f"{where}: sampling_rate {rate} / hop {hop} = {rate / hop:g} latent frames/s with {channels} "
                          f"channels; ACE-Step latents are {FRAMES_PER_SECOND} frames/s x {LATENT_CHANNELS} (the "
                          "ACE-Step VAE: 48 kHz, downsampling [2, 4, 4, 6, 10]). Fix: preprocess.vae_path=<its vae/>.")
