#!/usr/bin/env bash
# The pack store (issue 24) against the per-file store of the release
# before it (the binary of BASELINE_REV, main before the pack store, built
# once into bench/work/baseline-REV), in one run on the same package: the
# first upload (both through today's uploader, with cp + sync of the
# package as the disk's floor, and the run's CPU bound: both processes' CPU
# seconds over the machine's cores), the re-upload, Central's start-up with
# the probes stored (page cache dropped where the machine lets it),
# GetProbe over long-lived connections at 1, 16, 64 and 256 clients
# (alternating the two), the export of every probe, and compaction after
# removing every other probe: the space returned, and GetProbe before,
# during and after it. Prints a Markdown section on stdout (bench/run.sh
# appends it); progress goes to stderr. Standalone:
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
# The previous release's Central, built from its own sources (kept: a
# release build takes minutes).
BASELINE_REV=${BASELINE_REV:-dc4f685}
BASELINE=$(pwd)/bench/work/baseline-$BASELINE_REV
if [ ! -x "$BASELINE/bin/central-probes" ]; then
  echo "building Central at $BASELINE_REV (once)" >&2
  rm -rf "$BASELINE"; mkdir -p "$BASELINE/src" "$BASELINE/bin"
  git archive "$BASELINE_REV" | tar -x -C "$BASELINE/src"
  (cd "$BASELINE/src" && CARGO_TARGET_DIR="$BASELINE/target" cargo build --release --quiet -p central-probes >&2)
  cp "$BASELINE/target/release/central-probes" "$BASELINE/bin/"
  rm -rf "$BASELINE/src" "$BASELINE/target"
fi
# The Central binary of each store, and its store flag.
bin_of() { if [ "$1" = files ]; then echo "$BASELINE/bin"; else echo "$BIN"; fi; }
layout_flags() { if [ "$1" = packs ]; then echo "--store-layout packs"; fi; }
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
  token=$("$(bin_of $layout)/central-probes" token create --data-dir "$data" --role admin --name bench 2>/dev/null)
  echo "$token" >"$WORK/token-$layout"
  # shellcheck disable=SC2046
  BIN=$(bin_of $layout) start_central "$data" "$PKI" $(layout_flags $layout)
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
  # shellcheck disable=SC2046
  t0=$(now); BIN=$(bin_of $layout) start_central "$data" "$PKI" $(layout_flags $layout); START_S[$layout]=$(secs "$t0" "$(now)")
  ADDR[$layout]=$CENTRAL_ADDR; PID[$layout]=$CENTRAL_PID
  echo "$layout: upload ${UP_S[$layout]} s, re-upload ${RE_S[$layout]} s, start ${START_S[$layout]} s" >&2
done
ROX_API_TOKEN=$(cat "$WORK/token-packs") "$BIN/central-probes" ls -e "${ADDR[packs]}" --ca "$PKI/ca.pem" 2>/dev/null | awk '{ print $3 }' | grep / >"$WORK/paths.txt"

echo
echo "## 8. The pack store against the per-file store"
echo
echo "The same package ($((SIZE / 1048576)) MiB, $(wc -l <"$WORK/paths.txt") probes) into a fresh Central of each layout:"
echo "files is the previous release's binary ($BASELINE_REV, main before the pack store), packs today's; the"
echo "uploader is today's for both. Every probe is verified and durable before it is reported stored. cp + sync of the package: $cp_s s"
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
  ROX_API_TOKEN=$(cat "$WORK/token-$layout") "$BIN/central-probes" export --out "$WORK/export-$layout.zip" \
    -e "${ADDR[$layout]}" --ca "$PKI/ca.pem" >/dev/null 2>&1
  e_s=$(secs "$t0" "$(now)")
  echo "| $layout | $e_s | $(mbps "$(stat -c %s "$WORK/export-$layout.zip")" "$e_s") |"
  rm -f "$WORK/export-$layout.zip"
done

