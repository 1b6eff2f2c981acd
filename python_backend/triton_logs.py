"""FastServe's Python logging, tracebacks included, into Triton's server log (inside a model only)."""

from __future__ import annotations

import logging

import triton_python_backend_utils as pb_utils


class TritonLogHandler(logging.Handler):
    def emit(self, record: logging.LogRecord) -> None:
        try:
            text = self.format(record)
            if record.levelno >= logging.ERROR:
                pb_utils.Logger.log_error(text)
            elif record.levelno >= logging.WARNING:
                pb_utils.Logger.log_warn(text)
            else:
                pb_utils.Logger.log_info(text)
        except Exception:
            self.handleError(record)


def route_logs() -> None:
    """Send the `fastserve` loggers' records to Triton's log, once per process."""
    logger = logging.getLogger("fastserve")
    if not any(isinstance(h, TritonLogHandler) for h in logger.handlers):
        logger.addHandler(TritonLogHandler())
        logger.setLevel(logging.INFO)
        logger.propagate = False
