"""The ONNX Runtime runner inside the engine: the same tokens as the PyTorch runner whatever the
batching (mixed prefills and decodes, chunked prompts, preemption), and caches freed with their sequences."""

from __future__ import annotations

import json
import random
import shutil

import pytest

from python_backend.engine.engine import Engine
from python_backend.engine.engine_folder import EngineFolderError
from python_backend.engine.graph_runner import GraphRunner
from python_backend.engine.sequence import SamplingParams
from tests.conftest import run_staggered

pytest.importorskip("onnxruntime", reason="the onnx extra is not installed (pip install -e .[onnx])")


@pytest.fixture(scope="module")
def engine_dir(tiny_onnx_entry):
    return tiny_onnx_entry / "1" / "engine"


def _prompts(n: int, seed: int = 0) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(100, 40000) for _ in range(rng.randrange(3, 90))] for _ in range(n)]


def _tokens(results) -> list[list[int]]:
    return [list(r.token_ids) for r in results]


def test_auto_runs_the_entrys_graph(engine_dir):
    engine = Engine.from_folder(engine_dir, num_kv_blocks=256)
    assert isinstance(engine.runner, GraphRunner) and engine.model is None
    assert not engine.blocks.enable_prefix_caching


@pytest.mark.parametrize(
    "settings",
    [
        {},  # decodes batched together, prefills whole
        {"max_num_batched_tokens": 16},  # prompts prefilled in chunks beside running decodes
        # blocks short: running jobs are preempted and recompute their cache
        {"scheduler": "mlfq", "max_num_seqs": 3, "mlfq_base_quantum_s": 0.0005, "num_kv_blocks": 14},
    ],
    ids=["fcfs", "chunked", "mlfq-preempting"],
)
def test_graph_runner_greedy_equals_pytorch_runner(engine_dir, settings):
    params = SamplingParams(max_tokens=20, temperature=0.0, ignore_eos=True)
    prompts = _prompts(10)
    out = {}
    for runner in ("pytorch", "onnxruntime"):
        engine = Engine.from_folder(engine_dir, runner=runner, **{"num_kv_blocks": 256, **settings})
        out[runner] = _tokens(run_staggered(engine, prompts, params, every=2, per_step=2))
        assert engine.blocks.num_free == engine.blocks.num_blocks
        if "num_kv_blocks" in settings:
            assert engine.scheduler.num_preemptions > 0
    assert out["onnxruntime"] == out["pytorch"]


def test_graph_runner_prompt_logits_match_pytorch(engine_dir):
    import torch

    ids = _prompts(1, seed=4)[0]
    graph = Engine.from_folder(engine_dir, num_kv_blocks=64).prompt_logits(ids)
    torch_logits = Engine.from_folder(engine_dir, runner="pytorch", num_kv_blocks=64).prompt_logits(ids)
    assert graph.shape == torch_logits.shape == (len(ids), torch_logits.shape[1])
    assert torch.allclose(graph, torch_logits, atol=1e-4, rtol=1e-4)


def test_caches_are_dropped_with_their_sequences(engine_dir):
    engine = Engine.from_folder(engine_dir, num_kv_blocks=256, max_num_seqs=4)
    params = SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True)
    seqs = [engine.add_request(f"r{i}", ids, params) for i, ids in enumerate(_prompts(6, seed=2))]
    while engine.has_work():
        engine.step()
        for s in seqs:
            if s.runner_kv is not None:  # each cache holds its own tokens, not a padded batch's
                assert s.runner_kv.length == s.num_computed
                key = s.runner_kv.keys[0]
                assert key.base is None or key.base.nbytes == key.nbytes
    assert all(s.finish_reason == "length" and s.runner_kv is None for s in seqs)
    aborted = engine.add_request("gone", _prompts(1, seed=9)[0], SamplingParams(max_tokens=50, ignore_eos=True))
    engine.step()
    assert aborted.runner_kv is not None
    engine.abort("gone")
    while engine.has_work():
        engine.step()
    assert aborted.finish_reason == "cancelled" and aborted.runner_kv is None
    assert engine.blocks.num_free == engine.blocks.num_blocks


def test_settings_for_the_pytorch_runner_are_refused(engine_dir):
    for settings in ({"kv_cache_dtype": "int8"}, {"dtype": "bfloat16"}):
        with pytest.raises(ValueError, match="float32 weights and cache"):
            Engine.from_folder(engine_dir, num_kv_blocks=64, **settings)


def test_seeded_sampling_matches_pytorch_runner(engine_dir):
    params = SamplingParams(max_tokens=12, temperature=0.8, top_p=0.9, seed=7, ignore_eos=True)
    prompts = _prompts(3, seed=5)
    a = Engine.from_folder(engine_dir, runner="pytorch", num_kv_blocks=128).generate(prompts, params)
    b = Engine.from_folder(engine_dir, num_kv_blocks=128).generate(prompts, params)
    assert _tokens(a) == _tokens(b)


def test_runner_without_its_file_is_refused(engine_dir, tmp_path, tiny_engine_without_graph):
    with pytest.raises(EngineFolderError, match="--backend onnx"):
        Engine.from_folder(tiny_engine_without_graph, runner="onnxruntime")
    copy = tmp_path / "engine"
    shutil.copytree(engine_dir, copy)
    (copy / "model.onnx").unlink()
    with pytest.raises(EngineFolderError, match="model.onnx: missing"):
        Engine.from_folder(copy)
    meta = json.loads((engine_dir / "engine.json").read_text())
    assert meta["graph"]["onnx"] == "model.onnx"


@pytest.fixture(scope="module")
def tiny_engine_without_graph(tmp_path_factory, smollm2_source):
    from tests.conftest import build_entry, save_tiny_model

    tmp = tmp_path_factory.mktemp("tiny-plain")
    folder = save_tiny_model(tmp / "src", "llama", smollm2_source[1], seed=11)
    return build_entry(tmp / "repo", str(folder), "tiny") / "1" / "engine"
