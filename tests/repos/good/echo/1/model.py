"""Doubles a vector and upper-cases a string; it also proves the stub sees this environment (torch)."""

import numpy as np
import torch
import triton_python_backend_utils as pb_utils


class TritonPythonModel:
    def execute(self, requests):
        responses = []
        for request in requests:
            x = torch.from_numpy(pb_utils.get_input_tensor_by_name(request, "x").as_numpy().copy())
            text = pb_utils.get_input_tensor_by_name(request, "text").as_numpy()
            upper = np.array([[t.decode().upper().encode() for t in row] for row in text], dtype=np.object_)
            responses.append(
                pb_utils.InferenceResponse(
                    [
                        pb_utils.Tensor("y", (x * 2).numpy().astype(np.float32)),
                        pb_utils.Tensor("upper", upper),
                    ]
                )
            )
        return responses
