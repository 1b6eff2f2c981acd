"""The Python API's whole path on a tiny model: prune with recovery, build, evaluate, and serve
through the real Triton server, then ask it."""

from __future__ import annotations

import json
import math

import pytest

from fastserve import api
from tests.conftest import save_tiny_model


def test_prune_build_evaluate_serve(tmp_path, smollm2_source):
    folder = save_tiny_model(tmp_path / "src", "llama", smollm2_source[1], seed=4)
    repo = tmp_path / "repo"
    entry = api.build(
        folder, "pruned", repository=repo, prune="structured", sparsity=0.5, recover_steps=3, kv_cache_gb=0.05
    )
    meta = json.loads((entry / "1" / "engine" / "engine.json").read_text())
    recovery = meta["pruning"]["recovery"]
    assert recovery["steps"] == 3 and recovery["distilled"] and math.isfinite(recovery["final_loss"])
    result = api.evaluate(entry, speed=False, eval_tokens=512, window=128)
    assert math.isfinite(result.perplexity) and result.perplexity > 1
    with api.serve(repo) as server:
        answer = api.client(server, "pruned").generate("Hello", max_tokens=4, ignore_eos=True)
    assert answer.num_output_tokens == 4


def test_build_refuses_what_the_builder_does_not_know(tmp_path):
    with pytest.raises(TypeError, match="unknown build settings: colour"):
        api.build("smollm2", "x", repository=tmp_path, colour="blue")
    with pytest.raises(ValueError, match="sparsity"):
        api.build("smollm2", "x", repository=tmp_path, prune="magnitude", sparsity="lots")
