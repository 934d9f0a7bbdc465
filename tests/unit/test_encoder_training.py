"""Training on the condition encoder's inputs: the step runs the encoder (frozen: no autograd, the same loss as the
stored outputs; trained: it gets gradients, unless CFG dropout replaced its output), stages unfreeze it, and its token
table comes from the text encoder's files."""

from dataclasses import replace

import pytest
import torch
from safetensors.torch import save_file

from acestep_ft.config import Conditions, FullMode, ObjectiveConfig, SyntheticDataset, TrainModule, UnfreezeStage
from acestep_ft.data import ConditionWidths, collate, make_synthetic_samples
from acestep_ft.errors import ConfigError, UserError
from acestep_ft.model import load_model
from acestep_ft.train.conditioning import Conditioner, load_token_table
from acestep_ft.train.step import flow_matching_loss
from acestep_ft.train.trainable import (DecoderAndEncoder, held_back, make_trainable, trained_at_load,
                                        unfreeze_starts)
from conftest import model_config


def setup(num: int = 3, seed: int = 0):
    torch.manual_seed(seed)
    cfg = model_config()
    model = load_model(cfg)
    widths = ConditionWidths(encoder=model.null_condition_emb.shape[-1], text=cfg.text_hidden_dim,
                             vocab=cfg.text_vocab_size)
    data = SyntheticDataset(num_samples=num, conditions=Conditions.encoder_inputs)
    batch = collate(make_synthetic_samples(data, widths)).float()
    return cfg, model, Conditioner(model.encoder, load_token_table(cfg, torch.float32)), batch


def precomputed(conditioner: Conditioner, batch):
    """The batch as encoder-outputs data: each sample's condition computed on its own, as preprocessing does."""
    rows = [conditioner(replace(batch, keys=[k], **{f: getattr(batch, f)[i:i + 1] for f in (
        "text_hidden_states", "text_attention_mask", "lyric_token_ids", "lyric_attention_mask", "text_lengths",
        "lyric_lengths")},
        refer_audio_latents=batch.refer_audio_latents[batch.refer_audio_order == i],
        refer_audio_order=torch.zeros(int((batch.refer_audio_order == i).sum()), dtype=torch.long)))
        for i, k in enumerate(batch.keys)]
    return replace(batch, encoder_hidden_states=torch.cat([h for h, _ in rows]),
                   encoder_attention_mask=torch.cat([m for _, m in rows]))


@pytest.mark.parametrize("masks", [False, True])
def test_frozen_encoder_gives_the_losses_of_its_stored_outputs_bit_for_bit(masks):
    cfg, model, conditioner, batch = setup()
    model.requires_grad_(False)
    model.decoder.requires_grad_(True)
    outputs = precomputed(conditioner, batch)
    objective = ObjectiveConfig(cfg_ratio=0.5, attention_mask=masks, loss_mask=masks)
    losses = []
    for encode, data in ((None, outputs), (conditioner, batch)):
        g = torch.Generator().manual_seed(3)
        steps = [flow_matching_loss(model.decoder, model.null_condition_emb, data, objective, -0.4, 1.0, g, encode)
                 for _ in range(4)]
        losses.append(torch.stack(steps))
    assert torch.equal(losses[0], losses[1])
    loss = flow_matching_loss(model.decoder, model.null_condition_emb, batch, objective, -0.4, 1.0, encode=conditioner)
    loss.backward()  # a frozen encoder runs without autograd: no graph through it, no gradient
    assert all(p.grad is None for p in model.encoder.parameters())


@pytest.mark.parametrize("cfg_ratio,gets_grad", [(0.0, True), (1.0, False)])
def test_trained_encoder_gets_gradients_unless_cfg_dropout_replaced_its_output(cfg_ratio, gets_grad):
    _, model, conditioner, batch = setup()
    mode = FullMode(unfreeze=[UnfreezeStage(module=TrainModule.condition_encoder, pattern="lyric_encoder")])
    trained = make_trainable(model, mode)
    loss = flow_matching_loss(trained, model.null_condition_emb, batch, ObjectiveConfig(cfg_ratio=cfg_ratio), -0.4,
                              1.0, encode=conditioner)
    loss.backward()
    grads = [p.grad for n, p in model.encoder.named_parameters() if n.startswith("lyric_encoder.")]
    assert grads and all((g is not None and bool(g.abs().sum() > 0)) == gets_grad for g in grads)
    assert all(p.grad is None for n, p in model.encoder.named_parameters() if not n.startswith("lyric_encoder."))


