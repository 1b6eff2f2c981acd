"""The Python-backend model behind the real tritonserver: streaming, cancellation, bad input, metrics."""

from __future__ import annotations

import json
import queue
import threading
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import tritonclient.grpc as grpcclient

from clients.client import Client, GenerateError
from python_backend.engine.engine import Engine, EngineConfig
from python_backend.engine.sequence import SamplingParams
from tests.conftest import onnx_extra, prompt_ids

# the same serving behaviour whichever runner an entry has: PyTorch's, or ONNX Runtime's (--backend onnx)
RUNNER_ENTRIES = ["smollm2", "smollm2_onnx"]


@pytest.fixture(params=RUNNER_ENTRIES)
def model(request) -> str:
    if request.param == "smollm2_onnx" and not onnx_extra():
        pytest.skip("the onnx extra is not installed (pip install -e .[onnx])")
    return request.param


def metric(server, name: str, **labels) -> float:
    text = urllib.request.urlopen(server.metrics_url, timeout=10).read().decode()
    total = 0.0
    for line in text.splitlines():
        if line.startswith(name + "{") and all(f'{k}="{v}"' in line for k, v in labels.items()):
            total += float(line.rsplit(" ", 1)[1])
    return total


def _stream_request(
    url: str, model: str, prompt: str, max_tokens: int, settings: dict | None = None, cancel_after: int | None = None
):
    """One raw gRPC stream; returns (texts, final_seen, error)."""
    responses: queue.SimpleQueue = queue.SimpleQueue()
    client = grpcclient.InferenceServerClient(url)
    client.start_stream(callback=lambda result, error: responses.put((result, error)))
    inputs = []
    for name, dtype, value in [
        ("text_input", "BYTES", np.array([[prompt.encode()]], dtype=np.object_)),
        ("max_tokens", "INT32", np.array([[max_tokens]], dtype=np.int32)),
        ("stream", "BOOL", np.array([[True]], dtype=np.bool_)),
    ]:
        t = grpcclient.InferInput(name, list(value.shape), dtype)
        t.set_data_from_numpy(value)
        inputs.append(t)
    client.async_stream_infer(
        model, inputs, parameters={"ignore_eos": True, **(settings or {})}, enable_empty_final_response=True
    )
    texts, final, error = [], False, None
    try:
        while True:
            r, e = responses.get(timeout=300)
            if e is not None:
                error = e
                break
            if r.as_numpy("text_output") is not None:
                texts.append(r.as_numpy("text_output").reshape(-1)[0].decode())
            p = r.get_response().parameters.get("triton_final_response")
            if p and p.bool_param:
                final = True
                break
            if cancel_after is not None and len(texts) >= cancel_after:
                break
    finally:
        client.stop_stream(cancel_requests=cancel_after is not None)
        client.close()
    return texts, final, error


@pytest.fixture(scope="module")
def reference_engine(smollm2_engine_dir):
    return Engine(smollm2_engine_dir, EngineConfig(num_kv_blocks=1024))


def test_grpc_stream_and_http_match_engine(smollm2_server, model, reference_engine, prompt_set):
    tok = reference_engine.tokenizer
    grpc = Client(smollm2_server.grpc_url, "grpc", model)
    http = Client(smollm2_server.http_url, "http", model)
    n = 32

    all_ids = [prompt_ids(tok, p) for p in prompt_set]
    references = reference_engine.generate(all_ids, SamplingParams(max_tokens=n, temperature=0.0))

    def one(args):
        p, ids, expected = args
        if p["kind"] == "chat":
            messages = [{"role": "user", "content": p["text"]}]
            streamed = "".join(grpc.stream(json.dumps(messages), n, chat=True, temperature=0.0))
            whole = http.chat(messages, max_tokens=n, temperature=0.0)
        else:
            streamed = "".join(grpc.stream(p["text"], n, temperature=0.0))
            whole = http.generate(p["text"], n, temperature=0.0)
        return p, ids, expected, streamed, whole

    with ThreadPoolExecutor(8) as pool:
        results = list(pool.map(one, zip(prompt_set, all_ids, references)))
    for p, ids, expected, streamed, whole in results:
        assert streamed == expected.text, p["id"]
        assert whole.text == expected.text, p["id"]
        assert whole.num_input_tokens == len(ids), p["id"]
        assert whole.num_output_tokens == len(expected.token_ids), p["id"]
        assert whole.finish_reason == expected.finish_reason


def test_http_generate_includes_prompt_unless_excluded(smollm2_server, model):
    body = {"text_input": "The capital of France is", "max_tokens": 8, "temperature": 0.0}
    req = urllib.request.Request(
        f"http://{smollm2_server.http_url}/v2/models/{model}/generate", data=json.dumps(body).encode(), method="POST"
    )
    data = json.loads(urllib.request.urlopen(req, timeout=120).read())
    assert data["text_output"].startswith("The capital of France is") and data["finish_reason"] == "length"
    assert data["num_output_tokens"] == 8


