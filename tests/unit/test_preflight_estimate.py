"""The analytic memory estimate: exact terms where the arithmetic is exact, and within 15% of a traced training step
(FakeTensorMode + MemTracker, acestep_ft/preflight/trace.py) over a grid of small configs and real-size ones, with
the condition encoder's outputs as data or its inputs (dataset.conditions=encoder_inputs: the encoder runs, frozen
or trained, in every step)."""

from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from omegaconf import OmegaConf

from acestep_ft.config import register_configs
from acestep_ft.model.variants import build_meta_model, param_counts
from acestep_ft.preflight.estimate import InputLengths, batch_bytes, estimate_memory, optimizer_terms, train_set
from acestep_ft.preflight.trace import random_batch, trace_peak
from acestep_ft.train.trainable import count_parameters, make_trainable

CONF = Path(__file__).resolve().parents[2] / "conf"
register_configs()

# tiny-ish widths: 4 DiT layers, hidden 256, GQA 4/2 heads of 64, window 16 tokens; bf16 autocast as on a GPU
SMALL = ["model.hidden_size=256", "model.intermediate_size=768", "model.num_hidden_layers=4",
         "model.num_attention_heads=4", "model.num_key_value_heads=2", "model.head_dim=64", "model.sliding_window=16",
         "hardware=cpu", "hardware.mixed_precision=bf16", "hardware.device_prefetch=false"]

# the condition encoder runs in the step: frozen (LoRA), all of it trained, or only its lyric encoder
INPUTS = ["dataset.conditions=encoder_inputs"]
ENCODER = [*INPUTS, "mode=full", "mode.unfreeze=[{module: condition_encoder, pattern: '.'}]"]
LYRICS = [*INPUTS, "mode=full", "mode.unfreeze=[{module: condition_encoder, pattern: lyric_encoder}]"]
OFFICIAL = InputLengths(text=256, lyric=512, refs=1, ref_frames=1)  # the official trainer's padding, L = 769
LONG_LYRICS = InputLengths(text=32, lyric=256, refs=1, ref_frames=1)


def config(*overrides):
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return OmegaConf.to_object(compose(config_name="config", overrides=list(overrides)))


def term(est, name):
    return next(t.bytes for t in est.terms if t.name == name)


def test_full_adamw_state_is_8_bytes_per_decoder_param():
    cfg = config("model=acestep15_turbo", "mode=full")
    est = estimate_memory(cfg, batch=1, frames=1500, cond=769)
    decoder = param_counts(cfg.model)["decoder"]
    assert decoder == 1_575_458_880  # ACESTEP15.md
    assert term(est, "optimizer states") == 8 * decoder
    assert term(est, "weights") == 4 * decoder


def test_zero2_over_4_ranks_divides_grads_and_optimizer_state():
    overrides = ["model=acestep15_turbo", "mode=full", "hardware.gradient_checkpointing=1"]
    one = estimate_memory(config(*overrides), 1, 1500, 769)
    four = estimate_memory(config(*overrides, "hardware.distributed=deepspeed", "hardware.zero_stage=2"), 1, 1500,
                           769, world_size=4)
    assert term(four, "optimizer states") == term(one, "optimizer states") // 4
    assert term(one, "gradients") == 4 * 1_575_458_880  # the peak is the optimizer step: all gradients alive
    assert term(four, "gradients") == term(one, "gradients") // 4
    assert term(four, "weights") == term(one, "weights")  # stage 2 keeps whole weights
    ddp = estimate_memory(config(*overrides, "hardware.distributed=ddp"), 1, 1500, 769, world_size=4)
    assert ddp.total == one.total  # gradients are views into DDP's buckets: no second copy


@pytest.mark.parametrize("targets", ["[q_proj,k_proj,v_proj,o_proj]", "[self_attn.q_proj,gate_proj,down_proj]",
                                     "[q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj]"])
def test_lora_trainable_count_equals_peft(targets):
    cfg = config(*SMALL, "mode=lora", "mode.rank=8", f"mode.target_modules={targets}")
    trainable, _ = count_parameters(make_trainable(build_meta_model(cfg.model), cfg.mode))
    assert train_set(cfg).trainable == trainable


def test_staged_unfreeze_counts_every_weight_that_ever_trains():
    cfg = config(*SMALL, "mode=full", "+mode.unfreeze=[{pattern: 'layers\\.[23]\\.', at_step: 0},"
                 "{pattern: proj_out, at_step: 5}]")
    model = build_meta_model(cfg.model)
    trainable, _ = count_parameters(make_trainable(model, cfg.mode))
    assert train_set(cfg).trainable == trainable