def test_encoder_stages_use_official_names_and_start_when_asked():
    model = load_model(model_config())
    mode = FullMode(unfreeze=[UnfreezeStage(pattern=r"^layers\.0\."),
                              UnfreezeStage(module=TrainModule.condition_encoder, pattern="lyric_encoder|text_proj",
                                            at_step=3)])
    trained = make_trainable(model, mode)
    assert isinstance(trained, DecoderAndEncoder)
    names = {n for n, p in trained.named_parameters() if p.requires_grad}
    assert names == ({f"decoder.{n}" for n, _ in model.decoder.named_parameters() if n.startswith("layers.0.")}
                     | {f"encoder.{n}" for n, _ in model.encoder.named_parameters()
                        if n.startswith(("lyric_encoder.", "text_projector."))})
    starts = unfreeze_starts(trained, mode.unfreeze, steps_per_epoch=1)
    assert {n for n, s in starts.items() if s == 3} == {n for n in names if n.startswith("encoder.")}
    assert [s for s, _ in held_back(trained, starts)] == [3]
    assert set(trained.state_dict()) <= set(model.state_dict())  # official keys: the export and resume read them
    loaded_fp32 = trained_at_load(mode)
    assert loaded_fp32("encoder.text_projector.weight") and loaded_fp32("decoder.proj_in.1.weight")
    assert not loaded_fp32("tokenizer.quantizer.project_in.weight")
    assert not trained_at_load(FullMode())("encoder.text_projector.weight")


def test_out_of_range_lyric_ids_name_the_sample():
    _, _, conditioner, batch = setup()
    ids = batch.lyric_token_ids.clone()
    ids[1, 2] = conditioner.table.shape[0]
    with pytest.raises(UserError, match=f"sample {batch.keys[1]}: lyric token id {ids[1, 2]}"):
        conditioner(replace(batch, lyric_token_ids=ids))


def test_ids_the_data_layer_checked_are_not_read_back_in_every_step():
    """run.py passes checked_below=model.text_vocab_size (the data rejects larger ids): with a table at least that
    big the step does not look at the ids on the host; a smaller table keeps the check."""
    cfg, model, conditioner, batch = setup()
    rows = conditioner.table.shape[0]
    ids = batch.lyric_token_ids.clone()
    ids[0, 0] = rows
    trusting = Conditioner(model.encoder, conditioner.table, checked_below=rows)
    with pytest.raises(IndexError):  # not the Conditioner's message: no check ran
        trusting(replace(batch, lyric_token_ids=ids))
    checking = Conditioner(model.encoder, conditioner.table, checked_below=rows + 1)
    with pytest.raises(UserError, match="outside the text encoder's table"):
        checking(replace(batch, lyric_token_ids=ids))


def test_token_table_comes_from_the_text_encoder_beside_the_checkpoint(tmp_path):
    cfg = model_config()
    table = torch.randn(40, cfg.text_hidden_dim)
    text_dir = tmp_path / "Qwen3-Embedding-0.6B"
    text_dir.mkdir()
    save_file({"embed_tokens.weight": table, "layers.0.mlp.up_proj.weight": torch.zeros(2, 2)},
              str(text_dir / "model.safetensors"))
    (tmp_path / "dit").mkdir()
    assert torch.equal(load_token_table(replace(cfg, path=str(tmp_path / "dit")), torch.float32), table)
    assert torch.equal(load_token_table(replace(cfg, text_encoder_path=str(text_dir)), torch.bfloat16),
                       table.bfloat16())
    with pytest.raises(UserError, match="model.text_hidden_dim"):
        load_token_table(replace(cfg, text_encoder_path=str(text_dir), text_hidden_dim=8), torch.float32)
    with pytest.raises(ConfigError, match="model.text_encoder_path"):
        load_token_table(replace(cfg, path=str(tmp_path / "elsewhere" / "dit")), torch.float32)
    random = load_token_table(cfg, torch.float32)  # random init: a fixed random table of text_vocab_size rows
    assert random.shape == (cfg.text_vocab_size, cfg.text_hidden_dim) and torch.equal(random, load_token_table(
        cfg, torch.float32))


