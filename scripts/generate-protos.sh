#!/usr/bin/env bash
# Generate the Python messages, gRPC stubs and .pyi type stubs from protos/ into
# generated/ (or into the directory given as the first argument, which the
# drift test uses). Run it after every change to protos/ and commit the result.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
OUT="${1:-$ROOT/generated}"
PYTHON="${PYTHON:-$ROOT/.venv/bin/python}"

rm -rf "$OUT/stella"
mkdir -p "$OUT"
cd "$ROOT/protos"
"$PYTHON" -m grpc_tools.protoc -I . \
    --python_out="$OUT" --grpc_python_out="$OUT" --pyi_out="$OUT" \
    stella/agent/v1/*.proto

# Regular packages, so that setuptools finds and installs them.
for dir in stella stella/agent stella/agent/v1; do
    echo '"""Generated from protos/ by scripts/generate-protos.sh; do not edit."""' \
        >"$OUT/$dir/__init__.py"
done
