#!/usr/bin/env bash
# The main job end to end, showing the whole fallback chain: certificates,
# an upstream probe server, Central with that upstream behind it, a support
# package uploaded to Central, and Collectors that get their probes from
# each source in turn: built into the image, Central's uploaded package, the
# upstream (fetched by Central), and Central's cache of upstream probes.
# Leaves everything in $DEMO_DIR (a fresh temporary directory by default)
# and stops the servers on exit.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/common.sh

echo "== building"
build_bins
WORK=${DEMO_DIR:-$(mktemp -d)}
mkdir -p "$WORK"
trap 'kill $(jobs -p) 2>/dev/null; wait 2>/dev/null || true' EXIT

echo "== certificates (development CA, servers, a Collector) in $WORK/pki"
# A rerun in the same DEMO_DIR keeps the CA (pki init refuses to replace it).
[ -f "$WORK/pki/ca.pem" ] || "$BIN/central-probes" pki init --out "$WORK/pki"
kernel_list "$WORK/kernels.txt"
kernel() { sed -n "${1}p" "$WORK/kernels.txt"; }

echo "== the upstream probe server (anonymous reads), holding probes of kernels 1-40"
UPSTREAM_TOKEN=$("$BIN/central-probes" token create --data-dir "$WORK/upstream" --role admin --name demo 2>/dev/null)
start_central "$WORK/upstream" "$WORK/pki" --allow-anonymous-reads
UPSTREAM_ADDR=$CENTRAL_ADDR
"$BIN/make-package" --out "$WORK/upstream-pkg.zip" --kernels "$WORK/kernels.txt" --limit 40
ROX_API_TOKEN=$UPSTREAM_TOKEN "$BIN/central-probes" upload "$WORK/upstream-pkg.zip" -e "$UPSTREAM_ADDR" \
  --ca "$WORK/pki/ca.pem" 2>/dev/null

echo "== Central, with the upstream at $UPSTREAM_ADDR behind it"
export ROX_API_TOKEN
ROX_API_TOKEN=$("$BIN/central-probes" token create --data-dir "$WORK/data" --role admin --name demo-admin 2>/dev/null)
start_central "$WORK/data" "$WORK/pki" --upstream "https://$UPSTREAM_ADDR" --upstream-ca "$WORK/pki/ca.pem"
export ROX_CENTRAL_ADDRESS=$CENTRAL_ADDR
echo "Central listening on $CENTRAL_ADDR (log: $WORK/data.log)"

PACKAGE="$WORK/support-pkg-2.5.0-20261127000000.zip"
echo "== a support package for kernels 41-90 (eBPF probes and kernel modules), uploaded twice"
"$BIN/make-package" --out "$PACKAGE" --kernels "$WORK/kernels.txt" --skip 40 --limit 50 --kernel-modules
"$BIN/central-probes" collector support-packages upload "$PACKAGE" -e "$ROX_CENTRAL_ADDRESS" --ca "$WORK/pki/ca.pem"
"$BIN/central-probes" upload "$PACKAGE" -e "$ROX_CENTRAL_ADDRESS" --ca "$WORK/pki/ca.pem"

echo "== a Collector image with the probe of kernel 95 built in"
mkdir -p "$WORK/builtin"
head -c 100000 /dev/urandom | gzip >"$WORK/builtin/collector-ebpf-$(kernel 95).o.gz"

collector() {
  echo "== a Collector on kernel $1 ($2)"
  collector_get_probe "$1" "$CENTRAL_ADDR" "$WORK/probe-$3.o" --builtin-dir "$WORK/builtin"
}
collector "$(kernel 95)" "built into its image" builtin
collector "$(kernel 60)" "in the uploaded package" central
collector "$(kernel 7)" "only the upstream has it" upstream
collector "$(kernel 7)" "again: now in Central's cache" cache
echo "== a Collector on kernel 99, which no source has: it exits with status 1 (its pod would crash-loop)"
if RETRY_BUDGET=1s collector_get_probe "$(kernel 99)" "$CENTRAL_ADDR" "$WORK/probe-missing.o"; then
  echo "kernel 99 was served, though no source has it" >&2
  exit 1
fi
echo "== signed probes: a site key, the package signed (as on the clean side of an air gap) and checked"
"$BIN/central-probes" package keygen --public-key "$WORK/site.pub" --secret-key "$WORK/site.key"
"$BIN/central-probes" package sign "$PACKAGE" --secret-key "$WORK/site.key" --serial 1 --out "$WORK/signed.zip"
"$BIN/central-probes" package verify "$WORK/signed.zip" --trusted-keys "$WORK/site.pub"
"$BIN/central-probes" upload --overwrite "$WORK/signed.zip" -e "$ROX_CENTRAL_ADDRESS" --ca "$WORK/pki/ca.pem"
echo "== a Collector on kernel $(kernel 60) that loads only what the site key signed"
collector_get_probe "$(kernel 60)" "$CENTRAL_ADDR" "$WORK/probe-signed.o" --trusted-keys "$WORK/site.pub" \
  --state-dir "$WORK/collector-state"
echo "== the same Collector refuses a probe its keys did not sign (kernel 7, unsigned upstream): exit 1"
if RETRY_BUDGET=1s collector_get_probe "$(kernel 7)" "$CENTRAL_ADDR" "$WORK/probe-unsigned.o" \
  --trusted-keys "$WORK/site.pub" 2>"$WORK/refused.txt"; then
  echo "an unsigned probe was written in required mode" >&2
  exit 1
fi
grep "signature refused" "$WORK/refused.txt"

echo "== what an admin sees: the misses, a line per module version, and an export for another Central"
"$BIN/central-probes" misses -e "$ROX_CENTRAL_ADDRESS" --ca "$WORK/pki/ca.pem"
"$BIN/central-probes" ls --summary -e "$ROX_CENTRAL_ADDRESS" --ca "$WORK/pki/ca.pem"
"$BIN/central-probes" export --module-version 2.5.0 --out "$WORK/support-pkg-2.5.0-export.zip" \
  -e "$ROX_CENTRAL_ADDRESS" --ca "$WORK/pki/ca.pem"
echo "== demo finished; files in $WORK"
