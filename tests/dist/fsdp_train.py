"""FSDP2 on CPU processes (gloo): sharded training matches one process training on the same global batch.

Run as `torchrun --standalone --nproc_per_node 2 tests/dist/fsdp_train.py OUT_DIR`. Accelerate never applies its FSDP
plugin on the CPU, so this applies `fully_shard` by hand with the wrap policy the plugin from
`acestep_ft.distributed.accelerator_kwargs` resolves to (one shard group per DiTLayer, then the root), and checks:

- `broadcast_module_` makes differently initialised processes agree before sharding;
- per-step losses and the final full weights equal a single-process reference (the two per-process micro-batches
  averaged, the same noise), with clipping, AdamW and an LR that changes every step;
- `full_state_dict` returns full shapes on rank 0 and nothing elsewhere;
- a save after STEPS_BEFORE steps (full weights + `optimizer_state_dict`) and a resume into a freshly sharded model
  (`load_optimizer_state_dict`) continues exactly like the uninterrupted run.

Each rank writes OUT_DIR/rank<r>.json as its very last act before leaving the process group; the test reads the
numbers from there and applies the tolerances.
"""

from __future__ import annotations

import copy
import json
import os
import sys
from pathlib import Path

import torch
import torch.distributed as dist
from accelerate import Accelerator
from accelerate.utils.fsdp_utils import fsdp2_prepare_auto_wrap_policy
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import FSDPModule, fully_shard

ROOT = Path(__file__).resolve().parents[2]
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]  # the package, and tests/ for conftest.model_config
from conftest import model_config  # noqa: E402

from acestep_ft.config import Distributed, HardwareConfig, ObjectiveConfig  # noqa: E402
from acestep_ft.data.batch import Batch  # noqa: E402
from acestep_ft.distributed import (  # noqa: E402
    accelerator_kwargs, broadcast_module_, full_state_dict, load_optimizer_state_dict, optimizer_state_dict,
)
from acestep_ft.model import load_model  # noqa: E402
from acestep_ft.train.step import flow_matching_loss  # noqa: E402

STEPS_BEFORE, STEPS_AFTER = 2, 2
LR, CLIP = 1e-3, 0.5
OBJECTIVE = ObjectiveConfig()


def batch_for(step: int, rank: int, width: int) -> Batch:
    """Fixed synthetic micro-batch of process `rank` at `step` (2 samples, 16 frames, 5 condition tokens)."""
    g = torch.Generator().manual_seed(10_000 + 100 * step + rank)
    return Batch(keys=[f"s{step}r{rank}a", f"s{step}r{rank}b"],
                 target_latents=torch.randn(2, 16, 64, generator=g),
                 attention_mask=torch.ones(2, 16),
                 encoder_hidden_states=torch.randn(2, 5, width, generator=g),
                 encoder_attention_mask=torch.ones(2, 5),
                 context_latents=torch.randn(2, 16, 128, generator=g))


def loss_of(decoder, null, step: int, rank: int) -> torch.Tensor:
    """The flow-matching loss of (step, rank)'s micro-batch with noise that depends only on (step, rank)."""
    g = torch.Generator().manual_seed(20_000 + 100 * step + rank)
    return flow_matching_loss(decoder, null, batch_for(step, rank, null.shape[-1]), OBJECTIVE, -0.4, 1.0, g)


def shard(decoder, mesh) -> int:
    """fully_shard as Accelerate's FSDP2 prepare does with our plugin: policy-matched modules bottom-up, then the
    root. Returns how many modules the policy picked."""
    plugin = accelerator_kwargs(HardwareConfig(distributed=Distributed.fsdp), on_cpu=False, grad_clip=CLIP,
                                grad_accum=1)["fsdp_plugin"]
    plugin.set_auto_wrap_policy(decoder)
    policy = fsdp2_prepare_auto_wrap_policy(plugin, decoder)
    picked = [m for m in reversed(list(decoder.modules())[1:]) if policy(m)]
    for module in picked:
        fully_shard(module, mesh=mesh, reshard_after_forward=plugin.reshard_after_forward,
                    offload_policy=plugin.cpu_offload)
    fully_shard(decoder, mesh=mesh, offload_policy=plugin.cpu_offload)
    return len(picked)


def sharded_steps(decoder, optimizer, scheduler, null, steps, rank: int, world: int) -> list[float]:
    losses = []
    for step in steps:
        loss = loss_of(decoder, null, step, rank)
        loss.backward()  # FSDP2 reduce-scatters the mean gradient over the processes
        torch.nn.utils.clip_grad_norm_(decoder.parameters(), CLIP)  # DTensor-aware global norm
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        scheduler.step()
        mean = loss.detach().clone()
        dist.all_reduce(mean)
        losses.append(mean.item() / world)
    return losses


