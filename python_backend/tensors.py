"""The generate model's inputs and outputs, declared once.

The builder writes config.pbtxt's `input` and `output` lists from these declarations, and
request.py parses requests by them, so the two cannot drift apart. The names follow the convention
of Triton's generate extension and vLLM's backend, which clients, genai-perf and Triton's OpenAI
frontend already send.
"""

from __future__ import annotations

from dataclasses import dataclass, replace


@dataclass(frozen=True)
class RequestField:
    """A request setting: its Python type, the SamplingParams field it sets (None for the model's own
    switches), and its Triton tensor type where it can also come as a tensor (None: only in the
    request's parameters or the `sampling_parameters` JSON)."""

    name: str
    kind: type
    sampling: str | None
    tensor: str | None = None
    dims: tuple[int, ...] = (1,)


@dataclass(frozen=True)
class TensorSpec:
    name: str
    data_type: str
    dims: tuple[int, ...]
    optional: bool = False


PROMPT = TensorSpec("text_input", "TYPE_STRING", (1,))
SAMPLING_JSON = TensorSpec("sampling_parameters", "TYPE_STRING", (1,), optional=True)

# in config.pbtxt order; the fields without a tensor come last
REQUEST_FIELDS: tuple[RequestField, ...] = (
    RequestField("max_tokens", int, "max_tokens", "TYPE_INT32"),
    RequestField("stream", bool, None, "TYPE_BOOL"),
    RequestField("temperature", float, "temperature", "TYPE_FP32"),
    RequestField("top_p", float, "top_p", "TYPE_FP32"),
    RequestField("top_k", int, "top_k", "TYPE_INT32"),
    RequestField("min_p", float, "min_p", "TYPE_FP32"),
    RequestField("min_tokens", int, "min_tokens", "TYPE_INT32"),
    RequestField("min_length", int, "min_tokens", "TYPE_INT32"),
    RequestField("seed", int, "seed", "TYPE_UINT64"),
    RequestField("repetition_penalty", float, "repetition_penalty", "TYPE_FP32"),
    RequestField("presence_penalty", float, "presence_penalty", "TYPE_FP32"),
    RequestField("frequency_penalty", float, "frequency_penalty", "TYPE_FP32"),
    RequestField("stop_words", list, "stop", "TYPE_STRING", (-1,)),
    RequestField("exclude_input_in_output", bool, None, "TYPE_BOOL"),
    RequestField("return_num_input_tokens", bool, None, "TYPE_BOOL"),
    RequestField("return_num_output_tokens", bool, None, "TYPE_BOOL"),
    RequestField("priority", int, None, "TYPE_INT32"),
    RequestField("ignore_eos", bool, "ignore_eos"),
    RequestField("logprobs", bool, "logprobs"),
    RequestField("stop", list, "stop"),
    RequestField("chat", bool, None),
)

FIELDS_BY_NAME: dict[str, RequestField] = {f.name: f for f in REQUEST_FIELDS}


def _input_specs() -> tuple[TensorSpec, ...]:
    specs = [PROMPT]
    for f in REQUEST_FIELDS:
        if f.tensor is not None:
            specs.append(TensorSpec(f.name, f.tensor, f.dims, optional=True))
        if f.name == "exclude_input_in_output":  # where clients have always found it
            specs.append(SAMPLING_JSON)
    return tuple(specs)


INPUTS: tuple[TensorSpec, ...] = _input_specs()
OUTPUTS: tuple[TensorSpec, ...] = (
    TensorSpec("text_output", "TYPE_STRING", (-1,)),
    TensorSpec("finish_reason", "TYPE_STRING", (1,)),
    TensorSpec("num_input_tokens", "TYPE_UINT32", (1,)),
    TensorSpec("num_output_tokens", "TYPE_UINT32", (1,)),
)

# A pool entry takes a member's inputs (text_input optional: feedback has none) and these, and
# answers with a member's outputs and these.
POOL_CONTROLS: tuple[TensorSpec, ...] = (
    TensorSpec("model", "TYPE_STRING", (1,), optional=True),  # pin a member
    TensorSpec("quality_weight", "TYPE_FP32", (1,), optional=True),  # this request's quality/latency trade
    TensorSpec("request_id", "TYPE_STRING", (1,), optional=True),  # feedback: the answer rated
    TensorSpec("reward", "TYPE_FP32", (1,), optional=True),  # feedback: its reward in [0, 1]
)
POOL_INPUTS: tuple[TensorSpec, ...] = (replace(PROMPT, optional=True), *INPUTS[1:], *POOL_CONTROLS)
POOL_OUTPUTS: tuple[TensorSpec, ...] = (
    *OUTPUTS,
    TensorSpec("served_by", "TYPE_STRING", (1,)),
    TensorSpec("request_id", "TYPE_STRING", (1,)),
)
