"""The analytic memory estimate: exact terms where the arithmetic is exact, and within 15% of a traced training step
(FakeTensorMode + MemTracker, acestep_ft/preflight/trace.py) over a grid of small configs and one real-size one."""

from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from omegaconf import OmegaConf

from acestep_ft.config import register_configs
from acestep_ft.model.variants import build_meta_model, param_counts
from acestep_ft.preflight.estimate import estimate_memory, optimizer_terms, train_set
from acestep_ft.preflight.trace import trace_peak
from acestep_ft.train.trainable import count_parameters, make_trainable

CONF = Path(__file__).resolve().parents[2] / "conf"
register_configs()

# tiny-ish widths: 4 DiT layers, hidden 256, GQA 4/2 heads of 64, window 16 tokens; bf16 autocast as on a GPU
SMALL = ["model.hidden_size=256", "model.intermediate_size=768", "model.num_hidden_layers=4",
         "model.num_attention_heads=4", "model.num_key_value_heads=2", "model.head_dim=64", "model.sliding_window=16",
         "hardware=cpu", "hardware.mixed_precision=bf16", "hardware.device_prefetch=false"]


def config(*overrides):
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return OmegaConf.to_object(compose(config_name="config", overrides=list(overrides)))


def term(est, name):
    return next(t.bytes for t in est.terms if t.name == name)


def test_full_adamw_state_is_8_bytes_per_decoder_param():
    cfg = config("model=acestep15_turbo", "mode=full")
    est = estimate_memory(cfg, batch=1, frames=1500, cond_len=769)
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


# (overrides, batch, frames, cond_len): estimate within 15% of the traced peak
FAST = [
    (["mode=full"], 4, 1000, 80),
    (["mode=lora"], 4, 1000, 80),
    (["mode=full", "hardware.gradient_checkpointing=1"], 4, 1000, 80),
    (["mode=full", "optim=adamw8bit", "train.ema.enabled=true"], 2, 600, 40),
    (["mode=lokr"], 4, 1000, 80),
    (["mode=lora", "model.frozen_dtype=bfloat16"], 4, 1000, 80),  # what auto picks on a CUDA GPU
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
]


def check_against_trace(overrides, batch, frames, cond_len, tolerance=0.15):
    cfg = config(*overrides)
    est = estimate_memory(cfg, batch, frames, cond_len)
    traced = trace_peak(cfg, batch, frames, cond_len)
    err = est.total / traced["peak"] - 1
    assert abs(err) <= tolerance, (f"{overrides} B{batch} T{frames} L{cond_len}: estimate {est.total / 2**20:.1f} "
                                   f"MiB, trace {traced['peak'] / 2**20:.1f} MiB ({100 * err:+.1f}%)\n{est.table()}"
                                   f"\ntrace: {traced}")


@pytest.mark.parametrize("overrides,batch,frames,cond_len", FAST)
def test_estimate_matches_trace(overrides, batch, frames, cond_len):
    check_against_trace([*SMALL, *overrides], batch, frames, cond_len)


@pytest.mark.slow
@pytest.mark.parametrize("overrides,batch,frames,cond_len", SLOW)
def test_estimate_matches_trace_more(overrides, batch, frames, cond_len):
    check_against_trace([*SMALL, *overrides], batch, frames, cond_len)


@pytest.mark.slow
def test_estimate_matches_trace_real_size_full():
    """What users run: the 2B decoder, full fine-tuning, bf16, every layer checkpointed (~1 min on 2 CPU cores)."""
    check_against_trace(["model=acestep15_turbo", "mode=full", "hardware=h100", "hardware.gradient_checkpointing=1",
                         "hardware.device_prefetch=false"], 2, 3000, 769)
