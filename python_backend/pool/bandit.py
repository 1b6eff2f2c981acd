"""Per-member expected reward for a request's features: a linear contextual bandit (LinUCB).

Each member keeps A = λI + Σ x xᵀ and b = λ·q₀·e₀ + Σ r x over the feedback it has had, so its
estimate starts at q₀ (the member's offline quality) for every prompt and moves, per kind of prompt,
towards the rewards it earns. The optimism term α·sqrt(xᵀA⁻¹x) is the exploration: large for kinds
of prompt a member has seldom served. State is two small arrays per member, whatever the traffic.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from python_backend.pool.features import DIM


@dataclass
class Estimate:
    """A member's expected reward for one request and the uncertainty around it."""

    mean: float
    width: float


class Arm:
    """One member's linear model of reward given features."""

    def __init__(self, prior_quality: float, prior_strength: float = 4.0, dim: int = DIM):
        self.prior_quality = prior_quality
        self.prior_strength = prior_strength
        self.A = np.eye(dim) * prior_strength
        self.b = np.zeros(dim)
        self.b[0] = prior_strength * prior_quality
        self.updates = 0
        self._inverse: np.ndarray | None = None

    def estimate(self, x: np.ndarray) -> Estimate:
        if self._inverse is None:
            self._inverse = np.linalg.inv(self.A)
        theta = self._inverse @ self.b
        return Estimate(float(theta @ x), float(np.sqrt(max(0.0, x @ self._inverse @ x))))

    def rebase(self, prior_quality: float, prior_strength: float) -> None:
        """Swap the prior under what was learned: A and b hold the prior as λI and λ·q₀·e₀ plus the
        feedback, so only the prior's share changes."""
        self.A += (prior_strength - self.prior_strength) * np.eye(len(self.b))
        self.b[0] += prior_strength * prior_quality - self.prior_strength * self.prior_quality
        self.prior_quality, self.prior_strength = prior_quality, prior_strength
        self._inverse = None

    def update(self, x: np.ndarray, reward: float) -> None:
        self.A += np.outer(x, x)
        self.b += reward * x
        self.updates += 1
        self._inverse = None

    def to_dict(self) -> dict:
        return {
            "prior_quality": self.prior_quality,
            "prior_strength": self.prior_strength,
            "A": self.A.tolist(),
            "b": self.b.tolist(),
            "updates": self.updates,
        }

    @classmethod
    def from_dict(cls, d: dict) -> Arm:
        arm = cls(float(d["prior_quality"]), float(d["prior_strength"]), dim=len(d["b"]))
        arm.A = np.asarray(d["A"], dtype=np.float64)
        arm.b = np.asarray(d["b"], dtype=np.float64)
        arm.updates = int(d["updates"])
        if arm.A.shape != (len(arm.b), len(arm.b)):
            raise ValueError(f"bandit state: A is {arm.A.shape} for b of {len(arm.b)}")
        return arm
