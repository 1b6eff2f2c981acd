"""Runs engine steps on an exported graph (ONNX Runtime, or TensorRT where it is installed) instead
of the PyTorch model: the same scheduler, sampler and streaming around it.

The graph (builders/onnx_export.py) takes its KV cache as inputs and returns it grown by the step's
tokens, so the cache is contiguous per sequence rather than paged: each sequence keeps its own
arrays, one [kv_heads, length, head_dim] pair per layer, on the Sequence itself (freed with it).
The block manager still admits sequences by their blocks, so memory is bounded as on the PyTorch
path, but no block holds data and prefix caching and KV swapping are off.

What that costs: a decode step of several sequences gathers every sequence's whole cache into one
left-padded batch, the graph writes the grown cache anew, and each sequence copies its rows back
out, so each step copies all the KV it reads three times, where the paged path writes one slot per
token. Prefills run one sequence at a time.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import numpy as np
import torch

from python_backend.engine.scheduler import ScheduledBatch
from python_backend.engine.sequence import Sequence

log = logging.getLogger("fastserve.engine")


class GraphSession(Protocol):
    """One loaded graph: feed by input name, outputs in the graph's output order."""

    def run(self, feed: dict[str, np.ndarray]) -> list[np.ndarray]: ...


@dataclass(frozen=True)
class GraphNames:
    """The graph's input and output names, in order: the export writes them, the runners feed and
    read them."""

    num_layers: int

    @property
    def past(self) -> list[str]:
        return [n for i in range(self.num_layers) for n in (f"past_key.{i}", f"past_value.{i}")]

    @property
    def present(self) -> list[str]:
        return [n for i in range(self.num_layers) for n in (f"present_key.{i}", f"present_value.{i}")]

    @property
    def inputs(self) -> list[str]:
        return ["input_ids", "position_ids", "attention_mask", "logit_positions", *self.past]

    @property
    def outputs(self) -> list[str]:
        return ["logits", *self.present]


@dataclass
class GraphShape:
    """What the runner needs to know about the graph's KV inputs."""

    num_layers: int
    num_kv_heads: int
    head_dim: int
    vocab_size: int


@dataclass
class SequenceKV:
    """One sequence's cache: per layer, keys and values [kv_heads, length, head_dim]."""

    keys: list[np.ndarray]
    values: list[np.ndarray]

    @property
    def length(self) -> int:
        return self.keys[0].shape[1]

    def truncated(self, n: int) -> SequenceKV:
        return SequenceKV([k[:, :n] for k in self.keys], [v[:, :n] for v in self.values])


class OnnxRuntimeSession:
    """An ONNX Runtime inference session on the CPU."""

    def __init__(self, path: Path, num_threads: int = 0):
        import onnxruntime as ort

        opts = ort.SessionOptions()
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        if num_threads:
            opts.intra_op_num_threads = num_threads
        opts.inter_op_num_threads = 1
        self.session = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
        self.output_names = [o.name for o in self.session.get_outputs()]

    def run(self, feed: dict[str, np.ndarray]) -> list[np.ndarray]:
        return self.session.run(self.output_names, feed)


def tensorrt_missing(builder: bool = False) -> str | None:
    """Why TensorRT (its builder too, where asked) cannot be used here, or None."""
    import importlib

    try:
        trt = importlib.import_module("tensorrt")
    except ImportError as e:
        why = f"TensorRT is not installed (import tensorrt: {e})"
    else:
        if not builder or hasattr(trt, "Builder"):
            return None
        why = f"only TensorRT's lean runtime is installed ({getattr(trt, '__version__', '?')}), without its builder"
    return (
        f"{why}. TensorRT with its builder comes with NVIDIA's containers: docker/Dockerfile.tensorrt builds "
        "FastServe on the Triton Inference Server image (nvcr.io/nvidia/tritonserver:<yy.mm>-py3) with the "
        "Python bindings of the TensorRT image of the same release. Without it, build with --backend onnx."
    )


PREFILL_PROFILE, DECODE_PROFILE = 0, 1  # the TensorRT engine's optimization profiles (builders/graph.py)


class TensorRTSession:
    """A TensorRT engine run through polygraphy's runner, which sets the dynamic shapes from each feed.
    Prefills (one sequence, many tokens) and decodes (many sequences, one token) each have their
    optimization profile."""

    def __init__(self, path: Path, num_layers: int):
        why = tensorrt_missing()
        if why:
            raise RuntimeError(why)
        from polygraphy.backend.trt import EngineFromBytes, TrtRunner

        self.runner = TrtRunner(EngineFromBytes(path.read_bytes()))
        self.runner.activate()
        self.output_names = GraphNames(num_layers).outputs
        self._profile = PREFILL_PROFILE
        self.runner.set_profile(self._profile)

    def run(self, feed: dict[str, np.ndarray]) -> list[np.ndarray]:
        profile = PREFILL_PROFILE if feed["input_ids"].shape[1] > 1 else DECODE_PROFILE
        if profile != self._profile:
            self.runner.set_profile(profile)
            self._profile = profile
        out = self.runner.infer(feed)
        return [np.array(out[n], copy=True) for n in self.output_names]  # the runner reuses its buffers


