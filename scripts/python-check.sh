#!/usr/bin/env bash
# Proves the API is usable from another language as it stands: generates
# Python stubs from proto/ with grpcio-tools and runs a short client against
# a running Central (GetExistingProbes with a token, GetProbe over mTLS).
# Needs PYTHON pointing at an interpreter with grpcio and grpcio-tools.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/common.sh
PYTHON=${PYTHON:-.venv/bin/python}

WORK=$(mktemp -d)
trap 'kill $(jobs -p) 2>/dev/null; wait 2>/dev/null || true; rm -rf "$WORK"' EXIT

mkdir -p "$WORK/stubs"
"$PYTHON" -m grpc_tools.protoc -Iproto --python_out="$WORK/stubs" --grpc_python_out="$WORK/stubs" \
  proto/kprobes/v1/*.proto

"$BIN/central-probes" pki init --out "$WORK/pki" >/dev/null
TOKEN=$("$BIN/central-probes" token create --data-dir "$WORK/data" --role view --name python 2>/dev/null)
ADMIN=$("$BIN/central-probes" token create --data-dir "$WORK/data" --role admin --name admin 2>/dev/null)
start_central "$WORK/data" "$WORK/pki"
kernel_list "$WORK/kernels.txt"
"$BIN/make-package" --out "$WORK/pkg.zip" --kernels "$WORK/kernels.txt" --limit 5 >/dev/null
ROX_API_TOKEN=$ADMIN "$BIN/central-probes" upload "$WORK/pkg.zip" -e "$CENTRAL_ADDR" --ca "$WORK/pki/ca.pem" >/dev/null 2>&1

PYTHONPATH="$WORK/stubs" "$PYTHON" tests/python/check_api.py --address "$CENTRAL_ADDR" --pki "$WORK/pki" \
  --token "$TOKEN" --module-version 2.5.0 --kernel "$(head -n 1 "$WORK/kernels.txt")"