def test_32_concurrent_streams_finish(smollm2_server, model):
    with ThreadPoolExecutor(32) as pool:
        results = list(
            pool.map(
                lambda i: _stream_request(
                    smollm2_server.grpc_url, model, f"Write item number {i} of a long list:", 128
                ),
                range(32),
            )
        )
    for texts, final, error in results:
        assert error is None and final and "".join(texts)
    assert smollm2_server.is_ready()


def test_stream_interval_sends_one_response_per_interval(smollm2_server):
    """tiny_mlfq is built with --stream-interval 4: 10 tokens come in at most 3 responses, same text."""
    texts, final, error = _stream_request(
        smollm2_server.grpc_url, "tiny_mlfq", "One two three", 10, {"temperature": 0.0}
    )
    assert error is None and final
    assert 1 <= len(texts) <= 3, texts
    whole = Client(smollm2_server.grpc_url, "grpc", "tiny_mlfq").generate(
        "One two three", max_tokens=10, temperature=0.0, ignore_eos=True
    )
    assert "".join(texts) == whole.text and whole.num_output_tokens == 10


def test_cancelled_streams_free_their_blocks(smollm2_server, model):
    with ThreadPoolExecutor(50) as pool:
        results = list(
            pool.map(
                lambda i: _stream_request(
                    smollm2_server.grpc_url,
                    model,
                    f"Count slowly to a thousand, attempt {i}:",
                    2000,
                    cancel_after=2,
                ),
                range(50),
            )
        )
    assert all(error is None and len(texts) >= 2 for texts, _, error in results)
    deadline = time.time() + 120
    while time.time() < deadline:
        used = metric(smollm2_server, "fastserve_kv_blocks", model=model, state="used")
        busy = metric(smollm2_server, "fastserve_requests", model=model)
        if used == 0 and busy == 0:
            break
        time.sleep(0.5)
    assert used == 0 and busy == 0
    assert metric(smollm2_server, "fastserve_request_finish_total", model=model, reason="cancelled") >= 50
    out = Client(smollm2_server.grpc_url, "grpc", model).generate("Hello", 4)
    assert out.num_output_tokens == 4


BAD_INPUTS = [
    ({"text_input": ""}, "empty"),
    ({"text_input": "hello " * 9000}, "context"),
    ({"max_tokens": 0}, "max_tokens"),
    ({"max_tokens": 100000}, "max_tokens"),
    ({"temperature": -1.0}, "temperature"),
    ({"top_p": 0.0}, "top_p"),
    ({"top_p": 1.5}, "top_p"),
    ({"sampling_parameters": "{not json"}, "not valid JSON"),
    ({"sampling_parameters": '{"temprature": 0.5}'}, "unknown keys: temprature"),
    ({"sampling_parameters": '{"top_k": "lots"}'}, "top_k must be a number"),
]


@pytest.mark.parametrize("fields,message", BAD_INPUTS, ids=[m for _, m in BAD_INPUTS])
def test_bad_input_is_invalid_arg_and_server_keeps_serving(smollm2_server, model, fields, message):
    types = {
        "text_input": ("BYTES", np.object_),
        "max_tokens": ("INT32", np.int32),
        "temperature": ("FP32", np.float32),
        "top_p": ("FP32", np.float32),
        "sampling_parameters": ("BYTES", np.object_),
    }
    values = {"text_input": "Hello", "max_tokens": 8, **fields}
    inputs = []
    for name, value in values.items():
        dtype, np_dtype = types[name]
        arr = np.array([[value.encode() if isinstance(value, str) else value]], dtype=np_dtype)
        t = grpcclient.InferInput(name, list(arr.shape), dtype)
        t.set_data_from_numpy(arr)
        inputs.append(t)
    errors: queue.SimpleQueue = queue.SimpleQueue()
    client = grpcclient.InferenceServerClient(smollm2_server.grpc_url)
    client.start_stream(callback=lambda result, error: errors.put(error))
    client.async_stream_infer(model, inputs)
    error = errors.get(timeout=120)
    client.stop_stream()
    assert error is not None and message in error.message()
    # The model answers with TritonError(INVALID_ARG); Triton's frontends here pass on only the message
    # (gRPC streams have no code field; the HTTP generate endpoint answers 400 for any model error).
    status, body = _http_generate(smollm2_server, {"text_input": "Hello", "max_tokens": 8, **fields}, model)
    assert status == 400 and message in body["error"]
    assert Client(smollm2_server.grpc_url, "grpc", model).generate("Hi", 3).num_output_tokens == 3


