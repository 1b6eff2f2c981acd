"""The engine with the Triton kernels (attention, fused KV write, fused norms) against the PyTorch path.

On a CPU the kernels run in Triton's interpreter (tests/conftest.py sets TRITON_INTERPRET=1), so the
whole kernel path (the runner's flat int64 inputs, mixed decode + chunked-prefill batches, prefix
hits, split-KV decode) is checked here before it ever meets a GPU.
"""

from __future__ import annotations

import os

import pytest
import torch

pytest.importorskip("triton", reason="triton is not installed (pip install -e .[dev] installs it)")

from python_backend.engine.engine import Engine, EngineConfig  # noqa: E402
from python_backend.engine.sequence import SamplingParams  # noqa: E402
from tests.conftest import build_entry, save_tiny_model  # noqa: E402

pytestmark = pytest.mark.skipif(
    not torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1",
    reason="needs a GPU or Triton's interpreter",
)


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory, smollm2_source):
    tmp = tmp_path_factory.mktemp("tiny-kernels")
    folder = save_tiny_model(tmp / "src", "llama", smollm2_source[1], seed=11)
    return build_entry(tmp / "repo", str(folder), "tiny") / "1" / "engine"


def _engine(folder, kernels: bool, kv_cache_dtype: str = "auto") -> Engine:
    device = "cuda" if torch.cuda.is_available() else "cpu"
    # a small token budget forces chunked prefill next to decodes; 8-token blocks put block edges inside prompts
    return Engine(
        folder,
        EngineConfig(
            device=device,
            dtype="float32",
            kernels=kernels,
            num_kv_blocks=96,
            kv_block_size=8,
            max_num_batched_tokens=24,
            max_num_seqs=4,
            cuda_graphs=False,
            kv_cache_dtype=kv_cache_dtype,
        ),
    )


def test_kernel_engine_matches_torch_engine(tiny_dir, monkeypatch):
    monkeypatch.setenv("FASTSERVE_KERNELS_ON_CPU", "1")
    prompts = [list(range(5, 5 + n)) for n in (3, 17, 30, 9)]
    prompts.append(prompts[2][:16] + [77, 78, 79])  # shares two full blocks with prompt 2: a prefix hit
    params = SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True)
    ref_engine = _engine(tiny_dir, kernels=False)
    want = [r.token_ids for r in ref_engine.generate(prompts, params)]
    eng = _engine(tiny_dir, kernels=True)
    assert eng.model.kernels
    got = [r.token_ids for r in eng.generate(prompts, params)]
    assert got == want
    assert eng.scheduler.prefix_hit_tokens >= 16
    assert eng.blocks.num_used == 0


@pytest.mark.parametrize("kv", ["int8", "fp8"])
def test_kernel_engine_with_a_quantized_cache_matches_torch_engine(tiny_dir, monkeypatch, kv):
    """Codes and scales written by the rotary kernel and read by the attention kernels, against the
    PyTorch path's own rounding and dequantizing: the same greedy tokens, prefix hits included. A
    tuned fused QKV kernel, which writes plain values, stands aside for a quantized cache."""
    from python_backend.ops.gemv import GemvConfig

    monkeypatch.setenv("FASTSERVE_KERNELS_ON_CPU", "1")
    prompts = [list(range(5, 5 + n)) for n in (3, 17, 30, 9)]
    prompts.append(prompts[2][:16] + [77, 78, 79])
    params = SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True)
    want = [r.token_ids for r in _engine(tiny_dir, kernels=False, kv_cache_dtype=kv).generate(prompts, params)]
    eng = _engine(tiny_dir, kernels=True, kv_cache_dtype=kv)
    assert eng.model.kernels and eng.pool.storage.dtype == (torch.int8 if kv == "int8" else torch.uint8)
    eng.model.fused_qkv = {rows: GemvConfig(32, 64) for rows in (1, 2, 4)}
    assert [r.token_ids for r in eng.generate(prompts, params)] == want
    assert eng.scheduler.prefix_hit_tokens >= 16
    assert eng.blocks.num_used == 0


def test_decode_gemv_path_matches_torch_engine(tiny_dir, monkeypatch):
    """Every projection of every decode batch (at most 4 rows here) through the GEMV kernel, the down
    projection with SiLU-and-multiply fused: the same greedy tokens as the PyTorch engine."""
    from python_backend.ops.gemv import GemvConfig

    monkeypatch.setenv("FASTSERVE_KERNELS_ON_CPU", "1")
    prompts = [list(range(9, 9 + n)) for n in (4, 13, 21)]
    params = SamplingParams(max_tokens=10, temperature=0.0, ignore_eos=True)
    want = [r.token_ids for r in _engine(tiny_dir, kernels=False).generate(prompts, params)]
    eng = _engine(tiny_dir, kernels=True)
    # wide blocks: the interpreter's time goes by the number of programs (the vocabulary has 49,152 rows)
    eng.model.gemv = {
        (name, rows): GemvConfig(2048 if name == "lm_head" else 64, 32)
        for name in ("qkv", "o", "gate_up", "down", "lm_head")
        for rows in (1, 2, 4)
    }
    eng.model.fused_qkv = {}  # the QKV product through the GEMV kernel too (a GPU's start-up tuning may fuse it)
    calls = []
    from python_backend.ops import gemv as gemv_module

    real = gemv_module.gemv
    monkeypatch.setattr(gemv_module, "gemv", lambda *a, **k: calls.append(k.get("silu_mul")) or real(*a, **k))
    assert [r.token_ids for r in eng.generate(prompts, params)] == want
    assert calls.count(True) > 0 and calls.count(False) > 3 * calls.count(True)  # qkv, o, gate_up; lm_head


def test_fused_qkv_decode_path_matches_torch_engine(tiny_dir, monkeypatch):
    """Decode steps of up to 4 rows with add + norm + QKV + rotary + KV write in one launch per layer
    (prefill and larger steps keep the separate kernels): the same greedy tokens as the PyTorch engine."""
    from python_backend.ops import fused_qkv
    from python_backend.ops.gemv import GemvConfig

    monkeypatch.setenv("FASTSERVE_KERNELS_ON_CPU", "1")
    prompts = [list(range(9, 9 + n)) for n in (4, 13, 21)]
    params = SamplingParams(max_tokens=10, temperature=0.0, ignore_eos=True)
    want = [r.token_ids for r in _engine(tiny_dir, kernels=False).generate(prompts, params)]
    eng = _engine(tiny_dir, kernels=True)
    eng.model.fused_qkv = {rows: GemvConfig(32, 64) for rows in (1, 2, 4)}
    rows = []
    real = fused_qkv.add_norm_qkv_rope
    monkeypatch.setattr(
        fused_qkv, "add_norm_qkv_rope", lambda out, res, *a, **k: rows.append(res.shape[0]) or real(out, res, *a, **k)
    )
    assert [r.token_ids for r in eng.generate(prompts, params)] == want
    assert rows and set(rows) <= {1, 2, 3} and len(rows) % eng.model.cfg.num_layers == 0
    assert eng.blocks.num_used == 0
