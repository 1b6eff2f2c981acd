"""Per-member expected reward for a request's features: a linear contextual bandit (LinUCB).

Each member keeps A = λI + Σ x xᵀ and b = λ·q₀·e₀ + Σ r x over the feedback it has had, so its
estimate starts at q₀ (the member's offline quality) for every prompt and moves, per kind of prompt,
towards the rewards it earns. The optimism term α·σ·sqrt(xᵀA⁻¹x) is the exploration: large for
kinds of prompt a member has seldom served. σ is the member's own reward noise, estimated from the
residuals of its current fit, so exploration is measured in the rewards' units: members whose
rewards differ by a few hundredths are not explored as if they differed by halves. State is two
small arrays per member, whatever the traffic.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from python_backend.pool.features import DIM

NOISE_PRIOR = 0.5  # reward noise assumed before any feedback: the most a reward in [0, 1] can spread


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
        self.reward_ss = 0.0  # Σ r², for the residuals of the current fit
        self._inverse: np.ndarray | None = None

    @property
    def noise(self) -> float:
        """The reward's standard deviation around the arm's current fit (its residuals over the
        feedback so far), NOISE_PRIOR counting as one observation."""
        theta = self._theta()
        xtx = self.A - self.prior_strength * np.eye(len(self.b))
        xtr = self.b.copy()
        xtr[0] -= self.prior_strength * self.prior_quality
        rss = max(0.0, self.reward_ss - 2.0 * theta @ xtr + theta @ xtx @ theta)
        return float(np.sqrt((NOISE_PRIOR**2 + rss) / (1 + self.updates)))

    def _theta(self) -> np.ndarray:
        if self._inverse is None:
            self._inverse = np.linalg.inv(self.A)
        return self._inverse @ self.b

    def estimate(self, x: np.ndarray) -> Estimate:
        theta = self._theta()
        return Estimate(float(theta @ x), self.noise * float(np.sqrt(max(0.0, x @ self._inverse @ x))))

    def rebase(self, prior_quality: float, prior_strength: float) -> None:
        """Swap the prior under what was learned: A and b hold the prior as λI and λ·q₀·e₀ plus the
        feedback, so only the prior's share changes."""
        self.A += (prior_strength - self.prior_strength) * np.eye(len(self.b))
        self.b[0] += prior_strength * prior_quality - self.prior_strength * self.prior_quality
        self.prior_quality, self.prior_strength = prior_quality, prior_strength
        self._inverse = None

    def update(self, x: np.ndarray, reward: float) -> None:
        self.reward_ss += reward * reward
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
            "reward_ss": self.reward_ss,
        }

    @classmethod
    def from_dict(cls, d: dict) -> Arm:
        arm = cls(float(d["prior_quality"]), float(d["prior_strength"]), dim=len(d["b"]))
        arm.A = np.asarray(d["A"], dtype=np.float64)
        arm.b = np.asarray(d["b"], dtype=np.float64)
        arm.updates = int(d["updates"])
        arm.reward_ss = float(d.get("reward_ss", 0.0))
        if arm.A.shape != (len(arm.b), len(arm.b)):
            raise ValueError(f"bandit state: A is {arm.A.shape} for b of {len(arm.b)}")
        return arm
