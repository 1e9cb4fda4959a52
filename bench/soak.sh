#!/usr/bin/env bash
# Load and soak (not part of CI): 500 concurrent Collectors fetch random
# probes from Central over mutual TLS while an admin uploads a support
# package, for a bounded time. Reports errors, and Central's RSS and open
# file descriptors at the start and at the end.
#
#   bench/soak.sh            # SOAK_SECONDS (default 120), SOAK_CLIENTS (default 500)
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/common.sh
BIN=${CARGO_TARGET_DIR:-target}/release
WORK=$(pwd)/bench/work/soak
SOAK_SECONDS=${SOAK_SECONDS:-120}
SOAK_CLIENTS=${SOAK_CLIENTS:-500}
cargo build --release --quiet -p central-probes -p probe-bench --features testing
trap 'kill $(jobs -p) 2>/dev/null; wait 2>/dev/null || true' EXIT
rm -rf "$WORK"; mkdir -p "$WORK"
"$BIN/central-probes" pki init --out "$WORK/pki" >/dev/null
export ROX_API_TOKEN
ROX_API_TOKEN=$("$BIN/central-probes" token create --data-dir "$WORK/data" --role admin --name soak 2>/dev/null)
kernel_list "$WORK/kernels.txt"
# What the Collectors fetch: the first 2,000 kernels, uploaded first.
"$BIN/make-package" --out "$WORK/served.zip" --kernels "$WORK/kernels.txt" --limit 2000 >/dev/null
# What the admin uploads during the soak: every kernel, with kernel modules.
"$BIN/make-package" --out "$WORK/uploaded.zip" --kernels "$WORK/kernels.txt" --kernel-modules >/dev/null
start_central "$WORK/data" "$WORK/pki"
"$BIN/central-probes" upload "$WORK/served.zip" -e "$CENTRAL_ADDR" --ca "$WORK/pki/ca.pem" >/dev/null 2>&1
(cd "$WORK/data/probes" && find . -type f | sed 's|^\./||') >"$WORK/paths.txt"

fds() { ls "/proc/$CENTRAL_PID/fd" | wc -l; }
rss() { awk '/VmRSS/ { printf "%d", $2 / 1024 }' "/proc/$CENTRAL_PID/status"; }
# Let the connections come up before the first reading.
"$BIN/probe-bench" load --protocol grpc --address "$CENTRAL_ADDR" --ca "$WORK/pki/ca.pem" \
  --cert "$WORK/pki/collector.pem" --key "$WORK/pki/collector-key.pem" --paths "$WORK/paths.txt" \
  --concurrency "$SOAK_CLIENTS" --seconds "$SOAK_SECONDS" >"$WORK/load.out" 2>"$WORK/load.err" &
LOAD=$!
sleep 5
start_rss=$(rss); start_fds=$(fds)
t0=$(date +%s)
"$BIN/central-probes" upload "$WORK/uploaded.zip" -e "$CENTRAL_ADDR" --ca "$WORK/pki/ca.pem" >"$WORK/upload.out" 2>"$WORK/upload.err" \
  && upload_result="ok in $(( $(date +%s) - t0 )) s: $(grep -E '^Uploaded' "$WORK/upload.out")" || upload_result="FAILED: $(tail -1 "$WORK/upload.err")"
peak_rss=$(awk '/VmHWM/ { printf "%d", $2 / 1024 }' "/proc/$CENTRAL_PID/status")
wait "$LOAD"
read -r rps mbs p50 p99 errors <"$WORK/load.out"
end_rss=$(rss); end_fds=$(fds)
cat <<REPORT
soak: $SOAK_CLIENTS concurrent Collectors for $SOAK_SECONDS s over mutual TLS, random picks over $(wc -l <"$WORK/paths.txt") probes
  GetProbe: $rps requests/s, $mbs MB/s, p50 $p50 ms, p99 $p99 ms, errors $errors
  upload during the soak: $upload_result
  Central RSS: $start_rss MiB at start, $end_rss MiB at end (peak $peak_rss MiB)
  Central open file descriptors: $start_fds at start, $end_fds at end
REPORT
