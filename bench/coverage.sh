#!/usr/bin/env bash
# Coverage before a kernel rollout (issue 37): `central-probes coverage -o
# json` of the 8,128 kernels of tests/data/kernel-versions.txt, timed from
# the command's start to its exit (reading the node file, TLS, one
# CheckCoverage call, the JSON report), against
#   a. a Central holding the 16,256-probe package, an upstream Central
#      behind it (holding the same package);
#   b. a Central holding nothing, the same upstream behind it: every kernel
#      is asked of the upstream (GetExistingProbes, in batches).
# The upstream requests are the report's `upstream_requests`, beside the
# upstream's own counts (its metrics) of GetExistingProbes and GetProbe
# calls during the runs: the latter stays 0, nothing is downloaded. Prints a Markdown section on stdout (bench/run.sh appends it to
# its results); progress goes to stderr. Standalone:
#   bash bench/coverage.sh
# Settings: PACKAGE (the 16,256-probe package; made here, with small
# probes, when unset: coverage never reads a probe's bytes), RUNS (3).
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/common.sh
BIN=${CARGO_TARGET_DIR:-target}/release
RUNS=${RUNS:-3}
WORK=${COVERAGE_BENCH_DIR:-/tmp/kprobes-bench-coverage}
if [ -z "${SKIP_BUILD:-}" ]; then
  cargo build --release --quiet -p central-probes --features testing --bins >&2
fi
rm -rf "$WORK"; mkdir -p "$WORK"
trap 'kill $(jobs -p) 2>/dev/null; wait 2>/dev/null || true' EXIT

"$BIN/central-probes" pki init --out "$WORK/pki" >/dev/null
PKI=$WORK/pki
kernel_list "$WORK/kernels.txt"
if [ -z "${PACKAGE:-}" ]; then
  PACKAGE=$WORK/support-pkg-2.5.0-coverage.zip
  "$BIN/make-package" --out "$PACKAGE" --kernels "$WORK/kernels.txt" --kernel-modules --size-divisor 50 >&2
fi
token() { "$BIN/central-probes" token create --data-dir "$1" --role "$2" --name "bench-$2" 2>/dev/null; }

# The upstream Central, holding the package; a view token of it for the
# Centrals in front.
UPSTREAM_ADMIN=$(token "$WORK/upstream" admin)
token "$WORK/upstream" view >"$WORK/upstream.token"
METRICS_PORT=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
start_central "$WORK/upstream" "$PKI" --metrics-listen "127.0.0.1:$METRICS_PORT"
UPSTREAM=$CENTRAL_ADDR
# calls_to RPC: the calls the upstream answered so far.
calls_to() {
  curl -s "http://127.0.0.1:$METRICS_PORT/metrics" |
    awk -v rpc="rpc=\"$1\"" 'index($0, "central_probes_requests_total{") == 1 && index($0, rpc) { n += $NF } END { print n + 0 }'
}
ROX_API_TOKEN=$UPSTREAM_ADMIN "$BIN/central-probes" upload "$PACKAGE" -e "$UPSTREAM" --ca "$PKI/ca.pem" >/dev/null 2>&1

declare -A ADDR TOKEN
for central in holding empty; do
  TOKEN[$central]=$(token "$WORK/$central" admin)
  start_central "$WORK/$central" "$PKI" --upstream "https://$UPSTREAM" --upstream-ca "$PKI/ca.pem" \
    --upstream-token-file "$WORK/upstream.token"
  ADDR[$central]=$CENTRAL_ADDR
done
ROX_API_TOKEN=${TOKEN[holding]} "$BIN/central-probes" upload "$PACKAGE" -e "${ADDR[holding]}" --ca "$PKI/ca.pem" \
  >/dev/null 2>&1
probes=$(ROX_API_TOKEN=${TOKEN[holding]} "$BIN/central-probes" ls -e "${ADDR[holding]}" --ca "$PKI/ca.pem" 2>/dev/null | wc -l)
nodes=$(wc -l <"$WORK/kernels.txt")

echo
echo "## 9. Coverage before a rollout"
echo
echo "\`central-probes coverage --nodes kernels.txt -o json\` for $nodes kernels (one per line, so Central derives"
echo "their candidates), timed from the command's start to its exit, $RUNS runs each; the Central in front holds"
echo "$probes probes or none, its upstream Central holds the same package."
echo
echo "| Central in front | wall s (each run) | upstream requests per run | upstream's GetExistingProbes / GetProbe calls, all runs | uploaded / upstream / none |"
echo "|---|---|---|---|---|"
for central in holding empty; do
  walls=()
  existing_before=$(calls_to GetExistingProbes); get_before=$(calls_to GetProbe)
  for _ in $(seq 1 "$RUNS"); do
    t0=$(now)
    status=0
    ROX_API_TOKEN=${TOKEN[$central]} "$BIN/central-probes" coverage -e "${ADDR[$central]}" --ca "$PKI/ca.pem" \
      --module-version 2.5.0 --nodes "$WORK/kernels.txt" -o json >"$WORK/$central.json" 2>"$WORK/$central.err" || status=$?
    walls+=("$(secs "$t0" "$(now)")")
    [ "$status" -le 1 ] || { cat "$WORK/$central.err" >&2; exit 1; }
  done
  read -r requests uploaded upstream none <<<"$(python3 -c '
import json, sys
r = json.load(open(sys.argv[1]))
c = r["counts"]
print(r["upstream_requests"], c["uploaded"], c["upstream"], c["none"])' "$WORK/$central.json")"
  label=$([ "$central" = holding ] && echo "holds the package" || echo "holds nothing")
  existing=$(($(calls_to GetExistingProbes) - existing_before)); got=$(($(calls_to GetProbe) - get_before))
  echo "| $label | ${walls[*]} | $requests | $existing / $got | $uploaded / $upstream / $none |"
done
