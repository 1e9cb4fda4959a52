#!/usr/bin/env bash
# Before and after a change to Central's server: the request paths it can
# move, for two builds of central-probes in one run, alternating (old, new,
# new, old per round) so that the machine's drift hits both alike.
#
#   bench/compare.sh OLD_CENTRAL_PROBES [NEW_CENTRAL_PROBES]
#
# NEW defaults to this tree's release build. Rows: UploadProbes
# (`central-probes upload` of a package into a fresh Central), roxctl's
# upload route (probe-bench roxctl-upload, into another fresh Central),
# GetProbe through tonic's client at 1, 16 and 64 clients, and the HTTPS
# route at 16. The clients are this tree's in every run: only the server
# differs. A row is "within noise" when the new build's median is not below
# the old build's lowest run by more than the spread of the old runs (the
# old build measured against itself).
# Settings: KERNELS (default 1000 kernel releases: a 2,000-probe package of
# about 260 MB), SECONDS_PER_RUN (default 5), ROUNDS (default 2).
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/common.sh
BIN=${CARGO_TARGET_DIR:-target}/release
OLD=$(realpath "${1:?usage: bench/compare.sh OLD_CENTRAL_PROBES [NEW_CENTRAL_PROBES]}")
NEW=$(realpath "${2:-$BIN/central-probes}")
WORK=$(pwd)/bench/work/compare
KERNELS=${KERNELS:-1000}
SECONDS_PER_RUN=${SECONDS_PER_RUN:-5}
ROUNDS=${ROUNDS:-2}

command -v /usr/bin/time >/dev/null || apt-get install -y -qq time >/dev/null
cargo build --release --quiet -p central-probes -p probe-bench --features testing
rm -rf "$WORK"; mkdir -p "$WORK"
cleanup() { kill $(jobs -p) 2>/dev/null || true; wait 2>/dev/null || true; }
trap cleanup EXIT

head -n "$KERNELS" tests/data/kernel-versions.txt >"$WORK/kernels.txt"
PACKAGE="$WORK/support-pkg-2.5.0-compare.zip"
"$BIN/make-package" --out "$PACKAGE" --kernels "$WORK/kernels.txt" --kernel-modules >/dev/null
SIZE=$(stat -c %s "$PACKAGE")
"$BIN/probe-bench" extract --package "$PACKAGE" --out "$WORK/files" >/dev/null
(cd "$WORK/files" && find . -type f | sed "s|^\./||" | sort) >"$WORK/paths.txt"
sed 's|^|kernel-objects/|' "$WORK/paths.txt" >"$WORK/route-paths.txt"
"$BIN/central-probes" pki init --out "$WORK/pki" >/dev/null
PKI=$WORK/pki
TLS=(--ca "$PKI/ca.pem" --cert "$PKI/collector.pem" --key "$PKI/collector-key.pem")
RUNS="$WORK/runs.txt"
: >"$RUNS"

# measure LABEL SERVER RUN: one run of every row against SERVER, each into
# data directories of its own (none removed during the run: ext4 without a
# journal checks recently freed inodes when it allocates new ones).
measure() {
  local label=$1 server=$2 run=$3 data token t0 t1 out
  data="$WORK/data-$label-$run"
  token=$("$server" token create --data-dir "$data" --role admin --name bench 2>/dev/null)
  BIN_SERVE=$server start_central_with "$data"
  t0=$(now)
  ROX_API_TOKEN=$token "$BIN/central-probes" upload "$PACKAGE" -e "$CENTRAL_ADDR" --ca "$PKI/ca.pem" >/dev/null 2>&1
  t1=$(now)
  echo "$label upload-MB/s $(mbps "$SIZE" "$(secs "$t0" "$t1")")" >>"$RUNS"
  for c in 1 16 64; do
    out=$("$BIN/probe-bench" load --protocol grpc --address "$CENTRAL_ADDR" "${TLS[@]}" --paths "$WORK/paths.txt" \
      --concurrency "$c" --seconds "$SECONDS_PER_RUN" 2>>"$WORK/load.err")
    echo "$label GetProbe-c$c-req/s ${out%% *}" >>"$RUNS"
  done
  out=$("$BIN/probe-bench" load --protocol https --address "$CENTRAL_ADDR" "${TLS[@]}" --paths "$WORK/route-paths.txt" \
    --concurrency 16 --seconds "$SECONDS_PER_RUN" 2>>"$WORK/load.err")
  echo "$label route-c16-req/s ${out%% *}" >>"$RUNS"
  kill "$CENTRAL_PID"; wait "$CENTRAL_PID" 2>/dev/null || true

  data="$WORK/roxctl-$label-$run"
  token=$("$server" token create --data-dir "$data" --role admin --name bench 2>/dev/null)
  BIN_SERVE=$server start_central_with "$data"
  out=$("$BIN/probe-bench" roxctl-upload --package "$PACKAGE" --address "$CENTRAL_ADDR" --ca "$PKI/ca.pem" \
    --token "$token")
  echo "$label roxctl-upload-MB/s $(mbps "$SIZE" "${out%% *}")" >>"$RUNS"
  kill "$CENTRAL_PID"; wait "$CENTRAL_PID" 2>/dev/null || true
}

# start_central with SERVER's binary (start_central runs $BIN/central-probes).
start_central_with() {
  local keep=$BIN
  BIN=$(dirname "$BIN_SERVE")
  [ "$(basename "$BIN_SERVE")" = central-probes ] || { echo "$BIN_SERVE: name the central-probes binary" >&2; exit 2; }
  start_central "$1" "$PKI"
  BIN=$keep
}

for round in $(seq 1 "$ROUNDS"); do
  measure old "$OLD" "$round-a"
  measure new "$NEW" "$round-a"
  measure new "$NEW" "$round-b"
  measure old "$OLD" "$round-b"
done

echo "| row | old runs | new runs | new / old (medians) | old runs' spread | verdict |"
echo "|---|---|---|---|---|---|"
for row in $(awk '{ print $2 }' "$RUNS" | awk '!seen[$0]++'); do
  awk -v row="$row" '
    $2 == row { v[$1] = v[$1] " " $3 }
    function sorted(s, a,   n, i, j, t) {
      n = split(s, a, " ")
      for (i = 1; i <= n; i++) for (j = i + 1; j <= n; j++) if (a[j] + 0 < a[i] + 0) { t = a[i]; a[i] = a[j]; a[j] = t }
      return n
    }
    function median(a, n) { return n % 2 ? a[(n + 1) / 2] : (a[n / 2] + a[n / 2 + 1]) / 2 }
    END {
      no = sorted(v["old"], o); nn = sorted(v["new"], w)
      spread = o[no] - o[1]
      verdict = (median(w, nn) >= o[1] - spread) ? "within noise" : "lower"
      printf "| %s |%s |%s | %.2f | %.0f | %s |\n", row, v["old"], v["new"], median(w, nn) / median(o, no), spread, verdict
    }' "$RUNS"
done
