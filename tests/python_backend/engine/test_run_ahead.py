"""Decode steps launched ahead (Engine._launch_ahead): the next step starts from this step's tokens
still on the device. On the GPU that is the default; here it is turned on to check the bookkeeping
on the CPU: the same tokens as without it, ends by EOS, length, stop strings and cancellation in the
middle of a run ahead, and every KV block given back."""

from __future__ import annotations

import random

import pytest

from python_backend.engine.engine import Engine, EngineConfig, Result
from python_backend.engine.sequence import SamplingParams
from tests.conftest import build_entry, prompt_ids, run_staggered, save_tiny_model


@pytest.fixture(scope="module")
def engines(smollm2_engine_dir):
    return {mode: Engine(smollm2_engine_dir, EngineConfig(num_kv_blocks=512, run_ahead=mode)) for mode in ("off", "on")}


def test_run_ahead_is_off_on_the_cpu_unless_asked(engines, smollm2_engine_dir):
    assert engines["on"].run_ahead and not engines["off"].run_ahead
    with pytest.raises(ValueError, match="run_ahead"):
        Engine(smollm2_engine_dir, EngineConfig(num_kv_blocks=64, run_ahead="sometimes"))


def test_same_greedy_tokens_with_steps_run_ahead(engines, prompt_set, smollm2_source):
    tok = smollm2_source[1]
    prompts = [prompt_ids(tok, p) for p in prompt_set[:6]]
    rng = random.Random(1)
    params = [SamplingParams(max_tokens=rng.randint(4, 40), temperature=0.0) for _ in prompts]
    out = {}
    for mode, engine in engines.items():
        before = engine.stats.steps_ahead
        out[mode] = [(r.token_ids, r.finish_reason) for r in engine.generate(prompts, params)]
        out[mode + "_staggered"] = [
            (r.token_ids, r.finish_reason)
            for r in run_staggered(engine, prompts, SamplingParams(max_tokens=24, temperature=0.0), every=3)
        ]
        assert engine.blocks.num_used == 0
        out[mode + "_ahead"] = engine.stats.steps_ahead - before
    assert out["on"] == out["off"] and out["on_staggered"] == out["off_staggered"]
    assert {reason for _, reason in out["on"]} >= {"length"}
    assert out["on_ahead"] > 20 and out["off_ahead"] == 0  # most decode steps ran ahead


def test_eos_and_stop_strings_end_a_sequence_whose_next_step_already_ran(engines):
    engine = engines["on"]
    eos = SamplingParams(max_tokens=200, temperature=0.0)  # the chat model ends its answer with EOS
    stop = SamplingParams(max_tokens=60, temperature=0.0, stop=[" the"])
    prompt = engine.tokenizer.apply_chat_template(
        [{"role": "user", "content": "Say hi."}], tokenize=False, add_generation_prompt=True
    )
    got = {
        mode: [
            (r.text, r.token_ids, r.finish_reason) for r in e.generate([prompt, "Tell me about the sea."], [eos, stop])
        ]
        for mode, e in engines.items()
    }
    assert got["on"] == got["off"]
    assert [reason for _, _, reason in got["on"]] == ["stop", "stop"]
    assert " the" not in got["on"][1][0]
    assert engine.blocks.num_used == 0


def test_cancelling_during_steps_run_ahead_leaks_nothing(smollm2_source, tmp_path):
    folder = save_tiny_model(tmp_path / "src", "llama", smollm2_source[1], seed=5)
    engine_dir = build_entry(tmp_path / "repo", str(folder), "tiny") / "1" / "engine"
    engine = Engine(engine_dir, EngineConfig(num_kv_blocks=96, max_num_seqs=8, run_ahead="on"))
    rng = random.Random(0)
    results = [Result() for _ in range(120)]
    lengths = [rng.randint(1, 30) for _ in results]
    for i, r in enumerate(results):
        prompt = [rng.randrange(100, 1000) for _ in range(rng.randint(1, 30))]
        engine.add_request(
            f"q{i}", prompt, SamplingParams(max_tokens=lengths[i], temperature=0.0, ignore_eos=True), r.collect
        )
        for _ in range(rng.randint(0, 3)):
            engine.step()
        if i % 5 == 2:
            engine.abort(f"q{i - 1}")
    engine.run_until_done()
    assert all(r.done.is_set() for r in results)
    assert {r.finish_reason for r in results} == {"length", "cancelled"}
    for r, n in zip(results, lengths):
        if r.finish_reason == "length":
            assert len(r.token_ids) == n  # no token of a step run ahead past the end is sent
    assert engine.stats.steps_ahead > 0
    assert engine.blocks.num_used == 0 and all(c == 0 for c in engine.blocks.ref_counts)
