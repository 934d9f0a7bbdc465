"""hardware.distributed -> Accelerate plugins, the refusals, and sharded training on CPU processes (torchrun, gloo)."""

import json
import os
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch
from accelerate import Accelerator
from accelerate.utils.fsdp_utils import fsdp2_prepare_auto_wrap_policy
from torch.distributed.fsdp import CPUOffloadPolicy
from torch.distributed.fsdp.wrap import transformer_auto_wrap_policy

import acestep_ft.distributed as distributed
from acestep_ft.config import Distributed, HardwareConfig, LoraMode
from acestep_ft.distributed import (
    WRAP_CLASSES, accelerator_kwargs, broadcast_module_, full_state_dict, load_optimizer_state_dict,
    optimizer_state_dict,
)
from acestep_ft.model import load_model
from acestep_ft.model.decoder import DiTLayer
from acestep_ft.train.trainable import make_trainable
from conftest import model_config

ROOT = Path(__file__).resolve().parents[2]


def hw(**kw) -> HardwareConfig:
    return HardwareConfig(**kw)


@pytest.fixture
def with_deepspeed(monkeypatch):
    """Plugin mapping without DeepSpeed installed: building the plugin needs only Accelerate."""
    monkeypatch.setattr(distributed, "deepspeed_installed", lambda: True)


def test_ddp_needs_no_plugin_and_keeps_gradients_in_its_buckets():
    for on_cpu in (True, False):
        kwargs = accelerator_kwargs(hw(), on_cpu=on_cpu, grad_clip=1.0, grad_accum=2)
        assert set(kwargs) == {"kwargs_handlers"}
        assert kwargs["kwargs_handlers"][0].gradient_as_bucket_view


@pytest.mark.parametrize("strategy", [Distributed.fsdp, Distributed.deepspeed])
def test_sharded_strategies_are_refused_on_the_cpu(strategy, with_deepspeed):
    # Accelerate applies neither plugin when the Accelerator runs on the CPU: the run would silently be DDP
    with pytest.raises(ValueError, match=f"hardware.distributed={strategy} needs a CUDA GPU") as err:
        accelerator_kwargs(hw(distributed=strategy), on_cpu=True, grad_clip=1.0, grad_accum=1)
    assert "hardware.distributed=ddp" in str(err.value)


def test_offload_without_a_sharded_strategy_is_refused():
    with pytest.raises(ValueError, match="hardware.offload=true needs hardware.distributed=fsdp or deepspeed"):
        accelerator_kwargs(hw(offload=True), on_cpu=False, grad_clip=1.0, grad_accum=1)


@pytest.mark.parametrize("offload", [False, True])
def test_fsdp_plugin_is_fsdp2_per_dit_layer(offload):
    plugin = accelerator_kwargs(hw(distributed=Distributed.fsdp, offload=offload), on_cpu=False, grad_clip=1.0,
                                grad_accum=4)["fsdp_plugin"]
    assert plugin.fsdp_version == 2
    assert plugin.auto_wrap_policy is transformer_auto_wrap_policy
    assert plugin.transformer_cls_names_to_wrap == ["DiTLayer"]
    assert plugin.reshard_after_forward is True
    assert plugin.activation_checkpointing is False  # the decoder's own gradient_checkpointing does that
    assert plugin.cpu_ram_efficient_loading is False
    assert plugin.state_dict_type.name == "FULL_STATE_DICT"
    assert isinstance(plugin.cpu_offload, CPUOffloadPolicy) == offload


@pytest.mark.parametrize("lora", [False, True])
def test_fsdp_wrap_policy_picks_exactly_the_dit_layers(lora):
    """The policy Accelerate's FSDP2 prepare applies, resolved on our decoder (plain and PEFT-wrapped)."""
    assert all(hasattr(__import__("acestep_ft.model.decoder", fromlist=["x"]), n) for n in WRAP_CLASSES)
    torch.manual_seed(0)
    model = load_model(model_config())
    decoder = make_trainable(model, LoraMode(rank=4, alpha=8, target_modules=["q_proj"])) if lora else model.decoder
    plugin = accelerator_kwargs(hw(distributed=Distributed.fsdp), on_cpu=False, grad_clip=1.0,
                                grad_accum=1)["fsdp_plugin"]
    plugin.set_auto_wrap_policy(decoder)
    policy = fsdp2_prepare_auto_wrap_policy(plugin, decoder)
    picked = [m for m in decoder.modules() if policy(m)]
    assert picked == list(model.decoder.layers) and all(isinstance(m, DiTLayer) for m in picked)
    assert len(picked) == model.cfg.num_hidden_layers


