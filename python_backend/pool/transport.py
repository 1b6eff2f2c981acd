"""How the pool reaches its members: Triton's own gRPC endpoint on this host, one streaming call
per answer, its responses handed on as `Reply` events.

Not decoupled BLS: with BLS streams running on worker threads while the pool sends its responses,
the Python backend of tritonserver 2.51 corrupted the pool's heap (`malloc(): unaligned fastbin
chunk detected`) or crashed the server (SIGSEGV, uncaught `boost::interprocess::lock_exception` in
libtriton_python.so) within a few hundred requests at four or more streams. Over gRPC the worker
threads never touch the backend's API, and a call is cancelled by closing its stream, as a client's.
"""

from __future__ import annotations

import os
import queue
import threading
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np

DEFAULT_URL = "localhost:8001"
URL_ENV = "FASTSERVE_GRPC_URL"  # set by `fastserve serve` to the gRPC port it gave tritonserver


@dataclass
class Reply:
    """One response of a member: its output tensors, or an error that ends the call."""

    outputs: dict[str, np.ndarray] | None = None
    error: str | None = None
    status: str = "INTERNAL"  # the error's kind: INVALID_ARG, UNAVAILABLE, NOT_FOUND, INTERNAL


@dataclass
class Call:
    """A call to one member, as its Triton request id names it."""

    member: str
    call_id: str
    inputs: dict[str, np.ndarray]
    parameters: dict
    output_names: list[str]


def member_url(parameters: dict[str, str]) -> str:
    """The pool entry's `member_url` parameter, else the one `fastserve serve` exported, else 8001."""
    return parameters.get("member_url") or os.environ.get(URL_ENV) or DEFAULT_URL


class MemberCalls:
    """Each call opens its own stream to the server and closes it when done."""

    def __init__(self, url: str, poll_s: float = 0.05):
        self.url = url
        self.poll_s = poll_s

    def stream(self, call: Call, cancelled: threading.Event) -> Iterator[Reply]:
        """The member's replies until its final response or an error; stops early, cancelling the
        member's request, once `cancelled` is set."""
        import tritonclient.grpc as grpcclient
        from tritonclient.utils import np_to_triton_dtype

        replies: queue.SimpleQueue = queue.SimpleQueue()
        client = grpcclient.InferenceServerClient(self.url)
        finished = False  # the member sent its final response or an error: nothing left to cancel
        try:
            client.start_stream(callback=lambda result, error: replies.put((result, error)))
            inputs = []
            for name, value in call.inputs.items():
                array = np.asarray(value)
                kind = "BYTES" if array.dtype == np.object_ else np_to_triton_dtype(array.dtype)
                tensor = grpcclient.InferInput(name, list(array.shape), kind)
                tensor.set_data_from_numpy(array)
                inputs.append(tensor)
            client.async_stream_infer(
                call.member,
                inputs,
                request_id=call.call_id,
                parameters=call.parameters or None,
                outputs=[grpcclient.InferRequestedOutput(n) for n in call.output_names],
                enable_empty_final_response=True,
            )
            while not cancelled.is_set():
                try:
                    result, error = replies.get(timeout=self.poll_s)
                except queue.Empty:
                    continue
                if error is not None:
                    finished = True
                    yield Reply(error=error.message() or str(error), status=_status(error.status()))
                    return
                final = result.get_response().parameters.get("triton_final_response")
                finished = bool(final and final.bool_param)
                outputs = {n: a for n in call.output_names if (a := result.as_numpy(n)) is not None}
                if outputs:
                    yield Reply(outputs)
                if finished:
                    return
        except Exception as e:  # the server's port unreachable, a malformed call: this member fails
            yield Reply(error=f"calling member {call.member}: {e}", status="UNAVAILABLE")
        finally:
            try:
                client.stop_stream(cancel_requests=not finished)
            finally:
                client.close()


def _status(grpc_status: str | None) -> str:
    """tritonclient's 'StatusCode.INVALID_ARGUMENT' and friends, as the pool reports them. Errors
    inside a stream come without a status (INTERNAL here); the pool retries on their words."""
    name = (grpc_status or "").rsplit(".", 1)[-1]
    return {"INVALID_ARGUMENT": "INVALID_ARG", "UNAVAILABLE": "UNAVAILABLE", "NOT_FOUND": "NOT_FOUND"}.get(
        name, "INTERNAL"
    )
