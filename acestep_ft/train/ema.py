"""Exponential moving average of the trained weights (the adapter for LoRA, the decoder for full fine-tuning).

    ema = Ema(trainable_named_params, cfg)      # shadow copy, on the weights' device or on the CPU
    ema.update(step)                            # after each optimizer step: every cfg.every steps
    with ema.applied(named_params): ...         # evaluate / export with the averaged weights, then swap back

With warmup the decay ramps up as min(decay, (1 + n) / (10 + n)) over the n updates so far, so early, random weights
do not dominate the average. The shadow weights are kept in fp32.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Dict, Iterator, List, Tuple

import torch
from torch import Tensor

from acestep_ft.config import EmaConfig


class Ema:
    def __init__(self, named_params: List[Tuple[str, Tensor]], cfg: EmaConfig):
        self.cfg = cfg
        self.params = dict(named_params)
        device = "cpu" if cfg.on_cpu else None
        self.shadow: Dict[str, Tensor] = {
            n: p.detach().to(device=device or p.device, dtype=torch.float32, copy=True) for n, p in named_params
        }
        self.updates = 0

    def decay(self) -> float:
        if not self.cfg.warmup:
            return self.cfg.decay
        return min(self.cfg.decay, (1 + self.updates) / (10 + self.updates))

    @torch.no_grad()
    def update(self, step: int) -> None:
        """Fold the current weights in, on every `cfg.every`-th optimizer step (1-based `step`)."""
        if step % self.cfg.every:
            return
        d = self.decay()
        for name, p in self.params.items():
            s = self.shadow[name]
            s.lerp_(p.detach().to(device=s.device, dtype=torch.float32), 1.0 - d)
        self.updates += 1

    @contextmanager
    def applied(self) -> Iterator[None]:
        """Swap the averaged weights into the model for the duration of the block."""
        saved = {n: p.detach().clone() for n, p in self.params.items()}
        with torch.no_grad():
            for n, p in self.params.items():
                p.copy_(self.shadow[n])
        try:
            yield
        finally:
            with torch.no_grad():
                for n, p in self.params.items():
                    p.copy_(saved[n])

    def state_dict(self) -> Dict:
        return {"updates": self.updates, "shadow": {n: t.cpu() for n, t in self.shadow.items()}}

    def load_state_dict(self, state: Dict) -> None:
        if set(state["shadow"]) != set(self.shadow):
            raise ValueError("EMA state does not match the trained tensors; resume with the same mode and targets")
        self.updates = state["updates"]
        for n, t in state["shadow"].items():
            self.shadow[n].copy_(t)
