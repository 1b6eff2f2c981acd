"""Request parsing: where settings come from, which wins, and the messages bad input gets."""

from __future__ import annotations

import numpy as np
import pytest

from python_backend.engine.sequence import SamplingError
from python_backend.request import parse


def _t(value, dtype=None):
    return np.array([[value]], dtype=dtype or (np.object_ if isinstance(value, bytes) else None))


def test_precedence_tensor_over_json_over_parameters():
    req = parse(
        {
            "text_input": _t(b"hi"),
            "temperature": _t(0.5, np.float32),
            "sampling_parameters": _t(b'{"temperature": 0.9, "top_k": 7, "max_tokens": 30}'),
        },
        {"top_k": 3, "top_p": 0.5, "ignore_eos": True},
    )
    assert req.params.temperature == 0.5 and req.params.top_k == 7 and req.params.max_tokens == 30
    assert req.params.top_p == 0.5 and req.params.ignore_eos


def test_defaults_and_vllm_style_strings():
    req = parse({"text_input": _t(b"hi")})
    assert req.params.max_tokens == 16 and not req.stream and not req.exclude_input_in_output
    req = parse(
        {
            "text_input": _t(b"hi"),
            "sampling_parameters": _t(
                b'{"max_tokens": "64", "min_tokens": "64", "temperature": "0.7", "ignore_eos": "true"}'
            ),
        }
    )
    assert (req.params.max_tokens, req.params.min_tokens, req.params.temperature, req.params.ignore_eos) == (
        64,
        64,
        0.7,
        True,
    )


def test_stop_words_and_chat():
    req = parse(
        {
            "text_input": _t(b'[{"role": "user", "content": "Hi"}]'),
            "stop_words": np.array([[b"END", b"", b"STOP"]], dtype=np.object_),
        },
        {"chat": True},
    )
    assert req.params.stop == ["END", "STOP"] and req.messages == [{"role": "user", "content": "Hi"}]


@pytest.mark.parametrize(
    "inputs,parameters,message",
    [
        ({}, None, "text_input is required"),
        ({"text_input": _t(b"")}, None, "empty"),
        ({"text_input": _t(b"\xff\xfe")}, None, "UTF-8"),
        ({"text_input": _t(b"hi"), "max_tokens": _t(0, np.int32)}, None, "max_tokens"),
        ({"text_input": _t(b"hi"), "sampling_parameters": _t(b"[1, 2]")}, None, "JSON object"),
        (
            {"text_input": _t(b"hi"), "sampling_parameters": _t(b'{"max_tokens": "many"}')},
            None,
            "max_tokens must be a number",
        ),
        ({"text_input": _t(b"hi"), "sampling_parameters": _t(b'{"max_tokens": 2.5}')}, None, "whole number"),
        ({"text_input": _t(b"hi"), "sampling_parameters": _t(b'{"temperature": "nan"}')}, None, "finite"),
        ({"text_input": _t(b"hi")}, {"stream": "perhaps"}, "true or false"),
        ({"text_input": _t(b"not json")}, {"chat": True}, "JSON list of messages"),
        ({"text_input": _t(b'[{"role": "user"}]')}, {"chat": True}, "content"),
        ({"text_input": np.array([[b"a", b"b"]], dtype=np.object_)}, None, "one prompt"),
    ],
)
def test_bad_input_messages(inputs, parameters, message):
    with pytest.raises(SamplingError, match=message):
        parse(inputs, parameters)
