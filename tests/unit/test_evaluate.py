"""Validation loss determinism, the fixed validation batches, the flow sampler and early stopping."""

import math

import pytest
import torch
from accelerate import Accelerator

from acestep_ft.config import ObjectiveConfig, SyntheticDataset
from acestep_ft.data.dataset import InMemorySource, SubsetSource, held_out, split_train_val
from acestep_ft.data.synthetic import make_synthetic_samples
from acestep_ft.model import load_model
from acestep_ft.train.early_stop import EarlyStopping
from acestep_ft.train.evaluate import ValidationSet, fixed_noise, per_sample_loss, validation_loss
from acestep_ft.train.flow_sampler import flow_schedule, sample_latents
from conftest import model_config


@pytest.fixture(scope="module")
def setup():
    torch.manual_seed(0)
    model = load_model(model_config())
    width = model.null_condition_emb.shape[-1]
    source = InMemorySource(make_synthetic_samples(SyntheticDataset(num_samples=7, min_frames=10, max_frames=30),
                                                   width))
    return model, source, Accelerator(cpu=True)


def test_same_weights_give_the_same_validation_loss_exactly(setup):
    model, source, acc = setup
    val = ValidationSet(source, batch_size=3, max_frames=0, seed=5)
    cfg = ObjectiveConfig()
    first = validation_loss(acc, model.decoder, val, cfg, -0.4, 1.0)
    model.decoder.train()
    torch.randn(100)  # the global RNG moving on changes nothing
    assert validation_loss(acc, model.decoder, val, cfg, -0.4, 1.0) == first
    assert model.decoder.training  # the mode is restored
    other_seed = validation_loss(acc, model.decoder, ValidationSet(source, 3, 0, seed=6), cfg, -0.4, 1.0)
    assert other_seed != first and math.isfinite(first)


def test_with_masks_a_samples_loss_does_not_depend_on_its_batch(setup):
    model, source, acc = setup
    cfg = ObjectiveConfig(attention_mask=True)  # padding then cannot reach real frames
    losses = [validation_loss(acc, model.decoder, ValidationSet(source, bs, 0, seed=1), cfg, -0.4, 1.0)
              for bs in (1, 3, 7)]
    assert losses[1] == pytest.approx(losses[0], rel=1e-5) and losses[2] == pytest.approx(losses[0], rel=1e-5)


def test_validation_batches_are_dealt_to_processes_once_each():
    source = InMemorySource(make_synthetic_samples(SyntheticDataset(num_samples=7, min_frames=5, max_frames=40), 8))
    plans = [ValidationSet(source, 2, 0, 0, rank=r, world_size=3).plan for r in range(3)]
    assert len({len(p) for p in plans}) == 1  # every process runs as many forwards
    counted = sorted(i for plan in plans for batch, c in plan if c for i in batch)
    assert counted == list(range(7))
    assert sum(not c for plan in plans for _, c in plan) == 2  # 4 batches over 3 processes: 2 fillers
    lengths = source.lengths
    for batch, _ in plans[0]:
        assert [lengths[i] for i in batch] == sorted(lengths[i] for i in batch)


def test_noise_of_a_sample_ignores_its_batch():
    a = fixed_noise(["x", "y"], [4, 6], seed=0, purpose="val")
    b = fixed_noise(["y"], [6], seed=0, purpose="val")
    assert torch.equal(a[1], b[0]) and torch.equal(a[0, 4:], torch.zeros(2, 64))
    assert not torch.equal(fixed_noise(["y"], [6], 1, "val"), b)


def test_per_sample_loss_ignores_padding():
    pred, target = torch.zeros(2, 4, 3), torch.ones(2, 4, 3)
    target[0, 2:] = 100.0  # padded frames of sample 0
    mask = torch.tensor([[1, 1, 0, 0], [1, 1, 1, 1]])
    assert per_sample_loss(pred, target, mask).tolist() == [1.0, 1.0]


def test_flow_sampler_follows_the_exact_flow_to_the_data():
    x0, noise = torch.randn(2, 5, 64), torch.randn(2, 5, 64)

    def oracle(hidden_states, timestep, **_):  # the true velocity of the straight path is constant: noise - x0
        return noise - x0

    class B:
        encoder_hidden_states = context_latents = attention_mask = encoder_attention_mask = None

    out = sample_latents(oracle, B(), noise, steps=5, shift=3.0, use_masks=False)
    torch.testing.assert_close(out, x0, atol=1e-5, rtol=1e-5)
    t = flow_schedule(4, 3.0)
    assert t[0] == 1.0 and t[-1] == 0.0 and bool((t[:-1] > t[1:]).all())
    assert float(t[2]) == pytest.approx(3 * 0.5 / (1 + 2 * 0.5))  # the official shift formula


def test_early_stopping_triggers_on_a_plateau():
    es = EarlyStopping(patience=2, min_delta=0.01)
    assert es.update(1.0, 10) and not es.should_stop
    assert es.update(0.9, 20)
    assert not es.update(0.895, 30) and not es.should_stop  # improved by less than min_delta: not an improvement
    assert not es.update(0.95, 40) and es.should_stop
    assert (es.best, es.best_step) == (0.9, 20)
    restored = EarlyStopping(2, 0.01)
    restored.load_state_dict(es.state_dict())
    assert restored.should_stop and restored.best_step == 20
    assert not EarlyStopping(patience=0).should_stop


def test_split_is_a_stable_function_of_the_keys():
    samples = make_synthetic_samples(SyntheticDataset(num_samples=200, min_frames=4, max_frames=8), 8)
    train, val = split_train_val(InMemorySource(samples), 0.2)
    assert 20 <= len(val) <= 60 and len(train) + len(val) == 200
    assert not set(train.keys) & set(val.keys)
    more = InMemorySource(samples[:100] + make_synthetic_samples(SyntheticDataset(num_samples=50, seed=9), 8))
    _, val_more = split_train_val(more, 0.2)
    assert {k for k in val.keys if k in set(more.keys)} <= set(val_more.keys)  # old samples keep their side
    assert all(held_out(k, 0.2) for k in val.keys)
    sub = SubsetSource(InMemorySource(samples), [5, 2])
    assert sub.keys == [samples[5].key, samples[2].key] and sub[1] is samples[2] and len(sub) == 2
    with pytest.raises(ValueError, match="both need at least one"):
        split_train_val(InMemorySource(samples[:1]), 0.5)
