"""The OpenAI-compatible API through `fastserve serve` on a real tritonserver, called with the
official `openai` package, with curl and with plain HTTP: answers equal the Triton path's, errors
come in OpenAI's shape with the right status, keys guard the API and Triton's administrative
endpoints, and a dropped stream gives its KV blocks back."""

from __future__ import annotations

import asyncio
import json
import shutil
import subprocess
import threading
import time
import urllib.error
import urllib.request

import openai
import pytest

from clients.client import Client
from tests.conftest import FRONT_BODY_LIMIT as BODY_LIMIT
from tests.conftest import FRONT_KEY as KEY
from tests.conftest import FRONT_LIMIT as LIMIT
from tests.conftest import FRONT_OTHER_KEY as OTHER_KEY


def _get(url: str, headers: dict | None = None, data: bytes | None = None, method: str | None = None):
    req = urllib.request.Request(url, data=data, headers=headers or {}, method=method)
    try:
        with urllib.request.urlopen(req, timeout=60) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()


@pytest.fixture(scope="module")
def api(front):
    return openai.OpenAI(base_url=front.url, api_key=KEY, max_retries=0, timeout=120)


def _triton(front) -> Client:
    return Client(front.grpc_url, "grpc", "smollm2")


def test_every_model_of_ours_is_listed_the_pool_included(front, api):
    assert {m.id for m in api.models.list()} == {"smollm2", "tiny", "tiny_mlfq", "pool"}
    assert api.models.retrieve("smollm2").owned_by == "fastserve"
    pooled = api.chat.completions.create(
        model="pool", messages=[{"role": "user", "content": "hi"}], max_tokens=4, temperature=0
    )
    assert pooled.choices[0].finish_reason in ("stop", "length") and pooled.usage.completion_tokens >= 1


def test_completions_equal_the_triton_paths_greedy_answers(front, api, prompt_set):
    triton = _triton(front)
    prompts = [p["text"] for p in prompt_set if p["kind"] == "completion"][:3]
    for prompt in prompts:
        want = triton.generate(prompt, max_tokens=12, temperature=0.0)
        got = api.completions.create(model="smollm2", prompt=prompt, max_tokens=12, temperature=0)
        assert got.choices[0].text == want.text
        assert got.choices[0].finish_reason == ("length" if want.finish_reason == "length" else "stop")
        assert got.usage.prompt_tokens == want.num_input_tokens
        assert got.usage.completion_tokens == want.num_output_tokens
    many = api.completions.create(model="smollm2", prompt=prompts[:2], max_tokens=6, temperature=0, n=2)
    assert [c.index for c in many.choices] == [0, 1, 2, 3]
    assert many.choices[0].text == many.choices[1].text != many.choices[2].text == many.choices[3].text


def test_chat_equals_the_triton_paths_greedy_answers_sync_and_streamed(front, api, prompt_set):
    triton = _triton(front)
    for p in [p for p in prompt_set if p["kind"] == "chat"][:3]:
        messages = [{"role": "user", "content": p["text"]}]
        want = triton.chat(messages, max_tokens=16, temperature=0.0)
        got = api.chat.completions.create(model="smollm2", messages=messages, max_tokens=16, temperature=0)
        assert got.choices[0].message.content == want.text and got.choices[0].message.role == "assistant"
        chunks = list(
            api.chat.completions.create(
                model="smollm2",
                messages=messages,
                max_completion_tokens=16,
                temperature=0,
                stream=True,
                stream_options={"include_usage": True},
            )
        )
        text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
        assert text == want.text
        assert chunks[0].choices[0].delta.role == "assistant"
        finishes = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
        assert finishes == [got.choices[0].finish_reason]
        assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == want.num_output_tokens


def test_async_client_streams_completions_and_several_choices(front, prompt_set):
    prompt = [p["text"] for p in prompt_set if p["kind"] == "completion"][0]
    want = _triton(front).generate(prompt, max_tokens=10, temperature=0.0).text

    async def go():
        api = openai.AsyncOpenAI(base_url=front.url, api_key=KEY, max_retries=0)
        try:
            stream = await api.completions.create(
                model="smollm2", prompt=prompt, max_tokens=10, temperature=0, stream=True, n=2
            )
            texts = {0: "", 1: ""}
            async for chunk in stream:
                for c in chunk.choices:
                    texts[c.index] += c.text
            whole = await api.completions.create(model="smollm2", prompt=prompt, max_tokens=10, temperature=0)
            return texts, whole.choices[0].text
        finally:
            await api.close()

    texts, whole = asyncio.run(go())
    assert texts == {0: want, 1: want} and whole == want