def reference_steps(decoder, optimizer, scheduler, null, steps, world: int) -> list[float]:
    """One process, the global batch: the mean of every process's micro-batch loss."""
    losses = []
    for step in steps:
        loss = sum(loss_of(decoder, null, step, r) for r in range(world)) / world
        loss.backward()
        torch.nn.utils.clip_grad_norm_(decoder.parameters(), CLIP)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        scheduler.step()
        losses.append(loss.item())
    return losses


def decaying(optimizer) -> torch.optim.lr_scheduler.LRScheduler:
    """An LR that changes every step, built on the bare optimizer before any wrapping (as run.py does)."""
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0 / (1 + s))


def adamw(decoder) -> torch.optim.Optimizer:
    return torch.optim.AdamW(decoder.parameters(), lr=LR, weight_decay=0.01)


def max_diff(a: dict, b: dict) -> float:
    assert a.keys() == b.keys(), sorted(set(a) ^ set(b))[:5]
    return max((a[k].float() - b[k].float()).abs().max().item() for k in a)


def main(out: Path) -> None:
    acc = Accelerator(cpu=True)  # initialises the gloo process group from torchrun's environment
    rank, world = acc.process_index, acc.num_processes
    torch.manual_seed(1 + rank)  # deliberately different initial weights per process
    model = load_model(model_config())
    decoder = model.decoder
    gathered = [torch.zeros(()) for _ in range(world)]
    dist.all_gather(gathered, decoder.proj_in[1].weight.detach().sum())
    # the whole model: the null condition embedding used for CFG dropout lives outside the decoder
    broadcast_module_(model)
    null = model.null_condition_emb.detach()
    start = {k: v.clone() for k, v in decoder.state_dict().items()}  # identical on every rank now
    reference = copy.deepcopy(decoder)

    mesh = init_device_mesh("cpu", (world,))
    wrapped = shard(decoder, mesh)
    layers = sum(isinstance(m, FSDPModule) for m in decoder.modules())
    local_numel = sum(p.to_local().numel() for p in decoder.parameters())
    optimizer = adamw(decoder)
    scheduler = decaying(optimizer)
    all_steps = list(range(STEPS_BEFORE + STEPS_AFTER))
    losses = sharded_steps(decoder, optimizer, scheduler, null, all_steps[:STEPS_BEFORE], rank, world)

    # save as a checkpoint would: both collective, rank 0 gets the payload
    saved = {"weights": full_state_dict(acc, decoder), "optimizer": optimizer_state_dict(acc, decoder, optimizer),
             "scheduler": scheduler.state_dict()}
    path = out / "ckpt.pt"
    if rank == 0:
        torch.save(saved, path)
    dist.barrier()
    losses += sharded_steps(decoder, optimizer, scheduler, null, all_steps[STEPS_BEFORE:], rank, world)
    final = full_state_dict(acc, decoder)

    # resume: fresh model on every rank, checkpoint weights in, shard, fresh optimizer, its state scattered back
    ckpt = torch.load(path, weights_only=False)
    torch.manual_seed(50 + rank)
    resumed = load_model(model_config()).decoder
    resumed.load_state_dict(ckpt["weights"])
    shard(resumed, mesh)
    resumed_opt = adamw(resumed)
    resumed_sched = decaying(resumed_opt)
    load_optimizer_state_dict(acc, resumed, resumed_opt, ckpt["optimizer"])
    resumed_sched.load_state_dict(ckpt["scheduler"])
    resumed_losses = sharded_steps(resumed, resumed_opt, resumed_sched, null, all_steps[STEPS_BEFORE:], rank,
                                   world)
    resumed_final = full_state_dict(acc, resumed)

    result = {"rank": rank, "world": world, "losses": losses, "resumed_losses": resumed_losses,
              "init_differed": len({round(float(t), 6) for t in gathered}) == world,
              "fsdp_modules": layers, "policy_picked": wrapped, "num_layers": len(decoder.layers),
              "local_numel": local_numel, "full_numel": sum(v.numel() for v in start.values()),
              "full_state_dict_len": len(final), "full_state_dict_len_at_save": len(saved["weights"])}
    if rank == 0:
        ref_opt = adamw(reference)
        ref_losses = reference_steps(reference, ref_opt, decaying(ref_opt), null, all_steps, world)
        expected = reference.state_dict()
        result.update({
            "reference_losses": ref_losses,
            "shapes_match": {k: list(v.shape) for k, v in final.items()} == {k: list(v.shape) for k, v in
                                                                            expected.items()},
            "all_cpu": all(v.device.type == "cpu" and type(v) is torch.Tensor for v in final.values()),
            "max_weight_diff": max_diff(final, expected),
            "max_resume_weight_diff": max_diff(resumed_final, final),
            "moved_from_start": max_diff(final, start),
            "optimizer_keys": sorted(saved["optimizer"].get("state", {}))[:3],
        })
    dist.barrier()
    (out / f"rank{rank}.json").write_text(json.dumps(result))
    dist.destroy_process_group()  # leave together: a gloo rank whose peer is gone can abort at exit


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    main(Path(sys.argv[1]))