def test_adamw8bit_state_matches_bitsandbytes():
    """States of a real (CPU) bitsandbytes step: uint8 for tensors >= 4096 values plus absmax, fp32 below."""
    cfg = config("model=tiny", "mode=full", "optim=adamw8bit", "hardware=cpu")
    torch.manual_seed(0)
    from acestep_ft.model import load_model
    from acestep_ft.train.optim import build_optimizer
    decoder = make_trainable(load_model(cfg.model), cfg.mode)
    opt = build_optimizer(decoder, cfg.optim)
    for p in decoder.parameters():
        p.grad = torch.randn_like(p)
    opt.step()
    state = sum(v.numel() * v.element_size() for s in opt.state.values() for k, v in s.items()
                if torch.is_tensor(v) and k in ("state1", "state2", "absmax1", "absmax2"))
    assert optimizer_terms(cfg, train_set(cfg))[0] == state


def test_condition_encoder_weights_table_and_states_are_exact_at_2b():
    """2B on a GPU preset (frozen weights in bf16): the encoder's trained weights as fp32 masters with AdamW states,
    its frozen ones and the token table in bf16, the frozen decoder in bf16 (ACESTEP15.md parameter counts)."""
    lyric, encoder = 404_789_248, 404_789_248 + 201_481_216 + 2_097_152  # + timbre encoder, text_projector
    cls = 2048  # the timbre CLS token: 2B never reads it, so a stage does not train it (frozen, bf16)
    full = estimate_memory(config("model=acestep15_turbo", "hardware=h100", *ENCODER), 1, 1500, OFFICIAL)
    assert term(full, "condition encoder") == 4 * (encoder - cls) + 2 * cls
    assert term(full, "token table") == 2 * 151_669 * 1024
    assert term(full, "weights") == 2 * 1_575_458_880  # the decoder stays frozen
    assert term(full, "optimizer states") == 8 * (encoder - cls)
    lyrics = estimate_memory(config("model=acestep15_turbo", "hardware=h100", *LYRICS), 1, 1500, OFFICIAL)
    assert term(lyrics, "condition encoder") == 4 * lyric + 2 * (encoder - lyric)
    assert term(lyrics, "optimizer states") == 8 * lyric
    outputs = estimate_memory(config(*SMALL, "mode=lora"), 1, 1500, 769)  # the encoder stays in host RAM
    assert not {"condition encoder", "token table"} & {t.name for t in outputs.terms}


@pytest.mark.parametrize("overrides", [["mode=lora", *INPUTS], LYRICS, ENCODER])
def test_trained_encoder_counts_equal_make_trainable(overrides):
    cfg = config(*SMALL, *overrides)
    module = make_trainable(build_meta_model(cfg.model), cfg.mode)
    trainable, _ = count_parameters(module)
    in_encoder = sum(p.numel() for n, p in module.named_parameters() if p.requires_grad and n.startswith("encoder."))
    ts = train_set(cfg)
    assert ts.trainable == trainable and ts.encoder.trainable == in_encoder
    assert (ts.encoder.lyric[0].trainable > 0) == (overrides != ["mode=lora", *INPUTS])
    assert (ts.encoder.timbre[0].trainable > 0) == (overrides == ENCODER)


@pytest.mark.parametrize("overrides,cond", [(["mode=lora"], 40), (LYRICS, InputLengths(8, 24, 2, 5))])
def test_batch_bytes_are_the_random_batch(overrides, cond):
    """The batch term is exactly the bytes of the batch the trace feeds the step (outputs or encoder inputs)."""
    cfg = config(*SMALL, *overrides)
    batch = random_batch(cfg, 3, 50, cond)
    assert batch_bytes(cfg, 3, 50, cond) == sum(t.numel() * t.element_size() for t in batch.tensors())


def test_the_condition_must_match_the_data():
    with pytest.raises(TypeError, match="InputLengths"):
        estimate_memory(config(*SMALL, *LYRICS), 2, 400, 769)
    with pytest.raises(TypeError, match="condition length"):
        estimate_memory(config(*SMALL, "mode=lora"), 2, 400, OFFICIAL)


def test_a_trained_encoder_costs_more_with_longer_lyrics_and_references():
    cfg = config(*SMALL, *ENCODER)
    base = estimate_memory(cfg, 2, 400, InputLengths(16, 64, 1, 1)).total
    assert estimate_memory(cfg, 2, 400, InputLengths(16, 256, 1, 1)).total > base
    assert estimate_memory(cfg, 2, 400, InputLengths(16, 64, 1, 750)).total > base


def test_table_lists_every_term_and_the_total():
    est = estimate_memory(config(*SMALL, "mode=lora", "train.ema.enabled=true"), 2, 400, 40)
    table = est.table()
    assert est.total == sum(t.bytes for t in est.terms)
    for t in est.terms:
        assert t.name in table and t.detail in table
    assert table.splitlines()[-1].startswith("total")


