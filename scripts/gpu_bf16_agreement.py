"""How far SmolLM2's bfloat16 greedy output moves under changes that are not bugs (GPU).

The reference is the one test_gpu_exact.py uses: transformers, one prompt at a time, SDPA attention.
Against it: our engine (all 32 test prompts in one batch, and one prompt at a time), transformers
with eager attention, transformers with the prompts left-padded into one batch, and float32. Agreement
is the share of the first 64 tokens equal position by position, as in the test.

Free-running agreement says little after the first near-tie: one flipped token changes every later
position. So each is also scored teacher-forced: at each of the reference's positions, given the
reference's own prefix, does it pick the reference's next token? For the engine that is one request
per position (prompt + reference prefix, one greedy token, served from the prefix cache); for
transformers one forward pass over prompt + reference.

    python3 scripts/gpu_bf16_agreement.py --out agreement.json
    python3 scripts/gpu_bf16_agreement.py --device cpu --prompts 4 --out /tmp/agreement.json  # a quick check
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from builders.sources import smollm2_path  # noqa: E402
from python_backend.engine.engine import Engine, EngineConfig  # noqa: E402
from python_backend.engine.sequence import SamplingParams  # noqa: E402
from tests.conftest import ROOT, build_entry, prompt_ids  # noqa: E402

N = 64


def agreement(got: list[list[int]], ref: list[list[int]]) -> dict:
    per = [sum(a == b for a, b in zip(g, r)) / max(len(g), len(r)) for g, r in zip(got, ref)]
    return {"mean_agreement": sum(per) / len(per), "identical": sum(g == r for g, r in zip(got, ref))}


def forced_agreement(picks: list[list[int]], ref: list[list[int]]) -> dict:
    """picks[i][k]: the token chosen after prompt i + ref[i][:k]."""
    hits = sum(a == b for g, r in zip(picks, ref) for a, b in zip(g, r))
    positions = sum(len(r) for r in ref)
    return {"forced_agreement": hits / positions, "positions": positions, "flips": positions - hits}


def engine_forced(engine, prompts: list[list[int]], ref: list[list[int]]) -> list[list[int]]:
    items = [p + r[:k] for p, r in zip(prompts, ref) for k in range(len(r))]
    got = iter(x.token_ids[0] for x in engine.generate(items, SamplingParams(max_tokens=1, temperature=0.0)))
    return [[next(got) for _ in r] for r in ref]


def hf_forced(model, prompts: list[list[int]], ref: list[list[int]], device: str) -> list[list[int]]:
    with torch.inference_mode():
        out = []
        for p, r in zip(prompts, ref):
            logits = model(torch.tensor([p + r], device=device)).logits[0, len(p) - 1 : len(p) - 1 + len(r)]
            out.append(logits.argmax(-1).tolist())
    return out


def hf_greedy(
    model, prompts: list[list[int]], eos: list[int], batched: bool = False, device: str = "cuda"
) -> list[list[int]]:
    pad = eos[0]
    with torch.inference_mode():
        if not batched:
            return [
                model.generate(
                    torch.tensor([p], device=device),
                    max_new_tokens=N,
                    do_sample=False,
                    eos_token_id=eos,
                    pad_token_id=pad,
                )[0, len(p) :].tolist()
                for p in prompts
            ]
        width = max(map(len, prompts))
        ids = torch.tensor([[pad] * (width - len(p)) + p for p in prompts], device=device)
        mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts], device=device)
        out = model.generate(
            ids, attention_mask=mask, max_new_tokens=N, do_sample=False, eos_token_id=eos, pad_token_id=pad
        )[:, width:].tolist()
    return [[t for t in row[: next((i + 1 for i, t in enumerate(row) if t in eos), len(row))]] for row in out]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    ap.add_argument("--prompts", type=int, default=0, help="only the first N shared prompts (0: all)")
    args = ap.parse_args()
    if args.prompts < 0:
        ap.error("--prompts: a count of prompts, 0 for all")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    dev = args.device
    path = smollm2_path()
    tok = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    shared = [json.loads(x) for x in (ROOT / "tests" / "data" / "prompts.jsonl").read_text().splitlines() if x.strip()]
    prompts = [prompt_ids(tok, p) for p in shared][: args.prompts or None]
    params = SamplingParams(max_tokens=N, temperature=0.0)
    outputs: dict[str, list[list[int]]] = {}

    def load(dtype: torch.dtype, attn: str = "sdpa"):
        return (
            AutoModelForCausalLM.from_pretrained(
                path.parent, gguf_file=path.name, dtype=dtype, attn_implementation=attn
            )
            .to(dev)
            .eval()
        )

    # the reference first: the engine's teacher-forced requests need it; the engine's EOS set is the stop
    # set everywhere (as in test_gpu_exact.py)
    sdpa = load(torch.bfloat16)
    with tempfile.TemporaryDirectory() as tmp:
        entry = build_entry(
            Path(tmp) / "repo",
            "smollm2",
            "smollm2",
            "--device",
            "gpu" if dev == "cuda" else "cpu",
            "--dtype",
            "bfloat16",
        )
        engine = Engine(entry / "1" / "engine", EngineConfig(device=dev, num_kv_blocks=1024, max_queue_size=8192))
        eos = list(engine.eos_ids)
        outputs["hf_sdpa_batch1"] = ref = hf_greedy(sdpa, prompts, eos, device=dev)
        outputs["engine_batch32"] = [r.token_ids for r in engine.generate(prompts, params)]
        outputs["engine_one_at_a_time"] = [engine.generate([p], params)[0].token_ids for p in prompts]
        forced = {"engine": engine_forced(engine, prompts, ref)}
        engine.shutdown()
        del engine
        if dev == "cuda":
            torch.cuda.empty_cache()
    outputs["hf_sdpa_batch32_left_padded"] = hf_greedy(sdpa, prompts, eos, batched=True, device=dev)
    forced["hf_sdpa_one_forward"] = hf_forced(sdpa, prompts, ref, dev)
    del sdpa
    eager = load(torch.bfloat16, "eager")
    outputs["hf_eager_batch1"] = hf_greedy(eager, prompts, eos, device=dev)
    forced["hf_eager"] = hf_forced(eager, prompts, ref, dev)
    del eager
    fp32 = load(torch.float32)
    outputs["hf_float32_batch1"] = hf_greedy(fp32, prompts, eos, device=dev)
    forced["hf_float32"] = hf_forced(fp32, prompts, ref, dev)
    result = {
        "gpu": torch.cuda.get_device_name(0) if dev == "cuda" else "cpu",
        "torch": torch.__version__,
        "prompts": len(prompts),
        "tokens": N,
        "reference": "hf_sdpa_batch1 (bfloat16)",
        "against_reference": {k: agreement(v, ref) for k, v in outputs.items() if k != "hf_sdpa_batch1"},
        "engine_batch32_against_hf_eager": agreement(outputs["engine_batch32"], outputs["hf_eager_batch1"]),
        "teacher_forced_against_reference": {k: forced_agreement(v, ref) for k, v in forced.items()},
    }
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
