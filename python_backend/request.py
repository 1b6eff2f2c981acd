"""From a request's tensors and parameters to a GenerateRequest, with errors a person can act on.

Settings can come from three places; the most specific wins:
  1. request parameters (Triton's `parameters` map; the HTTP generate endpoint puts unknown JSON keys
     there), lowest;
  2. the `sampling_parameters` tensor, one JSON object (vLLM style);
  3. individual tensors (`max_tokens`, `temperature`, ...), highest.
Kept free of Triton so it is tested directly; model.py turns Triton tensors into numpy arrays first.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field

import numpy as np

from python_backend.engine.sequence import SamplingError, SamplingParams
from python_backend.tensors import REQUEST_FIELDS

# name -> (python type, SamplingParams field or None when it is not a sampling setting)
SETTINGS: dict[str, tuple[type, str | None]] = {f.name: (f.kind, f.sampling) for f in REQUEST_FIELDS}
DEFAULT_MAX_TOKENS = 16


@dataclass
class GenerateRequest:
    prompt: str
    params: SamplingParams
    stream: bool = False
    exclude_input_in_output: bool = False
    return_num_input_tokens: bool = False
    return_num_output_tokens: bool = False
    priority: int = 0
    chat: bool = False
    messages: list[dict] = field(default_factory=list)


def _scalar(name: str, array: np.ndarray):
    flat = np.asarray(array).reshape(-1)
    if flat.size != 1:
        raise SamplingError(f"input {name} must hold one value per request, got {flat.size}")
    value = flat[0]
    return (
        value.decode("utf-8", errors="strict")
        if isinstance(value, bytes)
        else value.item()
        if hasattr(value, "item")
        else value
    )


def _coerce(name: str, kind: type, value):
    """A setting as its Python type, or a SamplingError naming it."""
    if kind is list:
        if isinstance(value, str):
            return [value]
        if isinstance(value, (list, tuple)) and all(isinstance(v, str) for v in value):
            return list(value)
        raise SamplingError(f"{name} must be a string or a list of strings")
    if kind is bool:
        if isinstance(value, (bool, np.bool_)):
            return bool(value)
        if isinstance(value, str) and value.lower() in ("true", "false"):
            return value.lower() == "true"
        if isinstance(value, (int, np.integer)) and value in (0, 1):
            return bool(value)
        raise SamplingError(f"{name} must be true or false, got {value!r}")
    if isinstance(value, (bool, np.bool_)):
        raise SamplingError(f"{name} must be a number, got {value!r}")
    if isinstance(value, str):  # vLLM-style clients (genai-perf) send numbers as strings
        try:
            value = float(value.strip()) if kind is float or "." in value or "e" in value.lower() else int(value)
        except ValueError:
            raise SamplingError(f"{name} must be a number, got {value!r}") from None
    if kind is int:
        if isinstance(value, float) and not value.is_integer():
            raise SamplingError(f"{name} must be a whole number, got {value}")
        try:
            return int(value)
        except (TypeError, ValueError, OverflowError):
            raise SamplingError(f"{name} must be a whole number, got {value!r}") from None
    try:
        out = float(value)
    except (TypeError, ValueError):
        raise SamplingError(f"{name} must be a number, got {value!r}") from None
    if math.isnan(out) or math.isinf(out):
        raise SamplingError(f"{name} must be a finite number, got {value!r}")
    return out


def parse(inputs: dict[str, np.ndarray], parameters: dict | None = None) -> GenerateRequest:
    """Build a GenerateRequest from numpy inputs keyed by tensor name and the request's parameters."""
    if "text_input" not in inputs:
        raise SamplingError("text_input is required")
    text = inputs["text_input"]
    flat = np.asarray(text).reshape(-1)
    if flat.size != 1:
        raise SamplingError(f"text_input must hold one prompt per request, got {flat.size}")
    raw = flat[0]
    try:
        prompt = raw.decode("utf-8") if isinstance(raw, bytes) else str(raw)
    except UnicodeDecodeError:
        raise SamplingError("text_input is not valid UTF-8") from None
    settings: dict = {}
    for key, value in (parameters or {}).items():
        if key in SETTINGS:
            settings[key] = value
    if "sampling_parameters" in inputs:
        blob = _scalar("sampling_parameters", inputs["sampling_parameters"])
        try:
            extra = json.loads(blob) if blob else {}
        except json.JSONDecodeError as e:
            raise SamplingError(f"sampling_parameters is not valid JSON: {e.msg} at position {e.pos}") from None
        if not isinstance(extra, dict):
            raise SamplingError("sampling_parameters must be a JSON object")
        unknown = sorted(k for k in extra if k not in SETTINGS)
        if unknown:
            raise SamplingError(
                f"sampling_parameters has unknown keys: {', '.join(unknown)}; known keys: {', '.join(sorted(SETTINGS))}"
            )
        settings.update(extra)
    for name in SETTINGS:
        if name in inputs:
            if name == "stop_words":
                words = [
                    w.decode("utf-8") if isinstance(w, bytes) else str(w) for w in np.asarray(inputs[name]).reshape(-1)
                ]
                settings[name] = [w for w in words if w]
            else:
                settings[name] = _scalar(name, inputs[name])
    values = {name: _coerce(name, SETTINGS[name][0], v) for name, v in settings.items()}
    sp: dict = {"max_tokens": DEFAULT_MAX_TOKENS}
    for name, value in values.items():
        target = SETTINGS[name][1]
        if target:
            sp[target] = value
    params = SamplingParams(**sp)
    params.validate()
    req = GenerateRequest(
        prompt=prompt,
        params=params,
        stream=values.get("stream", False),
        exclude_input_in_output=values.get("exclude_input_in_output", False),
        return_num_input_tokens=values.get("return_num_input_tokens", False),
        return_num_output_tokens=values.get("return_num_output_tokens", False),
        priority=values.get("priority", 0),
        chat=values.get("chat", False),
    )
    if req.chat:
        req.messages = parse_messages(prompt)
    elif not prompt:
        raise SamplingError("text_input is empty")
    return req


def parse_messages(text: str) -> list[dict]:
    """A chat request's text_input: a JSON list of {"role", "content"} messages."""
    try:
        messages = json.loads(text)
    except json.JSONDecodeError as e:
        raise SamplingError(f"chat requests need text_input to be a JSON list of messages: {e.msg}") from None
    if not isinstance(messages, list) or not messages:
        raise SamplingError("chat requests need text_input to be a non-empty JSON list of messages")
    for m in messages:
        if not isinstance(m, dict) or not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
            raise SamplingError('each chat message must be an object with string "role" and "content"')
    return messages
