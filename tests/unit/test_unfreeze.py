"""Staged unfreezing (mode.unfreeze): which weights train from when, and held-back weights stay untouched."""

import pytest
import torch

from acestep_ft.config import FullMode, OptimConfig, TrainModule, UnfreezeStage
from acestep_ft.model import load_model
from acestep_ft.train.optim import build_optimizer
from acestep_ft.train.trainable import drop_held_grads, held_back, make_trainable, unfreeze_starts
from conftest import model_config


def test_starts_per_parameter():
    decoder = load_model(model_config()).decoder
    stages = [UnfreezeStage(pattern=r"^layers\.1\."), UnfreezeStage(pattern="", at_step=7),
              UnfreezeStage(pattern="proj_out", at_epoch=2)]
    starts = unfreeze_starts(decoder, stages, steps_per_epoch=3)
    assert set(starts) == {n for n, _ in decoder.named_parameters()}
    assert all(v == 0 for n, v in starts.items() if n.startswith("layers.1."))
    assert all(v == 6 for n, v in starts.items() if n.startswith("proj_out"))  # epoch 2 x 3 steps, before step 7
    assert starts["layers.0.self_attn.q_proj.weight"] == 7


@pytest.mark.parametrize("stage,message", [
    (UnfreezeStage(module=TrainModule.condition_encoder), "needs the condition encoder in the trained module"),
    (UnfreezeStage(pattern="nope_not_a_layer"), "matches no decoder parameter"),
    (UnfreezeStage(pattern="(unclosed"), "not a valid regex"),
])
def test_bad_stages_are_refused(stage, message):
    with pytest.raises(ValueError, match=message):
        unfreeze_starts(load_model(model_config()).decoder, [stage], 1)


def test_held_back_weights_do_not_move_until_their_stage():
    torch.manual_seed(0)
    model = load_model(model_config())
    mode = FullMode(unfreeze=[UnfreezeStage(pattern=r"^layers\.0\."), UnfreezeStage(pattern=r"^layers\.1\.", at_step=2)])
    decoder = make_trainable(model, mode)
    trained = {n for n, p in decoder.named_parameters() if p.requires_grad}
    assert trained == {n for n, _ in decoder.named_parameters() if n.startswith(("layers.0.", "layers.1."))}
    held = held_back(decoder, unfreeze_starts(decoder, mode.unfreeze, 1))
    assert [start for start, _ in held] == [2]
    opt = build_optimizer(decoder, OptimConfig(lr=1e-2, weight_decay=0.1))
    before = {n: p.detach().clone() for n, p in decoder.named_parameters()}
    snapshots = []
    for step in range(4):
        loss = sum((p ** 2).sum() for p in decoder.parameters() if p.requires_grad)
        loss.backward()
        drop_held_grads(held, step)
        opt.step()
        opt.zero_grad(set_to_none=True)
        snapshots.append({n: p.detach().clone() for n, p in decoder.named_parameters()})
    for n, p in decoder.named_parameters():
        if n.startswith("layers.1."):  # held for steps 0 and 1: untouched, then trained from step 2 on
            assert torch.equal(snapshots[1][n], before[n]), n
            assert not torch.equal(snapshots[2][n], snapshots[1][n]), n
            assert opt.state[p]["step"] == 2  # no optimizer state before its stage: 2 updates, not 4
        elif n.startswith("layers.0."):
            assert not torch.equal(snapshots[0][n], before[n]), n
        else:
            assert torch.equal(snapshots[3][n], before[n]), n  # never trained
