"""The frozen encoders of the official preprocessing chain (steps 2-5), loaded once, run per song.

    enc = Encoders.load(model_cfg, preprocess_cfg, hardware_cfg)
    tensors = enc.encode(clip, song, key)      # the tensors of one sample (preprocess.store), in preprocess.dtype
    enc.fingerprint(settings)                  # variant + the weight digests + settings

- VAE: diffusers `AutoencoderOobleck` (`<model.path>/../vae`). Audio is encoded in windows of `chunk_seconds` whose
  `overlap_seconds` on each side are encoded and discarded (official tiled encode). The windows' posterior
  parameters (mean, scale) are stitched and ONE sample `mean + std * noise` is drawn over the whole song from a CPU
  generator seeded by (preprocess.seed, song key): the latents do not depend on the chunking, the device, the order
  of the songs or on resuming, and equal `vae.encode(audio).latent_dist.sample(generator)` of the whole song.
- Text (model.text_encoder_path, default `<model.path>/../Qwen3-Embedding-0.6B`): the official SFT_GEN_PROMPT
  through the text encoder (`last_hidden_state`, called without an attention mask, as the official preprocessor
  does); the lyric text (`captions.lyric_text`, preprocess.lyric_format) tokenized, through its token embedding
  table only.
- Condition encoder: the DiT checkpoint's `encoder.*` with one zero timbre reference [1, 1, 64] (official trainers).
- context_latents = cat(silence_latent[:T], ones[T, 64]); silence_latent.pt comes from the DiT directory. Without one
  only model=tiny proceeds (zeros, recorded in the fingerprint as silence_latent="zeros"); real variants refuse.

preprocess.store picks what a sample holds for the condition (all keys in preprocess.dtype except the int64 ids):
    outputs   encoder_hidden_states [L, H_enc], encoder_attention_mask [L]       (the condition encoder's output)
    inputs    text_hidden_states [Lt, D_text], text_attention_mask [Lt], text_token_ids [Lt] int64,
              lyric_token_ids [Ll] int64, lyric_attention_mask [Ll], refer_audio_latents [1, 1, 64] zeros
              (what the condition encoder consumes; it is not loaded, and its weights are not in the fingerprint)
    both      the two sets
plus target_latents [T, 64], attention_mask [T], context_latents [T, 128] always.
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

from acestep_ft.config import ExportDtype, HardwareConfig, PreprocessConfig, StoreConditions, resolve_hardware
from acestep_ft.data.batch import INPUT_KEYS as BATCH_INPUT_KEYS, OPTIONAL_INPUT_KEYS
from acestep_ft.data.fingerprint import make_fingerprint, tensor_digest
from acestep_ft.data.v3_reader import FRAMES_PER_SECOND
from acestep_ft.errors import ConfigError, UserError
from acestep_ft.model import load_model
from acestep_ft.model.checkpoint_io import SILENCE_NAME, TEXT_ENCODER_DIR, VAE_DIR, condition_encoder_digest

from .audio import Clip
from .captions import Song, caption_prompt, lyric_padding, lyric_text

log = logging.getLogger(__name__)
LATENT_CHANNELS = 64
STORED = {ExportDtype.float32: torch.float32, ExportDtype.bfloat16: torch.bfloat16, ExportDtype.float16: torch.float16}
COMPUTE = {"no": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
TEXT_ENCODER_KEY = "model.text_encoder_path"
INPUT_KEYS = BATCH_INPUT_KEYS + OPTIONAL_INPUT_KEYS  # what preprocess.store=inputs|both writes


def song_seed(seed: int, key: str) -> int:
    """The latent-sampling seed of one song: a function of preprocess.seed and the song key only."""
    return int.from_bytes(hashlib.sha256(f"{seed}:{key}".encode()).digest()[:8], "little") & (2**63 - 1)


def component_paths(model_cfg: Any, pre: PreprocessConfig) -> tuple[Path, Path, Path]:
    """(DiT dir, VAE dir, text-encoder dir): the official layout puts vae/ and Qwen3-Embedding-0.6B/ beside the DiT."""
    if model_cfg.path is None:
        raise ConfigError("model.path is required: the DiT checkpoint directory (its condition encoder and "
                          "silence_latent.pt; vae/ and Qwen3-Embedding-0.6B/ beside it by default). Fix: "
                          "model.path=<checkpoints>/acestep-v15-turbo (or your DiT).")
    dit = Path(os.path.expanduser(model_cfg.path))
    vae = Path(os.path.expanduser(pre.vae_path)) if pre.vae_path else dit.parent / VAE_DIR
    text = (Path(os.path.expanduser(model_cfg.text_encoder_path)) if model_cfg.text_encoder_path
            else dit.parent / TEXT_ENCODER_DIR)
    missing = [f"{name}: {p} (set {knob})" for name, p, knob in
               [("DiT", dit, "model.path"), ("VAE", vae, "preprocess.vae_path"),
                ("text encoder", text, TEXT_ENCODER_KEY)] if not p.is_dir()]
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
    """VAE + text encoder + tokenizer + condition encoder (None with preprocess.store=inputs) + silence latent on one
    device, in one compute dtype."""

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
        dit, vae_dir, text_dir = component_paths(model_cfg, pre)
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
        tokenizer, text_model = load_text_encoder(text_dir, model_cfg.text_hidden_dim, TEXT_ENCODER_KEY,
                                                  model_cfg.text_encoder_adapter)
        condition_encoder, encoder_digest = None, None
        if pre.store != StoreConditions.inputs:  # the condition encoder runs only when its outputs are stored
            with loading("DiT", dit, "model.path=<an ACE-Step 1.5 DiT directory of this model variant>"):
                model = load_model(model_cfg, device="cpu", dtype=torch.float32)
            encoder_digest = condition_encoder_digest(model)
            condition_encoder = model.encoder.to(device=device, dtype=dtype).eval()
            del model  # the decoder is not needed
        silence, silence_label = load_silence(dit, model_cfg.variant)
        digests = {"condition_encoder": encoder_digest, "vae": tensor_digest(vae.state_dict()),
                   "text_encoder": tensor_digest(text_model.state_dict()), "tokenizer": tokenizer_digest(tokenizer),
                   "silence_latent": silence_label, "compute_dtype": str(dtype)[6:],
                   # encoder inputs do not depend on the DiT variant's weights: such data trains any variant
                   "variant": None if pre.store == StoreConditions.inputs else model_cfg.variant}
        vae, text_model = vae.to(device=device, dtype=dtype), text_model.to(device=device, dtype=dtype)
        return cls(vae, text_model, tokenizer, condition_encoder, silence, digests, pre, device, dtype)

    def fingerprint(self, settings: dict) -> dict:
        """The dataset fingerprint; with store=inputs its variant and condition-encoder digest are None (unknown)."""
        d = self.digests
        return make_fingerprint(d["variant"], d["condition_encoder"], d["vae"], d["text_encoder"], d["tokenizer"],
                                {**settings, "sample_rate": self.sample_rate, "silence_latent": d["silence_latent"],
                                 "compute_dtype": d["compute_dtype"]})

    def _tokens(self, text: str, max_length: int, padding: str) -> tuple[Tensor, Tensor]:
        """(ids [1, L] int64, mask [1, L] int64) on the device; L = max_length when padding="max_length"."""
        out = self.tokenizer(text, padding=padding, max_length=max_length, truncation=True, return_tensors="pt")
        return out.input_ids.to(self.device), out.attention_mask.to(self.device)

    @torch.no_grad()
    def encoder_inputs(self, song: Song, duration_s: float) -> dict[str, Tensor]:
        """What the condition encoder consumes for one song, batch of one, on the device (compute dtype; ids int64):
        text_token_ids / text_attention_mask [1, Lt], text_hidden_states [1, Lt, D], lyric_token_ids /
        lyric_attention_mask [1, Ll], lyric_hidden_states [1, Ll, D] (the ids through the embedding table),
        refer_audio_latents [1, 1, 64] zeros."""
        ids, text_mask = self._tokens(caption_prompt(song, duration_s), self.pre.text_max_tokens, "max_length")
        lyric_ids, lyric_mask = self._tokens(lyric_text(song, self.pre.lyric_format), self.pre.lyric_max_tokens,
                                             lyric_padding(self.pre.lyric_format))
        return {"text_token_ids": ids, "text_attention_mask": text_mask.to(self.dtype),
                "text_hidden_states": self.text_model(ids).last_hidden_state.to(self.dtype),
                "lyric_token_ids": lyric_ids, "lyric_attention_mask": lyric_mask.to(self.dtype),
                "lyric_hidden_states": self.text_model.get_input_embeddings()(lyric_ids).to(self.dtype),
                "refer_audio_latents": torch.zeros(1, 1, LATENT_CHANNELS, device=self.device, dtype=self.dtype)}

    @staticmethod
    def stored_inputs(inputs: dict[str, Tensor]) -> dict[str, Tensor]:
        """The INPUT_KEYS of `encoder_inputs` as a sample stores them, on the CPU: the batch axis dropped, the one
        reference kept as refer_audio_latents [R=1, Tr=1, 64]."""
        return {k: (inputs[k] if k == "refer_audio_latents" else inputs[k][0]).cpu() for k in INPUT_KEYS}

    @torch.no_grad()
    def run_condition_encoder(self, inputs: dict[str, Tensor]) -> tuple[Tensor, Tensor]:
        """(encoder_hidden_states [L, H_enc], encoder_attention_mask [L]) float32 on the CPU from `encoder_inputs`."""
        if self.condition_encoder is None:
            raise UserError("the condition encoder was not loaded (preprocess.store=inputs). Fix: "
                            "preprocess.store=outputs or both to store its outputs.")
        order = torch.zeros(1, device=self.device, dtype=torch.long)  # the one reference belongs to sample 0
        hidden, mask = self.condition_encoder(inputs["text_hidden_states"], inputs["text_attention_mask"],
                                              inputs["lyric_hidden_states"], inputs["lyric_attention_mask"],
                                              inputs["refer_audio_latents"], order)
        return hidden[0].float().cpu(), mask[0].float().cpu()

    def condition(self, song: Song, duration_s: float) -> tuple[Tensor, Tensor]:
        """(encoder_hidden_states [L, H_enc], encoder_attention_mask [L] float) for one song."""
        return self.run_condition_encoder(self.encoder_inputs(song, duration_s))

    def latents(self, clip: Clip, key: str) -> Tensor:
        """target_latents [T, 64] float32, sampled with the song's own seed."""
        params = vae_posterior(self.vae, clip.samples, self.chunk_frames, self.overlap_frames)
        return sample_latents(params, torch.Generator().manual_seed(song_seed(self.pre.seed, key)))

    def encode(self, clip: Clip, song: Song, key: str) -> dict[str, Tensor]:
        """The tensors of one sample (see the module docstring for preprocess.store), floats in preprocess.dtype,
        token ids int64."""
        target = self.latents(clip, key)
        t_len = target.shape[0]
        tensors = {"target_latents": target, "attention_mask": torch.ones(t_len)}
        inputs = self.encoder_inputs(song, clip.source_seconds)
        if self.pre.store != StoreConditions.inputs:
            tensors["encoder_hidden_states"], tensors["encoder_attention_mask"] = self.run_condition_encoder(inputs)
        tensors["context_latents"] = context_latents(self.silence, t_len)
        if self.pre.store != StoreConditions.outputs:
            tensors.update(self.stored_inputs(inputs))
        stored = STORED[self.pre.dtype]
        return {k: (v.to(stored) if v.is_floating_point() else v).contiguous() for k, v in tensors.items()}


