"""The router's scoring, learning, feedback checks, state file and live reconfiguration, without a
server: the pool model's tests run them through tritonserver."""

from __future__ import annotations

import json

import numpy as np
import pytest

from python_backend.pool.bandit import Arm
from python_backend.pool.features import DIM, NAMES, prompt_features
from python_backend.pool.router import FeedbackError, PoolConfig, PoolConfigError, Router


def _config(**kw) -> PoolConfig:
    d = {"members": [{"name": "big", "quality": 0.9, "seats": 2}, {"name": "small", "quality": 0.6, "seats": 2}]}
    return PoolConfig.from_dict({**d, **kw})


def test_features_describe_the_prompt():
    en = prompt_features("What is the capital of France?", chat=True, max_tokens=32)
    zh = prompt_features("法国的首都是哪里？", chat=False, max_tokens=32)
    code = prompt_features("def add(a, b):\n    return a + b", chat=False, max_tokens=64)
    math_ = prompt_features("Solve 12 * 7 = ?", chat=True, max_tokens=8)
    f = dict(zip(NAMES, en))
    assert en.shape == (DIM,) and f["bias"] == 1.0 and f["chat"] == 1.0 and f["question"] == 1.0 and f["cjk"] == 0.0
    assert dict(zip(NAMES, zh))["cjk"] > 0.8 and dict(zip(NAMES, zh))["question"] == 1.0
    assert dict(zip(NAMES, code))["code"] == 1.0 and dict(zip(NAMES, en))["code"] == 0.0
    assert dict(zip(NAMES, math_))["math"] == 1.0
    for v in (en, zh, code, math_, prompt_features("", False, 0)):
        assert ((v >= 0) & (v <= 1)).all()


def test_arm_starts_at_its_prior_and_learns_per_kind_of_prompt():
    arm = Arm(0.5)
    en, zh = prompt_features("hello there", False, 16), prompt_features("你好，世界", False, 16)
    assert arm.estimate(en).mean == pytest.approx(0.5) and arm.estimate(zh).mean == pytest.approx(0.5)
    width0 = arm.estimate(zh).width
    for _ in range(50):
        arm.update(zh, 0.0)
        arm.update(en, 1.0)
    assert arm.estimate(zh).mean < 0.15 and arm.estimate(en).mean > 0.85
    assert arm.estimate(zh).width < width0 / 3


def test_rank_weighs_quality_against_live_latency():
    router = Router(_config(quality_weight=1.0, exploration=0.0))
    x = prompt_features("hi", False, 16)
    assert [c.member for c in router.rank(x, 16)] == ["big", "small"]
    router = Router(_config(quality_weight=0.0))
    for _ in range(5):  # big is slow: 2 s to first token against small's 0.1 s
        router.latency("big").started()
        router.latency("big").finished(2.0, 4.0, 16)
        router.latency("small").started()
        router.latency("small").finished(0.1, 0.4, 16)
    assert router.rank(x, 16)[0].member == "small"
    assert router.rank(x, 16, quality_weight=1.0)[0].member == "big"  # the request's own preference
    assert [c.member for c in router.rank(x, 16, exclude={"small"})] == ["big"]


def test_a_busy_member_loses_traffic():
    router = Router(_config(quality_weight=0.5, exploration=0.0))
    x = prompt_features("hi", False, 16)
    assert router.rank(x, 16)[0].member == "big"
    for _ in range(12):  # twelve in flight on two seats: each new request waits for six rounds
        router.latency("big").started()
    assert router.rank(x, 16)[0].member == "small"


def test_a_slow_member_pays_for_every_request_in_its_queue():
    """The latency cost keeps growing with the queue even once the member is the slowest one."""
    router = Router(_config(quality_weight=0.9, exploration=0.0))
    x = prompt_features("hi", False, 16)
    scores = []
    for _ in range(6):
        router.latency("big").started()
        scores.append([c.score for c in router.rank(x, 16) if c.member == "big"][0])
    assert all(later < earlier for earlier, later in zip(scores[1:], scores[2:]))
    small = [c for c in router.rank(x, 16) if c.member == "small"][0]
    assert small.score == pytest.approx(0.9 * 0.6)  # the fastest pays nothing for latency


def test_exploration_is_measured_in_the_rewards_own_spread():
    """A member whose rewards barely vary is soon known precisely; a noisy one stays uncertain."""
    rng = np.random.default_rng(1)
    steady, noisy = Arm(0.5), Arm(0.5)
    x = prompt_features("hello there", False, 16)
    for _ in range(40):
        steady.update(x, float(np.clip(0.97 + rng.normal(0, 0.01), 0, 1)))
        noisy.update(x, float(rng.random() < 0.5))
    assert 0.9 < steady.estimate(x).mean < 0.98  # the prior of 0.5 still weighs a little
    assert steady.estimate(x).width < 0.03 < noisy.estimate(x).width
    assert steady.noise < 0.1 < noisy.noise


def test_feedback_is_checked_and_credits_the_member_that_served():
    router = Router(_config())
    x = prompt_features("hi", False, 16)
    router.routed("r1", "small", x)
    with pytest.raises(FeedbackError, match=r"in \[0, 1\]"):
        router.feedback("r1", 1.5)
    with pytest.raises(FeedbackError, match=r"in \[0, 1\]"):
        router.feedback("r1", float("nan"))
    with pytest.raises(FeedbackError, match="unknown"):
        router.feedback("nope", 0.5)
    assert router.feedback("r1", 1.0) == "small"
    with pytest.raises(FeedbackError, match="already rated"):
        router.feedback("r1", 1.0)
    assert router.stats()["small"]["feedbacks"] == 1 and router.stats()["big"]["feedbacks"] == 0


