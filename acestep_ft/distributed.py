"""Multi-process strategy (`hardware.distributed`) mapped onto Accelerate, and saving/resuming under each.

ddp        replicated weights, gradients all-reduced in place in DDP's buckets (gradient_as_bucket_view).
fsdp       FSDP2 (`torch.distributed.fsdp.fully_shard`): each `DiTLayer` is its own shard group, the root holds the rest;
           weights, gradients and optimizer state are DTensors sharded over the processes. Needs a CUDA GPU:
           Accelerate applies its FSDP plugin only to multi-GPU runs.
deepspeed  ZeRO stage `hardware.zero_stage`: 1 shards the optimizer state, 2 also the gradients, 3 also the weights.
           DeepSpeed then owns clipping and the optimizer step (inside `accelerator.backward`).

What the training loop has to do differently is all here, as collective functions (every process calls them, in
the same order):

- `full_state_dict(acc, module)`: the whole, unsharded weights as CPU tensors on the main process ({} elsewhere).
  Under fsdp the live parameters are shards and under ZeRO-3 they are empty placeholders, so `unwrap_model(m)
  .state_dict()` is only correct for ddp and ZeRO-1/2.
- `optimizer_state_dict(acc, module, optimizer)` / `load_optimizer_state_dict(...)`: the optimizer state as one
  object the main process writes into training_state.pt, exactly as for ddp. Design: one writer, one file.
    ddp        `optimizer.state_dict()` as before.
    fsdp       the full, unsharded state (parameter names as keys) gathered to the main process with
               `torch.distributed.checkpoint.state_dict`; loading scatters it back from the main process, so it
               does not depend on the number of processes.
    deepspeed  ZeRO keeps each process's partition in DeepSpeed's own layout and only DeepSpeed can load it; the
               partitions are gathered (as CPU tensors, over a gloo group) into {"zero_partitions": [rank 0, ...]}
               and every process hands the whole list back to DeepSpeed, which picks its own. Resume with the same
               number of processes (a strict resume already checks `world_size`).
  The price of one file: during a save the main process holds the whole optimizer state in host RAM (~8 bytes per
  trained parameter for AdamW), and at resume every process reads the file. Per-process files would avoid both but
  need every process to write into the checkpoint's temp directory before it is renamed into place.
- `broadcast_module_(module)`: copy the main process's weights to every process. ddp and DeepSpeed do this when
  they wrap the model; FSDP2 does not, so randomly initialised weights (model=tiny, new LoRA matrices drawn after a
  per-process seed) must be made identical before `prepare`.
"""

from __future__ import annotations

import importlib.util
from typing import Any, Dict, List, Optional

import torch
import torch.distributed as dist
from accelerate import Accelerator
from accelerate.utils import DistributedDataParallelKwargs, DistributedType
from torch import Tensor, nn

from acestep_ft.config import Config, Distributed, FullMode, HardwareConfig, TextEncoderTraining

WRAP_CLASSES = ["DiTLayer"]  # FSDP shard groups: one per DiT layer (acestep_ft/model/decoder.py), the root the rest
DEEPSPEED_PIP = 'pip install "deepspeed>=0.19"'  # or the project extra: pip install -e ".[deepspeed]"


def accelerator_kwargs(hw: HardwareConfig, on_cpu: bool, grad_clip: float, grad_accum: int) -> Dict[str, Any]:
    """Extra `Accelerator(...)` kwargs for `hw.distributed`; refuses settings Accelerate would silently ignore.

    `grad_clip` (<= 0 = off) and `grad_accum` go into the DeepSpeed config, since DeepSpeed clips and accumulates
    inside its engine.
    """
    if hw.offload and hw.distributed == Distributed.ddp:
        raise ValueError("hardware.offload=true needs hardware.distributed=fsdp or deepspeed; ddp keeps everything on "
                         "the GPU. Set hardware.offload=false, or pick a sharded strategy.")
    if hw.distributed == Distributed.ddp:
        # gradients live in DDP's buckets instead of beside them: one fp32 copy of the trained weights less
        return {"kwargs_handlers": [DistributedDataParallelKwargs(gradient_as_bucket_view=True)]}
    if on_cpu:
        raise ValueError(f"hardware.distributed={hw.distributed} needs a CUDA GPU: on the CPU Accelerate ignores the "
                         f"{hw.distributed} plugin and would silently train with replicated weights. Use "
                         "hardware.distributed=ddp on the CPU, or hardware.device=cuda / hardware=auto on a machine "
                         "with CUDA GPUs.")
    if hw.distributed == Distributed.fsdp:
        from accelerate.utils import FullyShardedDataParallelPlugin

        return {"fsdp_plugin": FullyShardedDataParallelPlugin(
            fsdp_version=2,
            auto_wrap_policy="transformer_based_wrap",
            transformer_cls_names_to_wrap=list(WRAP_CLASSES),
            reshard_after_forward=True,  # free each layer's gathered weights after its forward; regather in backward
            cpu_offload=hw.offload,  # weights, gradients and optimizer state live in host RAM between uses
            state_dict_type="FULL_STATE_DICT",  # what Accelerate's own save_model/save_state would write
            # the decoder recomputes layers itself (hardware.gradient_checkpointing); a second wrapper would double it
            activation_checkpointing=False,
            cpu_ram_efficient_loading=False,  # every process loads the weights; broadcast_module_ makes them agree
        )}
    if not 1 <= hw.zero_stage <= 3:
        raise ValueError(f"hardware.zero_stage={hw.zero_stage} must be 1 (optimizer state sharded), 2 (+ gradients) "
                         "or 3 (+ weights).")
    if not deepspeed_installed():
        raise ImportError(f"hardware.distributed=deepspeed needs DeepSpeed, which is not installed: {DEEPSPEED_PIP}")
    from accelerate.utils import DeepSpeedPlugin

    plugin = DeepSpeedPlugin(
        zero_stage=hw.zero_stage,
        gradient_clipping=grad_clip,
        gradient_accumulation_steps=grad_accum,
        offload_optimizer_device="cpu" if hw.offload else "none",
        offload_param_device="none",
        zero3_init_flag=False,  # our model is built before Accelerate sees it; ZeRO-3 partitions it in prepare
        zero3_save_16bit_model=False,  # full_state_dict gathers fp32 weights itself
    )
    # explicit even when off: the plugin drops a 0 and Accelerate fills a missing value with 1.0 where it is "auto"
    plugin.deepspeed_config["gradient_clipping"] = max(grad_clip, 0.0)  # 0 = DeepSpeed does not clip
    # prepare() gets no DataLoader to read the batch size from; only the throughput report uses it
    plugin.deepspeed_config["train_micro_batch_size_per_gpu"] = hw.batch_size
    if hw.offload:
        # our optimizer (AdamW, 8-bit AdamW...) runs on the offloaded partition instead of DeepSpeedCPUAdam
        plugin.deepspeed_config["zero_force_ds_cpu_optimizer"] = False
    return {"deepspeed_plugin": plugin}