def _http_generate(server, body: dict, model: str = "smollm2") -> tuple[int, dict]:
    req = urllib.request.Request(
        f"http://{server.http_url}/v2/models/{model}/generate", data=json.dumps(body).encode(), method="POST"
    )
    try:
        with urllib.request.urlopen(req, timeout=120) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read() or b"{}")


def test_wrong_tensor_type_rejected_and_server_keeps_serving(smollm2_server, model):
    client = Client(smollm2_server.http_url, "http", model)
    with pytest.raises(GenerateError):
        client.generate("Hello", max_tokens=4, temperature="hot")
    req = urllib.request.Request(
        f"http://{smollm2_server.http_url}/v2/models/{model}/generate",
        data=json.dumps({"text_input": "Hi", "max_tokens": 2.5}).encode(),
        method="POST",
    )
    with pytest.raises(urllib.error.HTTPError):
        urllib.request.urlopen(req, timeout=60)
    assert client.generate("Hi", 3).num_output_tokens == 3


def test_overload_is_unavailable_not_a_hang(smollm2_server):
    with ThreadPoolExecutor(20) as pool:
        results = list(pool.map(lambda i: _stream_request(smollm2_server.grpc_url, "tiny", f"x {i}", 200), range(20)))
    errors = [e for _, _, e in results if e is not None]
    assert errors and all("already queued" in e.message() for e in errors)
    assert any(final for _, final, e in results if e is None)
    with ThreadPoolExecutor(12) as pool:  # over HTTP too: refused at once, the rest served
        answers = list(
            pool.map(
                lambda i: _http_generate(
                    smollm2_server, {"text_input": f"z {i}", "max_tokens": 200, "ignore_eos": True}, "tiny"
                ),
                range(12),
            )
        )
    refused = [body for status, body in answers if status != 200]
    assert refused and all("already queued" in body["error"] for body in refused)
    assert any(status == 200 and body["num_output_tokens"] == 200 for status, body in answers)
    assert Client(smollm2_server.grpc_url, "grpc", "tiny").generate("y", 2).num_output_tokens == 2


def test_metrics_move_with_traffic(smollm2_server, model):
    before = metric(smollm2_server, "fastserve_generation_tokens_total", model=model)
    ttft_before = metric(smollm2_server, "fastserve_time_to_first_token_seconds_count", model=model)
    Client(smollm2_server.grpc_url, "grpc", model).generate("Tell me about rivers.", 10, ignore_eos=True)
    deadline = time.time() + 10
    while (
        time.time() < deadline
        and metric(smollm2_server, "fastserve_generation_tokens_total", model=model) < before + 10
    ):
        time.sleep(0.1)
    assert metric(smollm2_server, "fastserve_generation_tokens_total", model=model) >= before + 10
    assert metric(smollm2_server, "fastserve_time_to_first_token_seconds_count", model=model) > ttft_before
    assert metric(smollm2_server, "fastserve_kv_blocks", model=model, state="total") > 0
    assert metric(smollm2_server, "fastserve_prompt_tokens_total", model=model) > 0


def test_mlfq_entry_serves_priorities_and_reports_its_queues(smollm2_server):
    """An entry built with --scheduler mlfq: concurrent requests of both priorities complete exactly as
    they would alone, and /metrics shows the scheduler's queues and swap space."""
    url = smollm2_server.grpc_url
    alone = Client(url, "grpc", "tiny_mlfq").generate("priority check", 40, temperature=0.0, ignore_eos=True)
    results: dict[int, object] = {}

    def run(i: int) -> None:
        results[i] = Client(url, "grpc", "tiny_mlfq").generate(
            "priority check", 40, temperature=0.0, ignore_eos=True, priority=i % 2
        )

    threads = [threading.Thread(target=run, args=(i,)) for i in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert len(results) == 6 and all((r.text, r.num_output_tokens) == (alone.text, 40) for r in results.values())
    deadline = time.time() + 10
    while (
        time.time() < deadline
        and metric(smollm2_server, "fastserve_host_kv_blocks", model="tiny_mlfq", state="total") == 0
    ):
        time.sleep(0.2)
    assert metric(smollm2_server, "fastserve_host_kv_blocks", model="tiny_mlfq", state="total") > 0
    text = urllib.request.urlopen(smollm2_server.metrics_url, timeout=10).read().decode()
    levels = {
        ln.split('level="')[1].split('"')[0]
        for ln in text.splitlines()
        if ln.startswith("fastserve_scheduler_queue_length{") and 'model="tiny_mlfq"' in ln
    }
    assert levels == {str(i) for i in range(5)}  # --mlfq-levels 5 reached the engine
    assert metric(smollm2_server, "fastserve_scheduler_queue_length", model="smollm2", level="0") >= 0
