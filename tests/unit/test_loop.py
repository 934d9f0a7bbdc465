"""The loop driven directly: a non-finite loss never reaches the weights; halt saves the last finite state, skip
drops the step and halts after too many in a row; a stop request saves and leaves after the current step."""

import signal

import pytest
import torch
from accelerate import Accelerator

from acestep_ft.config import LoraMode, NonfinitePolicy, ObjectiveConfig, OptimConfig, SyntheticDataset, TrainConfig
from acestep_ft.data import BatchStream, EpochBatchSampler, InMemorySource, make_synthetic_samples
from acestep_ft.data.prefetch import Prefetcher
from acestep_ft.errors import UserError
from acestep_ft.model import load_model
from acestep_ft.train.lifecycle import StopSignals
from acestep_ft.train.loop import LoopParts, train_loop
from acestep_ft.train.optim import build_optimizer, build_scheduler
from acestep_ft.train.trainable import make_trainable
from conftest import model_config


class NullSink:
    def __init__(self):
        self.logged = {}

    def log(self, step, metrics):
        self.logged[step] = metrics


def make_parts(bad=(), num_samples=4, batch_size=2, stop=None):
    """A tiny LoRA setup over synthetic samples; samples whose index is in `bad` hold a NaN."""
    torch.manual_seed(0)
    model = load_model(model_config())
    decoder = make_trainable(model, LoraMode(rank=2, alpha=2))
    samples = make_synthetic_samples(SyntheticDataset(num_samples=num_samples), 64)
    for i in bad:
        samples[i].target_latents[0, 0] = float("nan")
    stream = BatchStream(InMemorySource(samples), EpochBatchSampler(num_samples, batch_size, seed=0, shuffle=False))
    acc = Accelerator(cpu=True)
    optimizer = build_optimizer(decoder, OptimConfig())
    prefetcher = Prefetcher(stream, acc.device)
    parts = LoopParts(acc, decoder, model.null_condition_emb.detach(), optimizer,
                      build_scheduler(optimizer, 8, OptimConfig()), prefetcher, ObjectiveConfig(), -0.4, 1.0,
                      stop=stop)
    return parts, samples


def trained(parts):
    return {n: p.detach().clone() for n, p in parts.decoder.named_parameters() if p.requires_grad}


def test_halt_saves_the_last_finite_state_and_names_the_samples():
    parts, samples = make_parts(bad=[3])  # batch 2 of the epoch (samples 2, 3) is bad: step 2 fails
    saves = []

    def save(step, note=None):
        saves.append((step, note, trained(parts)))

    try:
        with pytest.raises(UserError, match=rf"(?s)step 2 .*'{samples[3].key}'.*checkpoint step 1.*acestep_ft.data.validate"):
            train_loop(parts, TrainConfig(max_steps=4, save_every=100), 0, NullSink(), save, grad_clip=1.0)
    finally:
        parts.batches.close()
    (step, note, weights), = saves
    assert step == 1 and "emergency save" in note and "non-finite" in note
    assert all(torch.isfinite(w).all() for w in weights.values())
    assert all(torch.equal(w, p) for w, p in zip(weights.values(), trained(parts).values()))  # nothing applied after


def test_skip_drops_the_step_counts_it_and_halts_after_too_many_in_a_row():
    parts, samples = make_parts(bad=[3], num_samples=8)  # 4 batches per epoch, the second one bad
    sink, saves = NullSink(), []
    cfg = TrainConfig(max_steps=5, save_every=100, nonfinite=NonfinitePolicy.skip, max_nonfinite_skips=3)
    try:
        losses = train_loop(parts, cfg, 0, sink, lambda step, note=None: saves.append(step), grad_clip=1.0)
    finally:
        parts.batches.close()
    # 5 finite steps in 6 batches: the bad batch of each epoch is dropped without an update
    assert len(losses) == 5 and all(torch.isfinite(torch.tensor(losses)))
    assert parts.nonfinite_skips == 2 and sink.logged[5]["train/nonfinite_skips"] == 2
    assert saves == [5] and all(torch.isfinite(w).all() for w in trained(parts).values())

    parts, _ = make_parts(bad=range(8), num_samples=8)  # every batch bad: halt at the 3rd in a row
    saves = []
    try:
        with pytest.raises(UserError, match="3 non-finite steps in a row"):
            train_loop(parts, cfg, 0, NullSink(), lambda step, note=None: saves.append((step, note)), grad_clip=1.0)
    finally:
        parts.batches.close()
    assert [s for s, _ in saves] == [0] and parts.nonfinite_skips == 3


def test_a_stop_request_saves_after_the_current_step_and_leaves():
    stop = StopSignals()
    parts, _ = make_parts(stop=stop)
    saves = []

    def save(step, note=None):
        saves.append((step, note))
        if step == 2:
            stop.signum = signal.SIGUSR1  # as the handler does when the signal arrives mid-step

    try:
        losses = train_loop(parts, TrainConfig(max_steps=8, save_every=2), 0, NullSink(), save, grad_clip=1.0)
    finally:
        parts.batches.close()
    assert len(losses) == 3 and saves == [(2, None), (3, "stopped by SIGUSR1")] and stop.agreed_signum == signal.SIGUSR1


def test_a_held_back_fp16_step_closes_the_grad_scaler_step(monkeypatch):
    """fp16: clipping unscales the gradients; a held-back step must still update the scaler, or the next step's
    unscale fails ("unscale_() has already been called"). A CPU GradScaler stands in for CUDA's."""
    from types import SimpleNamespace

    import acestep_ft.train.loop as loop

    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(reset_partial_state=True)  # the state is a singleton: earlier tests set "no"
    acc = Accelerator(cpu=True, mixed_precision="fp16")
    acc.scaler, acc.native_amp = torch.amp.GradScaler("cpu"), True
    model = torch.nn.Linear(4, 1)
    model, optimizer = acc.prepare(model, torch.optim.SGD(model.parameters(), lr=0.1))
    calls = []

    def loss_nan_first(decoder, *args, **kwargs):
        calls.append(1)
        out = decoder(torch.randn(2, 4)).mean()
        return out * float("nan") if len(calls) == 1 else out

    monkeypatch.setattr(loop, "flow_matching_loss", loss_nan_first)
    batches = SimpleNamespace(next=lambda: (SimpleNamespace(keys=["a", "b"], attention_mask=torch.ones(2, 3)), 0.0))
    parts = SimpleNamespace(accelerator=acc, batches=batches, decoder=model, null_embedding=None, objective=None,
                            timestep_mu=0.0, timestep_sigma=1.0, held=[], optimizer=optimizer, encode=None)
    scale = acc.scaler.get_scale()
    first = loop.accumulate_and_step(parts, 1, list(model.parameters()), 1.0, 0, True)
    second = loop.accumulate_and_step(parts, 1, list(model.parameters()), 1.0, 0, True)
    AcceleratorState._reset_state(reset_partial_state=True)
    assert not first.applied and second.applied and acc.scaler.get_scale() < scale