def strategy_problems(cfg: Config, on_cpu: bool) -> List[str]:
    """hardware.distributed settings that cannot work, and features not available under a strategy, each with its
    fix (reported by the config check before anything loads, and used to filter the memory gate's rewrites)."""
    problems = []
    hw = cfg.hardware
    try:
        accelerator_kwargs(hw, on_cpu, cfg.optim.grad_clip, cfg.train.grad_accum)
    except (ValueError, ImportError) as err:
        problems.append(str(err))
    fsdp = hw.distributed == Distributed.fsdp
    sharded_weights = fsdp or (hw.distributed == Distributed.deepspeed and hw.zero_stage == 3)
    if cfg.train.ema.enabled and sharded_weights:
        problems.append("train.ema.enabled with sharded weights (hardware.distributed=fsdp, or deepspeed with "
                        "zero_stage=3) is not supported yet: use zero_stage 1/2, ddp, or train.ema.enabled=false.")
    unfreeze = isinstance(cfg.mode, FullMode) and bool(cfg.mode.unfreeze)
    if unfreeze and hw.distributed != Distributed.ddp:
        problems.append(f"mode.unfreeze with hardware.distributed={hw.distributed} is not supported (held-back weights "
                        "have no optimizer state, which sharded optimizer checkpoints cannot restore exactly): use "
                        "ddp.")
    if cfg.mode.text_encoder == TextEncoderTraining.lora and hw.distributed != Distributed.ddp:
        problems.append(f"mode.text_encoder=lora with hardware.distributed={hw.distributed} is not supported yet (the "
                        "text encoder runs outside the sharded decoder): use hardware.distributed=ddp.")
    if fsdp and cfg.optim.target.startswith("bitsandbytes."):
        problems.append(f"optim.optimizer {cfg.optim.target} with hardware.distributed=fsdp: bitsandbytes optimizers "
                        "do not step FSDP2's sharded (DTensor) weights; use torch.optim.AdamW (fused=true) with "
                        "fsdp, or deepspeed with the 8-bit optimizer.")
    return problems


def deepspeed_installed() -> bool:
    return importlib.util.find_spec("deepspeed") is not None


def _is_fsdp2(module: nn.Module) -> bool:
    """Sharded by FSDP2: told by the module itself, so this also holds for `fully_shard` applied by hand."""
    from torch.distributed.fsdp import FSDPModule

    return isinstance(module, FSDPModule)


def _is_deepspeed(acc: Accelerator) -> bool:
    return acc.distributed_type == DistributedType.DEEPSPEED


