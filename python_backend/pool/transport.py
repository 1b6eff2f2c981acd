"""How the pool reaches its members: decoupled BLS inside the Python backend, one call streaming a
member's responses as `Reply` events.

Only the calls themselves run on the pool's worker threads; every other exchange with the server
(responses, metrics) stays on the pool's sending thread, as the Python backend of tritonserver 2.51
needs (see pool/metrics.py).
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np

from python_backend.tensors import CANCEL_PARAMETER


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


class MemberCalls:
    def stream(self, call: Call, cancelled: threading.Event) -> Iterator[Reply]:
        import triton_python_backend_utils as pb_utils

        request = pb_utils.InferenceRequest(
            request_id=call.call_id,
            model_name=call.member,
            inputs=[pb_utils.Tensor(name, value) for name, value in call.inputs.items()],
            requested_output_names=call.output_names,
            **({"parameters": call.parameters} if call.parameters else {}),
        )
        try:
            responses = request.exec(decoupled=True)
            for response in responses:
                if cancelled.is_set():
                    continue  # cancel() asked the member to stop; its last responses drain
                if response.has_error():
                    error = response.error()
                    code = getattr(error, "code", lambda: None)()
                    yield Reply(error=error.message(), status=_bls_status(pb_utils, code))
                    return
                outputs = {t.name(): t.as_numpy() for t in response.output_tensors()}
                if outputs:
                    yield Reply(outputs)
        except pb_utils.TritonModelException as e:
            yield Reply(error=str(e), status="UNAVAILABLE")

    def cancel(self, member: str, call_id: str) -> None:
        """A control request: BLS streams of this Triton cannot be cancelled from the caller's side,
        so the member is asked to stop the request it knows by `call_id`."""
        import triton_python_backend_utils as pb_utils

        control = pb_utils.InferenceRequest(
            model_name=member,
            inputs=[pb_utils.Tensor("text_input", np.array([[b""]], dtype=np.object_))],
            requested_output_names=[],
            parameters={CANCEL_PARAMETER: call_id},
        )
        for _ in control.exec(decoupled=True):
            pass


def _bls_status(pb_utils, code) -> str:
    names = {getattr(pb_utils.TritonError, n, None): n for n in ("INVALID_ARG", "UNAVAILABLE", "NOT_FOUND")}
    return names.get(code, "INTERNAL")
