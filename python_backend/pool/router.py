"""The router: for each request, every member's expected quality (a contextual bandit started from
the member's offline evaluation) and expected latency (live measurements), combined by the pool's
weights into one score. The ranking is also the failover order. Feedback on a routed request
updates the bandit of the member that served it."""

from __future__ import annotations

import json
import math
import os
import tempfile
import threading
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from python_backend.pool.bandit import Arm
from python_backend.pool.latency import LatencyTracker


class PoolConfigError(ValueError):
    """A pool file or change the router cannot apply; the message says which field and why."""


class FeedbackError(ValueError):
    """Feedback the router refuses: an unknown or expired request id, or a reward outside [0, 1]."""


@dataclass(frozen=True)
class MemberSpec:
    """A member of the pool: a model in the same Triton repository."""

    name: str
    quality: float = 0.5  # the prior: expected reward before any feedback, in [0, 1]
    seats: int = 1  # requests it serves at once before more wait (its max_num_seqs)


@dataclass(frozen=True)
class PoolConfig:
    members: tuple[MemberSpec, ...]
    quality_weight: float = 0.7  # the rest of the weight goes to latency
    exploration: float = 2.0  # α, in standard deviations of the reward: how far the bandit's optimism reaches
    prior_strength: float = 4.0  # how many feedbacks the offline quality is worth
    cache_size: int = 256  # exact-match responses kept for temperature-0 requests; 0: none
    max_pending: int = 10_000  # routed requests awaiting feedback, oldest dropped first

    @classmethod
    def from_dict(cls, d: dict) -> PoolConfig:
        if not isinstance(d, dict):
            raise PoolConfigError(f"pool settings must be a JSON object, not {type(d).__name__}")
        known = {"members", "quality_weight", "exploration", "prior_strength", "cache_size", "max_pending"}
        unknown = sorted(set(d) - known)
        if unknown:
            raise PoolConfigError(f"pool settings {unknown} are unknown; known: {sorted(known)}")
        raw = d.get("members")
        if not isinstance(raw, list) or not raw:
            raise PoolConfigError("a pool needs 'members': a list of at least one model")
        members = []
        for m in raw:
            m = {"name": m} if isinstance(m, str) else m
            if not isinstance(m, dict) or not isinstance(m.get("name"), str) or not m["name"]:
                raise PoolConfigError(f"a member must be a model name or {{'name': ..., 'quality': ...}}, not {m!r}")
            extra = sorted(set(m) - {"name", "quality", "seats"})
            if extra:
                raise PoolConfigError(f"member {m['name']}: settings {extra} are unknown (name, quality, seats)")
            spec = MemberSpec(
                m["name"],
                _number(m, "quality", 0.5, f"member {m['name']}"),
                _whole(m, "seats", 1, f"member {m['name']}"),
            )
            if not 0.0 <= spec.quality <= 1.0 or spec.seats < 1:
                raise PoolConfigError(f"member {spec.name}: quality must be in [0, 1] and seats at least 1")
            members.append(spec)
        names = [m.name for m in members]
        if len(set(names)) != len(names):
            raise PoolConfigError(f"member names repeat: {names}")
        config = cls(
            tuple(members),
            _number(d, "quality_weight", cls.quality_weight),
            _number(d, "exploration", cls.exploration),
            _number(d, "prior_strength", cls.prior_strength),
            _whole(d, "cache_size", cls.cache_size),
            _whole(d, "max_pending", cls.max_pending),
        )
        if not 0.0 <= config.quality_weight <= 1.0:
            raise PoolConfigError(f"quality_weight must be in [0, 1], not {config.quality_weight}")
        if config.exploration < 0 or config.prior_strength <= 0 or config.cache_size < 0 or config.max_pending < 1:
            raise PoolConfigError("exploration and cache_size must be >= 0, prior_strength > 0, max_pending >= 1")
        return config

    def to_dict(self) -> dict:
        return {
            "members": [vars(m) for m in self.members],
            "quality_weight": self.quality_weight,
            "exploration": self.exploration,
            "prior_strength": self.prior_strength,
            "cache_size": self.cache_size,
            "max_pending": self.max_pending,
        }


def _number(d: dict, key: str, default: float, owner: str = "pool") -> float:
    value = d.get(key, default)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise PoolConfigError(f"{owner}: {key} must be a finite number, not {value!r}")
    return float(value)


def _whole(d: dict, key: str, default: int, owner: str = "pool") -> int:
    value = d.get(key, default)
    if isinstance(value, bool) or not isinstance(value, int):
        raise PoolConfigError(f"{owner}: {key} must be a whole number, not {value!r}")
    return value


@dataclass
class Choice:
    """One member's standing for one request."""

    member: str
    score: float
    quality: float
    width: float
    latency_s: float


@dataclass
class _Member:
    spec: MemberSpec
    arm: Arm
    latency: LatencyTracker = field(default_factory=LatencyTracker)
    requests: int = 0
    rewards: float = 0.0
    feedbacks: int = 0


