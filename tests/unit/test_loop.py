"""The loop driven directly: a non-finite loss stops training with the batch's samples and the way to find bad data."""

import pytest
import torch
from accelerate import Accelerator

from acestep_ft.config import LoraMode, ObjectiveConfig, OptimConfig, SyntheticDataset, TrainConfig
from acestep_ft.data import BatchStream, EpochBatchSampler, InMemorySource, make_synthetic_samples
from acestep_ft.data.prefetch import Prefetcher
from acestep_ft.model import load_model
from acestep_ft.train.loop import LoopParts, train_loop
from acestep_ft.train.optim import build_optimizer, build_scheduler
from acestep_ft.train.trainable import make_trainable
from conftest import model_config


class NullSink:
    def log(self, step, metrics):
        self.last = metrics


def test_nan_in_the_data_stops_with_the_sample_names(tmp_path):
    torch.manual_seed(0)
    model = load_model(model_config())
    decoder = make_trainable(model, LoraMode(rank=2, alpha=2))
    samples = make_synthetic_samples(SyntheticDataset(num_samples=4), 64)
    samples[1].target_latents[0, 0] = float("nan")
    stream = BatchStream(InMemorySource(samples), EpochBatchSampler(4, 2, seed=0, shuffle=False))
    acc = Accelerator(cpu=True)
    optimizer = build_optimizer(decoder, OptimConfig())
    prefetcher = Prefetcher(stream, acc.device)
    parts = LoopParts(acc, decoder, model.null_condition_emb.detach(), optimizer,
                      build_scheduler(optimizer, 4, OptimConfig()), prefetcher, ObjectiveConfig(), -0.4, 1.0)
    try:
        with pytest.raises(FloatingPointError, match=rf"step 1 .*'{samples[1].key}'.*acestep_ft.data.validate"):
            train_loop(parts, TrainConfig(max_steps=4), 0, NullSink(), lambda step: None, grad_clip=1.0)
    finally:
        prefetcher.close()
