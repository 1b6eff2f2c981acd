"""Triton loads this file; the model itself is FastServe's Python backend."""

from python_backend.model import TritonPythonModel  # noqa: F401
