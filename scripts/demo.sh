#!/usr/bin/env bash
# The demo: install, then serve the repository in the foreground (Ctrl-C stops it).
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"
bash scripts/setup.sh
py=${VIRTUAL_ENV:-$root/.venv}/bin/python
exec "$py" -m fastserve.cli serve --repository tests/repos/good "$@"
