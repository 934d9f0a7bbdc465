"""The memory estimate with a trained text encoder (mode.text_encoder=lora): the step runs the Qwen3 text encoder on
the caption token ids with autograd, so the estimate counts its weights and LoRA, the token ids in the batch, and
what every one of its layers keeps for backward. Exact where the arithmetic is exact (against the module
`make_trainable` builds and the batch the trace feeds), and within 15% of a traced step (trace.py), the tolerance of
the other encoder_inputs cases, with the tiny random text encoder of the preprocessing tests and, marked slow, a
Qwen3-Embedding-0.6B-shaped one (its config.json only: the estimate and the trace never read its weights)."""

from pathlib import Path

import pytest
from transformers import Qwen3Config

from acestep_ft.model.variants import build_meta_model
from acestep_ft.preflight.estimate import InputLengths, batch_bytes, estimate_memory, train_set
from acestep_ft.preflight.gate import DataShape, rewrite_candidates
from acestep_ft.preflight.trace import random_batch
from acestep_ft.train.text_encoder import load_text_model
from acestep_ft.train.trainable import count_parameters, make_trainable
from test_preflight_estimate import ENCODER, INPUTS, LYRICS, SMALL, check_against_trace, config, term
from test_preprocess import tiny_text_encoder

# the tiny model (D_text 32) with bf16 autocast as on a GPU; long captions and short clips make the text encoder's
# share of the step large
TINY = ["model=tiny", "hardware=cpu", "hardware.mixed_precision=bf16", "hardware.device_prefetch=false", *INPUTS,
        "model.num_lyric_encoder_hidden_layers=1", "model.num_timbre_encoder_hidden_layers=1"]
CAPTIONS = InputLengths(text=256, lyric=32, refs=1, ref_frames=1)
MLP = "mode.text_lora.target_modules=[q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj]"


@pytest.fixture(scope="module")
def text_dir(tmp_path_factory) -> Path:
    directory = tmp_path_factory.mktemp("qwen") / "Qwen3-Embedding-0.6B"
    tiny_text_encoder(directory, 32)
    return directory


@pytest.fixture(scope="module")
def qwen_06b(tmp_path_factory) -> Path:
    """The config.json of Qwen3-Embedding-0.6B (hidden 1024, 28 layers, 16 / 8 heads of 128; ACESTEP15.md)."""
    directory = tmp_path_factory.mktemp("qwen06b") / "Qwen3-Embedding-0.6B"
    Qwen3Config(vocab_size=151_669, hidden_size=1024, intermediate_size=3072, num_hidden_layers=28,
                num_attention_heads=16, num_key_value_heads=8, head_dim=128, max_position_embeddings=32768,
                tie_word_embeddings=True).save_pretrained(directory)
    return directory


def with_text(text_dir: Path, *overrides: str) -> list:
    return [*overrides, "mode.text_encoder=lora", f"model.text_encoder_path={text_dir}"]


def test_text_encoder_weights_lora_and_token_ids_are_exact(text_dir):
    """Its weights in the frozen dtype and its LoRA in fp32 (counted on the loaded model as run.py wraps it), the
    LoRA in the optimizer states, the caption token ids in the batch."""
    cfg = config(*with_text(text_dir, *TINY, "mode=lora", "model.frozen_dtype=bfloat16"))
    text = load_text_model(cfg.model)
    trained = make_trainable(build_meta_model(cfg.model), cfg.mode, text)
    lora, params = count_parameters(text)
    assert lora > 0 and train_set(cfg).text.trainable == lora
    est = estimate_memory(cfg, 2, 200, CAPTIONS)
    assert term(est, "text encoder") == 2 * (params - lora) + 4 * lora
    assert term(est, "optimizer states") == 8 * count_parameters(trained)[0]
    frozen = estimate_memory(config(*TINY, "mode=lora", "model.frozen_dtype=bfloat16"), 2, 200, CAPTIONS)
    assert term(est, "batches") - term(frozen, "batches") == 8 * 2 * CAPTIONS.text
    batch = random_batch(cfg, 3, 50, CAPTIONS)
    assert batch.text_token_ids.shape == (3, CAPTIONS.text)
    assert batch_bytes(cfg, 3, 50, CAPTIONS) == sum(t.numel() * t.element_size() for t in batch.tensors())


@pytest.mark.parametrize("overrides", [["mode=lora"], ["mode=full"], ENCODER])
def test_trained_counts_equal_make_trainable(text_dir, overrides):
    """Decoder adapters, encoder stage and text LoRA inside one `DecoderAndEncoder` are each told apart."""
    cfg = config(*with_text(text_dir, *TINY, *overrides))
    trained = make_trainable(build_meta_model(cfg.model), cfg.mode, load_text_model(cfg.model))
    ts = train_set(cfg)
    assert ts.trainable == count_parameters(trained)[0]
    assert ts.text.trainable == sum(p.numel() for n, p in trained.named_parameters()
                                    if p.requires_grad and n.startswith("text_encoder."))
    assert ts.encoder.trainable == sum(p.numel() for n, p in trained.named_parameters()
                                       if p.requires_grad and n.startswith("encoder."))
    assert ("lora" in ts.layers[0].linears.values()) == (overrides == ["mode=lora"])  # the decoder's own LoRA
    assert all(lt.linears["self_attn.q_proj"] == "lora" and lt.linears["mlp.up_proj"] == "frozen"
               for lt in ts.text.layers)


