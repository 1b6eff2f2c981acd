"""The exported graph against the PyTorch decoder it came from, compared by polygraphy.

Polygraphy runs ONNX Runtime and PyTorch on the same feeds and compares every output (logits and
the grown KV cache) element by element within the tolerances below. The feeds cover what the
engine runs: a prompt's prefill with an empty cache (logits at every position), a decode step after
a cache the reference computed, and a batch of two decodes whose caches differ in length (the
shorter left-padded and masked out).
"""

from __future__ import annotations

import time
from collections import OrderedDict
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch

from builders.onnx_export import Decoder
from python_backend.engine.graph_runner import GraphNames

# float32 on both sides; the logits of a 49k-word vocabulary are sums over hundreds of products
LOGITS_ATOL, LOGITS_RTOL = 1e-2, 1e-3
KV_ATOL, KV_RTOL = 1e-3, 1e-3


@dataclass
class GraphCheck:
    """What the comparison found, as engine.json records it."""

    passed: bool | None  # None: compared for the record, without tolerances
    feeds: int
    tolerances: dict[str, dict[str, float]]
    max_abs_diff: dict[str, float] = field(default_factory=dict)  # logits, kv
    max_rel_diff: dict[str, float] = field(default_factory=dict)
    greedy_agreement: float = 1.0  # share of compared positions with the same argmax
    tool: str = ""

    def to_dict(self) -> dict:
        return asdict(self)


def _torch_runner(decoder: Decoder, names: GraphNames):
    """A polygraphy runner over the PyTorch decoder on the CPU (polygraphy's own moves it to CUDA)."""
    from polygraphy.backend.base import BaseRunner
    from polygraphy.common import TensorMetadata

    class TorchRunner(BaseRunner):
        def __init__(self):
            super().__init__(name="pytorch", prefix="pytorch-runner")

        def activate_impl(self):
            decoder.eval()

        def get_input_metadata_impl(self):
            meta = TensorMetadata()
            cfg = decoder.cfg
            for name in names.inputs:
                if name.startswith("past"):
                    meta.add(name, np.float32, ("batch", cfg.num_kv_heads, "past", cfg.head_dim))
                else:
                    meta.add(name, np.int64, ("batch", "seq"))
            return meta

        def infer_impl(self, feed_dict):
            inputs = [torch.from_numpy(np.ascontiguousarray(feed_dict[n])) for n in names.inputs]
            start = time.time()
            with torch.no_grad():
                outputs = decoder(*inputs[:4], *inputs[4:])
            self.inference_time = time.time() - start
            return OrderedDict((n, t.numpy()) for n, t in zip(names.outputs, outputs))

        def deactivate_impl(self):
            pass

    return TorchRunner()


def _feeds(decoder: Decoder, names: GraphNames, prompts: list[list[int]]) -> list[dict[str, np.ndarray]]:
    """Prefill, decode-after-cache and padded-batch-decode feeds from the prompts."""
    feeds = []
    empty = [t.numpy() for t in decoder.empty_past()]

    def feed(ids, positions, mask, rows, past) -> dict[str, np.ndarray]:
        return {
            "input_ids": np.asarray(ids, dtype=np.int64),
            "position_ids": np.asarray(positions, dtype=np.int64),
            "attention_mask": np.asarray(mask, dtype=np.int64),
            "logit_positions": np.asarray(rows, dtype=np.int64),
            **dict(zip(names.past, past)),
        }

    def cache_of(ids: list[int]) -> list[np.ndarray]:
        n = len(ids)
        with torch.no_grad():
            out = decoder(
                torch.tensor([ids]),
                torch.arange(n)[None],
                torch.ones(1, n, dtype=torch.long),
                torch.tensor([[n - 1]]),
                *decoder.empty_past(),
            )
        return [t.numpy() for t in out[1:]]

    for ids in prompts:
        n = len(ids)
        feeds.append(feed([ids], [list(range(n))], np.ones((1, n)), [list(range(n))], empty))
        if n > 1:
            feeds.append(feed([ids[-1:]], [[n - 1]], np.ones((1, n)), [[0]], cache_of(ids[:-1])))
    if len(prompts) >= 2:
        a, b = sorted(prompts[:2], key=len)
        pa, pb = cache_of(a[:-1]), cache_of(b[:-1])
        la, lb = len(a) - 1, len(b) - 1
        past = []
        for ka, kb in zip(pa, pb):
            padded = np.zeros((1, ka.shape[1], lb, ka.shape[3]), dtype=np.float32)
            padded[:, :, lb - la :] = ka
            past.append(np.concatenate([padded, kb]))
        mask = np.ones((2, lb + 1))
        mask[0, : lb - la] = 0
        feeds.append(feed([[a[-1]], [b[-1]]], [[la], [lb]], mask, [[0], [0]], past))
    return feeds


def check_graph(path: Path, decoder: Decoder, prompts: list[list[int]], tolerances: bool = True) -> GraphCheck:
    """Compare the graph at `path` with `decoder` over the prompts (token ids), within the tolerances
    or, without them, only to record the differences (a graph that quantizes its activations)."""
    import polygraphy
    from polygraphy.backend.onnxrt import OnnxrtRunner, SessionFromOnnx
    from polygraphy.comparator import Comparator, SimpleCompareFunc
    from polygraphy.logger import G_LOGGER

    G_LOGGER.module_severity = G_LOGGER.ERROR
    names = GraphNames(decoder.cfg.num_layers)
    feeds = _feeds(decoder, names, prompts)
    bound = {"logits": {"atol": LOGITS_ATOL, "rtol": LOGITS_RTOL}, "kv": {"atol": KV_ATOL, "rtol": KV_RTOL}}
    if not tolerances:
        bound = {key: {"atol": float("inf"), "rtol": float("inf")} for key in bound}
    atol = {"logits": bound["logits"]["atol"], "": bound["kv"]["atol"]}
    rtol = {"logits": bound["logits"]["rtol"], "": bound["kv"]["rtol"]}
    runners = [
        OnnxrtRunner(SessionFromOnnx(str(path), providers=["CPUExecutionProvider"]), name="onnxruntime"),
        _torch_runner(decoder, names),
    ]
    results = Comparator.run(runners, data_loader=feeds)
    accuracy = Comparator.compare_accuracy(results, compare_func=SimpleCompareFunc(atol=atol, rtol=rtol))
    max_abs = {"logits": 0.0, "kv": 0.0}
    max_rel = {"logits": 0.0, "kv": 0.0}
    for pair in accuracy:  # one AccuracyResult (runner pair -> iterations) per comparison
        for outputs in (o for iterations in pair.values() for o in iterations):
            for name, res in outputs.items():
                key = "logits" if name == "logits" else "kv"
                max_abs[key] = max(max_abs[key], res.max_absdiff)
                max_rel[key] = max(max_rel[key], res.max_reldiff)
    same = total = 0
    ort_runs, torch_runs = results[0][1], results[1][1]
    for a, b in zip(ort_runs, torch_runs):
        same += int((a["logits"].argmax(-1) == b["logits"].argmax(-1)).sum())
        total += a["logits"].shape[0] * a["logits"].shape[1]
    return GraphCheck(
        passed=bool(accuracy) if tolerances else None,
        feeds=len(feeds),
        tolerances=bound if tolerances else {},
        max_abs_diff=max_abs,
        max_rel_diff=max_rel,
        greedy_agreement=same / max(total, 1),
        tool=f"polygraphy {polygraphy.__version__}",
    )
