#!/usr/bin/env bash
# Same-process A/B on a GPU host: the engine with and without CUDA-graph decode, twice each (OUT must be set).
set -e; export PYTHONUNBUFFERED=1 PYTHONPATH=$(pwd)
ls /tmp/fs-gpu/repo/llama1b/1/engine >/dev/null 2>&1 || { python3 builders/random_model.py --tokenizer ${TOKENIZER:-.gpu/tokenizer} --out /tmp/fs-gpu/src >/dev/null && python3 builders/build.py --model /tmp/fs-gpu/src --name llama1b --repository /tmp/fs-gpu/repo --device gpu --dtype bfloat16 --max-model-len 4096 >/dev/null; }
for g in --cuda-graphs --no-cuda-graphs --cuda-graphs --no-cuda-graphs; do
python3 -m fastserve.cli bench --offline --device cuda --engine-dir /tmp/fs-gpu/repo/llama1b/1/engine --num-prompts 256 --input-len 256 --output-len 128 --repeats 3 --single --baselines "" --max-num-seqs 256 --max-num-batched-tokens 8192 $g --out $OUT/ab${g}.json 2>&1 | grep -E "^fastserve|single" | sed "s/^/$g /"
done
