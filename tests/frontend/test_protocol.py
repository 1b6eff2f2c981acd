"""What OpenAI request bodies become for a FastServe model."""

from __future__ import annotations

import json

import pytest
from pydantic import ValidationError

from frontend.protocol import CHAT_MAX_TOKENS, ChatRequest, CompletionRequest
from frontend.triton import error_kind


def test_a_completion_request_becomes_the_models_settings():
    r = CompletionRequest(model="m", prompt=["a", "b"], max_tokens=5, temperature=0.5, seed=7, stop="\n", n=2)
    assert r.prompts() == ["a", "b"]
    s = r.model_settings(r.max_tokens, 1)
    assert s["max_tokens"] == 5 and s["temperature"] == 0.5 and s["stop_words"] == ["\n"]
    assert s["seed"] == 8  # each choice its own seed
    assert s["return_num_input_tokens"] and s["return_num_output_tokens"] and s["exclude_input_in_output"]
    assert "top_p" not in s  # unset stays the model's default
    assert CompletionRequest(model="m", prompt="x").max_tokens == 16


def test_chat_messages_go_to_the_models_template_and_the_budget_has_one_default():
    r = ChatRequest(
        model="m",
        messages=[
            {"role": "developer", "content": "Be brief."},
            {"role": "user", "content": [{"type": "text", "text": "你好"}, {"type": "text", "text": "!"}]},
        ],
    )
    assert json.loads(r.prompt()) == [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "你好!"}]
    assert r.token_budget() == CHAT_MAX_TOKENS
    assert ChatRequest(model="m", messages=[{"role": "user", "content": "x"}], max_tokens=9).token_budget() == 9
    both = ChatRequest(model="m", messages=[{"role": "user", "content": "x"}], max_tokens=9, max_completion_tokens=3)
    assert both.token_budget() == 3


@pytest.mark.parametrize(
    "body",
    [
        {"model": "m", "prompt": "x", "temperature": -1},
        {"model": "m", "prompt": "x", "n": 0},
        {"model": "m", "prompt": "x", "max_tokens": 0},
        {"model": "m", "prompt": "x", "frobnicate": 1},
        {"model": "m"},
    ],
)
def test_bad_completion_bodies_are_refused(body):
    with pytest.raises(ValidationError):
        CompletionRequest(**body)


def test_unsupported_settings_are_refused_by_name():
    with pytest.raises(ValueError, match="logprobs"):
        CompletionRequest(model="m", prompt="x", logprobs=2).check_supported()
    with pytest.raises(ValueError, match="stop"):
        CompletionRequest(model="m", prompt="x", stop=["a", "b", "c", "d", "e"]).model_settings(4, 0)
    with pytest.raises(ValueError, match="tools"):
        ChatRequest(model="m", messages=[{"role": "user", "content": "x"}], tools=[{"type": "function"}]).prompt()
    with pytest.raises(ValueError, match="stream_options"):
        CompletionRequest(model="m", prompt="x", stream_options={"include_usage": True}).check_supported()


def test_triton_errors_are_told_apart_by_their_words():
    assert error_kind("Request for unknown model: 'x' is not found") == "not_found"
    assert error_kind("1024 requests are already queued; retry later") == "overloaded"
    assert error_kind("the engine is not running") == "unavailable"
    assert error_kind("internal error: KeyError: 3") == "internal"
    assert error_kind("temperature must be >= 0") == "invalid"
