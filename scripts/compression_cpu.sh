#!/usr/bin/env bash
# SmolLM2 compressed three ways beside the original, in one run on this machine: 2:4 pruning and 25%
# structured pruning, each with a distilled recovery, and a student with half the layers distilled
# from it. Each is built, evaluated (perplexity against the original, teacher-forced agreement, size,
# decode speed) and served by the real Triton server.
#
#   bash scripts/compression_cpu.sh WORK_DIR RESULTS_JSON
#
# $RECOVER_STEPS (default 40) and $DISTILL_STEPS (default 300) bound the training. $STAGE=train stops
# after the builds, $STAGE=measure starts from them (the measurements want the machine to themselves).
set -euo pipefail
work=${1:?work folder}
out=${2:?results json}
recover=${RECOVER_STEPS:-40}
distill=${DISTILL_STEPS:-300}
py=${PYTHON:-python}
repo=$work/repo
stage=${STAGE:-all}
mkdir -p "$repo"
if [[ $stage != measure ]]; then
build() { $py builders/build.py --model "$1" --name "$2" --repository "$repo" --dtype bfloat16 --no-evaluate "${@:3}"; }
build smollm2 original
build smollm2 two_four --prune 2:4 --recover-steps "$recover" --recover-distill --calibration-tokens 16384
build smollm2 structured --prune structured --sparsity 0.25 --recover-steps "$recover" --recover-distill \
  --calibration-tokens 16384
$py -c "from builders.text import corpus; import sys; open(sys.argv[1], 'w').write(corpus('calibration').text)" \
  "$work/train.txt"
$py -m fastserve.cli distill --teacher smollm2 --text "$work/train.txt" --out "$work/student-hf" --steps "$distill"
build "$work/student-hf" student
fi
[[ $stage == train ]] && exit 0
$py -m fastserve.cli evaluate "$repo/original" "$repo/two_four" "$repo/structured" "$repo/student" \
  --against "$repo/original" --eval-tokens 4096 --out "$work/evaluate.json"
$py scripts/compression_served.py "$repo" original two_four structured student --out "$work/served.json"
$py - "$work" "$out" <<'PY'
import json, platform, sys
from pathlib import Path
work, out = Path(sys.argv[1]), Path(sys.argv[2])
cpu = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")), "")
result = {"cpu": cpu, "machine": platform.machine(), "evaluate": json.loads((work / "evaluate.json").read_text()),
          "served": json.loads((work / "served.json").read_text())}
for name in ("two_four", "structured"):
    meta = json.loads((work / "repo" / name / "1" / "engine" / "engine.json").read_text())
    result.setdefault("pruning", {})[name] = meta.get("pruning")
out.write_text(json.dumps(result, indent=1, ensure_ascii=False))
print(f"wrote {out}")
PY
