"""Every knob of acestep-ft, as typed dataclasses registered in Hydra's ConfigStore.

This file is the one place to read all settings. YAML files under `conf/` only list what differs from the
defaults below. A field that does not exist (`mode.rnak=4`) or belongs to another option of its group
(`mode=full mode.rank=4`) is a Hydra error before any work starts.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any, ClassVar, List, Optional

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING


# Choices are StrEnums (OmegaConf validates them; they compare equal to their string values).
class AttnImplementation(StrEnum):
    sdpa = "sdpa"
    eager = "eager"
    flex = "flex"


class FrozenDtype(StrEnum):
    auto = "auto"
    float32 = "float32"
    bfloat16 = "bfloat16"
    float16 = "float16"


class Conditions(StrEnum):
    encoder_outputs = "encoder_outputs"
    encoder_inputs = "encoder_inputs"


class StoreConditions(StrEnum):
    outputs = "outputs"
    inputs = "inputs"
    both = "both"


class TextEncoderTraining(StrEnum):
    frozen = "frozen"
    lora = "lora"


class LyricFormat(StrEnum):
    raw = "raw"
    official_template = "official_template"


class DataFormat(StrEnum):
    auto = "auto"
    pt = "pt"
    v3_sharded = "v3_sharded"


class ChecksumPolicy(StrEnum):
    always = "always"
    first_read = "first_read"
    never = "never"


class CachePolicy(StrEnum):
    none = "none"
    mmap = "mmap"
    ram_lru = "ram_lru"
    auto = "auto"


class Schedule(StrEnum):
    cosine = "cosine"
    constant = "constant"


class Device(StrEnum):
    auto = "auto"
    cpu = "cpu"
    cuda = "cuda"


class MixedPrecision(StrEnum):
    auto = "auto"
    no = "no"
    bf16 = "bf16"
    fp16 = "fp16"


class Distributed(StrEnum):
    ddp = "ddp"
    fsdp = "fsdp"
    deepspeed = "deepspeed"


class TrainModule(StrEnum):
    decoder = "decoder"
    condition_encoder = "condition_encoder"


class ExportDtype(StrEnum):
    float32 = "float32"
    bfloat16 = "bfloat16"
    float16 = "float16"


class PreflightPolicy(StrEnum):
    auto = "auto"
    refuse = "refuse"
    rewrite = "rewrite"
    warn = "warn"


class LoggerBackend(StrEnum):
    none = "none"
    wandb = "wandb"
    tensorboard = "tensorboard"


class TimestepKind(StrEnum):
    logit_normal = "logit_normal"
    turbo_discrete = "turbo_discrete"


class NonfinitePolicy(StrEnum):
    halt = "halt"
    skip = "skip"


@dataclass
class ModelConfig:
    """ACE-Step 1.5 architecture. Field names follow the official `config.json` (AceStepConfig)."""

    variant: str = MISSING
    """Name of the variant: tiny, turbo, base, sft, xl_turbo, xl_base, xl_sft."""
    path: Optional[str] = None
    """Official checkpoint directory (config.json + model.safetensors). None = random init (tiny only)."""
    hidden_size: int = 2048
    """DiT width."""
    intermediate_size: int = 6144
    """DiT SwiGLU width."""
    num_hidden_layers: int = 24
    """Number of DiT layers."""
    num_attention_heads: int = 16
    """DiT query heads."""
    num_key_value_heads: int = 8
    """DiT key/value heads (grouped-query attention)."""
    head_dim: int = 128
    """Per-head width."""
    encoder_hidden_size: Optional[int] = None
    """Condition-encoder width; None = hidden_size (2B). XL uses 2048."""
    encoder_intermediate_size: Optional[int] = None
    """Condition-encoder SwiGLU width; None = intermediate_size."""
    encoder_num_attention_heads: Optional[int] = None
    """Condition-encoder query heads; None = num_attention_heads."""
    encoder_num_key_value_heads: Optional[int] = None
    """Condition-encoder key/value heads; None = num_key_value_heads."""
    timbre_special_token: bool = False
    """Timbre encoder prepends its CLS `special_token` (XL) instead of reading frame 0 (2B)."""
    in_channels: int = 192
    """DiT input channels: 64 x_t + 64 source latents + 64 chunk mask."""
    audio_acoustic_hidden_dim: int = 64
    """VAE latent channels."""
    patch_size: int = 2
    """Latent frames per DiT token (25 Hz -> 12.5 tokens/s)."""
    text_hidden_dim: int = 1024
    """Text-encoder (Qwen3-Embedding-0.6B) width."""
    text_vocab_size: int = 151669
    """Text-encoder vocabulary (Qwen3-Embedding-0.6B: 151 669 tokens): lyric token ids of encoder_inputs data must be
    below it; the size of the random lyric embedding table of a random-init model (model.path None)."""
    text_encoder_path: Optional[str] = None
    """Text encoder + tokenizer directory (transformers Qwen3-Embedding-0.6B) for preprocessing, text prompts and the
    lyric embedding table of encoder_inputs data; None = <model.path>/../Qwen3-Embedding-0.6B (the official
    checkpoint layout)."""
    text_encoder_adapter: Optional[str] = None
    """A trained text-encoder LoRA (a PEFT adapter directory: a run's export/text_encoder/, written with
    mode.text_encoder=lora) merged into the text encoder wherever it is loaded: preprocessing, text prompts of
    previews and `python -m acestep_ft.generate`. None = the text encoder as it is."""
    timbre_hidden_dim: int = 64
    """Reference-audio latent channels."""
    timbre_fix_frame: int = 750
    """Reference-audio frames (30 s at 25 Hz)."""
    num_lyric_encoder_hidden_layers: int = 8
    """Lyric encoder layers."""
    num_timbre_encoder_hidden_layers: int = 4
    """Timbre encoder layers."""
    num_attention_pooler_hidden_layers: int = 2
    """Layers of the audio tokenizer's pooler and of the detokenizer."""
    pool_window_size: int = 5
    """Latent frames pooled into one 5 Hz token."""
    fsq_dim: int = 2048
    """FSQ projection width."""
    fsq_input_levels: List[int] = field(default_factory=lambda: [8, 8, 8, 5, 5, 5])
    """FSQ levels per dimension (codebook 64 000)."""
    fsq_input_num_quantizers: int = 1
    """Residual FSQ quantizers."""
    rope_theta: float = 1_000_000.0
    """RoPE base."""
    max_position_embeddings: int = 32768
    """RoPE table length."""
    use_sliding_window: bool = True
    """Even layers use a band mask of `sliding_window` tokens."""
    sliding_window: int = 128
    """Band half-width in tokens for sliding layers."""
    rms_norm_eps: float = 1e-6
    """RMSNorm epsilon."""
    timestep_mu: float = -0.4
    """Logit-normal timestep mean used in training."""
    timestep_sigma: float = 1.0
    """Logit-normal timestep std used in training."""
    is_turbo: bool = False
    """CFG-distilled turbo variant (metadata written into exported config.json)."""
    model_version: str = "base"
    """Official model_version string written into exported config.json."""
    attn_implementation: AttnImplementation = AttnImplementation.sdpa
    """Attention kernel: sdpa = torch SDPA (sliding-window layers pass a dense band mask); eager = explicit softmax
    in fp32 (the official eager path); flex = FlexAttention with a block-sparse sliding-window mask (compiled on CUDA,
    so band layers skip the blocks outside the window)."""
    frozen_dtype: FrozenDtype = FrozenDtype.auto
    """dtype of the weights training never updates (the frozen base under LoRA, the condition encoder, tokenizer and
    detokenizer); trained weights and adapters stay float32 masters. auto = bfloat16 on a CUDA device with autocast,
    float32 otherwise (a non-float32 frozen base needs hardware.mixed_precision bf16 or fp16)."""