def _to_cpu(obj: Any) -> Any:
    """Nested dicts/lists/tuples of tensors -> the same with detached CPU copies (what torch.save should see)."""
    if isinstance(obj, Tensor):
        return obj.detach().to("cpu", copy=True)
    if isinstance(obj, dict):
        return {k: _to_cpu(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_to_cpu(v) for v in obj)
    return obj


def full_state_dict(acc: Accelerator, module: nn.Module) -> Dict[str, Tensor]:
    """Collective. The unsharded `state_dict()` of the unwrapped `module`, fp32 master weights where the strategy
    keeps them apart, as CPU tensors on the main process; {} on the other processes.

    Keys are those of `acc.unwrap_model(module).state_dict()` (PEFT names for a LoRA-wrapped decoder).
    """
    if _is_fsdp2(module):
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        # cpu_offload=True: each tensor is gathered, copied to host RAM on rank 0 and dropped on the others
        state = get_model_state_dict(module, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        return {k: v.clone() for k, v in state.items()} if acc.is_main_process else {}
    if _is_deepspeed(acc):
        return _deepspeed_full_state_dict(acc, acc.unwrap_model(module))
    if not acc.is_main_process:
        return {}
    return {k: v.detach().to("cpu", copy=True) for k, v in acc.unwrap_model(module).state_dict().items()}


def _deepspeed_full_state_dict(acc: Accelerator, module: nn.Module) -> Dict[str, Tensor]:
    """ZeRO: trained weights from the fp32 partitions (the module's own copy is bf16/fp16 under mixed precision and
    an empty placeholder under ZeRO-3); frozen weights gathered one tensor at a time under ZeRO-3."""
    import deepspeed
    from deepspeed.utils import safe_get_full_fp32_param

    full: Dict[str, Tensor] = {}
    for name, param in module.named_parameters():
        value = safe_get_full_fp32_param(param) if param.requires_grad else None  # collective
        if value is None:
            with deepspeed.zero.GatheredParameters([param], enabled=hasattr(param, "ds_id")):  # ZeRO-3 only
                value = param.detach().clone() if acc.is_main_process else None
        if acc.is_main_process:
            full[name] = value.to("cpu", copy=True)
    if not acc.is_main_process:
        return {}
    state = module.state_dict()  # buffers and key order; parameter entries are replaced by the full tensors
    for key, value in state.items():
        state[key] = full.get(key, value.detach().to("cpu", copy=True))
    return state


_GLOO_GROUP: Optional[Any] = None


def _gloo_group() -> Any:
    """A gloo process group for moving pickled CPU objects (the default group may be NCCL). Collective the first
    time it is called."""
    global _GLOO_GROUP
    if _GLOO_GROUP is None:
        _GLOO_GROUP = dist.group.WORLD if dist.get_backend() == "gloo" else dist.new_group(backend="gloo")
    return _GLOO_GROUP


def optimizer_state_dict(acc: Accelerator, module: nn.Module, optimizer: torch.optim.Optimizer) -> Dict[str, Any]:
    """Collective. The optimizer state for training_state.pt, meaningful on the main process (see module docs).

    `module` and `optimizer` are the objects `acc.prepare` returned.
    """
    if _is_fsdp2(module):
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

        options = StateDictOptions(full_state_dict=True, cpu_offload=True)
        return get_optimizer_state_dict(module, _inner(optimizer), options=options)
    if _is_deepspeed(acc):
        own = _to_cpu(_inner(optimizer).state_dict())  # DeepSpeed's ZeRO optimizer: this process's partition
        parts: List[Any] = [None] * acc.num_processes if acc.is_main_process else None
        dist.gather_object(own, parts, dst=0, group=_gloo_group())
        return {"zero_partitions": parts} if acc.is_main_process else {}
    return optimizer.state_dict()


def load_optimizer_state_dict(acc: Accelerator, module: nn.Module, optimizer: torch.optim.Optimizer,
                              state: Dict[str, Any]) -> None:
    """Collective. Put back what `optimizer_state_dict` returned, after `acc.prepare` (every process passes the state
    it read from the checkpoint)."""
    if _is_fsdp2(module):
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

        options = StateDictOptions(full_state_dict=True, broadcast_from_rank0=True)
        set_optimizer_state_dict(module, _inner(optimizer), optim_state_dict=state if acc.is_main_process else {},
                                 options=options)
    elif _is_deepspeed(acc):
        if "zero_partitions" not in state or len(state["zero_partitions"]) != acc.num_processes:
            found = len(state.get("zero_partitions", []))
            raise ValueError(f"this checkpoint's optimizer state is not a DeepSpeed ZeRO state for "
                             f"{acc.num_processes} processes (found {found} partitions): resume with the number of "
                             f"processes and hardware.distributed it was saved with.")
        # load_from_fp32_weights: restore the fp32 master partition exactly, not from the bf16/fp16 module copy
        _inner(optimizer).load_state_dict(state["zero_partitions"], load_from_fp32_weights=True)
    else:
        optimizer.load_state_dict(state)


def _inner(optimizer: torch.optim.Optimizer) -> Any:
    """The optimizer Accelerate wraps (torch's, or DeepSpeed's ZeRO optimizer)."""
    return getattr(optimizer, "optimizer", optimizer)


@torch.no_grad()
def broadcast_module_(module: nn.Module) -> None:
    """Collective, before sharding: overwrite every process's parameters and buffers with the main process's.

    No-op in a single process. Use for fsdp, which (unlike DDP and DeepSpeed) shards each process's own copy.
    """
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return
    for tensor in list(module.parameters()) + list(module.buffers()):
        # the model is still in host RAM before prepare(), and NCCL moves only GPU tensors
        dist.broadcast(tensor.data, src=0, group=_gloo_group() if tensor.device.type == "cpu" else None)