@pytest.mark.parametrize("offload", [False, True])
def test_deepspeed_plugin_takes_stage_clip_accum_and_offload(offload, with_deepspeed):
    config = hw(distributed=Distributed.deepspeed, zero_stage=3, offload=offload, batch_size=6)
    plugin = accelerator_kwargs(config, on_cpu=False, grad_clip=0.7, grad_accum=5)["deepspeed_plugin"]
    ds = plugin.deepspeed_config
    assert ds["zero_optimization"]["stage"] == 3
    assert ds["gradient_clipping"] == 0.7
    assert ds["gradient_accumulation_steps"] == 5
    assert ds["train_micro_batch_size_per_gpu"] == 6
    assert ds["zero_optimization"]["offload_optimizer"]["device"] == ("cpu" if offload else "none")
    assert ds["zero_optimization"]["offload_param"]["device"] == "none"
    assert ds.get("zero_force_ds_cpu_optimizer", True) is not offload  # our optimizer runs on the offloaded state


def test_deepspeed_clip_zero_means_off(with_deepspeed):
    plugin = accelerator_kwargs(hw(distributed=Distributed.deepspeed), on_cpu=False, grad_clip=0.0,
                                grad_accum=1)["deepspeed_plugin"]
    assert plugin.deepspeed_config["gradient_clipping"] == 0.0
    assert plugin.deepspeed_config["zero_optimization"]["stage"] == 2  # the default hardware.zero_stage


@pytest.mark.parametrize("stage", [0, 4, -1])
def test_zero_stage_outside_1_to_3_is_refused(stage, with_deepspeed):
    with pytest.raises(ValueError, match=f"hardware.zero_stage={stage} must be 1"):
        accelerator_kwargs(hw(distributed=Distributed.deepspeed, zero_stage=stage), on_cpu=False, grad_clip=1.0,
                           grad_accum=1)


def test_deepspeed_missing_says_how_to_install(monkeypatch):
    monkeypatch.setattr(distributed, "deepspeed_installed", lambda: False)
    with pytest.raises(ImportError, match=r"pip install \"deepspeed"):
        accelerator_kwargs(hw(distributed=Distributed.deepspeed), on_cpu=False, grad_clip=1.0, grad_accum=1)


def test_one_process_state_helpers_are_plain_copies():
    """ddp / one process: full_state_dict is a CPU copy of state_dict, the optimizer state round-trips as is."""
    acc = Accelerator(cpu=True)
    torch.manual_seed(0)
    model = load_model(model_config())
    decoder, width = model.decoder, model.null_condition_emb.shape[-1]
    before = {k: v.clone() for k, v in decoder.state_dict().items()}
    broadcast_module_(decoder)  # one process: nothing to do
    optimizer = torch.optim.AdamW(decoder.parameters(), lr=1e-3)
    decoder, optimizer = acc.prepare(decoder, optimizer)
    decoder(torch.randn(1, 8, 64), torch.rand(1), torch.rand(1), torch.randn(1, 3, width),
            torch.randn(1, 8, 128)).square().mean().backward()
    optimizer.step()
    full = full_state_dict(acc, decoder)
    assert full.keys() == before.keys() and all(full[k].shape == before[k].shape for k in full)
    live = decoder.state_dict()
    assert all(torch.equal(full[k], live[k]) and full[k].data_ptr() != live[k].data_ptr() for k in full)
    state = optimizer_state_dict(acc, decoder, optimizer)
    assert len(state["state"]) == len(list(decoder.parameters()))
    fresh = torch.optim.AdamW(decoder.parameters(), lr=1e-3)
    load_optimizer_state_dict(acc, decoder, fresh, state)
    assert torch.equal(fresh.state_dict()["state"][0]["exp_avg"], state["state"][0]["exp_avg"])


