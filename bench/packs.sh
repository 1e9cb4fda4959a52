#!/usr/bin/env bash
# The pack store (issue 24) against the per-file store, in one run on the
# same package: the first upload (with cp + sync of the package as the
# disk's floor, and the run's CPU bound: both processes' CPU seconds over
# the machine's cores), the re-upload, Central's start-up with the probes
# stored (page cache dropped where the machine lets it), GetProbe over
# long-lived connections at 1, 16, 64 and 256 clients (alternating the two
# stores) and the export of every probe. Prints a Markdown section on
# stdout (bench/run.sh appends it); progress goes to stderr. Standalone:
#   bash bench/packs.sh            (PACKAGE=... to reuse a package)
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/common.sh
BIN=${CARGO_TARGET_DIR:-target}/release
SECONDS_PER_RUN=${SECONDS_PER_RUN:-5}
WORK=${PACKS_BENCH_DIR:-/tmp/kprobes-bench-packs}
if [ -z "${SKIP_BUILD:-}" ]; then
  cargo build --release --quiet -p central-probes -p collector-client -p probe-bench --features testing >&2
fi
# (A package made by an earlier run is kept: it takes a minute to make.)
mkdir -p "$WORK"; find "$WORK" -mindepth 1 -maxdepth 1 ! -name "support-pkg-*.zip" -exec rm -rf {} +; mkdir -p "$WORK"
trap 'kill $(jobs -p) 2>/dev/null; wait 2>/dev/null || true' EXIT

"$BIN/central-probes" pki init --out "$WORK/pki" >/dev/null
PKI=$WORK/pki
TLS=(--ca "$PKI/ca.pem" --cert "$PKI/collector.pem" --key "$PKI/collector-key.pem")
PACKAGE=${PACKAGE:-$WORK/support-pkg-2.5.0-bench.zip}
if [ ! -f "$PACKAGE" ]; then
  kernel_list "$WORK/kernels.txt"
  "$BIN/make-package" --out "$PACKAGE" --kernels "$WORK/kernels.txt" --kernel-modules >&2
fi
SIZE=$(stat -c %s "$PACKAGE")
drop_caches() { sync; echo 3 >/proc/sys/vm/drop_caches 2>/dev/null && echo dropped || echo "not dropped"; }

sync; t0=$(now); cp "$PACKAGE" "$WORK/copy.zip" && sync; cp_s=$(secs "$t0" "$(now)"); rm -f "$WORK/copy.zip"; sync
# (ext4 skips inodes freed in the last minute when it allocates: wait it
# out, so that the per-file store's 16,256 new files do not pay for the
# files of an earlier run.)
sleep 61

declare -A UP_S UP_CPU UP_RSS CLIENT_CPU RE_S START_S ADDR PID
for layout in files packs; do
  data=$WORK/data-$layout
  token=$("$BIN/central-probes" token create --data-dir "$data" --role admin --name bench 2>/dev/null)
  echo "$token" >"$WORK/token-$layout"
  start_central "$data" "$PKI" --store-layout "$layout"
  c0=$(cpu_of "$CENTRAL_PID")
  ROX_API_TOKEN=$token /usr/bin/time -f "%e %M %U %S" -o "$WORK/time.txt" "$BIN/central-probes" upload "$PACKAGE" \
    -e "$CENTRAL_ADDR" --ca "$PKI/ca.pem" >"$WORK/upload-$layout.out" 2>&1
  read -r up_s _ up_u up_sys <"$WORK/time.txt"
  UP_S[$layout]=$up_s; UP_CPU[$layout]=$(secs "$c0" "$(cpu_of "$CENTRAL_PID")"); UP_RSS[$layout]=$(hwm_mib "$CENTRAL_PID")
  CLIENT_CPU[$layout]=$(awk -v a="$up_u" -v b="$up_sys" 'BEGIN { print a + b }')
  ROX_API_TOKEN=$token /usr/bin/time -f "%e" -o "$WORK/time.txt" "$BIN/central-probes" upload "$PACKAGE" \
    -e "$CENTRAL_ADDR" --ca "$PKI/ca.pem" >"$WORK/reupload-$layout.out" 2>&1
  RE_S[$layout]=$(cat "$WORK/time.txt")
  kill -TERM "$CENTRAL_PID"; wait "$CENTRAL_PID" 2>/dev/null || true
  caches=$(drop_caches)
  t0=$(now); start_central "$data" "$PKI" --store-layout "$layout"; START_S[$layout]=$(secs "$t0" "$(now)")
  ADDR[$layout]=$CENTRAL_ADDR; PID[$layout]=$CENTRAL_PID
  echo "$layout: upload ${UP_S[$layout]} s, re-upload ${RE_S[$layout]} s, start ${START_S[$layout]} s" >&2
