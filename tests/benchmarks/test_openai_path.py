"""The OpenAI benchmark's client (benchmarks/openai_path.py) against the real `fastserve serve`:
it counts the tokens the API reports, and a run the API refuses shows up as errors, not as speed."""

from __future__ import annotations

from benchmarks.openai_path import load_openai
from tests.conftest import FRONT_KEY


def test_load_counts_every_streamed_token(front):
    prompts = ["Tell me a story.", "What is two plus two?", "Name a colour.", "Say hello."]
    run = load_openai(front.openai_url, "tiny", prompts, [5] * len(prompts), 2, key=FRONT_KEY)
    assert run["errors"] == 0 and run["requests"] == 4
    assert run["output_tokens"] == 20 and run["output_tokens_per_s"] > 0
    assert run["ttft_s"]["p50"] > 0


def test_refused_requests_are_errors(front):
    run = load_openai(front.openai_url, "tiny", ["Hello"] * 3, [4] * 3, 3, key="not-a-key")
    assert run["errors"] == 3 and run["requests"] == 0 and run["output_tokens"] == 0
    assert any("HTTP 401" in e for e in run["error_samples"])
