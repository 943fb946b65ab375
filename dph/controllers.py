"""Coefficients that change between steps (like verl's adaptive KL controller), checkpointed."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from dph.policy_losses import adaptive_entropy_coef


class EntropyCoefController:
    """The entropy bonus's coefficient (algorithm.entropy_coef): fixed, or with `target` set moved
    each step toward that mean token entropy, clip(coef + lr (target - entropy), 0, max_coef)."""

    def __init__(self, coef: float, target: float | None = None, lr: float = 0.0, max_coef: float = 0.0):
        self.value, self.target, self.lr, self.max_coef = float(coef), target, lr, max_coef

    @property
    def active(self) -> bool:
        """Whether the loss needs an entropy bonus (a positive coefficient now, or one that may become so)."""
        return self.value > 0 or self.target is not None

    def update(self, entropy: float) -> None:
        if self.target is not None:
            self.value = adaptive_entropy_coef(self.value, entropy, self.target, self.lr, self.max_coef)

    def state_dict(self) -> dict[str, Any]:
        return {"value": self.value}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.value = float(state["value"])
