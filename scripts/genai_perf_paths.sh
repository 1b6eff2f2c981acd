#!/usr/bin/env bash
# The OpenAI API's chat and completions paths against Triton's kserve gRPC path, all measured by
# genai-perf (which drives NVIDIA's perf_analyzer), one server, one run. Each round rotates which
# path goes first, and every run has its own random seed so that no run finds another's prompts in
# the prefix cache. The chat path's prompts are wrapped in the model's chat template, so its
# engine sees more prompt tokens than the other two paths' raw text.
#
#   GENAI_PERF=/path/to/venv/bin/genai-perf bash scripts/genai_perf_paths.sh MODEL TOKENIZER_DIR OUT_DIR
#
# The runs and their summary (OUT_DIR/summary.json) land in OUT_DIR.
#
# Needs a running `fastserve serve` (gRPC on 8001, OpenAI API on 9000 unless GRPC_URL / OPENAI_URL
# say otherwise). genai-perf lives in a virtual environment of its own; docs/benchmarks.md says how
# to install it and its perf_analyzer.
set -euo pipefail
model=$1 tokenizer=$2 out=$3
genai=${GENAI_PERF:-genai-perf}
grpc=${GRPC_URL:-localhost:8001}
openai=${OPENAI_URL:-localhost:9000}
concurrency=${CONCURRENCY:-32}
rounds=${ROUNDS:-2}
tokens_in=${INPUT_LEN:-64}
tokens_out=${OUTPUT_LEN:-64}
interval_ms=${INTERVAL_MS:-30000}
mkdir -p "$out"

run() {  # path (grpc, chat or completions) seed
    local path=$1 seed=$2 args
    args=(-m "$model" --tokenizer "$tokenizer" --streaming --concurrency "$concurrency"
        --synthetic-input-tokens-mean "$tokens_in" --synthetic-input-tokens-stddev 0
        --output-tokens-mean "$tokens_out" --random-seed "$seed" --num-dataset-entries 512
        --measurement-interval "$interval_ms" --artifact-dir "$out/$path-seed$seed")
    if [ "$path" = grpc ]; then
        args+=(--endpoint-type kserve --backend vllm -u "$grpc" --output-tokens-mean-deterministic)
    else
        args+=(--endpoint-type "$path" -u "$openai" --extra-inputs "min_tokens:$tokens_out")
    fi
    "$genai" profile "${args[@]}" >"$out/$path-seed$seed.log" 2>&1
}

seed=1
paths=(grpc chat completions)
for ((round = 0; round < rounds; round++)); do
    order=("${paths[@]:round % 3}" "${paths[@]:0:round % 3}")
    for path in "${order[@]}"; do
        run "$path" "$seed"
        seed=$((seed + 1))
    done
done

python3 "$(dirname "$0")/genai_perf_summary.py" "$out" "$out/summary.json"
