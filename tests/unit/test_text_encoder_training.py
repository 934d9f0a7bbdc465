"""mode.text_encoder=lora: the step runs the text encoder (a PEFT LoRA on the tiny random Qwen3 of the preprocessing
tests) on the caption token ids; a fresh LoRA gives the text states the data stores, the LoRA gets gradients through
the condition encoder, its weights are saved and loaded beside the trained weights, and bad setups are refused."""

from dataclasses import replace
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from acestep_ft.config import (Conditions, Distributed, FullMode, LoraMode, ObjectiveConfig, PromptSample,
                               SamplerConfig, SyntheticDataset, TextEncoderTraining, TextLora)
from acestep_ft.data import ConditionWidths, collate, make_synthetic_samples
from acestep_ft.errors import ConfigError, UserError
from acestep_ft.model import load_model
from acestep_ft.train.checkpoint import load_weights, signature
from acestep_ft.train.conditioning import Conditioner, load_token_table
from acestep_ft.train.step import flow_matching_loss
from acestep_ft.train.text_encoder import TEXT_ADAPTER_DIR, load_text_model, run_text_encoder
from acestep_ft.train.trainable import make_trainable, text_encoder_of, trainable_state_dict, write_trained
from conftest import model_config
from test_preprocess import WORDS, build_checkpoints, tiny_text_encoder

VOCAB = len(WORDS) + 2  # the tiny tokenizer's <unk>, <|endoftext|> and words


@pytest.fixture(scope="module")
def text_dir(tmp_path_factory) -> Path:
    directory = tmp_path_factory.mktemp("qwen") / "Qwen3-Embedding-0.6B"
    tiny_text_encoder(directory, 32)
    return directory


def lora_mode(kind=LoraMode, **kw):
    return kind(text_encoder=TextEncoderTraining.lora, text_lora=TextLora(rank=4, **kw))


def setup(text_dir: Path, mode, num: int = 3):
    """(model cfg, model, trained module, frozen-text Conditioner, text-LoRA Conditioner, batch whose stored text
    states are the text encoder's output for its token ids)."""
    torch.manual_seed(0)
    cfg = replace(model_config(), text_encoder_path=str(text_dir), text_vocab_size=VOCAB)
    model = load_model(cfg)
    trained = make_trainable(model, mode, load_text_model(cfg))
    text = text_encoder_of(trained)
    widths = ConditionWidths(encoder=model.null_condition_emb.shape[-1], text=32, vocab=VOCAB)
    batch = collate(make_synthetic_samples(SyntheticDataset(num_samples=num, conditions=Conditions.encoder_inputs),
                                           widths)).float()
    with torch.no_grad():  # what preprocessing stores: each caption through the text encoder alone
        states = torch.cat([run_text_encoder(text, batch.text_token_ids[i:i + 1]) for i in range(num)])
    batch = replace(batch, text_hidden_states=states)
    table = load_token_table(cfg, torch.float32)
    return cfg, model, trained, Conditioner(model.encoder, table), Conditioner(model.encoder, table, text), batch


def test_a_fresh_text_lora_gives_the_stored_states_and_then_trains(text_dir):
    cfg, model, trained, frozen, lora, batch = setup(text_dir, lora_mode())
    text = text_encoder_of(trained)
    objective = ObjectiveConfig(cfg_ratio=0.0)
    losses = [flow_matching_loss(trained, model.null_condition_emb, batch, objective, -0.4, 1.0,
                                 torch.Generator().manual_seed(3), encode) for encode in (frozen, lora)]
    torch.testing.assert_close(losses[1], losses[0], rtol=1e-6, atol=1e-7)  # batched vs one caption at a time
    losses[1].backward()
    grads = {n: p.grad for n, p in text.named_parameters() if p.requires_grad}
    assert grads and all(n.count("lora_") == 1 for n in grads)  # only the LoRA trains
    assert all(g is not None and float(g.abs().max()) > 0 for n, g in grads.items() if "lora_B" in n)
    assert all(p.grad is None for n, p in text.named_parameters() if not p.requires_grad)
    assert all(p.grad is None for p in model.encoder.parameters())  # the frozen condition encoder passes it on


def test_missing_caption_token_ids_name_the_fix(text_dir):
    *_, lora, batch = setup(text_dir, lora_mode(), num=1)
    with pytest.raises(UserError, match="preprocess.store=inputs or both"):
        lora(replace(batch, text_token_ids=None))


