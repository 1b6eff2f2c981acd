#!/usr/bin/env bash
# SmolLM2 on this CPU, one run: FastServe's PyTorch runner and its ONNX Runtime runner (the same
# float32 entry, built with --backend onnx), FastServe's fastest build (the GGUF's 4-bit blocks), and
# ONNX Runtime GenAI's own builds of the model in float32 and int4, each on `fastserve evaluate`'s
# workloads: one stream 64 -> 128 tokens (best of 3) and 32 x 64 -> 64 (median of 3), EOS ignored.
#
#   GENAI_PYTHON=/path/to/venv/bin/python bash scripts/onnx_cpu_compare.sh WORK_DIR RESULTS_JSON
#
# GENAI_PYTHON: a Python with onnxruntime-genai (and torch and transformers for its model builder).
# $STAGE=build stops after the builds, $STAGE=measure starts from them (measurements want the machine
# to themselves).
set -euo pipefail
work=$(realpath -m "${1:?work folder}")
out=${2:?results json}
py=${PYTHON:-python}
genai=${GENAI_PYTHON:?a python with onnxruntime-genai}
repo=$work/repo
stage=${STAGE:-all}
mkdir -p "$repo"
if [[ $stage != measure ]]; then
$py builders/build.py --model smollm2 --name onnx --repository "$repo" --dtype float32 --backend onnx
$py builders/build.py --model smollm2 --name gguf --repository "$repo" --dtype bfloat16 --quantize gguf
# the float32 engine folder is a Hugging Face folder too (config, safetensors, tokenizer)
hf=$repo/onnx/1/engine
# the model builder imports its own top-level `builders` package, which ours (the working directory,
# first on the path) would shadow: it runs from the work folder
og_models=$($genai -c "import onnxruntime_genai, os; print(os.path.join(os.path.dirname(onnxruntime_genai.__file__), 'models'))")
for precision in fp32 int4; do
  [[ -f $work/genai-$precision/genai_config.json ]] || (cd "$work" && PYTHONPATH=$og_models HF_HUB_OFFLINE=1 \
    $genai -m onnxruntime_genai.models.builder -i "$hf" -o "$work/genai-$precision" -p $precision -e cpu \
    -c "$work/genai-cache")
done
fi
[[ $stage == build ]] && exit 0
$py -m fastserve.cli evaluate "$repo/onnx" --runner pytorch --eval-tokens 512 --out "$work/pytorch.json"
$py -m fastserve.cli evaluate "$repo/onnx" --runner onnxruntime --eval-tokens 512 --out "$work/onnxruntime.json"
$py -m fastserve.cli evaluate "$repo/gguf" --eval-tokens 512 --out "$work/gguf.json"
for precision in fp32 int4; do
  $genai scripts/peer_ort_genai.py "$work/genai-$precision" "$work/genai-$precision.json"
done
$py - "$work" "$out" <<'PY'
import json, sys
from pathlib import Path
work, out = Path(sys.argv[1]), Path(sys.argv[2])
rows = {}
for name in ("pytorch", "onnxruntime", "gguf"):
    r = json.loads((work / f"{name}.json").read_text())[0]
    rows[f"fastserve-{name}"] = {k: r[k] for k in ("runner", "quantization", "dtype", "perplexity",
                                                   "single_stream_tok_s", "batch_tok_s", "weights_bytes_in_memory")}
for precision in ("fp32", "int4"):
    rows[f"ort-genai-{precision}"] = json.loads((work / f"genai-{precision}.json").read_text())
cpu = next((ln.split(":", 1)[1].strip() for ln in open("/proc/cpuinfo") if ln.startswith("model name")), "")
out.write_text(json.dumps({"cpu": cpu, "rows": rows}, indent=1))
print(json.dumps(rows, indent=1))
PY