def test_pending_requests_stay_bounded():
    router = Router(_config(max_pending=3))
    x = prompt_features("hi", False, 16)
    for i in range(10):
        router.routed(f"r{i}", "big", x)
    with pytest.raises(FeedbackError):
        router.feedback("r0", 0.5)
    router.feedback("r9", 0.5)
    assert len(router._pending) == 2


def test_learned_state_survives_a_restart(tmp_path):
    path = tmp_path / "state" / "router.json"
    router = Router(_config(exploration=0.0), path)
    zh = prompt_features("你好，请介绍一下你自己", True, 32)
    for i in range(30):
        router.routed(f"r{i}", "big", zh)
        router.feedback(f"r{i}", 0.0)
    router.save_if_changed()
    before = router.rank(zh, 32)
    assert not list(path.parent.glob(".router-*"))  # no temporary file left behind
    again = Router(_config(exploration=0.0), path)
    after = again.rank(zh, 32)
    assert [c.member for c in after] == [c.member for c in before] == ["small", "big"]
    assert after[1].quality == pytest.approx(before[1].quality)
    path.write_text("{not json")
    with pytest.raises(PoolConfigError, match="unreadable"):
        Router(_config(), path)


def test_reconfigure_keeps_what_members_learned():
    router = Router(_config())
    x = prompt_features("hi", False, 16)
    for i in range(20):
        router.routed(f"r{i}", "small", x)
        router.feedback(f"r{i}", 1.0)
    learned = router.rank(x, 16, quality_weight=1.0)
    changes = router.reconfigure(
        PoolConfig.from_dict(
            {
                "members": [{"name": "small", "quality": 0.6, "seats": 2}, {"name": "tiny", "quality": 0.3}],
                "exploration": 0.5,
            }
        )
    )
    assert "member removed: big" in changes and any(c.startswith("member added: tiny") for c in changes)
    assert "exploration: 2.0 -> 0.5" in changes
    small = [c for c in router.rank(x, 16) if c.member == "small"][0]
    assert small.quality == pytest.approx([c for c in learned if c.member == "small"][0].quality)


def test_a_new_prior_applies_under_what_was_learned():
    router = Router(_config(exploration=0.0))
    x = prompt_features("hi", False, 16)
    for i in range(8):
        router.routed(f"r{i}", "small", x)
        router.feedback(f"r{i}", 1.0)
    learned = [c.quality for c in router.rank(x, 16) if c.member == "small"][0]
    lowered = PoolConfig.from_dict({"members": [{"name": "big", "quality": 0.9}, {"name": "small", "quality": 0.1}]})
    router.reconfigure(lowered)
    now = [c.quality for c in router.rank(x, 16) if c.member == "small"][0]
    assert now < learned
    fresh = Router(lowered)
    for i in range(8):
        fresh.routed(f"r{i}", "small", x)
        fresh.feedback(f"r{i}", 1.0)
    assert now == pytest.approx([c.quality for c in fresh.rank(x, 16) if c.member == "small"][0])


@pytest.mark.parametrize(
    "bad, message",
    [
        ({}, "needs 'members'"),
        ({"members": ["a", "a"]}, "repeat"),
        ({"members": [{"name": "a", "quality": 2}]}, r"quality must be in \[0, 1\]"),
        ({"members": ["a"], "speed": 1}, "unknown"),
        ({"members": [{"name": "a", "cost": 1}]}, "unknown"),
        ({"members": ["a"], "quality_weight": -1}, "quality_weight"),
        ({"members": [{"name": "a", "quality": "high"}]}, "quality must be a finite number"),
        ({"members": [{"name": "a", "seats": 1.5}]}, "seats must be a whole number"),
        ({"members": ["a"], "exploration": float("nan")}, "exploration must be a finite number"),
        ({"members": ["a"], "cache_size": None}, "cache_size must be a whole number"),
        (["a", "b"], "JSON object"),
    ],
)
def test_bad_pool_settings_are_refused(bad, message):
    with pytest.raises(PoolConfigError, match=message):
        PoolConfig.from_dict(bad)


def test_router_learns_which_member_serves_which_prompts():
    """Two members, equal latency: `big` earns 0.9 everywhere; `small` 0.95 on English and 0.1 on
    Chinese. Started from a prior that favours big, the router must learn to send English to small
    and keep Chinese on big."""
    rng = np.random.default_rng(0)
    config = PoolConfig.from_dict(
        {"members": [{"name": "big", "quality": 0.8}, {"name": "small", "quality": 0.7}], "quality_weight": 1.0}
    )
    router = Router(config)
    prompts = {"en": "Tell me about the weather today.", "zh": "请告诉我今天的天气。"}
    truth = {("big", "en"): 0.9, ("big", "zh"): 0.9, ("small", "en"): 0.95, ("small", "zh"): 0.1}
    late = {"en": [], "zh": []}
    for i in range(400):
        kind = "en" if rng.random() < 0.5 else "zh"
        x = prompt_features(prompts[kind], True, 32)
        member = router.rank(x, 32)[0].member
        router.routed(str(i), member, x)
        router.feedback(str(i), float(rng.random() < truth[(member, kind)]))
        if i >= 300:
            late[kind].append(member)
    assert late["zh"].count("big") / len(late["zh"]) > 0.9
    assert late["en"].count("small") / len(late["en"]) > 0.6
    stats = router.stats()
    assert stats["big"]["feedbacks"] + stats["small"]["feedbacks"] == 400
    assert json.loads(json.dumps(stats)) == stats  # the metrics' source is plain data
