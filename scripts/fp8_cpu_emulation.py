"""SmolLM2's perplexity with FP8 weights and activations, emulated in float32 on a CPU: where the GPU
that serves FP8 is not at hand, how much each build choice costs. Each projection's weight is the
build's own E4M3 codes times their scales; its input is rounded per row as the engine's product
rounds it (builders/quantize.py `fake_quantize_inputs`). Ratios are against the same model with
bfloat16 weights, on the evaluation text.

    python scripts/fp8_cpu_emulation.py --dense-layers 0 1 2 --eval-tokens 4096 --out fp8.json
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

from builders import quantize  # noqa: E402
from builders.sources import resolve  # noqa: E402
from builders.text import token_ids  # noqa: E402
from python_backend.models.quantized import QuantizedWeight  # noqa: E402


@torch.no_grad()
def perplexity(model, ids: list[int], round_inputs: bool, window: int = 512) -> float:
    opts = quantize.QuantizeOptions("fp8")
    hooks = []
    if round_inputs:
        for name, m in model.named_modules():
            if isinstance(m, torch.nn.Linear) and name != "lm_head":
                hooks.append(m.register_forward_pre_hook(lambda _m, a: (quantize.fake_quantize_inputs(a[0], opts),)))
    nll, count = 0.0, 0
    for start in range(0, len(ids) - 1, window):
        chunk = ids[start : start + window]
        logits = model(input_ids=torch.tensor([chunk])).logits[0].float()
        nll += torch.nn.functional.cross_entropy(logits[:-1], torch.tensor(chunk[1:]), reduction="sum").item()
        count += len(chunk) - 1
    for h in hooks:
        h.remove()
    return math.exp(nll / count)


def fp8_model(model, tokenizer, dense_layers: int, calibration_tokens: int):
    """A copy of `model` holding the FP8 build's weights, dequantized (the LM head stays dense)."""
    opts = quantize.QuantizeOptions("fp8", lm_head=False, dense_layers=dense_layers)
    out, record = quantize.quantize_model(model, tokenizer, opts, torch.float32, calibration_tokens, lambda m: None)
    state = {}
    for name, t in out.items():
        if name.endswith(".qweight"):
            base = name[: -len(".qweight")]
            state[base + ".weight"] = QuantizedWeight("fp8", t, out[base + ".scale"]).dequantize()
        elif not name.endswith(".scale"):
            state[name] = t.float()
    copy_ = copy.deepcopy(model)
    copy_.load_state_dict(state, strict=False)
    return copy_, record


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--dense-layers", type=int, nargs="+", default=[0, 1])
    ap.add_argument("--eval-tokens", type=int, default=4096)
    ap.add_argument("--calibration-tokens", type=int, default=4096)
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    model, tokenizer = resolve("smollm2").load(torch.float32)
    model.eval()
    ids, text = token_ids(tokenizer, "evaluation", args.eval_tokens)
    reference = copy.deepcopy(model)
    with torch.no_grad():
        for p in reference.parameters():
            p.copy_(p.bfloat16().float())
    base = perplexity(reference, ids, round_inputs=False)
    rows = []
    for n in args.dense_layers:
        candidate, record = fp8_model(model, tokenizer, n, args.calibration_tokens)
        ppl = perplexity(candidate, ids, round_inputs=True)
        rows.append({"dense_layers": record.get("dense_layers", []), "perplexity": ppl, "ratio": ppl / base,
                     "layer_kl": record.get("layer_kl")})  # fmt: skip
        print(json.dumps({k: v for k, v in rows[-1].items() if k != "layer_kl"}), flush=True)
    result = {"model": "smollm2", "bf16_weights_perplexity": base, "evaluation": text, "rows": rows}
    Path(args.out).write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