@pytest.mark.skipif(shutil.which("curl") is None, reason="curl is not installed")
def test_curl_streams_server_sent_events_ending_in_done(front):
    body = {"model": "smollm2", "prompt": "The capital of France is", "max_tokens": 8, "temperature": 0}
    out = subprocess.run(
        ["curl", "-sN", f"{front.url}/completions", "-H", f"Authorization: Bearer {KEY}"]
        + ["-H", "Content-Type: application/json", "-d", json.dumps({**body, "stream": True})],
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    ).stdout
    events = [line[len("data: ") :] for line in out.splitlines() if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    text = "".join(json.loads(e)["choices"][0]["text"] for e in events[:-1])
    assert text == _triton(front).generate(body["prompt"], max_tokens=8, temperature=0.0).text


def test_keys_are_required_everywhere_but_health(front):
    body = json.dumps({"model": "smollm2", "prompt": "hi", "max_tokens": 2}).encode()
    json_type = {"Content-Type": "application/json"}
    for headers in ({}, {"Authorization": "Bearer wrong-key-000"}, {"Authorization": KEY}):
        status, raw = _get(f"{front.url}/models", headers)
        assert status == 401 and json.loads(raw)["error"]["type"] == "authentication_error"
        assert _get(f"{front.url}/completions", {**headers, **json_type}, body)[0] == 401
    assert _get(f"{front.url}/models", {"Authorization": f"Bearer {OTHER_KEY}"})[0] == 200  # from the environment
    assert _get(front.url.removesuffix("/v1") + "/health")[0] == 200
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=front.url, api_key="nope-nope-nope", max_retries=0).models.list()
    assert KEY not in front.log() and OTHER_KEY not in front.log()


def test_bad_requests_get_openai_errors_with_their_status(front, api):
    with pytest.raises(openai.NotFoundError, match="does not exist"):
        api.completions.create(model="no-such-model", prompt="hi", max_tokens=2)
    with pytest.raises(openai.BadRequestError, match="temperature"):
        api.completions.create(model="smollm2", prompt="hi", max_tokens=2, temperature=-1)
    with pytest.raises(openai.BadRequestError, match="does not fit"):  # the engine's own message
        api.completions.create(model="smollm2", prompt="hi", max_tokens=10**6)
    with pytest.raises(openai.BadRequestError, match="Unrecognized request argument supplied: frobnicate"):
        api.completions.create(model="smollm2", prompt="hi", max_tokens=2, extra_body={"frobnicate": 1})
    status, raw = _get(
        f"{front.url}/chat/completions",
        {"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"},
        b"{not json",
    )
    assert status == 400 and json.loads(raw)["error"]["type"] == "invalid_request_error"
    with pytest.raises(openai.APIStatusError) as e:
        api.completions.create(model="smollm2", prompt="x" * (BODY_LIMIT + 10), max_tokens=2)
    assert e.value.status_code == 413 and "limit" in e.value.message
    assert api.completions.create(model="smollm2", prompt="hi", max_tokens=2).choices  # still serving


def _open_stream(front, model: str, key: str = KEY, max_tokens: int = 4000):
    """A raw streaming request, read up to its first event; the caller closes it."""
    import http.client

    host, port = front.url.removeprefix("http://").removesuffix("/v1").split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=120)
    body = {"model": model, "prompt": "Count: 1, 2, 3,", "max_tokens": max_tokens, "ignore_eos": True, "stream": True}
    conn.request(
        "POST",
        "/v1/completions",
        body=json.dumps(body),
        headers={"Authorization": f"Bearer {key}", "Content-Type": "application/json"},
    )
    resp = conn.getresponse()
    assert resp.status == 200, resp.read()
    assert resp.readline().startswith(b"data: ")
    return conn, resp


def test_a_key_over_its_limit_gets_429_until_a_stream_ends(front, api):
    conns = [_open_stream(front, "smollm2") for _ in range(LIMIT)]
    try:
        with pytest.raises(openai.RateLimitError, match="the limit is 3"):
            api.completions.create(model="tiny", prompt="hi", max_tokens=2)
        other = openai.OpenAI(base_url=front.url, api_key=OTHER_KEY, max_retries=0)
        assert other.completions.create(model="tiny", prompt="hi", max_tokens=2).choices  # its own limit
    finally:
        for conn, _ in conns:
            conn.close()
    deadline = time.monotonic() + 30
    while True:
        try:
            api.completions.create(model="tiny", prompt="hi", max_tokens=2)
            break
        except openai.RateLimitError:
            assert time.monotonic() < deadline, "the slots of closed streams never came back"
            time.sleep(0.2)


