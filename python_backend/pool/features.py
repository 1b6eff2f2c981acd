"""Cheap features of a prompt for the router's bandit: what kind of request this is, computed in
microseconds from the text alone (no tokenizer, no model)."""

from __future__ import annotations

import math
import re

import numpy as np

NAMES = ("bias", "length", "cjk", "chat", "code", "math", "question", "budget")
DIM = len(NAMES)

_CODE = re.compile(r"```|\bdef |\bclass |\breturn\b|[{};]\s*$|\bimport |#include|=>|\bfunction\b", re.M)
_MATH = re.compile(r"\d+\s*[-+*/^=]\s*\d+|\b(sum|prove|solve|equation|integral|derivative|probability)\b", re.I)
_QUESTION = re.compile(
    r"[?？]|^(what|why|how|who|when|where|which|explain|describe)\b|[吗呢]|什么|为什么|怎么|如何", re.I | re.M
)


def _cjk_fraction(text: str) -> float:
    if not text:
        return 0.0
    cjk = sum(
        1 for ch in text if "\u3400" <= ch <= "\u9fff" or "\u3040" <= ch <= "\u30ff" or "\uac00" <= ch <= "\ud7af"
    )
    return cjk / len(text)


def prompt_features(text: str, chat: bool, max_tokens: int) -> np.ndarray:
    """A [DIM] float64 vector, each entry in [0, 1]: a constant, the prompt's length (log scale),
    its share of CJK characters, chat or completion, code and math cues, whether it asks a question,
    and the output budget (log scale)."""
    return np.array(
        [
            1.0,
            min(1.0, math.log1p(len(text)) / 9.0),
            _cjk_fraction(text),
            1.0 if chat else 0.0,
            1.0 if _CODE.search(text) else 0.0,
            1.0 if _MATH.search(text) else 0.0,
            1.0 if _QUESTION.search(text) else 0.0,
            min(1.0, math.log1p(max(0, max_tokens)) / 8.0),
        ],
        dtype=np.float64,
    )