def test_estimate_is_fast():
    import time
    cfg = config("model=acestep15_xl_turbo", "mode=lora")
    estimate_memory(cfg, 1, 1500, 769)  # builds and caches the meta model
    started = time.perf_counter()
    for frames in range(1000, 11000, 1000):
        estimate_memory(cfg, 2, frames, 769)
    assert time.perf_counter() - started < 0.5


def test_checkpointing_and_longer_clips_move_the_estimate_the_right_way():
    base = [*SMALL, "mode=full"]
    plain = estimate_memory(config(*base), 4, 1000, 80).total
    assert estimate_memory(config(*base, "hardware.gradient_checkpointing=1"), 4, 1000, 80).total < plain
    assert estimate_memory(config(*base), 4, 2000, 80).total > plain


def test_flex_drops_the_dense_band_and_the_repeated_kv():
    base = [*SMALL, "mode=lora", "hardware.device=cuda"]
    sdpa = estimate_memory(config(*base), 2, 4000, 80)
    flex = estimate_memory(config(*base, "model.attn_implementation=flex"), 2, 4000, 80)
    n = 2000  # tokens: a [N, N] bool band mask and a bf16 bias per sliding layer are what flex does not build
    assert sdpa.total - flex.total > n * n
    assert term(flex, "weights") == term(sdpa, "weights")


# (overrides, batch, frames, cond: L or InputLengths): estimate within 15% of the traced peak
FAST = [
    (["mode=full"], 4, 1000, 80),
    (["mode=lora"], 4, 1000, 80),
    (["mode=full", "hardware.gradient_checkpointing=1"], 4, 1000, 80),
    (["mode=full", "optim=adamw8bit", "train.ema.enabled=true"], 2, 600, 40),
    (["mode=lokr"], 4, 1000, 80),
    (["mode=lora", "model.frozen_dtype=bfloat16"], 4, 1000, 80),  # what auto picks on a CUDA GPU
    # the condition encoder in the step (2 DiT layers: faster traces), its share made large: short clips, long lyrics
    (["model.num_hidden_layers=2", "mode=lora", *INPUTS], 2, 200, LONG_LYRICS),
    (["model.num_hidden_layers=2", *ENCODER], 2, 200, LONG_LYRICS),
    (["model.num_hidden_layers=2", *LYRICS], 2, 200, LONG_LYRICS),
]
SLOW = [
    (["mode=full"], 1, 800, 40),
    (["mode=full", "hardware.gradient_checkpointing=2"], 4, 1000, 80),
    (["mode=lora"], 1, 1000, 80),
    (["mode=lora", "mode.dropout=0"], 4, 1000, 80),
    (["mode=lora", "hardware.gradient_checkpointing=1"], 4, 1000, 80),
    (["mode=lora", "model.attn_implementation=eager"], 2, 1000, 80),
    (["mode=full", "model.attn_implementation=eager"], 2, 1000, 80),
    (["mode=full", "hardware.mixed_precision=no"], 4, 1000, 80),
    (["mode=lora", "hardware.mixed_precision=no"], 4, 1000, 80),
    (["mode=lora", "optim=adamw8bit", "train.ema.enabled=true"], 4, 1000, 80),
    (["mode=lora", "mode.target_modules=[q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj]"], 4, 1000, 80),
    (["mode=lora", "mode.use_dora=true"], 4, 1000, 80),
    (["mode=lora", "mode.use_dora=true", "mode.dropout=0", "mode.use_rslora=true"], 4, 1000, 80),
    (["mode=lokr", "mode.decompose_both=true", "mode.rank=8", "mode.target_modules=[q_proj,v_proj,gate_proj]"],
     4, 1000, 80),
    (["mode=loha", "mode.rank_dropout=0.1"], 4, 1000, 80),
    (["mode=loha", "hardware.gradient_checkpointing=1"], 4, 1000, 80),
    (["mode=lora", "model.frozen_dtype=bfloat16", "mode.use_dora=true"], 4, 1000, 80),
    (["mode=lokr", "model.frozen_dtype=bfloat16", "hardware.gradient_checkpointing=1"], 4, 1000, 80),
    (["mode=lora", "model.attn_implementation=flex"], 2, 1000, 80),  # traced as SDPA, which holds a bit more
    (["mode=full", "model.frozen_dtype=bfloat16", "mode.unfreeze=[{pattern: 'layers\\.[23]\\.'}]"], 4, 1000, 80),
    (["mode=lora", *INPUTS], 4, 100, InputLengths(text=256, lyric=1024, refs=1, ref_frames=750)),
    (["mode=lora", *INPUTS, "model.frozen_dtype=bfloat16"], 4, 1000, InputLengths(16, 64, 1, 1)),
    (ENCODER, 2, 200, InputLengths(text=256, lyric=512, refs=1, ref_frames=750)),  # real reference audio
    (LYRICS, 2, 200, InputLengths(text=256, lyric=512, refs=1, ref_frames=750)),
    ([*ENCODER, "hardware.mixed_precision=no"], 2, 200, InputLengths(256, 512, 1, 750)),
    ([*ENCODER, "model.frozen_dtype=bfloat16"], 2, 200, InputLengths(256, 512, 1, 750)),
    ([*ENCODER, "hardware.gradient_checkpointing=1"], 2, 200, InputLengths(256, 512, 1, 750)),
    ([*ENCODER, "optim=adamw8bit", "train.ema.enabled=true"], 2, 600, InputLengths(64, 256, 1, 1)),
    ([*ENCODER, "model.attn_implementation=eager"], 2, 600, InputLengths(64, 256, 1, 1)),
    ([*INPUTS, "mode=full", "mode.unfreeze=[{pattern: '.'},{module: condition_encoder, pattern: '.'}]"], 2, 200,
     InputLengths(256, 512, 1, 750)),  # decoder and encoder
]


