"""Regional torch.compile: each DiT layer is compiled on its own (one layer's compile time, reused by all)."""

from __future__ import annotations

from torch import nn

from acestep_ft.model.decoder import DiTLayer


def compile_layers(decoder: nn.Module) -> int:
    """Compile every DiTLayer inside `decoder` (plain or PEFT-wrapped) in place; returns how many."""
    layers = [m for m in decoder.modules() if isinstance(m, DiTLayer)]
    for layer in layers:
        layer.compile()
    return len(layers)
