"""Best validation loss so far and early stopping (train.early_stop): pure bookkeeping, saved in checkpoints."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Dict, Optional


@dataclass
class EarlyStopping:
    """Tracks the best validation loss; `should_stop` after `patience` evaluations without an improvement of more
    than `min_delta` (patience 0 = never)."""

    patience: int = 0
    min_delta: float = 0.0
    best: float = math.inf
    best_step: Optional[int] = None
    bad: int = 0  # evaluations since the last improvement

    def update(self, loss: float, step: int) -> bool:
        """Record the validation loss at `step`; True when it is the new best."""
        if loss < self.best - self.min_delta:
            self.best, self.best_step, self.bad = loss, step, 0
            return True
        self.bad += 1
        return False

    @property
    def should_stop(self) -> bool:
        return self.patience > 0 and self.bad >= self.patience

    def state_dict(self) -> Dict[str, Any]:
        return {"best": self.best, "best_step": self.best_step, "bad": self.bad}

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        self.best, self.best_step, self.bad = state["best"], state["best_step"], state["bad"]