def check_against_trace(overrides, batch, frames, cond, tolerance=0.15):
    """cond: L, or the InputLengths of encoder_inputs data."""
    cfg = config(*overrides)
    est = estimate_memory(cfg, batch, frames, cond)
    traced = trace_peak(cfg, batch, frames, cond)
    err = est.total / traced["peak"] - 1
    assert abs(err) <= tolerance, (f"{overrides} B{batch} T{frames} {cond}: estimate {est.total / 2**20:.1f} "
                                   f"MiB, trace {traced['peak'] / 2**20:.1f} MiB ({100 * err:+.1f}%)\n{est.table()}"
                                   f"\ntrace: {traced}")


@pytest.mark.parametrize("overrides,batch,frames,cond", FAST)
def test_estimate_matches_trace(overrides, batch, frames, cond):
    check_against_trace([*SMALL, *overrides], batch, frames, cond)


@pytest.mark.slow
@pytest.mark.parametrize("overrides,batch,frames,cond", SLOW)
def test_estimate_matches_trace_more(overrides, batch, frames, cond):
    check_against_trace([*SMALL, *overrides], batch, frames, cond)


@pytest.mark.slow
def test_estimate_matches_trace_real_size_full():
    """What users run: the 2B decoder, full fine-tuning, bf16, every layer checkpointed (~1 min on 2 CPU cores)."""
    check_against_trace(["model=acestep15_turbo", "mode=full", "hardware=h100", "hardware.gradient_checkpointing=1",
                         "hardware.device_prefetch=false"], 2, 3000, 769)


@pytest.mark.slow
def test_estimate_matches_trace_real_size_encoder():
    """The 2B condition encoder trained from its inputs (decoder frozen, gradients through it), real reference audio
    (~2 min on 2 CPU cores)."""
    check_against_trace(["model=acestep15_turbo", "hardware=h100", "hardware.device_prefetch=false", *ENCODER], 2,
                        3000, InputLengths(text=256, lyric=512, refs=1, ref_frames=750))


# the tiny model (hidden 64): 750 reference frames make the frozen timbre stack's band mask (|i - j| built as two
# int64 [Tr, Tr]) the step's peak, beside the lyric stage's saved activations
TINY_REFS = ["model=tiny", "hardware=cpu", "hardware.mixed_precision=bf16", "hardware.device_prefetch=false", *INPUTS]
LYRIC_STAGE = ["mode=full", "mode.unfreeze=[{module: condition_encoder, pattern: 'lyric_encoder', at_step: 0}]"]
REFERENCE_AUDIO = InputLengths(text=256, lyric=64, refs=1, ref_frames=750)


def test_estimate_matches_trace_frozen_timbre_encoder_on_reference_audio():
    check_against_trace([*TINY_REFS, *LYRIC_STAGE], 2, 200, REFERENCE_AUDIO)


@pytest.mark.slow
@pytest.mark.parametrize("overrides,cond", [
    (["mode=lora"], REFERENCE_AUDIO),
    ([*LYRIC_STAGE, "hardware.mixed_precision=no"], REFERENCE_AUDIO),
    (LYRIC_STAGE, InputLengths(text=256, lyric=512, refs=1, ref_frames=750)),
    (LYRIC_STAGE, InputLengths(text=256, lyric=64, refs=1, ref_frames=250)),
])
def test_estimate_matches_trace_frozen_timbre_encoder_more(overrides, cond):
    check_against_trace([*TINY_REFS, *overrides], 2, 200, cond)
