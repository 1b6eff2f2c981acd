"""A bounded exact-match cache of finished answers for deterministic (temperature 0) requests."""

from __future__ import annotations

import hashlib
import json
import threading
from collections import OrderedDict
from dataclasses import dataclass

import numpy as np


@dataclass
class CachedAnswer:
    member: str
    outputs: dict[str, np.ndarray]  # the whole answer as one response's tensors


def cache_key(inputs: dict[str, np.ndarray], parameters: dict, pinned: str | None) -> str:
    """The request's identity: every input tensor's dtype, shape and bytes, its parameters and the
    member it pinned."""
    h = hashlib.sha256()
    for name in sorted(inputs):
        a = np.asarray(inputs[name])
        h.update(name.encode())
        h.update(str(a.dtype).encode())
        h.update(str(a.shape).encode())
        h.update(a.tobytes() if a.dtype != object else json.dumps([str(v) for v in a.reshape(-1)]).encode())
    h.update(json.dumps(parameters, sort_keys=True, default=str).encode())
    h.update((pinned or "").encode())
    return h.hexdigest()


class ResponseCache:
    """Least recently used first out; thread-safe; size 0 keeps nothing."""

    def __init__(self, size: int):
        self.size = size
        self._items: OrderedDict[str, CachedAnswer] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, key: str) -> CachedAnswer | None:
        with self._lock:
            hit = self._items.get(key)
            if hit is not None:
                self._items.move_to_end(key)
            return hit

    def put(self, key: str, answer: CachedAnswer) -> None:
        if self.size <= 0:
            return
        with self._lock:
            self._items[key] = answer
            self._items.move_to_end(key)
            while len(self._items) > self.size:
                self._items.popitem(last=False)

    def resize(self, size: int) -> None:
        with self._lock:
            self.size = size
            while len(self._items) > max(0, size):
                self._items.popitem(last=False)

    def __len__(self) -> int:
        return len(self._items)
