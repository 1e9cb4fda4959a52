#!/usr/bin/env bash
# Upload benchmark: a realistic support package (16,256 probes, about 2 GiB,
# names from tests/data/kernel-versions.txt) uploaded into a fresh
# Central over TLS, then uploaded again; with, in the same run, sha256sum of
# the package and cp + sync of it as baselines. Prints throughput, peak RSS
# of Central and of the uploader, and CPU seconds.
#
#   bench/upload.sh            # release build; work files in bench/work
#
# STORE_LAYOUT=files|packs picks Central's store (default: packs, Central's
# default); SKIP_BUILD=1 runs the binaries already in
# ${CARGO_TARGET_DIR:-target}/release, e.g. an older build kept for a
# before-and-after comparison.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/common.sh
BIN=${CARGO_TARGET_DIR:-target}/release
WORK=${BENCH_DIR:-bench/work}

command -v /usr/bin/time >/dev/null || apt-get install -y time >/dev/null
[ -n "${SKIP_BUILD:-}" ] || build_bins --release
mkdir -p "$WORK"
PACKAGE="$WORK/support-pkg-2.5.0-bench.zip"
if [ ! -f "$PACKAGE" ]; then
  kernel_list "$WORK/kernels.txt"
  "$BIN/make-package" --out "$PACKAGE" --kernels "$WORK/kernels.txt" --kernel-modules
fi
SIZE=$(stat -c %s "$PACKAGE")
mb_per_s() { awk -v b="$1" -v s="$2" 'BEGIN { printf "%.0f", b / s / 1e6 }'; }
now() { date +%s.%N; }
cpu_seconds() { awk '{ printf "%.2f", ($14 + $15) / 100 }' "/proc/$1/stat"; }

rm -rf "$WORK/data" "$WORK/pki" "$WORK/copy.zip"
# As in bench/run.sh: ext4 without a journal checks every inode freed in
# the last 60 s when it allocates one; the upload starts after that minute.
sync; removed_at=$(date +%s)
"$BIN/central-probes" pki init --out "$WORK/pki" >/dev/null
export ROX_API_TOKEN
ROX_API_TOKEN=$("$BIN/central-probes" token create --data-dir "$WORK/data" --role admin --name bench 2>/dev/null)

# Baselines, package warm in the page cache for all runs.
sha256sum "$PACKAGE" >/dev/null
start=$(now); sha256sum "$PACKAGE" >/dev/null; sha_s=$(awk -v a="$start" -v b="$(now)" 'BEGIN { print b - a }')
sync
start=$(now); cp "$PACKAGE" "$WORK/copy.zip" && sync; cp_s=$(awk -v a="$start" -v b="$(now)" 'BEGIN { print b - a }')
rm -f "$WORK/copy.zip"; sync

start_central "$WORK/data" "$WORK/pki" --min-free-space 1GiB --store-layout "${STORE_LAYOUT:-packs}"
sleep $((removed_at + 61 - $(date +%s))) 2>/dev/null || true
trap 'kill $(jobs -p) 2>/dev/null; wait 2>/dev/null || true' EXIT
cpu_before=$(cpu_seconds "$CENTRAL_PID")

upload() {
  /usr/bin/time -f "%e %M %U %S" -o "$WORK/time.txt" \
    "$BIN/central-probes" upload "$PACKAGE" -e "$CENTRAL_ADDR" --ca "$WORK/pki/ca.pem" >"$WORK/upload.out" 2>"$WORK/upload.err"
  read -r elapsed rss_kb user sys <"$WORK/time.txt"
}
upload
first_s=$elapsed; first_rss=$rss_kb; first_cpu=$(awk -v u="$user" -v s="$sys" 'BEGIN { print u + s }')
cpu_mid=$(cpu_seconds "$CENTRAL_PID")
upload
second_s=$elapsed; second_rss=$rss_kb
central_rss=$(awk '/VmHWM/ { print $2 }' "/proc/$CENTRAL_PID/status")
central_cpu=$(awk -v a="$cpu_before" -v b="$cpu_mid" 'BEGIN { printf "%.2f", b - a }')
# (The pack store keeps no file per probe: the count is the per-file store's.)
probes=$(find "$WORK/data/probes" -type f 2>/dev/null | wc -l || true)

echo
echo "package: $PACKAGE, $((SIZE / 1048576)) MiB, $probes probes stored"
grep -E "^Uploaded|^Nothing" "$WORK/upload.out" || true
printf '%-34s %8s %9s %8s\n' "run" "seconds" "MB/s" "vs cp+sync"
printf '%-34s %8.2f %9s %8s\n' "sha256sum (baseline)" "$sha_s" "$(mb_per_s "$SIZE" "$sha_s")" "-"
printf '%-34s %8.2f %9s %8s\n' "cp + sync (baseline)" "$cp_s" "$(mb_per_s "$SIZE" "$cp_s")" "1.00x"
printf '%-34s %8.2f %9s %8s\n' "first upload (all fsync'd)" "$first_s" "$(mb_per_s "$SIZE" "$first_s")" \
  "$(awk -v c="$cp_s" -v f="$first_s" 'BEGIN { printf "%.2fx", c / f }')"
printf '%-34s %8.2f %9s %8s\n' "re-upload (no probe bytes sent)" "$second_s" "-" \
  "$(awk -v f="$first_s" -v s="$second_s" 'BEGIN { printf "%.2f of first", s / f }')"
echo "peak RSS: Central $((central_rss / 1024)) MiB, uploader $((first_rss / 1024)) MiB (first), $((second_rss / 1024)) MiB (re-upload)"
echo "CPU seconds in the first upload: Central $central_cpu, uploader $first_cpu"