class GraphRunner:
    """The engine's runner over a GraphSession. Same contract as runner.Runner: run() returns the
    float32 logits of the sequences that make a token this step, in the order returned beside them."""

    paged_kv = False

    def __init__(self, session: GraphSession, shape: GraphShape):
        self.session = session
        self.shape = shape
        self.device = torch.device("cpu")
        self._past = GraphNames(shape.num_layers).past

    def _empty(self) -> SequenceKV:
        s = self.shape
        blank = np.zeros((s.num_kv_heads, 0, s.head_dim), dtype=np.float32)
        return SequenceKV([blank] * s.num_layers, [blank] * s.num_layers)

    def _cache_at(self, seq: Sequence, first: int) -> SequenceKV:
        """The sequence's cache holding exactly its first `first` tokens."""
        kv = seq.runner_kv
        if first == 0 or kv is None:
            if first:
                raise RuntimeError(f"{seq.request_id}: {first} tokens computed but no cache kept for them")
            return self._empty()
        if kv.length < first:
            raise RuntimeError(f"{seq.request_id}: cache holds {kv.length} tokens, the step expects {first}")
        return kv if kv.length == first else kv.truncated(first)

    def _feed(self, ids, positions, mask, rows, keys, values) -> dict[str, np.ndarray]:
        feed = {"input_ids": ids, "position_ids": positions, "attention_mask": mask, "logit_positions": rows}
        for i in range(self.shape.num_layers):
            feed[self._past[2 * i]] = keys[i]
            feed[self._past[2 * i + 1]] = values[i]
        return feed

    def _prefill(self, seq: Sequence, n: int, all_rows: bool = False) -> np.ndarray:
        """Run n tokens of one sequence after what its cache holds; logits of the last (or every) row."""
        first = seq.num_computed
        kv = self._cache_at(seq, first)
        ids = np.asarray(seq.all_ids[first : first + n], dtype=np.int64)[None]
        positions = np.arange(first, first + n, dtype=np.int64)[None]
        mask = np.ones((1, first + n), dtype=np.int64)
        rows = (np.arange(n) if all_rows else np.array([n - 1]))[None].astype(np.int64)
        out = self.session.run(
            self._feed(ids, positions, mask, rows, [k[None] for k in kv.keys], [v[None] for v in kv.values])
        )
        seq.runner_kv = SequenceKV([k[0] for k in out[1::2]], [v[0] for v in out[2::2]])
        return out[0][0]

    def _decode(self, seqs: list[Sequence], ids: list[int]) -> np.ndarray:
        """One token for each sequence, as one batch: caches left-padded to the longest, the padding
        masked out. Each sequence keeps a copy of its rows of the grown cache (a view would keep the
        whole padded batch alive)."""
        s = self.shape
        kvs = [self._cache_at(seq, seq.num_computed) for seq in seqs]
        lengths = [kv.length for kv in kvs]
        longest = max(lengths)
        b = len(seqs)
        if b == 1:
            keys, values = [k[None] for k in kvs[0].keys], [v[None] for v in kvs[0].values]
        else:
            keys, values = [], []
            for layer in range(s.num_layers):
                for store, part in ((keys, "keys"), (values, "values")):
                    batch = np.zeros((b, s.num_kv_heads, longest, s.head_dim), dtype=np.float32)
                    for row, (kv, n) in enumerate(zip(kvs, lengths)):
                        if n:
                            batch[row, :, longest - n :] = getattr(kv, part)[layer]
                    store.append(batch)
        mask = np.zeros((b, longest + 1), dtype=np.int64)
        for row, n in enumerate(lengths):
            mask[row, longest - n :] = 1
        out = self.session.run(
            self._feed(
                np.asarray(ids, dtype=np.int64)[:, None],
                np.asarray([seq.num_computed for seq in seqs], dtype=np.int64)[:, None],
                mask,
                np.zeros((b, 1), dtype=np.int64),
                keys,
                values,
            )
        )
        if b == 1:
            seqs[0].runner_kv = SequenceKV([k[0] for k in out[1::2]], [v[0] for v in out[2::2]])
            return out[0][:, 0]
        for row, (seq, n) in enumerate(zip(seqs, lengths)):
            start = longest - n
            seq.runner_kv = SequenceKV(
                [k[row, :, start:].copy() for k in out[1::2]],
                [v[row, :, start:].copy() for v in out[2::2]],
            )
        return out[0][:, 0]

    def run(
        self, batch: ScheduledBatch, decode_ids: torch.Tensor | None = None
    ) -> tuple[torch.Tensor | None, list[Sequence]]:
        rows: list[np.ndarray] = []
        sampled: list[Sequence] = []
        if batch.decodes:
            seqs = batch.decodes
            ids = decode_ids.tolist() if decode_ids is not None else [s.token_at(s.num_computed) for s in seqs]
            rows.extend(self._decode(seqs, ids))
            sampled.extend(seqs)
        for seq, n in batch.prefills:
            logits = self._prefill(seq, n)
            if seq.num_computed + n == seq.num_tokens:
                rows.append(logits[-1])
                sampled.append(seq)
        if not sampled:
            return None, sampled
        return torch.from_numpy(np.stack(rows)), sampled

    def prompt_logits(self, seq: Sequence) -> torch.Tensor:
        """float32 logits at every position of a sequence's tokens, in one prefill."""
        logits = self._prefill(seq, seq.num_tokens, all_rows=True)
        seq.runner_kv = None
        return torch.from_numpy(logits)