@dataclass
class TextLora:
    """A PEFT LoRA on the Qwen3 text encoder (mode.text_encoder=lora)."""

    rank: int = 8
    """LoRA rank r."""
    alpha: float = 16.0
    """LoRA alpha; the update is scaled by alpha / rank."""
    target_modules: List[str] = field(default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj"])
    """Module-name suffixes matched inside the text encoder (PEFT semantics; Qwen3: q/k/v/o_proj, gate/up/down_proj)."""
    dropout: float = 0.0
    """Dropout on the LoRA input."""


@dataclass
class TextEncoderMode:
    """What every mode shares about the text encoder (Qwen3-Embedding-0.6B, which turns the caption prompt into the
    condition encoder's text input)."""

    text_encoder: TextEncoderTraining = TextEncoderTraining.frozen
    """frozen: the caption's text hidden states come from the data as stored. lora: a LoRA (mode.text_lora) on the
    text encoder trains with the rest; every step runs the text encoder on the caption's token ids (needs
    dataset.conditions=encoder_inputs on data with text_token_ids: preprocess.store=inputs or both). The adapter is
    saved beside the trained weights as text_encoder/ (a PEFT directory; model.text_encoder_adapter uses it)."""
    text_lora: TextLora = field(default_factory=TextLora)
    """The text-encoder LoRA (with text_encoder=lora)."""


@dataclass
class AdapterMode(TextEncoderMode):
    """What every adapter mode shares: where adapters go on the DiT decoder, their size, and where they start."""

    rank: int = 64
    """Adapter rank r (LoKr: the rank of the decomposed Kronecker factor(s); a factor too small to gain from a
    decomposition is kept full)."""
    alpha: float = 128.0
    """Adapter alpha; the update is scaled by alpha / rank (alpha / sqrt(rank) with LoRA's use_rslora)."""
    target_modules: List[str] = field(default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj"])
    """Module-name suffixes matched inside the decoder (PEFT semantics): q_proj hits self_attn and cross_attn; self_attn.q_proj only self-attention; add gate_proj, up_proj, down_proj for the MLP."""
    init_adapter: Optional[str] = None
    """Start from this trained adapter (a PEFT adapter directory or a ComfyUI-layout .safetensors) instead of fresh
    weights: its type, targets and shapes must match this mode; the optimizer, schedule and step start fresh
    (train.resume continues an interrupted run instead)."""


@dataclass
class LoraMode(AdapterMode):
    """Train a PEFT LoRA adapter on the DiT decoder; everything else frozen."""

    name: ClassVar[str] = "lora"
    dropout: float = 0.1
    """Dropout on the LoRA input."""
    use_dora: bool = False
    """DoRA: also train a per-output-row magnitude (weight-decomposed LoRA; slower, more memory)."""
    use_rslora: bool = False
    """rsLoRA: scale the update by alpha / sqrt(rank) instead of alpha / rank (keeps high ranks stable)."""


@dataclass
class LokrMode(AdapterMode):
    """Train a PEFT LoKr (Kronecker-product) adapter on the DiT decoder; everything else frozen."""

    name: ClassVar[str] = "lokr"
    decompose_both: bool = False
    """Also decompose the left (smaller) Kronecker factor into two low-rank matrices."""
    decompose_factor: int = -1
    """Kronecker factorization of each dimension: -1 = the most balanced split, n = split off a factor of n."""
    rank_dropout: float = 0.0
    """Dropout on the rank of the update, per training step."""
    module_dropout: float = 0.0
    """Probability of leaving a module's update out in a training step."""


@dataclass
class LohaMode(AdapterMode):
    """Train a PEFT LoHa (Hadamard product of two low-rank pairs) adapter on the DiT decoder; everything else frozen."""

    name: ClassVar[str] = "loha"
    rank: int = 32
    alpha: float = 32.0
    rank_dropout: float = 0.0
    """Dropout on the rank of the update, per training step."""
    module_dropout: float = 0.0
    """Probability of leaving a module's update out in a training step."""


@dataclass
class UnfreezeStage:
    """Weights of one module (optionally a name-pattern subset) that start training at a step or epoch."""

    module: TrainModule = TrainModule.decoder
    """decoder, or condition_encoder (needs dataset.conditions=encoder_inputs: data holding the encoder's outputs
    would never give its weights a gradient)."""
    pattern: str = ""
    """Regex searched in parameter names relative to the module (decoder: layers\\.(2[0-3])\\.; condition_encoder:
    lyric_encoder, timbre_encoder, text_projector); empty = all of it."""
    at_step: int = 0
    """First optimizer step (0-based count of steps done) at which these weights train."""
    at_epoch: Optional[int] = None
    """Start at this epoch instead (converted with the sampler's batches per epoch); overrides at_step."""


@dataclass
class FullMode(TextEncoderMode):
    """Train every weight of the DiT decoder; condition encoder, tokenizer and detokenizer frozen."""

    name: ClassVar[str] = "full"
    i_understand_vram_risk: bool = False
    """Full fine-tuning needs ~4x the weights in memory; set true to confirm."""
    unfreeze: List[UnfreezeStage] = field(default_factory=list)
    """Staged unfreezing: which weights train from when. Empty = the whole decoder from step 0. Given, only the
    listed weights train, each from its stage's start; LR multipliers come from optim.param_groups."""


@dataclass
class DatasetConfig:
    """What every dataset option has; each option below adds its own fields (a field of another option is an error)."""

    kind: ClassVar[str] = ""
    shuffle: bool = True
    """Shuffle sample order each epoch (seeded by train.seed and the epoch)."""
    max_seconds: Optional[float] = None
    """Randomly crop longer clips to this many seconds (deterministic per seed, epoch and sample); None = whole clips."""
    bucket_seconds: float = 10.0
    """Width of the length buckets in seconds; a batch holds clips of one bucket (less padding); 0 = no bucketing."""
    val_fraction: float = 0.0
    """Share of the samples held out for validation (chosen by a hash of each sample key, so the split is stable
    when samples are added); 0 = no validation split."""
    worst_case_first: bool = False
    """Make the first batch one of the longest clips, so an out-of-memory shows at step 1, not hours in."""
    conditions: Conditions = Conditions.encoder_outputs
    """What a sample holds for the condition: encoder_outputs = the condition encoder's output (encoder_hidden_states,
    as the official and Side-Step preprocessors write it); encoder_inputs = what the condition encoder consumes
    (caption text-encoder states, lyric token ids, timbre reference latents), so the encoder runs in every training
    step and can train (mode.unfreeze with module=condition_encoder)."""


@dataclass
class SyntheticDataset(DatasetConfig):
    """Deterministic generated data, learnable by the tiny model (no files needed)."""

    kind: ClassVar[str] = "synthetic"
    num_samples: int = 32
    """Number of samples."""
    min_frames: int = 24
    """Shortest latent length (frames at 25 Hz)."""
    max_frames: int = 48
    """Longest latent length (frames at 25 Hz)."""
    condition_length: int = 12
    """encoder_hidden_states length L (encoder_outputs)."""
    text_length: int = 8
    """Caption tokens Lt of text_hidden_states (encoder_inputs)."""
    lyric_length: int = 16
    """Lyric tokens Ll of lyric_token_ids (encoder_inputs)."""
    seed: int = 1234
    """Generator seed (the data never depends on train.seed)."""


@dataclass
class PreprocessedDataset(DatasetConfig):
    """A preprocessed dataset directory: v3 shards (index.jsonl + shard-*.tar) or per-sample .pt files."""

    kind: ClassVar[str] = "preprocessed"
    path: str = MISSING
    """Dataset directory (v3: index.jsonl + shards; pt: manifest.json, preprocess_meta.json, or just *.pt files)."""
    format: DataFormat = DataFormat.auto
    """auto = detect from the directory; v3_sharded = webdataset shards + index; pt = official / Side-Step .pt files."""
    verify_checksums: ChecksumPolicy = ChecksumPolicy.first_read
    """v3: check a sample's checksum (catches corrupted shards; one pass over its bytes): first_read = the first time
    each process reads it, then trust it (an mmap'd or cached sample is not re-hashed every epoch); always = every
    read; never = no check."""
    val_path: Optional[str] = None
    """A separate preprocessed directory to validate on (instead of val_fraction)."""
    allow_fingerprint_mismatch: bool = False
    """Train even when the data's fingerprint (model, encoders, preprocessing) differs from the model's (experts)."""


@dataclass
class CacheConfig:
    """Keep decoded samples in memory between epochs."""

    policy: CachePolicy = CachePolicy.auto
    """none = read each sample from disk every time; mmap = map v3 shards (or .pt files) and read through the page
    cache without copies; ram_lru = keep up to max_gb of decoded samples in RAM, least recently used evicted;
    auto = mmap for v3, ram_lru when a .pt dataset fits max_gb and free RAM, else none (the run says which and why)."""
    max_gb: float = 4.0
    """RAM budget of ram_lru (and of auto's choice) in GiB."""


@dataclass
class ParamGroupConfig:
    """Trainable parameters whose name matches `pattern` (regex, searched) train with lr * lr_mult."""

    name: str = MISSING
    """Group name (logged as train/lr/<name>)."""
    pattern: str = MISSING
    """Regex searched in the parameter name (e.g. `self_attn|cross_attn`); the first group that matches wins."""
    lr_mult: float = 1.0
    """Multiplier of optim.lr for this group."""
    weight_decay: Optional[float] = None
    """Weight decay of the group's Linear / convolution weights; None = optim.weight_decay. Norms, biases, embedding
    tables and adaLN tables take none (unless optim.decay_all)."""


@dataclass
class OptimConfig:
    """Optimizer and learning-rate schedule."""

    optimizer: Any = field(
        default_factory=lambda: {"_target_": "torch.optim.AdamW", "betas": [0.9, 0.999], "eps": 1e-8}
    )
    """Optimizer constructor (`_target_` + kwargs, lr and weight_decay are filled in from the fields below)."""
    lr: float = 1e-4
    """Peak learning rate."""
    weight_decay: float = 0.01
    """Decoupled weight decay."""
    schedule: Schedule = Schedule.cosine
    """Shape after warmup: cosine decay to min_lr_ratio * lr, or constant."""
    warmup_steps: int = 10
    """Linear warmup optimizer steps."""
    min_lr_ratio: float = 0.0
    """Final LR of the cosine schedule as a fraction of lr."""
    grad_clip: float = 1.0
    """Max global grad norm; 0 disables clipping."""
    param_groups: List[ParamGroupConfig] = field(default_factory=list)
    """Named groups with LR multipliers; parameters matching none form the group "default" (lr_mult 1)."""
    decay_all: bool = False
    """Weight decay on every trainable tensor, as the official trainer does; false = only the weight matrices of
    Linear / convolution layers (LoRA matrices included) decay, never norms, biases, embedding tables or the adaLN
    modulation tables."""

    @property
    def target(self) -> str:
        """The optimizer class path, `optimizer._target_` (e.g. torch.optim.AdamW)."""
        return str(dict(self.optimizer).get("_target_", ""))


@dataclass
class HardwareConfig:
    """Devices and precision (Accelerate owns placement and autocast)."""

    device: Device = Device.auto
    """auto = a CUDA GPU when one is visible, else the CPU (the run prints which); cpu; cuda (refused without one)."""
    mixed_precision: MixedPrecision = MixedPrecision.auto
    """Autocast precision, master weights stay fp32; auto = bf16 on a CUDA GPU that supports it, else no (fp32)."""
    batch_size: int = 4
    """Samples per micro-batch per process (the most, when max_frames_per_batch is set)."""
    max_frames_per_batch: int = 0
    """Latent-frame budget per micro-batch (batch x padded T); short clips then make bigger batches. 0 = fixed
    batch_size."""
    device_prefetch: bool = True
    """Copy batch N+1 to the GPU on a side CUDA stream from pinned memory while step N runs (no effect on CPU)."""
    gradient_checkpointing: float = 0
    """Recompute DiT layer activations in the backward pass: 0 = off, 1 = every layer (least memory, ~30% more
    compute), an integer N >= 2 = every N-th layer, a ratio 0 < r < 1 = that share of the layers, evenly spaced."""
    distributed: Distributed = Distributed.ddp
    """Multi-process strategy: ddp (replicated weights), fsdp (FSDP2: weights, grads and optimizer state sharded
    per DiT layer; needs CUDA) or deepspeed (ZeRO, stage in zero_stage). One process: no effect."""
    zero_stage: int = 2
    """DeepSpeed ZeRO stage: 1 = optimizer state, 2 = + gradients, 3 = + weights sharded."""
    offload: bool = False
    """fsdp/deepspeed: keep the optimizer state (fsdp: also weights) in host RAM."""
    memory_gb: Optional[float] = None
    """Device memory budget per process in GiB for the memory preflight; None = the visible GPU's total memory
    (no budget on the CPU)."""
    compile: bool = False
    """torch.compile each DiT layer separately (regional: one layer's compile serves all of them), with dynamic shapes:
    the first training step compiles (minutes on a CPU; inductor's on-disk cache makes reruns and resumes faster), the
    first validation and the first batch of size 1 compile once more, new lengths do not. Needs a C++ compiler (CPU)
    or triton (CUDA GPU); checked before training."""
    length_multiple: int = 0
    """Pad every micro-batch's latent frames up to a multiple of this (e.g. 250 = 10 s), so kernels (cuDNN / triton
    autotuning, flex block masks) meet a bounded set of shapes. The extra frames are ordinary padding (objective.loss_mask / attention_mask decide whether
    padding counts, as for the batch's own). 0 = pad to the longest clip in the batch only."""


@dataclass
class LoggerConfig:
    """Where metrics go, in addition to metrics.jsonl in the run directory."""

    backend: LoggerBackend = LoggerBackend.none
    """Metrics sink."""
    project: str = "acestep-ft"
    """wandb project."""
    entity: Optional[str] = None
    """wandb entity (team); None = your default."""
    tags: List[str] = field(default_factory=list)
    """Extra wandb tags (the Hydra group choices are added automatically)."""


@dataclass
class ObjectiveConfig:
    """Flow-matching objective (defaults reproduce Side-Step and the official training_v2)."""

    timesteps: TimestepKind = TimestepKind.logit_normal
    """logit_normal = t = max of two sigmoid(N(mu, sigma)) draws (model config mu/sigma); turbo_discrete =
    uniform over the 8 turbo shift-3 values (the original official LoRA trainer)."""
    cfg_ratio: float = 0.15
    """Probability per sample of replacing the whole condition by null_condition_emb."""
    loss_mask: bool = False
    """Average the loss over real frames only (official: False, padding counts)."""
    attention_mask: bool = False
    """Let the decoder mask padded frames and condition tokens (official: False, masks are ignored)."""


@dataclass
class EmaConfig:
    """Exponential moving average of the trained weights (saved in checkpoints)."""

    enabled: bool = False
    """Keep an EMA of the trained weights."""
    decay: float = 0.999
    """Decay per update (0.999 averages over ~1,000 updates)."""
    warmup: bool = True
    """Ramp the decay up as min(decay, (1 + n) / (10 + n)) over the first updates."""
    every: int = 1
    """Update every N optimizer steps."""
    on_cpu: bool = False
    """Keep the EMA copy in host RAM instead of device memory (full fine-tuning of large decoders)."""
    for_eval: bool = True
    """Validate and generate samples with the EMA weights."""
    for_export: bool = True
    """Write the EMA weights into the final export (checkpoints always hold the raw weights plus the EMA)."""


@dataclass
class EarlyStopConfig:
    """Stop when the validation loss stops improving."""

    patience: int = 0
    """Evaluations without an improvement of more than min_delta before stopping; 0 = never stop early."""
    min_delta: float = 0.0
    """A decrease of the validation loss must exceed this to count as an improvement."""


@dataclass
class SamplerConfig:
    """The flow sampler that renders previews and clips; null = the variant's own setting (turbo: 8 steps, shift 3,
    no CFG; base / sft: 30 steps, shift 1, guidance 7 with APG, as official inference)."""

    steps: Optional[int] = None
    """Euler steps from t=1 (noise) to t=0."""
    shift: Optional[float] = None
    """Timestep shift of the schedule, t' = s*t / (1 + (s-1)*t)."""
    guidance_scale: Optional[float] = None
    """Classifier-free guidance scale (APG); 1 = no guidance (turbo is guidance-distilled)."""


@dataclass
class PromptSample:
    """One preview rendered from text: the caption and lyrics go through the text and condition encoders."""

    caption: str = MISSING
    """Caption / tags, as in the training data (e.g. "lo-fi hip hop, mellow piano, 80 bpm")."""
    lyrics: str = "[Instrumental]"
    """Lyrics with section tags, or [Instrumental]."""
    duration: float = 10.0
    """Seconds of audio to render."""
    seed: int = 0
    """Seed of the starting noise (the same seed renders the same clip at every preview)."""


@dataclass
class SampleConfig:
    """Previews while training: latents from fixed noise for fixed validation conditions, and clips from text."""

    every_epochs: int = 0
    """Every N epochs (and at the end); 0 = never."""
    num: int = 2
    """Conditions taken from the first validation samples (or training samples without a split)."""
    prompts: List[PromptSample] = field(default_factory=list)
    """Text prompts rendered at every preview (encoded once at the start, then the encoders leave the device)."""
    sampler: SamplerConfig = field(default_factory=SamplerConfig)
    vae_path: Optional[str] = None
    """VAE (diffusers AutoencoderOobleck directory) that decodes the sampled latents to audio: samples/step-N/*.wav
    and the logger. None = <model.path>/../vae when that exists (the official layout), else latents only."""


@dataclass
class TrainConfig:
    """Loop length, seeding, checkpointing and resume."""

    max_steps: int = 100
    """Optimizer steps to run."""
    grad_accum: int = 1
    """Micro-batches per optimizer step."""
    seed: int = 0
    """Seed for init, noise, timesteps, dropout and shuffling."""
    log_every: int = 1
    """Log metrics every N optimizer steps."""
    save_every: int = 50
    """Write a checkpoint every N optimizer steps (and always at the end)."""
    keep_last: int = 2
    """Checkpoints kept in the run directory (older ones are deleted; the best by validation loss is also kept);
    0 = keep all."""
    val_every: int = 0
    """Validate every N optimizer steps (and at the end); 0 = once per epoch (= batches per epoch // grad_accum
    optimizer steps). Needs a validation split."""
    early_stop: EarlyStopConfig = field(default_factory=EarlyStopConfig)
    samples: SampleConfig = field(default_factory=SampleConfig)
    export_dtype: ExportDtype = ExportDtype.float32
    """dtype of the final export in <run>/export (full model in the official layout, or the adapter)."""
    export_comfyui: bool = True
    """Adapter modes: also write the adapter in ComfyUI's layout (per-module alpha, so strength 1.0 = the trained
    update) as export/comfyui/adapter.safetensors and in every checkpoint."""
    resume: Optional[str] = None
    """null = fresh start; auto = newest checkpoint in the run directory; or a checkpoint / run directory path."""
    resume_strict: bool = True
    """Refuse to resume when the model, mode, data, optimizer, objective or batch setup differs from the checkpoint's;
    false = continue with the new settings (optimizer hyperparameters and schedule are applied to the restored
    state)."""
    overwrite: bool = False
    """Start fresh in a run directory that holds an earlier run, deleting its checkpoints, export, samples and metrics
    (without it such a directory is refused; train.resume=auto continues it instead)."""
    nonfinite: NonfinitePolicy = NonfinitePolicy.halt
    """A NaN/Inf loss or gradient: halt = save the last finite state (a checkpoint marked as such) and stop; skip = drop
    that optimizer step (no update, counted in train/nonfinite_skips) and halt after max_nonfinite_skips in a row."""
    max_nonfinite_skips: int = 10
    """nonfinite=skip: halt (saving the last finite state) after this many non-finite steps in a row."""
    stop_at_step: Optional[int] = None
    """Save and stop at this step, keeping max_steps' schedule (split a run across job time limits)."""
    plot: bool = True
    """Write loss_curve.png into the run directory at the end."""
    ema: EmaConfig = field(default_factory=EmaConfig)


@dataclass
class PreflightConfig:
    """Memory preflight: estimate peak device memory before loading weights and act on the verdict."""

    policy: PreflightPolicy = PreflightPolicy.auto
    """Over budget: refuse (exit with the top terms and suggestions), rewrite (apply the cheapest changes that fit,
    print them, save the rewritten config and a diff), warn (train anyway); auto = rewrite for LoRA, refuse for full."""
    overhead_gb: float = 0.75
    """Memory the estimate does not see, reserved from the budget: CUDA context, kernels' workspaces, allocator
    fragmentation."""


@dataclass
class Config:
    """The root: one run = one of each group plus the objective and loop settings."""

    model: ModelConfig = MISSING
    mode: Any = MISSING
    dataset: Any = MISSING
    cache: CacheConfig = MISSING
    optim: OptimConfig = MISSING
    hardware: HardwareConfig = MISSING
    logger: LoggerConfig = MISSING
    objective: ObjectiveConfig = field(default_factory=ObjectiveConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    preflight: PreflightConfig = field(default_factory=PreflightConfig)


def resolve_hardware(hw: HardwareConfig, cuda: bool, cuda_bf16: bool) -> tuple[bool, str]:
    """(use the CPU, Accelerate mixed_precision) for the preset on a machine with or without a (bf16) CUDA GPU."""
    on_cpu = hw.device == Device.cpu or (hw.device == Device.auto and not cuda)
    precision = str(hw.mixed_precision)
    if hw.mixed_precision == MixedPrecision.auto:
        precision = "bf16" if not on_cpu and cuda_bf16 else "no"
    return on_cpu, precision


def resolve_frozen_dtype(model: ModelConfig, hw: HardwareConfig, on_cpu: bool, precision: str,
                         world_size: int = 1) -> str:
    """The torch dtype name of the weights training never updates (model.frozen_dtype). auto = the autocast dtype
    on a CUDA GPU; float32 on the CPU, without autocast, and under multi-process FSDP (FSDP2 all-gathers each
    layer's parameters as one flat buffer of a single dtype, and a LoRA layer mixes frozen and fp32 tensors)."""
    if model.frozen_dtype != FrozenDtype.auto:
        return str(model.frozen_dtype)
    if on_cpu or precision == "no" or (world_size > 1 and hw.distributed == Distributed.fsdp):
        return "float32"
    return {"bf16": "bfloat16", "fp16": "float16"}[precision]


def field_default(cfg: Any, key: str) -> Any:
    """The dataclass default of a flattened key ("hardware.compile" -> False) of a typed config, enums as strings;
    None when the key names no field with a default. A checkpoint written before a field existed was trained with
    that default."""
    import dataclasses

    *path, name = key.split(".")
    node = cfg
    for part in path:
        node = getattr(node, part, None)
    if not dataclasses.is_dataclass(node):
        return None
    spec = next((f for f in dataclasses.fields(node) if f.name == name), None)
    if spec is None or (spec.default is dataclasses.MISSING and spec.default_factory is dataclasses.MISSING):
        return None
    value = spec.default if spec.default is not dataclasses.MISSING else spec.default_factory()
    return str(value) if isinstance(value, StrEnum) else value


def flatten(cfg: Any) -> dict:
    """A typed config (or any part of it) as {"optim.lr": 1e-4, ...}, enums as their strings."""
    from omegaconf import OmegaConf

    def walk(node: Any, prefix: str) -> dict:
        if isinstance(node, dict):
            return {k: v for key, value in node.items() for k, v in walk(value, f"{prefix}{key}.").items()}
        return {prefix[:-1]: node}

    return walk(OmegaConf.to_container(OmegaConf.structured(cfg), enum_to_str=True), "")


@dataclass
class PreprocessConfig:
    """Audio folder -> v3 shards + index + fingerprint (scripts/preprocess.py)."""

    input_dir: str = MISSING
    """Folder of audio files (wav, flac, mp3, ogg; searched recursively) with sidecar captions/lyrics."""
    output_dir: str = MISSING
    """Where the v3 dataset goes (index.jsonl, shard-*.tar, fingerprint.json); work in progress in output_dir/.work."""
    metadata_csv: Optional[str] = None
    """CSV with a `file` column (path relative to input_dir) and caption, lyrics, bpm, keyscale, timesignature;
    None = sidecars: song.json ({"caption", "lyrics", ...}), or song.txt (caption) + song.lyrics.txt."""
    vae_path: Optional[str] = None
    """diffusers AutoencoderOobleck directory; None = <model.path>/../vae (the official checkpoint layout)."""
    store: StoreConditions = StoreConditions.outputs
    """What each sample stores for the condition: outputs = the condition encoder's output (encoder_hidden_states,
    trains with dataset.conditions=encoder_outputs); inputs = what it consumes (text-encoder states and token ids of
    the caption, lyric token ids, the timbre reference), for dataset.conditions=encoder_inputs, independent of the
    condition encoder's weights; both = the two sets."""
    max_seconds: float = 240.0
    """Audio longer than this is truncated (the official preprocessor's max_duration)."""
    chunk_seconds: float = 30.0
    """VAE encoding window for long audio (lower it when the VAE runs out of memory)."""
    overlap_seconds: float = 2.0
    """Context on each side of a window, encoded and discarded, so chunk seams do not show."""
    text_max_tokens: int = 256
    """Caption prompt length (padded / truncated), as the official preprocessor."""
    lyric_max_tokens: int = 2048
    """Lyric tokens kept (longer lyrics are cut); raw lyrics are also padded to it (the official trainer before the
    template: 512)."""
    lyric_format: LyricFormat = LyricFormat.official_template
    """How lyrics are tokenized: official_template = what official ACE-Step 1.5 training and inference do now:
    "# Languages\n{language}\n\n# Lyric\n{lyrics}<|endoftext|>", not padded (lengths vary per song), language from
    the song's sidecar JSON / CSV `language` column, default "unknown"; raw = the lyric text as it is, padded to
    lyric_max_tokens (the official trainer's earlier preprocessing and Side-Step's). Recorded in the fingerprint."""
    dtype: ExportDtype = ExportDtype.bfloat16
    """Stored tensor dtype (official CUDA preprocessing stores bf16)."""
    shard_mb: int = 1024
    """Target shard size in MB."""
    seed: int = 0
    """Seed of the VAE latent sampling (latent_dist.sample(), as the official preprocessor), per song."""


@dataclass
class PreprocessRoot:
    """scripts/preprocess.py: the model (its condition encoder and checkpoint directory) + device + the settings."""

    model: ModelConfig = MISSING
    hardware: HardwareConfig = MISSING
    preprocess: PreprocessConfig = field(default_factory=PreprocessConfig)


@dataclass
class GenerateRoot:
    """python -m acestep_ft.generate: one clip from text with a trained adapter or full model (conf/generate.yaml)."""

    model: ModelConfig = MISSING
    hardware: HardwareConfig = MISSING
    adapter: Optional[str] = None
    """A trained adapter (PEFT directory, ComfyUI-layout .safetensors, or a run's export/) applied to the model; None
    = the model as model.path holds it (e.g. a full fine-tune's export)."""
    prompt: str = MISSING
    """Caption / tags describing the music."""
    lyrics: str = "[Instrumental]"
    """Lyrics with section tags, or [Instrumental]."""
    duration: float = 10.0
    """Seconds of audio."""
    seed: int = 0
    """Seed of the starting noise."""
    sampler: SamplerConfig = field(default_factory=SamplerConfig)
    vae_path: Optional[str] = None
    """VAE directory; None = <model.path>/../vae."""
    output: Optional[str] = None
    """Where the wav goes; None = generated/<date>-<time>-seed<seed>.wav in the working directory."""


def to_typed(cfg: Any) -> Any:
    """A composed DictConfig as its dataclass objects; a required value left unset is a ConfigError naming it."""
    from omegaconf import OmegaConf
    from omegaconf.errors import MissingMandatoryValue

    from acestep_ft.errors import ConfigError

    try:
        return OmegaConf.to_object(cfg)
    except MissingMandatoryValue as err:
        raise ConfigError(f"{err.full_key} is required; add {err.full_key}=... to the command line.") from None


def register_configs() -> None:
    """Register the schemas; every YAML option under conf/<group>/ starts from one of these."""
    cs = ConfigStore.instance()
    cs.store(name="base_config", node=Config)
    cs.store(name="base_preprocess", node=PreprocessRoot)
    cs.store(name="base_generate", node=GenerateRoot)
    cs.store(group="model", name="base_model", node=ModelConfig)
    cs.store(group="mode", name="base_lora", node=LoraMode)
    cs.store(group="mode", name="base_lokr", node=LokrMode)
    cs.store(group="mode", name="base_loha", node=LohaMode)
    cs.store(group="mode", name="base_full", node=FullMode)
    cs.store(group="dataset", name="base_synthetic", node=SyntheticDataset)
    cs.store(group="dataset", name="base_preprocessed", node=PreprocessedDataset)
    cs.store(group="cache", name="base_cache", node=CacheConfig)
    cs.store(group="optim", name="base_optim", node=OptimConfig)
    cs.store(group="hardware", name="base_hardware", node=HardwareConfig)
    cs.store(group="logger", name="base_logger", node=LoggerConfig)
