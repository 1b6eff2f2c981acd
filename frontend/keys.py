"""API keys and per-key limits. Keys are compared in constant time and never logged; a request
names itself by a short fingerprint of its key where a log line needs one."""

from __future__ import annotations

import hashlib
import hmac
import os
import threading
from pathlib import Path

KEY_ENV = "FASTSERVE_API_KEY"  # one key, or several separated by commas


class Unauthorized(Exception):
    """No key, or not one of ours."""


class OverLimit(Exception):
    """The key already has its most concurrent requests in flight."""


def load_keys(
    flags: list[str] | None = None, file: str | os.PathLike | None = None, env: dict | None = None
) -> list[str]:
    """Keys from `--api-key` (repeatable), then `$FASTSERVE_API_KEY`, then a file (one per line, #
    comments), in that order, without repeats. The first is the one Triton's own restricted
    endpoints take."""
    env = os.environ if env is None else env
    keys = [k.strip() for k in flags or []]
    keys += [k.strip() for k in env.get(KEY_ENV, "").split(",")]
    if file is not None:
        path = Path(file)
        if not path.is_file():
            raise ValueError(f"API key file {path} does not exist")
        keys += [ln.split("#", 1)[0].strip() for ln in path.read_text().splitlines()]
    keys = list(dict.fromkeys(k for k in keys if k))
    for k in keys:
        if len(k) < 8 or any(c.isspace() for c in k) or not k.isprintable():
            raise ValueError(f"API key {fingerprint(k)} must be at least 8 printable characters without spaces")
    return keys


def fingerprint(key: str) -> str:
    """What logs may show of a key."""
    return "key-" + hashlib.sha256(key.encode()).hexdigest()[:8]


class Keys:
    """Who may call, and how many requests each caller may have in flight. Without keys every
    caller is let in and shares one limit."""

    def __init__(self, keys: list[str], max_streams_per_key: int):
        if max_streams_per_key < 1:
            raise ValueError("the limit of concurrent requests per key must be at least 1")
        self._keys = [k.encode() for k in keys]
        self.limit = max_streams_per_key
        self._in_flight: dict[str, int] = {}
        self._lock = threading.Lock()

    @property
    def required(self) -> bool:
        return bool(self._keys)

    def check(self, authorization: str | None) -> str:
        """The caller's key from an `Authorization: Bearer KEY` header ('' where none is needed)."""
        if not self._keys:
            return ""
        scheme, _, given = (authorization or "").partition(" ")
        if scheme.lower() != "bearer" or not given.strip():
            raise Unauthorized("Missing API key: send it as 'Authorization: Bearer <key>'")
        candidate = given.strip().encode()
        if not any(hmac.compare_digest(candidate, k) for k in self._keys):
            raise Unauthorized("Incorrect API key provided")
        return given.strip()

    def acquire(self, key: str, count: int = 1) -> None:
        """Take `count` of the key's concurrent requests; OverLimit where they do not fit."""
        with self._lock:
            now = self._in_flight.get(key, 0)
            if now + count > self.limit:
                raise OverLimit(
                    f"Too many concurrent requests for this key: {now} in flight, {count} more asked, "
                    f"the limit is {self.limit}"
                )
            self._in_flight[key] = now + count

    def release(self, key: str, count: int = 1) -> None:
        with self._lock:
            left = self._in_flight.get(key, 0) - count
            if left > 0:
                self._in_flight[key] = left
            else:
                self._in_flight.pop(key, None)

    def in_flight(self, key: str = "") -> int:
        with self._lock:
            return self._in_flight.get(key, 0)
