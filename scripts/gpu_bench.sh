#!/usr/bin/env bash
# Issue 6 measurements on a GPU host with PyTorch but no network (the device tool's H100/H200):
# a random-initialised Llama-3.2-1B-shaped model, built by our builder, the engine offline against
# transformers generate (batch 64) and generate_batch, 256 requests of 256 -> 128 tokens, EOS ignored.
#   bash scripts/gpu_bench.sh TOKENIZER_DIR OUT_DIR
set -euo pipefail
tok=${1:?tokenizer folder}
out=${2:?output folder}
export PYTHONUNBUFFERED=1 PYTHONPATH=$(pwd)
work=/tmp/fs-gpu
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$out/gpu.txt"
python3 -c 'import torch, transformers; print("torch", torch.__version__, "transformers", transformers.__version__)'
python3 builders/random_model.py --preset llama-3.2-1b --tokenizer "$tok" --out $work/src
python3 builders/build.py --model $work/src --name llama1b --repository $work/repo --device gpu --dtype bfloat16 \
  --max-model-len 4096
python3 -m fastserve.cli bench --offline --device cuda --engine-dir $work/repo/llama1b/1/engine \
  --num-prompts 256 --input-len 256 --output-len 128 --hf-batch-size 64 --repeats 3 --single \
  --max-num-seqs 256 --max-num-batched-tokens 8192 --out "$out/llama1b-gpu-offline.json"
FASTSERVE_TEST_TOKENIZER=$tok python3 -m pytest -q -p no:cacheprovider tests/python_backend/engine/test_cuda_graphs.py 2>&1 | tail -15
