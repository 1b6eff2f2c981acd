#!/usr/bin/env bash
# The demo, one command on a fresh machine: install, build SmolLM2 into model_repository/, start a
# real Triton server, and stream the answer to a chat question through gRPC. The server is stopped
# at the end; with --keep it stays in the foreground until Ctrl-C, for your own clients.
#   bash scripts/demo.sh ["your question"] [--keep]
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"
question="What is the capital of France, and what is it famous for?"
keep=0
for a in "$@"; do
  case $a in
    --keep) keep=1 ;;
    *) question=$a ;;
  esac
done
bash scripts/setup.sh
py=${VIRTUAL_ENV:-$root/.venv}/bin/python
"$py" builders/build.py --model smollm2 --name smollm2 --repository model_repository
"$py" -m fastserve.cli serve --repository model_repository > .demo-server.log 2>&1 &
server=$!
trap 'kill -INT $server 2>/dev/null; wait $server 2>/dev/null || true' EXIT
echo "starting tritonserver (log: .demo-server.log) ..."
for _ in $(seq 1 600); do
  if curl -sf localhost:8000/v2/health/ready >/dev/null 2>&1; then break; fi
  if ! kill -0 $server 2>/dev/null; then cat .demo-server.log >&2; exit 1; fi
  sleep 0.5
done
echo "Q: $question"
printf "A: "
"$py" -m fastserve.cli generate --stream --chat --max-tokens 200 --temperature 0 "$question"
if [[ $keep == 1 ]]; then
  echo "server running: HTTP localhost:8000, gRPC localhost:8001, metrics localhost:8002/metrics (Ctrl-C stops it)"
  wait $server
fi
