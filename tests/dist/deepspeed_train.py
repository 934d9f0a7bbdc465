"""DeepSpeed ZeRO through Accelerate's DeepSpeedPlugin on CPU processes (DS_ACCELERATOR=cpu, gloo).

Run as `DS_ACCELERATOR=cpu torchrun --standalone --nproc_per_node 2 tests/dist/deepspeed_train.py OUT_DIR STAGE`.
The Accelerator is built from `acestep_ft.distributed.accelerator_kwargs` (with on_cpu=False: Accelerate drops the
DeepSpeed plugin when told cpu=True, and DeepSpeed's CPU accelerator supplies the device) and trained the way
acestep_ft/train/loop.py trains: accumulate -> backward -> clip_grad_norm_ -> optimizer.step -> zero_grad. Checked
(numbers go to OUT_DIR/rank<r>.json, the test applies the tolerances):

- the run really is DeepSpeed ZeRO at STAGE, with the clipping and accumulation the config asked for;
- per-step losses equal a single-process reference on the same global batch (what DDP computes), with an LR
  scheduler built on the bare optimizer before `prepare` (as run.py does);
- every process holds the same weights (ZeRO-1/2 keep full weights on each process);
- `full_state_dict` equals the reference's weights; `optimizer_state_dict` holds one partition per process and
  `load_optimizer_state_dict` rewinds the run exactly (the same steps again give the same losses and weights).
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
from accelerate.utils import DistributedType, InitProcessGroupKwargs

ROOT = Path(__file__).resolve().parents[2]
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]  # the package, and tests/ for conftest.model_config
from conftest import model_config  # noqa: E402

from acestep_ft.config import Distributed, HardwareConfig  # noqa: E402
from acestep_ft.distributed import (  # noqa: E402
    accelerator_kwargs, broadcast_module_, full_state_dict, load_optimizer_state_dict, optimizer_state_dict,
)
from acestep_ft.model import load_model  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from fsdp_train import CLIP, LR, decaying, loss_of, max_diff, reference_steps  # noqa: E402

STEPS_BEFORE, STEPS_AFTER = 2, 2
GRAD_NORMS: list = []


def train_steps(acc, decoder, optimizer, scheduler, null, steps, rank: int) -> list[float]:
    """The loop.py sequence with one micro-batch per step."""
    losses = []
    for step in steps:
        with acc.accumulate(decoder):
            loss = loss_of(decoder, null, step, rank)
            acc.backward(loss)  # DeepSpeed: backward, then its own clip + optimizer step at the boundary
            if acc.sync_gradients:  # the norm DeepSpeed measured before it clipped (None before its first step)
                norm = acc.clip_grad_norm_(decoder.parameters(), CLIP)
                GRAD_NORMS.append(None if norm is None else float(norm))
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        scheduler.step()  # built on the bare optimizer, as run.py does; DeepSpeed steps with its param groups
        losses.append(float(acc.reduce(loss.detach(), "mean")))
    return losses


def checksum(module) -> torch.Tensor:
    return torch.stack([p.detach().double().sum() for p in module.parameters()]).sum()


def main(out: Path, stage: int) -> None:
    hw = HardwareConfig(distributed=Distributed.deepspeed, zero_stage=stage, batch_size=2)
    # Accelerate picks a backend only for accelerators it knows; without a CUDA GPU it would see one process
    gloo = InitProcessGroupKwargs(backend="gloo")
    acc = Accelerator(cpu=False, kwargs_handlers=[gloo], **accelerator_kwargs(hw, on_cpu=False, grad_clip=CLIP,
                                                                               grad_accum=1))
    rank, world = acc.process_index, acc.num_processes
    torch.manual_seed(1 + rank)  # different per process: broadcast_module_ must make them agree
    model = load_model(model_config())
    broadcast_module_(model)
    null = model.null_condition_emb.detach()
    reference = copy.deepcopy(model.decoder)
    bare = torch.optim.AdamW(model.decoder.parameters(), lr=LR, weight_decay=0.01)
    scheduler = decaying(bare)
    decoder, optimizer = acc.prepare(model.decoder, bare)
    ds_config = acc.state.deepspeed_plugin.deepspeed_config
    steps = list(range(STEPS_BEFORE + STEPS_AFTER))
    losses = train_steps(acc, decoder, optimizer, scheduler, null, steps[:STEPS_BEFORE], rank)

    saved_weights = full_state_dict(acc, decoder)
    saved_optim = optimizer_state_dict(acc, decoder, optimizer)
    path = out / "ckpt.pt"
    if rank == 0:
        torch.save({"weights": saved_weights, "optimizer": saved_optim, "scheduler": scheduler.state_dict()}, path)
    dist.barrier()
    losses += train_steps(acc, decoder, optimizer, scheduler, null, steps[STEPS_BEFORE:], rank)
    final = full_state_dict(acc, decoder)
    sums = [torch.zeros((), dtype=torch.float64) for _ in range(world)]
    dist.all_gather(sums, checksum(acc.unwrap_model(decoder)))

    # rewind to the save: weights into the module, the optimizer partitions back into DeepSpeed; same steps again
    ckpt = torch.load(path, weights_only=False)
    acc.unwrap_model(decoder).load_state_dict(ckpt["weights"])
    load_optimizer_state_dict(acc, decoder, optimizer, ckpt["optimizer"])
    scheduler.load_state_dict(ckpt["scheduler"])
    rewound_losses = train_steps(acc, decoder, optimizer, scheduler, null, steps[STEPS_BEFORE:], rank)
    rewound_final = full_state_dict(acc, decoder)

    result = {"rank": rank, "world": world, "losses": losses, "rewound_losses": rewound_losses,
              "is_deepspeed": acc.distributed_type == DistributedType.DEEPSPEED,
              "zero_stage": ds_config["zero_optimization"]["stage"], "gradient_clipping": ds_config["gradient_clipping"],
              "grad_norms": GRAD_NORMS, "ranks_agree": len({round(float(s), 10) for s in sums}) == 1, "full_state_dict_len": len(final)}
    if rank == 0:
        ref_opt = torch.optim.AdamW(reference.parameters(), lr=LR, weight_decay=0.01)
        reference_losses = reference_steps(reference, ref_opt, decaying(ref_opt), null, steps, world)
        expected = reference.state_dict()
        result.update({"reference_losses": reference_losses, "max_weight_diff": max_diff(final, expected),
                       "max_rewind_weight_diff": max_diff(rewound_final, final),
                       "partitions": len(saved_optim["zero_partitions"]),
                       "shapes_match": all(final[k].shape == v.shape for k, v in expected.items())})
    dist.barrier()
    (out / f"rank{rank}.json").write_text(json.dumps(result))
    dist.destroy_process_group()  # leave together: a gloo rank whose peer is gone can abort at exit


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    main(Path(sys.argv[1]), int(sys.argv[2]))
