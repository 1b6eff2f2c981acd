"""The routing benchmark: its prompt stream, its oracle on the real SmolLM2, and a whole run through a
real tritonserver with a pool of two tiny members."""

from __future__ import annotations

import json
import statistics
from collections import Counter

import pytest

from benchmarks.routing import Grader, Prompt, headroom, load_prompts, make_stream, random_at_latency
from tests.conftest import build_entry, save_tiny_model


def test_the_prompt_stream_mixes_languages_and_difficulty():
    prompts = load_prompts()
    assert len(prompts) >= 500 and len({p.id for p in prompts}) == len({p.prompt for p in prompts}) == len(prompts)
    groups = Counter((p.lang, p.level) for p in prompts)
    assert set(groups) == {("en", "easy"), ("en", "hard"), ("zh", "easy"), ("zh", "hard")}
    assert min(groups.values()) >= 100
    stream = make_stream(prompts, 600, rate=2.0, seed=3)
    assert stream == make_stream(prompts, 600, rate=2.0, seed=3)  # replayable
    assert [a.prompt for a in stream[: len(prompts)]] == prompts and stream[len(prompts)].prompt == prompts[0]
    gaps = [b.at - a.at for a, b in zip(stream, stream[1:])]
    assert 0.4 < statistics.fmean(gaps) < 0.6


def test_the_oracle_rates_its_own_answer_one_and_a_stranger_low(smollm2_engine_dir):
    from python_backend.engine.sequence import SamplingParams

    grader = Grader(smollm2_engine_dir)
    prompt = Prompt(0, "en", "easy", "fact", "What is the capital of France?")
    chat = grader.tokenizer.apply_chat_template(
        [{"role": "user", "content": prompt.prompt}], tokenize=False, add_generation_prompt=True
    )
    ids = grader.tokenizer(chat, add_special_tokens=False).input_ids
    made = grader.engine.generate([ids], SamplingParams(max_tokens=24, temperature=0.0))[0]
    own = grader.tokenizer.decode(made.token_ids, skip_special_tokens=True)
    stopped = made.finish_reason == "stop"
    assert grader.reward(prompt, own, stopped) >= 0.95
    assert grader.reward(prompt, "Bananas are yellow and grow on trees in warm places.", False) < 0.5
    assert grader.reward(prompt, "", False) == 0.0


def test_the_random_split_is_read_at_the_routers_latency_off_the_measured_splits():
    def run(latency, reward):
        return {"latency_s": {"mean": latency}, "mean_reward": reward}

    runs = {"strongest": run(6.0, 1.0), "fastest": run(1.0, 0.9), "router": run(1.5, 0.95)}
    runs["random 0.2"] = run(2.0, 0.92)
    at = random_at_latency(runs, 1.5)
    assert at["from"] == ["fastest", "random 0.2"] and at["mean_reward"] == pytest.approx(0.91)
    assert random_at_latency(runs, 4.0)["mean_reward"] == pytest.approx(0.96)  # between the split and strongest
    assert random_at_latency(runs, 0.5) == {"mean_reward": 0.9, "from": ["fastest"], "latency_s": 1.0}
    assert random_at_latency(runs, 9.0)["from"] == ["strongest"]


@pytest.fixture(scope="module")
def routing_repo(tmp_path_factory, smollm2_source):
    from builders.pool import build_pool

    tmp = tmp_path_factory.mktemp("routing")
    repo = tmp / "repo"
    for i, name in enumerate(("big", "small")):
        folder = save_tiny_model(tmp / f"src-{name}", "llama", smollm2_source[1], seed=20 + i)
        build_entry(repo, str(folder), name, "--max-num-seqs", "4")
    build_pool(repo, "pool", {"members": ["big", "small"], "cache_size": 0, "exploration": 0.2})
    prompts = tmp / "prompts.jsonl"
    rows = [
        (0, "en", "easy", "fact", "What is the capital of Peru?"),
        (1, "zh", "easy", "math", "3加4等于多少？"),
        (2, "en", "hard", "code", "Write a Python function that reverses a list."),
        (3, "zh", "hard", "explain", "请解释光合作用。"),
    ]
    prompts.write_text("".join(json.dumps(dict(zip(Prompt.__dataclass_fields__, r))) + "\n" for r in rows))
    return repo, prompts


def test_headroom_over_a_random_split_by_group_and_in_hindsight():
    """The strongest gains 0.4 on prompts 1 and 2, nothing on 3 and 4; half the traffic goes to it.
    A random split wins half the mean gain; a router whose groups separate the gainers wins all of
    it, as hindsight does; groups that mix them win no more than random."""
    strong = {1: 1.0, 2: 1.0, 3: 0.9, 4: 0.9}
    fast = {1: 0.6, 2: 0.6, 3: 0.9, 4: 0.9}
    h = headroom(strong, fast, {1: "a", 2: "a", 3: "b", 4: "b"}, 0.5)
    assert h["random_split"] == pytest.approx(0.75 + 0.1)
    assert h["best_by_group"] == pytest.approx(0.75 + 0.2) == h["best_in_hindsight"]
    h = headroom(strong, fast, {1: "a", 2: "b", 3: "a", 4: "b"}, 0.5)
    assert h["best_by_group"] == pytest.approx(h["random_split"]) and h["best_in_hindsight"] == pytest.approx(0.95)
    assert h["reward_standard_error"] == pytest.approx(statistics.pstdev(fast.values()) / 2)


def test_the_benchmark_serves_one_stream_by_four_policies(routing_repo, tmp_path):
    from fastserve.cli import main

    repo, prompts = routing_repo
    out = tmp_path / "routing.json"
    args = ["bench", "--routing", "--repository", str(repo), "--model", "pool", "--prompts", str(prompts)]
    args += ["--strongest", "big", "--fastest", "small", "--num-requests", "8", "--rate", "4", "--output-len", "4"]
    assert main([*args, "--concurrency", "2", "--quality-weight", "0.9", "--out", str(out)]) == 0
    result = json.loads(out.read_text())
    runs = result["policies"]
    shares = result["workload"]["random_shares_strongest"]
    assert list(runs) == ["strongest", "fastest", "router"] + [f"random {q:.3f}" for q in shares]
    assert {r["member"] for r in runs["strongest"]["records"]} == {"big"}
    assert {r["member"] for r in runs["fastest"]["records"]} == {"small"}
    for q in shares:
        assert 0.0 < q < 1.0 and {r["member"] for r in runs[f"random {q:.3f}"]["records"]} <= {"big", "small"}
    for run in runs.values():
        assert run["requests"] == 8 and run["failed"] == 0
        assert all(0.0 <= r["reward"] <= 1.0 and r["tokens"] >= 1 for r in run["records"])
    assert set(result["table"]) == {"big", "small"}
    at = result["random_at_router_latency"]
    assert set(at["from"]) <= set(runs) and min(r["mean_reward"] for r in runs.values()) - 1e-9 <= at["mean_reward"]
    assert set(result["router_meets_target"]) == {
        "reward_at_least_95pct_of_strongest",
        "mean_latency_at_most_70pct_of_strongest",
        "beats_random_split_on_reward",
    }
    h = result["headroom"]
    assert h["share_strongest"] == runs["router"]["share"].get("big", 0.0)
    assert h["random_split"] <= h["best_by_group"] + 1e-9 <= h["best_in_hindsight"] + 2e-9
    assert out.with_suffix(".png").stat().st_size > 0
