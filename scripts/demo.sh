#!/usr/bin/env bash
# The main job end to end: make certificates, start Central, upload a kernel
# support package, and have a Collector fetch the probe for its kernel over
# mutual TLS. Leaves everything in $DEMO_DIR (a fresh temporary directory by
# default) and stops Central on exit.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/common.sh

echo "== building"
cargo build --quiet --bins
WORK=${DEMO_DIR:-$(mktemp -d)}
mkdir -p "$WORK"
trap '[ -n "${CENTRAL_PID:-}" ] && kill "$CENTRAL_PID" 2>/dev/null; wait 2>/dev/null || true' EXIT

echo "== certificates (development CA, Central, a Collector) in $WORK/pki"
"$BIN/central-probes" pki init --out "$WORK/pki"

echo "== an admin API token"
export ROX_API_TOKEN
ROX_API_TOKEN=$("$BIN/central-probes" token create --data-dir "$WORK/data" --role admin --name demo-admin)

echo "== Central"
start_central "$WORK/data" "$WORK/pki"
export ROX_CENTRAL_ADDRESS=$CENTRAL_ADDR
echo "listening on $CENTRAL_ADDR (log: $WORK/data.log)"

echo "== a support package for module version 2.5.0 (50 kernels, eBPF probes and kernel modules)"
kernel_list "$WORK/kernels.txt"
"$BIN/make-package" --out "$WORK/support-pkg-2.5.0-20261127000000.zip" --kernels "$WORK/kernels.txt" \
  --limit 50 --kernel-modules

echo "== upload (documented spelling), then again: only new files are sent"
"$BIN/central-probes" collector support-packages upload "$WORK/support-pkg-2.5.0-20261127000000.zip" \
  -e "$ROX_CENTRAL_ADDRESS" --ca "$WORK/pki/ca.pem"
"$BIN/central-probes" upload "$WORK/support-pkg-2.5.0-20261127000000.zip" -e "$ROX_CENTRAL_ADDRESS" --ca "$WORK/pki/ca.pem"

KERNEL=$(sed -n 7p "$WORK/kernels.txt")
echo "== a Collector on kernel $KERNEL fetches its probe"
"$BIN/collector-client" get-probe --module-version 2.5.0 --kernel "$KERNEL" --central "$CENTRAL_ADDR" \
  --ca "$WORK/pki/ca.pem" --cert "$WORK/pki/collector.pem" --key "$WORK/pki/collector-key.pem" \
  --out "$WORK/probe.o.gz"
echo "== demo finished"