# -------------------------------------------------------------- compaction
# Every other probe removed, then compaction (looked for every 20 s here,
# rewriting packs under 0.6 live: with every other probe gone a pack is
# about half live) while GetProbe goes on over the probes kept.
kill -TERM "${PID[packs]}"; wait "${PID[packs]}" 2>/dev/null || true
start_central "$WORK/data-packs" "$PKI" --store-layout packs --compact-every 20s --compact-below 0.6
export ROX_API_TOKEN
ROX_API_TOKEN=$(cat "$WORK/token-packs")
# The store's dead and live bytes, by ls --summary.
space() {
  "$BIN/central-probes" ls --summary -o json -e "$CENTRAL_ADDR" --ca "$PKI/ca.pem" 2>/dev/null |
    python3 -c 'import json, sys; s = json.load(sys.stdin)["space"]; print(s["dead_bytes"], s["live_bytes"])'
}
disk() { du -sb "$WORK/data-packs/packs" | cut -f1; }
before_disk=$(disk)
awk 'NR % 2 == 0' "$WORK/paths.txt" >"$WORK/removed.txt"
awk 'NR % 2 == 1' "$WORK/paths.txt" >"$WORK/kept.txt"
load_kept() {
  "$BIN/probe-bench" load --protocol grpc-plain --address "$CENTRAL_ADDR" "${TLS[@]}" --paths "$WORK/kept.txt" \
    --concurrency "$1" --seconds 3 2>>"$WORK/load.err"
}
"$BIN/probe-bench" load --protocol grpc-plain --address "$CENTRAL_ADDR" "${TLS[@]}" --paths "$WORK/kept.txt" \
  --concurrency 16 --seconds 1 --each-once >/dev/null 2>&1
declare -A LOAD
# Before: the same probes, before anything is removed (nothing to compact).
LOAD[before,1]=$(load_kept 1); LOAD[before,16]=$(load_kept 16)
xargs -n 2000 "$BIN/central-probes" rm -e "$CENTRAL_ADDR" --ca "$PKI/ca.pem" <"$WORK/removed.txt" >/dev/null 2>&1
grep -q "compacting a pack" "$WORK/data-packs.log" && echo "warning: compaction began before the removal was over" >&2
read -r dead_after_rm live_after_rm <<<"$(space)"
removed_disk=$(disk)
for _ in $(seq 1 600); do grep -q "compacting a pack" "$WORK/data-packs.log" && break; sleep 0.2; done
compaction_started=$(now)
LOAD[during,1]=$(load_kept 1); LOAD[during,16]=$(load_kept 16)
still=$(grep -c "compacting a pack" "$WORK/data-packs.log")
# (grep -c exits 1 on a count of 0: a pack of 1 GiB takes longer than the load.)
done_by_then=$(grep -c "compacted a pack" "$WORK/data-packs.log" || true)
for _ in $(seq 1 600); do
  read -r dead _ <<<"$(space)"
  [ "$dead" -lt $((dead_after_rm / 10)) ] && break
  sleep 0.5
done
compaction_s=$(secs "$compaction_started" "$(now)")
sleep 1; after_disk=$(disk); read -r dead_after live_after <<<"$(space)"
LOAD[after,1]=$(load_kept 1); LOAD[after,16]=$(load_kept 16)
echo "compaction: ${compaction_s} s; disk $before_disk -> $removed_disk -> $after_disk" >&2

mib() { awk -v b="$1" 'BEGIN { printf "%.0f", b / 1048576 }'; }
echo
echo "Compaction after removing every other probe ($(wc -l <"$WORK/removed.txt") of $(wc -l <"$WORK/paths.txt")), Central run with"
echo "\`--compact-below 0.6 --compact-every 20s\` (each pack is then about half live) at the default rate (64 MiB/s):"
echo "packs on disk $(mib "$before_disk") MiB before the removal, $(mib "$removed_disk") MiB after it (live $(mib "$live_after_rm"), dead"
echo "$(mib "$dead_after_rm") MiB by \`ls --summary\`), $(mib "$after_disk") MiB after compaction (live $(mib "$live_after"), dead $(mib "$dead_after"));"
echo "returned $(mib $((removed_disk - after_disk))) MiB, $(awk -v a="$removed_disk" -v b="$after_disk" -v d="$dead_after_rm" 'BEGIN { printf "%.2f", (a - b) / d }') of the dead bytes, in $compaction_s s"
echo "(from the first pack's start until dead bytes fell under a tenth); $done_by_then of $still packs begun were done"
echo "when the loads during it ended. Before: the same probes before the removal."
echo
echo "GetProbe over the probes kept (plain HTTP/2 client, long-lived connections, 3 s each):"
echo
echo "| clients | before req/s | during req/s | after req/s | during / before | p99 ms before / during / after | errors during |"
echo "|---|---|---|---|---|---|---|"
for c in 1 16; do
  read -r b _ _ b99 _ <<<"${LOAD[before,$c]}"; read -r d _ _ d99 d_err <<<"${LOAD[during,$c]}"; read -r a _ _ a99 _ <<<"${LOAD[after,$c]}"
  echo "| $c | $b | $d | $a | $(ratio "$d" "$b") | $b99 / $d99 / $a99 | $d_err |"
done