def _series(front, name: str, model: str, state: str) -> float:
    text = urllib.request.urlopen(front.metrics_url, timeout=10).read().decode()
    for line in text.splitlines():
        if line.startswith(name + "{") and f'model="{model}"' in line and f'state="{state}"' in line:
            return float(line.rsplit(" ", 1)[1])
    raise AssertionError(f"no {name}{{state={state}}} for {model}")


def _idle_kv(front, model: str) -> float:
    """KV blocks in use once the model has no request left, running or waiting."""
    deadline = time.monotonic() + 60
    while any(_series(front, "fastserve_requests", model, s) for s in ("running", "waiting")):
        assert time.monotonic() < deadline, f"{model} never went idle"
        time.sleep(0.2)
    return _series(front, "fastserve_kv_blocks", model, "used")


def test_a_dropped_stream_cancels_its_request_and_frees_its_kv_blocks(front):
    idle = _idle_kv(front, "smollm2")
    conn, resp = _open_stream(front, "smollm2")
    for _ in range(5):
        resp.readline()
    deadline = time.monotonic() + 30  # the engine's gauges are published a little after the fact
    while not (
        _series(front, "fastserve_requests", "smollm2", "running") == 1
        and _series(front, "fastserve_kv_blocks", "smollm2", "used") > idle
    ):
        assert time.monotonic() < deadline, "the stream never showed as running with KV blocks"
        time.sleep(0.1)
    conn.close()  # the client goes away mid-stream; its answer had thousands of tokens to go
    deadline = time.monotonic() + 30
    while _series(front, "fastserve_requests", "smollm2", "running"):
        assert time.monotonic() < deadline, "the dropped stream's request kept running"
        time.sleep(0.2)
    assert _idle_kv(front, "smollm2") == idle


def test_tritons_model_control_wants_the_key_on_http_and_grpc(front):
    import tritonclient.grpc as grpcclient
    from tritonclient.utils import InferenceServerException

    for action in ("unload", "load"):
        status, raw = _get(f"{front.http_url}/v2/repository/models/tiny/{action}", data=b"{}", method="POST")
        assert status in (401, 403), raw
    grpc = grpcclient.InferenceServerClient(front.grpc_url)
    with pytest.raises(InferenceServerException):
        grpc.unload_model("tiny")
    with pytest.raises(InferenceServerException):
        grpc.get_model_repository_index()
    assert grpc.get_model_repository_index(headers={"triton-grpc-protocol-authorization": f"Bearer {KEY}"})
    status, _ = _get(
        f"{front.http_url}/v2/repository/index", {"Authorization": f"Bearer {KEY}"}, data=b"{}", method="POST"
    )
    assert status == 200
    assert grpc.is_model_ready("tiny")
    assert Client(front.grpc_url, "grpc", "tiny").generate("hi", max_tokens=2).num_output_tokens == 2


def test_the_front_keeps_serving_while_many_streams_come_and_go(front):
    """Streams from several threads, some dropped early: every finished one is whole, and the
    key's slots all come back."""
    results, errors = [], []

    def one(i: int) -> None:
        try:
            api = openai.OpenAI(base_url=front.url, api_key=OTHER_KEY if i % 2 else KEY, max_retries=0)
            stream = api.completions.create(
                model="tiny", prompt=f"n{i}", max_tokens=8, stream=True, extra_body={"ignore_eos": True}
            )
            finish, text = None, ""
            for k, chunk in enumerate(stream):
                text += chunk.choices[0].text
                finish = chunk.choices[0].finish_reason or finish
                if i % 3 == 0 and k == 1:
                    stream.close()
                    return
            results.append((finish, text))
        except openai.RateLimitError:
            results.append(("429", ""))
        except Exception as e:  # reported below
            errors.append(repr(e))

    threads = [threading.Thread(target=one, args=(i,)) for i in range(12)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert not errors, errors
    assert results and all(finish == "429" or (finish == "length" and text) for finish, text in results)
    time.sleep(1.0)  # a dropped stream's slot comes back once the server notices the client is gone
    for key in (KEY, OTHER_KEY):  # every slot came back: each key can hold its limit again
        conns = [_open_stream(front, "smollm2", key) for _ in range(LIMIT)]
        for conn, _ in conns:
            conn.close()
