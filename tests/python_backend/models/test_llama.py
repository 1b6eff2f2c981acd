"""The Llama model on the CPU in bfloat16: it loads and serves whether or not this CPU lets oneDNN prepack
the weights (an AVX2-only CPU does not), and the prepacked products give the same greedy tokens as
plain F.linear."""

from __future__ import annotations

import pytest
import torch

from python_backend.engine.engine import Engine, EngineConfig
from python_backend.engine.sequence import SamplingParams
from python_backend.models import llama
from tests.conftest import build_entry, save_tiny_model

PROMPTS = [[1, 2, 3, 4, 5], [9, 8, 7], list(range(10, 40))]
GREEDY = SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True)  # a random model may hit EOS early


@pytest.fixture(scope="module")
def tiny_bf16_engine_dir(tmp_path_factory, smollm2_source):
    tmp = tmp_path_factory.mktemp("tiny-bf16")
    folder = save_tiny_model(tmp / "src", "llama", smollm2_source[1], seed=3)
    return build_entry(tmp / "repo", str(folder), "tiny", "--dtype", "bfloat16") / "1" / "engine"


def _greedy(engine_dir) -> tuple[bool, list[list[int]]]:
    engine = Engine(engine_dir, EngineConfig(device="cpu"))
    try:
        packed = engine.model._linear is llama._packed_linear
        return packed, [r.token_ids for r in engine.generate(PROMPTS, GREEDY)]
    finally:
        engine.shutdown()


def test_bfloat16_engine_serves_with_or_without_prepacked_weights(tiny_bf16_engine_dir, monkeypatch):
    packed, tokens = _greedy(tiny_bf16_engine_dir)
    assert packed == bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    assert [len(t) for t in tokens] == [12, 12, 12]
    monkeypatch.setattr(llama, "_can_pack", lambda device, dtype: False)
    unpacked, plain = _greedy(tiny_bf16_engine_dir)
    assert not unpacked
    assert tokens == plain