class Router:
    """Thread-safe; state (the bandits and counts) saved atomically to `state_path` where given, by
    save() or save_if_changed()."""

    def __init__(self, config: PoolConfig, state_path: Path | None = None):
        self._lock = threading.Lock()
        self.config = config
        self.state_path = state_path
        self.members: dict[str, _Member] = {
            m.name: _Member(m, Arm(m.quality, config.prior_strength)) for m in config.members
        }
        self._pending: OrderedDict[str, tuple[str, np.ndarray]] = OrderedDict()
        self._dirty = False
        if state_path is not None and state_path.exists():
            self._load(state_path)

    def rank(
        self, x: np.ndarray, max_tokens: int, quality_weight: float | None = None, exclude: set[str] | None = None
    ) -> list[Choice]:
        """Members best first for a request with features x. A member's latency counts as its
        slowdown against the fastest candidate's (0 for the fastest, 1 for one twice as slow), so
        the score is free of units and a member that queues up pays in proportion to its queue:
        at quality_weight w, doubling the latency is worth (1 − w)/w of expected reward."""
        qw = self.config.quality_weight if quality_weight is None else quality_weight
        with self._lock:
            rows = []
            for name, m in self.members.items():
                if exclude and name in exclude:
                    continue
                est = m.arm.estimate(x)
                rows.append((name, est, m.latency.expected_s(max_tokens, m.spec.seats)))
        if not rows:
            return []
        fastest = max(1e-6, min(lat for _, _, lat in rows))
        alpha = self.config.exploration
        choices = [
            Choice(
                name, qw * (est.mean + alpha * est.width) - (1.0 - qw) * (lat / fastest - 1.0), est.mean, est.width, lat
            )
            for name, est, lat in rows
        ]
        return sorted(choices, key=lambda c: -c.score)

    def routed(self, request_id: str, member: str, x: np.ndarray) -> None:
        """Remember which member served a request, for its feedback (the oldest dropped past max_pending)."""
        with self._lock:
            if member in self.members:
                self.members[member].requests += 1
            self._pending[request_id] = (member, x)
            while len(self._pending) > self.config.max_pending:
                self._pending.popitem(last=False)

    def feedback(self, request_id: str, reward: float) -> str:
        """Credit `reward` to the member that served `request_id`; returns that member."""
        if not isinstance(reward, (int, float)) or math.isnan(reward) or not 0.0 <= reward <= 1.0:
            raise FeedbackError(f"reward must be a number in [0, 1], got {reward!r}")
        with self._lock:
            entry = self._pending.pop(request_id, None)
            if entry is None:
                raise FeedbackError(
                    f"request id {request_id!r} is unknown: not routed by this pool, already rated, or older "
                    f"than the last {self.config.max_pending} requests"
                )
            member, x = entry
            m = self.members.get(member)
            if m is not None:  # a member removed since keeps no state
                m.arm.update(x, float(reward))
                m.rewards += float(reward)
                m.feedbacks += 1
            self._dirty = True
        return member

    def latency(self, member: str) -> LatencyTracker:
        """The member's tracker; a member removed meanwhile gets a throwaway one."""
        m = self.members.get(member)
        return m.latency if m is not None else LatencyTracker()

    def reconfigure(self, config: PoolConfig) -> list[str]:
        """Apply a new pool configuration on the running pool; members kept keep what they learned.
        Returns the changes, one line each, for the log."""
        changes = []
        with self._lock:
            old = self.config
            for key in ("quality_weight", "exploration", "prior_strength", "cache_size", "max_pending"):
                if getattr(old, key) != getattr(config, key):
                    changes.append(f"{key}: {getattr(old, key)} -> {getattr(config, key)}")
            members = {}
            for spec in config.members:
                kept = self.members.get(spec.name)
                if kept is None:
                    members[spec.name] = _Member(spec, Arm(spec.quality, config.prior_strength))
                    changes.append(f"member added: {spec.name} (quality {spec.quality}, seats {spec.seats})")
                else:
                    if kept.spec != spec:
                        changes.append(f"member {spec.name}: {vars(kept.spec)} -> {vars(spec)}")
                    kept.arm.rebase(spec.quality, config.prior_strength)
                    kept.spec = spec
                    members[spec.name] = kept
            changes += [f"member removed: {name}" for name in self.members if name not in members]
            self.members = members
            self.config = config
        return changes

    def stats(self) -> dict[str, dict]:
        """Per member: requests routed, feedbacks and mean reward, the prior, live latency."""
        with self._lock:
            out = {}
            for name, m in self.members.items():
                lat = m.latency.snapshot()
                out[name] = {
                    "requests": m.requests,
                    "feedbacks": m.feedbacks,
                    "mean_reward": m.rewards / m.feedbacks if m.feedbacks else None,
                    "prior_quality": m.spec.quality,
                    "ttft_s": lat.ttft_s,
                    "per_token_s": lat.per_token_s,
                    "in_flight": lat.in_flight,
                }
            return out

    def save_if_changed(self) -> None:
        """save() when feedback arrived since the last one (the pool calls this about once a second,
        off the request path)."""
        if self._dirty:
            self.save()

    def save(self) -> None:
        """Write the learned state atomically: a reader, or a restart, sees the old file or the new one."""
        if self.state_path is None:
            return
        with self._lock:
            self._dirty = False
            state = {
                "version": 1,
                "members": {
                    name: {
                        "arm": m.arm.to_dict(),
                        "requests": m.requests,
                        "rewards": m.rewards,
                        "feedbacks": m.feedbacks,
                    }
                    for name, m in self.members.items()
                },
            }
        self.state_path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=self.state_path.parent, prefix=".router-", suffix=".json")
        try:
            with os.fdopen(fd, "w") as f:
                json.dump(state, f)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, self.state_path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise

    def _load(self, path: Path) -> None:
        try:
            state = json.loads(path.read_text())
            for name, saved in state["members"].items():
                m = self.members.get(name)
                if m is None:
                    continue  # a member no longer in the pool
                m.arm = Arm.from_dict(saved["arm"])
                m.arm.rebase(m.spec.quality, self.config.prior_strength)  # the prior may have changed since
                m.requests, m.rewards, m.feedbacks = (
                    int(saved["requests"]),
                    float(saved["rewards"]),
                    int(saved["feedbacks"]),
                )
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise PoolConfigError(f"router state {path} is unreadable ({exc}); move it away to start afresh") from exc
