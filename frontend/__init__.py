"""An OpenAI-compatible HTTP API in front of Triton: each request becomes one streaming gRPC call
to a FastServe model on the Triton server."""

DEFAULT_PORT = 9000  # as Triton's own OpenAI frontend
DEFAULT_MAX_BODY_BYTES = 1 << 20
DEFAULT_MAX_STREAMS_PER_KEY = 64