def test_encoder_weights_join_their_own_parameter_group():
    from omegaconf import OmegaConf

    from acestep_ft.config import OptimConfig
    from acestep_ft.train.optim import param_groups
    from conftest import ROOT

    optim = OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(OptimConfig),
                                                OmegaConf.load(ROOT / "conf" / "optim" / "adamw_groups.yaml")))
    model = load_model(model_config())
    trained = make_trainable(model, FullMode(unfreeze=[
        UnfreezeStage(), UnfreezeStage(module=TrainModule.condition_encoder, pattern=".", at_step=5)]))
    groups = {g["name"]: g for g in param_groups(trained, optim)}
    ids = {id(p): n for n, p in trained.named_parameters()}
    encoder = {ids[id(p)] for g in ("condition_encoder", "condition_encoder/no_decay") for p in groups[g]["params"]}
    # every encoder weight but the timbre CLS token, which a 2B-shaped model never reads (no gradient; DDP would hang)
    assert encoder == {n for n in ids.values() if n.startswith("encoder.")} - {"encoder.timbre_encoder.special_token"}
    assert groups["condition_encoder"]["lr"] == pytest.approx(0.1 * optim.lr)
    assert groups["condition_encoder/no_decay"]["weight_decay"] == 0.0  # norms and biases
    no_decay = {ids[id(p)] for p in groups["condition_encoder/no_decay"]["params"]}
    assert "encoder.lyric_encoder.norm.weight" in no_decay
    xl = make_trainable(load_model(model_config(timbre_special_token=True)), FullMode(unfreeze=[
        UnfreezeStage(module=TrainModule.condition_encoder, pattern="special_token")]))
    assert [n for n, p in xl.named_parameters() if p.requires_grad] == ["encoder.timbre_encoder.special_token"]
    embed = {ids[id(p)] for p in groups["embed_proj"]["params"]}  # decoder names keep their groups under decoder.*
    assert "decoder.proj_in.1.weight" in embed and "decoder.time_embed.linear_1.weight" in embed


def test_batched_encoding_of_different_lengths_equals_each_sample_encoded_alone():
    """Lyrics / captions of different lengths: the batch pads them, but each row comes out as the sample's stored
    outputs (its own masked tokens kept, zeros after its own L), so the decoder sees what outputs data would give."""
    _, model, conditioner, _ = setup()
    cfg = model_config()
    widths = ConditionWidths(encoder=model.null_condition_emb.shape[-1], text=cfg.text_hidden_dim,
                             vocab=cfg.text_vocab_size)
    a, b = make_synthetic_samples(SyntheticDataset(num_samples=2, conditions=Conditions.encoder_inputs), widths)
    lyric_mask, text_mask = torch.ones(10), torch.ones(6)
    lyric_mask[8:], text_mask[5:] = 0, 0  # a's own padding tokens stay in its stored outputs
    a = replace(a, lyric_token_ids=a.lyric_token_ids[:10], lyric_attention_mask=lyric_mask,
                text_hidden_states=a.text_hidden_states[:6], text_attention_mask=text_mask,
                refer_audio_latents=torch.zeros(2, 1, 64))  # and two timbre references
    alone = [conditioner(collate([s]).float()) for s in (a, b)]
    assert alone[0][0].shape[1] == 10 + 2 + 6 and alone[1][0].shape[1] == 16 + 1 + 8
    hidden, mask = conditioner(collate([a, b]).float())
    assert hidden.shape[1] == 25 and not mask[0, 18:].any() and not hidden[0, 18:].any()
    for row, (h, m) in enumerate(alone):
        n = h.shape[1]
        torch.testing.assert_close(hidden[row, :n], h[0], rtol=1e-5, atol=1e-5)  # other shapes: float rounding
        assert torch.equal(mask[row, :n], m[0])