def load_text_encoder(path: Path, text_hidden_dim: int, key: str, adapter: Optional[str] = None) -> tuple[Any, Any]:
    """(tokenizer, text model in float32 on the CPU) from a transformers directory; its width must be the condition
    encoder's input. `adapter` (model.text_encoder_adapter): a PEFT LoRA directory trained with mode.text_encoder=
    lora, merged into the weights. Errors name `key`, the setting that points at it."""
    from transformers import AutoModel, AutoTokenizer

    with loading("text encoder (transformers model + tokenizer)", path, f"{key}=<the checkpoint's text encoder>"):
        tokenizer = AutoTokenizer.from_pretrained(str(path))
        model = AutoModel.from_pretrained(str(path), dtype=torch.float32).eval()
    if adapter is not None:
        model = merge_text_adapter(model, Path(os.path.expanduser(adapter)))
    rows, width = model.get_input_embeddings().weight.shape
    if width != text_hidden_dim:
        raise ConfigError(f"{path}: hidden size {width}, but model.text_hidden_dim={text_hidden_dim} (the condition "
                          f"encoder's input). Fix: {key}=<the text encoder of this checkpoint family>.")
    if len(tokenizer) > rows:  # token ids must index the embedding table (lyric ids are embedded with it)
        raise ConfigError(f"{path}: the tokenizer has {len(tokenizer)} tokens but the text encoder's embedding table "
                          f"only {rows} rows. Fix: {key}=<a directory whose tokenizer and model belong together>.")
    return tokenizer, model


def merge_text_adapter(model: Any, adapter: Path) -> Any:
    """`model` with the PEFT adapter in `adapter` merged into its weights (a plain transformers model again)."""
    from peft import PeftModel

    if not (adapter / "adapter_config.json").is_file():
        raise ConfigError(f"model.text_encoder_adapter={adapter} is not a PEFT adapter directory (no "
                          "adapter_config.json). Fix: the text_encoder/ directory of a run's export/ trained with "
                          "mode.text_encoder=lora.")
    with loading("text-encoder adapter (PEFT)", adapter, "model.text_encoder_adapter=<a run's export/text_encoder/, "
                 "trained on this text encoder>"):
        merged = PeftModel.from_pretrained(model, str(adapter)).merge_and_unload()
    return merged.eval()


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
