"""Regional torch.compile (hardware.compile=true): each DiT layer is compiled on its own.

Why regional: every DiT layer runs the same code (DiTLayer.forward), and torch.compile caches compiled graphs per
code object with guards on the inputs, not on which layer it is, so one layer's compile serves the whole stack; the
glue around the layers (embeddings, patchify, masks, RoPE tables) stays eager, where it is cheap and where masks may
take other forms without touching this file.

How each layer is compiled: its `forward` (an instance attribute, so parameter names and the state dict stay as they
are) becomes the compiled forward behind a small eager wrapper. Module hooks (FSDP2's per-layer gather / reshard)
stay eager around it, `torch.utils.checkpoint` recomputes through it, and a failing compile becomes a UserError
naming hardware.compile.

Shapes: `dynamic=True` (DYNAMIC). Batches are padded to their longest clip (or to hardware.length_multiple), so the
length changes from step to step, and the batch size and condition length change too (last batch of an epoch,
hardware.max_frames_per_batch, real captions). torch.compile's default (`dynamic=None`) first compiles for the exact
shapes, then recompiles with that dimension symbolic the first time it changes: one static plus one more graph for
each dimension that varies, per guard variant (below). `dynamic=True` compiles symbolic shapes from the start: one
graph per variant, whatever lengths follow, plus one for batch size 1 (torch specializes sizes 0 and 1), and the
kernels a step runs do not depend on which lengths came before it (a resumed run picks the same graphs).

Measured on a 2-core CPU (tiny model, LoRA, batch 2, fresh inductor cache; CPU seconds including inductor's compile
workers, as wall time depended on the machine's other load): a training step's first call compiled the two layer
variants in 69 s static / 107 s dynamic. dynamic=None then recompiled on the first new length (65 s) and on the first
new batch size, and with batch size 1 and validation it hit torch's default limit of 8 graphs per function
(DiTLayer.forward is one function for all layers) and ran the layers eagerly from then on; dynamic=True compiled
nothing more for new lengths or batch sizes, 28 s for validation's two variants, 59 s for batch size 1. So for varying
lengths dynamic=True compiles less in total (107 s against 134 s for the first two lengths alone) and keeps the graph
count bounded; a run whose batches all have one shape would compile faster static (69 s). Outputs of the static and
the dynamic graphs were bit-identical here and within 1e-6 (relative) of eager. With inductor's on-disk cache warm
(a rerun or a resume on the same machine) the first step took 7 s instead of 69 s. Under bf16 autocast on the CPU
the compiled layers agreed with eager to 5e-3 (outputs) and 3e-2 (gradients), bf16's own precision: inductor keeps
fused intermediates in fp32 where eager rounds after every op.

Guard variants: a layer's graphs are also keyed on what is not a shape: whether its self-attention mask is a tensor
(sliding-window layers) or None (full layers without padding masks), whether its input requires grad (the first
layer's does not under an adapter, the stem being frozen), grad mode (training vs validation / sampling under
no_grad), train/eval mode (dropout), autocast and, during staged unfreezing, which weights train. That is 3 variants
in training and 2 in validation, times 2 for batch size 1: 10 graphs, more than torch's default limit of 8.
RECOMPILE_LIMIT raises it for these layers only (`torch.compile(recompile_limit=...)`; torch builds without that
argument only have the process-wide limit, which is raised instead) with room for unfreeze stages; past it torch
warns and runs the layer eagerly (same results, eager speed). Gradient checkpointing adds no variant: the recompute
in the backward pass calls the same graphs.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from acestep_ft.errors import UserError
from acestep_ft.model.decoder import DiTLayer

DYNAMIC = True
RECOMPILE_LIMIT = 32
FIX = "Fix: set hardware.compile=false (the same training, without compiled kernels)"


def compile_layers(decoder: nn.Module, device: torch.device | None = None, backend: str = "inductor") -> int:
    """Compile every DiTLayer inside `decoder` (plain, PEFT- or DDP-wrapped) in place; returns how many.

    `device` is where training runs (default: where the decoder's parameters are now); torch.compile is tried there
    on a tiny function first, so a missing toolchain is refused before any training work. `backend` is torch.compile's
    (training uses inductor; tests pass lighter ones to check the wiring without C++ compiles).
    """
    if device is None:
        device = next(decoder.parameters()).device
    check_compile_available(torch.device(device))
    layers = [m for m in decoder.modules() if isinstance(m, DiTLayer)]
    for layer in layers:
        if not getattr(layer.forward, "compiled_layer", False):
            layer.forward = _compiled_forward(layer, backend)
    return len(layers)


def check_compile_available(device: torch.device) -> None:
    """Refuse hardware.compile=true where torch.compile cannot work: compiles and runs a two-op function on `device`.

    Inductor needs a C++ compiler for CPU kernels (and Python headers, OpenMP) and Triton for CUDA kernels; none of
    that is checked by importing torch, and a missing piece otherwise surfaces as a long traceback in the first step.
    The probe costs about a second once its kernel is in inductor's on-disk cache, a few seconds the first time.
    """
    try:
        torch._dynamo.is_dynamo_supported()
        out = torch.compile(_probe, dynamic=False)(torch.ones(4, device=device))
        ok = bool((out == 3).all())
    except Exception as err:  # whatever fails (import, tracing, C++ or Triton build, loading): compile is unusable here
        raise UserError(f"hardware.compile=true: torch.compile does not work on {device} here: "
                        f"{_describe(err)}. {FIX}; or install what is missing (on the "
                        "CPU a C++ compiler such as g++ with the Python headers; on a CUDA GPU the triton package and "
                        "a C compiler).") from err
    if not ok:
        raise UserError(f"hardware.compile=true: torch.compile computed a wrong result on {device} (a broken "
                        f"toolchain). {FIX}.")


def _probe(x: torch.Tensor) -> torch.Tensor:
    return x * 2 + 1


def _compile_kwargs() -> dict:
    kwargs: dict[str, Any] = {"dynamic": DYNAMIC}
    if "recompile_limit" in inspect.signature(torch.compile).parameters:
        kwargs["recompile_limit"] = RECOMPILE_LIMIT  # this region only
    else:  # older torch: one process-wide limit; raise it, never lower what someone else set
        torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, RECOMPILE_LIMIT)
    return kwargs


def _compiled_forward(layer: DiTLayer, backend: str) -> Callable[..., torch.Tensor]:
    """The layer's forward, compiled, behind an eager wrapper that turns a failing compile into a UserError."""
    compiled = torch.compile(layer.forward, backend=backend, **_compile_kwargs())

    @functools.wraps(layer.forward)
    def forward(*args: Any, **kwargs: Any) -> torch.Tensor:
        try:
            return compiled(*args, **kwargs)
        except torch._dynamo.exc.BackendCompilerFailed as err:
            raise UserError(f"hardware.compile=true: torch.compile failed to compile a DiT layer: "
                            f"{_describe(err)}. {FIX}.") from err

    forward.compiled_layer = True  # type: ignore[attr-defined]
    return forward


def _describe(err: BaseException) -> str:
    """`Type: first line` of what went wrong, looking through dynamo's wrapper (its own text is just the header)."""
    inner = getattr(err, "inner_exception", None) or err
    lines = [line for line in str(inner).splitlines() if line.strip()]
    return f"{type(inner).__name__}: {lines[0][:300] if lines else ''}".rstrip(": ")
