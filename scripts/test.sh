#!/usr/bin/env bash
# Set up whatever is missing (scripts/dev-env.sh), lint the protos, and run the
# whole test suite against the real Docker Engine, registry and Compose.
# Extra arguments go to pytest, for example: scripts/test.sh -k deploy -x
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
bash scripts/dev-env.sh
export PATH="$ROOT/.venv/bin:$ROOT/.tools/node_modules/.bin:$PATH"

echo "[test] buf lint"
buf lint

echo "[test] ruff check"
ruff check stella_agent tests scripts bench

echo "[test] pytest"
python -m pytest "$@"
