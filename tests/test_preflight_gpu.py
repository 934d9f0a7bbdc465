"""On a CUDA GPU: the memory estimate against torch.cuda.max_memory_allocated of real training steps (within 10%).

Runs two optimizer steps per config (the second is the steady state, with optimizer state) for tiny-ish and
mid-size decoders, LoRA and full, bf16, gradient checkpointing off and on, the condition encoder frozen and trained
on encoder_inputs batches, and prints each estimate's table so the numbers can be recorded
(`pytest -m gpu -s tests/test_preflight_gpu.py`).
"""

from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from omegaconf import OmegaConf

from acestep_ft.config import register_configs
from acestep_ft.preflight.estimate import InputLengths, estimate_memory
from acestep_ft.preflight.trace import measure_peak_cuda

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]

CONF = Path(__file__).resolve().parents[1] / "conf"
register_configs()

SMALL = ["model.hidden_size=256", "model.intermediate_size=768", "model.num_hidden_layers=4",
         "model.num_attention_heads=4", "model.num_key_value_heads=2", "model.head_dim=64", "model.sliding_window=16"]
MID = ["model.hidden_size=1024", "model.intermediate_size=3072", "model.num_hidden_layers=8",
       "model.num_attention_heads=8", "model.num_key_value_heads=4", "model.head_dim=128"]
GPU = ["hardware=h100", "hardware.device_prefetch=false", "train.ema.enabled=false"]
INPUTS = ["dataset.conditions=encoder_inputs"]  # the condition encoder runs in the step (frozen, or trained below)
ENCODER = [*INPUTS, "mode=full", "mode.unfreeze=[{module: condition_encoder, pattern: '.'}]"]
LYRICS = [*INPUTS, "mode=full", "mode.unfreeze=[{module: condition_encoder, pattern: lyric_encoder}]"]
OFFICIAL = InputLengths(text=256, lyric=512, refs=1, ref_frames=1)

CASES = [
    (SMALL + ["mode=lora"], 4, 1500, 80),
    (SMALL + ["mode=full"], 4, 1500, 80),
    (MID + ["mode=lora"], 2, 3000, 769),
    (MID + ["mode=lora", "hardware.gradient_checkpointing=1"], 2, 3000, 769),
    (MID + ["mode=full"], 2, 3000, 769),
    (MID + ["mode=full", "hardware.gradient_checkpointing=1"], 2, 3000, 769),
    (MID + ["mode=full", "optim=adamw8bit", "train.ema.enabled=true"], 2, 3000, 769),
    (MID + ["mode=lora", *INPUTS], 2, 3000, OFFICIAL),
    (MID + ENCODER, 2, 3000, InputLengths(text=256, lyric=512, refs=1, ref_frames=750)),
    (MID + LYRICS, 2, 3000, OFFICIAL),
]


def config(*overrides):
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return OmegaConf.to_object(compose(config_name="config", overrides=list(overrides)))


@pytest.mark.parametrize("overrides,batch,frames,cond", CASES)
def test_estimate_matches_cuda_peak(overrides, batch, frames, cond):
    """cond: L, or the InputLengths of encoder_inputs data."""
    cfg = config(*GPU, *overrides)
    est = estimate_memory(cfg, batch, frames, cond)
    measured = measure_peak_cuda(cfg, batch, frames, cond)
    err = est.total / measured["peak"] - 1
    print(f"\n{torch.cuda.get_device_name()}: {' '.join(overrides)} B{batch} T{frames} {cond}: estimate "
          f"{est.total / 2**30:.3f} GiB, max_memory_allocated {measured['peak'] / 2**30:.3f} GiB ({100 * err:+.1f}%)")
    print(est.table())
    assert abs(err) <= 0.10
