"""The OpenAI request bodies the front takes, and what each becomes for a FastServe model: the
prompt (text, or chat messages the model renders with its own chat template) and the model's
settings by their model-side names."""

from __future__ import annotations

import json
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field

MAX_N = 16  # choices per request: each is a request of its own to the model
CHAT_MAX_TOKENS = 512  # a chat answer's budget when the request names none


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")
    include_usage: bool = False


class _Sampling(BaseModel):
    """What completions and chat share. Unknown fields are refused by name rather than ignored."""

    model_config = ConfigDict(extra="forbid")

    model: str
    temperature: Annotated[float, Field(ge=0.0, le=2.0)] | None = None
    top_p: Annotated[float, Field(gt=0.0, le=1.0)] | None = None
    seed: Annotated[int, Field(ge=0, lt=2**64)] | None = None
    stop: str | list[str] | None = None
    n: Annotated[int, Field(ge=1, le=MAX_N)] = 1
    stream: bool = False
    stream_options: StreamOptions | None = None
    presence_penalty: Annotated[float, Field(ge=-2.0, le=2.0)] | None = None
    frequency_penalty: Annotated[float, Field(ge=-2.0, le=2.0)] | None = None
    logprobs: bool | int | None = None
    user: str | None = None
    # beyond OpenAI, as vLLM takes them
    top_k: int | None = None
    min_p: float | None = None
    min_tokens: int | None = None
    repetition_penalty: float | None = None
    ignore_eos: bool | None = None

    def stop_list(self) -> list[str] | None:
        if self.stop is None:
            return None
        stops = [self.stop] if isinstance(self.stop, str) else self.stop
        if len(stops) > 4 or any(not s for s in stops):
            raise ValueError("'stop' takes up to 4 non-empty strings")
        return stops

    def check_supported(self) -> None:
        if self.logprobs:
            raise ValueError("'logprobs' is not supported")
        if self.stream_options is not None and not self.stream:
            raise ValueError("'stream_options' is only allowed when 'stream' is true")

    def model_settings(self, max_tokens: int | None, choice: int) -> dict:
        """The model-side settings for choice `choice` (0-based): with a seed, each choice gets
        seed + choice, so n sampled choices differ and are each reproducible."""
        settings = {
            "max_tokens": max_tokens,
            "temperature": self.temperature,
            "top_p": self.top_p,
            "seed": None if self.seed is None else (self.seed + choice) % 2**64,
            "presence_penalty": self.presence_penalty,
            "frequency_penalty": self.frequency_penalty,
            "top_k": self.top_k,
            "min_p": self.min_p,
            "min_tokens": self.min_tokens,
            "repetition_penalty": self.repetition_penalty,
            "ignore_eos": self.ignore_eos,
            "stop_words": self.stop_list(),
            "exclude_input_in_output": True,
            "return_num_input_tokens": True,
            "return_num_output_tokens": True,
        }
        return {k: v for k, v in settings.items() if v is not None}


class CompletionRequest(_Sampling):
    prompt: str | list[str]
    max_tokens: Annotated[int, Field(ge=1)] | None = 16  # OpenAI's default for completions
    echo: bool = False
    best_of: int | None = None
    suffix: str | None = None

    def prompts(self) -> list[str]:
        prompts = [self.prompt] if isinstance(self.prompt, str) else self.prompt
        if not prompts:
            raise ValueError("'prompt' must not be empty")
        if self.best_of not in (None, 1) or self.suffix:
            raise ValueError("'best_of' and 'suffix' are not supported")
        return prompts


class TextPart(BaseModel):
    model_config = ConfigDict(extra="forbid")
    type: Literal["text"]
    text: str


class Message(BaseModel):
    model_config = ConfigDict(extra="allow")  # 'name' and the like ride along to the chat template
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[TextPart] | None = None

    def plain(self) -> dict:
        content = self.content
        if isinstance(content, list):
            content = "".join(p.text for p in content)
        return {
            **(self.model_extra or {}),
            "role": "system" if self.role == "developer" else self.role,
            "content": content or "",
        }


class ChatRequest(_Sampling):
    messages: Annotated[list[Message], Field(min_length=1)]
    max_tokens: Annotated[int, Field(ge=1)] | None = None
    max_completion_tokens: Annotated[int, Field(ge=1)] | None = None
    response_format: dict | None = None
    tools: list | None = None
    tool_choice: str | dict | None = None
    top_logprobs: int | None = None

    def prompt(self) -> str:
        """The messages as the model's chat input: JSON it renders with its own chat template."""
        if self.tools or self.tool_choice not in (None, "none"):
            raise ValueError("'tools' are not supported")
        if self.response_format not in (None, {"type": "text"}):
            raise ValueError("'response_format' other than text is not supported")
        return json.dumps([m.plain() for m in self.messages], ensure_ascii=False)

    def token_budget(self) -> int:
        """max_completion_tokens, or the older max_tokens, or CHAT_MAX_TOKENS."""
        for budget in (self.max_completion_tokens, self.max_tokens):
            if budget is not None:
                return budget
        return CHAT_MAX_TOKENS
