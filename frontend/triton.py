"""The front's side of Triton: one asyncio gRPC channel, a streaming call per request, and the list
of models that speak FastServe's generate interface."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass

from clients.client import grpc_inputs, response_fields
from python_backend.serve import GRPC_ADMIN_HEADER


class TritonCallError(RuntimeError):
    """Triton or the model refused or failed a request; `kind` says which, for the HTTP status."""

    def __init__(self, message: str, kind: str):
        super().__init__(message)
        self.kind = kind  # invalid, not_found, overloaded, unavailable, internal


# Errors inside a gRPC stream carry only their message; these words say which kind each is.
_KINDS = (
    ("not_found", ("unknown model", "not found")),
    ("overloaded", ("already queued", "retry later", "overloaded")),
    ("unavailable", ("not ready", "unavailable", "is not loaded", "engine is not running", "engine died", "is down")),
    ("internal", ("internal error",)),
)


def error_kind(message: str) -> str:
    """The kind of a model's or Triton's error message; a refusal of the request is 'invalid'."""
    low = message.lower()
    for kind, words in _KINDS:
        if any(w in low for w in words):
            return kind
    return "invalid"


@dataclass
class Delta:
    """One response of a call: new text, and on the last one why it ended and the token counts."""

    text: str = ""
    finish_reason: str | None = None
    prompt_tokens: int | None = None
    completion_tokens: int | None = None
    served_by: str | None = None


class Triton:
    """Shared by every request of the front; safe for any number of concurrent calls."""

    MODEL_LIST_TTL_S = 5.0

    def __init__(self, url: str, admin_key: str | None = None):
        import tritonclient.grpc.aio as aio

        self.url = url
        self.client = aio.InferenceServerClient(url)
        # the model-repository endpoints are restricted to this key when the server has one
        self._admin = {GRPC_ADMIN_HEADER: f"Bearer {admin_key}"} if admin_key else None
        self._models: list[str] = []
        self._listed_at = 0.0
        self._list_lock = asyncio.Lock()

    async def close(self) -> None:
        await self.client.close()

    async def ready(self) -> bool:
        try:
            return bool(await self.client.is_server_ready())
        except Exception:
            return False

    async def models(self, fresh: bool = False) -> list[str]:
        """Ready models that take `text_input` and answer `text_output` (generate models and
        pools), cached for a few seconds."""
        async with self._list_lock:
            if not fresh and time.monotonic() - self._listed_at < self.MODEL_LIST_TTL_S:
                return self._models
            try:
                index = await self.client.get_model_repository_index(headers=self._admin, as_json=True)
            except Exception as e:
                raise TritonCallError(f"Triton at {self.url} is not answering: {_message(e)}", "unavailable") from e
            names = []
            for m in index.get("models", []):
                if m.get("state") != "READY":
                    continue
                try:
                    config = (await self.client.get_model_config(m["name"], as_json=True))["config"]
                except Exception:
                    continue
                inputs = {t["name"] for t in config.get("input", [])}
                outputs = {t["name"] for t in config.get("output", [])}
                if "text_input" in inputs and "text_output" in outputs:
                    names.append(m["name"])
            self._models, self._listed_at = sorted(set(names)), time.monotonic()
            return self._models

    async def check_model(self, model: str) -> None:
        """Refuse a model that is not served, looking again before saying so."""
        if model in await self.models() or model in await self.models(fresh=True):
            return
        raise TritonCallError(f"The model '{model}' does not exist or is not loaded", "not_found")

    async def generate(self, model: str, prompt: str, settings: dict, chat: bool) -> AsyncIterator[Delta]:
        """The model's responses for one request. Leaving the iteration early (a client gone, an
        error) cancels the call, and Triton cancels the request in the model."""
        from tritonclient.grpc import InferResult
        from tritonclient.grpc._utils import _get_inference_request

        inputs, params = grpc_inputs(prompt, settings, chat)
        request = _get_inference_request(
            model_name=model,
            inputs=inputs,
            model_version="",
            request_id=uuid.uuid4().hex,
            outputs=None,
            sequence_id=0,
            sequence_start=False,
            sequence_end=False,
            priority=0,
            timeout=None,
            parameters=params,
        )
        # tritonclient's asyncio stream refuses `triton_` parameters, so the final-response flag its
        # sync client sets is set here: the end of a call is then always marked.
        request.parameters["triton_enable_empty_final_response"].bool_param = True
        finished = asyncio.Event()

        async def requests():
            yield request
            await finished.wait()  # the stream stays open until the last response

        call = self.client._client_stub.ModelStreamInfer(requests())
        done = False
        try:
            async for response in call:
                if response.error_message:
                    done = True
                    raise TritonCallError(response.error_message, error_kind(response.error_message))
                result = InferResult(response.infer_response)
                out = response_fields(result)
                delta = Delta(
                    out.get("text_output", ""),
                    out.get("finish_reason") or None,
                    _int(out.get("num_input_tokens")),
                    _int(out.get("num_output_tokens")),
                    out.get("served_by") or None,
                )
                final = response.infer_response.parameters.get("triton_final_response")
                if delta.text or delta.finish_reason or delta.completion_tokens is not None:
                    yield delta
                if final is not None and final.bool_param:
                    done = True
                    return
            raise TritonCallError(f"{model} ended the call without a final response", "internal")
        except TritonCallError:
            raise
        except asyncio.CancelledError:
            raise
        except Exception as e:
            message = _message(e)
            raise TritonCallError(f"calling {model}: {message}", error_kind(message) if message else "internal") from e
        finally:
            finished.set()
            if not done:
                call.cancel()  # Triton cancels the request in the model, which frees its KV blocks


def _message(e: Exception) -> str:
    details = getattr(e, "details", None)
    if callable(details):
        try:
            return str(details())
        except Exception:
            pass
    message = getattr(e, "message", None)
    return str(message() if callable(message) else e)


def _int(value) -> int | None:
    return None if value is None else int(value)
