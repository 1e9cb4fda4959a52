#!/usr/bin/env bash
# Signed probes (issue 23), in one run: GetProbe of signed probes against
# the same probes unsigned, on one Central, at 16 and 64 clients
# (alternating runs, three of each), and the Collector's CPU time to verify
# the signature of a 130 KB probe beside the SHA-256 it computes anyway.
# Prints a Markdown section on stdout (bench/run.sh appends it to
# BENCHMARKS.md); progress goes to stderr. Standalone:
#   bash bench/signed.sh
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/common.sh
BIN=${CARGO_TARGET_DIR:-target}/release
SECONDS_PER_RUN=${SECONDS_PER_RUN:-5}
WORK=${SIGNED_BENCH_DIR:-/tmp/kprobes-bench-signed}
if [ -z "${SKIP_BUILD:-}" ]; then
  cargo build --release --quiet -p central-probes -p collector-client -p probe-bench --features testing >&2
fi
rm -rf "$WORK"; mkdir -p "$WORK"
trap 'kill $(jobs -p) 2>/dev/null; wait 2>/dev/null || true' EXIT

"$BIN/central-probes" pki init --out "$WORK/pki" >/dev/null
PKI=$WORK/pki
TLS=(--ca "$PKI/ca.pem" --cert "$PKI/collector.pem" --key "$PKI/collector-key.pem")
kernel_list "$WORK/kernels.txt"
"$BIN/central-probes" package keygen --public-key "$WORK/site.pub" --secret-key "$WORK/site.key" >/dev/null
# The same kernels, with realistic probe sizes, under two module versions:
# 2.5.0 unsigned, 2.6.0 signed.
"$BIN/make-package" --out "$WORK/unsigned.zip" --module-version 2.5.0 --kernels "$WORK/kernels.txt" --limit 1000 >&2
"$BIN/make-package" --out "$WORK/signed.zip" --module-version 2.6.0 --kernels "$WORK/kernels.txt" --limit 1000 \
  --sign "$WORK/site.key" --serial 1 >&2
export ROX_API_TOKEN
ROX_API_TOKEN=$("$BIN/central-probes" token create --data-dir "$WORK/data" --role admin --name bench 2>/dev/null)
start_central "$WORK/data" "$PKI"
ADDR=$CENTRAL_ADDR
for package in unsigned signed; do
  "$BIN/central-probes" upload "$WORK/$package.zip" -e "$ADDR" --ca "$PKI/ca.pem" >/dev/null 2>&1
done
"$BIN/central-probes" ls -e "$ADDR" --ca "$PKI/ca.pem" 2>/dev/null | awk '{ print $3 }' >"$WORK/all.txt"
grep '^2\.5\.0/' "$WORK/all.txt" >"$WORK/unsigned.txt"
grep '^2\.6\.0/' "$WORK/all.txt" >"$WORK/signed.txt"
[ -s "$WORK/signed.txt" ] && [ -s "$WORK/unsigned.txt" ] || { echo "no probes to load" >&2; exit 1; }
# Warm the page cache and the hot cache alike for both sets.
for set in unsigned signed; do
  "$BIN/probe-bench" load --protocol grpc --address "$ADDR" "${TLS[@]}" --paths "$WORK/$set.txt" \
    --concurrency 16 --seconds 1 --each-once >/dev/null 2>&1
done

echo
echo "## 7. Signed probes"
echo
echo "GetProbe (tonic's client, mutual TLS, random picks over 1,000 probes of realistic sizes) of the same"
echo "probes signed (module version 2.6.0, a signature of about 330 bytes in each header) and unsigned (2.5.0),"
echo "on one Central, in alternating runs of ${SECONDS_PER_RUN} s:"
echo
echo "| clients | unsigned req/s (3 runs) | signed req/s (3 runs) | signed / unsigned (sums) |"
echo "|---|---|---|---|"
for c in 16 64; do
  u_all=(); s_all=()
  for _ in 1 2 3; do
    read -r u _ <<<"$("$BIN/probe-bench" load --protocol grpc --address "$ADDR" "${TLS[@]}" --paths "$WORK/unsigned.txt" \
      --concurrency "$c" --seconds "$SECONDS_PER_RUN" 2>>"$WORK/load.err")"
    read -r s _ <<<"$("$BIN/probe-bench" load --protocol grpc --address "$ADDR" "${TLS[@]}" --paths "$WORK/signed.txt" \
      --concurrency "$c" --seconds "$SECONDS_PER_RUN" 2>>"$WORK/load.err")"
    u_all+=("$u"); s_all+=("$s")
    echo "c=$c unsigned $u signed $s" >&2
  done
  ratio=$(awk -v u="${u_all[*]}" -v s="${s_all[*]}" 'BEGIN {
    n = split(u, a, " "); split(s, b, " "); for (i = 1; i <= n; i++) { su += a[i]; ss += b[i] }
    printf "%.2fx", ss / su }')
  echo "| $c | ${u_all[*]} | ${s_all[*]} | $ratio |"
done
read -r verify_us sha_us verify_ratio <<<"$("$BIN/probe-bench" verify --size 130000 --iterations 2000)"
echo
echo "The Collector's check of a 130 KB probe's signature (parse, BLAKE2b-512, two Ed25519 verifications;"
echo "minisign-verify, release build): $verify_us µs of CPU per probe, $verify_ratio the SHA-256 of the same bytes"
echo "($sha_us µs) that every fetch computes anyway, in the same run on the same thread."