done
ROX_API_TOKEN=$(cat "$WORK/token-packs") "$BIN/central-probes" ls -e "${ADDR[packs]}" --ca "$PKI/ca.pem" 2>/dev/null | awk '{ print $3 }' | grep / >"$WORK/paths.txt"

echo
echo "## 8. The pack store against the per-file store"
echo
echo "The same package ($((SIZE / 1048576)) MiB, $(wc -l <"$WORK/paths.txt") probes) into a fresh Central of each layout,"
echo "every probe verified and durable before it is reported stored. cp + sync of the package: $cp_s s"
echo "($(mbps "$SIZE" "$cp_s") MB/s). CPU bound: the uploader's and Central's CPU seconds over $(nproc) cores."
echo
echo "| layout | upload s | MB/s | vs cp + sync | CPU s Central / uploader | Central CPU s per GB | upload / CPU bound | Central peak RSS MiB | re-upload / first | start-up s (page cache $caches) |"
echo "|---|---|---|---|---|---|---|---|---|---|"
for layout in files packs; do
  bound=$(awk -v a="${UP_CPU[$layout]}" -v b="${CLIENT_CPU[$layout]}" -v n="$(nproc)" 'BEGIN { printf "%.2f", (a + b) / n }')
  per_gb=$(awk -v c="${UP_CPU[$layout]}" -v b="$SIZE" 'BEGIN { printf "%.2f", c / (b / 1e9) }')
  echo "| $layout | ${UP_S[$layout]} | $(mbps "$SIZE" "${UP_S[$layout]}") | $(ratio "$cp_s" "${UP_S[$layout]}") | ${UP_CPU[$layout]} / ${CLIENT_CPU[$layout]} | $per_gb | $(ratio "${UP_S[$layout]}" "$bound") | ${UP_RSS[$layout]} | $(awk -v a="${RE_S[$layout]}" -v b="${UP_S[$layout]}" 'BEGIN { printf "%.3f", a / b }') | ${START_S[$layout]} |"
done
echo
echo "Pack store upload: $(ratio "${UP_S[files]}" "${UP_S[packs]}") the per-file store's rate."

for layout in files packs; do
  "$BIN/probe-bench" load --protocol grpc-plain --address "${ADDR[$layout]}" "${TLS[@]}" --paths "$WORK/paths.txt" \
    --concurrency 16 --seconds 1 --each-once >/dev/null 2>&1
done
echo
echo "GetProbe (plain HTTP/2 client, long-lived connections, random picks over every probe), alternating the two"
echo "stores, two runs of ${SECONDS_PER_RUN} s each:"
echo
echo "| clients | per-file req/s | pack req/s | pack / per-file (sums) | p99 ms per-file / pack |"
echo "|---|---|---|---|---|"
for c in 1 16 64 256; do
  f_all=(); p_all=()
  for _ in 1 2; do
    read -r f _ _ f99 _ <<<"$("$BIN/probe-bench" load --protocol grpc-plain --address "${ADDR[files]}" "${TLS[@]}" \
      --paths "$WORK/paths.txt" --concurrency "$c" --seconds "$SECONDS_PER_RUN" 2>>"$WORK/load.err")"
    read -r p _ _ p99 _ <<<"$("$BIN/probe-bench" load --protocol grpc-plain --address "${ADDR[packs]}" "${TLS[@]}" \
      --paths "$WORK/paths.txt" --concurrency "$c" --seconds "$SECONDS_PER_RUN" 2>>"$WORK/load.err")"
    f_all+=("$f"); p_all+=("$p")
    echo "c=$c files $f packs $p" >&2
  done
  r=$(awk -v f="${f_all[*]}" -v p="${p_all[*]}" 'BEGIN {
    n = split(f, a, " "); split(p, b, " "); for (i = 1; i <= n; i++) { sf += a[i]; sp += b[i] }
    printf "%.2fx", sp / sf }')
  echo "| $c | ${f_all[*]} | ${p_all[*]} | $r | $f99 / $p99 |"
done

echo
echo "| layout | export s | MB/s |"
echo "|---|---|---|"
for layout in files packs; do
  t0=$(now)
  ROX_API_TOKEN=$(cat "$WORK/token-$layout") "$BIN/central-probes" export -o "$WORK/export-$layout.zip" \
    -e "${ADDR[$layout]}" --ca "$PKI/ca.pem" >/dev/null 2>&1
  e_s=$(secs "$t0" "$(now)")
  echo "| $layout | $e_s | $(mbps "$(stat -c %s "$WORK/export-$layout.zip")" "$e_s") |"
  rm -f "$WORK/export-$layout.zip"
done