def torchrun(script: str, out: Path, *args: str, timeout: int = 240) -> list[dict]:
    """Run tests/dist/<script> on 2 CPU processes; return each rank's result file.

    Every rank writes its result as its last act before leaving the process group, so the files, not the exit code,
    say whether the work finished: a gloo rank can still abort at interpreter exit after that. A missing file is a
    failure, shown with the output.
    """
    env = {**os.environ, "OMP_NUM_THREADS": "1", "DS_ACCELERATOR": "cpu"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           str(ROOT / "tests" / "dist" / script), str(out), *args]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    files = [out / f"rank{r}.json" for r in range(2)]
    missing = [f.name for f in files if not f.exists()]
    assert not missing, (f"{script}: no result from {missing} (exit {proc.returncode}):\n{proc.stdout[-3000:]}\n"
                         f"{proc.stderr[-6000:]}")
    if proc.returncode != 0:
        warnings.warn(f"{script}: every rank finished, but torchrun exited {proc.returncode} at teardown")
    return [json.loads(f.read_text()) for f in files]


@pytest.mark.slow
def test_fsdp2_on_cpu_matches_one_process_and_resumes_exactly(tmp_path):
    """FSDP2 (fully_shard per DiTLayer + root, our plugin's policy) on 2 gloo processes, AdamW + clipping."""
    rank0, rank1 = torchrun("fsdp_train.py", tmp_path)
    assert rank0["init_differed"]  # the processes started from different weights; broadcast_module_ fixed that
    assert rank0["policy_picked"] == rank0["num_layers"] == 2 and rank0["fsdp_modules"] == 3  # 2 layers + root
    assert rank0["local_numel"] + rank1["local_numel"] == rank0["full_numel"]  # really sharded, not replicated
    assert rank0["losses"] == rank1["losses"]
    assert rank0["losses"] == pytest.approx(rank0["reference_losses"], rel=1e-6, abs=1e-6)
    assert rank0["max_weight_diff"] < 1e-6 < rank0["moved_from_start"]
    assert rank0["shapes_match"] and rank0["all_cpu"] and rank0["full_state_dict_len"] == 58
    assert rank1["full_state_dict_len"] == 0 and rank1["full_state_dict_len_at_save"] == 0
    assert rank0["optimizer_keys"][0] == "condition_embedder.bias"  # full state, keyed by parameter name
    assert rank0["resumed_losses"] == rank0["losses"][2:] and rank0["max_resume_weight_diff"] == 0.0


@pytest.mark.slow
@pytest.mark.parametrize("stage", [2, 3])
def test_deepspeed_zero_on_cpu_matches_one_process_and_rewinds_exactly(tmp_path, stage):
    """DeepSpeed ZeRO through Accelerate's plugin on 2 CPU processes. The first run in an environment JIT-builds
    DeepSpeed's shared-memory comm op (about a minute on 2 cores); later runs take ~10 s."""
    pytest.importorskip("deepspeed", reason="DeepSpeed is not installed (pip install \"deepspeed>=0.19\")")
    rank0, rank1 = torchrun("deepspeed_train.py", tmp_path, str(stage), timeout=400)
    assert rank0["is_deepspeed"] and rank0["zero_stage"] == stage and rank0["gradient_clipping"] == 0.5
    assert rank0["ranks_agree"] and rank0["losses"] == rank1["losses"]
    # accelerator.clip_grad_norm_ hands back DeepSpeed's pre-clip norm: a number each step, above 0.5 so it clipped
    assert len(rank0["grad_norms"]) == 6 and all(n is not None and 0.5 < n < 100 for n in rank0["grad_norms"])
    assert rank0["losses"] == pytest.approx(rank0["reference_losses"], rel=1e-6, abs=1e-6)
    assert rank0["max_weight_diff"] < 2e-6 and rank0["shapes_match"] and rank0["full_state_dict_len"] == 58
    assert rank1["full_state_dict_len"] == 0 and rank0["partitions"] == 2
    assert rank0["rewound_losses"] == rank0["losses"][2:] and rank0["max_rewind_weight_diff"] == 0.0
