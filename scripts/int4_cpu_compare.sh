#!/usr/bin/env bash
# SmolLM2's 4-bit builds on this CPU against bfloat16 and the CPU peers, one run:
# - FastServe bfloat16 (PyTorch runner), the reference for perplexity and teacher-forced agreement;
# - FastServe int4 through the ONNX Runtime runner: --quantize int4 --group-size 32 --no-awq (the
#   GGUF's Q4_1 blocks re-encoded without loss, the LM head rounded to int4) and --quantize gguf (the
#   LM head left dense), both --backend onnx; and int4 group 32 with AWQ's scales, --backend onnx;
# - FastServe's PyTorch int4 runner on the GGUF's blocks;
# - vLLM's CPU build (bfloat16) and ONNX Runtime GenAI's int4 build, where their Pythons are given.
# `fastserve evaluate`'s workloads (one stream 64 -> 128, best of 3; 32 x 64 -> 64, median of 3; EOS
# ignored) through Engine.generate, and one stream through tritonserver (`fastserve bench --triton`).
#
#   VLLM_PYTHON=/tmp/vllm-cpu/bin/python GENAI_PYTHON=VENV/bin/python \
#     bash scripts/int4_cpu_compare.sh WORK_DIR RESULTS_JSON
#
# $STAGE=build stops after the builds, $STAGE=measure starts from them, $STAGE=serve also skips the
# quality and engine figures (for a rerun of the server and the peers).
set -euo pipefail
work=$(realpath -m "${1:?work folder}")
out=${2:?results json}
py=${PYTHON:-python}
repo=$work/repo
stage=${STAGE:-all}
peers=$(dirname "$0")/../../shared/tools/peers
mkdir -p "$repo"
if [[ $stage == all || $stage == build ]]; then
  $py builders/build.py --model smollm2 --name bf16 --repository "$repo" --dtype bfloat16
  $py builders/build.py --model smollm2 --name gguf --repository "$repo" --dtype bfloat16 --quantize gguf
  $py builders/build.py --model smollm2 --name onnx_int4 --repository "$repo" --dtype float32 --backend onnx \
    --quantize int4 --group-size 32 --no-awq
  $py builders/build.py --model smollm2 --name onnx_int4_awq --repository "$repo" --dtype float32 --backend onnx \
    --quantize int4 --group-size 32 --calibration-tokens 1024
  $py builders/build.py --model smollm2 --name onnx_gguf --repository "$repo" --dtype float32 --backend onnx \
    --quantize gguf
  if [[ -n ${GENAI_PYTHON:-} && ! -f $work/genai-int4/genai_config.json ]]; then
    og_models=$($GENAI_PYTHON -c "import onnxruntime_genai, os; print(os.path.join(os.path.dirname(onnxruntime_genai.__file__), 'models'))")
    (cd "$work" && PYTHONPATH=$og_models HF_HUB_OFFLINE=1 $GENAI_PYTHON -m onnxruntime_genai.models.builder \
      -i "$repo/bf16/1/engine" -o "$work/genai-int4" -p int4 -e cpu -c "$work/genai-cache")
  fi
fi
[[ $stage == build ]] && exit 0
[[ $stage == serve ]] || $py -m fastserve.cli evaluate "$repo/onnx_int4" "$repo/onnx_int4_awq" "$repo/onnx_gguf" "$repo/gguf" --against "$repo/bf16" \
  --eval-tokens 4096 --agreement-prompts 16 --no-speed --out "$work/quality.json"
if [[ $stage != serve ]]; then
  for name in bf16 gguf onnx_int4 onnx_int4_awq onnx_gguf; do
    $py -m fastserve.cli evaluate "$repo/$name" --eval-tokens 256 --out "$work/speed-$name.json"
  done
fi
# one stream through tritonserver: requests one after another, in turns with the engine offline
for name in bf16 onnx_int4 onnx_int4_awq; do
  $py -m fastserve.cli bench --offline --triton --repository "$repo" --model "$name" --concurrency 1 \
    --num-prompts 2 --input-len 64 --output-len 128 --repeats 3 --baselines "" --out "$work/triton-$name.json"
done
if [[ -n ${VLLM_PYTHON:-} ]]; then
  VLLM_CPU_OMP_THREADS_BIND=0-1 $VLLM_PYTHON "$peers/vllm_cpu_bench.py" "$repo/bf16/1/engine" "$work/vllm.json" 32 64 64
fi
if [[ -n ${GENAI_PYTHON:-} ]]; then
  $GENAI_PYTHON scripts/peer_ort_genai.py "$work/genai-int4" "$work/genai-int4.json"
fi
$py - "$work" "$out" <<'PY'
import json, sys
from pathlib import Path
work, out = Path(sys.argv[1]), Path(sys.argv[2])
keys = ("runner", "quantization", "dtype", "perplexity", "perplexity_ratio", "agreement", "weights_bytes_on_disk")
quality = {Path(r["engine"]).parts[-3]: {k: r.get(k) for k in keys} for r in json.loads((work / "quality.json").read_text())}
rows = {}
for name in ("bf16", "gguf", "onnx_int4", "onnx_int4_awq", "onnx_gguf"):
    r = json.loads((work / f"speed-{name}.json").read_text())[0]
    rows[name] = {**quality.get(name, {}), "runner": r["runner"], "single_stream_tok_s": r["single_stream_tok_s"],
                  "batch_tok_s": r["batch_tok_s"]}
for name in ("bf16", "onnx_int4", "onnx_int4_awq"):
    rows[name]["triton"] = json.loads((work / f"triton-{name}.json").read_text())
for peer in ("vllm", "genai-int4"):
    if (work / f"{peer}.json").is_file():
        rows[peer] = json.loads((work / f"{peer}.json").read_text())
cpu = next((ln.split(":", 1)[1].strip() for ln in open("/proc/cpuinfo") if ln.startswith("model name")), "")
out.write_text(json.dumps({"cpu": cpu, "rows": rows}, indent=1))
print(json.dumps(rows, indent=1))
PY
