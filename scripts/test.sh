#!/usr/bin/env bash
# The test command: installs what is needed (scripts/setup.sh), then runs the whole suite against a
# real tritonserver. Extra arguments go to pytest.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"
bash scripts/setup.sh
py=${VIRTUAL_ENV:-$root/.venv}/bin/python
exec "$py" -m pytest -ra "$@"