@pytest.mark.parametrize("kind", [LoraMode, FullMode])
def test_the_text_lora_is_saved_beside_the_trained_weights_and_loads_back(text_dir, tmp_path, kind):
    cfg, model, trained, *_ = setup(text_dir, lora_mode(kind))
    with torch.no_grad():
        for p in trained.parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p))
    keys = set(trainable_state_dict(trained))
    text_keys = {k for k in keys if k.startswith("text_encoder.")}
    assert text_keys and all("lora_" in k for k in text_keys)  # the adapter, not the text encoder's base weights
    folder = tmp_path / ("model" if kind is FullMode else "adapter")
    write_trained(model, trained, folder, torch.float32)
    assert (folder / TEXT_ADAPTER_DIR / "adapter_config.json").is_file()
    if kind is FullMode:  # the official model file holds the model only
        from safetensors import safe_open

        with safe_open(str(folder / "model.safetensors"), "pt") as f:
            assert not any("text_encoder" in k or "lora" in k for k in f.keys())
    _, _, fresh, *_ = setup(text_dir, lora_mode(kind))
    assert signature(fresh) == signature(trained)
    load_weights(tmp_path, fresh, kind.name)
    mine, theirs = trainable_state_dict(trained), trainable_state_dict(fresh)
    assert all(torch.equal(mine[k], theirs[k]) for k in mine)


def test_prompts_carrying_encoder_inputs_render_as_the_encoded_ones(text_dir, tmp_path):
    """Previews of a run whose step encodes the conditions tokenize the prompts once and encode them at every render
    with the encoders as they are then: with frozen encoders that is the condition preprocessing would store."""
    from acestep_ft.preprocess.prompts import encode_prompts
    from acestep_ft.train.flow_sampler import resolve_sampler
    from acestep_ft.train.previews import render_prompt

    dit = build_checkpoints(tmp_path / "ckpt")
    cfg = replace(model_config(), path=str(dit))
    model = load_model(cfg).eval()
    prompts = [PromptSample(caption="lofi piano warm", lyrics="la da di", duration=0.6, seed=1)]
    vae = SimpleNamespace(config=SimpleNamespace(sampling_rate=2400))
    text = dit.parent / "Qwen3-Embedding-0.6B"
    outputs, inputs = (encode_prompts(prompts, model, cfg, text, vae, "cpu", torch.float32, "k", inputs=flag)
                       for flag in (False, True))
    assert inputs[0].encoder_hidden_states is None and inputs[0].text_token_ids is not None
    conditioner = Conditioner(model.encoder, load_token_table(cfg, torch.float32))
    sampler = resolve_sampler(SamplerConfig(steps=2), True)
    with torch.no_grad():
        a = render_prompt(model.decoder, outputs[0], 1, sampler, None, "cpu")
        b = render_prompt(model.decoder, inputs[0], 1, sampler, None, "cpu", encode=conditioner)
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_bad_setups_are_refused_with_their_fix(text_dir):
    from acestep_ft.checks import text_encoder_problems
    from acestep_ft.config import Config, HardwareConfig, OptimConfig, TrainConfig
    from acestep_ft.distributed import strategy_problems

    model = replace(model_config(), text_encoder_path=str(text_dir), text_vocab_size=VOCAB)
    base = Config(model=model, mode=lora_mode(), dataset=SyntheticDataset(conditions=Conditions.encoder_inputs),
                  hardware=HardwareConfig(), optim=OptimConfig(), train=TrainConfig())
    assert text_encoder_problems(base) == []
    assert text_encoder_problems(replace(base, mode=LoraMode())) == []  # frozen: nothing to check
    problems = "\n".join(
        text_encoder_problems(replace(base, dataset=SyntheticDataset()))
        + text_encoder_problems(replace(base, model=replace(model, text_encoder_adapter="x")))
        + strategy_problems(replace(base, hardware=HardwareConfig(distributed=Distributed.fsdp)), on_cpu=False)
        + text_encoder_problems(replace(base, mode=lora_mode(target_modules=["nope"])))
        + text_encoder_problems(replace(base, model=replace(model, text_encoder_path=None))))
    for fix in ("dataset.conditions=encoder_inputs", "model.text_encoder_adapter=null", "hardware.distributed=ddp",
                "mode.text_lora.target_modules=['nope']", "model.text_encoder_path="):
        assert fix in problems


def test_a_text_encoder_adapter_that_is_not_one_is_refused(text_dir, tmp_path):
    from acestep_ft.preprocess.encoders import load_text_encoder

    with pytest.raises(ConfigError, match="not a PEFT adapter directory"):
        load_text_encoder(text_dir, 32, "model.text_encoder_path", str(tmp_path))
