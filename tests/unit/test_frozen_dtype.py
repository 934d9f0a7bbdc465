"""model.frozen_dtype: frozen weights load straight into their dtype, trained ones are float32 masters, the preflight
counts it, and a low-precision base without autocast is refused before anything loads."""

from types import SimpleNamespace

import pytest
import torch

from acestep_ft.checks import frozen_dtype_problems
from acestep_ft.config import (
    FullMode, HardwareConfig, LoraMode, MixedPrecision, resolve_frozen_dtype,
)
from acestep_ft.model import load_model, save_full_model
from acestep_ft.train.step import flow_matching_loss
from acestep_ft.train.trainable import cast_frozen_, make_trainable, trained_at_load
from conftest import model_config


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """An fp32 official-layout checkpoint of the tiny model (a user's own float32 export)."""
    torch.manual_seed(0)
    directory = tmp_path_factory.mktemp("ckpt") / "tiny"
    model = load_model(model_config())
    save_full_model(model, directory, dtype=torch.float32)
    return directory, {k: v.clone() for k, v in model.state_dict().items()}


def loaded(directory, mode, dtype=torch.bfloat16):
    model = load_model(model_config(path=str(directory)), dtype=dtype, float32_keys=trained_at_load(mode))
    decoder = make_trainable(model, mode)
    cast_frozen_(model, dtype)
    return model, decoder


def test_lora_keeps_the_base_in_bf16_and_the_adapter_in_fp32(saved):
    model, decoder = loaded(saved[0], LoraMode(rank=4, alpha=4))
    trained = [(n, p.dtype) for n, p in model.named_parameters() if p.requires_grad]
    frozen = {p.dtype for p in model.parameters() if not p.requires_grad}
    assert trained and all(".lora_" in n and dtype == torch.float32 for n, dtype in trained)
    assert frozen == {torch.bfloat16}  # decoder base, condition encoder, tokenizer, detokenizer, null embedding
    base = dict(model.named_parameters())["decoder.layers.0.self_attn.q_proj.base_layer.weight"]
    assert torch.equal(base, saved[1]["decoder.layers.0.self_attn.q_proj.weight"].to(torch.bfloat16))


def test_full_fine_tuning_loads_the_decoder_exactly_in_fp32(saved):
    model, _ = loaded(saved[0], FullMode())
    state = model.state_dict()
    decoder_keys = [k for k in state if k.startswith("decoder.")]
    assert decoder_keys and all(torch.equal(state[k], saved[1][k]) for k in decoder_keys)  # no bf16 round trip
    assert {state[k].dtype for k in state if k.startswith("encoder.")} == {torch.bfloat16}


def test_staged_unfreezing_keeps_never_trained_decoder_weights_frozen(saved):
    from acestep_ft.config import UnfreezeStage

    model, decoder = loaded(saved[0], FullMode(unfreeze=[UnfreezeStage(pattern=r"layers\.1\.", at_step=2)]))
    dtypes = {n: p.dtype for n, p in decoder.named_parameters()}
    assert dtypes["layers.1.mlp.up_proj.weight"] == torch.float32
    assert dtypes["layers.0.mlp.up_proj.weight"] == torch.bfloat16


def test_a_bf16_base_trains_its_adapter_under_autocast(saved):
    model, decoder = loaded(saved[0], LoraMode(rank=4, alpha=4, dropout=0.0))
    torch.manual_seed(1)
    x0 = torch.randn(2, 24, 64)
    batch = SimpleNamespace(target_latents=x0, attention_mask=torch.ones(2, 24),
                            encoder_hidden_states=torch.randn(2, 6, 64), encoder_attention_mask=torch.ones(2, 6),
                            context_latents=torch.randn(2, 24, 128))
    from acestep_ft.config import ObjectiveConfig

    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = flow_matching_loss(decoder, model.null_condition_emb.float(), batch, ObjectiveConfig(), -0.4, 1.0)
    loss.backward()
    grads = [p.grad for p in decoder.parameters() if p.requires_grad]
    assert torch.isfinite(loss) and all(g is not None and g.dtype == torch.float32 for g in grads)
    assert any(g.abs().sum() > 0 for g in grads)


def test_auto_picks_the_autocast_dtype_on_a_gpu_and_fp32_elsewhere():
    model, hw = model_config(), HardwareConfig()
    assert resolve_frozen_dtype(model, hw, on_cpu=False, precision="bf16") == "bfloat16"
    assert resolve_frozen_dtype(model, hw, on_cpu=False, precision="fp16") == "float16"
    assert resolve_frozen_dtype(model, hw, on_cpu=False, precision="no") == "float32"
    assert resolve_frozen_dtype(model, hw, on_cpu=True, precision="bf16") == "float32"
    fsdp = HardwareConfig(distributed="fsdp")
    assert resolve_frozen_dtype(model, fsdp, on_cpu=False, precision="bf16", world_size=2) == "float32"
    explicit = model_config(frozen_dtype="bfloat16")
    assert resolve_frozen_dtype(explicit, hw, on_cpu=True, precision="bf16") == "bfloat16"


def test_a_low_precision_base_without_autocast_is_refused():
    cfg = SimpleNamespace(model=model_config(frozen_dtype="bfloat16"),
                          hardware=HardwareConfig(device="cpu", mixed_precision=MixedPrecision.no))
    (problem,) = frozen_dtype_problems(cfg, on_cpu=True)
    assert "needs autocast" in problem and "hardware.mixed_precision=bf16" in problem
    cfg.hardware.mixed_precision = MixedPrecision.bf16
    assert frozen_dtype_problems(cfg, on_cpu=True) == []
