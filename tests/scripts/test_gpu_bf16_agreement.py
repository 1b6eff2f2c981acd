"""scripts/gpu_bf16_agreement.py's teacher-forced measure, run on the CPU in float32 (where the engine is
token-exact against transformers): forced along a greedy output, the engine and transformers pick that
output again at every position; an off-by-one in the prefixes or the logits' positions would not."""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "scripts"))

import gpu_bf16_agreement as agreement  # noqa: E402

from python_backend.engine.engine import Engine, EngineConfig  # noqa: E402
from python_backend.engine.sequence import SamplingParams  # noqa: E402
from tests.conftest import prompt_ids  # noqa: E402


def test_teacher_forced_picks_reproduce_the_greedy_output(smollm2_engine_dir, smollm2_source, prompt_set):
    model, tok = smollm2_source
    prompts = [prompt_ids(tok, p) for p in prompt_set[:3]]
    engine = Engine(smollm2_engine_dir, EngineConfig(device="cpu"))
    try:
        own = [r.token_ids for r in engine.generate(prompts, SamplingParams(max_tokens=12, temperature=0.0))]
        forced = agreement.engine_forced(engine, prompts, own)
    finally:
        engine.shutdown()
    positions = sum(map(len, own))  # up to 12 each: a greedy answer may end at EOS sooner
    assert agreement.forced_agreement(forced, own) == {"forced_agreement": 1.0, "positions": positions, "flips": 0}
    hf = agreement.hf_forced(model, prompts, own, "cpu")
    assert hf == own
    shifted = [r[1:] + r[:1] for r in own]  # the same tokens, each scored one position off
    assert agreement.forced_agreement(forced, shifted)["forced_agreement"] < 0.5