def test_the_report_names_the_text_encoder_terms(text_dir):
    trained = estimate_memory(config(*with_text(text_dir, *TINY, "mode=lora")), 2, 200, CAPTIONS)
    names = {t.name for t in trained.terms}
    assert {"text encoder", "text encoder activations"} <= names
    assert "caption 256 (states and token ids)" in trained.table()
    frozen = estimate_memory(config(*TINY, "mode=lora"), 2, 200, CAPTIONS)
    assert not {"text encoder", "text encoder activations"} & {t.name for t in frozen.terms}


def test_text_encoder_activations_grow_with_captions_batch_and_targets(text_dir):
    def activations(lengths, batch=2, *overrides):
        est = estimate_memory(config(*with_text(text_dir, *TINY, "mode=lora", *overrides)), batch, 200, lengths)
        return term(est, "text encoder activations")

    base = activations(CAPTIONS)
    assert activations(InputLengths(512, 32, 1, 1)) > 1.9 * base  # every layer scales with B*Lt
    assert activations(CAPTIONS, 4) > 1.9 * base
    assert activations(CAPTIONS, 2, MLP) > base


def test_a_text_encoder_lora_is_never_rewritten_to_sharding(text_dir):
    """It runs under ddp only (the config check refuses fsdp / deepspeed), so the gate does not offer them."""
    plain = ["model=tiny", "hardware=a100", *INPUTS, "mode=full", "hardware.gradient_checkpointing=1",
             "hardware.batch_size=1"]
    shape = DataShape([200] * 8, 289, "fixed", CAPTIONS)
    assert "sharding" in [name for name, _ in rewrite_candidates(config(*plain), shape, 4)]
    steps = [name for name, _ in rewrite_candidates(config(*with_text(text_dir, *plain)), shape, 4)]
    assert "fused AdamW" in steps and "sharding" not in steps and "offload" not in steps


# (overrides, batch, frames, InputLengths): estimate within 15% of the traced peak, with the text encoder trained
FAST = [
    (["mode=lora"], 2, 200, CAPTIONS),   # LoRA decoder + text LoRA; the frozen condition encoder in the gradient path
    (["mode=full"], 2, 200, CAPTIONS),   # full decoder + text LoRA
    (ENCODER, 2, 200, CAPTIONS),         # full with a condition_encoder stage (decoder frozen) + text LoRA
]
SLOW = [
    (["mode=lora", "hardware.mixed_precision=no"], 2, 200, CAPTIONS),
    (["mode=lora", "model.frozen_dtype=bfloat16"], 2, 200, CAPTIONS),
    (["mode=lora", "mode.text_lora.dropout=0.1", MLP], 2, 200, CAPTIONS),
    (["mode=lora", "mode.text_lora.target_modules=[gate_proj,up_proj,down_proj]"], 2, 200, CAPTIONS),
    (["mode=lora", "mode.text_lora.target_modules=[v_proj]"], 4, 100, InputLengths(512, 32, 1, 1)),
    (["mode=full", "hardware.gradient_checkpointing=1", "train.ema.enabled=true"], 2, 200, CAPTIONS),
    (["mode=full", "optim=adamw8bit"], 2, 200, CAPTIONS),
    (["mode=lora", "model.attn_implementation=eager"], 2, 200, CAPTIONS),
    ([*ENCODER, "model.frozen_dtype=bfloat16"], 2, 200, CAPTIONS),
    ([*ENCODER, "hardware.mixed_precision=no"], 2, 200, CAPTIONS),
    (LYRICS, 2, 200, InputLengths(256, 64, 1, 1)),
]


@pytest.mark.parametrize("overrides,batch,frames,cond", FAST)
def test_estimate_matches_trace(text_dir, overrides, batch, frames, cond):
    check_against_trace(with_text(text_dir, *TINY, *overrides), batch, frames, cond)


@pytest.mark.slow
@pytest.mark.parametrize("overrides,batch,frames,cond", SLOW)
def test_estimate_matches_trace_more(text_dir, overrides, batch, frames, cond):
    check_against_trace(with_text(text_dir, *TINY, *overrides), batch, frames, cond)


@pytest.mark.slow
def test_estimate_matches_trace_real_size(qwen_06b):
    """A Qwen3-Embedding-0.6B-shaped text encoder (28 layers, frozen weights in bf16 as on a GPU) with its LoRA on
    2 x 256 caption tokens beside the small decoder, so that it holds most of the step (~3 min on 2 CPU cores: the
    trace follows every op of its 28 layers; beside the 2B decoder the same check takes ~13 min)."""
    small = [*SMALL, "model.num_hidden_layers=2", "model.text_hidden_dim=1024", "model.frozen_dtype=bfloat16"]
    check_against_trace(with_text(qwen_06b, *small, *INPUTS, "mode=lora"), 2, 200, InputLengths(256, 64, 1, 1))
