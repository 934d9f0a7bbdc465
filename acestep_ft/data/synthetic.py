"""Deterministic synthetic samples with structure a small diffusion transformer can learn.

Each sample is described by a few parameters: for each of `NUM_COMPONENTS` sinusoids a frequency, a phase and an
amplitude. The target latents are those sinusoids over frames, mixed into 64 channels by one fixed low-rank matrix,
plus a little noise, at roughly unit variance per channel. The condition (`encoder_hidden_states`) is a fixed random
projection of the same parameters (plus a fixed per-token pattern and a little noise), so the condition tells the
model what to generate. On the tiny model a full fine-tune takes the flow-matching loss from ~1.9 to ~0.7 in 600
steps; LoRA on its frozen random base levels off near 1.55 (the frozen output projection bounds its output scale).

With `cfg.conditions=encoder_inputs` a sample carries the condition encoder's inputs instead, built the same way:
caption states `text_hidden_states` = another fixed projection of the parameters + token pattern + noise, lyric token
ids that spell the parameters (each id a quantised parameter, so the lyrics are informative), and the official
trainer's zero timbre reference [1, 1, 64]. Targets and context latents are those of the encoder_outputs variant of
the same sample, bit for bit (the inputs' extra fixed parts come from a generator of their own, and each sample's
inputs noise is drawn after everything the outputs variant draws up to its target).

Everything depends only on `cfg.seed` (and the widths), never on the global RNG. Sample `i` also does not depend on
`cfg.num_samples`: the fixed parts come from one generator and each sample from its own.
`context_latents` follow the official text2music layout: cat(silence-like source [T, 64], ones [T, 64]).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from acestep_ft.config import Conditions, SyntheticDataset
from acestep_ft.data.batch import ConditionWidths, Sample, encoder_width_of, inputs_widths, sample_from

LATENT_CHANNELS = 64
NUM_COMPONENTS = 3
FREQ_RANGE = (0.02, 0.12)  # cycles per latent frame: smooth at 25 Hz, a few periods per sample
AMP_RANGE = (0.5, 1.5)
TARGET_NOISE = 0.05
CONDITION_NOISE = 0.01
ID_RANGE = 3.0  # lyric ids quantise each normalised parameter over [-ID_RANGE, ID_RANGE]
_SEED_MOD = 2**63


def _generator(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed % _SEED_MOD)


def _uniform(g: torch.Generator, n: int, lo: float, hi: float) -> Tensor:
    return lo + (hi - lo) * torch.rand(n, generator=g)


def _check(cfg: SyntheticDataset, encoder_width: int, inputs: ConditionWidths | None) -> None:
    problems = []
    if cfg.num_samples < 1:
        problems.append(f"dataset.num_samples={cfg.num_samples} must be >= 1")
    if cfg.min_frames < 1:
        problems.append(f"dataset.min_frames={cfg.min_frames} must be >= 1")
    if cfg.max_frames < cfg.min_frames:
        problems.append(f"dataset.max_frames={cfg.max_frames} must be >= dataset.min_frames={cfg.min_frames}")
    if cfg.condition_length < 1:
        problems.append(f"dataset.condition_length={cfg.condition_length} must be >= 1")
    if encoder_width < 1:
        problems.append(f"encoder_width={encoder_width} must be >= 1 (the model's encoder_hidden_size)")
    if inputs is not None:
        for name, value in (("dataset.text_length", cfg.text_length), ("dataset.lyric_length", cfg.lyric_length),
                            ("text width", inputs.text), ("vocab", inputs.vocab)):
            if value < 1:
                problems.append(f"{name}={value} must be >= 1")
    if problems:
        raise ValueError("synthetic dataset: " + "; ".join(problems))


class _FixedParts:
    """Dataset-wide tensors drawn once from `seed`: channel mixing, condition projection, silence source."""

    def __init__(self, seed: int, max_frames: int, condition_length: int, encoder_width: int) -> None:
        g = _generator(seed * 1_000_003)
        k, c = NUM_COMPONENTS, LATENT_CHANNELS
        mix = torch.randn(k, c, generator=g)                                        # [K, 64]
        # Analytic unit variance per channel: Var(a sin(.)) = E[a^2] / 2 for a ~ U[lo, hi], phase uniform.
        lo, hi = AMP_RANGE
        component_var = ((hi - lo) ** 2 / 12 + ((lo + hi) / 2) ** 2) / 2
        channel_var = (mix**2).sum(0) * component_var                             # [64]
        self.mix = mix * torch.sqrt((1 - TARGET_NOISE**2) / channel_var)            # [K, 64]
        num_params = 4 * k
        self.proj = torch.randn(num_params, encoder_width, generator=g) / math.sqrt(num_params)  # [P, H]
        self.token_pattern = 0.1 * torch.randn(condition_length, encoder_width, generator=g)     # [L, H]
        offset = 0.5 * torch.randn(1, c, generator=g)                               # [1, 64]
        self.silence = offset + 0.05 * torch.randn(max_frames, c, generator=g)      # [max_frames, 64]


class _InputParts:
    """Dataset-wide tensors of encoder_inputs samples, from a generator of their own (the outputs parts stay as
    they are): the caption projection and token pattern."""

    def __init__(self, seed: int, text_length: int, text_width: int) -> None:
        g = _generator(seed * 1_000_003 + 1)
        num_params = 4 * NUM_COMPONENTS
        self.proj = torch.randn(num_params, text_width, generator=g) / math.sqrt(num_params)  # [P, D]
        self.token_pattern = 0.1 * torch.randn(text_length, text_width, generator=g)          # [Lt, D]


def lyric_ids(params: Tensor, length: int, vocab: int) -> Tensor:
    """[length] int64 ids in [0, vocab) spelling the normalised parameters [P]: position j holds parameter
    p = j mod P quantised to one of vocab // P levels, offset by p (so each parameter has ids of its own)."""
    num_params = params.shape[0]
    levels = max(1, vocab // num_params)
    p = torch.arange(length) % num_params                                           # [Ll]
    level = ((params[p] + ID_RANGE) / (2 * ID_RANGE) * levels).floor().clamp(0, levels - 1).long()
    return (p * levels + level) % vocab


def _length_and_generator(i: int, cfg: SyntheticDataset) -> tuple[int, torch.Generator]:
    """Sample i's T (the first draw of its generator) and the generator, ready for the rest of the sample."""
    g = _generator(cfg.seed * 1_000_003 + 7919 * (i + 1))
    return int(torch.randint(cfg.min_frames, cfg.max_frames + 1, (1,), generator=g)), g


def synthetic_lengths(cfg: SyntheticDataset) -> list[int]:
    """T of every sample `make_synthetic_samples` makes, without making them."""
    return [_length_and_generator(i, cfg)[0] for i in range(cfg.num_samples)]


def synthetic_condition_length(cfg: SyntheticDataset) -> int:
    """The condition length of every sample `make_synthetic_samples` makes (what `cond_lengths` reports):
    condition_length, or for encoder_inputs lyric_length + 1 reference + text_length."""
    if cfg.conditions == Conditions.encoder_inputs:
        return cfg.lyric_length + 1 + cfg.text_length
    return cfg.condition_length


def _make_one(i: int, cfg: SyntheticDataset, fixed: _FixedParts, encoder_width: int,
              inputs: tuple[_InputParts, ConditionWidths] | None) -> Sample:
    t_len, g = _length_and_generator(i, cfg)
    k = NUM_COMPONENTS
    freq = _uniform(g, k, *FREQ_RANGE)                                              # [K]
    phase = _uniform(g, k, 0.0, 2 * math.pi)                                        # [K]
    amp = _uniform(g, k, *AMP_RANGE)                                                # [K]

    frames = torch.arange(t_len, dtype=torch.float32)[:, None]                      # [T, 1]
    waves = amp * torch.sin(2 * math.pi * freq * frames + phase)                    # [T, K]
    target = waves @ fixed.mix + TARGET_NOISE * torch.randn(t_len, LATENT_CHANNELS, generator=g)  # [T, 64]

    # Parameters scaled to roughly zero mean / unit variance before the projection.
    f_lo, f_hi = FREQ_RANGE
    a_lo, a_hi = AMP_RANGE
    params = torch.cat(
        [
            (freq - (f_lo + f_hi) / 2) / ((f_hi - f_lo) / math.sqrt(12)),
            math.sqrt(2) * torch.sin(phase),
            math.sqrt(2) * torch.cos(phase),
            (amp - (a_lo + a_hi) / 2) / ((a_hi - a_lo) / math.sqrt(12)),
        ]
    )                                                                               # [P]
    context = torch.cat([fixed.silence[:t_len], torch.ones(t_len, LATENT_CHANNELS)], dim=-1)  # [T, 128]
    tensors = {"target_latents": target.float().contiguous(), "context_latents": context.float().contiguous(),
               "attention_mask": torch.ones(t_len, dtype=torch.float32)}
    if inputs is None:
        tensors.update(_outputs_condition(params, g, cfg, fixed, encoder_width))
    else:
        tensors.update(_inputs_condition(params, g, cfg, *inputs))
    return sample_from(f"synthetic_{i:05d}", tensors)


def _outputs_condition(params: Tensor, g: torch.Generator, cfg: SyntheticDataset, fixed: _FixedParts,
                       encoder_width: int) -> dict[str, Tensor]:
    """encoder_hidden_states [L, H] (projection + token pattern + noise) and its all-ones mask [L]."""
    length = cfg.condition_length
    cond = (params @ fixed.proj)[None, :] + fixed.token_pattern                     # [L, H]
    cond = cond + CONDITION_NOISE * torch.randn(length, encoder_width, generator=g)
    return {"encoder_hidden_states": cond.float().contiguous(),
            "encoder_attention_mask": torch.ones(length, dtype=torch.float32)}


def _inputs_condition(params: Tensor, g: torch.Generator, cfg: SyntheticDataset, parts: _InputParts,
                      widths: ConditionWidths) -> dict[str, Tensor]:
    """The condition encoder's inputs: caption states [Lt, D] and token ids [Lt] (spelling the parameters in another
    order than the lyrics; what mode.text_encoder=lora runs the text encoder on), lyric ids [Ll], one zero reference
    [1, 1, 64]."""
    text = (params @ parts.proj)[None, :] + parts.token_pattern                    # [Lt, D]
    text = text + CONDITION_NOISE * torch.randn(cfg.text_length, widths.text, generator=g)
    return {"text_hidden_states": text.float().contiguous(),
            "text_attention_mask": torch.ones(cfg.text_length, dtype=torch.float32),
            "text_token_ids": lyric_ids(params.flip(0), cfg.text_length, widths.vocab),
            "lyric_token_ids": lyric_ids(params, cfg.lyric_length, widths.vocab),
            "lyric_attention_mask": torch.ones(cfg.lyric_length, dtype=torch.float32),
            "refer_audio_latents": torch.zeros(1, 1, LATENT_CHANNELS)}


def make_synthetic_samples(cfg: SyntheticDataset, widths: int | ConditionWidths) -> list[Sample]:
    """`cfg.num_samples` samples: T uniform in [min_frames, max_frames], carrying the condition set `cfg.conditions`.

    `widths`: H_enc (an int; encoder_outputs only) or ConditionWidths (required for encoder_inputs). Shapes (float32
    unless noted): target_latents [T, 64], attention_mask [T] ones, context_latents [T, 128]; encoder_outputs:
    encoder_hidden_states [condition_length, H_enc], encoder_attention_mask ones; encoder_inputs: text_hidden_states
    [text_length, D_text], text_attention_mask ones, text_token_ids [text_length] and lyric_token_ids [lyric_length]
    int64 in [0, vocab),
    lyric_attention_mask ones, refer_audio_latents zeros [1, 1, 64].
    """
    encoder_width = encoder_width_of(widths)
    inputs = None
    if cfg.conditions == Conditions.encoder_inputs:
        inputs = inputs_widths(widths, "synthetic dataset")
    _check(cfg, encoder_width, inputs)
    fixed = _FixedParts(cfg.seed, cfg.max_frames, cfg.condition_length, encoder_width)
    parts = (_InputParts(cfg.seed, cfg.text_length, inputs.text), inputs) if inputs is not None else None
    return [_make_one(i, cfg, fixed, encoder_width, parts) for i in range(cfg.num_samples)]
